"""The core's one-match paths (`Commands.simple`, `Responses.simple`) decide exactly as the
general ones: generated sessions, fed to a core with them and one without, give the same actions
(octet for octet), the same records and the same state after every chunk. The generator leans on
near misses: tags with characters no tag may have, verbs in other cases or with arguments, other
line ends, answers with codes, lower-case or unknown statuses, reused and unknown tags."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imapveil.policy_files import resolve_policy
from imapveil.protocol import lexer, responses
from imapveil.protocol.actions import Action, Direction, Forward
from imapveil.protocol.commands import Commands
from imapveil.protocol.responses import Responses
from imapveil.protocol.session import CoreConfig, SessionCore, State
from imapveil.records import CommandCompleted

GREETING = b"* OK [CAPABILITY IMAP4rev1 LITERAL+ IDLE ID] ready\r\n"


class GeneralCore(SessionCore):
    """The core without its one-match paths."""

    __slots__ = ()
    SIMPLE = False


_valid_tags = st.sampled_from([b"a1", b"A0001", b"x]", b"7", b"a.b-c_d", b"imapveil.1"])
tags = st.one_of(_valid_tags, _valid_tags, _valid_tags, st.binary(min_size=0, max_size=4))
_simple = st.sampled_from(
    [
        *(b"NOOP", b"noop", b"Check", b"CLOSE", b"UNSELECT", b"EXPUNGE", b"NAMESPACE", b"LOGOUT"),
        *(b"FETCH 1:* (FLAGS UID)", b"uid fetch 1 (FLAGS)", b"STORE 1 +FLAGS (\\Flagged)"),
        *(
            b"FETCH 1 ()",
            b"UID SEARCH ALL",
            b"SEARCH MODSEQ 5",
            b"FETCH 1 (FLAGS) (CHANGEDSINCE 3)",
        ),
        *(b"UID EXPUNGE 1:3", b"NOOP x", b"LIST x %", b"STATUS INBOX (MESSAGES UIDNEXT)"),
        *(b"SELECT INBOX", b"examine Drafts", b"SELECT INBOX (CONDSTORE)", b"SELECT", b"EXAMINE"),
        *(b"SELECT a b", b"SELECT INBOX (QRESYNC (1 2))", b'SELECT "a b"', b"SELECT {3}"),
        *(b"IDLE", b"idle", b"IDLE x", b"IDLE ", b"DONE", b"done"),
    ]
)
_near_misses = st.sampled_from(
    [
        *(b"FETCH 1 (a (b))", b'FETCH "x"', b"FETCH 1  2", b"UID 1", b"UID  FETCH 1", b"FETCH 1 ("),
        *(
            b"FETCH 1 )",
            b"FETCH 1 )(",
            b"FETCH1 x",
            b"FETCH.x 1",
            b"ENABLE CONDSTORE",
            b"FETCH \x80",
        ),
        *(b"FETCH 1 BODY[HEADER.FIELDS (FROM)]", b"UID FETCH 1 (FLAGS", b"COPY 1 {3}", b"SEARCH }"),
    ]
)
_others = st.sampled_from(
    [
        b"CAPABILITY",
        b"IDLE",
        b"NOOPS",
        b"NOP",
        b"NOOP x",
        b"NOOP ",
        b"NOOP {3}",
        b"NOOP {3+}",
        b"SELECT INBOX",
        b'EXAMINE "a b"',
        b"UID FETCH 1:* FLAGS",
        b"LOGIN u p",
        b"ID NIL",
        b"STARTTLS",
        b"DONE",
    ]
)
verbs = st.one_of(_simple, _others, _near_misses)
ends = st.sampled_from([b"\r\n"] * 6 + [b"\n", b"\r\r\n", b"", b" \r\n", b"\x00\r\n"])
statuses = st.sampled_from([b"OK", b"NO", b"BAD", b"ok", b"BYE", b"PREAUTH", b"OKAY", b""])
texts = st.sampled_from(
    [
        b"",
        b" done",
        b" NOOP completed (0.001 + 0.000 secs).",
        b" [READ-WRITE] x",
        b"  [x] y",
        b" [CAPABILITY IMAP4rev1 IDLE]",
        b" a\rb",
        b" \x00",
        b" [",
    ]
)


_untagged = st.sampled_from(
    [
        b"* 3 EXISTS\r\n",
        b"* 1 FETCH (FLAGS (\\Seen) UID 7)\r\n",
        b"* 2 FETCH (X {3})\r\n",
        b"* 1 FETCH (BODY[] {3}\r\nabc)\r\n",
        b"* 1 FETCH (BODY[] {3}\nabc)\r\n",
        b"* 1 X}\r\r\n",
        b"* 1 FETCH (BODY[] {2}",
        b"* 4 EXPUNGE\n",
        b"* BYE x\r\n",
        b"* BYE Logging out\r\n",
        b"* BYE [ALERT] going\r\n",
        b"* BYE [CAPABILITY IMAP4rev1] going\r\n",
        b"* bye x\r\n",
        b"* BYE\r\n",
        b"* OK hi\r\n",
        b"* x\r\n",
        b"* SEARCH 1 2 3\r\n",
        b"* SEARCH\r\n",
        b"* SEARCH {3}\r\n",
        b"* FLAGS (\\Seen \\Answered)\r\n",
        b'* LIST () "/" {5}\r\n',
        b'* ID ("name" "Dovecot")\r\n',
        b"* CAPABILITY IMAP4rev1 MOVE\r\n",
        b"* ok fine\r\n",
        b"* OK [UIDNEXT 5] next\r\n",
        b"* NO [ALERT] careful\r\n",
        b"* BAD what\r\n",
        b"* OK [PERMANENTFLAGS (\\Seen \\*)] ok\r\n",
        b"* OK [CAPABILITY IMAP4rev1 QUOTA] z\r\n",
        b"* OK [capability IMAP4rev1 X] z\r\n",
        b"* OK [CAPABILITYX] z\r\n",
        b"* PREAUTH [ALERT] z\r\n",
        b"* OK [CLOSED] Previous mailbox closed.\r\n",
        b"* OK [closed] x\r\n",
        b"* OK [CLOSEDX] x\r\n",
        b"* NO [CLOSED] x\r\n",
    ]
)


@st.composite
def client_chunk(draw: st.DrawFn, sent: list[bytes]) -> bytes:
    lines = []
    for _ in range(draw(st.integers(1, 2))):
        tag = draw(tags)
        sent.append(tag)
        lines.append(tag + b" " + draw(verbs) + draw(ends))
    return b"".join(lines)


@st.composite
def server_chunk(draw: st.DrawFn, sent: list[bytes]) -> bytes:
    lines = []
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3, 4]))):
        kind = draw(st.integers(0, 5))
        if kind == 0:
            lines.append(b"+ go\r\n")
        elif kind == 1:
            lines.append(draw(_untagged))
        else:
            tag = draw(st.sampled_from(sent)) if sent and kind < 5 else draw(tags)
            lines.append(tag + b" " + draw(statuses) + draw(texts) + draw(ends))
    return b"".join(lines)


def _seen(actions: list[Action]) -> list[Any]:
    return [
        (type(a).__name__, a.direction, bytes(a.data)) if isinstance(a, Forward) else a
        for a in actions
    ]


def _state(core: SessionCore) -> tuple[Any, ...]:
    commands = core._commands
    return (
        core.state,
        core.mailbox,
        core.user,
        core.commands,
        core.closed,
        core.held,
        core.wants_client_data,
        core.capabilities,
        core._responses.bye_seen,
        commands.mode,
        commands.gate,
        [(c.tag, c.verb, c.state, c.started) for c in commands.unanswered()],
        core._traits.record(core.session_id, core.capabilities),
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_simple_paths_decide_as_the_general_ones(data: st.DataObject) -> None:
    # With an ID of the proxy's own before LOGIN, its answer (tag `imapveil.1`) is the proxy's.
    inject = ((b"name", b"imapveil"),) if data.draw(st.booleans()) else ()
    cores = [
        kind(CoreConfig(inject_id=inject), session_id="s", client="c", upstream="u", now=0.0)
        for kind in (SessionCore, GeneralCore)
    ]
    sent: list[bytes] = []
    steps = [("s", GREETING)]
    if data.draw(st.booleans()):
        steps.append(("c", b"l LOGIN u p\r\n"))
        sent += [b"imapveil.1", b"l"] if inject else [b"l"]
    for _ in range(data.draw(st.integers(1, 12))):
        side = data.draw(st.sampled_from("cs"))
        chunk = data.draw(client_chunk(sent) if side == "c" else server_chunk(sent))
        steps.append((side, chunk))
    for i, (side, chunk) in enumerate(steps):
        now = float(i)
        seen = [
            _seen(core.feed_client(chunk, now) if side == "c" else core.feed_server(chunk, now))
            for core in cores
        ]
        assert seen[0] == seen[1], (side, chunk)
        assert _state(cores[0]) == _state(cores[1]), (side, chunk)
    ends = [_seen(core.finish(99.0)) for core in cores]
    assert ends[0] == ends[1]


POLICY = resolve_policy("default")

SCENARIOS = {
    "injected ID answered": [
        ("c", b"l LOGIN u p\r\n"),
        ("s", b"imapveil.1 OK done\r\n"),
        ("s", b"l OK done\r\n"),
    ],
    "client parked behind a literal the server refuses": [
        ("c", b"l LOGIN u p\r\n"),
        ("s", b"l OK done\r\n"),
        ("c", b"a NOOP {3}\r\nb NOOP\r\n"),
        ("s", b"a NO no literal here\r\n"),
        ("s", b"b OK done\r\n"),
    ],
    "literal octets that look like a command": [
        ("c", b"l LOGIN {8}\r\n"),
        ("s", b"+ go\r\n"),
        ("c", b"b NOOP\r\n"),
        ("c", b" p\r\n"),
        ("s", b"l OK done\r\n"),
    ],
    "a SASL response that looks like a command": [
        ("c", b"a AUTHENTICATE PLAIN\r\n"),
        ("s", b"+ \r\n"),
        ("c", b"x NOOP\r\n"),
        ("s", b"a NO bad\r\n"),
    ],
    "IDLE then a command where DONE must be": [
        ("c", b"l LOGIN u p\r\n"),
        ("s", b"l OK done\r\n"),
        ("c", b"i IDLE\r\n"),
        ("s", b"+ idling\r\n"),
        ("c", b"x NOOP\r\n"),
    ],
    "an answer after a server literal": [
        ("c", b"l LOGIN u p\r\n"),
        ("s", b"l OK done\r\n"),
        ("c", b"f FETCH 1 BODY[]\r\n"),
        ("s", b"* 1 FETCH (BODY[] {12}\r\n"),
        ("s", b"f OK done\r\n"),
        ("s", b")\r\nf OK done\r\n"),
    ],
    "a line that goes on with a response after its literal": [
        ("c", b"l LOGIN u p\r\n"),
        ("s", b"l OK done\r\n"),
        ("c", b"f FETCH 1 BODY[]\r\n"),
        ("s", b"* 1 FETCH (BODY[] {3}\r\nabc"),
        ("s", b"f OK done\r\n"),
        ("s", b"f OK done\r\n"),
    ],
    "closing after a refusal that waits for the server's answer to end": [
        ("c", b"l LOGIN u p\r\n"),
        ("s", b"l OK done\r\n"),
        ("c", b"f FETCH 1 BODY[]\r\n"),
        ("s", b"* 1 FETCH (BODY[] {10}\r\nab"),
        ("c", b'b NOOP "x {3}\r\n'),
        ("c", b"c NOOP\r\n"),
        ("s", b"cdefghij)\r\nf OK done\r\n"),
    ],
    "a tagged answer inside a literal": [
        ("c", b"l LOGIN u p\r\n"),
        ("s", b"l OK done\r\n"),
        ("c", b"f FETCH 1 BODY[]\r\n"),
        ("s", b"* 1 FETCH (BODY[] {11}\r\nf OK done\r\n"),
        ("s", b")\r\nf OK done\r\n"),
    ],
    "untagged status and capability lines before an answer": [
        ("c", b"l LOGIN u p\r\n"),
        ("s", b"* CAPABILITY IMAP4rev1 IDLE MOVE\r\n* 2 EXISTS\r\nl OK done\r\n"),
        ("c", b"n NOOP\r\n"),
        ("s", b"* OK [ALERT] mind\r\n* 3 EXISTS\r\nn OK done\r\n"),
        ("c", b"p NOOP\r\n"),
        ("s", b"* OK [CAPABILITY IMAP4rev1 QUOTA] more\r\np OK done\r\n"),
        ("c", b"q NOOP\r\n"),
        ("s", b"* OK [UIDNEXT 4] next\r\nq OK [CAPABILITY IMAP4rev1 MOVE] done\r\n"),
        ("c", b"r NOOP\r\n"),
        ("s", b"* OK [Capability IMAP4rev1 X] more\r\nr OK [READ-WRITE] done\r\n"),
        ("c", b"o NOOP\r\n"),
        ("s", b"* 4 EXISTS\r\n* BYE going away\r\no OK done\r\n"),
    ],
    "a simple command longer than the line limit": [
        ("c", b"l LOGIN u p\r\n"),
        ("s", b"l OK done\r\n"),
        ("c", b"a" * (64 * 1024) + b" NOOP\r\n"),
    ],
    "commands the general path treats specially, in simple shapes": [
        ("c", b"l LOGIN u p\r\n"),
        ("s", b"l OK done\r\n"),
        ("c", b"s SELECT INBOX\r\n"),
        ("s", b"s OK done\r\n"),
        ("c", b"e EXAMINE Other\r\n"),
        ("s", b"e OK done\r\n"),
        ("c", b"m LOGIN v q\r\n"),
        ("s", b"m OK done\r\n"),
        ("c", b"i ID NIL\r\n"),
        ("s", b"* ID NIL\r\ni OK done\r\n"),
        ("c", b"j ID (name x guid 8f14e45fceea167a5a36dedd4bea2543)\r\n"),
        ("s", b"* ID NIL\r\nj OK done\r\n"),
        ("c", b"k ID NIL\r\n"),
        ("s", b'* ID ("name" "Dovecot" "version" "2.3")\r\nk OK done\r\n'),
        ("c", b"c COMPRESS DEFLATE\r\n"),
        ("c", b"d IDLE\r\n"),
        ("s", b"+ idling\r\n"),
    ],
    "a refused LITERAL+ whose literal is too large to skip": [
        ("c", b"l LOGIN u p\r\n"),
        ("s", b"imapveil.1 OK done\r\n"),
        ("s", b"l OK done\r\n"),
        ("c", b"a APPEND X {70000000+}\r\n"),
        ("s", b"a NO no\r\n"),  # a one-match answer that leaves a BYE owed, and the close
        ("c", b"abc"),
    ],
    "shutting down mid-response": [
        ("c", b"l LOGIN u p\r\n"),
        ("s", b"l OK done\r\n"),
        ("c", b"f FETCH 1 BODY[]\r\n"),
        ("s", b"* 1 FETCH (BODY[] {3}\r\n"),
        ("shutdown", b""),
        ("s", b"abc)\r\n"),
        ("s", b"f OK done\r\n"),
    ],
    "a SELECT answered BAD after the mailbox closed": [
        ("c", b"l LOGIN u p\r\n"),
        ("s", b"imapveil.1 OK done\r\n"),
        ("s", b"l OK done\r\n"),
        ("c", b"s SELECT INBOX\r\n"),
        ("s", b"* 1 EXISTS\r\ns OK [READ-WRITE] done\r\n"),
        ("c", b"t SELECT INBOX (FOO)\r\n"),
        ("s", b"* OK [CLOSED] Previous mailbox closed.\r\nt BAD Unknown FETCH modifier\r\n"),
        ("c", b"u NOOP\r\n"),
    ],
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_edges_of_the_one_match_paths(name: str) -> None:
    """Where a chunk looks simple but the session is not at a simple point, the two cores agree
    (each of these fails if the check that guards it is taken out of the one-match path)."""
    cores = [
        kind(
            CoreConfig(
                inject_id=((b"name", b"imapveil"),),
                policy=lambda: POLICY,
                identify_user=lambda user: "user:" + user.decode(),
            ),
            session_id="s",
            client="c",
            upstream="u",
            now=0.0,
        )
        for kind in (SessionCore, GeneralCore)
    ]
    for i, (side, chunk) in enumerate([("s", GREETING), *SCENARIOS[name]]):
        now = float(i)
        seen = []
        for core in cores:
            if side == "shutdown":
                seen.append(_seen(core.shutting_down(now)))
            else:
                feed = core.feed_client if side == "c" else core.feed_server
                seen.append(_seen(feed(chunk, now)))
        assert seen[0] == seen[1], (side, chunk)
        assert _state(cores[0]) == _state(cores[1]), (side, chunk)


@pytest.mark.parametrize("kind", [SessionCore, GeneralCore])
def test_a_closed_mailbox_is_no_longer_selected(kind: type[SessionCore]) -> None:
    """Dovecot closes the selected mailbox for a SELECT it answers BAD once it has read the
    name (`SELECT INBOX (FOO)`), and says so (`* OK [CLOSED]`): the commands after it are in
    the authenticated state, whichever path read the answer (attack7: the BAD alone left the
    state `selected`)."""
    core = kind(CoreConfig(), session_id="s", client="c", upstream="u", now=0.0)
    steps = [
        ("s", GREETING),
        ("c", b"l LOGIN u p\r\n"),
        ("s", b"l OK done\r\n"),
        ("c", b"s SELECT INBOX\r\n"),
        ("s", b"* 1 EXISTS\r\ns OK [READ-WRITE] done\r\n"),
        ("c", b"t EXAMINE INBOX (QRESYNC (1 2))\r\n"),
        ("s", b"* OK [CLOSED] Previous mailbox closed.\r\nt BAD QRESYNC not enabled\r\n"),
    ]
    for side, chunk in steps:
        (core.feed_client if side == "c" else core.feed_server)(chunk, 1.0)
    assert (core.state, core.mailbox) == (State.AUTHENTICATED, None)
    # A SELECT that succeeds after closing the previous mailbox selects its own.
    core.feed_client(b"v SELECT Drafts\r\n", 2.0)
    core.feed_server(b"* OK [CLOSED] x\r\n* 0 EXISTS\r\nv OK [READ-WRITE] done\r\n", 2.0)
    assert (core.state, core.mailbox) == (State.SELECTED, b"Drafts")
    # A parse error answered BAD (no CLOSED) leaves it selected, as Dovecot does.
    core.feed_client(b"w SELECT x\r\n", 3.0)
    core.feed_server(b"w BAD Error in IMAP command SELECT: Missing ')'\r\n", 3.0)
    assert (core.state, core.mailbox) == (State.SELECTED, b"Drafts")


def test_the_one_match_paths_are_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison above compares something: a NOOP and its answer take the new paths (the
    general parts are never asked), with the records and octets the general ones give."""
    core = SessionCore(CoreConfig(), session_id="s", client="c", upstream="u", now=0.0)
    core.feed_server(GREETING, 0.0)
    # The first octets go the general way (they might be a PROXY header or a TLS ClientHello).
    core.feed_client(b"a0 ENABLE CONDSTORE\r\n", 0.0)
    core.feed_server(b"* CAPABILITY IMAP4rev1\r\na0 OK done\r\n", 0.0)

    def general(*_args: object) -> None:
        raise AssertionError("the general path was taken")

    monkeypatch.setattr(Commands, "line", general)
    monkeypatch.setattr(Responses, "line", general)
    sent = _seen(core.feed_client(b"a1 NOOP\r\n", 1.0))
    answered = _seen(core.feed_server(b"a1 OK NOOP completed\r\n", 1.5))
    assert sent == [("Forward", Direction.TO_SERVER, b"a1 NOOP\r\n")]
    record = answered[0].record
    assert isinstance(record, CommandCompleted)
    assert (record.tag, record.verb, record.status, record.duration_ms) == (
        "a1",
        "NOOP",
        "OK",
        500.0,
    )
    assert answered[1:] == [("Forward", Direction.TO_CLIENT, b"a1 OK NOOP completed\r\n")]
    # A command with plain arguments, and message data before its answer, the same way.
    fetch = b"a2 UID FETCH 1:* (FLAGS) (CHANGEDSINCE 5)\r\n"
    assert _seen(core.feed_client(fetch, 2.0)) == [("Forward", Direction.TO_SERVER, fetch)]
    answer = b"* 1 FETCH (UID 4 FLAGS (\\Seen) MODSEQ (7))\r\na2 OK Fetch completed\r\n"
    answered = _seen(core.feed_server(answer, 2.0))
    assert answered[0].record.verb == "UID FETCH"
    assert answered[1:] == [("Forward", Direction.TO_CLIENT, answer)]
    # A SELECT keeps its mailbox for the state after its answer.
    select = b"a3 SELECT INBOX\r\n"
    assert _seen(core.feed_client(select, 3.0)) == [("Forward", Direction.TO_SERVER, select)]
    core.feed_server(b"* 3 EXISTS\r\na3 OK [READ-WRITE] Select completed\r\n", 3.0)
    assert (core.state.value, core.mailbox) == ("selected", b"INBOX")
    assert core.commands == 4
    traits = core._traits.record("s", core.capabilities)
    assert traits is not None and "CONDSTORE" in traits.extensions


_ALTERNATION = re.compile(
    rb"(?:\* "
    + responses._PASSIVE
    + rb"(?:[^\r\n}]|\}(?!\r?\n)|\r(?=[\r\n]))*+\n)*+"
    + lexer.TAG_PATTERN
    + rb" ((OK|NO|BAD)(?: [^\r\n]*+)?)\r?\n"
)
"""The one-match answer's pattern as it was first written: the rest of an untagged line one
octet at a time, an alternation each (20 ns an octet). Since round 15 no CR but before a CR
or the LF: a line with a bare CR is `Responses.line`'s to refuse."""

_pieces = st.sampled_from(
    [b"}", b"}}", b"\r", b" ", b"x", b"(FLAGS (\\Seen))", b"{3}", b"[", b"]", b"\x80", b"*"]
)
_untagged = st.tuples(
    st.sampled_from([b"1 FETCH ", b"SEARCH", b"FLAGS ", b"OK ", b"OK [CAPABILITY", b"BYE ", b"x"]),
    st.lists(_pieces, max_size=6).map(b"".join),
    st.sampled_from([b"\r\n", b"\n", b"}\r\n", b"}\n", b"\r", b""]),
).map(lambda t: b"* " + b"".join(t))
_answer = st.tuples(
    st.sampled_from([b"a1", b"a]", b"", b"*"]),
    st.sampled_from([b" OK", b" NO", b" BAD", b" ok", b" OK [UIDNEXT 4]"]),
    st.lists(_pieces, max_size=4).map(b"".join),
    st.sampled_from([b"\r\n", b"\n", b"}\r\n", b""]),
).map(b"".join)


@settings(max_examples=600, deadline=None)
@given(st.lists(_untagged, max_size=4), _answer)
def test_the_answer_pattern_matches_what_the_alternation_matched(
    untagged: list[bytes], answer: bytes
) -> None:
    """The one-match answer's pattern reads the rest of an untagged line in runs of a class
    between `}`s: exactly the chunks, and the same groups, as the alternation it replaced."""
    chunk = b"".join(untagged) + answer
    old, new = _ALTERNATION.fullmatch(chunk), responses._SIMPLE.fullmatch(chunk)
    assert (old and old.groups()) == (new and new.groups())


_FETCH_LINE = b"* 12345 FETCH (FLAGS (\\Seen) UID 99999)\r\n"  # 40 octets
_MEGA = 1 << 20
LINEAR = {
    # 1 MiB of message data, then the answer: one match.
    "fetch lines": (_FETCH_LINE * (_MEGA // 40) + b"f OK done\r\n", True),
    # ... whose answer is no answer at the very end: the whole scanned, then declined.
    "fetch lines, no answer": (_FETCH_LINE * (_MEGA // 40) + b"f OKAY\r\n", False),
    "fetch lines, a literal last": (_FETCH_LINE * (_MEGA // 40) + b"* 1 FETCH (X {3}\r\n", False),
    # Runs of "}" inside a line, none ending it: one match.
    "brace runs": (b"* 1 FETCH (" + b"}}}}x" * (_MEGA // 5) + b")\r\nf OK\r\n", True),
    # Bare CRs (round 15: refused by `Responses.line`): declined after one pass.
    "brace-CR runs": (b"* SEARCH " + b"}\r" * (_MEGA // 2) + b"x\nf OK\r\n", False),
    # A line of "}" whose last one ends it (a literal's place): declined after one pass.
    "one brace run": (b"* 1 " + b"}" * _MEGA + b"\r\nf OK\r\n", False),
    "lines of braces": (b"* 1 }x}\r}\r\n" * (_MEGA // 10) + b"f OK\r\n", False),
    "brace lines, the last ends in one": (b"* 1 }x}\r}x\r\n" * (_MEGA // 11) + b"* 1 }\r\n", False),
    # An answer of 1 MiB, its text with a bare CR at its end.
    "long answer text": (b"f OK " + b"x}" * (_MEGA // 2) + b"\r\r\n", False),
}


LINEAR_BOUND = 5.0
"""Seconds a linear pass may take in the guards below: a few tens of milliseconds alone, 0.7 s
seen under coverage's tracer on a loaded machine; backtracking over 1 MiB takes minutes."""


@pytest.mark.parametrize("name", sorted(LINEAR))
def test_the_one_match_answer_stays_linear(name: str) -> None:
    """A 1 MiB server chunk made to make the answer's pattern backtrack (attack7: runs of `}`
    between its character classes, lines that fail only at their end, an answer that fails at
    the last octet) is decided in one pass, well under a second (a guard against backtracking,
    not a benchmark: each takes a few tens of milliseconds), and as the general path decides."""
    chunk, taken = LINEAR[name]
    probe, fast, general = (
        kind(CoreConfig(), session_id="s", client="c", upstream="u", now=0.0)
        for kind in (SessionCore, SessionCore, GeneralCore)
    )
    for core in (probe, fast, general):
        core.feed_server(GREETING, 0.0)
        core.feed_client(b"f FETCH 1:* (FLAGS UID)\r\n", 0.0)
    started = time.perf_counter()
    assert probe._responses.simple(chunk) is taken
    assert time.perf_counter() - started < LINEAR_BOUND
    # Then, fed whole, the same as the general path (line by line: not timed).
    # (The general path reads a turn's worth at a time: its backlog, read on, joins the rest;
    # a record goes out with the sends next to it, so only the order of each kind counts.)
    assert _parted(_drained(fast, chunk)) == _parted(_drained(general, chunk))
    assert _state(fast) == _state(general)


def _drained(core: SessionCore, chunk: bytes) -> list[Action]:
    """`chunk` fed to the server's side, and the backlog read on as the shell does."""
    actions = core.feed_server(chunk, 1.0)
    while core.server_backlog or core.client_backlog:
        more = core.resume_server if core.server_backlog else core.resume_client
        actions += more(1.0)
    return actions


def _parted(actions: list[Action]) -> tuple[dict[Any, bytes], list[Any]]:
    """What was forwarded, joined per direction, and the other actions in order."""
    sent: dict[Any, bytes] = {}
    others: list[Any] = []
    for seen in _seen(actions):
        if isinstance(seen, tuple):
            sent[seen[1]] = sent.get(seen[1], b"") + seen[2]
        else:
            others.append(seen)
    return sent, others


def test_the_one_match_command_stays_linear() -> None:
    """A client line of the longest length allowed, shaped to make the command's pattern
    backtrack (atoms then an unclosed list, lists then a stray parenthesis, `UID` repeated),
    is declined in one pass, well under a second."""
    core = SessionCore(CoreConfig(), session_id="s", client="c", upstream="u", now=0.0)
    core.feed_server(GREETING, 0.0)
    room = CoreConfig().max_line - 16
    for line in (
        b"a FETCH " + b"x " * (room // 2) + b"(\r\n",
        b"a FETCH " + b"(x x) " * (room // 6) + b"(\r\n",
        b"a FETCH " + b"(x" * (room // 2) + b"\r\n",
        b"a " + b"UID " * (room // 4) + b"\r\n",
        b"a FETCH " + b"x" * room + b" \r\n",
    ):
        started = time.perf_counter()
        assert not core._commands.simple(line)
        assert time.perf_counter() - started < LINEAR_BOUND


def noop_answered_in_inbox(kind: type[SessionCore], untagged: bytes) -> SessionCore:
    """A core of `kind` logged in, INBOX selected, then a NOOP answered after `untagged`
    lines, all in one chunk."""
    core = kind(CoreConfig(), session_id="s", client="c", upstream="u", now=0.0)
    for side, chunk in [
        ("s", GREETING),
        ("c", b"l LOGIN u p\r\n"),
        ("s", b"l OK done\r\n"),
        ("c", b"s SELECT INBOX\r\n"),
        ("s", b"s OK [READ-WRITE] done\r\n"),
        ("c", b"n NOOP\r\n"),
        ("s", untagged + b"n OK done\r\n"),
    ]:
        (core.feed_client if side == "c" else core.feed_server)(chunk, 1.0)
    return core


@pytest.mark.parametrize(
    ("line", "closed"),
    [
        (b"* OK [CLOSED] Previous mailbox closed.\r\n", True),
        (b"* OK [closed] x\r\n", True),
        (b"* OK [Closed more] x\r\n", True),
        (b"* OK [CLOSEDX] x\r\n", False),
        (b"* NO [CLOSED] x\r\n", False),
        (b"* 1 FETCH (FLAGS (\\Seen))\r\n", False),
    ],
)
@pytest.mark.parametrize("kind", [SessionCore, GeneralCore])
def test_closed_is_read_alike_in_any_case_and_only_as_an_ok_code(
    kind: type[SessionCore], line: bytes, closed: bool
) -> None:
    """The one-match answer sees an untagged `OK [CLOSED]` (Dovecot's, before every SELECT's
    answer while a mailbox is selected) as the general path reads it: a whole code atom, in any
    case, on OK only, before the tagged answer, which here answers a NOOP."""
    core = noop_answered_in_inbox(kind, line)
    selected = (State.SELECTED, b"INBOX")
    assert (core.state, core.mailbox) == ((State.AUTHENTICATED, None) if closed else selected)


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (b"* BYE Logging out\r\n", (State.LOGOUT, b"INBOX", True)),
        (b"* BYE x\r\n* OK [CLOSED] y\r\n", (State.LOGOUT, b"INBOX", True)),
        (b"* OK [CLOSED] y\r\n* BYE x\r\n", (State.LOGOUT, None, True)),
        (b"* bye x\r\n", (State.LOGOUT, b"INBOX", True)),
        (b'* 1 FETCH (X "* BYE ")\r\n', (State.SELECTED, b"INBOX", False)),
    ],
)
@pytest.mark.parametrize("kind", [SessionCore, GeneralCore])
def test_bye_and_closed_are_read_in_the_order_they_come(
    kind: type[SessionCore], lines: bytes, expected: tuple[State, bytes | None, bool]
) -> None:
    """An untagged BYE (Dovecot's before its LOGOUT answer) moves the state to logout and says
    the server will close; a CLOSED after it finds no mailbox selected any more and leaves the
    name as it was, one before it clears it: read in turn, whichever path reads the chunk. A
    `* BYE ` inside another line is no BYE."""
    core = noop_answered_in_inbox(kind, lines)
    assert (core.state, core.mailbox, core._responses.bye_seen) == expected
