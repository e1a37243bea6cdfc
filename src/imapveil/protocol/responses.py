"""The server's side of the grammar: its responses read line by line, as far as the proxy needs.

The greeting must be an IMAP greeting (`* OK`, `* PREAUTH`, `* BYE`): a client's LOGIN must not
go to an SMTP or SSH port configured by mistake, so nothing of the client's reaches the server
before it. Continuations (`+`) and tagged answers move the commands along; untagged responses
say what the connection is (BYE, PREAUTH, CAPABILITY, a mailbox CLOSED) and carry the server's
ID. Data responses may announce literals, which the framer then passes through uncounted by the
grammar; status responses cannot (their text is no place for a literal, whatever it ends with).

Each line comes back as what the client is shown instead of it (b"": nothing), or None: the line
as it came.
"""

from __future__ import annotations

import re

from imapveil.protocol import lexer
from imapveil.protocol.client_leg import ClientLeg
from imapveil.protocol.command import State
from imapveil.protocol.commands import Commands, Gate
from imapveil.protocol.framer import BARE_CR, OUTSIDE, ServerFramer, quote_state
from imapveil.protocol.id_flow import ID_LIMIT, IdFlow
from imapveil.protocol.lexer import LiteralError
from imapveil.protocol.outbox import Outbox

_STATUS_WORDS = frozenset((b"OK", b"NO", b"BAD", b"BYE", b"PREAUTH"))
_GREETING = re.compile(rb"\* (?i:OK|PREAUTH|BYE)(?![^ \r\n])")
"""An IMAP greeting's start: the word whole (`* OKAY` is none, nor `* OK[x]`)."""
UNAVAILABLE = b"* BYE [UNAVAILABLE] Mail server is not reachable\r\n"
SERVERBUG = b"* BYE [SERVERBUG] Response from the mail server not understood\r\n"
"""What the client is told when the server's stream cannot be read on (`Responses.unreadable`)."""
_PASSIVE = (
    rb"(?:[0-9]|(?:SEARCH|ESEARCH|FLAGS|LIST|LSUB|STATUS|ENABLED|SORT|THREAD)(?=[ \r\n])"
    rb"|(?:OK|NO|BAD|BYE) (?!\[(?i:CAPABILITY)(?!" + lexer.ATOM_CLASS + rb")))"
)
"""What an untagged line may start with (after `* `) for `simple`: message data, a kind of
response `line` only checks for a literal at its end, or a status other than PREAUTH whose
response code is not CAPABILITY (never a CAPABILITY or ID line). An `OK [CLOSED]` or a `BYE`
among them is `simple`'s to see (`_CLOSED`, `_BYE`)."""
_KIND = re.compile(rb"[0-9]|[A-Za-z][A-Za-z-]*+(?![^ \r\n])")
"""How an untagged response's kind may start (after `* `): message data (its number, the
framer's fast path reads it without a look, `framer._SKIP`; `_DATA_KIND` where it announces a
literal), or a name of letters and hyphens followed by a space or the line's end. A kind run
into what follows (`* OK[ALERT] x {54}`) is no response the proxy can read: it would take
`OK[ALERT` for a kind whose literal it counts and passes unread, where a client reads `OK` and
text (Python's imaplib reads a kind as `[A-Z-]+`, `X` of `* X1 {54}`; parsers that end an atom
at `[`), and so reads those octets as lines (an ID past the policy)."""
_DATA_KIND = re.compile(rb"\* [0-9]++ [A-Za-z][A-Za-z-]*+(?![^ \r\n])")
"""Message data (`* 12 FETCH`), as the first line of a response that announces a literal, or
one that streams: the same rule for its kind."""
_BYE = re.compile(rb"(?m)^\* BYE ")
"""An untagged BYE (Dovecot's before its answer to LOGOUT, every session): the server will close."""
_CLOSED = re.compile(rb"(?m)^\* OK \[(?i:CLOSED)(?!" + lexer.ATOM_CLASS + rb")")
"""An untagged `OK [CLOSED]` (Dovecot's answer to every SELECT while a mailbox is selected), as
`_untagged` reads it: the code a whole atom, in any case."""
_SIMPLE = re.compile(
    rb"(?:\* "
    + _PASSIVE
    # The rest of the line, any `}` but one that ends it: runs of a character class between
    # the `}`s, not an alternation per octet (which costs 20 ns an octet, a SELECT's answer 7 us).
    + rb"[^\r\n}]*+(?:(?:\}(?!\r?\n)|\r(?=[\r\n]))[^\r\n}]*+)*+\n)*+"
    + lexer.TAG_PATTERN
    + rb" ((OK|NO|BAD)(?: [^\r\n]*+)?)\r?\n"
)
"""A tagged answer without a response code (`a1 OK NOOP completed`), after any number of untagged
lines that announce no literal and that nothing but that is read of: message data
(`* 1 FETCH (FLAGS (\\Seen))`, `* 3 EXISTS`: lines the framer passes without a look, see
`framer._SKIP`) and the kinds in `_PASSIVE` (`* SEARCH 1 2 3`): `simple` reads it."""


class Responses:
    __slots__ = (
        "bye_seen",
        "capabilities",
        "commands",
        "framer",
        "greeted",
        "id_parts",
        "ids",
        "leg",
        "out",
    )

    def __init__(
        self,
        out: Outbox,
        framer: ServerFramer,
        commands: Commands,
        ids: IdFlow,
        leg: ClientLeg,
    ) -> None:
        self.out = out
        self.framer = framer
        self.commands = commands
        self.ids = ids
        self.leg = leg
        self.greeted = False
        self.capabilities: frozenset[str] = frozenset()
        self.bye_seen = False
        # A server `* ID` with literals, collected whole (bounded by ID_LIMIT) before the
        # policy reads it: nothing of it goes out until it has.
        self.id_parts: bytearray | None = None

    def __repr__(self) -> str:
        return f"<responses greeted={self.greeted}>"

    def line(self, line: bytes) -> bytes | None:
        """One complete server line."""
        cr = line.find(b"\r")
        if (
            0 <= cr < len(line) - 2
            and BARE_CR.search(line, cr)
            and (self.greeted or _GREETING.match(line))
        ):
            # A CR that ends no line: a client may end one there (Java's readLine does), and
            # read what follows as a line the proxy never saw (`b OK x` CR `* ID (...)`).
            return self.unreadable("unparsable_response", "a CR alone")
        if self.framer.continues:
            if self.id_parts is not None:
                return self._server_id_line(line)
            return None if self.data_line(line) else b""
        if not self.greeted:
            if not _GREETING.match(line):
                self.not_imap(line)
                return b""
            if self.commands.gate is Gate.GREETING:
                self.commands.clear_gate()  # what the client sent meanwhile may go now
        shown: bytes | None = None
        if line[:1] == b"+":
            shown = self.commands.continuation()
        elif line.startswith(b"* "):
            shown = self._untagged(line)
        else:
            parsed = lexer.split_tag(lexer.strip_eol(line))
            if parsed is None:
                return self.unreadable("unparsable_response", f"{len(line)} octets")
            shown = self._tagged(*parsed)
        self.greeted = True
        return shown

    def simple(self, line: bytes) -> bool:
        """`line` (the whole of a chunk, between responses, after the greeting) is a tagged
        answer to a command of the client's (with no CAPABILITY response code), after untagged
        lines of which only a BYE or an `OK [CLOSED]` is read (`_PASSIVE`, no literal at their
        end): taken, as the framer and `line` would take them when they show the lines as they
        came, and True; False: nothing done.

        The common case in one match instead of the tag, status and code readers (compared
        with `line` in tests/protocol/test_simple.py)."""
        # Only a chunk whose last line could be a tagged answer is matched: a chunk of a long run
        # of message data (ending mid-line, or in an untagged line) is not scanned twice.
        last = line.rfind(b"\n", 0, -1) + 1
        if not line.endswith(b"\n") or line[last : last + 1] in b"*+":
            return False
        m = _SIMPLE.fullmatch(line)
        if m is None:
            return False
        tag = m.group(1)
        if tag == self.ids.injected or not self.commands.answers(tag):
            return False
        rest = m.group(2)
        code = None
        at = len(m.group(3))
        if rest.startswith(b" [", at):
            # A response code, read as `_tagged` reads it; one that carries capabilities (a
            # LOGIN's OK, every session) is that method's to read, and is seen before reading.
            if rest[at + 2 : at + 12].upper() == b"CAPABILITY":
                return False
            code = lexer.status_and_code(rest)[1]
        closed = bye = False
        if last:
            # What the untagged lines say, before the answer, as they come (both: one order
            # or the other decides the mailbox left; the general path reads them in turn).
            closed = line.find(b"* OK [", 0, last) >= 0 and bool(_CLOSED.search(line, 0, last))
            bye = line.find(b"* BYE ", 0, last) >= 0 and bool(_BYE.search(line, 0, last))
            if closed and bye:
                return False
        if closed:
            self.commands.mailbox_closed()
        elif bye:
            self._bye()
        self.ids.examined = False  # as `_tagged`
        self.commands.answered(tag, lexer.STATUS_NAMES[m.group(3)], code)
        return True

    def not_imap(self, line: bytes) -> None:
        """The upstream's first line is no IMAP greeting (an SMTP or SSH port by mistake): the
        client's LOGIN must not go there. A few printable octets say what it was."""
        shown = "".join(chr(c) if 0x20 <= c < 0x7F else "?" for c in lexer.strip_eol(line)[:24])
        self.out.end("upstream_unavailable", f"not an IMAP greeting: {shown!r}")
        self.out.reply(UNAVAILABLE)
        self.out.actions.extend(self.out.close("upstream_unavailable"))

    def unreadable(self, kind: str, detail: str, *, said: bool = False) -> bytes:
        """A server line the proxy cannot read (or must read and cannot hold): it is not
        forwarded as it came, and the server's stream cannot be followed past it. The client is
        told `* BYE [SERVERBUG]` where a line of the proxy's own can go (at a response boundary,
        none of this line shown: not `said`), and both legs close; the commands in flight get
        their records without a status. Returns b"": what the client is shown of the line."""
        out = self.out
        out.violation("server", kind, detail, "closed")
        out.end("protocol_error", f"server: {kind}")
        if not said and out.can_speak:
            out.pay_owed()  # which closes, after a BYE of its own, if the session was closing
            if not out.closed:
                out.reply(SERVERBUG)
        out.actions.extend(out.close("protocol_error"))
        return b""

    def may_stream(self, head: bytes) -> bool:
        """A server line longer than the proxy holds starts (`head`: its first octets, nothing
        of it forwarded yet). True: it goes out as it comes, as message data, or as a status or
        tagged answer the proxy shows as it came (`long_line` reads it at its end). False: a
        line whose fate is not "as it came" (a "+" the proxy may hide or answer itself, an
        answer to the proxy's own ID or to no command, a CAPABILITY list it rewrites, an ID the
        policy reads) or that is unreadable: refused before any of it goes out, the session
        closing (`unreadable`)."""
        if self.id_parts is not None:
            # A line of the server's `* ID` being collected: it cannot be held whole.
            self.framer.streaming = False
            self._unreadable_id("response_too_long", f"longer than {self.framer.hold} octets")
            return False
        if self.framer.continues:
            return True  # the rest of a data response after a literal
        self.framer.streaming = False  # if refused: nothing of it goes out, a BYE may
        if not self.greeted:
            self.not_imap(head)
            return False
        if head.startswith(b"* "):
            kind = lexer.read_atom(head, 2, 16)[0].upper()
            if _KIND.match(head, 2) is None or (head[2:3].isdigit() and not _DATA_KIND.match(head)):
                readable = False
            elif kind in _STATUS_WORDS:
                readable = lexer.status_and_code(head[2:])[1] != "CAPABILITY"
            else:
                readable = kind not in (b"CAPABILITY", b"ID")
        elif head.startswith(b"+"):
            readable = False
        else:
            parsed = lexer.split_tag(head)
            readable = parsed is not None and parsed[0] != self.ids.injected
            if parsed is not None and readable:
                status, code, _args = lexer.status_and_code(parsed[1])
                readable = (
                    status in ("OK", "NO", "BAD")
                    and code != "CAPABILITY"
                    and self.commands.answers(parsed[0])
                )
        if not readable:
            self.unreadable("response_too_long", f"longer than {self.framer.hold} octets")
            return False
        self.framer.streaming = True
        return True

    def long_line(self, head: bytes, tail: bytes) -> None:
        """An over-long server line has ended; it was streamed, only its head and tail kept.

        The head says what kind of line it was (its tag, status and response code fit in it);
        the tail says whether it announced a literal. It went out as it came, whatever the
        grammar would have shown instead.
        """
        if self.framer.continues or (head.startswith(b"* ") and not _is_status(head[2:])):
            self.data_line(tail, said=True)
            return
        # A status or tagged response: its text cannot announce a literal, the head is enough.
        self.line(head + b"\r\n")

    def data_line(self, line: bytes, *, said: bool = False) -> bool:
        """The end of a data response fragment, which may announce a literal. False: a literal
        whose octets cannot be counted (more than 20 digits, or too large): where the response
        ends is unknown, so the session ends (`unreadable`; `said`: the client has the line)."""
        first = not self.framer.continues
        try:
            literal = server_literal(line)
            if literal is not None and (
                self.framer.quote != OUTSIDE if said else b'"' in line and _in_quotes(line)
            ):
                raise LiteralError("literal inside a quoted string")
        except LiteralError as exc:
            self.unreadable("bad_literal", str(exc), said=said)
            return False
        if literal is None:
            self.framer.no_literal()
            return True
        if first and not said and line[2:3].isdigit() and not _DATA_KIND.match(line):
            # The first line of message data (the framer's fast path did not look at it).
            self.unreadable("unparsable_response", f"{len(line)} octets")
            return False
        self.framer.literal(literal.size)
        return True

    def _authenticated(self) -> bool:
        return self.commands.state is not State.NOT_AUTHENTICATED

    def _bye(self) -> None:
        """An untagged BYE: the server is about to close (`line` and `simple` alike)."""
        self.bye_seen = True
        self.commands.state = State.LOGOUT

    def _untagged(self, line: bytes) -> bytes | None:
        body = lexer.strip_eol(line)
        if _KIND.match(body, 2) is None:
            return self.unreadable("unparsable_response", f"{len(line)} octets")
        word, after = lexer.read_atom(body, 2, 16)
        kind = word.upper()
        shown: bytes | None = None
        if kind in _STATUS_WORDS:
            # resp-text cannot hold a literal, whatever it ends with.
            _status, code, args = lexer.status_and_code(body[2:])
            if code == "CAPABILITY":
                self.capabilities = lexer.capabilities(args)
                shown = self.leg.capability_code(body, self._authenticated())
            elif code == "CLOSED" and kind == b"OK":
                self.commands.mailbox_closed()
            if kind == b"BYE":
                self._bye()
            elif kind == b"PREAUTH" and not self.greeted:
                self.commands.state = State.AUTHENTICATED
            return shown
        if kind == b"CAPABILITY":
            if body.endswith(b"}") and _announces_literal(body):
                # Capabilities are atoms, which hold no `{`: no capability list. The list is
                # rewritten for the client's leg (the `{N}` moved or dropped), so the client
                # would read as lines the octets the proxy counts as a literal and passes.
                return self.unreadable("unparsable_response", f"{len(line)} octets")
            self.capabilities = lexer.capabilities(body[after:])
            shown = self.leg.capability_line(body, after, self._authenticated())
        elif kind == b"ID" and self.ids.reads_server_id:
            if line.rstrip().endswith(b"}"):
                # A value in a literal (Dovecot writes an 8-bit one so): the response is
                # collected whole, its literals too, and read once it has ended.
                self.id_parts = bytearray()
                self.framer.collecting = True
                return self._server_id_line(line)
            shown = self.ids.server_id(line)
        if not self.data_line(line):
            return b""
        return shown

    def collect(self, octets: bytes) -> None:
        """Literal octets of the server's `* ID` being collected (`ServerFramer.collecting`)."""
        assert self.id_parts is not None
        self.id_parts += octets

    def _server_id_line(self, line: bytes) -> bytes:
        """A line of the server's `* ID` being collected: b"" (nothing shown) until its last,
        then the whole response as the policy has it (`IdFlow.server_id`)."""
        parts = self.id_parts
        assert parts is not None
        parts += line
        try:
            literal = server_literal(line)
        except LiteralError as exc:
            return self._unreadable_id("bad_literal", str(exc))
        if len(parts) + (literal.size if literal else 0) > ID_LIMIT:
            return self._unreadable_id("id_too_large", f"more than {ID_LIMIT} octets")
        if literal is not None:
            self.framer.literal(literal.size)
            return b""  # more to come
        self.framer.no_literal()
        self.id_parts = None
        self.framer.collecting = False
        collected = bytes(parts)
        shown = self.ids.server_id(collected)
        return collected if shown is None else shown

    def _unreadable_id(self, kind: str, detail: str) -> bytes:
        """The server's `* ID` being collected cannot be: nothing of it went out, so the client
        is between responses and may be told BYE."""
        self.id_parts = None
        self.framer.collecting = self.framer.continues = False
        return self.unreadable(kind, detail)

    def _tagged(self, tag: bytes, rest: bytes) -> bytes | None:
        status, code, args = lexer.status_and_code(rest)
        if status not in ("OK", "NO", "BAD"):
            return self.unreadable("unparsable_response", f"{len(rest)} octets")
        injected = tag == self.ids.injected
        if not injected and not self.commands.answers(tag):
            # An answer to no command the server was sent: the server read something the proxy
            # did not see as a command (or is not following the client at all).
            return self.unreadable("unknown_tag", f"tag of {len(tag)} octets")
        self.ids.examined = False  # the next `* ID` may be decided
        if code == "CAPABILITY":
            self.capabilities = lexer.capabilities(args)
        if injected:
            # The answer to our own ID: the client did not ask, so it does not see it.
            self.ids.injected_answered(status, self.commands.state)
            return b""
        self.commands.answered(tag, status, code)
        if code == "CAPABILITY":
            # After the answer: the list in a LOGIN's OK describes the authenticated state.
            return self.leg.capability_code(tag + b" " + rest, self._authenticated())
        return None


def server_literal(line: bytes) -> lexer.LiteralAnnouncement | None:
    """The literal a server line announces at its end, if any. Raises LiteralError for one
    whose octets cannot be counted, and for `{N+}`: a server never sends one (RFC 9051 §4.3),
    and a client need not read it as a literal (Python's imaplib does not), so the octets the
    proxy would count and pass unread could be lines to the client."""
    literal = lexer.literal_at_end(line)
    if literal is not None and not literal.synchronizing:
        raise LiteralError("non-synchronizing literal from the server")
    return literal


def _in_quotes(line: bytes) -> bool:
    """Whether the literal announced at the end of `line` (a whole line, or what follows a
    literal in one) is inside a quoted string that never closed: a client that reads a quoted
    string on across the line's end (K-9 Mail's parser does) reads the octets the proxy would
    count and pass unread as the rest of the string and then as lines."""
    return quote_state(OUTSIDE, line, 0, line.rfind(b"{")) != OUTSIDE


def _announces_literal(line: bytes) -> bool:
    try:
        return lexer.literal_at_end(line) is not None
    except LiteralError:
        return True


def _is_status(rest: bytes) -> bool:
    return lexer.read_atom(rest, 0, 16)[0].upper() in _STATUS_WORDS
