"""The command side of the grammar: the client's lines read as commands, tags, gates and the
connection state (RFC 9051 §3), the way h11 keeps its state machine in one small module.

The line classifier (`classify`) reads each command's first fragment and every fragment after a
literal; what it cannot read is refused (`BAD`, never forwarded), and a refused command's
literals are skipped following the client's own framing, so the next command is found where the
client put it. Literal octets reach the server only when it asked for them: toward the server
every literal is synchronizing (`{N+}` goes out as `{N}`), and the client's octets wait behind a
gate until the server's `+` (which a LITERAL+ client never sees) or are skipped if the server
answers the command instead.

Each client line comes back with its fate (`Verdict`, or the bytes it goes out as); records and
the proxy's own lines go to the session's `Outbox`.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from dataclasses import replace

from imapveil.protocol import classify, client_leg, lexer
from imapveil.protocol.client_leg import ClientLeg
from imapveil.protocol.command import Command, State
from imapveil.protocol.config import CoreConfig
from imapveil.protocol.framer import ClientFramer, Use
from imapveil.protocol.id_flow import IdFlow
from imapveil.protocol.lexer import LiteralError
from imapveil.protocol.outbox import Outbox
from imapveil.protocol.traits import Traits


class Verdict(enum.Enum):
    """The fate of a client line (or `bytes`: it goes out as these instead)."""

    RELAY = 1  # forwarded as it came
    WITHHOLD = 2  # not forwarded as it came: collected (ID), refused, or answered by the proxy
    STOP = 3  # the session ends because of it (the outbox has the BYE and the close)


Fate = Verdict | bytes


class Mode(enum.Enum):
    """What the client's next line is."""

    COMMAND = 1  # the start of a new command
    CONTINUE = 2  # the rest of the current command, after a literal
    SASL = 3  # a SASL response: the server sent "+" during AUTHENTICATE
    IDLING = 4  # "DONE", ending IDLE
    DISCARD = 5  # the rest of a command that was refused (by the proxy or the server)


class Gate(enum.Enum):
    """Why client bytes are held until the server answers."""

    LITERAL = 1  # a synchronizing literal waits for "+" (or a tagged NO/BAD: no literal)
    AUTH = 2  # AUTHENTICATE waits for "+" (a challenge) or its tagged answer
    IDLE = 3  # IDLE waits for "+" (idling) or its tagged answer
    DRIVE = 5  # the proxy is sending a rewritten ID piece by piece, on the server's "+"
    GREETING = 6  # nothing goes to the server before its greeting says it speaks IMAP
    ID = 7  # an ID the policy decided waits for its answer: at most one ID's work per answer


ECHO_SCAN = 64 * 1024
"""Client literals up to this many octets (or `max_line`, if larger) are read whole before their
command ends (`Command.wants_literal`): Dovecot reads and echoes strings up to its own line
limit (`imap_max_line_length`, 64 KiB by default), whatever the proxy's `max_line` is."""

_URL_VERBS = frozenset((b"APPEND", b"URLFETCH", b"GENURLAUTH"))
"""Commands with IMAP URLs (CATENATE's), whose percent-escapes Dovecot decodes and may echo."""

_SIMPLE_VERBS = {
    verb: verb
    for verb in (
        *(b"NOOP", b"CHECK", b"CLOSE", b"UNSELECT", b"EXPUNGE", b"NAMESPACE", b"LOGOUT"),
        *(b"CAPABILITY", b"FETCH", b"STORE", b"SEARCH", b"COPY", b"MOVE", b"SORT", b"THREAD"),
        *(b"STATUS", b"LIST", b"LSUB", b"UID FETCH", b"UID STORE", b"UID SEARCH", b"UID COPY"),
        *(b"UID MOVE", b"UID SORT", b"UID THREAD", b"UID EXPUNGE", b"SELECT", b"EXAMINE"),
        b"IDLE",
    )
}
"""Commands that `_start` does nothing special with (no ID, no login, not answered by the client
leg) but keep a SELECT's or EXAMINE's mailbox name, or, for IDLE, hold the client until the
server's `+`: `simple` may take them in one match."""
_SELECTS = (b"SELECT", b"EXAMINE")
_IDLE = _SIMPLE_VERBS[b"IDLE"]
_PLAIN = rb"[" + classify.ATOMISH + rb"]++"
_SIMPLE = re.compile(
    lexer.TAG_PATTERN
    + rb" ((?:[Uu][Ii][Dd] )?[A-Za-z]++)"
    + rb"((?: (?:"
    + _PLAIN
    + rb"|\((?:"
    + _PLAIN
    + rb"(?: "
    + _PLAIN
    + rb")*+)?\)))*+)\r?\n"
)
"""A tag, a verb of letters (`UID` and one, for UID commands), and arguments that are atoms or
lists of atoms one level deep, single spaces between: no quoted string, no literal, nothing the
classifier would refuse, a list depth of 0 at the end."""


class Commands:
    """The client's commands, from their first line to the server's tagged answer."""

    __slots__ = (
        "config",
        "count",
        "current",
        "discarded",
        "framer",
        "gate",
        "gate_owner",
        "idle_command",
        "ids",
        "leg",
        "literal_hidden",
        "literal_refused",
        "logout_done",
        "mailbox",
        "mode",
        "out",
        "pending",
        "pending_literal",
        "sasl_command",
        "state",
        "traits",
        "unanswered_count",
        "user",
    )

    def __init__(
        self, config: CoreConfig, out: Outbox, framer: ClientFramer, ids: IdFlow, leg: ClientLeg
    ) -> None:
        self.config = config
        self.out = out
        self.framer = framer
        self.ids = ids
        self.leg = leg
        # What the client uses and how it behaves (SessionTraits): fed every command the proxy
        # accepted, before it is relayed or answered; a refused one only counts as read.
        self.traits = Traits()
        self.state = State.NOT_AUTHENTICATED
        self.mailbox: bytes | None = None
        self.user: str | None = None
        self.count = 0  # commands the client sent
        self.mode = Mode.COMMAND
        self.gate: Gate | None = Gate.GREETING
        self.gate_owner: Command | None = None
        self.pending_literal = 0
        self.literal_hidden = False  # the literal waiting for "+" was {N+}: the "+" is ours
        self.literal_refused = False  # the server answered a command waiting for its "+"
        self.discarded = 0  # octets skipped for the refused command being discarded
        self.current: Command | None = None  # the command whose fragments are arriving
        # Commands sent and not answered yet, by tag: the command itself, or (a tag the client
        # reused before its answer came) the queue of them in order.
        self.pending: dict[bytes, Command | deque[Command]] = {}
        self.unanswered_count = 0  # commands in `pending`, all tags
        self.sasl_command: Command | None = None
        self.idle_command: Command | None = None
        self.logout_done = False

    def __repr__(self) -> str:
        return f"<commands {self.state.value} mode={self.mode.name} gate={self.gate}>"

    # ----------------------------------------------------------------------------------------
    # Client lines.

    def line(self, line: bytes) -> Fate:
        """One complete client line."""
        mode = self.mode
        if mode is Mode.COMMAND:
            return self._start(line)
        if mode is Mode.CONTINUE and self.current is not None:
            return self._fragment(self.current, line)
        if mode is Mode.SASL:
            cmd = self.sasl_command
            if cmd is not None:
                cmd.sasl_response(line, self.config.identify_user)
                # The next response comes only after the next challenge.
                self._set_gate(Gate.AUTH, cmd)
            self.mode = Mode.COMMAND
            return Verdict.RELAY
        if mode is Mode.IDLING:
            # RFC 2177: the only thing the client may send is DONE. Anything else would reach a
            # server that reads it its own way (as a command, unseen by the policy).
            if lexer.strip_eol(line).upper() != b"DONE":
                self.out.violation("client", "idle_not_done", f"{len(line)} octets", "closed")
                self.out.protocol_error(b"* BYE Expected DONE to end IDLE\r\n")
                return Verdict.STOP
            self.mode = Mode.COMMAND
            return Verdict.RELAY
        return self._discard_fragment(line)

    def simple(self, line: bytes) -> bool:
        """`line` (the whole of a chunk) is one simple command (`_SIMPLE_VERBS`, plain
        arguments, see `_SIMPLE`): taken, as `line` would take it, and True; False: nothing
        done, `line` must go the usual way.

        The common case (a NOOP, a FETCH of flags, a STORE) in one match instead of the
        classifier: what `_SIMPLE` matches the classifier reads the same way (tag, verb, the
        arguments as the fragment's content, no literal, depth 0), and every state, gate and
        record ends as `_start` would leave it (tests/protocol/test_simple.py compares the two
        on generated sessions)."""
        if self.mode is not Mode.COMMAND or self.gate is not None:
            return False
        m = _SIMPLE.fullmatch(line)
        if m is None:
            return False
        verb = _SIMPLE_VERBS.get(m.group(2).upper())
        if verb is None:
            return False
        args = m.group(3)
        if b"&" in args:
            return False  # a modified UTF-7 run: the classifier's to read (`shifted_control`)
        tag = m.group(1)
        cmd = Command(tag, verb, self.state, self.out.now)
        self.count += 1
        self.traits.command(tag, verb, args, None)
        if verb in _SELECTS:
            cmd.select_mailbox(args)  # an atom here (no quoted name, no literal)
        self._pend(cmd)
        self.current = None
        if verb is _IDLE:
            self._sent(cmd)  # the gate: nothing more from the client until the server's "+"
        return True

    def too_long(self) -> None:
        """A line longer than `max_line` (the framer dropped it): the client cannot be followed."""
        limit = self.config.max_line
        self.out.violation("client", "line_too_long", f"longer than {limit} octets", "closed")
        self.out.end("line_too_long")
        self.out.protocol_error(
            f"* BYE [TOOBIG] Command line too long (limit {limit} octets)\r\n".encode()
        )

    def literal_done(self) -> None:
        """A literal's octets have all passed (or been collected)."""
        kept = self.framer.take_kept()
        if kept is not None and self.current is not None:
            if (
                b"\n" in kept
                or b"\r" in kept
                or (b"&" in kept and classify.shifted_control(kept))
                or (self.current.verb in _URL_VERBS and classify.escaped_control(kept))
            ):
                # Dovecot writes a string argument it refuses back into its answer as it came
                # (`SORT (<literal>)`: "Unknown sort argument: <literal>"), a mailbox name as
                # decoded (`classify`): a line end in it makes lines of the client's choosing
                # (a "+" that releases a literal the server never asked for). The command must
                # not end, so the server never runs it.
                # A URL's mailbox, percent-decoded, the same (`classify.escaped_control`).
                self.out.violation("client", "refused_line_end", "in a literal", "closed")
                self.out.protocol_error(b"* BYE Command not understood by the proxy\r\n")
                return
            self.current.literal_kept(kept)
        self.mode = Mode.CONTINUE

    def skipped(self) -> None:
        """A refused command's literal has been skipped; its rest follows."""
        self.mode = Mode.DISCARD

    def _start(self, line: bytes) -> Fate:
        body = lexer.strip_eol(line)
        parsed = classify.first_fragment(body)
        tag, verb, frag = parsed.tag, parsed.verb, parsed.fragment
        if frag.problem is None and frag.literal is None and frag.depth:
            frag = replace(frag, problem="unbalanced_list")
        if frag.problem is None and verb in _URL_VERBS and classify.escaped_control(frag.content):
            frag = replace(frag, problem="escaped_control")
        if frag.problem == "literal_length":
            self.traits.refused()
            return self._bad_literal()
        if tag is None or frag.problem is not None:
            return self._refuse(tag, verb, frag, len(line))
        args = body[parsed.args_at :]
        cmd = Command(tag, verb, self.state, self.out.now)
        self.count += 1
        self.traits.command(tag, verb, frag.content, frag.literal)
        if verb in client_leg.VERBS and self.leg.owns(verb, self.state):
            busy = bool(self.pending) or self.gate is not None or not self.out.can_speak
            return Verdict.WITHHOLD if self.leg.answer(cmd, args, line, busy=busy) else Verdict.STOP
        cmd.depth = frag.depth
        self._pend(cmd)
        self.current = cmd
        relay: Fate = Verdict.RELAY
        if verb == b"ID":
            self.ids.begin(cmd, line)
        elif verb in (b"LOGIN", b"AUTHENTICATE") and self.state is State.NOT_AUTHENTICATED:
            injected = self.ids.inject(self.out.session_id, self.count, self.pending)
            if injected is not None:
                self.out.to_server(injected)
                relay = line  # then the client's line, after ours
        if verb == b"LOGIN":
            cmd.login_args(frag)
        elif verb == b"AUTHENTICATE":
            cmd.authenticate_start(args, self.config.identify_user)
        elif verb in (b"SELECT", b"EXAMINE"):
            cmd.select_mailbox(args)
        fate = self._fragment_end(cmd, line, frag)
        return relay if fate is Verdict.RELAY else fate

    def _pend(self, cmd: Command) -> None:
        """`cmd` waits for its tagged answer."""
        tag = cmd.tag
        self.unanswered_count += 1
        waiting = self.pending.get(tag)
        if waiting is None:
            self.pending[tag] = cmd
        elif isinstance(waiting, Command):
            self.pending[tag] = deque((waiting, cmd))
        else:
            waiting.append(cmd)

    def _refuse(self, tag: bytes | None, verb: bytes, frag: classify.Fragment, size: int) -> Fate:
        """A command the proxy cannot read: answered BAD by the proxy, never forwarded.

        A non-synchronizing literal announced at its end is skipped, and the rest of the
        command after it, so that the next command is found where the client put it (a
        malformed message is discarded only at its end). After a synchronizing one the session
        ends with the BAD: a conforming client waits for a "+" that never comes, and one that
        sends the octets anyway would have them read as commands (a password's first word as
        a record's tag, the rest sent to the server as a command line).
        """
        self.current = None
        self.mode = Mode.COMMAND
        self.traits.refused()
        out = self.out
        out.violation("client", f"refused_{frag.problem}", f"{size} octets", "refused")
        out.owe((tag or b"*") + b" BAD [CLIENTBUG] Command not understood by the proxy\r\n")
        # A line without a command name (one word; one word and spaces, a tab, a CR) is no
        # command, and its first word is no tag the record may keep: it is what a client sent
        # where the server never asked for it, a SASL response above all (base64 credentials,
        # one word), after an AUTHENTICATE answered without a "+".
        if (
            tag is not None
            and verb
            and self.config.log_commands
            and out.violations <= self.config.max_violation_records
        ):
            cmd = Command(tag, verb, self.state, out.now)
            out.actions.append(out.command_record(cmd, "BAD", "CLIENTBUG"))
        literal = frag.literal
        if literal is not None and literal.synchronizing:
            out.close_after_owed(b"* BYE Command not understood by the proxy\r\n")
            out.pay_owed()
            return Verdict.STOP
        if literal is not None:
            self.discarded = 0
            if not self._discard_literal(literal.size):
                out.pay_owed()
                return Verdict.STOP
        return Verdict.WITHHOLD

    def _discard_literal(self, size: int) -> bool:
        """Skip a literal of a refused command, then the rest of that command."""
        self.discarded += size
        if self.discarded > self.config.max_discard:
            # Draining 2^63 octets is never going to end: stop here.
            self.out.violation("client", "literal_too_large_to_skip", f"{size} octets", "closed")
            self.out.close_after_owed(b"* BYE Literal too large to skip\r\n")
            return False
        self.framer.literal(size, Use.SKIP)
        self.mode = Mode.DISCARD
        return True

    def _discard_fragment(self, line: bytes) -> Fate:
        """A line of a command being discarded: dropped, following the client's framing."""
        try:
            literal = lexer.literal_at_end(line)
        except LiteralError:
            # More than 20 digits: where the command ends cannot be known. Whatever follows
            # (in the client's framing, octets of that literal: a password, say) must not be
            # read as commands.
            return self._lost_framing("literal length has too many digits")
        if literal is None:
            self.mode = Mode.COMMAND  # the command ends here
            return Verdict.WITHHOLD
        if literal.synchronizing:
            # The client waits for a "+" that a refused command never gets; one that sends the
            # octets anyway would have them read as commands.
            return self._lost_framing("synchronizing literal in a refused command")
        return Verdict.WITHHOLD if self._discard_literal(literal.size) else Verdict.STOP

    def _lost_framing(self, why: str) -> Fate:
        self.out.violation("client", "discard_lost", why, "closed")
        self.out.close_after_owed(b"* BYE Command not understood by the proxy\r\n")
        self.out.pay_owed()
        return Verdict.STOP

    def _fragment(self, cmd: Command, line: bytes) -> Fate:
        frag = classify.fragment(lexer.strip_eol(line), 0, cmd.depth)
        if (
            frag.problem is None
            and cmd.verb in _URL_VERBS
            and classify.escaped_control(frag.content)
        ):
            frag = replace(frag, problem="escaped_control")
        if frag.problem == "literal_length":
            return self._bad_literal()
        if frag.problem is not None:
            # The server holds the start of this command and waits for the rest: no answer of
            # ours could end it cleanly, and nothing unreadable is sent. The session ends.
            self.out.violation("client", f"refused_{frag.problem}", f"{len(line)} octets", "closed")
            self.out.protocol_error(b"* BYE Command not understood by the proxy\r\n")
            return Verdict.STOP
        cmd.depth = frag.depth
        self.traits.fragment(frag.content, frag.literal)
        collecting = self.ids.collecting
        if collecting is not None and collecting.cmd is cmd:
            if not self.ids.room(len(line)):
                return Verdict.STOP
            collecting.add(line)
        elif cmd.verb == b"LOGIN":
            cmd.login_args(frag)
        return self._fragment_end(cmd, line, frag)

    def _fragment_end(self, cmd: Command, line: bytes, frag: classify.Fragment) -> Fate:
        literal = frag.literal
        collecting = self.ids.collecting
        collected = collecting is not None and collecting.cmd is cmd
        if literal is None:
            self.current = None
            self.mode = Mode.COMMAND
            if cmd.verb == b"LOGIN":
                cmd.login_user(self.config.identify_user)
            if collected:
                # Deciding an ID costs up to tens of milliseconds of the loop every session
                # shares (30 values of 1024 octets); IDs pipelined in one receive would cost
                # that many times over in one go. The client's next command is read once the
                # server has answered this one: one ID's work per turn, and per round trip.
                self._set_gate(Gate.DRIVE if self.ids.complete() else Gate.ID, cmd)
            self._sent(cmd)
            return Verdict.WITHHOLD if collected else Verdict.RELAY
        cmd.literal(literal.size)
        self.mode = Mode.CONTINUE
        if collected:
            if not self.ids.literal(literal.size, literal.synchronizing):
                return Verdict.STOP
            self.framer.literal(literal.size, Use.TAKE)
            if not literal.size:
                self.literal_done()
            return Verdict.WITHHOLD
        if cmd.verb == b"LOGIN":
            cmd.argc += 1
            if cmd.argc == 1 and not cmd.bad_args:
                self.framer.keep_next()
        elif self.framer.kept is None and (
            keep := cmd.wants_literal(max(self.config.max_line, ECHO_SCAN), frag.content)
        ):
            # A literal up to a line's size is read whole before its command ends (a mailbox
            # name Dovecot would echo with its line ends: `literal_done`).
            self.framer.keep_next(keep)
        # Literal octets go to the server only when it asked for them. A server that does not
        # read a literal the proxy saw announced (RFC 7888 says it must look for {N+} at every
        # line's end; Dovecot 2.3 does not always) runs its octets as commands, unseen by the
        # proxy and its policy. So {N+} goes out as {N}; the client's octets wait (the shell
        # stops reading them) until the server's "+", which a LITERAL+ client never sees; if
        # the server answers the command instead, they are skipped.
        self.pending_literal = literal.size
        self.literal_hidden = not literal.synchronizing
        self._set_gate(Gate.LITERAL, cmd)
        return Verdict.RELAY if literal.synchronizing else _synchronizing(line)

    def _bad_literal(self) -> Fate:
        """A literal length of more than 20 digits: its octets cannot be counted, so the
        stream cannot be followed past it."""
        self.out.violation("client", "bad_literal", "literal length has too many digits", "closed")
        self.out.protocol_error(b"* BYE Literal length is not acceptable\r\n")
        return Verdict.STOP

    def _sent(self, cmd: Command) -> None:
        """The whole command has been read; some commands make the client wait."""
        if cmd.verb == b"AUTHENTICATE":
            self.sasl_command = cmd
            self._set_gate(Gate.AUTH, cmd)
        elif cmd.verb == b"IDLE":
            self.idle_command = cmd
            self._set_gate(Gate.IDLE, cmd)

    def _set_gate(self, gate: Gate, owner: Command) -> None:
        self.gate = gate
        self.gate_owner = owner

    def clear_gate(self) -> None:
        self.gate = None
        self.gate_owner = None

    def unanswered(self) -> list[Command]:
        """The commands still waiting for their answers, in the order they were sent per tag."""
        out: list[Command] = []
        for waiting in self.pending.values():
            if isinstance(waiting, Command):
                out.append(waiting)
            else:
                out.extend(waiting)
        return out

    # ----------------------------------------------------------------------------------------
    # Server answers.

    def continuation(self) -> bytes | None:
        """The server's "+": what the client is shown instead (b"": nothing), or None."""
        piece = self.ids.next_piece()
        if piece is not None:
            # The server is ready for the next piece of the ID we rewrote: ours, not the client's.
            self.out.to_server(piece)
            if not self.ids.pieces and self.gate is Gate.DRIVE:
                # Sent whole: the client's next command is read once the server has answered
                # it, as for any ID (a second ID decided before would have its pieces thrown
                # away by this one's answer, `IdFlow.answered`).
                self.gate = Gate.ID
            return b""
        gate = self.gate
        shown: bytes | None = None
        if gate is Gate.LITERAL:
            if self.literal_hidden:
                # The client sent {N+} and waits for nothing: this "+" answers our {N}.
                shown = b""
                self.literal_hidden = False
            self.framer.literal(self.pending_literal, Use.PASS)
            self.pending_literal = 0
            self.clear_gate()
            if not self.framer.literal_left:
                self.literal_done()
        elif gate is Gate.AUTH:
            self.mode = Mode.SASL
            self.clear_gate()
        elif gate is Gate.IDLE:
            self.mode = Mode.IDLING
            self.clear_gate()
        # Otherwise the "+" answers nothing we know of; the client will make of it what it can.
        return shown

    def answers(self, tag: bytes) -> bool:
        """Whether an answer with this tag answers a command the server was sent: one is
        waiting with it, and it is not an ID still being collected (not sent yet)."""
        waiting = self.pending.get(tag)
        if waiting is None:
            return False
        cmd = waiting if isinstance(waiting, Command) else waiting[0]
        collecting = self.ids.collecting
        return collecting is None or collecting.cmd is not cmd

    def answered(self, tag: bytes, status: str, code: str | None) -> None:
        """A tagged answer to one of the client's commands (`answers` says it is one)."""
        waiting = self.pending[tag]
        if isinstance(waiting, Command):
            cmd = waiting
            del self.pending[tag]
        else:
            cmd = waiting.popleft()
            if not waiting:
                del self.pending[tag]
        self.unanswered_count -= 1
        self._complete(cmd, status, code)

    def _complete(self, cmd: Command, status: str, code: str | None) -> None:
        self._transition(cmd, status)
        if cmd is self.gate_owner:
            gate = self.gate
            self.clear_gate()
            self.mode = Mode.COMMAND
            if gate is Gate.LITERAL:
                # The server answered the command instead of asking for its literal.
                size, self.pending_literal = self.pending_literal, 0
                self.framer.forget()
                self.current = None
                if self.literal_hidden:
                    # A LITERAL+ client sent it anyway: skip it and the rest of the command,
                    # following the client's framing, to find its next command.
                    self.literal_hidden = False
                    self.discarded = 0
                    self._discard_literal(size)
                else:
                    # A synchronising literal: the client must not have sent it. Whatever it did
                    # send meanwhile is the literal, not commands (`SessionCore.feed_server`).
                    self.literal_refused = True
        if cmd is self.sasl_command:
            self.sasl_command = None
            if self.mode is Mode.SASL:
                self.mode = Mode.COMMAND
        if cmd is self.idle_command:
            self.idle_command = None
            if self.mode is Mode.IDLING:
                self.mode = Mode.COMMAND
        if self.config.log_commands:
            self.out.actions.append(self.out.command_record(cmd, status, code))

    def mailbox_closed(self) -> None:
        """`* OK [CLOSED]` (RFC 9051 §7.1): the selected mailbox was closed, as a SELECT or
        EXAMINE begins. Dovecot closes it for one it then answers BAD (`SELECT INBOX (FOO)`),
        where the answer alone would leave the state as it was."""
        if self.state is State.SELECTED:
            self.state = State.AUTHENTICATED
            self.mailbox = None

    def _transition(self, cmd: Command, status: str) -> None:
        """The connection state after the server's answer (RFC 9051 §3)."""
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
            self.logout_done = True
            self.state = State.LOGOUT
        elif verb == b"ID" and self.config.policy is not None:
            self.ids.answered(cmd, status)


def _synchronizing(line: bytes) -> bytes:
    """The line with the `{N+}` at its end written `{N}` (`~{N+}` as `~{N}`)."""
    body = lexer.strip_eol(line)
    return body[:-2] + b"}" + line[len(body) :]
