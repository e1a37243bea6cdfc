"""The one-match paths taken by IDLE (c109011) and by SELECT and EXAMINE (8bd5d96), and the
one-match answer's new pattern (fdfc8fc, 02674f4), attacked from outside (attack7) with the
helpers of tests/relay/test_attack_simple.py: raw sockets through the proxy to a real Dovecot,
or to a scripted server where the server's misbehaviour is the attack. Every case runs with the
one-match paths and without: what the client receives and the records must be the same, and
held client bytes reach the server only after its "+".
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trio

from imapveil.records import CommandCompleted, Violation
from tests.helpers.attack import veil
from tests.helpers.dovecot import Dovecot
from tests.helpers.scripted import Peer, serve
from tests.relay.test_attack_simple import (
    SHOWN,
    Fed,
    Outcome,
    Scripted,
    Typist,
    both_ways,
    comparable,
    never_ran,
    run,
    states,
    stored,
)

pytestmark = pytest.mark.dovecot


def taken(out: Outcome, side: str = "c") -> list[bytes]:
    return [d for s, d in out.taken if s == side]


# --- IDLE against Dovecot.


def idle_ways(c: Typist) -> None:
    """IDLE every way a client may get it wrong: refused before login (then a command: the gate
    the one-match IDLE set is gone), `IDLE` and `DONE` in one receive, DONE sent before the
    "+" came (held, then sent after it), `idle` in lower case with DONE split in two receives,
    IDLE with an argument, then an ID whose identifiers must not reach Dovecot's log."""
    assert c.ask(b"n0", b"NOOP").startswith(b"n0 OK"), c.transcript  # the PROXY-header check
    assert c.ask(b"i0", b"IDLE").startswith(b"i0 BAD"), c.transcript
    assert c.ask(b"n1", b"NOOP").startswith(b"n1 OK"), c.transcript
    c.sign_in()
    assert c.ask(b"s", b"EXAMINE T").startswith(b"s OK"), c.transcript
    c.alone(b"i1 IDLE\r\nDONE\r\n")
    assert c.line().startswith(b"+ idling"), c.transcript
    assert c.until(b"i1").startswith(b"i1 OK"), c.transcript
    c.alone(b"i2 IDLE\r\n")
    c.ahead(b"DONE\r\n")  # before the "+": held by the proxy until it came
    assert c.line().startswith(b"+ idling"), c.transcript
    assert c.until(b"i2").startswith(b"i2 OK"), c.transcript
    c.alone(b"i3 idle\r\n")
    assert c.line().startswith(b"+ idling"), c.transcript
    c.alone(b"Do")
    c.alone(b"nE\r\n")
    assert c.until(b"i3").startswith(b"i3 OK"), c.transcript
    c.alone(b"i4 IDLE x\r\n")
    answer = c.line()
    if answer.startswith(b"+"):
        c.alone(b"DONE\r\n")
        answer = c.until(b"i4")
    assert answer.startswith(b"i4 "), c.transcript
    assert c.ask(b"n2", b"NOOP").startswith(b"n2 OK"), c.transcript
    stored(c)


async def test_idle_every_way(
    target: Dovecot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = await both_ways(target, tmp_path, monkeypatch, idle_ways)
    assert states(out, "n0 i0 n1 i1 i2 i3 n2") == [
        ("n0", "not_authenticated", "OK"),
        ("i0", "not_authenticated", "BAD"),
        ("n1", "not_authenticated", "OK"),
        ("i1", "selected", "OK"),
        ("i2", "selected", "OK"),
        ("i3", "selected", "OK"),
        ("n2", "selected", "OK"),
    ]
    assert [d for d in taken(out) if b"IDLE" in d.upper()] == [
        b"i0 IDLE\r\n",
        b"i2 IDLE\r\n",
        b"i3 idle\r\n",
        b"i4 IDLE x\r\n",
    ]
    assert SHOWN.in_log(out.log) == []
    assert "ID sent: name=Mail" in out.log
    assert SHOWN.in_records(out.records_json) == []
    assert out.end.bytes_from_client == out.sent
    assert out.end.reason == "logout"


def idle_then_literal(c: Typist) -> None:
    """While IDLE waits for its "+", a LITERAL+ APPEND whose literal is `x NOOP`, sent ahead:
    held, then (where DONE must be) the session ends; Dovecot sees neither."""
    c.sign_in()
    c.alone(b"i IDLE\r\n")
    c.ahead(b"a APPEND T {8+}\r\nx NOOP\r\n\r\n")
    c.rest()


async def test_a_literal_where_done_must_be(
    target: Dovecot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = await both_ways(target, tmp_path, monkeypatch, idle_then_literal)
    never_ran(out)
    never_ran(out, b"a")
    assert out.transcript.endswith(b"* BYE Expected DONE to end IDLE\r\n"), out.transcript
    assert out.commands[-1] == ("i", "IDLE", None)
    assert taken(out)[-1] == b"i IDLE\r\n"
    assert (out.end.reason, out.end.bytes_from_client) == ("protocol_error", out.sent)


def id_while_idle(c: Typist) -> None:
    """IDLE right after LOGIN (before its answer, behind the proxy's own ID), then an ID with
    identifiers sent with IDLE, before the "+": held, then (where DONE must be) the session
    ends. Dovecot never logs an ID from this session but the proxy's."""
    c.alone(b"L LOGIN alice wonderland\r\n")
    c.alone(b"i1 IDLE\r\n")  # one match, sent before the LOGIN's answer
    assert c.until(b"L").startswith(b"L OK"), c.transcript
    assert c.line().startswith(b"+ idling"), c.transcript
    c.alone(b"DONE\r\n")
    assert c.until(b"i1").startswith(b"i1 OK"), c.transcript
    c.alone(b"i2 IDLE\r\n" + SHOWN.id_command())
    assert c.line().startswith(b"+ idling"), c.transcript
    c.rest()


async def test_an_id_where_done_must_be(
    target: Dovecot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = await both_ways(
        target,
        tmp_path,
        monkeypatch,
        id_while_idle,
        # Sent before LOGIN's answer: read before it (not authenticated) unless Dovecot's
        # answer came first (a few runs in a hundred on a loaded machine).
        racy=frozenset({"i1"}),
        inject_id="name=imapveil",
    )
    assert SHOWN.in_log(out.log) == []
    assert SHOWN.in_records(out.records_json) == []
    assert re.findall(r"ID sent: [^:,\n]*", out.log) == ["ID sent: name=imapveil"]
    assert out.transcript.endswith(b"* BYE Expected DONE to end IDLE\r\n"), out.transcript
    assert [(t, v, s) for t, v, s in out.commands if not t.startswith("imapveil")] == [
        ("L", "LOGIN", "OK"),
        ("i1", "IDLE", "OK"),
        ("i2", "IDLE", None),
    ]
    assert states(out, "i1") in (
        [("i1", "not_authenticated", "OK")],
        [("i1", "authenticated", "OK")],
    )
    assert taken(out) == [b"i1 IDLE\r\n"]
    assert (out.end.reason, out.end.bytes_from_client) == ("protocol_error", out.sent)


# --- SELECT and EXAMINE against Dovecot.

SELECTS = [
    (b"s1", b"SELECT T"),
    (b"s2", b"SELECT T%"),
    (b"s3", b"EXAMINE T*"),
    (b"s4", b"SELECT T]"),
    (b"s5", b"SELECT ~T"),
    (b"s6", b"select T (CONDSTORE)"),
    (b"s7", b"EXAMINE T (QRESYNC (1 2))"),  # QRESYNC not enabled: BAD
    (b"s8", b"Examine T"),
    (b"s9", b"SELECT Nope"),  # NO: no mailbox selected after it (RFC 9051 6.3.2)
    (b"t1", b"SELECT T x"),  # OK: Dovecot takes an argument it does not know
    (b"t2", b"SELECT T (FOO)"),  # BAD, and the mailbox closed
    (b"t3", b"SELECT T"),
    (b"t4", b"SELECT \\"),  # NO
]


def selects(c: Typist) -> None:
    """SELECT and EXAMINE of atoms with odd atom characters, with CONDSTORE and QRESYNC lists,
    refused (NO and BAD), each alone (a one-match candidate), each followed by a FETCH whose
    record carries the state the answer left."""
    c.sign_in()
    for tag, command in SELECTS:
        answer = c.ask(tag, command)
        assert answer.startswith(tag + b" "), c.transcript
        fetch = b"f" + tag
        assert c.ask(fetch, b"UID FETCH 1:* (FLAGS)").startswith(fetch + b" "), c.transcript
    stored(c)


async def test_selects_leave_the_state_the_general_path_leaves(
    target: Dovecot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = await both_ways(target, tmp_path, monkeypatch, selects)
    # Dovecot's answers; each FETCH after them sent in the state they left (a BAD leaves the
    # state as it was, a NO leaves no mailbox selected), and answered so (BAD: none selected).
    assert [(t, s) for t, _v, s in out.commands if t[:1] in "st" and t != "s"] == [
        ("s1", "OK"),
        ("s2", "NO"),
        ("s3", "NO"),
        ("s4", "NO"),
        ("s5", "NO"),
        ("s6", "OK"),
        ("s7", "BAD"),
        ("s8", "OK"),
        ("s9", "NO"),
        ("t1", "OK"),
        ("t2", "BAD"),
        ("t3", "OK"),
        ("t4", "NO"),
    ]
    # Dovecot closes the selected mailbox for a SELECT it answers BAD once it has read its
    # arguments (`* OK [CLOSED]`, s7 and t2): nothing is selected after it.
    selected = {"s1", "s6", "s8", "t1", "t3"}
    fetched = [
        ("f" + t, "selected", "OK") if t in selected else ("f" + t, "authenticated", "BAD")
        for t in (tag.decode() for tag, _command in SELECTS)
    ]
    assert states(out, " ".join(t for t, _s, _st in fetched)) == fetched
    # Every one of them took the one-match path, but s7 (a list in a list).
    assert taken(out)[: 2 * len(SELECTS) - 1] == [
        line
        for tag, command in SELECTS
        for line in (tag + b" " + command + b"\r\n", b"f" + tag + b" UID FETCH 1:* (FLAGS)\r\n")
        if tag != b"s7" or not line.startswith(tag)
    ]
    assert SHOWN.in_log(out.log) == []
    assert out.end.reason == "logout"


# --- A scripted server: IDLE answered every way, SELECTs out of order, odd braces.


class Idler(Scripted):
    """A scripted server that answers IDLE with "+" (then data, then a second "+"), with a
    tagged NO, with a tagged BAD while the client's DONE waits; answers two SELECTs out of order;
    and sends FETCH answers with braces where a literal could be, each piece its own receive.
    `early` keeps any line that arrived before IDLE's "+" (there must be none)."""

    def __init__(self, fed: Fed) -> None:
        super().__init__(fed)
        self.early: list[bytes] = []

    async def _nothing_more(self, peer: Peer) -> None:
        """Whatever the client sent after IDLE is held: nothing arrives (a bounded look)."""
        with trio.move_on_after(0.1):
            self.early.append(await peer.line())

    async def script(self, peer: Peer) -> None:
        await self._say(peer, b"* OK [CAPABILITY IMAP4rev1 IDLE LITERAL+] fake ready\r\n")
        await self._line(peer, b"L LOGIN")
        await self._say(peer, b"L OK in\r\n")
        # `i1 IDLE\r\nDONE\r\n` in one receive: DONE held in the proxy until the "+".
        await self._line(peer, b"i1 IDLE\r\n")
        await self._nothing_more(peer)
        await self._say(peer, b"+ idling\r\n", b"* 3 EXISTS\r\n", b"+ again\r\n")
        await self._line(peer, b"DONE\r\n")
        await self._say(peer, b"* 4 EXISTS\r\ni1 OK idled\r\n")
        # IDLE refused with a one-match NO: the gate is gone, the next command goes.
        await self._line(peer, b"i2 IDLE\r\n")
        await self._nothing_more(peer)
        await self._say(peer, b"i2 NO [LIMIT] no idling\r\n")
        await self._line(peer, b"n NOOP")
        await self._say(peer, b"n OK\r\n")
        # IDLE refused with BAD while the client's DONE waits: DONE is the proxy's to refuse.
        await self._line(peer, b"i3 IDLE\r\n")
        await self._nothing_more(peer)
        await self._say(peer, b"i3 BAD not now\r\n")
        await self._line(peer, b"m NOOP")
        await self._say(peer, b"m OK\r\n")
        # DONE split in two receives.
        await self._line(peer, b"i4 idle\r\n")
        await self._say(peer, b"+ idling\r\n")
        await self._line(peer, b"DONE\r\n")
        await self._say(peer, b"i4 OK\r\n")
        # Two SELECTs answered out of order: the records follow the answers' order.
        await self._line(peer, b"s SELECT A")
        await self._line(peer, b"t SELECT B")
        await self._say(peer, b"* 2 EXISTS\r\nt OK [READ-WRITE] B\r\n", b"s NO [NONEXISTENT] A\r\n")
        await self._line(peer, b"u EXAMINE C")
        # A status line ending in "}" (the general path's: no literal in a status line).
        await self._say(peer, b"* 0 EXISTS\r\n* OK [UIDVALIDITY 1] x}\r\nu OK [READ-ONLY] C\r\n")
        for tag, pieces in FETCHES:
            await self._line(peer, tag + b" FETCH")
            await self._say(peer, *pieces)
        # IDLE, then a command where DONE must be: the proxy ends the session.
        await self._line(peer, b"i5 IDLE\r\n")
        await self._say(peer, b"+ idling\r\n")
        self.received.append(await peer.line())  # b"": the proxy closed, the NOOP never came
        await trio.aclose_forcefully(peer.stream)


FETCHES: list[tuple[bytes, tuple[bytes, ...]]] = [
    # A literal announced at the very end of a receive, its octets and the answer after it.
    (b"f1", (b"* 1 FETCH (BODY[] {3}", b"\r\nabc)\r\n", b"f1 OK done\r\n")),
    # Braces that announce nothing ("}}", "}\r", a bare CR): one match.
    # (A CR that ends no line ends the session since round 15: `}` CR CRLF instead.)
    (b"f2", (b"* 2 FETCH (X }})\r\n* 3 FETCH (Y }\r\r\n* 4 FETCH (a\r\r\nf2 OK done\r\n",)),
    # A line ending in "}}" (no literal), then the answer: the general path's.
    (b"f3", (b"* 5 FETCH (Z }}\r\nf3 OK done\r\n",)),
    # A literal whose octets are a tagged answer, ending the receive.
    (b"f4", (b"* 1 FETCH (BODY[] {9}\r\nf4 OK x\r\n", b")\r\nf4 OK done\r\n")),
    # A literal of "}\r\n" after a line ending in "}".
    (b"f5", (b"* 1 FETCH (BODY[] {3}\r\n}\r\n)\r\n* 1 FETCH (X }\r\r\nf5 NO no\r\n",)),
]


def against_idler(address: tuple[str, int], fed: Fed) -> tuple[bytes, int]:
    with Typist(address, fed) as c:
        c.greeting()
        c.alone(b"L LOGIN x y\r\n")
        c.through(b"L OK in\r\n")
        c.alone(b"i1 IDLE\r\nDONE\r\n")
        c.through(b"i1 OK idled\r\n")
        c.alone(b"i2 IDLE\r\n")
        c.through(b"i2 NO [LIMIT] no idling\r\n")
        c.alone(b"n NOOP\r\n")
        c.through(b"n OK\r\n")
        c.alone(b"i3 IDLE\r\n")
        c.ahead(b"DONE\r\n")
        c.through(b"DONE BAD [CLIENTBUG] Command not understood by the proxy\r\n")
        c.alone(b"m NOOP\r\n")
        c.through(b"m OK\r\n")
        c.alone(b"i4 idle\r\n")
        c.through(b"+ idling\r\n")
        c.alone(b"DO")
        c.alone(b"NE\r\n")
        c.through(b"i4 OK\r\n")
        c.alone(b"s SELECT A\r\n")
        c.alone(b"t SELECT B\r\n")
        c.through(b"s NO [NONEXISTENT] A\r\n")
        c.alone(b"u EXAMINE C\r\n")
        c.through(b"u OK [READ-ONLY] C\r\n")
        for tag, pieces in FETCHES:
            c.alone(tag + b" FETCH 1 BODY[]\r\n")
            c.through(pieces[-1])
        c.alone(b"i5 IDLE\r\n")
        c.through(b"+ idling\r\n")
        c.alone(b"x NOOP\r\n")
        return c.rest(), c.sent


async def test_idle_and_odd_answers_from_a_scripted_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = Fed(monkeypatch)
    outcomes = []
    ours = (
        b"DONE BAD [CLIENTBUG] Command not understood by the proxy\r\n",
        b"* BYE Expected DONE to end IDLE\r\n",
    )
    for _ in fed.each_way():
        server = Idler(fed)
        async with serve(server.script, server.sent) as address, veil(address, tmp_path) as v:
            transcript, sent = await run(against_idler, v.address, fed)
            (end,) = await v.sessions_ended(1)
        outcomes.append((transcript, comparable(v.sink.records), list(fed.taken)))
        # Nothing of the client's reached the server before its "+" or after a refused IDLE.
        assert server.early == []
        assert [line for line in server.received if not line.startswith(b"f")] == [
            b"L LOGIN x y\r\n",
            b"i1 IDLE\r\n",
            b"DONE\r\n",
            b"i2 IDLE\r\n",
            b"n NOOP\r\n",
            b"i3 IDLE\r\n",
            b"m NOOP\r\n",
            b"i4 idle\r\n",
            b"DONE\r\n",
            b"s SELECT A\r\n",
            b"t SELECT B\r\n",
            b"u EXAMINE C\r\n",
            b"i5 IDLE\r\n",
            b"",
        ]
        # The client got what the server sent, plus the proxy's own two lines.
        shown = bytes(server.sent)
        for line in ours:
            transcript = transcript.replace(line, b"", 1)
        assert transcript == shown
        commands = [(r.tag, r.verb, r.state, r.status) for r in v.sink.of(CommandCompleted)]
        assert commands == [
            ("L", "LOGIN", "not_authenticated", "OK"),
            ("i1", "IDLE", "authenticated", "OK"),
            ("i2", "IDLE", "authenticated", "NO"),
            ("n", "NOOP", "authenticated", "OK"),
            ("i3", "IDLE", "authenticated", "BAD"),
            # The DONE sent ahead is refused with no record: one word is no command (attack12).
            ("m", "NOOP", "authenticated", "OK"),
            ("i4", "IDLE", "authenticated", "OK"),
            ("t", "SELECT", "authenticated", "OK"),
            ("s", "SELECT", "authenticated", "NO"),  # answered last: no mailbox selected
            ("u", "EXAMINE", "authenticated", "OK"),
            ("f1", "FETCH", "selected", "OK"),
            ("f2", "FETCH", "selected", "OK"),
            ("f3", "FETCH", "selected", "OK"),
            ("f4", "FETCH", "selected", "OK"),
            ("f5", "FETCH", "selected", "NO"),
            ("i5", "IDLE", "selected", None),
        ]
        assert [(r.kind, r.action) for r in v.sink.of(Violation)] == [
            ("refused_no_command", "refused"),
            ("idle_not_done", "closed"),
        ]
        assert (end.reason, end.bytes_from_client, end.bytes_from_server) == (
            "protocol_error",
            sent,
            len(server.sent),
        )
    fast, general = outcomes
    assert fast[:2] == general[:2]
    assert general[2] == []
    assert [d for s, d in fast[2] if s == "c" and b"IDLE" in d.upper()] == [
        b"i2 IDLE\r\n",
        b"i3 IDLE\r\n",
        b"i4 idle\r\n",
        b"i5 IDLE\r\n",
    ]
    assert [d[:3] for s, d in fast[2] if s == "s"] == [
        b"L O",
        b"* 4",  # `* 4 EXISTS` and i1's OK, after IDLE
        b"i2 ",
        b"n O",
        b"i3 ",
        b"m O",
        b"i4 ",
        b"* 2",  # `* 2 EXISTS` and t's OK
        b"s N",
        b"f1 ",  # after its literal, a receive of its own
        b"* 2",  # f2's braces
    ]
