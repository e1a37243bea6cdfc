"""Issue 17's byte path, attacked from outside: raw sockets through the proxy (built as `imapveil
serve` builds it, default configuration and policy) to a real Dovecot 2.3 that logs every ID it
receives (`imap_id_log = *`), as tests/relay/test_fail_closed.py does.

What changed: literal bodies of 64 KiB or more are spliced socket to socket in the kernel
(`relay/splice.py`), records are written after their sends, and the core's hot paths were
rewritten. What must still hold: literal octets reach the server only when it asked for them,
and the command after a spliced literal is read by the proxy, never spliced through unseen (an
ID in it is filtered: Dovecot's own `ID sent:` line shows what it received); every octet the
client sent is counted; a session's records pair answers with commands.

Each big literal below carries an ID command of its own among its octets (`hidden`): they are
literal octets, and must never run as a command. The ID command after the literal (`shown`)
must run, cleaned by the default policy.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from imapveil.records import CommandCompleted, IdExchange
from imapveil.relay import splice
from imapveil.relay.streams import RECEIVE_SIZE
from tests.helpers.attack import (
    Client,
    DovecotLog,
    Identifiers,
    answered_properly,
    veil,
)
from tests.helpers.dovecot import Dovecot
from tests.helpers.scripted import Peer, fetch_until_closed, serve

pytestmark = pytest.mark.dovecot
run = trio.to_thread.run_sync

BIG = 100 * 1024 + 7  # over splice.SPLICE_MIN, and not a round number
PLUS = 3 * RECEIVE_SIZE + 11
"""A LITERAL+ literal: the first receive's worth waits in the core for the server's "+" and is
fed to it then; only what stays in the socket beyond it can be spliced."""
assert splice.SPLICE_MIN < BIG


def body(size: int, hidden: Identifiers, lead: bytes = b"") -> bytes:
    """`size` octets of a message whose lines include an ID command (and `lead` first)."""
    head = lead + b"Subject: big\r\n\r\n" + hidden.id_command(b"h") + b"DONE\r\n"
    line = b"x" * 78 + b"\r\n"
    out = head + line * ((size - len(head)) // len(line) + 1)
    return out[:size]


def unique(ids: Identifiers, text: str) -> list[str]:
    """The values of `ids` no other `Identifiers` has that `text` holds."""
    return [v for v in (ids.device, ids.session, ids.transport) if v in text]


def shown_id(ids: Identifiers) -> bytes:
    return b'b ID ("name" "Mail" ' + ids.pairs() + b")\r\n"


@dataclass(frozen=True)
class Case:
    """`segments(hidden, shown)`: what the client sends after LOGIN, as separate sends; `WAIT`
    between two of them waits for the server's "+". The shown ID command ends the last one."""

    segments: Callable[[Identifiers, bytes], list[bytes]]
    spliced: bool  # the client's big literal goes to the server by splice(2)
    runs: bool = True  # the shown ID runs (the session goes on past the literal)
    login: bool = True


WAIT = b"<wait for +>"


def append_sync(hidden: Identifiers, shown: bytes) -> list[bytes]:
    b = body(BIG, hidden)
    return [b"a APPEND INBOX {%d}\r\n" % BIG, WAIT, b + b"\r\n" + shown]


def append_sync_split(cut: int) -> Callable[[Identifiers, bytes], list[bytes]]:
    """The literal's octets cut at `cut` from its end (negative: into the next command)."""

    def segments(hidden: Identifiers, shown: bytes) -> list[bytes]:
        whole = body(BIG, hidden) + b"\r\n" + shown
        at = BIG - cut
        return [b"a APPEND INBOX {%d}\r\n" % BIG, WAIT, whole[:at], whole[at:]]

    return segments


def append_plus(hidden: Identifiers, shown: bytes) -> list[bytes]:
    return [b"a APPEND INBOX {%d+}\r\n" % PLUS + body(PLUS, hidden) + b"\r\n" + shown]


def append_literal8(hidden: Identifiers, shown: bytes) -> list[bytes]:
    return [b"a APPEND INBOX ~{%d+}\r\n" % PLUS + body(PLUS, hidden) + b"\r\n" + shown]


def multiappend(hidden: Identifiers, shown: bytes) -> list[bytes]:
    first, second = body(PLUS, hidden), body(PLUS + 3, hidden)
    return [
        b"a APPEND INBOX {%d+}\r\n" % len(first)
        + first
        + b" (\\Seen) {%d+}\r\n" % len(second)
        + second
        + b"\r\n"
        + shown
    ]


def catenate(hidden: Identifiers, shown: bytes) -> list[bytes]:
    first, second = body(PLUS, hidden), body(BIG + 5, hidden, lead=b"X-Part: 2\r\n")
    return [
        b"a APPEND INBOX CATENATE (TEXT {%d+}\r\n" % len(first)
        + first
        + b" TEXT {%d}\r\n" % len(second),
        WAIT,
        second + b")\r\n" + shown,
    ]


def refused_by_proxy(hidden: Identifiers, shown: bytes) -> list[bytes]:
    return [b'a FROB "x\\q" {%d+}\r\n' % PLUS + body(PLUS, hidden) + b"\r\n" + shown]


def refused_by_dovecot(hidden: Identifiers, shown: bytes) -> list[bytes]:
    return [b"a APPEND INBOX (\\Bogus) {%d+}\r\n" % PLUS + body(PLUS, hidden) + b"\r\n" + shown]


def idle_literal(hidden: Identifiers, shown: bytes) -> list[bytes]:
    return [b"a IDLE {%d+}\r\n" % PLUS + body(PLUS, hidden, lead=b"DONE\r\n") + b"\r\n" + shown]


def id_literal(hidden: Identifiers, shown: bytes) -> list[bytes]:
    return [b'a ID ("x-note" {%d+}\r\n' % PLUS + body(PLUS, hidden) + b")\r\n" + shown]


def login_literal(hidden: Identifiers, shown: bytes) -> list[bytes]:
    return [b"a LOGIN alice {%d+}\r\n" % PLUS + body(PLUS, hidden) + b"\r\n" + shown]


CASES = {
    "append-sync": Case(append_sync, spliced=True),
    "append-sync-cut-at-last-octet": Case(append_sync_split(1), spliced=True),
    "append-sync-cut-after-literal": Case(append_sync_split(0), spliced=True),
    "append-sync-cut-in-next-command": Case(append_sync_split(-5), spliced=True),
    "append-sync-cut-at-splice-min": Case(append_sync_split(splice.SPLICE_MIN), spliced=True),
    "append-literal-plus": Case(append_plus, spliced=True),
    "append-literal8": Case(append_literal8, spliced=True),
    "multiappend": Case(multiappend, spliced=True),
    "catenate": Case(catenate, spliced=True),
    "refused-by-the-proxy": Case(refused_by_proxy, spliced=False),
    "refused-by-dovecot": Case(refused_by_dovecot, spliced=False),
    "idle-literal": Case(idle_literal, spliced=False),
    "id-literal": Case(id_literal, spliced=False, runs=False),
    # Dovecot ends the session: `* BYE Literal size too large` (no login attempt).
    "login-literal": Case(login_literal, spliced=False, runs=False, login=False),
}


def attack(
    address: tuple[str, int], case: Case, hidden: Identifiers, shown: bytes
) -> tuple[bytes, int]:
    """(the transcript, octets the client sent)."""
    sent = 0
    with Client(address) as c:
        c.greeting()

        def send(data: bytes) -> None:
            nonlocal sent
            c.send(data)
            sent += len(data)

        if case.login:
            send(b"L LOGIN alice wonderland\r\n")
            assert c.until(b"L").startswith(b"L OK"), c.transcript
        for segment in case.segments(hidden, shown):
            if segment == WAIT:
                line = c.line()
                assert line.startswith(b"+"), c.transcript[-500:]
            else:
                send(segment)
        if case.runs:
            assert c.until(b"b").startswith(b"b OK"), c.transcript[-2000:]
        send(b"z NOOP\r\n")
        c.until(b"z")
        if not c.eof:
            send(b"Q LOGOUT\r\n")
        return c.rest(), sent


@pytest.mark.parametrize("name", list(CASES))
async def test_the_command_after_a_big_literal_is_read_by_the_proxy(
    target: Dovecot, tmp_path: Path, name: str
) -> None:
    case = CASES[name]
    hidden, ids = Identifiers(), Identifiers()
    log = DovecotLog(target)
    literals = splice.totals.literals
    async with veil(target.address, tmp_path) as v:
        transcript, sent = await run(attack, v.address, case, hidden, shown_id(ids))
        (end,) = await v.sessions_ended(1)
    text = await run(log.settled, 1)
    records = v.records_json()
    # Literal octets never ran as a command, whatever the way they took.
    assert hidden.in_log(text) == [], name
    assert hidden.in_records(records) == []
    # The ID after the literal was read by the proxy: cleaned, then run by Dovecot.
    assert ids.in_log(text) == []
    assert ids.in_records(records) == []
    if case.runs:
        assert "ID sent: name=Mail" in text
        assert b"\r\nz OK" in transcript, transcript[-2000:]
        (exchange,) = v.sink.of(IdExchange)
        assert exchange.status == "OK"
    else:
        assert answered_properly(transcript, b"a"), transcript[-2000:]
    # Every octet the client sent was counted, spliced or not (up to where the session ended).
    if case.runs:
        assert end.bytes_from_client == sent
    else:
        assert end.bytes_from_client <= sent
    assert (splice.totals.literals > literals) is case.spliced


def test_every_case_is_sound_against_dovecot_directly(target: Dovecot) -> None:
    """Control: the spliced cases are valid IMAP (Dovecot answers the literal's command OK and
    runs the ID after it), so their tests above attack a working conversation."""
    for name, case in CASES.items():
        if not case.spliced:
            continue
        hidden, ids = Identifiers(), Identifiers()
        log = DovecotLog(target)
        transcript, _sent = attack(target.address, case, hidden, shown_id(ids))
        text = log.settled(1)
        assert b"\r\na OK" in transcript, (name, transcript[-1000:])
        assert ids.device in text, name
        assert unique(hidden, text) == [], name


# --- Tag reuse around spliced literals: answers pair with commands in order.


def reused_tags(address: tuple[str, int], hidden: Identifiers) -> tuple[bytes, int]:
    big = body(BIG, hidden)
    data = (
        b"L LOGIN alice wonderland\r\n"
        + b"t NOOP\r\n"
        + b"t APPEND INBOX {%d+}\r\n" % BIG
        + big
        + b"\r\nt NOOP\r\n"
        + b"u SELECT INBOX\r\n"
        + b"t FETCH 1:* (BODY.PEEK[])\r\n"
        + b"t NOOP\r\n"
    )
    with Client(address) as c:
        c.greeting()
        c.send(data)
        for _ in range(5):
            assert c.until(b"t").startswith(b"t OK"), c.transcript[-2000:]
        # A last one, unanswered: the client resets the connection right after sending it.
        c.send(b"t IDLE\r\n")
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return c.transcript, len(data) + len(b"t IDLE\r\n")


async def test_reused_tags_pair_in_order_around_spliced_literals(
    target: Dovecot, tmp_path: Path
) -> None:
    hidden = Identifiers()
    octets = splice.totals.octets
    async with veil(target.address, tmp_path) as v:
        _transcript, sent = await run(reused_tags, v.address, hidden)
        (end,) = await v.sessions_ended(1)
    assert splice.totals.octets > octets  # the APPEND's and the FETCH's big bodies
    commands = [(r.tag, r.verb, r.status, r.literals) for r in v.sink.of(CommandCompleted)]
    assert commands[:6] == [
        ("L", "LOGIN", "OK", ()),
        ("t", "NOOP", "OK", ()),
        ("t", "APPEND", "OK", (BIG,)),
        ("t", "NOOP", "OK", ()),
        ("u", "SELECT", "OK", ()),
        ("t", "FETCH", "OK", ()),
    ]
    # The last NOOP was answered; IDLE never was (if the proxy read it before the reset).
    idle = [("t", "IDLE", None, ())]
    assert commands[6:] in ([("t", "NOOP", "OK", ())], [("t", "NOOP", "OK", ()), *idle])
    assert end.bytes_from_client == sent - (0 if commands[7:] else len(b"t IDLE\r\n"))
    assert hidden.in_records(v.records_json()) == []


# --- A server whose literal sizes lie.


class LyingUpstream:
    """Answers LOGIN, then a FETCH whose literal announces `announced` octets and sends
    `sent`, then closes."""

    def __init__(self, announced: int, sent: int) -> None:
        self.announced = announced
        self.sent_octets = sent
        self.sent = bytearray()

    async def script(self, peer: Peer) -> None:
        await peer.say(b"* OK fake IMAP ready\r\n")
        if (await peer.line()).startswith(b"a1 LOGIN"):
            await peer.say(b"a1 OK logged in\r\n")
        if (await peer.line()).startswith(b"a2 FETCH"):
            await peer.say(b"* 1 FETCH (BODY[] {%d}\r\n" % self.announced)
            # What follows the literal's octets is nothing the proxy reads: no "a2 OK" here can
            # end the FETCH (it is literal octets), and the session ends with the server.
            payload = os.urandom(self.sent_octets - 40) + b")\r\na2 OK done\r\n* BYE x\r\n"
            payload += b"z" * (self.sent_octets - len(payload))
            for i in range(0, len(payload), 32 * 1024):
                await peer.say(payload[i : i + 32 * 1024])
        await trio.aclose_forcefully(peer.stream)


@pytest.mark.parametrize("announced", [2 * BIG, 2**63 - 1], ids=["twice", "2^63-1"])
async def test_a_server_literal_announcing_more_than_it_sends(
    tmp_path: Path, announced: int
) -> None:
    upstream = LyingUpstream(announced, BIG)
    literals = splice.totals.literals
    async with serve(upstream.script, upstream.sent) as address, veil(address, tmp_path) as v:
        received = await run(fetch_until_closed, v.address, False)
        (end,) = await v.sessions_ended(1)
    assert received == bytes(upstream.sent)  # byte-exact, the lie included
    assert (end.reason, end.detail) == ("server_closed", "mid_literal")
    assert end.bytes_from_server == len(upstream.sent)
    assert splice.totals.literals > literals
    fetch = [r for r in v.sink.of(CommandCompleted) if r.verb == "FETCH"]
    assert [(r.tag, r.status) for r in fetch] == [("a2", None)]  # the "a2 OK" was literal octets
