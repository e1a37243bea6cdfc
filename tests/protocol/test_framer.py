"""The framers on their own, fed whole, byte by byte and in random chunks: lines and literal
bodies come out as positions in the chunk that arrived, whatever the cuts."""

from __future__ import annotations

from imapveil.protocol.framer import HEAD, ClientFramer, Fragment, ServerFramer, Use
from imapveil.protocol.lexer import literal_at_end
from tests.helpers.feeding import Splitter, byte_by_byte, whole

CLIENT = (
    b"a1 LOGIN {5}\r\nalice {6}\r\nsecret\r\na2 APPEND INBOX {12+}\r\nHello\r\nWorld\r\na3 NOOP\r\n"
)


def client_pieces(
    split: Splitter, data: bytes, use: Use = Use.PASS, max_line: int = 1000
) -> list[tuple[str, bytes]]:
    """What a client framer gives a grammar that accepts every literal announced."""
    framer = ClientFramer(max_line)
    pieces: list[tuple[str, bytes]] = []
    for chunk in split(data):
        pos = 0
        while pos < len(chunk):
            kind, end, line = framer.next(chunk, pos)
            if kind is Fragment.LINE:
                assert line.endswith(chunk[pos:end])  # the chunk's part is a slice of it
                framer.held()
                pieces.append(("line", line))
                announced = literal_at_end(line)
                if announced is not None:
                    framer.literal(announced.size, use)
            elif kind is Fragment.LITERAL:
                pieces.append(("literal", chunk[pos:end]))
                if not framer.literal_left and framer.kept is not None:
                    pieces.append(("kept", framer.take_kept() or b""))
            elif kind is Fragment.TOO_LONG:
                pieces.append(("too long", b""))
                return pieces
            else:
                assert kind is Fragment.PARTIAL and end == len(chunk)
            pos = end
    return pieces


def joined(pieces: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Adjacent literal pieces as one (the cuts decide how many there are)."""
    out: list[tuple[str, bytes]] = []
    for kind, data in pieces:
        if out and kind == "literal" and out[-1][0] == "literal":
            out[-1] = ("literal", out[-1][1] + data)
        else:
            out.append((kind, data))
    return out


def test_client_lines_and_literals(split: Splitter) -> None:
    assert joined(client_pieces(split, CLIENT)) == [
        ("line", b"a1 LOGIN {5}\r\n"),
        ("literal", b"alice"),
        ("line", b" {6}\r\n"),
        ("literal", b"secret"),
        ("line", b"\r\n"),
        ("line", b"a2 APPEND INBOX {12+}\r\n"),
        ("literal", b"Hello\r\nWorld"),
        ("line", b"\r\n"),
        ("line", b"a3 NOOP\r\n"),
    ]


def test_the_start_of_a_literal_is_kept_when_asked(split: Splitter) -> None:
    framer = ClientFramer(100)
    framer.keep_next()
    framer.literal(3000, Use.PASS)
    kept = b""
    for chunk in split(b"x" * 3000):
        pos = 0
        while pos < len(chunk):
            kind, pos, _line = framer.next(chunk, pos)
            assert kind is Fragment.LITERAL
    kept = framer.take_kept() or b""
    assert kept == b"x" * 1024  # bounded
    assert framer.take_kept() is None


def test_a_skipped_literal_is_not_kept() -> None:
    framer = ClientFramer(100)
    framer.keep_next()
    framer.literal(5, Use.SKIP)
    assert framer.next(b"abcdeREST", 0) == (Fragment.LITERAL, 5, b"")
    assert framer.kept == bytearray()


def test_client_line_too_long(split: Splitter) -> None:
    pieces = client_pieces(split, b"a NOOP\r\n" + b"b " + b"x" * 200 + b"\r\n", max_line=100)
    assert pieces == [("line", b"a NOOP\r\n"), ("too long", b"")]


def test_client_position_and_parking() -> None:
    framer = ClientFramer(100)
    assert framer.position is None
    framer.next(b"a NO", 0)
    assert framer.position == "mid_line"
    assert framer.held() == b"a NO" and framer.position is None
    framer.literal(3, Use.PASS)
    assert framer.position == "mid_literal"
    chunk = b"0123456789"
    framer.park(chunk, 4)
    framer.park(b"abc", 1)
    assert framer.parked == 8
    assert framer.unpark() == (b"456789bc", 0)
    assert framer.parked == 0


SERVER = (
    b"* OK ready\r\n"
    b"* 1 FETCH (UID 7 BODY[] {12}\r\nHello\r\nWorld)\r\n"
    b"* 2 FETCH (FLAGS (\\Seen))\r\n* 3 EXPUNGE\r\n"
    b"* 4 FETCH (BODY[] {3}\r\n{9})\r\n"
    b"+ go on\r\n"
    b"a OK FETCH done {5}\r\n"
)


def server_pieces(
    split: Splitter, data: bytes, hold: int = 1000, greeted: bool = True
) -> list[tuple[str, bytes]]:
    """What a server framer gives a grammar that takes literals at the end of data lines."""
    framer = ServerFramer(hold)
    pieces: list[tuple[str, bytes]] = []
    for chunk in split(data):
        pos = 0
        while pos < len(chunk):
            kind, start, pos, line = framer.next(chunk, pos, greeted)
            if kind in (Fragment.LINE, Fragment.DATA_LINE):
                if kind is Fragment.LINE:
                    assert line.endswith(chunk[start:pos])
                    framer.held()
                announced = literal_at_end(line) if line.startswith(b"* ") else None
                if kind is Fragment.DATA_LINE or framer.continues:
                    announced = literal_at_end(line)
                if announced is None:
                    framer.no_literal()
                else:
                    framer.literal(announced.size)
                pieces.append((kind.name.lower(), line))
            elif kind is Fragment.STREAM:
                pieces.append(("stream", line))
            elif kind is Fragment.LONG_LINE:
                announced = literal_at_end(framer.tail)
                if announced is None:
                    framer.no_literal()
                else:
                    framer.literal(announced.size)
                pieces.append(("long line", line[:12] + b"..." + framer.tail[-8:]))
            elif kind is Fragment.NO_GREETING:
                pieces.append(("no greeting", line))
                return pieces
    return pieces


def test_server_data_runs_are_skipped_but_for_their_literals(split: Splitter) -> None:
    pieces = server_pieces(split, SERVER)
    # Data lines ("* <n> ...") come back only where a literal is announced; their literal
    # bodies never come back (a "{9}" inside one is octets, not an announcement).
    kinds = [kind for kind, _ in pieces]
    assert ("line", b"* OK ready\r\n") in pieces
    assert ("line", b"+ go on\r\n") in pieces
    assert ("line", b"a OK FETCH done {5}\r\n") in pieces
    assert not any(b"Hello" in line or b"{9}" in line for _, line in pieces)
    assert not any(b"EXPUNGE" in line or b"Seen" in line for kind, line in pieces if kind != "line")
    assert kinds.count("data_line") + kinds.count("line") >= 5


def test_server_fast_path_whole() -> None:
    pieces = server_pieces(whole, SERVER)
    assert pieces == [
        ("line", b"* OK ready\r\n"),
        ("data_line", b"* 1 FETCH (UID 7 BODY[] {12}\r\n"),
        ("line", b")\r\n"),
        ("data_line", b"* 4 FETCH (BODY[] {3}\r\n"),
        ("line", b")\r\n"),
        ("line", b"+ go on\r\n"),
        ("line", b"a OK FETCH done {5}\r\n"),
    ]


def test_over_long_server_lines_stream_through(split: Splitter) -> None:
    long = b"* SEARCH " + b"1 " * 3000 + b"{4}\r\nabcd\r\n"
    pieces = server_pieces(split, b"* OK hi\r\n" + long + b"a OK\r\n", hold=1000)
    assert ("line", b"* OK hi\r\n") in pieces
    assert ("line", b"a OK\r\n") in pieces
    assert not any(b"abcd" in line for _, line in pieces)  # the literal, never a line
    # Held whole when it arrives whole; streamed (head and tail kept) when it trickles in.
    streamed = [line for kind, line in pieces if kind == "long line"]
    assert streamed in ([], [b"* SEARCH 1 1... 1 {4}\r\n"])
    if split is byte_by_byte:
        assert streamed


def test_the_head_of_a_streamed_line_is_bounded() -> None:
    framer = ServerFramer(100)
    data = b"a OK " + b"x" * 10_000
    kind, _start, end, held = framer.next(data, 0, True)
    assert (kind, end, held) == (Fragment.STREAM, len(data), b"")
    assert len(framer.head) == HEAD and framer.streaming
    assert framer.position == "mid_line" and not framer.at_boundary


def test_no_greeting_before_a_line_end() -> None:
    pieces = server_pieces(whole, b"SSH-2.0-" + b"x" * 5000, greeted=False)
    assert pieces == [("no greeting", b"SSH-2.0-" + b"x" * 16)]
