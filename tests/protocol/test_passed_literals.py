"""Literal octets the shell relays itself (splice): `server_literal_left`/`passed_server` and
`client_literal_left`/`passed_client`.

Each scenario runs twice on the same bytes, split the same way: once fed as always, once as the
splicing shell does it (before every receive it asks how many literal octets nothing needs to
read, passes up to that many itself and only tells the core how many). Both must end with the
same bytes on each side, the same records and the same counts; and the splicing run must really
have passed octets where the scenario expects it, and none where the core must see them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from itertools import cycle
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imapveil.policy_files import resolve_policy
from imapveil.protocol.actions import Direction, Forward
from imapveil.records import CommandCompleted, SessionEnded
from tests.helpers import feeding
from tests.helpers.feeding import Conversation, Splitter, splitting_at

GREETING = b"* OK [CAPABILITY IMAP4rev1 LITERAL+ ID IDLE AUTH=PLAIN] ready\r\n"
talk = partial(feeding.talk, greeting=GREETING, identify_user=lambda user: "user:" + user.decode())

BODY = bytes(range(256)) * 40 + b"\r\na2 OK not a line\r\n* 1 FETCH {3}\r\n"  # 10 KiB and a trap
LOGIN = [("c", b"a1 LOGIN alice secret\r\n"), ("s", b"a1 OK logged in\r\n")]
FETCH = [
    ("c", b"a2 FETCH 1:3 (UID BODY[HEADER] BODY[TEXT])\r\n"),
    ("s", b"* 1 FETCH (UID 7 BODY[HEADER] {%d}\r\n%s BODY[TEXT] {0}\r\n)\r\n" % (len(BODY), BODY)),
    ("s", b"* 2 FETCH (UID 8 BODY[HEADER] {5}\r\nabcde BODY[TEXT] {%d}\r\n" % len(BODY)),
    ("s", BODY + b")\r\n* 3 FETCH (UID 9 BODY[HEADER] {1}\r\nx BODY[TEXT] NIL)\r\n"),
    ("s", b"a2 OK done\r\n"),
]
APPEND = [
    ("c", b"a3 APPEND INBOX (\\Seen) {%d}\r\n" % len(BODY)),
    ("s", b"+ go ahead\r\n"),
    ("c", BODY + b"\r\n"),
    ("s", b"a3 OK [APPENDUID 1 9] done\r\n"),
]
# LITERAL+: the client sends the body at once; the core holds it until the server's "+".
APPEND_PLUS = [
    ("c", b"a4 APPEND INBOX {%d+}\r\n%s" % (len(BODY), BODY[:3000])),
    ("s", b"+ go ahead\r\n"),
    ("c", BODY[3000:] + b" {4+}\r\nmore\r\n"),
    ("s", b"+ again\r\n"),
    ("s", b"a4 OK [APPENDUID 1 10] done\r\n"),
]
LOGOUT = [("c", b"a9 LOGOUT\r\n"), ("s", b"* BYE bye\r\na9 OK bye\r\n")]


@dataclass
class Passed:
    """What the splicing run passed itself, per side."""

    client: int = 0
    server: int = 0


def splice_feed(conv: Conversation, side: str, data: bytes, sizes: Iterator[int]) -> int:
    """Feed `data` from one side as the splicing shell does; returns the octets passed."""
    core = conv.core
    passed = pos = 0
    conv.clock += 0.001
    while pos < len(data):
        size = min(next(sizes), len(data) - pos)
        left = core.server_literal_left() if side == "s" else core.client_literal_left()
        if left:
            n = min(left, size)
            if side == "s":
                core.passed_server(n, conv.clock)
                conv.apply([Forward(Direction.TO_CLIENT, data[pos : pos + n])])
            else:
                core.passed_client(n, conv.clock)
                conv.apply([Forward(Direction.TO_SERVER, data[pos : pos + n])])
            passed += n
        else:
            n = size
            feed = core.feed_server if side == "s" else core.feed_client
            conv.apply(feed(data[pos : pos + n], conv.clock))
        pos += n
    return passed


def both_ways(
    steps: list[tuple[str, bytes]], split: Splitter, end: str = "client", **config: Any
) -> tuple[Conversation, Conversation, Passed]:
    """The scenario fed as always, and as the splicing shell does, with the same cuts."""
    fed, spliced, passed = talk(split, **config), talk(split, **config), Passed()
    for side, data in steps:
        fed.clock += 0.001
        (fed.client if side == "c" else fed.server)(data)
        sizes = cycle([len(chunk) for chunk in split(data)] or [1])
        moved = splice_feed(spliced, side, data, sizes)
        if side == "c":
            passed.client += moved
        else:
            passed.server += moved
    for conv in (fed, spliced):
        {"finish": conv.finish, "client": conv.client_closes, "server": conv.server_closes}[end]()
    return fed, spliced, passed


def assert_same(fed: Conversation, spliced: Conversation) -> None:
    assert bytes(spliced.to_client) == bytes(fed.to_client)
    assert bytes(spliced.to_server) == bytes(fed.to_server)
    assert spliced.records == fed.records
    assert spliced.closed == fed.closed
    assert spliced.core.bytes_from_client == fed.core.bytes_from_client == len(fed.from_client)
    assert spliced.core.bytes_from_server == fed.core.bytes_from_server == len(fed.from_server)
    assert repr(spliced.core) == repr(fed.core)


def test_fetch_literals_passed_by_the_shell_count_as_fed(split: Splitter) -> None:
    fed, spliced, passed = both_ways(LOGIN + FETCH + LOGOUT, split)
    assert_same(fed, spliced)
    # Literal octets, and nothing else, were passed: those after the chunk that announced
    # them (fed whole: the second body, which came in a chunk of its own; byte by byte: all).
    literal_octets = 2 * len(BODY) + 5 + 1
    assert len(BODY) <= passed.server <= literal_octets
    if split is feeding.whole:
        assert passed.server == len(BODY)
    if split is feeding.byte_by_byte:
        assert passed.server == literal_octets
    assert passed.client == 0
    fetch = [r for r in spliced.of(CommandCompleted) if r.verb == "FETCH"]
    assert [(r.status, r.literals) for r in fetch] == [("OK", ())]
    assert spliced.ended().reason == "logout"


SEARCH = [
    ("c", b"a5 SEARCH TEXT {%d}\r\n" % len(BODY)),
    ("s", b"+ go ahead\r\n"),
    ("c", BODY + b"\r\n"),
    ("s", b"* SEARCH\r\na5 OK done\r\n"),
]


def test_a_client_literal_a_line_could_hold_is_never_passed(split: Splitter) -> None:
    """Read whole before its command ends (a string Dovecot would echo with its line ends,
    `Commands.literal_done`: BODY has some, the session ends at it, however it was cut); APPEND's
    message is not (the literal above). A `max_line` below Dovecot's line limit does not make
    such a literal pass (`ECHO_SCAN`); one longer than both does (Dovecot refuses it)."""
    for max_line in (64 * 1024, len(BODY) - 1):
        fed, spliced, passed = both_ways(LOGIN + SEARCH + LOGOUT, split, max_line=max_line)
        assert_same(fed, spliced)
        assert passed.client == 0
        assert fed.closed and fed.ended().reason == "protocol_error"
        assert bytes(fed.to_server).endswith(BODY)  # the literal went, nothing after it
    big = BODY * 7
    search = [("c", b"a5 SEARCH TEXT {%d}\r\n" % len(big)), SEARCH[1], ("c", big + b"\r\n")]
    fed, spliced, passed = both_ways(LOGIN + search + SEARCH[3:] + LOGOUT, split, max_line=1024)
    assert_same(fed, spliced)
    assert passed.client > 0


def test_append_literal_after_the_servers_continuation(split: Splitter) -> None:
    fed, spliced, passed = both_ways(LOGIN + APPEND + LOGOUT, split)
    assert_same(fed, spliced)
    assert 0 < passed.client <= len(BODY)
    if split is feeding.whole:
        assert passed.client == len(BODY)
    (append,) = [r for r in spliced.of(CommandCompleted) if r.verb == "APPEND"]
    assert (append.status, append.literals) == ("OK", (len(BODY),))


def test_literal_plus_octets_sent_ahead_are_never_passed_before_the_continuation(
    split: Splitter,
) -> None:
    conv = talk(split)
    for side, data in LOGIN:
        (conv.client if side == "c" else conv.server)(data)
    conv.client(APPEND_PLUS[0][1])
    # Parked behind the LITERAL gate: nothing may bypass it.
    assert conv.core.client_literal_left() == 0
    assert not conv.to_server.endswith(BODY[:3000])
    conv.server(b"+ go ahead\r\n")
    assert conv.core.client_literal_left() == len(BODY) - 3000
    fed, spliced, passed = both_ways(LOGIN + APPEND_PLUS + LOGOUT, split)
    assert_same(fed, spliced)
    assert len(BODY) - 3000 <= passed.client <= len(BODY) - 3000 + 4


def test_server_closing_mid_literal_ends_alike(split: Splitter) -> None:
    steps = [*LOGIN, ("c", b"a2 FETCH 1 BODY[]\r\n"), ("s", b"* 1 FETCH (BODY[] {99999}\r\n")]
    steps.append(("s", BODY))
    fed, spliced, passed = both_ways(steps, split, end="server")
    assert_same(fed, spliced)
    end = spliced.ended()
    assert (end.reason, end.detail) == ("server_closed", "mid_literal")
    assert passed.server > 0


def test_client_closing_mid_literal_ends_alike(split: Splitter) -> None:
    steps = [*LOGIN, ("c", b"a3 APPEND INBOX {99999}\r\n"), ("s", b"+ ok\r\n"), ("c", BODY)]
    fed, spliced, passed = both_ways(steps, split, end="client")
    assert_same(fed, spliced)
    assert (spliced.ended().reason, spliced.ended().detail) == ("client_closed", "mid_literal")
    assert passed.client > 0


@pytest.mark.parametrize(
    "steps",
    [
        # A literal user name: its start is kept for the record.
        [("c", b"a1 LOGIN {5}\r\n"), ("s", b"+ ok\r\n"), ("c", b"alice secret\r\n")],
        # An ID's literal is collected and rewritten, never forwarded as it came.
        [*LOGIN, ("c", b'a2 ID ("name" {5+}\r\n'), ("c", b'Mutt! "os" "x")\r\n')],
        [*LOGIN, ("c", b'a2 ID ("name" {5}\r\n'), ("c", b'Mutt! "os" "x")\r\n')],
        # A refused command's literal is skipped.
        [*LOGIN, ("c", b'a2 NOOP "x ~{5+}\r\n'), ("c", b"hello\r\n")],
        # A SELECT's mailbox name is kept.
        [*LOGIN, ("c", b"a2 SELECT {5}\r\n"), ("s", b"+ ok\r\n"), ("c", b"INBOX\r\n")],
    ],
    ids=["login-user", "id-plus", "id", "refused", "select"],
)
def test_literals_the_core_must_read_are_never_offered(
    steps: list[tuple[str, bytes]], split: Splitter
) -> None:
    policy = resolve_policy("default")
    fed, spliced, passed = both_ways(steps, split, policy=lambda: policy, hash_value=lambda v: "h")
    assert_same(fed, spliced)
    assert passed.client == 0


def test_passing_more_than_offered_is_refused() -> None:
    conv = talk(feeding.whole)
    with pytest.raises(ValueError, match="passed"):
        conv.core.passed_server(1, conv.clock)
    with pytest.raises(ValueError, match="passed"):
        conv.core.passed_client(1, conv.clock)
    conv.client(b"a1 LOGIN alice x\r\n").server(b"a1 OK ok\r\n* 1 FETCH (BODY[] {10}\r\n")
    assert conv.core.server_literal_left() == 10
    with pytest.raises(ValueError, match="passed"):
        conv.core.passed_server(11, conv.clock)
    conv.apply(conv.core.server_closed(conv.clock))
    assert conv.core.server_literal_left() == 0  # closed: nothing more is relayed


@given(
    cuts=st.lists(st.integers(0, 40_000), max_size=12),
    scenario=st.sampled_from(["fetch", "append", "append_plus"]),
)
def test_any_cuts_give_the_same_session(cuts: list[int], scenario: str) -> None:
    steps = {"fetch": FETCH, "append": APPEND, "append_plus": APPEND_PLUS}[scenario]
    fed, spliced, _ = both_ways(LOGIN + steps + LOGOUT, splitting_at(cuts))
    assert_same(fed, spliced)
    assert spliced.of(SessionEnded) == fed.of(SessionEnded)
