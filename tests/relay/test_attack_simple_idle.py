"""The one-match paths taken by IDLE (c109011) and by SELECT and EXAMINE (8bd5d96), and the
one-match answer's new pattern (fdfc8fc, 02674f4), attacked from outside (attack7) with the
helpers of tests/relay/test_attack_simple.py: raw sockets through the proxy to a real Dovecot,
or to a scripted server where the server's misbehaviour is the attack. Every case runs with the
one-match paths and without: what the client receives and the records must be the same, and
held client bytes reach the server only after its "+".
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.dovecot import Dovecot
from tests.relay.test_attack_simple import (
    SHOWN,
    Outcome,
    Typist,
    both_ways,
    never_ran,
    stored,
    target,
)

pytestmark = pytest.mark.dovecot
__all__ = ["target"]  # the module's Dovecot, a fixture


def states(out: Outcome, tags: str) -> list[tuple[str, str, str | None]]:
    """(tag, state the command was sent in, status) of the records whose tag is in `tags`."""
    return [
        (r["tag"], r["state"], r["status"])
        for r in out.records
        if r["event"] == "command" and r["tag"] in tags.split()
    ]


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
