"""Literal bodies spliced between plain TCP legs (`relay/splice.py`), with a real Dovecot.

Every test says whether splice(2) ran (`splice.totals`, counted from what `os.splice` returned),
so none of them passes the same whether or not the octets took the kernel's way; the records
of a spliced session are compared with those of the same session relayed the normal way
(`splice.AVAILABLE` off).
"""

from __future__ import annotations

import errno
import hashlib
import imaplib
import os
import socket
import struct
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import pytest
import trio

from imapveil.records import CommandCompleted, Record, SessionEnded, Violation
from imapveil.relay import splice
from imapveil.relay.streams import RECEIVE_SIZE
from tests.conftest import RunningProxy, TlsMaterial, start_proxy
from tests.helpers.dovecot import Dovecot
from tests.helpers.scripted import Peer, fetch_until_closed, serve
from tests.relay.test_ja4_dovecot import tls_proxy
from tests.relay.test_traits_dovecot import DeflatingIMAP4

pytestmark = pytest.mark.dovecot
run = trio.to_thread.run_sync

USERS = {"sam": "splice", "ann": "append"}
R = TypeVar("R", bound=Record)


def random_message(size: int) -> bytes:
    """A message whose body is random octets (8-bit, no NUL), in lines of 998 and CRLF."""
    raw = os.urandom(size).translate(bytes.maketrans(b"\0\r\n", b"xyz"))
    body = b"\r\n".join(raw[i : i + 998] for i in range(0, len(raw), 998))
    return b"From: s@example.org\r\nSubject: spliced\r\n\r\n" + body + b"\r\n"


MESSAGE = random_message(6 * 1024 * 1024)
SMALL = b"Subject: small\r\n\r\nunder the splice threshold\r\n"
HUGE = random_message(24 * 1024 * 1024)  # more than the socket buffers on the way hold


@pytest.fixture(scope="module")
def server() -> Iterator[Dovecot]:
    """A Dovecot of its own: `sam` has MESSAGE, SMALL and HUGE; `ann` receives APPENDs."""
    dovecot = Dovecot(users=USERS).start()
    try:
        dovecot.seed("sam", [MESSAGE, SMALL, HUGE])
        yield dovecot
    finally:
        dovecot.cleanup()


def imap_fetch(address: tuple[str, int], numbers: tuple[int, ...] = (1, 2)) -> list[bytes]:
    m = imaplib.IMAP4(*address)
    try:
        m.login("sam", "splice")
        m.select("INBOX", readonly=True)
        bodies = []
        for n in numbers:
            typ, data = m.fetch(str(n), "(BODY.PEEK[])")
            assert typ == "OK"
            first = data[0]
            assert isinstance(first, tuple)
            bodies.append(first[1])
        return bodies
    finally:
        m.logout()


def imap_append(address: tuple[str, int], message: bytes) -> None:
    m = imaplib.IMAP4(*address)
    try:
        m.login("ann", "append")
        typ, _ = m.append("INBOX", None, None, message)  # {N}, then the body after "+"
        assert typ == "OK"
    finally:
        m.logout()


def last_message(address: tuple[str, int]) -> bytes:
    m = imaplib.IMAP4(*address)
    try:
        m.login("ann", "append")
        _typ, data = m.select("INBOX", readonly=True)
        count = data[0]
        assert count is not None
        typ, fetched = m.fetch(count.decode(), "(BODY.PEEK[])")
        assert typ == "OK" and isinstance(fetched[0], tuple)
        return fetched[0][1]
    finally:
        m.logout()


@dataclass
class Outcome:
    """A proxy's records, and what was spliced while it ran."""

    records: list[Record] = field(default_factory=list)
    octets: int = 0
    literals: int = 0

    def of(self, kind: type[R]) -> list[R]:
        return [r for r in self.records if isinstance(r, kind)]

    @property
    def end(self) -> SessionEnded:
        (end,) = self.of(SessionEnded)
        return end

    def commands(self) -> list[tuple[str, str | None, str, tuple[int, ...]]]:
        return [(r.verb, r.status, r.state, r.literals) for r in self.of(CommandCompleted)]

    def ending(self) -> tuple[str, str | None, str, int]:
        end = self.end
        return (end.reason, end.detail, end.state, end.commands)


@asynccontextmanager
async def measured(
    upstream: tuple[str, int], sessions: int = 1, **core: object
) -> AsyncIterator[tuple[RunningProxy, Outcome]]:
    """A proxy for the block; then (once `sessions` sessions have ended) its records and what
    was spliced meanwhile."""
    octets, literals = splice.totals.octets, splice.totals.literals
    outcome = Outcome()
    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(nursery, upstream, **core)
        yield proxy, outcome
        await proxy.sink.wait_for(SessionEnded, sessions)
        proxy.proxy.stop()
    outcome.records = list(proxy.sink.records)
    outcome.octets = splice.totals.octets - octets
    outcome.literals = splice.totals.literals - literals


@pytest.fixture(params=["splice", "normal"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with splice(2), and again the normal way: both must end alike."""
    if request.param == "normal":
        monkeypatch.setattr(splice, "AVAILABLE", False)
    return str(request.param)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_fetch_is_spliced_byte_identical_and_recorded_alike(
    server: Dovecot, monkeypatch: pytest.MonkeyPatch
) -> None:
    direct = await run(imap_fetch, server.address)
    async with measured(server.address) as (proxy, spliced):
        via_splice = await run(imap_fetch, proxy.address)
    assert [digest(b) for b in via_splice] == [digest(b) for b in direct]
    assert digest(via_splice[0]) == digest(MESSAGE)
    # The big body took the kernel's way, all of it but what came with the FETCH line (one
    # receive at most); the small one did not.
    assert spliced.literals == 1
    assert len(MESSAGE) - RECEIVE_SIZE <= spliced.octets <= len(MESSAGE)

    monkeypatch.setattr(splice, "AVAILABLE", False)
    async with measured(server.address) as (proxy, normal):
        via_normal = await run(imap_fetch, proxy.address)
    assert via_normal == via_splice
    assert (normal.octets, normal.literals) == (0, 0)
    # What the records say does not depend on the way the octets took.
    assert spliced.commands() == normal.commands()
    assert spliced.ending() == normal.ending() == ("logout", None, "logout", 6)  # CAPABILITY first
    assert spliced.end.bytes_from_client == normal.end.bytes_from_client
    # Dovecot's tagged OKs tell timings ("(0.001 + 0.000 + 0.001 secs)"), whose text varies:
    # the octet for octet comparison is test_every_octet_is_counted_as_on_the_normal_path.
    assert abs(spliced.end.bytes_from_server - normal.end.bytes_from_server) < 100
    assert spliced.end.bytes_from_server > len(MESSAGE) + len(SMALL)
    assert not spliced.of(Violation) and not normal.of(Violation)


async def test_append_body_is_spliced_after_the_servers_continuation(
    server: Dovecot, way: str
) -> None:
    message = random_message(3 * 1024 * 1024)
    async with measured(server.address) as (proxy, outcome):
        await run(imap_append, proxy.address, message)
    assert digest(await run(last_message, server.address)) == digest(message)
    if way == "splice":
        assert outcome.literals == 1
        assert len(message) - RECEIVE_SIZE <= outcome.octets <= len(message)
    else:
        assert (outcome.octets, outcome.literals) == (0, 0)
    (append,) = [c for c in outcome.commands() if c[0] == "APPEND"]
    assert append == ("APPEND", "OK", "authenticated", (len(message),))
    assert outcome.ending() == ("logout", None, "logout", 4)
    assert len(message) < outcome.end.bytes_from_client < len(message) + 200
    assert not outcome.of(Violation)


def stalled_fetch(address: tuple[str, int], stalled: threading.Event, go: threading.Event) -> bytes:
    """FETCH HUGE, read its first line, stop reading until `go`; then read it all."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(30)
        s.connect(address)
        with s.makefile("rb") as f:
            f.readline()
            s.sendall(b"a1 LOGIN sam splice\r\n")
            assert f.readline().startswith(b"a1 OK")
            s.sendall(b"a2 EXAMINE INBOX\r\n")
            while not f.readline().startswith(b"a2 "):
                pass
            s.sendall(b"a3 FETCH 3 BODY.PEEK[]\r\n")
            assert f.readline() == b"* 3 FETCH (BODY[] {%d}\r\n" % len(HUGE)
            stalled.set()
            go.wait(30)
            body = f.read(len(HUGE))
            assert f.readline() == b")\r\n"
            assert f.readline().startswith(b"a3 OK")
            s.sendall(b"a4 LOGOUT\r\n")
            while not f.readline().startswith(b"a4 "):
                pass
        return body


async def test_a_client_that_stops_reading_stalls_only_its_own_session(server: Dovecot) -> None:
    stalled, go = threading.Event(), threading.Event()
    bodies: list[bytes] = []
    async with (
        measured(server.address, sessions=2) as (proxy, outcome),
        trio.open_nursery() as nursery,
    ):

        async def slow() -> None:
            bodies.append(await run(stalled_fetch, proxy.address, stalled, go))

        nursery.start_soon(slow)
        await run(stalled.wait, 30)
        (slow_session,) = proxy.proxy.connections
        # Its pump is stuck in splice(2) to a client that does not read, holding the client
        # leg's lock (its pipe is not empty): only the buffers on the way hold the rest.
        with trio.fail_after(10):
            while not slow_session.client.write_lock.locked():  # noqa: ASYNC110 -- a lock has no event to wait for
                await trio.sleep(0.01)
        moved = splice.totals.octets
        # Meanwhile another session fetches the same message, all of it, by splice too.
        (other,) = await run(imap_fetch, proxy.address, (3,))
        assert digest(other) == digest(HUGE)
        assert splice.totals.octets - moved >= len(HUGE) - RECEIVE_SIZE
        assert slow_session.client.write_lock.locked()  # still stuck
        go.set()
    assert digest(bodies[0]) == digest(HUGE)
    assert outcome.literals == 2
    assert [e.reason for e in outcome.of(SessionEnded)] == ["logout", "logout"]


class FakeUpstream:
    """An upstream whose every octet the test knows: it answers LOGIN, then a FETCH with a
    literal of 4 MiB, sent in pieces of 64 KiB. `ending`: "complete" (the rest of the answer,
    then LOGOUT), "close" or "reset" (after 1 MiB of the literal)."""

    LITERAL = 4 * 1024 * 1024

    def __init__(self, ending: str) -> None:
        self.ending = ending
        self.sent = bytearray()

    async def script(self, peer: Peer) -> None:
        await peer.say(b"* OK fake IMAP ready\r\n")
        assert (await peer.line()).startswith(b"a1 LOGIN")
        await peer.say(b"a1 OK logged in\r\n")
        assert (await peer.line()).startswith(b"a2 FETCH")
        await peer.say(b"* 1 FETCH (BODY[] {%d}\r\n" % self.LITERAL)
        complete = self.ending == "complete"
        for _ in range(64 if complete else 16):
            await peer.say(os.urandom(64 * 1024))
        if complete:
            await peer.say(b")\r\na2 OK done\r\n")
            assert (await peer.line()).startswith(b"a3 LOGOUT")
            await peer.say(b"* BYE bye\r\na3 OK bye\r\n")  # and closes, as Dovecot does
        if self.ending == "reset":
            linger = struct.pack("ii", 1, 0)
            peer.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        await trio.aclose_forcefully(peer.stream)


@asynccontextmanager
async def fake_upstream(ending: str) -> AsyncIterator[tuple[FakeUpstream, tuple[str, int]]]:
    upstream = FakeUpstream(ending)
    async with serve(upstream.script, upstream.sent) as address:
        yield upstream, address


async def test_every_octet_is_counted_as_on_the_normal_path(way: str) -> None:
    async with (
        fake_upstream("complete") as (upstream, address),
        measured(address) as (proxy, outcome),
    ):
        received = await run(fetch_until_closed, proxy.address)
    assert received == upstream.sent  # nothing to rewrite in this conversation
    end = outcome.end
    assert (end.reason, end.bytes_from_server) == ("logout", len(upstream.sent))
    assert end.bytes_from_client == len(b"a1 LOGIN x y\r\na2 FETCH 1 BODY[]\r\na3 LOGOUT\r\n")
    assert outcome.commands() == [
        ("LOGIN", "OK", "not_authenticated", ()),
        ("FETCH", "OK", "authenticated", ()),
        ("LOGOUT", "OK", "authenticated", ()),
    ]
    if way == "splice":
        assert outcome.literals == 1
        assert FakeUpstream.LITERAL - RECEIVE_SIZE <= outcome.octets <= FakeUpstream.LITERAL
    else:
        assert (outcome.octets, outcome.literals) == (0, 0)


@pytest.mark.parametrize("ending", ["close", "reset"])
async def test_server_closing_mid_literal_ends_that_session(way: str, ending: str) -> None:
    async with (
        fake_upstream(ending) as (upstream, address),
        measured(address) as (proxy, outcome),
    ):
        received = await run(fetch_until_closed, proxy.address)
    end = outcome.end
    assert (end.reason, end.detail) == ("server_closed", "mid_literal")
    # What the client got is exactly what the core counted, the server's octets in order.
    assert end.bytes_from_server == len(received)
    assert received == upstream.sent[: len(received)]
    if ending == "close":
        assert received == upstream.sent
    assert outcome.commands() == [
        ("LOGIN", "OK", "not_authenticated", ()),
        ("FETCH", None, "authenticated", ()),
    ]
    assert {type(r).__name__ for r in outcome.records} <= {
        "SessionStarted", "CommandCompleted", "SessionTraits", "SessionEnded",
    }  # fmt: skip
    if way == "splice" and ending == "close":
        assert outcome.literals == 1 and outcome.octets > 0
    if way == "normal":
        assert outcome.octets == 0


def append_then_vanish(address: tuple[str, int], reset: bool) -> int:
    """APPEND a 4 MiB literal, send 1 MiB of it, then close or reset; the octets sent."""
    with socket.create_connection(address, timeout=30) as s:
        f = s.makefile("rb")
        f.readline()
        sent = b"a1 LOGIN ann append\r\na2 APPEND INBOX {%d}\r\n" % (4 * 1024 * 1024)
        s.sendall(sent[:21])
        assert f.readline().startswith(b"a1 OK")
        s.sendall(sent[21:])
        assert f.readline().startswith(b"+")
        for _ in range(16):
            piece = os.urandom(64 * 1024)
            s.sendall(piece)
            sent += piece
        f.close()
        if reset:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return len(sent)


@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
async def test_client_vanishing_mid_append_literal_ends_that_session(
    server: Dovecot, way: str, reset: bool
) -> None:
    async with measured(server.address) as (proxy, outcome):
        sent = await run(append_then_vanish, proxy.address, reset)
    end = outcome.end
    assert (end.reason, end.detail) == ("client_closed", "mid_literal")
    assert end.bytes_from_client <= sent
    if not reset:
        assert end.bytes_from_client == sent
    assert outcome.commands() == [
        ("LOGIN", "OK", "not_authenticated", ()),
        ("APPEND", None, "authenticated", (4 * 1024 * 1024,)),
    ]
    assert not outcome.of(Violation)
    if way == "splice" and not reset:
        assert outcome.literals == 1 and outcome.octets > 0
    if way == "normal":
        assert outcome.octets == 0


def fetch_then_reset(address: tuple[str, int]) -> None:
    with socket.create_connection(address, timeout=30) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"a1 LOGIN sam splice\r\na2 EXAMINE INBOX\r\n")
        while not f.readline().startswith(b"a2 "):
            pass
        s.sendall(b"a3 FETCH 3 BODY.PEEK[]\r\n")
        f.readline()
        f.read(512 * 1024)
        f.close()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def test_client_resetting_mid_fetch_literal_ends_that_session(
    server: Dovecot, way: str
) -> None:
    async with measured(server.address) as (proxy, outcome):
        await run(fetch_then_reset, proxy.address)
        # The proxy goes on serving.
        (body,) = await run(imap_fetch, proxy.address, (1,))
        await proxy.sink.wait_for(SessionEnded, 2)
    assert digest(body) == digest(MESSAGE)
    first, second = outcome.of(SessionEnded)
    # A reset is seen by the reader of that leg or by the writer to it (a failed send),
    # whichever comes first: either way the client closed, and nothing else ends.
    assert first.reason == "client_closed", first
    assert second.reason == "logout"
    assert first.bytes_from_server < len(HUGE)
    assert not outcome.of(Violation)
    if way == "splice":
        assert outcome.literals >= 2  # the reset session's, and the next one's
    else:
        assert (outcome.octets, outcome.literals) == (0, 0)


def _no_pipe(source: object) -> splice.Pipe:
    raise OSError(errno.EMFILE, "Too many open files")


def _splice_refused(*args: object, **kwargs: object) -> int:
    raise OSError(errno.EINVAL, "Invalid argument")


@pytest.mark.parametrize("failure", ["no_pipe", "splice_refused"])
async def test_when_splice_cannot_run_the_session_goes_on_the_normal_way(
    server: Dovecot, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    if failure == "no_pipe":
        monkeypatch.setattr(splice, "Pipe", _no_pipe)
    else:
        monkeypatch.setattr(os, "splice", _splice_refused)  # what relay/splice.py calls
    async with measured(server.address) as (proxy, outcome):
        bodies = await run(imap_fetch, proxy.address)
    assert digest(bodies[0]) == digest(MESSAGE)
    assert outcome.octets == 0
    assert outcome.literals == (1 if failure == "splice_refused" else 0)  # tried, refused
    assert outcome.ending() == ("logout", None, "logout", 6)
    assert outcome.end.bytes_from_server > len(MESSAGE)


def compressed_fetch(address: tuple[str, int]) -> bytes:
    m = DeflatingIMAP4(*address)
    m.login("sam", "splice")
    m.compress()
    m.select("INBOX", readonly=True)
    typ, data = m.fetch("1", "(BODY.PEEK[])")
    assert typ == "OK" and isinstance(data[0], tuple)
    m.logout()
    return data[0][1]


async def test_a_compress_deflate_session_is_relayed_without_splice(server: Dovecot) -> None:
    async with measured(server.address, compress=True) as (proxy, outcome):
        body = await run(compressed_fetch, proxy.address)
    assert digest(body) == digest(MESSAGE)
    assert outcome.end.compressed
    assert (outcome.octets, outcome.literals) == (0, 0)


async def test_an_implicit_tls_session_is_relayed_without_splice(
    server: Dovecot, tls_material: TlsMaterial
) -> None:
    def tls_fetch(port: int) -> bytes:
        context = tls_material.client_context()
        m = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=context, timeout=30)
        m.login("sam", "splice")
        m.select("INBOX", readonly=True)
        typ, data = m.fetch("1", "(BODY.PEEK[])")
        assert typ == "OK" and isinstance(data[0], tuple)
        m.logout()
        return data[0][1]

    async with tls_proxy(server, tls_material) as p:
        octets = splice.totals.octets
        body = await run(tls_fetch, p.tls_port)
        await p.sink.wait_for(SessionEnded, 1)
        assert splice.totals.octets == octets  # TLS on the client leg: the normal path
        (plain,) = await run(imap_fetch, ("127.0.0.1", p.plain_port), (1,))
        await p.sink.wait_for(SessionEnded, 2)
        assert splice.totals.octets > octets  # the same proxy splices a plain session
    assert digest(body) == digest(plain) == digest(MESSAGE)
    first, _second = p.sink.of(SessionEnded)
    assert first.client_tls and first.reason == "logout"


def tcp_pair() -> tuple[trio.socket.SocketType, socket.socket]:
    """A connected pair on loopback: the relay's end (trio, nonblocking) and the peer's."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.create_connection(listener.getsockname()[:2])
        ours, _ = listener.accept()
    ours.setblocking(False)
    return trio.socket.from_stdlib_socket(ours), peer


async def test_the_last_octets_of_a_literal_wake_the_relay_whatever_mark_was_left() -> None:
    """The kernel may wake a splice before the low-water mark is reached (it did, now and then,
    with 102,406 of 102,407 octets there); the wait for the rest must then not keep the mark it
    set for the whole literal, or the last octet sits in the socket until the session times out
    (the case `append-sync-cut-at-last-octet` in tests/relay/test_attack_perf.py)."""
    ours, peer = tcp_pair()
    with ours, peer:
        pipe = splice.Pipe(ours)
        try:
            pipe._lowat(100_000)  # what a wake-up short of the mark leaves behind
            peer.sendall(b"x\r\nb ID NIL\r\n")
            with trio.fail_after(2):
                assert await pipe.fill(1) == 1
            assert pipe.take() == b"x"
            assert pipe.lowat == 1
        finally:
            pipe.close()
