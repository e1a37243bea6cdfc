"""The strict line classifier: what it reads, what it refuses, and why."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imapveil.protocol import classify


@pytest.mark.parametrize(
    "line",
    [
        b"a NOOP",
        b"a001 LOGIN alice wonderland",
        b'a LOGIN "al\\"ice" "p\\\\w"',
        b"a UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (FROM TO)]<0.100>)",
        b"a STORE 1 +FLAGS.SILENT (\\Seen \\Answered $Junk)",
        b'a LIST "" %',
        b'a LIST "" *',
        b"a APPEND INBOX (\\Seen) {5+}",
        b"a APPEND INBOX ~{5}",
        b'a SEARCH CHARSET UTF-8 TEXT "h\xc3\xa9llo"',  # UTF-8 inside quotes (RFC 6855)
        b"a X-UNKNOWN-EXTENSION foo (bar) baz",
        b"a" * 126 + b" NOOP",  # as long a tag as Dovecot's login process takes
        b"a ENABLE QRESYNC",
        b"a ID NIL",
    ],
)
def test_well_formed_lines_are_read(line: bytes) -> None:
    parsed = classify.first_fragment(line)
    assert parsed.fragment.problem is None
    assert parsed.tag is not None


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b"", "tag"),
        (b"(((", "tag"),
        (b"a+b NOOP", "tag"),  # "+" is not a tag character
        (b"a]b NOOP", "tag"),  # nor "]" for Dovecot (an untagged BAD: never answered)
        (b"a" * 127 + b" NOOP", "tag"),  # longer than Dovecot's login process takes
        (b"a", "no_command"),
        (b"a 123", "command_name"),
        (b"a NOOP \x00", "nul"),
        (b"a NOOP \r x", "bare_cr"),
        (b"a NOOP \x07", "control"),
        (b"a LOGIN caf\xc3\xa9 x", "eight_bit"),
        (b'a LOGIN "x {5+}', "unterminated_quoted"),
        (b'a SELECT "x\\qy"', "quoted_escape"),
        (b'a SELECT "x\ty"', "quoted_control"),
        (b"a NOOP {5} x", "brace"),
        (b"a NOOP ) {5+}", "unbalanced_list"),
        (b"a NOOP {123456789012345678901}", "literal_length"),
        (b"a IDLE {5+}", "literal_not_allowed"),  # its "+ idling" is no "+" for a literal
        (b"a AUTHENTICATE PLAIN {5}", "literal_not_allowed"),
    ],
)
def test_unreadable_lines_say_why(line: bytes, problem: str) -> None:
    assert classify.first_fragment(line).fragment.problem == problem


def test_a_refused_line_still_reports_its_literal() -> None:
    # The client will send a LITERAL+ literal's octets anyway: the proxy must skip them.
    frag = classify.first_fragment(b'a LOGIN "x {12+}').fragment
    assert frag.problem == "unterminated_quoted"
    assert frag.literal is not None
    assert (frag.literal.size, frag.literal.synchronizing) == (12, False)


def test_list_depth_is_followed_across_fragments() -> None:
    first = classify.first_fragment(b"a APPEND INBOX CATENATE (TEXT {3}").fragment
    assert (first.problem, first.depth) == (None, 1)
    rest = classify.fragment(b' URL "/x;UID=1")', 0, first.depth)
    assert (rest.problem, rest.depth, rest.literal) == (None, 0, None)
    # Parentheses inside quoted strings do not count.
    assert classify.fragment(b' "(" ")" "))"', 0, 0).depth == 0


def test_uid_commands_are_named_with_their_subcommand() -> None:
    assert classify.first_fragment(b"a uid fetch 1 FLAGS").verb == b"UID FETCH"


def test_values_unescape_quoted_strings_and_mark_lists() -> None:
    content = classify.first_fragment(b'a LOGIN "a\\"b" (x) c').fragment.content
    assert classify.values(content) == [b'a"b', None, b"x", None]


@given(st.binary(max_size=300))
def test_arbitrary_octets_are_classified_without_raising(data: bytes) -> None:
    line = data.replace(b"\n", b"")
    parsed = classify.first_fragment(line)
    if parsed.fragment.problem is None:
        assert parsed.tag is not None
        # Nothing the classifier accepts carries a NUL, a CR, or 8-bit octets outside quotes.
        assert b"\x00" not in line
        assert b"\r" not in line


def test_hostile_long_lines_are_one_pass() -> None:
    # Shapes that make a backtracking matcher take quadratic or exponential time. The patterns
    # are possessive; this only checks that they give the right answer on 64 KiB inputs.
    n = 64 * 1024
    assert classify.fragment(b" " * n + b"\x00", 0, 0).problem == "nul"
    assert classify.fragment(b'"' + b"a" * n, 0, 0).problem == "unterminated_quoted"
    assert classify.fragment(b'"' + b"\\\\" * (n // 2), 0, 0).problem == "unterminated_quoted"
    assert classify.fragment(b"(" * n, 0, 0).depth == n
    assert classify.fragment(b"a" * n + b"\xff", 0, 0).problem == "eight_bit"


@pytest.mark.parametrize(
    ("name", "refused"),
    [
        (b"x&AAo-+ y", True),  # LF
        (b"x&AA0ACg-", True),  # CR LF
        (b"&AGEAYQBhAGEAYQBhAGEACg-", True),  # the LF after six letters
        (b"&AAoA-", True),  # LF and a partial unit
        (b"&AAoAA-", True),  # LF and a lone sextet (Dovecot refuses it, as the proxy does)
        (b"&AH8-", True),  # DEL
        (b"&AAA-", True),  # NUL
        (b"caf&AOk-", False),
        (b"&AOkA6QDp-", False),
        (b"&-", False),  # "&" itself
        (b"a&b-c", False),  # no valid run
    ],
)
def test_a_modified_utf7_run_that_decodes_to_a_control_is_refused(
    name: bytes, refused: bool
) -> None:
    """Dovecot writes a decoded mailbox name into its answers as it is (tests/relay/
    test_attack_round13.py): a line end in it makes lines of the client's choosing."""
    for body in (b"a SELECT " + name, b'a STATUS "' + name + b'" (MESSAGES)'):
        problem = classify.first_fragment(body).fragment.problem
        assert problem == ("shifted_control" if refused else None), body
