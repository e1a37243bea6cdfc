"""Framing: one framer per direction splits the byte stream into lines and literal bodies.

It knows lines (ending in LF) and literal bodies only, no grammar (as imap-codec's fragmentizer):
the session asks it for the next fragment of a chunk, reads the grammar of a line, and tells the
framer what it decided: a literal of N octets follows (`literal`), or the line ended nothing
(`no_literal`). Fragments are positions in the chunk that arrived, so the session can forward
unchanged bytes as one slice of it; literal bodies are never copied or scanned (only counted),
and a run of untagged message data from the server (`* 12 FETCH ...`) is skipped with one regular
expression search until something in it needs the grammar.

What the framer holds: an incomplete line at the end of a chunk (bounded: a client line by
`max_line`; a server line by `hold`, beyond which it is streamed through and only its head and
tail are kept, and whether it is inside a quoted string so far: a literal announced there is
none), the count of literal octets still to come, and how a client literal is used.
"""

from __future__ import annotations

import enum
import re


class Fragment(enum.Enum):
    LINE = 1  # a complete line: (start, end) in the chunk, plus any part held from before
    LITERAL = 2  # literal octets data[start:end], already counted
    PARTIAL = 3  # the rest of the chunk is an incomplete line, now held
    TOO_LONG = 4  # a client line longer than allowed (what was held is dropped)
    DATA_LINE = 5  # server: the end of a message data line that may announce a literal
    LONG_LINE = 6  # server: an over-long line that was streamed through has ended
    STREAM = 7  # server: an over-long line starts streaming (what was held goes out first)
    NO_GREETING = 8  # server: more than a greeting's worth without a line end, before greeting
    END = 9  # the chunk is used up
    BARE_CR = 10  # server: a CR that ends no line, in a line nothing of which has gone out
    BARE_CR_STREAMED = 11  # the same in a line streaming out: what came before it has gone


class Use(enum.Enum):
    """What becomes of a client literal's octets (the grammar decides when it is announced)."""

    PASS = 1  # forwarded as they come (the first `KEEP_LIMIT` kept after `keep_next`)
    TAKE = 2  # not forwarded: the session collects them (an ID being rewritten)
    SKIP = 3  # not forwarded: a refused command's literal, dropped


KEEP_LIMIT = 1024  # how much of a literal LOGIN user name or SELECT mailbox is kept (by default)
HEAD = 4096  # how much of a streamed (over-long) server line is kept for parsing
MAX_GREETING = 4096  # octets before the server's first line end, at most

# A run of untagged message data ("* 12 FETCH ...", "* 3 EXPUNGE") needs nothing from the
# proxy but its literals. This finds, from the start of such a line, the first place that does:
# a literal announcement, or a line that does not start with "* <digit>".
_SKIP = re.compile(rb"\}\r?\n|\n(?!\* [0-9])|\r(?=[^\r\n])")
# A CR that ends no line: followed by neither LF nor another CR (a client may end a line at a
# CR and read what follows as a line; IMAP has none outside literals). CRs just before the LF
# are empty lines at most to such a client.
BARE_CR = re.compile(rb"\r(?=[^\r\n])")
# Quoted strings in a line that streams (too long to hold): the run from outside any quoted
# string up to a quote that opens one not closed in the run, and the run inside one up to its
# closing quote or a backslash the run ends with. A backslash escapes the next octet in one.
# Unrolled (a class run between escapes), possessive: linear, half the cost of alternations.
_OUTSIDE = re.compile(rb'[^"]*+(?:"[^"\\]*+(?:\\[\s\S][^"\\]*+)*+"[^"]*+)*+')
_INSIDE = re.compile(rb'[^"\\]*+(?:\\[\s\S][^"\\]*+)*+')
OUTSIDE, INSIDE, ESCAPED = 0, 1, 2
"""Where a streaming line is, so far: outside any quoted string, inside one, just after a
backslash in one (`ServerFramer.quote`)."""


def quote_state(state: int, data: bytes, pos: int, end: int) -> int:
    """The quote state after data[pos:end], from `state` before it. Without a backslash in
    them (a long SEARCH result, most lines) each quote opens or closes a string: counted. With
    them, at most ~5 ms for 256 KiB of quotes and backslashes (a hostile server's worst)."""
    if state != ESCAPED and data.find(b"\\", pos, end) < 0:
        return state ^ (data.count(b'"', pos, end) & 1)
    while pos < end:
        if state == ESCAPED:
            pos += 1
            state = INSIDE
        elif state == INSIDE:
            m = _INSIDE.match(data, pos, end)
            assert m is not None  # the pattern matches the empty string
            pos = m.end()
            if pos == end:
                return INSIDE
            if data[pos] != 0x22:  # a backslash, the run's last octet
                return ESCAPED
            pos += 1
            state = OUTSIDE
        else:
            m = _OUTSIDE.match(data, pos, end)
            assert m is not None
            pos = m.end()
            if pos == end:
                return OUTSIDE
            pos += 1  # a quote that opens a string not closed in the run
            state = INSIDE
    return state


class Parking:
    """Octets received and not read yet, while the peer must wait (for the server, or for the
    other sessions' turn: `session.TURN`): the chunk they came in and where they start in it
    (no copy, so many stops in one chunk cost one pass). Both framers park so."""

    __slots__ = ("parked_at", "parked_data")

    def __init__(self) -> None:
        self.parked_data = b""
        self.parked_at = 0

    @property
    def parked(self) -> int:
        return len(self.parked_data) - self.parked_at

    def park(self, data: bytes, at: int) -> None:
        """Leave data[at:] unread until `unpark`."""
        if at >= len(data):
            return
        if self.parked_data:  # more while already parked: only when the shell feeds a paused core
            self.parked_data = self.parked_data[self.parked_at :] + data[at:]
            self.parked_at = 0
        else:
            self.parked_data, self.parked_at = data, at

    def unpark(self) -> tuple[bytes, int]:
        parked = self.parked_data, self.parked_at
        self.parked_data, self.parked_at = b"", 0
        return parked


class ClientFramer(Parking):
    """The client's stream. Holds raw bytes, so its repr shows sizes only."""

    __slots__ = (
        "buf",
        "keep_limit",
        "kept",
        "literal_left",
        "max_line",
        "use",
    )

    def __init__(self, max_line: int) -> None:
        super().__init__()
        self.max_line = max_line
        self.buf = bytearray()  # an incomplete line, not yet forwarded
        self.literal_left = 0  # octets of literal body still to come
        self.use = Use.PASS
        self.kept: bytearray | None = None  # a literal body being kept (bounded)
        self.keep_limit = KEEP_LIMIT  # how much of it

    def __repr__(self) -> str:
        return f"<client framer buffered={len(self.buf)} literal_left={self.literal_left}>"

    def literal(self, size: int, use: Use) -> None:
        """The line just read announced a literal of `size` octets, to be used so."""
        self.literal_left = size
        self.use = use

    def keep_next(self, limit: int = KEEP_LIMIT) -> None:
        """Keep the first `limit` octets of the next literal's body (announced, not yet
        `literal`)."""
        self.kept = bytearray()
        self.keep_limit = limit

    def forget(self) -> None:
        """The literal the grammar meant to keep will not come."""
        self.kept = None

    def take_kept(self) -> bytes | None:
        kept, self.kept = self.kept, None
        return None if kept is None else bytes(kept)

    def held(self) -> bytes:
        """The start of the line just read that came in earlier chunks; no longer held."""
        held = bytes(self.buf)
        self.buf.clear()
        return held

    @property
    def position(self) -> str | None:
        if self.literal_left:
            return "mid_literal"
        return "mid_line" if self.buf else None

    def next(self, data: bytes, pos: int) -> tuple[Fragment, int, bytes]:
        """The fragment at data[pos:]: (kind, where it ends, the line for LINE)."""
        n = len(data)
        if self.literal_left:
            take = min(self.literal_left, n - pos)
            kept = self.kept
            if kept is not None and self.use is not Use.SKIP and len(kept) < self.keep_limit:
                kept += data[pos : pos + min(take, self.keep_limit - len(kept))]
            self.literal_left -= take
            return Fragment.LITERAL, pos + take, b""
        nl = data.find(b"\n", pos)
        if nl < 0:
            if len(self.buf) + n - pos > self.max_line:
                self.buf.clear()
                return Fragment.TOO_LONG, pos, b""
            self.buf += data[pos:]
            return Fragment.PARTIAL, n, b""
        end = nl + 1
        line = bytes(self.buf) + data[pos:end] if self.buf else data[pos:end]
        if len(line) > self.max_line:
            self.buf.clear()
            return Fragment.TOO_LONG, pos, b""
        return Fragment.LINE, end, line


class ServerFramer(Parking):
    """The server's stream: literal bodies and message data runs pass without a return to the
    session; lines that need the grammar come back one by one."""

    __slots__ = (
        "buf",
        "collecting",
        "continues",
        "head",
        "hold",
        "literal_left",
        "quote",
        "streaming",
        "tail",
    )

    def __init__(self, hold: int) -> None:
        super().__init__()
        self.hold = hold
        self.buf = bytearray()  # an incomplete line, not yet forwarded
        self.literal_left = 0  # octets of literal body still to pass through
        self.continues = False  # the next line continues a response (after a literal)
        self.streaming = False  # inside an over-long line that is forwarded as it comes
        self.head = b""  # the start of that line, for parsing
        self.tail = b""  # its last octets, to see a literal announced at its end
        # Whether what has streamed of it ends inside a quoted string (`quote_state`): a
        # literal announced there is none to a client that reads the string on.
        self.quote = OUTSIDE
        # The response in progress is the session's to collect (a server `* ID` with literals):
        # its literal octets come back as LITERAL fragments instead of passing.
        self.collecting = False

    def __repr__(self) -> str:
        return (
            f"<server framer buffered={len(self.buf)} literal_left={self.literal_left}"
            f" streaming={self.streaming}>"
        )

    def literal(self, size: int) -> None:
        """The line just read announced a literal of `size` octets; the response goes on."""
        self.literal_left = size
        self.continues = True

    def no_literal(self) -> None:
        """The line just read ended its response."""
        self.continues = False

    @property
    def at_boundary(self) -> bool:
        """Between responses, where a line of the proxy's own does not corrupt the stream."""
        return not (self.literal_left or self.streaming or self.continues)

    @property
    def position(self) -> str | None:
        if self.literal_left:
            return "mid_literal"
        return "mid_line" if self.buf or self.streaming else None

    def held(self) -> bytes:
        """The start of the line just read that came in earlier chunks; no longer held."""
        held = bytes(self.buf)
        self.buf.clear()
        return held

    def next(self, data: bytes, pos: int, greeted: bool) -> tuple[Fragment, int, int, bytes]:
        """The next fragment at or after data[pos:] that needs the session:
        (kind, where it starts, where it ends, its bytes)."""
        n = len(data)
        while pos < n:
            if self.literal_left:
                take = min(self.literal_left, n - pos)
                self.literal_left -= take
                if self.collecting:
                    return Fragment.LITERAL, pos, pos + take, b""
                pos += take
                continue
            if self.streaming:
                found = self._stream(data, pos)
                if found is None:
                    pos = n
                    continue
                return found
            if (
                not self.buf
                and not self.continues
                and greeted
                and data.startswith(b"* ", pos)
                and 0x30 <= (data[pos + 2] if pos + 2 < n else 0) <= 0x39
            ):
                # Fast path: message data lines need no parsing unless they end in a literal.
                m = _SKIP.search(data, pos)
                if m is None:
                    last = data.rfind(b"\n", pos)
                    if last >= 0:
                        pos = last + 1
                        continue
                elif data[m.start()] == 0x7D:  # "}": a literal announced at a line's end
                    line_start = data.rfind(b"\n", pos, m.start()) + 1 or pos
                    return Fragment.DATA_LINE, line_start, m.end(), data[line_start : m.end()]
                elif data[m.start()] == 0x0A:
                    pos = m.end()
                    continue
                else:  # a bare CR: its line is the grammar's (`Responses.line`)
                    pos = data.rfind(b"\n", pos, m.start()) + 1 or pos
            nl = data.find(b"\n", pos)
            if nl < 0:
                return self._incomplete(data, pos, greeted)
            end = nl + 1
            line = bytes(self.buf) + data[pos:end] if self.buf else data[pos:end]
            return Fragment.LINE, pos, end, line
        return Fragment.END, n, n, b""

    def _stream(self, data: bytes, pos: int) -> tuple[Fragment, int, int, bytes] | None:
        """More of an over-long line streaming out: None, all of data[pos:] passes (no line
        end in it); else the line's end (LONG_LINE), or a bare CR in it (nothing from there
        passes)."""
        n = len(data)
        nl = data.find(b"\n", pos)
        end = n if nl < 0 else nl + 1
        if self.tail.endswith(b"\r") and data[pos] not in b"\r\n":
            at = pos  # the chunk before ended in a CR, this one goes on without LF
        else:
            cr = BARE_CR.search(data, pos, end)
            at = -1 if cr is None else cr.start()
        if at >= 0:
            self.streaming = False
            return Fragment.BARE_CR_STREAMED, at, at, b""
        self.tail = (self.tail + data[pos:end])[-32:]
        self.quote = quote_state(self.quote, data, pos, end)
        if nl < 0:
            return None
        self.streaming = False
        return Fragment.LONG_LINE, pos, end, self.head

    def _incomplete(self, data: bytes, pos: int, greeted: bool) -> tuple[Fragment, int, int, bytes]:
        """data[pos:] is the start of a line (after what is held of it): held, or streamed."""
        n = len(data)
        if not greeted and len(self.buf) + n - pos > MAX_GREETING:
            return Fragment.NO_GREETING, pos, n, bytes(self.buf) + data[pos : pos + 24]
        if len(self.buf) + n - pos > self.hold:
            # Too long to hold whole (a huge SEARCH result): stream it through.
            if (
                BARE_CR.search(self.buf)
                or BARE_CR.search(data, pos)
                or (self.buf.endswith(b"\r") and data[pos] not in b"\r\n")
            ):
                self.buf.clear()
                return Fragment.BARE_CR, pos, pos, b""
            held = self.held()
            self.head = (held + data[pos : pos + HEAD])[:HEAD]
            self.tail = data[-32:]
            self.quote = quote_state(quote_state(OUTSIDE, held, 0, len(held)), data, pos, n)
            self.streaming = True
            return Fragment.STREAM, pos, n, held
        self.buf += data[pos:]
        return Fragment.PARTIAL, pos, n, b""
