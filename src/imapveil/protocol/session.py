"""The session core: one object that follows both directions of an IMAP session.

Bytes go in (`feed_client`, `feed_server`) with the current monotonic time; a list of actions
comes out. The two directions are coupled, so one object sees both: a client's literal `{N}` is
only sent after the server's `+` (and never if the server answers the tag instead),
AUTHENTICATE turns client lines into SASL responses, and IDLE makes the next client line `DONE`.

It composes the parts (docs/architecture.md): a framer per direction, the commands, the
server's responses, the ID flow, the client leg and the outbox, and runs the two scan loops:
each line goes to the part whose grammar it is, which returns its fate; bytes no rule rewrites
are forwarded as one contiguous slice per chunk. Client bytes that arrive while the client
should wait for the server are held, unparsed, until the server's answer says what they are.
"""

from __future__ import annotations

import math

from imapveil.protocol.actions import Action, Direction, Emit, Forward
from imapveil.protocol.client_leg import ClientLeg
from imapveil.protocol.command import State
from imapveil.protocol.commands import Commands, Gate, Verdict
from imapveil.protocol.config import CoreConfig
from imapveil.protocol.framer import ClientFramer, Fragment, ServerFramer, Use
from imapveil.protocol.id_flow import IdFlow
from imapveil.protocol.outbox import Outbox, ms
from imapveil.protocol.responses import UNAVAILABLE, Responses
from imapveil.protocol.traits import bounded_ja4
from imapveil.records import SessionEnded, SessionStarted

__all__ = ["CoreConfig", "SessionCore", "State"]

_WAITS_FOR_PLUS = (Gate.LITERAL, Gate.DRIVE)
"""The proxy waits for the server's "+" to send what it holds: a synchronizing literal of the
client's, or the next piece of an ID it rewrote. A server that neither asks nor answers within
`literal_timeout` ends the session."""

TURN = 64 * 1024
"""Octets read as lines in one call at most, from either side (`_scan_client`, `_scan_server`),
each line counting as at least `LINE_COST`: then the rest waits (`client_backlog`,
`server_backlog`) until the shell has let the other sessions run (`resume_client`,
`resume_server`). One receive (256 KiB) of 3-octet lines the proxy refuses was 87,000 lines and
~370 ms of the loop every session shares in one go, one of a FETCH's message lines each with a
small literal ~14,000 lines and ~70 ms; now ~256 lines, ~1 ms, and at most one line more."""
LINE_COST = 256
"""What a line costs of a turn at least, in octets: a short line's cost is the line's handling
(a command, a `BAD`), not its octets."""

_READ_AND_PASS = frozenset((Fragment.DATA_LINE, Fragment.STREAM, Fragment.LONG_LINE))
"""Server fragments that pass as they came once read (`SessionCore._server_fragment`)."""


class SessionCore:
    """Follows one IMAP session. Not thread-safe; one per connection."""

    SIMPLE = True
    """Take a chunk that is one simple command or tagged answer in one match (`Commands.simple`,
    `Responses.simple`); the tests turn it off to compare."""

    __slots__ = (
        "_client",
        "_commands",
        "_ended",
        "_ids",
        "_leg",
        "_out",
        "_responses",
        "_server",
        "_traits",
        "bytes_from_client",
        "bytes_from_server",
        "client_address",
        "config",
        "session_id",
        "started",
        "trusted_client",
        "upstream_address",
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
        self.trusted_client = trusted_client
        self.session_id = session_id
        self.client_address = client
        self.upstream_address = upstream
        self.started = now
        self.bytes_from_client = 0
        self.bytes_from_server = 0
        self._client = ClientFramer(config.max_line)
        self._server = ServerFramer(config.server_hold)
        self._out = Outbox(config, session_id, now, self._server)
        self._leg = ClientLeg(config, self._out, secure=client_secure)
        self._ids = IdFlow(
            config, self._out, trusted_client=trusted_client, endpoints=client_endpoints
        )
        self._commands = Commands(config, self._out, self._client, self._ids, self._leg)
        self._traits = self._commands.traits
        self._responses = Responses(self._out, self._server, self._commands, self._ids, self._leg)
        self._ended = False

    def __repr__(self) -> str:
        return (
            f"<SessionCore {self.session_id} {self.state.value}"
            f" client={self._client!r} server={self._server!r}>"
        )

    # What the session is, as its parts know it.

    @property
    def state(self) -> State:
        return self._commands.state

    @property
    def mailbox(self) -> bytes | None:
        return self._commands.mailbox

    @property
    def user(self) -> str | None:
        return self._commands.user

    @property
    def commands(self) -> int:
        return self._commands.count

    @property
    def capabilities(self) -> frozenset[str]:
        return self._responses.capabilities

    @property
    def greeted(self) -> bool:
        return self._responses.greeted

    @property
    def client_secure(self) -> bool:
        return self._leg.secure

    @property
    def compressed(self) -> bool:
        return self._leg.compressed

    @property
    def closed(self) -> bool:
        return self._out.closed

    @property
    def client_endpoints(self) -> tuple[tuple[str, int], tuple[str, int]] | None:
        """(the client, the address it connected to), for the backend's ID."""
        return self._ids.endpoints

    @client_endpoints.setter
    def client_endpoints(self, value: tuple[tuple[str, int], tuple[str, int]] | None) -> None:
        self._ids.endpoints = value

    # ----------------------------------------------------------------------------------------
    # The interface the shell drives.

    def start(self) -> list[Action]:
        return [Emit(SessionStarted(self.session_id, self.client_address, self.upstream_address))]

    @property
    def idle_timeout(self) -> float:
        """Seconds without traffic before `timed_out`: short while the proxy waits for the
        server's greeting or for its `+` to a literal, long once the client is logged in, and
        short again after a BYE or a LOGOUT (the logout state: the server is about to close)."""
        if self._commands.gate is Gate.GREETING:
            return self.config.greeting_timeout
        timeout = (
            self.config.idle_timeout_login
            if self.state is State.NOT_AUTHENTICATED or self.state is State.LOGOUT
            else self.config.idle_timeout
        )
        if self._commands.gate in _WAITS_FOR_PLUS:
            return min(timeout, self.config.literal_timeout)
        return timeout

    @property
    def shortest_timeout(self) -> float:
        """No `idle_timeout` is ever shorter than this (inf: there are none): `deadline(now)` is
        at least `now` plus this, or the login deadline if that comes first."""
        c = self.config
        timeouts = (c.greeting_timeout, c.idle_timeout_login, c.idle_timeout, c.literal_timeout)
        return min((t for t in timeouts if t > 0), default=math.inf)

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
        return self._client.parked

    @property
    def wants_client_data(self) -> bool:
        """False while the client must wait for the server: the shell stops reading the client
        (backpressure), so what a LITERAL+ client sends ahead stays in its own socket buffers.
        At most one receive's worth is held here. Also while the proxy owes the client more than
        `max_held` of its own lines (BADs, "+"), which wait for the response in progress to end,
        and while `max_unanswered` commands wait for their answers: a client that does not read
        the answers must not make either grow without bound. And while octets it sent earlier
        wait to be read (`client_backlog`)."""
        return self._may_read_client and not self._client.parked_data

    @property
    def client_backlog(self) -> bool:
        """Client octets received earlier wait to be read, and may be read now: a turn ended
        (`TURN`), or the server's answer that held them back came. The shell lets the other
        sessions run, then calls `resume_client`."""
        return bool(self._client.parked_data) and self._may_read_client

    @property
    def _may_read_client(self) -> bool:
        return (
            self._commands.gate is None
            and not self.closed
            and not self._out.close_pending
            and len(self._out.owed) <= self.config.max_held
            and self._commands.unanswered_count < self.config.max_unanswered
        )

    @property
    def end_reason(self) -> str | None:
        """Why the session is ending (a `SessionEnded` reason), None while it is not."""
        return self._out.end_reason

    @property
    def end_detail(self) -> str | None:
        """Why the session is ending, as recorded (never peer data but for a few printable
        octets of a non-IMAP upstream's banner)."""
        return self._out.end_detail

    def tls_fingerprint(self, ja4: str | None) -> None:
        """The JA4 fingerprint of the client leg's TLS ClientHello, once its handshake is done
        (implicit TLS or STARTTLS), for the session's `SessionTraits`. Kept only if it is at most
        64 printable ASCII characters; anything else is kept as None."""
        self._traits.ja4 = bounded_ja4(ja4)

    def feed_client(self, data: bytes, now: float) -> list[Action]:
        """Bytes the client sent. Returns what to do, in order."""
        o = self._out
        o.now = now
        self.bytes_from_client += len(data)
        if o.closed:
            return []
        out: list[Action] = []
        o.actions = out
        f = self._client
        if (
            self.SIMPLE
            and self._leg.first is None
            and not (f.buf or f.literal_left or f.parked_data or o.close_pending)
            and len(data) <= f.max_line  # longer: `too_long`, as the framer would say
            and self._commands.simple(data)
        ):
            # One simple command, the whole chunk: as `_scan_client` would have it relayed.
            out.append(Forward(Direction.TO_SERVER, data))
            return out
        readable = self._leg.first_octets(data, first=self.bytes_from_client == len(data))
        if readable is None:
            return out
        if f.parked_data and self._may_read_client:
            # Fed while octets from before wait (a shell that did not call `resume_client`):
            # they come first.
            f.park(readable, 0)
            self._scan_client(*f.unpark())
        else:
            self._scan_client(readable)
        return out

    def resume_client(self, now: float) -> list[Action]:
        """Read on what the client sent earlier (`client_backlog`); nothing if nothing waits."""
        o = self._out
        o.now = now
        out: list[Action] = []
        o.actions = out
        if self.client_backlog:
            self._scan_client(*self._client.unpark())
        return out

    def feed_server(self, data: bytes, now: float) -> list[Action]:
        """Bytes the server sent. Returns what to do, in order."""
        o = self._out
        o.now = now
        self.bytes_from_server += len(data)
        if o.closed:
            return []
        out: list[Action] = []
        o.actions = out
        f = self._server
        if f.parked_data:
            # Fed while octets from before wait (a shell that did not call `resume_server`):
            # they come first.
            f.park(data, 0)
            self._server_input(*f.unpark())
            return out
        if (
            self.SIMPLE
            and self._responses.greeted
            and not (f.buf or f.literal_left or f.continues or f.streaming or o.owed)
            and not self._client.parked_data
            and self._responses.simple(data)
        ):
            # One tagged answer, the whole chunk, shown as it came (as `_scan_server` would).
            if not o.closed:
                out.append(Forward(Direction.TO_CLIENT, data))
            # The answer may leave words owed (a refused LITERAL+ whose literal is too large to
            # skip: a BYE, then the close), paid at this boundary as after `_scan_server`.
            o.pay_owed()
            self._commands.literal_refused = False  # nothing was held: nothing sent ahead
            return out
        self._server_input(data, 0)
        return out

    @property
    def server_backlog(self) -> bool:
        """Server octets received earlier wait to be read (a turn was over, `TURN`): the shell
        lets the other sessions run, then calls `resume_server`."""
        return bool(self._server.parked_data) and not self._out.closed

    def resume_server(self, now: float) -> list[Action]:
        """Read on what the server sent earlier (`server_backlog`); nothing if nothing waits."""
        o = self._out
        o.now = now
        out: list[Action] = []
        o.actions = out
        if self.server_backlog:
            self._server_input(*self._server.unpark())
        return out

    def _server_input(self, data: bytes, at: int) -> None:
        """data[at:] from the server: read (up to a turn's worth), then what its answers let the
        client's side do."""
        o = self._out
        self._scan_server(data, at)
        o.pay_owed()
        if self._commands.literal_refused:
            self._commands.literal_refused = False
            if self._client.parked:
                # Sent after `{N}` before any "+", and the server answered the command instead:
                # those octets are the literal (a message, a password), whatever they look like.
                # Where the client's next command starts cannot be known: BYE, and they go
                # nowhere, neither to the server as commands nor into a record.
                held = self.held
                self._client.unpark()
                o.violation("client", "literal_before_continuation", f"{held} octets", "closed")
                o.protocol_error(b"* BYE Literal sent before the server asked for it\r\n")
                return
        if self.client_backlog:
            self._scan_client(*self._client.unpark())

    def client_closed(self, now: float) -> list[Action]:
        """The client closed its side (EOF or reset)."""
        self._out.now = now
        if self._commands.logout_done:
            self._out.end("logout")
        else:
            literal = self._commands.gate is Gate.LITERAL
            self._out.end("client_closed", "mid_literal" if literal else self._client.position)
        return self._out.close("client_closed")

    def unreadable_deflate(self, detail: str, now: float) -> list[Action]:
        """The client's DEFLATE stream (COMPRESS) cannot be inflated on: invalid data, or data
        after its end. Nothing more of it can be read: `* BYE` (the proxy's own stream toward the
        client is intact) where it can be said, and the close."""
        o = self._out
        o.now = now
        out: list[Action] = []
        o.actions = out
        if not o.closed:
            o.violation("client", "bad_deflate", detail, "closed")
            o.protocol_error(b"* BYE [CLIENTBUG] Invalid DEFLATE data\r\n")
        return out

    def server_closed(self, now: float) -> list[Action]:
        """The server closed its side (EOF or reset)."""
        self._out.now = now
        if self._commands.logout_done:
            self._out.end("logout")
        elif self._responses.bye_seen:
            self._out.end("server_bye")
        else:
            self._out.end("server_closed", self._server.position)
        return self._out.close("server_closed")

    def upstream_unavailable(self, detail: str, now: float) -> list[Action]:
        """The upstream could not be reached: tell the client, as RFC 5530 suggests."""
        self._out.now = now
        self._out.end("upstream_unavailable", detail)
        return self._out.last_words(UNAVAILABLE, "upstream_unavailable")

    def refused(self, reason: str, detail: str, now: float) -> list[Action]:
        """Not served at all: a connection limit (`over_limit`) or a bad PROXY header."""
        self._out.now = now
        self._out.end(reason, detail)
        bye = b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n"
        return self._out.last_words(bye if reason == "over_limit" else None, reason)

    def timed_out(self, now: float) -> list[Action]:
        """No traffic for `idle_timeout` seconds, or no login by `login_deadline`."""
        self._out.now = now
        if self._commands.gate is Gate.GREETING:
            wait = self.config.greeting_timeout
            return self.upstream_unavailable(f"no IMAP greeting within {wait:g} s", now)
        bye = b"* BYE Disconnected for inactivity\r\n"
        if self._commands.gate in _WAITS_FOR_PLUS:
            self._out.end("literal_timeout", "no answer to a literal")
        deadline = self.config.login_deadline
        if self.state is State.NOT_AUTHENTICATED and 0 < deadline <= now - self.started:
            self._out.end("login_timeout", f"not logged in within {deadline:g} s")
            bye = b"* BYE Login time limit reached\r\n"
        self._out.end("idle_timeout")
        return self._out.last_words(bye if self._out.can_speak else None, "idle_timeout")

    def shutting_down(self, now: float) -> list[Action]:
        """The proxy is stopping; RFC 5530 UNAVAILABLE tells the client to come back later."""
        self._out.now = now
        self._out.end("shutdown")
        bye = b"* BYE [UNAVAILABLE] Server shutting down\r\n"
        if self._out.can_speak or self.closed or self._out.close_pending:
            return self._out.last_words(bye if self._out.can_speak else None, "shutdown")
        # Mid-response: the BYE goes after it (`feed_server` pays it at the boundary), then
        # the session closes; the relay cuts it off if the response does not end in time.
        out: list[Action] = []
        self._out.actions = out
        self._out.close_after_owed(bye)
        return out

    def tls_failed(self, detail: str, now: float) -> list[Action]:
        """A TLS handshake failed on a leg; nothing more can be said on it."""
        self._out.now = now
        self._out.end("tls_error", detail)
        return self._out.close("tls_error")

    def failed(self, detail: str, now: float) -> list[Action]:
        """A network error on either leg."""
        self._out.now = now
        self._out.end("error", detail)
        return self._out.close("error")

    def finish(self, now: float) -> list[Action]:
        """The session is over: the end record, once, plus records of unanswered commands."""
        if self._ended:
            return []
        self._ended = True
        self._out.now = now
        self._out.end("client_closed")
        out: list[Action] = []
        if self.config.log_commands:
            out.extend(self._out.command_record(c, None, None) for c in self._commands.unanswered())
        self._commands.pending.clear()
        self._commands.unanswered_count = 0
        out.extend(self._out.suppressed())
        traits = self._traits.record(self.session_id, self.capabilities)
        if traits is not None:
            out.append(Emit(traits))
        out.append(
            Emit(
                SessionEnded(
                    session=self.session_id,
                    client=self.client_address,
                    upstream=self.upstream_address,
                    reason=self._out.end_reason or "client_closed",
                    detail=self._out.end_detail,
                    state=self.state.value,
                    user=self.user,
                    duration_ms=ms(now - self.started),
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
    # Literal octets the shell may relay without feeding them (splice(2) between plain sockets).

    def server_literal_left(self) -> int:
        """Octets of the current server literal still to come that nothing here needs to read:
        they pass to the client as they come, whatever the grammar decides (0: not inside a
        literal body, or the session is closed)."""
        if self._out.closed or self._server.parked_data or self._server.collecting:
            return 0
        return self._server.literal_left

    def passed_server(self, n: int, now: float) -> None:
        """The shell relayed `n` octets (at most `server_literal_left()`) of the current
        server literal to the client itself: count them as `feed_server` would have."""
        left = _passing(n, self.server_literal_left())
        self._out.now = now
        self.bytes_from_server += n
        self._server.literal_left = left - n

    def client_literal_left(self) -> int:
        """Octets of the current client literal still to come that nothing here needs to read:
        the server asked for them (its `+` came, no gate holds the client back), they are
        forwarded as they come (not an ID's, collected; not a refused command's, skipped; not a
        LOGIN user name's, whose start is kept; not one of at most `max_line` or 64 KiB octets
        but APPEND's message or a metadata value, read whole before its command ends), and
        nothing the client sent earlier is still parked. 0 otherwise."""
        f = self._client
        if (
            not f.literal_left
            or f.use is not Use.PASS
            or f.kept is not None
            or f.parked
            or self._commands.gate is not None
            or self._out.closed
            or self._out.close_pending
        ):
            return 0
        return f.literal_left

    def passed_client(self, n: int, now: float) -> None:
        """The shell relayed `n` octets (at most `client_literal_left()`) of the current client
        literal to the server itself: count them as `feed_client` would have."""
        left = _passing(n, self.client_literal_left())
        self._out.now = now
        self.bytes_from_client += n
        self._client.literal_left = left - n
        if n == left:
            self._commands.literal_done()

    # ----------------------------------------------------------------------------------------
    # The scan loops: fragments to the grammar, unchanged bytes out as slices of the chunk.

    def _scan_client(self, data: bytes, at: int = 0) -> None:
        if self._out.close_pending:
            return  # closing after our last words: nothing more is read
        f, commands, out = self._client, self._commands, self._out.actions
        n = len(data)
        pos = start = at
        owed, max_held = self._out.owed, self.config.max_held
        max_unanswered, turn = self.config.max_unanswered, TURN
        while pos < n:
            if (
                commands.gate is not None
                or len(owed) > max_held
                or commands.unanswered_count >= max_unanswered
                or turn <= 0
            ):
                # The client waits for the server: for an answer (a gate, or enough commands
                # waiting for theirs), or for the end of the response in progress, where the
                # proxy may say what it owes (BADs of its own, "+" for an ID's literals). Kept in
                # memory without bound otherwise. Or this session's turn is over: the other
                # sessions run before it reads on (`client_backlog`).
                self._flush(Direction.TO_SERVER, data, start, pos)
                self._hold(data, pos)
                return
            kind, end, line = f.next(data, pos)
            if kind is Fragment.LITERAL:
                mark = len(out)
                start = self._client_literal(data, start, pos, end)
                if self._out.closed:
                    # Refused when it ended: it goes, as whatever of it came before did (the
                    # same octets however it was cut), and nothing after it: its command does
                    # not end, so the server never runs it.
                    self._flush(Direction.TO_SERVER, data, start, end, at=mark)
                    return
                pos = end
                continue
            if kind is not Fragment.LINE:  # PARTIAL (now held) or TOO_LONG
                self._flush(Direction.TO_SERVER, data, start, pos)
                if kind is Fragment.TOO_LONG:
                    commands.too_long()
                return
            turn -= max(end - pos, LINE_COST)
            mark = len(out)
            fate = commands.line(line)
            if fate is Verdict.STOP:
                # The session is closing because of this line: what came before it still goes
                # out, ahead of the BYE and the Close; the line itself does not.
                self._flush(Direction.TO_SERVER, data, start, pos, at=mark)
                return
            if fate is Verdict.RELAY:
                held = f.held()
                if held:
                    out.append(Forward(Direction.TO_SERVER, held))
                pos = end
                continue
            # Not relayed as it came: collected (ID), refused, rewritten or answered by us.
            if isinstance(fate, bytes):
                # The line goes out changed ({N+} as {N}) or after something of the proxy's own.
                out.append(Forward(Direction.TO_SERVER, fate))
            self._flush(Direction.TO_SERVER, data, start, pos, at=mark)
            f.held()
            pos = start = end
            if not self._leg.may_read_on(n - end):
                return
        self._flush(Direction.TO_SERVER, data, start, pos)

    def _client_literal(self, data: bytes, start: int, pos: int, end: int) -> int:
        """Literal octets data[pos:end] have been counted; returns where unchanged bytes start."""
        use = self._client.use
        if use is not Use.PASS:
            # Not forwarded as it comes: a literal inside an ID command (collected), or a
            # refused command's (skipped).
            self._flush(Direction.TO_SERVER, data, start, pos)
            start = end
            collecting = self._ids.collecting
            if use is Use.TAKE and collecting is not None:
                collecting.add(data[pos:end])
        if not self._client.literal_left:
            self._commands.skipped() if use is Use.SKIP else self._commands.literal_done()
        return start

    def _hold(self, data: bytes, at: int) -> None:
        size = self.held + len(data) - at
        config = self.config
        if (
            at >= len(data)
            or size <= config.max_held
            or (self._commands.gate is None and len(self._out.owed) <= config.max_held)
        ):
            # Within its bound, or not sent while waiting (a turn ended, or answers are awaited:
            # the rest of one receive, the shell reads no more meanwhile).
            self._client.park(data, at)
            return
        # The client keeps talking where it must wait: it is not an IMAP client we can follow.
        self._out.violation("client", "sent_while_waiting", f"{size} octets")
        self._out.protocol_error(b"* BYE Client sent data before the server's continuation\r\n")

    def _scan_server(self, data: bytes, at: int = 0) -> None:
        f, responses, out = self._server, self._responses, self._out.actions
        n = len(data)
        pos = start = at
        turn = TURN
        while pos < n:
            if turn <= 0:
                # This session's turn is over: the other sessions run before it reads on
                # (`server_backlog`; the shell reads no more meanwhile).
                self._flush(Direction.TO_CLIENT, data, start, pos)
                f.park(data, pos)
                return
            kind, line_start, pos, line = f.next(data, pos, responses.greeted)
            # What the framer passed over to get here (literal octets, message data lines) is
            # counted in C, never read: only the fragment it stops at costs, by its length (a
            # receive of ordinary messages, a line and a literal each, is one turn).
            turn -= max(pos - line_start, LINE_COST)
            if kind is Fragment.LINE:
                start = self._server_line(data, start, line_start, pos, line)
                if self.closed:
                    return
            elif kind is Fragment.LITERAL:
                # A literal of a response being collected (a server `* ID`): not forwarded.
                self._flush(Direction.TO_CLIENT, data, start, line_start)
                start = pos
                responses.collect(data[line_start:pos])
            elif kind in _READ_AND_PASS:
                mark = len(out)
                if not self._server_fragment(kind, line):
                    # Refused: what came before the line goes out, ahead of the BYE (if any)
                    # and the close; the line does not, unless the client has its start.
                    end = pos if kind is Fragment.LONG_LINE else line_start
                    self._flush(Direction.TO_CLIENT, data, start, end, at=mark)
                    return
            elif kind is Fragment.BARE_CR or kind is Fragment.BARE_CR_STREAMED:
                # A CR that ends no line: nothing from it goes out (a BYE may, if none of
                # its line went out and the client is between responses).
                mark = len(out)
                said = kind is Fragment.BARE_CR_STREAMED
                responses.unreadable("unparsable_response", "a CR alone", said=said)
                self._flush(Direction.TO_CLIENT, data, start, line_start, at=mark)
                return
            elif kind is Fragment.NO_GREETING:
                responses.not_imap(line)
                return
            elif kind is Fragment.PARTIAL:
                self._flush(Direction.TO_CLIENT, data, start, line_start)
                return
        self._flush(Direction.TO_CLIENT, data, start, pos)

    def _server_fragment(self, kind: Fragment, line: bytes) -> bool:
        """A server line that passes as it came once read: the end of a message data line
        (which may announce a literal), an over-long line starting to stream (nothing of it
        out yet), or ending (the client has its start). False: the proxy cannot read it, the
        session is closing."""
        responses = self._responses
        if kind is Fragment.DATA_LINE:
            return responses.data_line(line)
        if kind is Fragment.STREAM:
            if not responses.may_stream(self._server.head):
                return False
            if line:  # what was held of it goes out first
                self._out.actions.append(Forward(Direction.TO_CLIENT, line))
            return True
        responses.long_line(line, self._server.tail)  # its end may announce a bad literal
        return not self.closed

    def _server_line(self, data: bytes, start: int, line_start: int, end: int, line: bytes) -> int:
        """A complete server line, data[line_start:end] after what was held of it; returns
        where unchanged bytes start."""
        out = self._out.actions
        mark = len(out)
        shown = self._responses.line(line)
        if shown is None:
            held = self._server.held()
            if held:
                out.insert(mark, Forward(Direction.TO_CLIENT, held))
            return start
        # This line goes out rewritten (`* ID`) or not at all (a "+" we gave).
        self._flush(Direction.TO_CLIENT, data, start, line_start, at=mark)
        if shown:
            out.append(Forward(Direction.TO_CLIENT, shown))
        self._server.held()
        return end

    def _flush(
        self, direction: Direction, data: bytes, start: int, end: int, at: int | None = None
    ) -> None:
        """Forward data[start:end], the part of a chunk that passes unchanged (a slice of it,
        never a copy); `at` puts it at that index of the actions, ahead of what the line that
        ended the run caused."""
        if end <= start:
            return
        if start == 0 and end == len(data):
            action = Forward(direction, data)
        else:
            action = Forward(direction, memoryview(data)[start:end])
        if at is None:
            self._out.actions.append(action)
        else:
            self._out.actions.insert(at, action)


def _passing(n: int, left: int) -> int:
    """`left`, if `n` octets may pass; a shell that passes more than it may is a bug."""
    if not 0 < n <= left:
        raise ValueError(f"{n} octets passed where {left} may be")
    return left
