"""Round 15 of attacks from outside, on the server's side of the stream: the upstream's bytes are
the attack (a misbehaving or compromised server, or Dovecot made to echo a client's bytes),
through the proxy (built as `imapveil serve` builds it) to a scripted server where the exact
hostile octets matter, and to a real Dovecot where Dovecot decides the outcome.

- A line the proxy cannot read (a tagged status other than OK/NO/BAD, no tag at all, a NUL, an
  answer to a tag never sent or answered twice, a literal whose octets cannot be counted, a
  line longer than the proxy holds whose fate is not "as it came": a "+", a CAPABILITY list, an
  ID) was recorded and forwarded as it came. Now the client is told `* BYE [SERVERBUG]`, both
  legs close, the commands in flight get records without a status; nothing of the line goes
  out.
- The server's `* ID` with a value in a literal (Dovecot writes an 8-bit `imap_id_send` value
  so) went to the client as it came, past the policy; a malformed one too; and a rewritten one
  whose kept value needs a literal was left as it came, the fields the policy dropped with it.
  Now it is collected whole and filtered, malformed ones go out as `* ID NIL`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from imapveil.policy_files import resolve_policy
from imapveil.records import CommandCompleted, IdExchange, Violation
from tests.helpers.attack import Client, own_dovecot, veil
from tests.helpers.dovecot import Dovecot
from tests.helpers.scripted import Peer, serve
from tests.relay.test_attack_simple import Fed, Scripted, Typist, comparable

run = trio.to_thread.run_sync

GREETING = b"* OK [CAPABILITY IMAP4rev1 LITERAL+ ID IDLE] fake ready\r\n"
BYE = b"* BYE [SERVERBUG] Response from the mail server not understood\r\n"
PASSWORD = b"pw-3f9a1c77e2"
UUID = b"0a1b2c3d-1111-2222-3333-444455556666"
LONG = b"x" * 70_000  # more than the proxy holds of a line (64 KiB)


class Hostile(Scripted):
    """Greets, answers LOGIN, reads `b NOOP` and `c NOOP`, says `pieces` (each its own receive
    at the proxy), then reads until the proxy closes (`eof`)."""

    def __init__(self, fed: Fed, pieces: list[bytes]) -> None:
        super().__init__(fed)
        self.pieces = pieces
        self.eof = trio.Event()

    async def script(self, peer: Peer) -> None:
        await self._say(peer, GREETING)
        await self._line(peer, b"L LOGIN")
        await self._say(peer, b"L OK in\r\n")
        await self._line(peer, b"b NOOP")
        await self._line(peer, b"c NOOP")
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            for piece in self.pieces:
                await peer.say(piece)
                with contextlib.suppress(trio.TooSlowError):
                    await self.fed.server_fed(len(self.sent))
        with contextlib.suppress(trio.BrokenResourceError, OSError):
            while line := await peer.line():
                self.received.append(line)
        self.eof.set()


def hostile_client(address: tuple[str, int], fed: Fed) -> bytes:
    with Typist(address, fed) as c:
        c.greeting()
        c.alone(b"L LOGIN x " + PASSWORD + b"\r\n")
        c.through(b"L OK in\r\n")
        c.alone(b"b NOOP\r\nc NOOP\r\n")
        return c.rest()


# (what the server says, each its own receive; the violation's kind)
CASES: dict[str, tuple[list[bytes], str]] = {
    "tagged-preauth": ([b"b PREAUTH now\r\n"], "unparsable_response"),
    "tagged-bye": ([b"b BYE going\r\n"], "unparsable_response"),
    "no-tag": ([b")\r\n"], "unparsable_response"),
    "nul": ([b"\x00 OK\r\n"], "unparsable_response"),
    "cr-alone": ([b"\r\r\n"], "unparsable_response"),
    "bare-cr": ([b'b OK x\r* ID ("guid" "' + UUID + b'")\r\n'], "unparsable_response"),
    "unknown-tag": ([b"zz OK never sent\r\n"], "unknown_tag"),
    "capability-literal": (
        [b"* CAPABILITY IMAP4rev1 X {70}\r\n", b'* ID ("guid" "' + UUID + b'")\r\n' + b"x" * 16],
        "unparsable_response",
    ),
    "answered-twice": ([b"b OK\r\n", b"b OK again\r\n"], "unknown_tag"),
    "literal-too-large": ([b"* 1 FETCH (BODY[] {99999999999999999999}\r\n"], "bad_literal"),
    "literal-plus": (
        [b"* 1 FETCH (BODY[] {70+}\r\n", b'* ID ("guid" "' + UUID + b'")\r\n' + b"x" * 16],
        "bad_literal",
    ),
    "literal-digits": ([b"* 1 FETCH (BODY[] {123456789012345678901}\r\n"], "bad_literal"),
    "long-continuation": ([b"+ " + LONG[:66_000], LONG[66_000:] + b"\r\n"], "response_too_long"),
    "long-capability": (
        [b"* CAPABILITY IMAP4rev1 STARTTLS " + LONG[:66_000], LONG[66_000:] + b"\r\n"],
        "response_too_long",
    ),
    "long-id": (
        [b'* ID ("guid" "' + LONG[:66_000], LONG[66_000:] + b'")\r\n'],
        "response_too_long",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_a_server_line_the_proxy_cannot_read_ends_the_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Before round 15 each was recorded (or not) and forwarded as it came (the long ones
    streamed, the bad literal's octets counted as none, the unknown tag's shown)."""
    pieces, kind = CASES[name]
    fed = Fed(monkeypatch)
    outcomes = []
    for _ in fed.each_way():
        server = Hostile(fed, [b"* 3 EXISTS\r\n", *pieces, b"b OK\r\nc OK\r\n"])
        async with (
            serve(server.script, server.sent) as address,
            veil(address, tmp_path) as v,
        ):
            transcript = await run(hostile_client, v.address, fed)
            (end,) = await v.sessions_ended(1)
            with trio.fail_after(5):
                await server.eof.wait()  # the server's leg is closed too
        expected = GREETING + b"L OK in\r\n" + b"* 3 EXISTS\r\n"
        if name == "answered-twice":
            expected += b"b OK\r\n"
        assert transcript == expected + BYE
        assert [(r.source, r.kind, r.action) for r in v.sink.of(Violation)] == [
            ("server", kind, "closed")
        ]
        assert (end.reason, end.detail) == ("protocol_error", f"server: {kind}")
        answers = [(r.tag, r.status) for r in v.sink.of(CommandCompleted)]
        assert answers[0] == ("L", "OK")
        # The commands in flight have their records, without a status.
        assert set(answers[1:]) == (
            {("b", "OK"), ("c", None)} if name == "answered-twice" else {("b", None), ("c", None)}
        )
        assert server.received == [b"L LOGIN x " + PASSWORD + b"\r\n", b"b NOOP\r\n", b"c NOOP\r\n"]
        assert PASSWORD.decode() not in v.records_json()
        outcomes.append((transcript, comparable(v.sink.records)))
    fast, general = outcomes
    assert fast == general


# --- The server's ID.


class ServerId(Scripted):
    """Greets, answers LOGIN, answers the client's `i ID` with `answer`, then LOGOUT."""

    def __init__(self, fed: Fed, answer: bytes) -> None:
        super().__init__(fed)
        self.answer = answer

    async def script(self, peer: Peer) -> None:
        await self._say(peer, GREETING)
        await self._line(peer, b"L LOGIN")
        await self._say(peer, b"L OK in\r\n")
        await self._line(peer, b"i ID")
        await self._say(peer, self.answer + b"i OK ID completed\r\n")
        await self._line(peer, b"Q LOGOUT")
        await self._say(peer, b"* BYE bye\r\nQ OK\r\n")
        await trio.aclose_forcefully(peer.stream)


def id_client(address: tuple[str, int], fed: Fed) -> bytes:
    with Typist(address, fed) as c:
        c.greeting()
        c.alone(b"L LOGIN x y\r\n")
        c.through(b"L OK in\r\n")
        c.alone(b'i ID ("name" "Thunderbird")\r\n')
        c.until(b"i")
        c.alone(b"Q LOGOUT\r\n")
        return c.rest()


KEEP_ALL = """name = "keep-all"
default = { forward = "keep", record = "drop" }
detectors = ["uuid"]
detected = { forward = "drop", record = "drop" }
"""

ID_CASES: dict[str, tuple[bytes, str, bytes, str | None]] = {
    # (the server's ID, the policy, what the client is shown of it, the violation)
    "malformed": (
        b'* ID ("name" "Dovecot" "guid" "' + UUID + b'"\r\n',
        "default",
        b"* ID NIL\r\n",
        "malformed_id",
    ),
    "rewritten-8bit": (
        b'* ID ("name" "D\xc3\xb6vecot" "guid" "' + UUID + b'")\r\n',
        "keep-all",
        b'* ID ("name" {8}\r\nD\xc3\xb6vecot "x-imapveil" "imapveil ',
        None,
    ),
    "literal": (
        b'* ID ("name" "Dovecot" "guid" {36}\r\n' + UUID + b")\r\n",
        "default",
        b'* ID ("name" "Dovecot" "x-imapveil" "imapveil ',
        None,
    ),
}


@pytest.mark.parametrize("name", list(ID_CASES))
async def test_the_servers_id_never_passes_the_policy_as_it_came(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Before round 15 the three went to the client as they came, the UUID with them."""
    answer, policy, shown, violation = ID_CASES[name]
    if policy == "keep-all":
        (tmp_path / "keep-all.toml").write_text(KEEP_ALL)
        policy = str(tmp_path / "keep-all.toml")
    fed = Fed(monkeypatch)
    outcomes = []
    for _ in fed.each_way():
        server = ServerId(fed, answer)
        async with (
            serve(server.script, server.sent) as address,
            veil(address, tmp_path, policy=policy) as v,
        ):
            transcript = await run(id_client, v.address, fed)
            (end,) = await v.sessions_ended(1)
        assert UUID not in transcript
        assert shown in transcript, transcript
        assert transcript.endswith(b"i OK ID completed\r\n* BYE bye\r\nQ OK\r\n")
        assert UUID.decode() not in v.records_json()
        assert [r.kind for r in v.sink.of(Violation)] == ([violation] if violation else [])
        (exchange,) = v.sink.of(IdExchange)
        assert exchange.status == "OK"
        assert end.reason == "logout"
        outcomes.append((transcript, comparable(v.sink.records)))
    fast, general = outcomes
    assert fast == general


BIG_ID = (
    b'* ID ("name" "Dovecot" "guid" "'
    + UUID
    + b'" '
    + b" ".join(b'"f%d" "%s"' % (i, b"0123456789abcdef" * 64) for i in range(28))
    + b")\r\n"
)


async def test_a_flood_of_server_ids_is_decided_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """40 `* ID` lists of 30 values of 1024 octets answer one ID: each was decided (about 4 ms
    of the loop every session shares, 160 ms for this answer, without end for a server that
    goes on). The first is decided; the others go out as `* ID NIL`, unexamined."""
    decided = []
    real_apply = type(resolve_policy("default")).apply

    def apply(self: Any, fields: Any, **kwargs: Any) -> Any:
        decided.append(len(fields or ()))
        return real_apply(self, fields, **kwargs)

    monkeypatch.setattr(type(resolve_policy("default")), "apply", apply)
    fed = Fed(monkeypatch)
    server = ServerId(fed, BIG_ID * 40)
    async with (
        serve(server.script, server.sent) as address,
        veil(address, tmp_path) as v,
    ):
        transcript = await run(id_client, v.address, fed)
        (end,) = await v.sessions_ended(1)
    assert decided == [1, 30]  # the client's ID, the server's first
    assert transcript.count(b"* ID NIL\r\n") == 39
    assert UUID not in transcript
    assert end.reason == "logout"
    kinds = [(r.kind, r.action) for r in v.sink.of(Violation)]
    assert kinds[:20] == [("unexpected_id", "replaced")] * 20  # then one record for the rest


# --- Real Dovecot.


@contextlib.contextmanager
def dovecot_with(extra_config: str) -> Iterator[Dovecot]:
    server = Dovecot(extra_config=extra_config).start()
    try:
        yield server
    finally:
        server.cleanup()


BACKEND = "10.20.30.40"
"""An address Dovecot is told to send in its ID: the default policy's detectors drop it."""


@pytest.mark.dovecot
async def test_dovecots_id_with_a_literal_passes_the_policy(tmp_path: Path) -> None:
    """Dovecot writes an 8-bit `imap_id_send` value as a literal (`"name" {8}` CRLF `Dövecot`):
    that `* ID` went to the client as it came, the backend's address with it."""
    config = f'imap_id_send = name "D\u00f6vecot" x-backend "{BACKEND}"\n'
    with dovecot_with(config) as target:
        with Client(target.address) as c:  # the premise, on a direct connection
            c.greeting()
            c.send(b"i ID NIL\r\n")
            c.until(b"i")
            assert b'* ID ("name" {8}\r\nD\xc3\xb6vecot' in c.transcript, c.transcript
            assert BACKEND.encode() in c.transcript
        async with veil(target.address, tmp_path) as v:

            def session(address: tuple[str, int]) -> bytes:
                with Client(address) as c:
                    c.greeting()
                    c.send(b'i ID ("name" "Thunderbird")\r\n')
                    assert c.until(b"i").startswith(b"i OK")
                    c.login()
                    return c.logout()

            transcript = await run(session, v.address)
            (end,) = await v.sessions_ended(1)
    assert BACKEND.encode() not in transcript
    assert BACKEND not in v.records_json()
    # Neither field has a shape the policy keeps (the name is not ASCII): nothing is left.
    assert b"* ID NIL\r\ni OK" in transcript
    assert end.reason == "logout"
    assert not v.sink.of(Violation)


@pytest.mark.dovecot
async def test_well_formed_dovecot_traffic_trips_none_of_it(tmp_path: Path) -> None:
    """The control: a session of the usual commands (literals both ways, IDLE, ID, an ENVELOPE
    with a 70 KB subject, message data) ends with LOGOUT and no violation of the server's."""
    message = b"Subject: " + b"s" * 70_000 + b"\r\n\r\n" + b"line\r\n" * 20_000
    with own_dovecot() as target:
        async with veil(target.address, tmp_path) as v:

            def session(address: tuple[str, int]) -> bytes:
                with Client(address) as c:
                    c.greeting()
                    c.send(b'i ID ("name" "Thunderbird")\r\n')
                    assert c.until(b"i").startswith(b"i OK")
                    c.login()
                    c.send(b"c CREATE R15\r\n")
                    c.until(b"c")
                    c.send(b"a APPEND R15 {%d}\r\n" % len(message))
                    assert c.line().startswith(b"+")
                    c.send(message + b"\r\n")
                    assert c.until(b"a").startswith(b"a OK")
                    c.send(b"s SELECT R15\r\n")
                    assert c.until(b"s").startswith(b"s OK")
                    c.send(b"f FETCH 1 (FLAGS BODY.PEEK[] ENVELOPE)\r\n")
                    assert c.until(b"f").startswith(b"f OK")
                    c.send(b'l LIST "" *\r\n')
                    assert c.until(b"l").startswith(b"l OK")
                    c.send(b"d IDLE\r\n")
                    assert c.line().startswith(b"+")
                    c.send(b"DONE\r\n")
                    assert c.until(b"d").startswith(b"d OK")
                    return c.logout()

            transcript = await run(session, v.address)
            (end,) = await v.sessions_ended(1)
    lines = [line[:80] for line in transcript.split(b"\r\n") if not line.startswith(b"line")]
    assert end.reason == "logout", b"|".join(lines[-14:])
    assert not [r for r in v.sink.of(Violation) if r.source == "server"]
    assert all(r.status is not None for r in v.sink.of(CommandCompleted))
    assert json.loads(v.records_json())
