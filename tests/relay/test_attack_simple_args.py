"""The widened one-match paths (a4ac8d8: allowlisted commands with plain arguments; 4e292d6:
passive untagged lines before a one-match answer) attacked from outside (attack5), with the
helpers of tests/relay/test_attack_simple.py: every case runs with the one-match paths and
without, and what the client receives and the records must be the same.

Against Dovecot: arguments a regular expression might read otherwise than Dovecot (atoms with
`]`, `\\`, `%`, `*`, `~`, `[`, a `}` at the line's end), UID commands in odd case and with two
spaces, arguments to commands that take none, pipelined commands with an ID behind a simple one,
and a LITERAL+ APPEND that Dovecot refuses with a one-match BAD before a literal too large to
skip. Against a scripted server: passive lines (`* SEARCH`, `* LIST`, `* STATUS`, `* FLAGS`)
with a literal at their end (or something that only looks like one), a literal whose octets are a
tagged answer, and lines split across receives.
"""

from __future__ import annotations

import re
from collections.abc import Callable
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
    shown_id,
    stored,
)

pytestmark = pytest.mark.dovecot


def tagged(transcript: bytes) -> list[bytes]:
    """The tags of the tagged answers the client received, in order."""
    return re.findall(rb"(?m)^([^*+ \r\n][^ \r\n]*) (?:OK|NO|BAD)\b", transcript)


# --- Arguments shaped to be read otherwise, each alone (a one-match candidate), to Dovecot.

ODD = [
    (b"f1", b"FETCH 1 x}"),
    (b"f2", b"FETCH 1 (FLAGS) x}"),
    (b"f3", b"UID fetch 1:* (FLAGS)"),
    (b"f4", b"uId FeTcH 1 (FLAGS UID)"),
    (b"f5", b"UID  FETCH 1 (FLAGS)"),  # two spaces: refused by the proxy, as by the classifier
    (b"f6", b"FETCH 1 BODY.PEEK[]"),
    (b"f7", b"FETCH 1 BODY.PEEK[HEADER]<0.4>"),
    (b"f8", b"SEARCH \\"),
    (b"f9", b"SEARCH ]"),
    (b"g1", b"SEARCH ~ ["),
    (b"g2", b"LIST % *"),
    (b"g3", b"LIST ~ %}"),
    (b"g4", b"STATUS T (MESSAGES UIDNEXT)"),
    (b"g5", b"STATUS T MESSAGES}"),
    (b"g6", b"NOOP x"),
    (b"g7", b"CHECK x y"),
    (b"g8", b"CAPABILITY x"),
    (b"g9", b"STORE 1 +FLAGS.SILENT (\\Flagged \\)"),
    (b"h1", b"COPY 1 T}"),
    (b"h2", b"UID COPY 9:10 T"),  # none such: no COPYUID (its UIDVALIDITY differs)
    (b"h3", b"UID EXPUNGE 1}"),
    (b"h4", b"THREAD REFERENCES UTF-8 ALL"),
    (b"h5", b"SORT (DATE) UTF-8 ALL"),
    (b"h6", b"UID ID NIL"),  # not an ID: Dovecot has no UID ID
    (b"h7", b"LSUB ~ *}"),
    (b"h8", b"NAMESPACE x}"),
    (b"h9", b"UNSELECT x}"),  # Dovecot takes it: no mailbox selected after it
    (b"i1", b"FETCH 1 (FLAGS)"),
]
"""Sent alone, one after the other, each waiting for its answer."""
ONE_MATCH = [tag for tag, _ in ODD if tag not in (b"f5", b"h6")]
"""The ones `Commands.simple` takes (f5 has two spaces, h6's verb is not allowlisted)."""


def odd_arguments(c: Typist) -> None:
    c.sign_in()
    c.alone(b"a APPEND T {8}\r\n")
    assert c.line().startswith(b"+ "), c.transcript
    c.alone(b"12345678\r\n")
    assert c.until(b"a").startswith(b"a OK"), c.transcript
    assert c.ask(b"s", b"SELECT T").startswith(b"s OK"), c.transcript
    for tag, command in ODD:
        assert c.ask(tag, command), c.transcript[-1500:]
    c.alone(b"n NOOP\n")  # a bare LF, one-match too
    assert c.until(b"n").startswith(b"n OK"), c.transcript
    stored(c)


def odd_checked(out: Outcome) -> None:
    never_ran(out)
    tags = [b"L", b"a", b"s", *(tag for tag, _ in ODD), b"n", b"b", b"s", b"f", b"Q"]
    # Each answered once, in order (for f5 by the proxy), and recorded so.
    assert tagged(out.transcript) == tags, out.transcript[-3000:]
    assert [t for t, _v, _s in out.commands] == [t.decode() for t in tags]
    # Dovecot reads `x}` as an unknown fetch attribute, `~`, `\\`, `]` as unknown search keys,
    # and takes arguments to NOOP, CHECK, CAPABILITY and UNSELECT (the FETCH after it has no
    # mailbox, and the proxy, following UNSELECT's OK, knows); `UID  FETCH` is the proxy's BAD.
    bad = {"f1", "f2", "f5", "f8", "f9", "g1", "g5", "g9", "h3", "h6", "i1"}
    assert {t: s for t, _v, s in out.commands} == {
        **{t.decode(): "BAD" if t.decode() in bad else "OK" for t in tags},
        "h1": "NO",  # no mailbox `T}`
    }
    assert b"f5 BAD [CLIENTBUG]" in out.transcript
    states = {r["tag"]: r["state"] for r in out.records if r["event"] == "command"}
    assert (states["h9"], states["i1"]) == ("selected", "authenticated"), states
    assert "UID ID" not in out.log
    # The SELECT and EXAMINE of a plain name too.
    taken = [d.split(b" ")[0] for s, d in out.taken if s == "c"]
    assert taken == [b"s", *ONE_MATCH, b"n", b"s", b"f", b"Q"], taken
    # Dovecot ran one ID only, the proxy's cleaned one.
    assert out.log.count("ID sent:") == 1
    assert "ID sent: name=Mail" in out.log
    assert SHOWN.in_log(out.log) == []
    assert SHOWN.in_records(out.records_json) == []
    assert "wonderland" not in out.records_json
    assert out.end.bytes_from_client == out.sent
    assert out.end.reason == "logout"


async def test_odd_arguments_read_alike(
    target: Dovecot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    odd_checked(await both_ways(target, tmp_path, monkeypatch, odd_arguments))


# --- Pipelined: an ID behind or before a simple command, in one receive, never one match.
# Dovecot logs the first ID of a session only (`ID sent:`): one shape a session.

PIPELINED = {
    "noop-then-id": (b"p NOOP\r\n" + shown_id(), [b"p", b"b"]),
    "fetch-then-id": (b"p UID FETCH 1:* (FLAGS)\r\n" + shown_id(), [b"p", b"b"]),
    "id-then-noop": (shown_id().replace(b"b ID", b"b id", 1) + b"p NOOP\r\n", [b"b", b"p"]),
    "id-between": (b"p NOOP\r\n" + shown_id() + b"q CHECK\r\n", [b"p", b"b", b"q"]),
}


def pipelined(chunk: bytes, tags: list[bytes]) -> Callable[[Typist], None]:
    def script(c: Typist) -> None:
        c.sign_in()
        assert c.ask(b"s", b"SELECT T").startswith(b"s OK"), c.transcript
        c.alone(chunk)
        for tag in tags:
            assert re.search(rb"(?m)^" + tag + rb" OK", c.transcript) or c.until(tag), c.transcript

    return script


def pipelined_checked(out: Outcome, tags: list[bytes]) -> None:
    # Dovecot may finish a pipelined ID before the NOOP ahead of it (a NOOP waits for a sync):
    # each answer is paired by its tag, whatever the order.
    assert sorted(tagged(out.transcript)) == sorted([b"L", b"s", *tags, b"Q"])
    assert {t: s for t, _v, s in out.commands} == {
        t.decode(): "OK" for t in (b"L", b"s", *tags)
    } | {"Q": "OK"}
    assert ("b", "ID", "OK") in out.commands
    # Two commands a chunk: none taken in one match (but the SELECT before, the LOGOUT after).
    assert [d for s, d in out.taken if s == "c"] == [b"s SELECT T\r\n", b"Q LOGOUT\r\n"]
    assert "ID sent: name=Mail" in out.log
    assert SHOWN.in_log(out.log) == []
    assert SHOWN.in_records(out.records_json) == []
    assert out.end.bytes_from_client == out.sent


@pytest.mark.parametrize("name", list(PIPELINED))
async def test_an_id_pipelined_with_a_simple_command(
    target: Dovecot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    chunk, tags = PIPELINED[name]
    out = await both_ways(target, tmp_path, monkeypatch, pipelined(chunk, tags))
    pipelined_checked(out, tags)


# --- A LITERAL+ APPEND refused with a one-match BAD: its literal is too large to skip.


def too_large_to_skip(c: Typist) -> None:
    """Dovecot answers the {70000000} the proxy sent (the client's {70000000+}) with `BAD
    Invalid system flag` (no code, alone: a one-match answer). The client will send 70 MB the
    proxy would have to skip, more than it skips (64 MiB): the session ends with a BYE."""
    c.sign_in()
    c.alone(b"a APPEND T (\\Bogus) {70000000+}\r\n")
    c.rest()


def too_large_checked(out: Outcome) -> None:
    """Found attacking the one-match answer (attack5): it took Dovecot's BAD, which set the
    session to close after a BYE it owed, and returned without paying it; the session stayed
    open, reading nothing more from the client, until the idle timeout."""
    assert re.search(
        rb"\r\na BAD [^\r\n]*\r\n\* BYE Literal too large to skip\r\n\Z", out.transcript
    )
    assert [d[:6] for s, d in out.taken if s == "s" and d.startswith(b"a ")] == [b"a BAD "]
    assert out.commands[-1] == ("a", "APPEND", "BAD")
    assert out.end.reason == "protocol_error"
    assert out.end.bytes_from_client == out.sent
    assert [r["kind"] for r in out.records if r["event"] == "violation"] == [
        "literal_too_large_to_skip"
    ]


async def test_a_literal_too_large_to_skip_after_a_one_match_answer(
    target: Dovecot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    too_large_checked(await both_ways(target, tmp_path, monkeypatch, too_large_to_skip))


# --- A server whose passive lines carry literals, or look as if they did.


class Passive(Scripted):
    """A scripted server whose passive lines carry literals, or look as if they did."""

    async def script(self, peer: Peer) -> None:
        await self._say(peer, b"* OK [CAPABILITY IMAP4rev1 LITERAL+] fake ready\r\n")
        await self._line(peer, b"L LOGIN")
        await self._say(peer, b"L OK in\r\n")
        for tag, pieces in ANSWERS:
            await self._line(peer, tag + b" ")
            await self._say(peer, *pieces)
        await self._line(peer, b"Q LOGOUT")
        await self._say(peer, b"* BYE bye\r\nQ OK\r\n")
        await trio.aclose_forcefully(peer.stream)


ANSWERS: list[tuple[bytes, tuple[bytes, ...]]] = [
    # Not literals ("{5}" mid-line, before "\r\r\n", "}" without "{"): one match.
    (b"s1", (b"* SEARCH {5} 1\r\n* SEARCH {5}\r\r\n* FLAGS (x})\r\ns1 OK x\r\n",)),
    # A `* LIST` whose mailbox is a literal holding a tagged answer, then the answer.
    (b"s2", (b'* LIST () "/" {5}\r\n', b"s2 OK", b"\r\n", b"s2 OK listed\r\n")),
    # A `* STATUS` whose mailbox is a literal of exactly a tagged answer's line.
    (b"s3", (b"* STATUS {7}\r\n", b"s3 OK\r\n", b" (MESSAGES 1)\r\n", b"s3 OK done\r\n")),
    # Passive lines split across receives.
    (b"s4", (b"* SEARCH 1 ", b"2\r\ns4 OK\r\n")),
    (b"s5", (b"* SEARCH 1 2\r", b"\n", b"s5 OK\r", b"\n")),
    # A literal at the end of a `* SEARCH` (bare LF), its octets a tagged answer's start.
    (b"s6", (b"* FLAGS (\\Seen)\r\n* SEARCH 1 {3}\n", b"s6 ", b"OK\r\n", b"s6 NO later\r\n")),
    # Many kinds in one receive: one match.
    (
        b"s7",
        (
            b"* ENABLED\r\n* SORT 1\r\n* THREAD (1)\r\n* ESEARCH (TAG s7) ALL 1\r\n"
            b'* LSUB () "/" x\r\n* 3 EXISTS\r\ns7 OK fine\r\n',
        ),
    ),
    # A literal ending a `* STATUS` line, then the answer in the same receive as the literal.
    (b"s8", (b"* STATUS x {2}\r\n", b"ab\r\ns8 OK\r\n")),
    # Look-alikes (`* SEARCHX`, `* search`, a `}` at a line's end, an ID) before an answer.
    (b"s9", (b'* SEARCHX 1\r\n* search 1\r\n* LSUB () "/" x}\r\ns9 OK a\r\n',)),
    (b"t1", (b'* ID ("name" "x")\r\nt1 OK\r\n',)),
    # A passive line's literal whose octets end the receive as a tagged answer would: `* LIST`
    # with a literal mailbox, `* STATUS` after a bare LF, `* SEARCH`.
    (b"u1", (b'* LIST () "/" {6}\r\nu1 OK\r\n', b"u1 OK listed\r\n")),
    (b"u2", (b"* STATUS {5}\nu2 OK\n", b"u2 OK done\r\n")),
    (b"u3", (b"* FLAGS ()\r\n* SEARCH {6}\r\nu3 NO\r\n", b"u3 OK\r\n")),
]
COMMANDS = {
    b"s1": b"SEARCH ALL",
    b"s2": b"LIST x *",
    b"s3": b"STATUS x (MESSAGES)",
    b"s4": b"SEARCH ALL",
    b"s5": b"SEARCH ALL",
    b"s6": b"SEARCH ALL",
    b"s7": b"NOOP",
    b"s8": b"STATUS x (MESSAGES)",
    b"s9": b"SEARCH ALL",
    b"t1": b"NOOP",
    b"u1": b"LIST x *",
    b"u2": b"STATUS x (MESSAGES)",
    b"u3": b"SEARCH ALL",
}


def against_passive(address: tuple[str, int], fed: Fed) -> tuple[bytes, int]:
    with Typist(address, fed) as c:
        c.greeting()
        assert c.ask(b"L", b"LOGIN x y").startswith(b"L OK"), c.transcript
        for tag, pieces in ANSWERS:
            c.alone(tag + b" " + COMMANDS[tag] + b"\r\n")
            last = pieces[-1] if pieces[-1] != b"\n" else pieces[-2] + pieces[-1]
            c.through(last)
        c.alone(b"Q LOGOUT\r\n")
        return c.rest(), c.sent


async def test_passive_lines_from_a_scripted_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = Fed(monkeypatch)
    outcomes = []
    for _ in fed.each_way():
        server = Passive(fed)
        async with serve(server.script, server.sent) as address, veil(address, tmp_path) as v:
            transcript, sent = await run(against_passive, v.address, fed)
            (end,) = await v.sessions_ended(1)
        outcomes.append((transcript, comparable(v.sink.records), list(fed.taken)))
        # Shown as it came (a server's ID too: no policy here).
        assert transcript == bytes(server.sent), transcript
        # Every answer paired with its command, in order: none taken from inside a literal.
        assert [(r.tag, r.status) for r in v.sink.of(CommandCompleted)] == [
            ("L", "OK"),
            *((tag.decode(), "NO" if tag == b"s6" else "OK") for tag, _ in ANSWERS),
            ("Q", "OK"),
        ]
        assert v.sink.of(Violation) == []
        assert (end.reason, end.bytes_from_client, end.bytes_from_server) == (
            "logout",
            sent,
            len(server.sent),
        )
    fast, general = outcomes
    assert fast[:2] == general[:2]
    assert general[2] == []
    # The chunks taken in one match, by the tag of their last line.
    assert [d.splitlines()[-1].split(b" ")[0] for s, d in fast[2] if s == "s"] == [
        b"L",
        b"s1",
        b"s2",  # `s2 OK listed` alone, after the literal and its line end
        b"s3",
        b"s6",
        b"s7",
        b"u1",  # `u1 OK listed`, alone
        b"u2",
        b"u3",
        b"Q",  # the LOGOUT's answer after its BYE
    ], fast[2]
