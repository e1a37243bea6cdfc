"""Tagged answers with CAPABILITY response codes in odd forms (02674f4: the one-match answer
declines a tagged answer whose code starts with CAPABILITY, any case, before reading its status
and code), attacked from outside (attack6): a scripted server through the proxy (as `imapveil
serve` builds it), each piece its own receive, run with the one-match paths and without
(`SessionCore.SIMPLE`): what the client is shown (the capability mediation) and the records
must be the same, and as the general path has them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from imapveil.records import CommandCompleted
from tests.helpers.attack import veil
from tests.helpers.scripted import Peer, serve
from tests.relay.test_attack_simple import Fed, Scripted, Typist, comparable

run = trio.to_thread.run_sync

CAPS = b"IMAP4rev1 COMPRESS=DEFLATE CLIENTID AUTH=SCRAM-SHA-256-PLUS IDLE"
"""A list the proxy mediates: COMPRESS (the proxy's own to offer), CLIENTID and channel
binding (`-PLUS`) are taken out of it."""
MEDIATED = b"IMAP4rev1 IDLE"

ANSWERS: list[tuple[bytes, list[bytes]]] = [
    # (the client's command, the server's answer in pieces: each its own receive)
    (b"L LOGIN x y\r\n", [b"L OK [capability " + CAPS + b"] lower case\r\n"]),
    (b"a NOOP\r\n", [b"a OK [CAPABILITYX " + CAPS + b"] not the code\r\n"]),
    (b"b NOOP\r\n", [b"b OK [CAPABILITY] empty\r\n"]),
    (b"c NOOP\r\n", [b"c NO [CAPABILITY " + CAPS + b"] on a NO\r\n"]),
    (b"d NOOP\r\n", [b"d BAD [Capability " + CAPS + b"] on a BAD\r\n"]),
    (
        b"e FETCH 1 FLAGS\r\nf NOOP\r\n",
        [
            b"* 1 FETCH (FLAGS (\\Seen))\r\ne OK [CAPABILITY " + CAPS + b"] fetched\r\n"
            b"f OK [CAPABILITY " + CAPS + b"] pipelined\r\n"
        ],
    ),
    (b"g NOOP\r\n", [b"g OK [CAPABI", b"LITY " + CAPS + b"] split\r\n"]),
    (
        b"h NOOP\r\n",
        [b"* OK [CAPABILITY " + CAPS + b"] untagged\r\nh OK [CAPABILITY  " + CAPS + b"] two\r\n"],
    ),
    (b"i NOOP\r\n", [b"i OK [CAPABILITY\t" + CAPS + b"] a tab\r\n"]),
    (b"j NOOP\r\n", [b"j OK  [CAPABILITY " + CAPS + b"] two spaces before\r\n"]),
    (b"k NOOP\r\n", [b"k OK [CAPABILITY " + CAPS + b"\r\n"]),  # never closed
    (b"z NOOP\r\n", [b"z OK plain\r\n"]),
]


class CapabilityCodes(Scripted):
    async def script(self, peer: Peer) -> None:
        await self._say(peer, b"* OK [CAPABILITY " + CAPS + b"] ready\r\n")
        for command, pieces in ANSWERS:
            for line in command.split(b"\r\n")[:-1]:
                await self._line(peer, line)
            await self._say(peer, *pieces)
        await self._line(peer, b"Q LOGOUT")
        await self._say(peer, b"* BYE bye\r\nQ OK\r\n")
        await trio.aclose_forcefully(peer.stream)


def client(address: tuple[str, int], fed: Fed) -> bytes:
    with Typist(address, fed) as c:
        c.greeting()
        for command, _pieces in ANSWERS:
            c.alone(command)
            last = command.split(b"\r\n")[-2].split(b" ")[0]
            assert c.until(last), c.transcript
        c.alone(b"Q LOGOUT\r\n")
        return c.rest()


async def test_capability_codes_in_odd_forms_are_shown_as_the_general_path_shows_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lower case, `[CAPABILITYX`, empty, on NO and BAD, after message data and pipelined,
    split across receives, after an untagged one, with a tab, two spaces, no `]`: the client
    sees the same with the one-match paths and without, the records are the same, and a code
    that is CAPABILITY (any case, whatever follows it, closed or not) is mediated wherever it
    is."""
    fed = Fed(monkeypatch)
    outcomes = []
    for _ in fed.each_way():
        server = CapabilityCodes(fed)
        async with (
            serve(server.script, server.sent) as address,
            veil(address, tmp_path) as v,
        ):
            transcript = await run(client, v.address, fed)
            await v.sessions_ended(1)
        commands = [(r.tag, r.status) for r in v.sink.of(CommandCompleted)]
        outcomes.append((transcript, comparable(v.sink.records), commands, list(fed.taken)))
    fast, general = outcomes
    assert fast[0] == general[0]
    assert fast[1] == general[1]
    assert general[3] == []
    assert ("s", b"z OK plain\r\n") in fast[3]  # the one-match path did run
    # Only the one whose `[` does not follow the status by one space (text, not a code: the
    # general path does not read it as one either) is taken in one match.
    assert [d[:1] for s, d in fast[3] if s == "s" and b"CAPABILITY" in d.upper()] == [b"j"]
    shown = fast[0].split(b"\r\n")
    assert b"L OK [capability " + MEDIATED + b"] lower case" in shown
    assert b"c NO [CAPABILITY " + MEDIATED + b"] on a NO" in shown
    assert b"d BAD [Capability " + MEDIATED + b"] on a BAD" in shown
    assert b"f OK [CAPABILITY " + MEDIATED + b"] pipelined" in shown
    assert b"g OK [CAPABILITY " + MEDIATED + b"] split" in shown
    assert b"h OK [CAPABILITY " + MEDIATED + b"] two" in shown
    # A tab for a space, no `]`: a lenient client may read the list all the same, so it is
    # mediated (written with spaces, and closed).
    assert b"i OK [CAPABILITY " + MEDIATED + b"] a tab" in shown
    assert b"k OK [CAPABILITY " + MEDIATED + b"]" in shown
    assert b"j OK  [CAPABILITY " + CAPS + b"] two spaces before" in shown  # text, not a code
    assert b"a OK [CAPABILITYX " + CAPS + b"] not the code" in shown
    assert b"CLIENTID" not in fast[0].split(b"a OK")[0]  # before the CAPABILITYX line
    assert fast[2] == [
        ("L", "OK"), ("a", "OK"), ("b", "OK"), ("c", "NO"), ("d", "BAD"), ("e", "OK"),
        ("f", "OK"), ("g", "OK"), ("h", "OK"), ("i", "OK"), ("j", "OK"), ("k", "OK"),
        ("z", "OK"), ("Q", "OK"),
    ]  # fmt: skip
