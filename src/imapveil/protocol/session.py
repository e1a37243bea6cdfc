"""The session core: one object that follows both directions of an IMAP session.

Bytes go in (`feed_client`, `feed_server`) with the current monotonic time; a list of actions
comes out. The two directions are coupled, so one object sees both: a client's synchronizing
literal `{N}` is only sent after the server's `+` (and never if the server answers the tag with
NO/BAD instead), AUTHENTICATE turns client lines into SASL responses until the tagged answer,
and IDLE makes the next client line `DONE`.

How the stream is followed (the "framer"): each direction is split into line fragments (ending
in LF) and literal bodies announced at the end of a fragment by `{N}`, `{N+}` or `~{N}`. Literal
bodies are never scanned or copied: the forwarded data is a slice of the chunk that arrived.
Bytes that no rule rewrites are forwarded as one contiguous slice per chunk. Only an incomplete
line at the end of a chunk is held back until its end arrives (bounded: client lines by
`max_line`, beyond which the client gets `* BYE`; server lines by `server_hold`, beyond which the
line is streamed through and only its head is kept for parsing).

Client bytes that arrive while the client should be waiting for the server (after a
synchronizing literal announcement, an AUTHENTICATE line, IDLE, STARTTLS or COMPRESS) are held,
unparsed, until the server's answer says what they are. A well-behaved client never sends any,
so nothing is delayed in practice; a client that does cannot make the proxy misread the stream.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from imapveil.protocol import capabilities, classify, id_params, lexer, proxy_header, sasl
from imapveil.protocol.actions import (
    Action,
    Close,
    Direction,
    Emit,
    Forward,
    Reply,
    StartCompress,
    StartTls,
)
from imapveil.protocol.framer import KEEP_LIMIT, ClientFramer, Fragment, ServerFramer, Use
from imapveil.protocol.id_params import IdSyntaxError
from imapveil.protocol.id_policy import IdOutcome, IdPolicy
from imapveil.protocol.lexer import LiteralError
from imapveil.records import (
    CommandCompleted,
    IdExchange,
    SessionEnded,
    SessionStarted,
    Violation,
)


class State(enum.Enum):
    """RFC 9051 §3: the IMAP connection states."""

    NOT_AUTHENTICATED = "not_authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"


def _no_identity(_user: bytes) -> str | None:
    return None


@dataclass(frozen=True, slots=True)
class CoreConfig:
    max_line: int = 64 * 1024
    """Longest client line (outside literals) before `* BYE`, like Dovecot's default."""
    server_hold: int = 64 * 1024
    """Longest server line held whole for parsing; longer lines stream through."""
    identify_user: Callable[[bytes], str | None] = field(default=_no_identity)
    """Maps a login name to what records say of the user (an HMAC, the name, or None)."""
    log_commands: bool = True
    idle_timeout_login: float = 60.0
    """Seconds without traffic before login (Dovecot's login timeout is 60 s too)."""
    idle_timeout: float = 31 * 60.0
    """Seconds without traffic after login; RFC 2177 clients re-issue IDLE every 29 minutes."""
    policy: Callable[[], IdPolicy] | None = None
    """The current ID policy (it may be reloaded); None: ID is relayed like any command."""
    hash_value: Callable[[bytes], str] = field(default=lambda _v: "hmac:")
    """Keyed HMAC for `record = "hash"` in ID policies."""
    max_id_records: int = 10
    max_violation_records: int = 20
    """Violation records per session (refused commands count too); the rest are counted in one
    `violations_suppressed` record at the end: one client's garbage must not flood the log."""
    inject_id: tuple[tuple[bytes, bytes], ...] = ()
    forward_client_address: bool = False
    client_tls: str = "off"
    """STARTTLS on a plain client leg: "off", "offer", or "require" (LOGINDISABLED until TLS)."""
    compress: bool = False
    """Offer COMPRESS=DEFLATE on the client leg (the proxy does the compression)."""
    strict_capabilities: bool = False
    """Advertise only capabilities the proxy knows (see protocol.capabilities.KNOWN)."""
    login_deadline: float = 180.0
    """Seconds from the connection until the client must be logged in, however it trickles
    (Dovecot's own limit for a client to log in is three minutes). 0: none."""
    greeting_timeout: float = 10.0
    """Seconds for the upstream's first line, which must be an IMAP greeting."""
    literal_timeout: float = 60.0
    """Seconds the proxy waits for the server's `+` (or answer) to a literal it forwarded."""
    max_held: int = 1024 * 1024
    """Client octets held while the client must wait for the server (the shell stops reading
    meanwhile, so this is one receive's worth; more is a client that cannot be followed)."""
    max_discard: int = 64 * 1024 * 1024
    """Octets of a refused command's literals the proxy skips to stay in step with a LITERAL+
    client; a larger literal ends the session instead (a `{2^63}` never drains)."""


# What the client's next line is.
class _ClientMode(enum.Enum):
    COMMAND = 1  # the start of a new command
    CONTINUE = 2  # the rest of the current command, after a literal
    SASL = 3  # a SASL response: the server sent "+" during AUTHENTICATE
    IDLING = 4  # "DONE", ending IDLE
    DISCARD = 5  # the rest of a command that was refused (by the proxy or the server)


# Why client bytes are held until the server answers.
class _Gate(enum.Enum):
    LITERAL = 1  # a synchronizing literal waits for "+" (or a tagged NO/BAD: no literal)
    AUTH = 2  # AUTHENTICATE waits for "+" (a challenge) or its tagged answer
    IDLE = 3  # IDLE waits for "+" (idling) or its tagged answer
    DRIVE = 5  # the proxy is sending a rewritten ID piece by piece, on the server's "+"
    GREETING = 6  # nothing goes to the server before its greeting says it speaks IMAP


_STATUS_WORDS = frozenset((b"OK", b"NO", b"BAD", b"BYE", b"PREAUTH"))
_ID_LIMIT = 64 * 1024  # an ID command collected whole: RFC 2971 limits (~33 KB) with a margin
_PLUS = b"+ Ready for literal data\r\n"
_RECORD_TAG = 64  # a tag is recorded up to this length (it is the client's to choose)
_GREETINGS = (b"* OK", b"* PREAUTH", b"* BYE")


class _Command:
    __slots__ = (
        "argc",
        "bad_args",
        "depth",
        "first_arg",
        "id_outcome",
        "id_server",
        "literals",
        "mailbox",
        "mechanism",
        "policy",
        "sasl_step",
        "started",
        "state",
        "tag",
        "user",
        "verb",
    )

    def __init__(self, tag: bytes, verb: bytes, state: State, started: float) -> None:
        self.tag = tag
        self.verb = verb
        self.state = state
        self.started = started
        self.literals: list[int] = []
        self.mechanism: str | None = None
        self.sasl_step = 0
        self.user: str | None = None
        self.mailbox: bytes | None = None
        self.id_outcome: IdOutcome | bool | None = None  # False: malformed or not followed
        self.id_server: IdOutcome | None = None
        self.depth = 0  # open parentheses so far, across fragments
        self.policy: tuple[str, str] | None = None  # (name, digest) of the policy that decided
        # LOGIN's arguments, counted so that a user name is taken only from a LOGIN whose
        # whole shape is `LOGIN SP astring SP astring` (never the password by a misparse).
        self.argc = 0
        self.first_arg: bytes | None = None
        self.bad_args = False

    def __repr__(self) -> str:
        return f"<command {self.tag!r} {self.verb!r}>"


class _IdCollect:
    """An ID command being collected whole before it is rewritten (bounded by _ID_LIMIT)."""

    __slots__ = ("acked", "cmd", "literals", "overflow", "parts", "skipped")

    def __init__(self, cmd: _Command, first: bytes) -> None:
        self.cmd = cmd
        self.parts = bytearray(first)
        self.acked = 0  # synchronizing literals we answered "+" to ourselves
        self.literals = 0  # literals of any kind: such an ID is never forwarded as it came
        # Larger than the proxy collects: the rest is followed (to find the command's end)
        # but not kept, and `ID NIL` goes to the server instead.
        self.overflow = False
        self.skipped = 0

    def __repr__(self) -> str:
        return f"<collecting ID: {len(self.parts)} octets>"


class SessionCore:
    """Follows one IMAP session. Not thread-safe; one per connection."""

    __slots__ = (
        "_address_sent",
        "_bye_seen",
        "_client",
        "_client_mode",
        "_close_pending",
        "_current",
        "_discard_rest",
        "_discarded",
        "_end_detail",
        "_end_reason",
        "_ended",
        "_first",
        "_gate",
        "_gate_owner",
        "_held",
        "_held_at",
        "_id",
        "_id_pieces",
        "_id_records",
        "_id_sent",
        "_id_waiting",
        "_idle_command",
        "_injected",
        "_injected_fields",
        "_injected_server",
        "_literal_hidden",
        "_logout_done",
        "_out",
        "_owed",
        "_pending",
        "_pending_literal",
        "_relay_line",
        "_replace",
        "_sasl_command",
        "_server",
        "_violations",
        "_withheld",
        "bytes_from_client",
        "bytes_from_server",
        "capabilities",
        "client_address",
        "client_endpoints",
        "client_secure",
        "closed",
        "commands",
        "compressed",
        "config",
        "greeted",
        "mailbox",
        "now",
        "session_id",
        "started",
        "state",
        "trusted_client",
        "upstream_address",
        "user",
    )

    def __init__(
        self,
        config: CoreConfig,
        *,
        session_id: str,
        client: str,
        upstream: str,
        now: float,
        trusted_client: bool = False,
        client_endpoints: tuple[tuple[str, int], tuple[str, int]] | None = None,
        client_secure: bool = False,
    ) -> None:
        self.config = config
        self.client_secure = client_secure  # the client leg is TLS (implicit or after STARTTLS)
        self.compressed = False  # COMPRESS=DEFLATE is active on the client leg
        self.trusted_client = trusted_client
        self.client_endpoints = client_endpoints  # (client, the address it connected to)
        self.session_id = session_id
        self.client_address = client
        self.upstream_address = upstream
        self.started = now
        self.now = now

        self.state = State.NOT_AUTHENTICATED
        self.mailbox: bytes | None = None
        self.capabilities: frozenset[str] = frozenset()
        self.user: str | None = None
        self.greeted = False
        self.bytes_from_client = 0
        self.bytes_from_server = 0
        self.commands = 0
        self.closed = False

        self._client = ClientFramer(config.max_line)
        self._server = ServerFramer(config.server_hold)
        self._client_mode = _ClientMode.COMMAND
        self._gate: _Gate | None = _Gate.GREETING
        self._gate_owner: _Command | None = None
        self._pending_literal = 0
        self._literal_hidden = False  # the literal waiting for "+" was {N+}: the "+" is ours
        self._discarded = 0  # octets skipped for the refused command being discarded
        self._first: bytearray | None = bytearray()  # first octets, until they cannot be PROXY
        # Client bytes waiting for the server's answer: the chunk they came in and where they
        # start in it (no copy, so that many gates in one chunk cost no more than one pass).
        self._held = b""
        self._held_at = 0
        self._current: _Command | None = None  # the command whose fragments are arriving
        self._pending: dict[bytes, deque[_Command]] = {}
        self._sasl_command: _Command | None = None
        self._idle_command: _Command | None = None
        self._logout_done = False
        self._bye_seen = False
        self._end_reason: str | None = None
        self._end_detail: str | None = None
        self._ended = False
        self._out: list[Action] = []
        self._id: _IdCollect | None = None
        self._withheld = False  # the client line just read is not forwarded as it came
        self._replace: bytes | None = None  # the server line just read goes out as this
        self._owed = bytearray()  # our own lines ("+", BAD), sent at a server response boundary
        self._relay_line: bytes | None = None  # how the client line just read goes out
        self._close_pending = False  # close once the owed lines are sent
        self._violations = 0  # violation records so far (and refused commands)
        self._id_waiting: _Command | None = None
        self._id_records = 0
        self._id_pieces: list[bytes] = []  # rest of a rewritten ID, one piece per "+"
        self._id_sent = False  # the client sent an ID in this session
        self._injected: bytes | None = None  # tag of an ID the proxy sent itself, until answered
        self._injected_fields: id_params.IdFields = None
        self._injected_server: IdOutcome | None = None
        self._address_sent = False
        self._discard_rest: str | None = None  # after our OK to STARTTLS/COMPRESS

    def __repr__(self) -> str:
        return (
            f"<SessionCore {self.session_id} {self.state.value}"
            f" client={self._client!r} server={self._server!r}>"
        )

    # ----------------------------------------------------------------------------------------
    # The interface the shell drives.

    def start(self) -> list[Action]:
        return [Emit(SessionStarted(self.session_id, self.client_address, self.upstream_address))]

    @property
    def idle_timeout(self) -> float:
        """Seconds without traffic before `timed_out`: short while the proxy waits for the
        server's greeting or for its `+` to a literal, long once the client is logged in."""
        if self._gate is _Gate.GREETING:
            return self.config.greeting_timeout
        timeout = (
            self.config.idle_timeout_login
            if self.state is State.NOT_AUTHENTICATED
            else self.config.idle_timeout
        )
        if self._gate is _Gate.LITERAL:
            return min(timeout, self.config.literal_timeout)
        return timeout

    def deadline(self, now: float) -> float:
        """When `timed_out` is due if nothing more happens: `idle_timeout` after now, but before
        login never later than `login_deadline` after the connection (a client that sends one
        octet every few seconds must not hold a session, and a server connection, for good)."""
        timeout = self.idle_timeout
        at = now + timeout if timeout > 0 else math.inf
        if self.state is State.NOT_AUTHENTICATED and self.config.login_deadline > 0:
            at = min(at, self.started + self.config.login_deadline)
        return at

    @property
    def held(self) -> int:
        """Client octets held until the server answers."""
        return len(self._held) - self._held_at

    @property
    def wants_client_data(self) -> bool:
        """False while the client must wait for the server: the shell stops reading the client
        (backpressure), so what a LITERAL+ client sends ahead stays in its own socket buffers.
        At most one receive's worth is held here."""
        return self._gate is None and not self.closed and not self._close_pending

    @property
    def end_detail(self) -> str | None:
        """Why the session is ending, as recorded (never peer data but for a few printable
        octets of a non-IMAP upstream's banner)."""
        return self._end_detail

    def feed_client(self, data: bytes, now: float) -> list[Action]:
        """Bytes the client sent. Returns what to do, in order."""
        self.now = now
        self.bytes_from_client += len(data)
        if self.closed:
            return []
        out: list[Action] = []
        self._out = out
        if self.bytes_from_client == len(data) and data[:1] == b"\x16" and not self.client_secure:
            # A TLS ClientHello on a plain port: a client configured for implicit TLS.
            self._violation("client", "tls_on_plain_port", f"{len(data)} octets", "closed")
            self._set_end("tls_error", "TLS ClientHello on a plain port")
            out.extend(self._close("tls_error"))
            return out
        if self._first is not None:
            # A PROXY header from a source not configured to send one: never pass it on, a
            # backend that accepts PROXY would believe the address in it. Decided on the first
            # octets however they were segmented (`P`, then `ROXY ...`).
            self._first += data
            if proxy_header.could_be_header(bytes(self._first)):
                return out
            data, self._first = bytes(self._first), None
            if proxy_header.looks_like_header(data):
                self._violation("client", "proxy_header_untrusted", f"{len(data)} octets", "closed")
                self._set_end("proxy_header", "from an untrusted source")
                out.extend(self._close("proxy_header"))
                return out
        self._scan_client(data)
        return out

    def feed_server(self, data: bytes, now: float) -> list[Action]:
        """Bytes the server sent. Returns what to do, in order."""
        self.now = now
        self.bytes_from_server += len(data)
        if self.closed:
            return []
        out: list[Action] = []
        self._out = out
        self._scan_server(data)
        self._pay_owed()
        if self._gate is None and self._held and not self.closed:
            held, at = self._held, self._held_at
            self._held, self._held_at = b"", 0
            self._scan_client(held, at)
        return out

    def client_closed(self, now: float) -> list[Action]:
        """The client closed its side (EOF or reset)."""
        self.now = now
        if self._logout_done:
            self._set_end("logout")
        else:
            self._set_end("client_closed", self._client_position())
        return self._close("client_closed")

    def server_closed(self, now: float) -> list[Action]:
        """The server closed its side (EOF or reset)."""
        self.now = now
        if self._logout_done:
            self._set_end("logout")
        elif self._bye_seen:
            self._set_end("server_bye")
        else:
            self._set_end("server_closed", self._server_position())
        return self._close("server_closed")

    def upstream_unavailable(self, detail: str, now: float) -> list[Action]:
        """The upstream could not be reached: tell the client, as RFC 5530 suggests."""
        self.now = now
        self._set_end("upstream_unavailable", detail)
        return [
            Reply(Direction.TO_CLIENT, b"* BYE [UNAVAILABLE] Mail server is not reachable\r\n"),
            *self._close("upstream_unavailable"),
        ]

    def refused(self, reason: str, detail: str, now: float) -> list[Action]:
        """Not served at all: a connection limit (`over_limit`) or a bad PROXY header."""
        self.now = now
        self._set_end(reason, detail)
        out: list[Action] = []
        if reason == "over_limit":
            text = b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n"
            out.append(Reply(Direction.TO_CLIENT, text))
        return out + self._close(reason)

    def timed_out(self, now: float) -> list[Action]:
        """No traffic for `idle_timeout` seconds, or no login by `login_deadline`."""
        self.now = now
        if self._gate is _Gate.GREETING:
            wait = self.config.greeting_timeout
            return self.upstream_unavailable(f"no IMAP greeting within {wait:g} s", now)
        bye = b"* BYE Disconnected for inactivity\r\n"
        if self._gate is _Gate.LITERAL:
            self._set_end("literal_timeout", "no answer to a literal")
        deadline = self.config.login_deadline
        if self.state is State.NOT_AUTHENTICATED and 0 < deadline <= now - self.started:
            self._set_end("login_timeout", f"not logged in within {deadline:g} s")
            bye = b"* BYE Login time limit reached\r\n"
        self._set_end("idle_timeout")
        out: list[Action] = []
        if self._can_speak_to_client():
            out.append(Reply(Direction.TO_CLIENT, bye))
        return out + self._close("idle_timeout")

    def shutting_down(self, now: float) -> list[Action]:
        """The proxy is stopping; RFC 5530 UNAVAILABLE tells the client to come back later."""
        self.now = now
        self._set_end("shutdown")
        out: list[Action] = []
        if self._can_speak_to_client():
            out.append(Reply(Direction.TO_CLIENT, b"* BYE [UNAVAILABLE] Server shutting down\r\n"))
        return out + self._close("shutdown")

    def tls_failed(self, detail: str, now: float) -> list[Action]:
        """A TLS handshake failed on a leg; nothing more can be said on it."""
        self.now = now
        self._set_end("tls_error", detail)
        return self._close("tls_error")

    def failed(self, detail: str, now: float) -> list[Action]:
        """A network error on either leg."""
        self.now = now
        self._set_end("error", detail)
        return self._close("error")

    def finish(self, now: float) -> list[Action]:
        """The session is over: the end record, once, plus records of unanswered commands."""
        if self._ended:
            return []
        self._ended = True
        self.now = now
        self._set_end("client_closed")
        out: list[Action] = []
        if self.config.log_commands:
            for queue in self._pending.values():
                out.extend(Emit(self._command_record(cmd, None, None)) for cmd in queue)
        self._pending.clear()
        suppressed = self._violations - self.config.max_violation_records
        if suppressed > 0:
            summary = Violation(
                self.session_id, "session", "violations_suppressed", f"{suppressed} more", "counted"
            )
            out.append(Emit(summary))
        out.append(
            Emit(
                SessionEnded(
                    session=self.session_id,
                    client=self.client_address,
                    upstream=self.upstream_address,
                    reason=self._end_reason or "client_closed",
                    detail=self._end_detail,
                    state=self.state.value,
                    user=self.user,
                    duration_ms=_ms(now - self.started),
                    bytes_from_client=self.bytes_from_client,
                    bytes_from_server=self.bytes_from_server,
                    commands=self.commands,
                    client_tls=self.client_secure,
                    compressed=self.compressed,
                )
            )
        )
        return out

    # ----------------------------------------------------------------------------------------
    # Client direction.

    def _scan_client(self, data: bytes, at: int = 0) -> None:
        if self._close_pending:
            return  # closing after our last words: nothing more is read
        f = self._client
        out = self._out
        n = len(data)
        pos = start = at
        while pos < n:
            if self._gate is not None:
                self._flush(Direction.TO_SERVER, data, start, pos)
                self._hold(data, pos)
                return
            kind, end, line = f.next(data, pos)
            if kind is Fragment.LITERAL:
                use = f.use
                if use is not Use.PASS:
                    # Not forwarded as it comes: a literal inside an ID command (collected), or
                    # a refused command's (skipped).
                    self._flush(Direction.TO_SERVER, data, start, pos)
                    start = end
                    if use is Use.TAKE and self._id is not None and not self._id.overflow:
                        self._id.parts += data[pos:end]
                pos = end
                if not f.literal_left:
                    if use is Use.SKIP:
                        self._client_mode = _ClientMode.DISCARD
                    else:
                        self._client_literal_done()
                continue
            if kind is Fragment.PARTIAL:
                self._flush(Direction.TO_SERVER, data, start, pos)
                return
            if kind is Fragment.TOO_LONG:
                self._flush(Direction.TO_SERVER, data, start, pos)
                self._line_too_long()
                return
            mark = len(out)
            if not self._client_line(line):
                # The session is closing because of this line: what came before it still goes
                # out, ahead of the BYE and the Close; the line itself does not.
                self._withheld = False
                self._relay_line = None
                self._flush(Direction.TO_SERVER, data, start, pos, at=mark)
                return
            if self._relay_line is not None:
                # The line goes out changed ({N+} as {N}) or after something of the proxy's own.
                self._withheld = True
                out.append(Forward(Direction.TO_SERVER, self._relay_line))
                self._relay_line = None
            if self._withheld:
                # Not relayed as it came: collected (ID), refused, rewritten or answered by us.
                self._withheld = False
                self._flush(Direction.TO_SERVER, data, start, pos, at=mark)
                f.held()
                start = end
                if self._discard_rest is not None and end < n:
                    # Sent after STARTTLS/COMPRESS but before the switch: in clear text, where
                    # an attacker could have put it (the 2021 STARTTLS injection class). Never
                    # relayed.
                    what, self._discard_rest = self._discard_rest, None
                    self._violation("client", f"{what}_pipelining", f"{n - end} octets", "dropped")
                    return
                self._discard_rest = None
            else:
                held = f.held()
                if held:
                    out.append(Forward(Direction.TO_SERVER, held))
            pos = end
        self._flush(Direction.TO_SERVER, data, start, pos)

    def _hold(self, data: bytes, at: int) -> None:
        if at >= len(data):
            return
        size = self.held + len(data) - at
        if size > self.config.max_held:
            # The client keeps talking where it must wait: it is not an IMAP client we can follow.
            self._violation("client", "sent_while_waiting", f"{size} octets")
            self._protocol_error(b"* BYE Client sent data before the server's continuation\r\n")
            return
        if self._held:  # more while already holding: only when the shell feeds a paused core
            self._held = self._held[self._held_at :] + data[at:]
            self._held_at = 0
        else:
            self._held, self._held_at = data, at

    def _client_line(self, line: bytes) -> bool:
        """Handle one complete client line. False: stop, the session is closing."""
        mode = self._client_mode
        if mode is _ClientMode.COMMAND:
            return self._command_start(line)
        if mode is _ClientMode.CONTINUE and self._current is not None:
            return self._command_fragment(self._current, line)
        if mode is _ClientMode.SASL:
            self._sasl_response(line)
            return True
        if mode is _ClientMode.IDLING:
            # RFC 2177: the only thing the client may send is DONE. Anything else would reach a
            # server that reads it its own way (as a command, unseen by the policy).
            if lexer.strip_eol(line).upper() != b"DONE":
                self._withheld = True
                self._violation("client", "idle_not_done", f"{len(line)} octets", "closed")
                self._protocol_error(b"* BYE Expected DONE to end IDLE\r\n")
                return False
            self._client_mode = _ClientMode.COMMAND
            return True
        return self._discard_fragment(line)

    def _command_start(self, line: bytes) -> bool:
        body = lexer.strip_eol(line)
        parsed = classify.first_fragment(body)
        tag, verb, frag = parsed.tag, parsed.verb, parsed.fragment
        if frag.problem is None and frag.literal is None and frag.depth:
            frag = replace(frag, problem="unbalanced_list")
        if frag.problem == "literal_length":
            return self._bad_literal()
        if tag is None or frag.problem is not None:
            return self._refuse(tag, verb, frag, len(line))
        args = body[parsed.args_at :]
        if verb in (b"STARTTLS", b"COMPRESS") or (
            verb in (b"LOGIN", b"AUTHENTICATE")
            and self.config.client_tls == "require"
            and not self.client_secure
        ):
            return self._own_command(tag, verb, args, line)
        cmd = _Command(tag, verb, self.state, self.now)
        cmd.depth = frag.depth
        self.commands += 1
        self._pending.setdefault(tag, deque()).append(cmd)
        self._current = cmd
        if verb == b"ID":
            self._id_sent = True
            if self.config.policy is not None:
                self._id = _IdCollect(cmd, line)
                self._withheld = True
        elif verb in (b"LOGIN", b"AUTHENTICATE") and self.state is State.NOT_AUTHENTICATED:
            fields = self._fields_to_inject()
            if fields:
                self._inject_id(line, fields)
        if verb == b"LOGIN":
            self._login_args(cmd, frag)
        elif verb == b"AUTHENTICATE":
            self._authenticate_start(cmd, args)
        elif verb in (b"SELECT", b"EXAMINE"):
            self._select_mailbox(cmd, args)
        return self._command_fragment_end(cmd, line, frag)

    def _refuse(self, tag: bytes | None, verb: bytes, frag: classify.Fragment, size: int) -> bool:
        """A command the proxy cannot read: answered BAD by the proxy, never forwarded.

        A non-synchronizing literal announced at its end is skipped, and the rest of the
        command after it, so that the next command is found where the client put it (a
        malformed message is discarded only at its end). A synchronizing one is never sent:
        the client waits for a "+" and gets the BAD instead.
        """
        self._withheld = True
        self._current = None
        self._client_mode = _ClientMode.COMMAND
        self._violation("client", f"refused_{frag.problem}", f"{size} octets", "refused")
        self._owe((tag or b"*") + b" BAD [CLIENTBUG] Command not understood by the proxy\r\n")
        if (
            tag is not None
            and self.config.log_commands
            and self._violations <= self.config.max_violation_records
        ):
            cmd = _Command(tag, verb or b"?", self.state, self.now)
            self._out.append(Emit(self._command_record(cmd, "BAD", "CLIENTBUG")))
        literal = frag.literal
        if literal is not None and not literal.synchronizing:
            self._discarded = 0
            if not self._discard_literal(literal.size):
                self._pay_owed()
                return False
        return True

    def _discard_literal(self, size: int) -> bool:
        """Skip a literal of a refused command, then the rest of that command."""
        self._discarded += size
        if self._discarded > self.config.max_discard:
            # Draining 2^63 octets is never going to end: stop here.
            self._violation("client", "literal_too_large_to_skip", f"{size} octets", "closed")
            self._set_end("protocol_error")
            # Said after what is owed already (and, from the server's side, after the answer
            # being read): `feed_server` and `_refuse` pay it.
            self._owed += b"* BYE Literal too large to skip\r\n"
            self._close_pending = True
            return False
        self._client.literal(size, Use.SKIP)
        self._client_mode = _ClientMode.DISCARD
        return True

    def _discard_fragment(self, line: bytes) -> bool:
        """A line of a command being discarded: dropped, following the client's framing."""
        self._withheld = True
        try:
            literal = lexer.literal_at_end(line)
        except LiteralError:
            literal = None
        if literal is None or literal.synchronizing:
            # The command ends here: a synchronizing literal would wait for a "+" that a
            # refused command never gets.
            self._client_mode = _ClientMode.COMMAND
            return True
        return self._discard_literal(literal.size)

    def _own_command(self, tag: bytes, verb: bytes, args: bytes, line: bytes) -> bool:
        """STARTTLS and COMPRESS concern the client leg, which the proxy terminates: it answers
        them itself, and they never reach the server. So does LOGIN/AUTHENTICATE before TLS when
        TLS is required (LOGINDISABLED is advertised until then)."""
        cmd = _Command(tag, verb, self.state, self.now)
        self.commands += 1
        self._withheld = True
        if lexer.strip_eol(line).endswith(b"}"):
            # None of these takes a literal, and a LOGIN that ignores LOGINDISABLED must not
            # get its password past us: end the session.
            self._violation("client", "literal_where_none_belongs", verb.decode(), "closed")
            self._protocol_error(b"* BYE Command not allowed here\r\n")
            return False
        then: Action | None = None
        if self._pending or self._gate is not None or not self._can_speak_to_client():
            status, text = b"BAD", b"[CLIENTBUG] Wait for the outstanding commands first"
        elif verb in (b"LOGIN", b"AUTHENTICATE"):
            status, text = b"NO", b"[PRIVACYREQUIRED] Use STARTTLS first"
        elif verb == b"STARTTLS":
            if self.client_secure:
                status, text = b"BAD", b"TLS is already active"
            elif self.state is not State.NOT_AUTHENTICATED:
                # RFC 9051 §6.2.1: only in the not authenticated state.
                status, text = b"BAD", b"STARTTLS is only valid before authentication"
            elif self.config.client_tls == "off":
                status, text = b"NO", b"[CANNOT] STARTTLS is not offered here"
            else:
                status, text = b"OK", b"Begin TLS negotiation now"
                then = StartTls(Direction.TO_CLIENT)
                self.client_secure = True
        elif self.compressed:
            status, text = b"NO", b"[COMPRESSIONACTIVE] DEFLATE is already active"
        elif not self.config.compress:
            status, text = b"NO", b"[CANNOT] COMPRESS is not offered here"
        elif args.strip().upper() != b"DEFLATE":
            status, text = b"BAD", b"Unknown compression mechanism"
        else:
            status, text = b"OK", b"DEFLATE active"
            then = StartCompress(Direction.TO_CLIENT)
            self.compressed = True
        self._out.append(Reply(Direction.TO_CLIENT, tag + b" " + status + b" " + text + b"\r\n"))
        if then is not None:
            self._out.append(then)
            self._discard_rest = verb.decode().lower()
        if self.config.log_commands:
            code = text[1 : text.find(b"]")].decode() if text.startswith(b"[") else None
            self._out.append(Emit(self._command_record(cmd, status.decode(), code)))
        return True

    def _command_fragment(self, cmd: _Command, line: bytes) -> bool:
        frag = classify.fragment(lexer.strip_eol(line), 0, cmd.depth)
        if frag.problem == "literal_length":
            return self._bad_literal()
        if frag.problem is not None:
            # The server holds the start of this command and waits for the rest: no answer of
            # ours could end it cleanly, and nothing unreadable is sent. The session ends.
            self._withheld = True
            self._violation("client", f"refused_{frag.problem}", f"{len(line)} octets", "closed")
            self._protocol_error(b"* BYE Command not understood by the proxy\r\n")
            return False
        cmd.depth = frag.depth
        collecting = self._id
        if collecting is not None and collecting.cmd is cmd:
            self._withheld = True
            if not self._id_collect(collecting, len(line)):
                return False
            if not collecting.overflow:
                collecting.parts += line
        elif cmd.verb == b"LOGIN":
            self._login_args(cmd, frag)
        return self._command_fragment_end(cmd, line, frag)

    def _command_fragment_end(self, cmd: _Command, line: bytes, frag: classify.Fragment) -> bool:
        literal = frag.literal
        c = self._client
        if literal is None:
            self._current = None
            self._client_mode = _ClientMode.COMMAND
            if cmd.verb == b"LOGIN":
                self._login_user(cmd)
            if self._id is not None and self._id.cmd is cmd:
                self._id_complete(self._id)
            self._command_sent(cmd)
            return True
        cmd.literals.append(literal.size)
        self._client_mode = _ClientMode.CONTINUE
        collecting = self._id
        if collecting is not None and collecting.cmd is cmd:
            collecting.literals += 1
            if not self._id_collect(collecting, literal.size):
                return False
            if literal.synchronizing:
                # The server's "+" would only come once the line is forwarded, and it is not
                # forwarded until the command is whole: so the proxy says "+" itself.
                collecting.acked += 1
                self._owe(_PLUS)
            c.literal(literal.size, Use.TAKE)
            if not literal.size:
                self._client_literal_done()
            return True
        if cmd.verb == b"LOGIN":
            cmd.argc += 1
            if cmd.argc == 1 and not cmd.bad_args:
                c.keep_next()
        elif c.kept is None and self._wants_literal(cmd):
            c.keep_next()
        # Literal octets go to the server only when it asked for them. A server that does not
        # read a literal the proxy saw announced (RFC 7888 says it must look for {N+} at every
        # line's end; Dovecot 2.3 does not always) runs its octets as commands, unseen by the
        # proxy and its policy. So {N+} goes out as {N}; the client's octets wait (the shell
        # stops reading them) until the server's "+", which a LITERAL+ client never sees; if
        # the server answers the command instead, they are skipped.
        if not literal.synchronizing:
            self._relay_line = _synchronizing(line)
        self._pending_literal = literal.size
        self._literal_hidden = not literal.synchronizing
        self._set_gate(_Gate.LITERAL, cmd)
        return True

    def _bad_literal(self) -> bool:
        """A literal length of more than 20 digits: its octets cannot be counted, so the
        stream cannot be followed past it."""
        self._withheld = True
        self._violation("client", "bad_literal", "literal length has too many digits", "closed")
        self._protocol_error(b"* BYE Literal length is not acceptable\r\n")
        return False

    def _id_collect(self, collecting: _IdCollect, size: int) -> bool:
        """Room for `size` more octets of an ID? Past the collection bound they are followed
        but not kept; past `max_discard` the session ends (False)."""
        if not collecting.overflow and len(collecting.parts) + size <= _ID_LIMIT:
            return True
        if not collecting.overflow:
            collecting.overflow = True
            collecting.skipped = len(collecting.parts)
            collecting.parts.clear()
        collecting.skipped += size
        return collecting.skipped <= self.config.max_discard or self._id_too_large()

    def _id_too_large(self) -> bool:
        """Far more than an ID can be: not worth following."""
        self._id = None
        self._withheld = True
        self._violation("client", "id_too_large", f"more than {_ID_LIMIT} octets", "closed")
        self._set_end("line_too_long")
        self._protocol_error(b"* BYE [TOOBIG] ID command too large\r\n")
        return False

    def _owe(self, data: bytes) -> None:
        """A line of the proxy's own for the client, sent at the next response boundary."""
        self._owed += data
        self._pay_owed()

    # ----------------------------------------------------------------------------------------
    # RFC 2971 ID.

    def _pay_owed(self) -> None:
        if self._owed and self._can_speak_to_client() and not self.closed:
            self._out.append(Reply(Direction.TO_CLIENT, bytes(self._owed)))
            self._owed.clear()
            if self._close_pending:
                self._out.extend(self._close("protocol_error"))

    def _id_complete(self, collecting: _IdCollect) -> None:
        self._id = None
        cmd = collecting.cmd
        policy_source = self.config.policy
        assert policy_source is not None
        raw = bytes(collecting.parts)
        # "tag ID args": the arguments start after the verb, wherever spaces put it.
        verb_at = raw.upper().find(b"ID", len(cmd.tag))
        self._id_waiting = cmd
        if collecting.overflow:
            self._violation("client", "id_too_large", f"{collecting.skipped} octets", "replaced")
            self._out.append(Forward(Direction.TO_SERVER, cmd.tag + b" ID NIL\r\n"))
            cmd.id_outcome = False
            return
        try:
            fields = id_params.parse(raw[verb_at + 2 :])
        except IdSyntaxError:
            # Never forwarded as it came: the server would read it its own way (Dovecot accepts
            # `\q` inside quotes, text after the list, any number of pairs) and pass on what
            # the policy never saw. `ID NIL` says nothing, which is true (RFC 2971 §3), and
            # keeps the exchange's shape: the client gets the server's answer to it.
            self._violation("client", "malformed_id", f"{len(raw)} octets", "replaced")
            self._out.append(Forward(Direction.TO_SERVER, cmd.tag + b" ID NIL\r\n"))
            cmd.id_outcome = False
            return
        # The policy in force now decides, and the record names this one (not the one in
        # force when the server answers: a reload may come between).
        policy = policy_source()
        outcome = policy.apply(
            fields, hasher=self.config.hash_value, trusted_client=self.trusted_client
        )
        cmd.id_outcome = outcome
        cmd.policy = (policy.name, policy.digest)
        if not outcome.changed and not collecting.literals:
            self._out.append(Forward(Direction.TO_SERVER, raw))  # byte for byte
            return
        # Written anew. A value that needs a literal is sent the synchronizing way, one piece
        # per server "+" (which the client never sees; its next commands wait meanwhile), so
        # that even these octets reach the server only when it asked for them.
        pieces = id_params.serialize_pieces(outcome.forwarded)
        pieces[0] = cmd.tag + b" ID " + pieces[0]
        pieces[-1] += b"\r\n"
        self._out.append(Forward(Direction.TO_SERVER, pieces[0]))
        if len(pieces) > 1:
            self._id_pieces = pieces[1:]
            self._set_gate(_Gate.DRIVE, cmd)

    def _fields_to_inject(self) -> tuple[tuple[bytes, bytes], ...]:
        """What the proxy's own ID before login says, if anything.

        `inject_id` (when the client sent no ID of its own), and Dovecot's client address
        fields (`forward_client_address`): a backend that trusts the proxy
        (login_trusted_networks) then logs and rate-limits the real client, not the proxy.
        """
        if self._injected is not None:
            return ()
        fields: list[tuple[bytes, bytes]] = []
        if self.config.inject_id and not self._id_sent:
            fields.extend(self.config.inject_id)
        endpoints = self.client_endpoints
        if self.config.forward_client_address and endpoints is not None and not self._address_sent:
            (client_ip, client_port), (local_ip, local_port) = endpoints
            fields += [
                (b"x-originating-ip", client_ip.encode()),
                (b"x-originating-port", b"%d" % client_port),
                (b"x-connected-ip", local_ip.encode()),
                (b"x-connected-port", b"%d" % local_port),
                (b"x-session-id", self.session_id.encode()),
            ]
            self._address_sent = True
        return tuple(fields)

    def _inject_id(self, line: bytes, fields: tuple[tuple[bytes, bytes], ...]) -> None:
        """Our own honest ID, ahead of the client's LOGIN; its answer is not shown the client."""
        self._id_sent = True
        tag = b"imapveil.%d" % self.commands
        self._injected = tag
        self._injected_fields = fields
        command = tag + b" ID " + id_params.serialize(fields, literal_plus=False) + b"\r\n"
        self._out.append(Forward(Direction.TO_SERVER, command))
        self._relay_line = line  # then the client's line, after ours

    def _injected_answered(self, status: str) -> None:
        tag, self._injected = self._injected, None
        assert tag is not None
        self._replace = b""
        server, self._injected_server = self._injected_server, None
        fields = self._injected_fields or ()
        self._emit_id(
            IdExchange(
                session=self.session_id,
                tag=tag.decode(),
                state=self.state.value,
                status=status,
                malformed=False,
                # The organisation's own words only; the client's address is in the session
                # records already, and is not repeated here.
                client={
                    n.decode(): v.decode() if v is not None else None
                    for n, v in fields
                    if (n, v) in self.config.inject_id
                },
                dropped=(),
                forwarded=_names(self._injected_fields),
                server=_recorded(server),
                injected=True,
            )
        )

    def _emit_id(self, record: IdExchange, decided_by: tuple[str, str] | None = None) -> None:
        """The record, with the policy in force, unless this session has had its share of `id`
        records (RFC 2971 §7: logs must not be floodable)."""
        if self._id_records >= self.config.max_id_records:
            return
        self._id_records += 1
        if decided_by is not None:
            record = replace(record, policy=decided_by[0], policy_digest=decided_by[1])
        elif self.config.policy is not None:
            policy = self.config.policy()
            record = replace(record, policy=policy.name, policy_digest=policy.digest)
        self._out.append(Emit(record))

    def _server_id(self, line: bytes) -> None:
        """`* ID (...)`: the same policy applies on the way to the client."""
        policy_source = self.config.policy
        if self._injected is not None:
            # The answer to our own ID: the client did not ask, so it does not see it.
            self._replace = b""
            if policy_source is not None:
                try:
                    fields = id_params.parse(lexer.strip_eol(line)[5:])
                except IdSyntaxError:
                    return
                self._injected_server = policy_source().apply(
                    fields, hasher=self.config.hash_value, trusted_client=True
                )
            return
        if policy_source is None:
            return
        body = lexer.strip_eol(line)
        try:
            fields = id_params.parse(body[5:])
        except IdSyntaxError:
            self._violation("server", "malformed_id", f"{len(line)} octets")
            return
        outcome = policy_source().apply(fields, hasher=self.config.hash_value, trusted_client=True)
        waiting = self._id_waiting
        if waiting is not None:
            waiting.id_server = outcome
        if outcome.changed:
            args = id_params.serialize(outcome.forwarded, literal_plus=False)
            if b"\n" not in args:  # a value that needs a literal: leave the line as it was
                self._replace = b"* ID " + args + b"\r\n"

    def _id_record(self, cmd: _Command, status: str) -> None:
        self._id_waiting = None if self._id_waiting is cmd else self._id_waiting
        client = None if isinstance(cmd.id_outcome, bool) else cmd.id_outcome
        self._emit_id(
            IdExchange(
                session=self.session_id,
                tag=_record_tag(cmd.tag),
                state=cmd.state.value,
                status=status,
                malformed=cmd.id_outcome is False,
                client=_recorded(client),
                dropped=client.dropped if client is not None else (),
                forwarded=_names(client.forwarded) if client is not None else None,
                server=_recorded(cmd.id_server),
            ),
            cmd.policy,
        )

    def _command_sent(self, cmd: _Command) -> None:
        """The whole command has been read; some commands make the client wait."""
        verb = cmd.verb
        if verb == b"AUTHENTICATE":
            self._sasl_command = cmd
            self._set_gate(_Gate.AUTH, cmd)
        elif verb == b"IDLE":
            self._idle_command = cmd
            self._set_gate(_Gate.IDLE, cmd)

    def _client_literal_done(self) -> None:
        cmd = self._current
        captured = self._client.take_kept()
        if captured is not None and cmd is not None:
            self._literal_captured(cmd, captured)
        self._client_mode = _ClientMode.CONTINUE

    def _wants_literal(self, cmd: _Command) -> bool:
        """Keep the body of this literal? Only a mailbox that is a literal (LOGIN's user name
        is decided in `_command_fragment_end`)."""
        if len(cmd.literals) != 1:
            return False
        return cmd.verb in (b"SELECT", b"EXAMINE") and cmd.mailbox is None

    def _literal_captured(self, cmd: _Command, value: bytes) -> None:
        if cmd.verb == b"LOGIN":
            if cmd.argc == 1 and cmd.literals[-1] <= KEEP_LIMIT:
                cmd.first_arg = value
        else:
            cmd.mailbox = value

    def _login_args(self, cmd: _Command, frag: classify.Fragment) -> None:
        """Count LOGIN's arguments in a fragment, keeping the first (the user name)."""
        if cmd.argc > 2:
            return
        for value in classify.values(frag.content):
            if value is None:
                cmd.bad_args = True  # a list is no astring
                return
            cmd.argc += 1
            if cmd.argc == 1:
                cmd.first_arg = value

    def _login_user(self, cmd: _Command) -> None:
        """The whole LOGIN has been read. Its user name counts only if the command had exactly
        the shape `LOGIN SP astring SP astring` (RFC 9051 §6.2.3): no other bytes, and never
        the password by a misreading, can become a record's user."""
        value, cmd.first_arg = cmd.first_arg, None
        if not cmd.bad_args and cmd.argc == 2 and value is not None:
            cmd.user = self.config.identify_user(value)

    def _select_mailbox(self, cmd: _Command, args: bytes) -> None:
        if args[:1] != b" ":
            return
        parsed = lexer.read_astring(args, 1)
        if parsed is not None:
            cmd.mailbox = parsed[0]

    def _authenticate_start(self, cmd: _Command, args: bytes) -> None:
        if args[:1] != b" ":
            return
        mechanism, end = lexer.read_atom(args, 1, 40)
        cmd.mechanism = mechanism.upper().decode("ascii") or None
        if args[end : end + 1] == b" ":  # SASL-IR (RFC 4959)
            self._sasl_identity(cmd, args[end + 1 :])
            cmd.sasl_step = 1

    def _sasl_response(self, line: bytes) -> None:
        cmd = self._sasl_command
        if cmd is not None:
            self._sasl_identity(cmd, line)
            cmd.sasl_step += 1
            # The next response comes only after the next challenge.
            self._set_gate(_Gate.AUTH, cmd)
        self._client_mode = _ClientMode.COMMAND

    def _sasl_identity(self, cmd: _Command, text: bytes) -> None:
        if cmd.user is not None or cmd.mechanism is None:
            return
        response = sasl.decode_response(text)
        if response is None:
            return
        name = sasl.username(cmd.mechanism, cmd.sasl_step, response)
        if name is not None:
            cmd.user = self.config.identify_user(name)

    def _set_gate(self, gate: _Gate, owner: _Command) -> None:
        self._gate = gate
        self._gate_owner = owner

    def _line_too_long(self) -> None:
        self._violation(
            "client", "line_too_long", f"longer than {self.config.max_line} octets", "closed"
        )
        self._set_end("line_too_long")
        limit = self.config.max_line
        self._protocol_error(
            f"* BYE [TOOBIG] Command line too long (limit {limit} octets)\r\n".encode()
        )

    def _protocol_error(self, bye: bytes) -> None:
        self._set_end("protocol_error")
        if self._can_speak_to_client():
            self._pay_owed()
            self._out.append(Reply(Direction.TO_CLIENT, bye))
        self._out.extend(self._close("protocol_error"))

    # ----------------------------------------------------------------------------------------
    # Server direction.

    def _scan_server(self, data: bytes) -> None:
        f = self._server
        out = self._out
        n = len(data)
        pos = start = 0
        while pos < n:
            kind, line_start, pos, line = f.next(data, pos, self.greeted)
            if kind is Fragment.DATA_LINE:
                self._server_literal(line)
                continue
            if kind is Fragment.LONG_LINE:
                self._server_long_line(line, f.tail)
                continue
            if kind is Fragment.STREAM:
                if line:
                    out.append(Forward(Direction.TO_CLIENT, line))
                continue
            if kind is Fragment.NO_GREETING:
                self._not_imap(line)
                self._replace = None
                return
            if kind is Fragment.PARTIAL:
                self._flush(Direction.TO_CLIENT, data, start, line_start)
                return
            if kind is Fragment.END:
                break
            mark = len(out)
            self._server_line(line)
            if self._replace is not None:
                # This line goes out rewritten (`* ID`) or not at all (a "+" we already gave).
                self._flush(Direction.TO_CLIENT, data, start, line_start, at=mark)
                if self._replace:
                    out.append(Forward(Direction.TO_CLIENT, self._replace))
                self._replace = None
                f.held()
                start = pos
            else:
                held = f.held()
                if held:
                    out.insert(mark, Forward(Direction.TO_CLIENT, held))
            if self.closed:
                return
        self._flush(Direction.TO_CLIENT, data, start, pos)

    def _not_imap(self, line: bytes) -> None:
        """The upstream's first line is no IMAP greeting (an SMTP or SSH port by mistake): the
        client's LOGIN must not go there. A few printable octets say what it was."""
        self._replace = b""
        shown = "".join(chr(c) if 0x20 <= c < 0x7F else "?" for c in lexer.strip_eol(line)[:24])
        self._set_end("upstream_unavailable", f"not an IMAP greeting: {shown!r}")
        self._out.append(
            Reply(Direction.TO_CLIENT, b"* BYE [UNAVAILABLE] Mail server is not reachable\r\n")
        )
        self._out.extend(self._close("upstream_unavailable"))

    def _server_long_line(self, head: bytes, tail: bytes) -> None:
        """An over-long server line has ended; it was streamed, only its head and tail kept.

        The head says what kind of line it was (its tag, status and response code fit in it);
        the tail says whether it announced a literal.
        """
        if self._server.continues or (head.startswith(b"* ") and not _is_status(head[2:])):
            self._server_literal(tail)
            return
        # A status or tagged response: its text cannot announce a literal, the head is enough.
        self._server_line(head + b"\r\n")

    def _server_literal(self, line: bytes) -> None:
        """The end of a data response fragment, which may announce a literal."""
        try:
            literal = lexer.literal_at_end(line)
        except LiteralError as exc:
            self._violation("server", "bad_literal", str(exc))
            literal = None
        if literal is None:
            self._server.no_literal()
        else:
            self._server.literal(literal.size)

    def _server_line(self, line: bytes) -> None:
        if self._server.continues:
            self._server_literal(line)
            return
        if not self.greeted:
            if not line[:10].upper().startswith(_GREETINGS):
                self._not_imap(line)
                return
            if self._gate is _Gate.GREETING:
                self._clear_gate()  # what the client sent meanwhile may go now
        first = line[:1]
        if first == b"+":
            self._continuation()
        elif line.startswith(b"* "):
            self._untagged(line)
        else:
            parsed = lexer.split_tag(lexer.strip_eol(line))
            if parsed is None:
                self._violation("server", "unparsable_response", f"{len(line)} octets")
            else:
                self._tagged(*parsed)
        self.greeted = True

    def _untagged(self, line: bytes) -> None:
        body = lexer.strip_eol(line)
        word, after = lexer.read_atom(body, 2, 16)
        kind = word.upper()
        if kind in _STATUS_WORDS:
            # resp-text cannot hold a literal, whatever it ends with.
            _status, code, args = lexer.status_and_code(body[2:])
            if code == "CAPABILITY":
                self.capabilities = lexer.capabilities(args)
                self._mediate_code(body)
            if kind == b"BYE":
                self._bye_seen = True
                self.state = State.LOGOUT
            elif kind == b"PREAUTH" and not self.greeted:
                self.state = State.AUTHENTICATED
            return
        if kind == b"CAPABILITY":
            self.capabilities = lexer.capabilities(body[after:])
            mediated = capabilities.rewrite(body[after:], self._leg_state())
            if mediated is not None:
                self._replace = body[:after] + b" " + mediated + b"\r\n"
        elif kind == b"ID" and not line.rstrip().endswith(b"}"):
            self._server_id(line)
        self._server_literal(line)

    def _leg_state(self) -> capabilities.LegState:
        c = self.config
        return capabilities.LegState(
            c.client_tls,
            self.client_secure,
            c.compress,
            self.compressed,
            c.strict_capabilities,
            authenticated=self.state is not State.NOT_AUTHENTICATED,
        )

    def _mediate_code(self, body: bytes) -> None:
        """Rewrite `[CAPABILITY ...]` inside a status line (greeting, tagged OK)."""
        start = body.upper().find(b"[CAPABILITY ")
        end = body.find(b"]", start)
        if start < 0 or end < 0:
            return
        mediated = capabilities.rewrite(body[start + 12 : end], self._leg_state())
        if mediated is not None:
            self._replace = body[: start + 12] + mediated + body[end:] + b"\r\n"

    def _continuation(self) -> None:
        if self._id_pieces:
            # The server is ready for the next piece of the ID we rewrote: ours, not the client's.
            self._replace = b""
            self._out.append(Forward(Direction.TO_SERVER, self._id_pieces.pop(0)))
            if not self._id_pieces and self._gate is _Gate.DRIVE:
                self._clear_gate()
            return
        gate = self._gate
        if gate is _Gate.LITERAL:
            if self._literal_hidden:
                # The client sent {N+} and waits for nothing: this "+" answers our {N}.
                self._replace = b""
                self._literal_hidden = False
            self._client.literal(self._pending_literal, Use.PASS)
            self._pending_literal = 0
            self._clear_gate()
            if not self._client.literal_left:
                self._client_literal_done()
        elif gate is _Gate.AUTH:
            self._client_mode = _ClientMode.SASL
            self._clear_gate()
        elif gate is _Gate.IDLE:
            self._client_mode = _ClientMode.IDLING
            self._clear_gate()
        # Otherwise the "+" answers nothing we know of; the client will make of it what it can.

    def _tagged(self, tag: bytes, rest: bytes) -> None:
        status, code, args = lexer.status_and_code(rest)
        if status not in ("OK", "NO", "BAD"):
            self._violation("server", "unparsable_response", f"{len(rest)} octets")
            return
        if code == "CAPABILITY":
            self.capabilities = lexer.capabilities(args)
        if tag == self._injected:
            self._injected_answered(status)
            return
        queue = self._pending.get(tag)
        if not queue:
            self._violation("server", "unknown_tag", f"tag of {len(tag)} octets")
        else:
            cmd = queue.popleft()
            if not queue:
                del self._pending[tag]
            self._complete(cmd, status, code)
        if code == "CAPABILITY":
            # After `_complete`: the list in a LOGIN's OK describes the authenticated state.
            self._mediate_code(tag + b" " + rest)

    def _complete(self, cmd: _Command, status: str, code: str | None) -> None:
        verb = cmd.verb
        ok = status == "OK"
        if verb in (b"LOGIN", b"AUTHENTICATE"):
            if ok:
                self.state = State.AUTHENTICATED
                self.user = cmd.user
        elif verb in (b"SELECT", b"EXAMINE"):
            if ok:
                self.state = State.SELECTED
                self.mailbox = cmd.mailbox
            elif status == "NO":
                # RFC 9051 §6.3.2: a failed SELECT leaves no mailbox selected.
                self.state = State.AUTHENTICATED
                self.mailbox = None
        elif verb in (b"CLOSE", b"UNSELECT"):
            if ok:
                self.state = State.AUTHENTICATED
                self.mailbox = None
        elif verb == b"LOGOUT":
            self._logout_done = True
            self.state = State.LOGOUT
        elif verb == b"ID" and self.config.policy is not None:
            self._id_pieces.clear()
            self._id_record(cmd, status)

        if cmd is self._gate_owner:
            gate = self._gate
            self._clear_gate()
            self._client_mode = _ClientMode.COMMAND
            if gate is _Gate.LITERAL:
                # The server answered the command instead of asking for its literal.
                size, self._pending_literal = self._pending_literal, 0
                self._client.forget()
                self._current = None
                if self._literal_hidden:
                    # A LITERAL+ client sent it anyway: skip it and the rest of the command,
                    # following the client's framing, to find its next command.
                    self._literal_hidden = False
                    self._discarded = 0
                    self._discard_literal(size)
        if cmd is self._sasl_command:
            self._sasl_command = None
            if self._client_mode is _ClientMode.SASL:
                self._client_mode = _ClientMode.COMMAND
        if cmd is self._idle_command:
            self._idle_command = None
            if self._client_mode is _ClientMode.IDLING:
                self._client_mode = _ClientMode.COMMAND
        if self.config.log_commands:
            self._out.append(Emit(self._command_record(cmd, status, code)))

    def _clear_gate(self) -> None:
        self._gate = None
        self._gate_owner = None

    # ----------------------------------------------------------------------------------------
    # Helpers.

    def _flush(
        self, direction: Direction, data: bytes, start: int, end: int, at: int | None = None
    ) -> None:
        """Forward data[start:end], the part of a chunk that passes unchanged.

        `at` puts the Forward at that index of the actions instead of at the end.
        """
        if end <= start:
            return
        if start == 0 and end == len(data):
            action = Forward(direction, data)
        else:
            action = Forward(direction, memoryview(data)[start:end])
        if at is None:
            self._out.append(action)
        else:
            self._out.insert(at, action)

    def _can_speak_to_client(self) -> bool:
        """True at a response boundary, where a line of our own does not corrupt the stream."""
        return self._server.at_boundary

    def _close(self, reason: str) -> list[Action]:
        if self.closed:
            return []
        self.closed = True
        return [Close(reason)]

    def _set_end(self, reason: str, detail: str | None = None) -> None:
        if self._end_reason is None:
            self._end_reason = reason
            self._end_detail = detail

    def _client_position(self) -> str | None:
        if self._gate is _Gate.LITERAL:
            return "mid_literal"
        return self._client.position

    def _server_position(self) -> str | None:
        return self._server.position

    def _violation(self, source: str, kind: str, detail: str, action: str = "forwarded") -> None:
        self._violations += 1
        if self._violations <= self.config.max_violation_records:
            self._out.append(Emit(Violation(self.session_id, source, kind, detail, action)))

    def _command_record(
        self, cmd: _Command, status: str | None, code: str | None
    ) -> CommandCompleted:
        return CommandCompleted(
            session=self.session_id,
            tag=_record_tag(cmd.tag),
            verb=cmd.verb[:32].decode("ascii", "replace"),
            state=cmd.state.value,
            status=status,
            code=code,
            duration_ms=_ms(self.now - cmd.started) if status is not None else None,
            literals=tuple(cmd.literals),
            mechanism=cmd.mechanism,
            user=cmd.user,
        )


def _names(fields: id_params.IdFields) -> tuple[str, ...] | None:
    if fields is None:
        return None
    return tuple(name.decode("utf-8", "replace").lower() for name, _ in fields)


def _recorded(outcome: IdOutcome | None) -> dict[str, str | None] | None:
    """What the policy recorded; None when the list was NIL (or not parsed)."""
    if outcome is None or (outcome.forwarded is None and not outcome.decisions):
        return None
    return outcome.recorded


def _record_tag(tag: bytes) -> str:
    """The client's tag, bounded (it chooses its length; the line limit is the only other)."""
    text = tag[:_RECORD_TAG].decode("ascii", "replace")
    return text + "…" if len(tag) > _RECORD_TAG else text


def _synchronizing(line: bytes) -> bytes:
    """The line with the `{N+}` at its end written `{N}` (`~{N+}` as `~{N}`)."""
    body = lexer.strip_eol(line)
    return body[:-2] + b"}" + line[len(body) :]


def _is_status(rest: bytes) -> bool:
    return lexer.read_atom(rest, 0, 16)[0].upper() in _STATUS_WORDS


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)
