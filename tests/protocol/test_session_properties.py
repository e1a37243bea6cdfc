"""Hypothesis: generated sessions, split at random points, come out as they went in (but for
literals made synchronizing toward the server); hostile streams never get a literal octet to the
server before its "+", nor an identifier into an ID the server executes."""

from __future__ import annotations

import base64
import json
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imapveil.policy_files import resolve_policy
from imapveil.protocol.session import CoreConfig
from imapveil.records import CommandCompleted, Violation
from tests.helpers.feeding import Conversation, splitting_at
from tests.helpers.strict_server import StrictServer

Step = tuple[str, bytes]  # ("c" | "s", bytes)
# Generated steps say what each side sent and what the other side must receive of it:
# ("c", sent, forwarded) and ("s", sent, relayed).
Expect = tuple[str, bytes, bytes]

# Literal bodies are where a naive proxy goes wrong: make them look like protocol.
_TRICKY = [
    b"\r\n",
    b"\n",
    b"a1 OK done\r\n",
    b"* BYE x\r\n",
    b"{5}\r\n",
    b"{3+}\r\n",
    b"~{2}\r\n",
    b"+ go\r\n",
    b"DONE\r\n",
    b"}",
    b"* 1 FETCH (BODY[] {",
    b"\x00\xff",
]
bodies = st.lists(st.sampled_from(_TRICKY) | st.binary(max_size=12), max_size=6).map(b"".join)
texts = st.sampled_from([b"done", b"Completed (0.001 secs).", b"[ALERT] hi", b"x}"])
words = st.sampled_from([b"NOOP", b"CHECK", b"CAPABILITY", b"STATUS INBOX (MESSAGES)"])


@st.composite
def untagged(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 5))
    n = draw(st.integers(1, 99999))
    if kind == 0:
        return b"* %d EXISTS\r\n" % n
    if kind == 1:
        body = draw(bodies)
        lit = b"~{%d}" if draw(st.booleans()) else b"{%d}"
        return b"* %d FETCH (UID %d BODY[] %s\r\n%s)\r\n" % (n, n, lit % len(body), body)
    if kind == 2:
        body1, body2 = draw(bodies), draw(bodies)
        return b"* %d FETCH (BODY[1] {%d}\r\n%s BODY[2] {%d}\r\n%s FLAGS (\\Seen))\r\n" % (
            n,
            len(body1),
            body1,
            len(body2),
            body2,
        )
    if kind == 3:
        return b"* SEARCH " + b" ".join(b"%d" % i for i in range(draw(st.integers(0, 300))))
    if kind == 4:
        return b"* OK [UIDNEXT %d] Predicted next UID\r\n" % n
    return b"* CAPABILITY IMAP4rev1 IDLE LITERAL+\r\n"


def _fix(line: bytes) -> bytes:
    return line if line.endswith(b"\n") else line + b"\r\n"


def same(steps: list[Step]) -> list[Expect]:
    return [(side, data, data) for side, data in steps]


@st.composite
def exchange(draw: st.DrawFn, tag: bytes) -> list[Expect]:
    kind = draw(st.integers(0, 7))
    status = draw(st.sampled_from([b"OK", b"NO", b"BAD"]))
    done = b"%s %s %s\r\n" % (tag, status, draw(texts))
    extra = b"".join(_fix(u) for u in draw(st.lists(untagged(), max_size=3)))
    if kind == 0:
        return same([("c", b"%s %s\r\n" % (tag, draw(words))), ("s", extra + done)])
    body = draw(bodies)
    if kind == 1:  # synchronizing literal, accepted
        return same(
            [
                ("c", b"%s APPEND INBOX {%d}\r\n" % (tag, len(body))),
                ("s", extra + b"+ Ready for literal data\r\n"),
                ("c", body + b"\r\n"),
                ("s", done),
            ]
        )
    if kind == 2:  # synchronizing literal, refused: the body is never sent
        return same([("c", b"%s APPEND Nope {%d}\r\n" % (tag, len(body))), ("s", extra + done)])
    if kind in (3, 7):  # LITERAL+: synchronizing toward the server, its "+" not shown
        line = b"%s APPEND INBOX {%d+}\r\n" % (tag, len(body))
        sync = b"%s APPEND INBOX {%d}\r\n" % (tag, len(body))
        if kind == 7:  # refused before the literal: the client's octets are skipped
            no = b"%s NO [TRYCREATE] no such mailbox\r\n" % tag
            return [("c", line + body + b"\r\n", sync), ("s", extra + no, extra + no)]
        return [
            ("c", line + body + b"\r\n", sync + body + b"\r\n"),
            ("s", b"+ go ahead\r\n", b""),
            ("s", extra + done, extra + done),
        ]
    if kind == 4:
        return same(
            [
                ("c", b"%s IDLE\r\n" % tag),
                ("s", b"+ idling\r\n" + extra),
                ("c", b"DONE\r\n"),
                ("s", done),
            ]
        )
    if kind == 5:
        # Failed: a session logs in once, and the proxy answers a second login itself.
        response = base64.b64encode(b"\x00user\x00" + body)
        failed = b"%s NO [AUTHENTICATIONFAILED] no\r\n" % tag
        return same(
            [
                ("c", b"%s AUTHENTICATE PLAIN\r\n" % tag),
                ("s", b"+ \r\n"),
                ("c", response + b"\r\n"),
                ("s", extra + failed),
            ]
        )
    # Pipelined: several commands at once, answered in any order.
    tags = [tag + b".%d" % i for i in range(draw(st.integers(2, 5)))]
    order = draw(st.permutations(tags))
    return same(
        [
            ("c", b"".join(b"%s %s\r\n" % (t, draw(words)) for t in tags)),
            ("s", extra + b"".join(b"%s OK x\r\n" % t for t in order)),
        ]
    )


@st.composite
def sessions(draw: st.DrawFn) -> list[Expect]:
    steps = same([("s", b"* OK [CAPABILITY IMAP4rev1 LITERAL+ IDLE] ready\r\n")])
    for i in range(draw(st.integers(0, 8))):
        steps += draw(exchange(b"t%d" % i))
    return steps


DEFAULT_POLICY = resolve_policy("default")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sessions(), st.lists(st.integers(0, 10**6), max_size=20), st.booleans())
def test_sessions_are_relayed_byte_for_byte(
    steps: list[Expect], cuts: list[int], with_policy: bool
) -> None:
    """With or without an ID policy: a session with no ID in it is relayed unchanged, but for
    `{N+}` written `{N}` toward the server, whose "+" for it the client never sees."""
    policy = (lambda: DEFAULT_POLICY) if with_policy else None
    conv = Conversation(splitting_at(cuts), CoreConfig(server_hold=256, policy=policy))
    for _ in conv.play([(side, sent) for side, sent, _ in steps]):
        pass
    assert conv.forwarded_to_server == b"".join(out for side, _, out in steps if side == "c")
    assert conv.forwarded_to_client == b"".join(out for side, _, out in steps if side == "s")
    assert not conv.replies
    assert conv.closed is None
    assert not conv.of(Violation)
    # Every command got its tagged answer; none is left pending.
    done = conv.of(CommandCompleted)
    assert all(r.status is not None for r in done)
    assert not conv.core._commands.pending


_NOISE = [
    b"\r\n",
    b"{3}\r\n",
    b"{4+}\r\n",
    b"{99999999999999999999999}\r\n",
    b"+ \r\n",
    b"a OK\r\n",
    b"a NO\r\n",
    b"* BYE\r\n",
    b"* 1 FETCH (",
    b"a APPEND x ",
    b"a IDLE\r\n",
    b"DONE\r\n",
    b"a AUTHENTICATE PLAIN\r\n",
    b"a LOGOUT\r\n",
    b'a ID ("name" ',
    b'"x-device" {4}\r\n',
    b"ID NIL\r\n",
    b'* ID ("name" "S" "remote-host" "1.2.3.4")\r\n',
]
noise = st.lists(st.sampled_from(_NOISE) | st.binary(max_size=30), max_size=8).map(b"".join)
own_commands = st.lists(
    st.sampled_from([b"a STARTTLS\r\n", b"b COMPRESS DEFLATE\r\n", b"c LOGIN x y\r\n"])
    | st.sampled_from(_NOISE),
    max_size=6,
).map(b"".join)


def _not_own(steps: list[tuple[str, bytes]]) -> bool:
    """Noise that spells a command the proxy answers itself (Hypothesis once built `, STARTTLS`
    from random bytes) belongs to the next test, which allows those answers."""
    return not any(_OWN.search(sent) for side, sent in steps if side == "c")


_OWN = re.compile(rb"(?i)STARTTLS|COMPRESS")


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("cs"), noise), max_size=12).filter(_not_own),
    st.lists(st.integers()),
)
def test_garbage_never_crashes_and_stays_bounded(
    steps: list[tuple[str, bytes]], cuts: list[int]
) -> None:
    """Whatever the peers send, the core neither raises nor holds more than its bounds, and
    what the server sends after its greeting reaches the client as it came (a prefix of it)."""
    config = CoreConfig(max_line=200, server_hold=200, max_held=400)
    conv = Conversation(splitting_at(cuts), config)
    for _ in conv.play(steps):
        core = conv.core
        assert len(core._client.buf) <= config.max_line
        assert core.held <= config.max_held
        assert len(core._server.buf) <= config.server_hold
    conv.client_closes()
    for reply in conv.replies:
        assert re.match(rb"\* BYE |\S+ BAD \[CLIENTBUG\] ", reply.data), reply


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("cs"), noise | own_commands), max_size=12),
    st.lists(st.integers()),
)
def test_garbage_with_id_policy_never_crashes(
    steps: list[tuple[str, bytes]], cuts: list[int]
) -> None:
    config = CoreConfig(
        max_line=200,
        server_hold=200,
        policy=lambda: DEFAULT_POLICY,
        client_tls="offer",
        compress=True,
    )
    conv = Conversation(splitting_at(cuts), config)
    for _ in conv.play(steps):
        core = conv.core
        assert len(core._client.buf) <= config.max_line
        assert core.held <= config.max_held
        assert (
            core._ids.collecting is None
            or len(core._ids.collecting.parts) <= 64 * 1024 + config.max_line
        )
    conv.client_closes()
    for reply in conv.replies:
        # Only BYE, our "+" for ID literals, and answers to the commands the proxy handles.
        assert re.match(rb"\* BYE |\+ Ready|\S+ (OK|NO|BAD) ", reply.data), reply


# An ID that the default policy must clean: its identifier may reach the server only if the
# proxy misframed the stream (octets the server read as a command, unseen by the policy).
MARKER = b"MARKER-7f3a"
ID_LINE = b'z ID ("name" "Mail" "x-device-id" "' + MARKER + b'")\r\n'
_HOSTILE = [
    ID_LINE,
    # Literal announcements a server may not honour, each followed by the ID as the literal's
    # octets: the item 2 forms of issue 11, and their cousins.
    b"a APPEND INBOX {%d+}\r\n" % len(ID_LINE) + ID_LINE,
    b"a NOOP {%d+}\r\n" % len(ID_LINE) + ID_LINE,
    b'a LOGIN "x {%d+}\r\n' % len(ID_LINE) + ID_LINE,
    b"a NOOP ~{%d+}\r\n" % len(ID_LINE) + ID_LINE,
    b'a SELECT "x {%d+}\r\n' % len(ID_LINE) + ID_LINE,
    b"a APPEND INBOX (\\Seen {%d}\r\n" % len(ID_LINE) + ID_LINE,
    b"a NOOP {9223372036854775807+}\r\n" + ID_LINE,
    b"a APPEND INBOX {3+}\r\nabc {%d+}\r\n" % len(ID_LINE) + ID_LINE,
    b"a APPEND INBOX {-5+}\r\n" + ID_LINE,
    b'a ID ("name" {%d+}\r\n' % len(ID_LINE) + ID_LINE,
    b'a ID ("x-device-id" "' + MARKER + b'") junk\r\n',
    b'a ID ("x-device-id" "\\q' + MARKER + b'")\r\n',
    b"a" * 70 + b' ID ("x-device-id" "' + MARKER + b'")\r\n',
    b"a IDLE\r\n" + ID_LINE,
    b"a IDLE {%d+}\r\nDONE\r\n" % (len(ID_LINE) + 6) + ID_LINE,
    b"a IDLE {%d+}\r\nx\r\n" % (len(ID_LINE) + 3) + ID_LINE,
    b"a AUTHENTICATE PLAIN\r\n" + ID_LINE,
    b"DONE\r\n",
    b"a NOOP\x00 {%d+}\r\n" % len(ID_LINE) + ID_LINE,
    b"a NOOP \r {%d+}\r\n" % len(ID_LINE) + ID_LINE,
    b"a NOOP \xff {%d+}\r\n" % len(ID_LINE) + ID_LINE,
    b"a NOOP ) {%d+}\r\n" % len(ID_LINE) + ID_LINE,
    b'a "',
    b"{",
    b"\r",
    b"\r\n",
    b" ",
    b"a NOOP\r\n",
]
hostile = st.lists(st.sampled_from(_HOSTILE) | st.binary(max_size=8), max_size=10)


@settings(max_examples=400, deadline=None)
@given(hostile, st.lists(st.booleans()), st.lists(st.integers()))
def test_literal_octets_reach_the_server_only_when_it_asked(
    chunks: list[bytes], decisions: list[bool], cuts: list[int]
) -> None:
    """Against a server that reads literals only after its own "+" and may refuse any command
    instead, whatever the client sends: no {N+} reaches the server, no octet follows a {N}
    before the server's "+", and the identifier never reaches an ID the server executes."""
    config = CoreConfig(max_line=300, max_held=4096, policy=lambda: DEFAULT_POLICY)
    conv = Conversation(splitting_at(cuts), config)
    server = StrictServer(iter(decisions))
    conv.server(b"* OK [CAPABILITY IMAP4rev1 LITERAL+ ID IDLE] ready\r\n")
    seen = 0
    for chunk in chunks:
        conv.client(chunk)
        for _ in range(50):  # the conversation between proxy and server, until it rests
            new = bytes(conv.forwarded_to_server[seen:])
            seen += len(new)
            answer = server.feed(new) if new else b""
            if not answer or conv.closed is not None:
                break
            conv.server(answer)
        if conv.closed is not None:
            break
    assert MARKER not in server.id_octets
    assert MARKER not in json.dumps([r.to_dict() for r in conv.records]).encode()
