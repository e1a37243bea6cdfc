"""The lexer: line ends, literal announcements, tags, atoms, astrings, status codes."""

from __future__ import annotations

import pytest

from imapveil.protocol import lexer
from imapveil.protocol.lexer import (
    LiteralAnnouncement,
    LiteralError,
    capabilities,
    literal_at_end,
    read_astring,
    read_atom,
    split_tag,
    status_and_code,
    strip_eol,
)


@pytest.mark.parametrize(
    ("line", "body"),
    [(b"a NOOP\r\n", b"a NOOP"), (b"a NOOP\n", b"a NOOP"), (b"a NOOP", b"a NOOP"), (b"\r\n", b"")],
)
def test_strip_eol(line: bytes, body: bytes) -> None:
    assert strip_eol(line) == body


@pytest.mark.parametrize(
    ("line", "announced"),
    [
        (b"a LOGIN {5}\r\n", LiteralAnnouncement(5, True, False)),
        (b"a LOGIN {5+}\r\n", LiteralAnnouncement(5, False, False)),
        (b"a APPEND box ~{12}\r\n", LiteralAnnouncement(12, True, True)),
        (b"a APPEND box ~{0+}\n", LiteralAnnouncement(0, False, True)),
        (b"* 1 FETCH (BODY[] {1024}\r\n", LiteralAnnouncement(1024, True, False)),
        (b"a NOOP\r\n", None),
        (b"a NOOP }\r\n", None),
        (b"a X {}\r\n", None),
        (b"a X {+}\r\n", None),
        (b"a X {1a}\r\n", None),
        (b"a X {-1}\r\n", None),
        (b"a X {\xd9\xa3}\r\n", None),  # an Arabic-Indic digit is no digit here
    ],
)
def test_literal_at_end(line: bytes, announced: LiteralAnnouncement | None) -> None:
    assert literal_at_end(line) == announced


def test_literal_lengths_that_cannot_be_followed() -> None:
    assert literal_at_end(b"a X {" + b"1" * 19 + b"}\r\n") == LiteralAnnouncement(
        int("1" * 19), True, False
    )
    with pytest.raises(LiteralError, match="too many digits"):
        literal_at_end(b"a X {" + b"1" * 21 + b"}\r\n")
    with pytest.raises(LiteralError, match="too large"):
        literal_at_end(b"a X {" + b"9" * 20 + b"}\r\n")
    assert literal_at_end(b"a X {9223372036854775807}\r\n") == LiteralAnnouncement(
        2**63 - 1, True, False
    )


@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        (b"a1 OK done", (b"a1", b"OK done")),
        (b"A.2 NOOP", (b"A.2", b"NOOP")),
        (b" NOOP", None),
        (b"NOOP", None),
        (b"a{1 NOOP", None),  # "{" is no tag character
        (b"a* NOOP", None),
    ],
)
def test_split_tag(line: bytes, parsed: tuple[bytes, bytes] | None) -> None:
    assert split_tag(line) == parsed


def test_read_atom_stops_at_specials_and_the_limit() -> None:
    assert read_atom(b"FETCH 1:*", 0) == (b"FETCH", 5)
    assert read_atom(b"(FLAGS)", 0) == (b"", 0)
    assert read_atom(b"abcdef", 1, 3) == (b"bcd", 4)


@pytest.mark.parametrize(
    ("data", "parsed"),
    [
        (b"INBOX rest", (b"INBOX", 5)),
        (b'"My \\"box\\"" rest', (b'My "box"', 12)),
        (b'"a\\\\b"', (b"a\\b", 6)),
        (b'"unterminated', None),
        (b'"line\r\nbreak"', None),
        (b"{5}", None),
        (b"", None),
        (b"(list)", None),
    ],
)
def test_read_astring(data: bytes, parsed: tuple[bytes, int] | None) -> None:
    assert read_astring(data, 0) == parsed


@pytest.mark.parametrize(
    ("rest", "parsed"),
    [
        (b"OK [CAPABILITY IMAP4rev1 IDLE] ready", ("OK", "CAPABILITY", b"IMAP4rev1 IDLE")),
        (b"no [alert] careful", ("NO", "ALERT", b"")),
        (b"BAD syntax", ("BAD", None, b"")),
        (b"PREAUTH [] odd", ("PREAUTH", None, b"")),
        (b"OK [UNCLOSED x", ("OK", "UNCLOSED", b"")),
        (b"FETCH (FLAGS)", (None, None, b"")),
    ],
)
def test_status_and_code(rest: bytes, parsed: tuple[str | None, str | None, bytes]) -> None:
    assert status_and_code(rest) == parsed


def test_capabilities_are_upper_cased_and_bounded() -> None:
    assert capabilities(b"imap4rev1 IDLE auth=PLAIN\r\n") == {"IMAP4REV1", "IDLE", "AUTH=PLAIN"}
    assert capabilities(b"X" * 129 + b" IDLE") == {"IDLE"}


def test_capability_lists_are_shared_between_sessions_and_the_cache_is_bounded() -> None:
    line = b"IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN\r\n"
    first = capabilities(line)
    assert capabilities(bytes(line)) is first  # one parse, shared (a frozenset: immutable)
    assert capabilities(line.lower()) == first  # equal input, equal answer, cached or not
    for i in range(3 * lexer.CAPABILITY_CACHE_SIZE):  # a server sending ever new lists
        assert capabilities(b"IMAP4rev1 X-%d\r\n" % i) == {"IMAP4REV1", f"X-{i}"}
    assert lexer._cached_capabilities.cache_info().currsize <= lexer.CAPABILITY_CACHE_SIZE
    assert capabilities(line) == first  # evicted meanwhile: parsed again, the same
    long = b" ".join(b"X%05d" % i for i in range(lexer.CAPABILITY_CACHE_TEXT // 6 + 1))
    before = lexer._cached_capabilities.cache_info()
    # Parsed, not kept in the cache; its first MAX_CAPABILITIES names (round 15).
    assert len(capabilities(long)) == min(lexer.CAPABILITY_CACHE_TEXT // 6 + 1, 256)
    assert len(long) > lexer.CAPABILITY_CACHE_TEXT
    assert lexer._cached_capabilities.cache_info() == before  # not even looked up
