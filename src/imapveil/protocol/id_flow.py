"""RFC 2971 ID through the proxy: collected whole, decided by policy, rewritten, recorded.

A client's ID command is collected (bounded) instead of being forwarded as it comes, parsed
strictly, and given to the policy in force *when it is complete*: that snapshot decides what goes
to the server, and the `id` record names it, even if a reload comes before the server answers.
What the policy left unchanged goes out byte for byte; what it changed is written anew, a value
that needs a literal sent the synchronizing way, one piece per server `+` (which the client never
sees). An ID the proxy cannot parse, or one too large to collect, goes out as `ID NIL`: never as
it came, since the server would read it its own way (RFC 2971 §3: NIL says nothing, which is
true); so does one past the session's share (`max_id_records`), undecided. The server's `* ID`
passes the same policy on its way to the client.

Before LOGIN the proxy may send an ID of its own (configured fields, the client's address for a
backend that trusts the proxy); its answer is not shown to the client.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import replace

from imapveil.protocol import id_params, lexer
from imapveil.protocol.command import Command, State
from imapveil.protocol.config import CoreConfig
from imapveil.protocol.id_params import IdSyntaxError
from imapveil.protocol.id_policy import IdOutcome, IdPolicy
from imapveil.protocol.outbox import Outbox, record_tag
from imapveil.records import IdExchange
from imapveil.rfc2971 import IdFields

ID_LIMIT = 64 * 1024  # an ID command collected whole: RFC 2971 limits (~33 KB) with a margin
PLUS = b"+ Ready for literal data\r\n"


class IdCollect:
    """An ID command being collected whole before it is rewritten (bounded by ID_LIMIT)."""

    __slots__ = ("acked", "cmd", "literals", "overflow", "parts", "skipped")

    def __init__(self, cmd: Command, first: bytes) -> None:
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

    def add(self, data: bytes) -> None:
        if not self.overflow:
            self.parts += data


class IdFlow:
    """All of a session's ID handling. `collecting` is the client's ID being read, if any."""

    __slots__ = (
        "address_sent",
        "collecting",
        "config",
        "decided",
        "deciding",
        "endpoints",
        "examined",
        "injected",
        "injected_fields",
        "injected_policy",
        "injected_server",
        "out",
        "pieces",
        "records",
        "sent",
        "trusted_client",
        "waiting",
    )

    def __init__(
        self,
        config: CoreConfig,
        out: Outbox,
        *,
        trusted_client: bool,
        endpoints: tuple[tuple[str, int], tuple[str, int]] | None,
    ) -> None:
        self.config = config
        self.out = out
        self.trusted_client = trusted_client
        self.endpoints = endpoints  # (client, the address it connected to)
        self.collecting: IdCollect | None = None
        self.waiting: Command | None = None  # the ID whose answer is awaited
        # The policy in force when the client's ID awaited went out: it decides the server's
        # `* ID` of that exchange too, whatever a reload put in force meanwhile.
        self.deciding: IdPolicy | None = None
        self.records = 0
        self.decided = 0  # the client's IDs parsed and given to the policy
        self.pieces: list[bytes] = []  # rest of a rewritten ID, one piece per "+"
        self.sent = False  # the client sent an ID in this session
        self.injected: bytes | None = None  # tag of an ID the proxy sent itself, until answered
        self.injected_fields: IdFields = None
        self.injected_policy: IdPolicy | None = None  # in force when our own ID went out
        self.injected_server: IdOutcome | None = None
        self.address_sent = False
        # A server's `* ID` was decided since its last tagged answer: any other is not until
        # the next (deciding one costs milliseconds of the loop every session shares).
        self.examined = False

    def __repr__(self) -> str:
        return f"<id flow collecting={self.collecting!r} pieces={len(self.pieces)}>"

    def begin(self, cmd: Command, line: bytes) -> bool:
        """The client sends an ID. True: it is collected (a policy applies)."""
        self.sent = True
        if self.config.policy is None:
            return False
        self.collecting = IdCollect(cmd, line)
        return True

    def room(self, size: int) -> bool:
        """Room for `size` more octets of the ID? Past the collection bound they are followed
        but not kept; past `max_discard` the session ends (False)."""
        collecting = self.collecting
        assert collecting is not None
        if not collecting.overflow and len(collecting.parts) + size <= ID_LIMIT:
            return True
        if not collecting.overflow:
            collecting.overflow = True
            collecting.skipped = len(collecting.parts)
            collecting.parts.clear()
        collecting.skipped += size
        if collecting.skipped <= self.config.max_discard:
            return True
        # Far more than an ID can be: not worth following.
        self.collecting = None
        self.out.violation("client", "id_too_large", f"more than {ID_LIMIT} octets", "closed")
        self.out.end("line_too_long")
        self.out.protocol_error(b"* BYE [TOOBIG] ID command too large\r\n")
        return False

    def literal(self, size: int, synchronizing: bool) -> bool:
        """The ID announces a literal (collected too). False: the session ends."""
        collecting = self.collecting
        assert collecting is not None
        collecting.literals += 1
        if not self.room(size):
            return False
        if synchronizing:
            # The server's "+" would only come once the line is forwarded, and it is not
            # forwarded until the command is whole: so the proxy says "+" itself.
            collecting.acked += 1
            self.out.owe(PLUS)
        return True

    def complete(self) -> bool:
        """The whole ID has been read: decide and send it. True: pieces are left to send, one
        per server "+" (the client's next commands wait meanwhile)."""
        collecting, self.collecting = self.collecting, None
        assert collecting is not None
        cmd = collecting.cmd
        policy_source = self.config.policy
        assert policy_source is not None
        raw = bytes(collecting.parts)
        # "tag ID args": the arguments start after the verb, wherever spaces put it.
        verb_at = raw.upper().find(b"ID", len(cmd.tag))
        self.waiting = cmd
        # The policy in force now decides the whole exchange (the server's `* ID` too), and
        # the record names this one (not the one in force when the server answers: a reload
        # may come between).
        policy = self.deciding = policy_source()
        cmd.policy = (policy.name, policy.digest)
        if collecting.overflow:
            self.out.violation("client", "id_too_large", f"{collecting.skipped} octets", "replaced")
            self.out.to_server(cmd.tag + b" ID NIL\r\n")
            cmd.id_outcome = False
            return False
        if self.decided >= self.config.max_id_records:
            # Deciding a hostile ID costs milliseconds of the loop every session shares, and a
            # session may send one after another: past its share (whose records it would not
            # get anyway), an ID goes out as `ID NIL`, undecided, and is answered as usual.
            share = self.config.max_id_records
            self.out.violation("client", "id_limit", f"more than {share} IDs", "replaced")
            self.out.to_server(cmd.tag + b" ID NIL\r\n")
            cmd.id_outcome = False
            return False
        self.decided += 1
        try:
            fields = id_params.parse(raw[verb_at + 2 :])
        except IdSyntaxError:
            # Never forwarded as it came: the server would read it its own way (Dovecot accepts
            # `\q` inside quotes, text after the list, any number of pairs) and pass on what
            # the policy never saw. `ID NIL` says nothing, which is true (RFC 2971 §3), and
            # keeps the exchange's shape: the client gets the server's answer to it.
            self.out.violation("client", "malformed_id", f"{len(raw)} octets", "replaced")
            self.out.to_server(cmd.tag + b" ID NIL\r\n")
            cmd.id_outcome = False
            return False
        outcome = policy.apply(
            fields, hasher=self.config.hash_value, trusted_client=self.trusted_client
        )
        cmd.id_outcome = outcome
        if not outcome.changed and not collecting.literals:
            self.out.to_server(raw)  # byte for byte
            return False
        # Written anew. A value that needs a literal is sent the synchronizing way, one piece
        # per server "+" (which the client never sees; its next commands wait meanwhile), so
        # that even these octets reach the server only when it asked for them.
        pieces = id_params.serialize_pieces(outcome.forwarded)
        pieces[0] = cmd.tag + b" ID " + pieces[0]
        pieces[-1] += b"\r\n"
        self.out.to_server(pieces[0])
        self.pieces = pieces[1:]
        return bool(self.pieces)

    def next_piece(self) -> bytes | None:
        """The server's "+" asks for the next piece of a rewritten ID, if one is being sent."""
        return self.pieces.pop(0) if self.pieces else None

    def inject(self, session_id: str, number: int, busy: Container[bytes]) -> bytes | None:
        """Our own honest ID ahead of the client's LOGIN, if there is one to send.

        `inject_id` (when the client sent no ID of its own), and Dovecot's client address
        fields (`forward_client_address`): a backend that trusts the proxy
        (login_trusted_networks) then logs and rate-limits the real client, not the proxy.
        Its answer is not shown the client. Its tag is none of `busy` (the tags of the client's
        commands still waiting for their answers): an answer with it is the ID's until the ID
        is answered, and a command of the client's sent before it must keep its own.
        """
        if self.injected is not None:
            return None
        fields: list[tuple[bytes, bytes]] = []
        if self.config.inject_id and not self.sent:
            fields.extend(self.config.inject_id)
        endpoints = self.endpoints
        if self.config.forward_client_address and endpoints is not None and not self.address_sent:
            (client_ip, client_port), (local_ip, local_port) = endpoints
            fields += [
                (b"x-originating-ip", client_ip.encode()),
                (b"x-originating-port", b"%d" % client_port),
                (b"x-connected-ip", local_ip.encode()),
                (b"x-connected-port", b"%d" % local_port),
                (b"x-session-id", session_id.encode()),
            ]
            self.address_sent = True
        # Sent whole, ahead of the client's command: a value that needs a literal would be a
        # synchronizing one whose octets go before the server's "+" (and that "+" to the
        # client). None is expected (addresses, digits, a session id, printable ASCII from the
        # configuration); one that does is left out.
        fields = [(name, value) for name, value in fields if not id_params.needs_literal(value)]
        if not fields:
            return None
        self.sent = True
        if self.config.policy is not None:
            self.injected_policy = self.config.policy()
        tag = b"imapveil.%d" % number
        again = 0
        while tag in busy:
            again += 1
            tag = b"imapveil.%d.%d" % (number, again)
        self.injected = tag
        self.injected_fields = tuple(fields)
        return tag + b" ID " + id_params.serialize(tuple(fields), literal_plus=False) + b"\r\n"

    def injected_answered(self, status: str, state: State) -> None:
        tag, self.injected = self.injected, None
        assert tag is not None
        server, self.injected_server = self.injected_server, None
        policy, self.injected_policy = self.injected_policy, None
        fields = self.injected_fields or ()
        self._emit(
            IdExchange(
                session=self.out.session_id,
                tag=tag.decode(),
                state=state.value,
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
                forwarded=_names(self.injected_fields),
                server=_recorded(server),
                injected=True,
            ),
            (policy.name, policy.digest) if policy is not None else None,
        )

    @property
    def reads_server_id(self) -> bool:
        """Whether the server's `* ID` is the proxy's to read: a policy applies to it, or it
        answers the proxy's own ID (which the client never sees)."""
        return self.config.policy is not None or self.injected is not None

    def server_id(self, line: bytes) -> bytes | None:
        """`* ID (...)`: the same policy applies on the way to the client. Returns what goes
        to the client instead of the line (b"": nothing), or None: the line as it came."""
        policy_source = self.config.policy
        if policy_source is not None and self.examined:
            # One list is decided per server answer, as the client's are (the ID gate), not as
            # many as a server sends before it.
            action = "dropped" if self.injected is not None else "replaced"
            self.out.violation("server", "unexpected_id", f"{len(line)} octets", action)
            return b"" if self.injected is not None else b"* ID NIL\r\n"
        self.examined = True
        if self.injected is not None:
            # The answer to our own ID: the client did not ask, so it does not see it.
            policy = self.injected_policy
            if policy is not None:
                try:
                    fields = id_params.parse(lexer.strip_eol(line)[5:])
                except IdSyntaxError:
                    return b""
                self.injected_server = policy.apply(
                    fields, hasher=self.config.hash_value, trusted_client=True
                )
            return b""
        if policy_source is None:
            return None
        body = lexer.strip_eol(line)
        try:
            fields = id_params.parse(body[5:])
        except IdSyntaxError:
            # Never forwarded as it came (the client would read it its own way, what the
            # policy never saw): NIL says nothing, which is true, as for a client's ID.
            self.out.violation("server", "malformed_id", f"{len(line)} octets", "replaced")
            return b"* ID NIL\r\n"
        # The exchange's own policy (see `complete`); one the client did not ask for, the one
        # in force.
        waiting, policy = self.waiting, self.deciding
        if waiting is None or policy is None:
            policy = policy_source()
        outcome = policy.apply(fields, hasher=self.config.hash_value, trusted_client=True)
        if waiting is not None:
            waiting.id_server = outcome
        if outcome.changed:
            # A value that needs a literal (8-bit octets a quoted string of the server's may
            # carry) is written as one: a server's literal needs no "+".
            return b"* ID " + id_params.serialize(outcome.forwarded, literal_plus=False) + b"\r\n"
        return None

    def answered(self, cmd: Command, status: str) -> None:
        """The server answered the client's ID: the record, under the policy that decided."""
        self.pieces.clear()
        if self.waiting is cmd:
            self.waiting = self.deciding = None
        client = None if isinstance(cmd.id_outcome, bool) else cmd.id_outcome
        self._emit(
            IdExchange(
                session=self.out.session_id,
                tag=record_tag(cmd.tag),
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

    def _emit(self, record: IdExchange, decided_by: tuple[str, str] | None = None) -> None:
        """The record, with the policy that decided (or the one in force), unless this session
        has had its share of `id` records (RFC 2971 §7: logs must not be floodable)."""
        if self.records >= self.config.max_id_records:
            return
        self.records += 1
        if decided_by is not None:
            record = replace(record, policy=decided_by[0], policy_digest=decided_by[1])
        elif self.config.policy is not None:
            policy = self.config.policy()
            record = replace(record, policy=policy.name, policy_digest=policy.digest)
        self.out.emit(record)


def _names(fields: IdFields) -> tuple[str, ...] | None:
    if fields is None:
        return None
    return tuple(name.decode("utf-8", "replace").lower() for name, _ in fields)


def _recorded(outcome: IdOutcome | None) -> dict[str, str | None] | None:
    """What the policy recorded; None when the list was NIL (or not parsed)."""
    if outcome is None or (outcome.forwarded is None and not outcome.decisions):
        return None
    return outcome.recorded
