"""The legs the proxy terminates: the client's (STARTTLS, COMPRESS, what capabilities it is
shown) and, before any client byte is relayed, STARTTLS toward the upstream.

STARTTLS and COMPRESS concern the client leg only: the proxy answers them itself and they never
reach the server. Capability lists describe the server's leg, so they are mediated on their way
to the client (see `capabilities`). Upstream STARTTLS is a small sans-IO conversation
(`UpstreamStartTls`) that the relay drives with its sockets and its TLS library.
"""

from __future__ import annotations

import enum

from imapveil.protocol import capabilities, lexer, proxy_header
from imapveil.protocol.actions import Action, Direction, StartCompress, StartTls
from imapveil.protocol.command import Command, State
from imapveil.protocol.config import CoreConfig
from imapveil.protocol.outbox import Outbox

_ALWAYS = frozenset((b"STARTTLS", b"COMPRESS", b"UNAUTHENTICATE"))
_LOGINS = frozenset((b"LOGIN", b"AUTHENTICATE"))
VERBS = _ALWAYS | _LOGINS
"""The verbs `ClientLeg.owns` may claim: what the command reader asks it about."""


class ClientLeg:
    """The client leg's TLS and compression, and its view of the server's capabilities."""

    __slots__ = ("compressed", "config", "discard_rest", "first", "out", "secure")

    def __init__(self, config: CoreConfig, out: Outbox, *, secure: bool) -> None:
        self.config = config
        self.out = out
        self.secure = secure  # the client leg is TLS (implicit or after STARTTLS)
        self.compressed = False  # COMPRESS=DEFLATE is active on the client leg
        self.discard_rest: str | None = None  # after our OK to STARTTLS/COMPRESS
        self.first: bytearray | None = bytearray()  # first octets, until they cannot be PROXY

    def __repr__(self) -> str:
        return f"<client leg secure={self.secure} compressed={self.compressed}>"

    def first_octets(self, data: bytes, *, first: bool) -> bytes | None:
        """What of the client's octets so far may be read as IMAP (None: nothing, yet or ever).

        A TLS ClientHello on a plain port is a client configured for implicit TLS. A PROXY
        header from a source not configured to send one is never passed on: a backend that
        accepts PROXY would believe the address in it. Decided on the first octets however they
        were segmented (`P`, then `ROXY ...`).
        """
        out = self.out
        if first and data[:1] == b"\x16" and not self.secure:
            out.violation("client", "tls_on_plain_port", f"{len(data)} octets", "closed")
            out.end("tls_error", "TLS ClientHello on a plain port")
            out.actions.extend(out.close("tls_error"))
            return None
        if self.first is None:
            return data
        self.first += data
        if proxy_header.could_be_header(bytes(self.first)):
            return None
        data, self.first = bytes(self.first), None
        if proxy_header.looks_like_header(data):
            out.violation("client", "proxy_header_untrusted", f"{len(data)} octets", "closed")
            out.end("proxy_header", "from an untrusted source")
            out.actions.extend(out.close("proxy_header"))
            return None
        return data

    def may_read_on(self, rest: int) -> bool:
        """After a line the proxy answered, with `rest` octets after it in the same chunk: may
        they be read? Not after our OK to STARTTLS/COMPRESS: sent before the switch, in clear
        text, where an attacker could have put them (the 2021 STARTTLS injection class)."""
        what, self.discard_rest = self.discard_rest, None
        if what is None or not rest:
            return True
        self.out.violation("client", f"{what}_pipelining", f"{rest} octets", "dropped")
        return False

    def owns(self, verb: bytes, state: State) -> bool:
        """Commands the proxy answers itself (of `VERBS`): STARTTLS and COMPRESS, UNAUTHENTICATE
        (refused, see `_decide`), LOGIN/AUTHENTICATE once authenticated (refused), and before
        TLS when TLS is required (LOGINDISABLED is advertised until then)."""
        return verb in _ALWAYS or (
            verb in _LOGINS
            and (
                state is not State.NOT_AUTHENTICATED
                or (self.config.client_tls == "require" and not self.secure)
            )
        )

    def answer(self, cmd: Command, args: bytes, line: bytes, *, busy: bool) -> bool:
        """Answer one of `owns`'s commands. False: the session ends (a literal where none
        belongs: a LOGIN that ignores LOGINDISABLED must not get its password past us)."""
        verb = cmd.verb
        if lexer.strip_eol(line).endswith(b"}"):
            self.out.violation("client", "literal_where_none_belongs", verb.decode(), "closed")
            self.out.protocol_error(b"* BYE Command not allowed here\r\n")
            return False
        status, text, then = self._decide(cmd, args, busy)
        # Owed, not said at once: in the middle of the server's response (a FETCH's literal on its
        # way) the answer would be written into it. When there is a `then`, it is said now.
        self.out.owe(cmd.tag + b" " + status + b" " + text + b"\r\n")
        if self.config.log_commands:
            # Before the switch: a TLS handshake that fails ends the relay's actions there.
            code = text[1 : text.find(b"]")].decode() if text.startswith(b"[") else None
            self.out.actions.append(self.out.command_record(cmd, status.decode(), code))
        if then is not None:
            self.out.actions.append(then)
            self.discard_rest = verb.decode().lower()
        return True

    def _decide(self, cmd: Command, args: bytes, busy: bool) -> tuple[bytes, bytes, Action | None]:
        verb = cmd.verb
        if verb == b"UNAUTHENTICATE":
            # RFC 8437 takes the server back to the not authenticated state, and the session to
            # another user, where this proxy's state would not follow (the session's user and
            # records, the login deadline, STARTTLS and COMPRESS offered by state): not offered
            # (`capabilities.mediate`), and answered as a server without it answers.
            return b"BAD", b"[CANNOT] UNAUTHENTICATE is not offered here", None
        if verb in _LOGINS and cmd.state is not State.NOT_AUTHENTICATED:
            # RFC 9051 §6.2: only in the not authenticated state. A server that took a second
            # login would put the session in another user's name behind the records' back.
            return b"BAD", b"[CLIENTBUG] Already authenticated", None
        if busy:
            return b"BAD", b"[CLIENTBUG] Wait for the outstanding commands first", None
        if verb in _LOGINS:
            return b"NO", b"[PRIVACYREQUIRED] Use STARTTLS first", None
        if verb == b"STARTTLS":
            if self.secure:
                return b"BAD", b"TLS is already active", None
            if cmd.state is not State.NOT_AUTHENTICATED:
                # RFC 9051 §6.2.1: only in the not authenticated state.
                return b"BAD", b"STARTTLS is only valid before authentication", None
            if self.config.client_tls == "off":
                return b"NO", b"[CANNOT] STARTTLS is not offered here", None
            self.secure = True
            return b"OK", b"Begin TLS negotiation now", StartTls(Direction.TO_CLIENT)
        if cmd.state is State.NOT_AUTHENTICATED:
            # RFC 4978 §5: `command-auth =/ compress`. Not before login: a client that has not
            # authenticated gets no decompressor of the proxy's to feed.
            return b"BAD", b"COMPRESS is only valid after authentication", None
        if self.compressed:
            return b"NO", b"[COMPRESSIONACTIVE] DEFLATE is already active", None
        if not self.config.compress:
            return b"NO", b"[CANNOT] COMPRESS is not offered here", None
        if args.strip().upper() != b"DEFLATE":
            return b"BAD", b"Unknown compression mechanism", None
        self.compressed = True
        return b"OK", b"DEFLATE active", StartCompress(Direction.TO_CLIENT)

    def _leg_state(self, authenticated: bool) -> capabilities.LegState:
        c = self.config
        return capabilities.LegState(
            c.client_tls,
            self.secure,
            c.compress,
            self.compressed,
            c.strict_capabilities,
            authenticated=authenticated,
        )

    def capability_line(self, body: bytes, after: int, authenticated: bool) -> bytes | None:
        """`* CAPABILITY ...` as the client is shown it, or None: as it came."""
        mediated = capabilities.rewrite(body[after:], self._leg_state(authenticated))
        if mediated is None:
            return None
        return body[:after] + b" " + mediated + b"\r\n"

    def capability_code(self, body: bytes, authenticated: bool) -> bytes | None:
        """A status line whose response code is CAPABILITY (`* OK [CAPABILITY ...] text`,
        `tag OK [...]`: the code right after the status, as `lexer.status_and_code` found it)
        as the client is shown it, or None: as it came.

        Whatever separates the names (a tab, two spaces) and even without its `]`, the code is
        mediated: a lenient client may read the list all the same. The mediated list is written
        with single spaces, and closed."""
        start = body.find(b" ", body.find(b" ") + 1) + 1  # after the tag (or `*`) and status
        names = start + len(b"[CAPABILITY")
        if body[start : start + 1] != b"[" or body[start + 1 : names].upper() != b"CAPABILITY":
            return None  # not a code where status_and_code reads one (callers check first)
        end = body.find(b"]", names)
        if end < 0:
            end = len(body)
        mediated = capabilities.rewrite(body[names:end], self._leg_state(authenticated))
        if mediated is None:
            return None
        return body[:names] + b" " + mediated + b"]" + body[end + 1 :] + b"\r\n"


class UpstreamTlsError(Exception):
    """The upstream would not (or could not) do TLS. The message says why, briefly."""


class Step(enum.Enum):
    """What the relay does next for `UpstreamStartTls` (besides sending bytes it returns)."""

    RECEIVE = 1  # read from the upstream and `receive` it
    HANDSHAKE = 2  # do the TLS handshake on the upstream connection, then `secured`
    DONE = 3  # `greeting` is what the client is shown first


_LINE_LIMIT = 64 * 1024


class UpstreamStartTls:
    """STARTTLS toward the upstream before the client sees anything (RFC 9051 §6.2.1), and the
    capabilities the server announces under TLS, for the greeting the client is shown.

    `next_step()` says what to do: bytes to send, or a `Step`. Bytes after the server's OK and
    before the handshake are injected or a broken server: never used (`UpstreamTlsError`).
    """

    __slots__ = ("_buffer", "_capabilities", "_greeting", "_stage", "greeting")

    def __init__(self) -> None:
        self._buffer = b""
        self._stage = "greeting"
        self._greeting = b""
        self._capabilities = b""
        self.greeting = b""

    def __repr__(self) -> str:
        return f"<upstream STARTTLS: {self._stage}>"

    def receive(self, data: bytes | bytearray) -> None:
        if not data:
            raise UpstreamTlsError("closed before TLS")
        self._buffer += data

    def secured(self) -> None:
        """The TLS handshake is done."""
        self._stage = "secured"

    def _line(self) -> bytes | None:
        if b"\n" not in self._buffer:
            if len(self._buffer) > _LINE_LIMIT:
                raise UpstreamTlsError("line too long before TLS")
            return None
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line + b"\n"

    def next_step(self) -> bytes | Step:
        stage = self._stage
        if stage == "secured":
            self._stage = "capability"
            return b"imapveil.1 CAPABILITY\r\n"
        if stage == "done":
            return Step.DONE
        while (line := self._line()) is not None:
            if stage == "greeting":
                if not line.startswith(b"* OK"):
                    raise UpstreamTlsError("no OK greeting")
                self._greeting = line
                self._stage = "starttls"
                return b"imapveil.0 STARTTLS\r\n"
            if stage == "starttls" and line.startswith(b"imapveil.0 "):
                if not line.startswith(b"imapveil.0 OK"):
                    raise UpstreamTlsError("STARTTLS refused")
                if self._buffer:
                    raise UpstreamTlsError("data after the STARTTLS OK")
                self._stage = "handshake"
                return Step.HANDSHAKE
            if stage == "capability":
                if line.startswith(b"imapveil.1 "):
                    self._done()
                    return Step.DONE
                if line[:13].upper() == b"* CAPABILITY ":
                    self._capabilities = lexer.strip_eol(line)[13:]
        return Step.RECEIVE

    def _done(self) -> None:
        body = lexer.strip_eol(self._greeting)
        _status, code, _args = lexer.status_and_code(body[2:])
        text = body[body.find(b"]") + 1 :].strip() if code else body[4:].strip()
        shown = b"* OK [CAPABILITY " + self._capabilities + b"] " + text + b"\r\n"
        # Anything unsolicited after the tagged answer still reaches the client.
        self.greeting = shown + self._buffer
        self._buffer = b""
        self._stage = "done"
