"""Round 17 of attacks from outside, on IDLE with COMPRESS=DEFLATE over TLS on the client leg
(STARTTLS, LOGIN, COMPRESS, IDLE), while the server floods untagged responses (EXISTS, FETCH
with a literal, a line longer than the proxy holds) and the client reads slowly or not at all.
Raw sockets through the proxy (built as `imapveil serve` builds it), to a scripted upstream
(what a hostile server does) or a real Dovecot (what a real one does). Found and fixed:

- A session that had decided to close waited for its last words without end: a client in IDLE
  that reads nothing, the server's reader blocked sending it an EXISTS, sends anything but DONE;
  the `* BYE` waited for the client leg's write lock, the close behind it, and the session (and
  its logged-in server connection) stayed until the idle timeout. The BYE of a timed-out
  session, said once the readers are stopped, to a client whose buffers are full, waited for
  good. Now what goes out once the session is closing waits at most `CLOSE_GRACE`.
- A TLS leg was closed by draining it through TLS, saying nothing: the client learnt that the
  session was over (its server gone mid-IDLE, a BYE, after its LOGOUT) `CLOSE_GRACE` (2 s)
  late, and then without close_notify. Now it gets our close_notify and FIN at once and is
  drained below its TLS; and the close_notify is said even when client records are left unread
  (OpenSSL's shutdown wrote it, then failed, and it was thrown away).

Held (kept as tests below where they add coverage): memory while the flood is unread (TLS on
one leg or both), another session's NOOPs meanwhile, DONE mid-flood an octet per TLS record, in
a partial flush, with commands pipelined after it; COMPRESS where DONE must be, DEFLATE on or
not; the TLS leg closed without close_notify; the server dropping mid-IDLE; new mail seen at
once (Dovecot itself takes 0.5 s to notify, with or without the proxy). Measured, not kept: a
flood of `* CAPABILITY` lines the proxy rewrites (each its own DEFLATE flush and TLS record)
keeps another session's NOOP p99 under 7 ms; DONE and 16 MiB of NOOPs in 24 KB of DEFLATE, the
answers unread: 1,000 commands wait (`max_unanswered`), the rest stays compressed in the
socket, the proxy's memory grows by about 2 MB, another session's NOOPs take 7 ms at most.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from imapveil.protocol.config import CoreConfig
from imapveil.records import Violation
from imapveil.relay.connection import Connection, RelaySettings
from imapveil.relay.streams import CLOSE_GRACE
from imapveil.relay.timers import Timers
from imapveil.sinks import MemorySink
from tests.conftest import TlsMaterial
from tests.helpers import scripted
from tests.helpers.attack import veil
from tests.helpers.dovecot import Dovecot

pytestmark = pytest.mark.dovecot
run = trio.to_thread.run_sync

MIB = 1 << 20
TIMEOUT = 10.0


def tls_settings(tls_material: TlsMaterial) -> dict[str, object]:
    return {
        "client_tls": "offer",
        "cert": str(tls_material.cert),
        "key": str(tls_material.key),
        "compress": True,
    }


def _line(s: socket.socket | ssl.SSLSocket) -> bytes:
    """One line, an octet at a time: nothing after it is taken from the socket."""
    got = bytearray()
    while not got.endswith(b"\n"):
        octet = s.recv(1)
        assert octet, bytes(got)
        got += octet
    return bytes(got)


class Squeezed:
    """A client whose leg is TLS (STARTTLS), then DEFLATE (COMPRESS after LOGIN)."""

    def __init__(
        self,
        address: tuple[str, int],
        context: ssl.SSLContext,
        *,
        rcvbuf: int | None = None,
        user: bytes = b"alice",
        password: bytes = b"wonderland",
        compress: bool = True,
    ) -> None:
        raw = socket.socket()
        if rcvbuf:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.settimeout(TIMEOUT)
        raw.connect(address)
        assert _line(raw).startswith(b"* OK")
        raw.sendall(b"s STARTTLS\r\n")
        assert _line(raw).startswith(b"s OK")
        self.sock = context.wrap_socket(
            raw, server_hostname="localhost", suppress_ragged_eofs=False
        )
        self.sock.sendall(b"L LOGIN " + user + b" " + password + b"\r\n")
        while not (got := _line(self.sock)).startswith(b"L "):
            pass
        assert got.startswith(b"L OK"), got
        self.compressed = compress
        if compress:
            self.sock.sendall(b"z COMPRESS DEFLATE\r\n")
            while not (got := _line(self.sock)).startswith(b"z "):
                pass
            assert got.startswith(b"z OK"), got
        self.deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        self.inflate = zlib.decompressobj(-15)
        self.buffer = bytearray()
        self.eof = False
        self.ragged = False  # the end came without the proxy's close_notify

    def __enter__(self) -> Squeezed:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.sock.close()

    def send(self, text: bytes, *, split: bool = False) -> None:
        """`text` compressed in one sync flush; `split`: each compressed octet a TLS record."""
        data = text
        if self.compressed:
            data = self.deflate.compress(text) + self.deflate.flush(zlib.Z_SYNC_FLUSH)
        if split:
            for i in range(len(data)):
                self.sock.sendall(data[i : i + 1])
        else:
            self.sock.sendall(data)

    def fill(self) -> bool:
        try:
            data = self.sock.recv(1 << 16)
        except (ConnectionResetError, ssl.SSLError) as exc:
            self.ragged = isinstance(exc, ssl.SSLEOFError)
            data = b""
        if not data:
            self.eof = True
            return False
        self.buffer += self.inflate.decompress(data) if self.compressed else data
        return True

    def line(self) -> bytes:
        while b"\n" not in self.buffer:
            if not self.fill():
                return b""
        end = self.buffer.index(b"\n") + 1
        got = bytes(self.buffer[:end])
        del self.buffer[:end]
        return got

    def until(self, tag: bytes) -> bytes:
        while line := self.line():
            if line.startswith(tag + b" "):
                return line
        return b""


# --- A server that floods an IDLE client.

LITERAL = 96 * 1024
FLOOD = b"".join(
    [b"* %d EXISTS\r\n* %d FETCH (FLAGS (\\Seen) UID %d)\r\n" % (n, n, n) for n in range(1, 500)]
    + [b"* 7 FETCH (UID 7 BODY[] {%d}\r\n" % LITERAL, b"x" * (LITERAL - 2) + b"\r\n", b")\r\n"]
    + [b"* SEARCH" + b" 123456789" * (200 * 1024) + b"\r\n"]  # 2 MB: longer than the proxy holds
)


class Flood:
    """A scripted upstream: LOGIN and any command get OK; IDLE gets `+ idling`, then `FLOOD`
    over and over until DONE comes (checked between two floods), then its OK."""

    def __init__(self, floods: int = 0) -> None:
        self.floods = floods  # if not 0: then the connection is closed, mid-IDLE
        self.sent = 0  # octets of floods sent
        self.done = 0  # DONEs read
        self.lines: list[bytes] = []  # what the proxy sent, but DONE
        self.closed = trio.Event()

    async def __call__(self, peer: scripted.Peer) -> None:
        try:
            await self._serve(peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await peer.stream.aclose()
            self.closed.set()

    async def _serve(self, peer: scripted.Peer) -> None:
        stream = peer.stream
        await stream.send_all(b"* OK [CAPABILITY IMAP4rev1 IDLE LITERAL+] flood ready\r\n")
        while line := await peer.line():
            self.lines.append(line)
            tag, _, rest = line.rstrip(b"\r\n").partition(b" ")
            verb = rest.split(b" ")[0].upper()
            if verb == b"IDLE":
                await stream.send_all(b"+ idling\r\n")
                if not await self._idle(peer):
                    return
                await stream.send_all(tag + b" OK idle done\r\n")
            elif verb == b"LOGOUT":
                await stream.send_all(b"* BYE bye\r\n" + tag + b" OK bye\r\n")
                return
            else:
                await stream.send_all(tag + b" OK " + verb + b" done\r\n")

    async def _idle(self, peer: scripted.Peer) -> bool:
        """The flood, until DONE (True) or the connection's end (False)."""
        finished = False
        floods = 0

        async def read_done() -> None:
            nonlocal finished
            line = await peer.line()
            if line == b"DONE\r\n":
                self.done += 1
            else:
                self.lines.append(line)
            finished = True

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_done)
            while not finished:
                if self.floods and floods == self.floods:
                    nursery.cancel_scope.cancel()
                    return False
                for at in range(0, len(FLOOD), 1 << 16):  # (a TLS peer's record buffer small)
                    await peer.stream.send_all(FLOOD[at : at + (1 << 16)])
                self.sent += len(FLOOD)
                floods += 1
        return self.lines[-1:] != [b""]


class SecureFlood(Flood):
    """`Flood` over implicit TLS: the proxy's upstream leg is TLS too."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__()
        self.context = context

    async def __call__(self, peer: scripted.Peer) -> None:
        tls = trio.SSLStream(peer.stream, self.context, server_side=True)
        await super().__call__(scripted.Peer(tls, bytearray()))  # type: ignore[arg-type]


def noops(address: tuple[str, int], count: int) -> list[float]:
    """A second client: LOGIN, then `count` NOOPs one after another: seconds each took."""
    took = []
    with socket.create_connection(address, timeout=TIMEOUT) as s, s.makefile("rb") as f:
        assert f.readline().startswith(b"* OK")
        s.sendall(b"L LOGIN bob builder\r\n")
        assert f.readline().startswith(b"L OK")
        for i in range(count):
            start = time.monotonic()
            s.sendall(b"n%d NOOP\r\n" % i)
            assert f.readline().startswith(b"n%d OK" % i)
            took.append(time.monotonic() - start)
        s.sendall(b"Q LOGOUT\r\n")
        f.read()
    return took


async def stalled(flood: Flood) -> None:
    """Until the flood has stopped moving (every buffer between it and the client full)."""
    with trio.fail_after(TIMEOUT):
        last = -1
        while flood.sent != last or flood.sent < len(FLOOD):
            last = flood.sent
            await trio.sleep(0.2)


@pytest.mark.parametrize("upstream_tls", ["plain", "implicit"])
async def test_a_flood_to_an_idle_client_that_does_not_read(
    tmp_path: Path, tls_material: TlsMaterial, upstream_tls: str
) -> None:
    """Held: a client in IDLE (TLS, then DEFLATE) that reads nothing while the server floods
    (EXISTS, FETCH, a literal, a 2 MB line that streams): the proxy keeps about one receive of
    it (what Python allocates, traced, from before the IDLE to the flood at a standstill and
    through a second session's NOOPs), the second session's NOOPs are answered at once, and a
    DONE that comes mid-flood, each octet of its DEFLATE in a TLS record of its own, ends the
    IDLE once the client reads again."""
    flood = Flood()
    settings = tls_settings(tls_material)
    if upstream_tls != "plain":
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_context.load_cert_chain(tls_material.cert, tls_material.key)
        flood = SecureFlood(server_context)
        settings |= {"upstream_tls": upstream_tls, "upstream_ca": str(tls_material.ca_file)}
    context = tls_material.client_context()
    tracemalloc.start()
    try:
        async with (
            scripted.serve(flood, bytearray()) as upstream,
            veil(upstream, tmp_path, **settings) as v,
        ):
            client = await run(lambda: Squeezed(v.address, context, rcvbuf=4096))
            with client:
                base, _ = tracemalloc.get_traced_memory()
                tracemalloc.reset_peak()
                await run(client.send, b"i IDLE\r\n")
                assert (await run(client.line)).startswith(b"+ idling")
                await stalled(flood)
                took = await run(noops, v.address, 20)
                await stalled(flood)
                _, peak = tracemalloc.get_traced_memory()
                await run(lambda: client.send(b"DONE\r\n", split=True))
                answer = await run(client.until, b"i")
                assert answer.startswith(b"i OK"), answer
                await run(client.send, b"Q LOGOUT\r\n")
                assert (await run(client.until, b"Q")).startswith(b"Q OK")
            ends = await v.sessions_ended(2)
    finally:
        tracemalloc.stop()
    assert flood.done == 1
    assert {end.reason for end in ends} == {"logout"}, ends
    assert max(took) < 0.25, took
    assert peak - base < 2 * MIB, f"{peak - base} octets more at the most"


def append_directly(address: tuple[str, int], user: bytes, password: bytes) -> None:
    with socket.create_connection(address, timeout=TIMEOUT) as s, s.makefile("rb") as f:
        assert f.readline().startswith(b"* OK")
        message = b"Subject: hi\r\n\r\nhi\r\n"
        s.sendall(
            b"L LOGIN %s %s\r\na APPEND INBOX {%d+}\r\n%s\r\n"
            % (user, password, len(message), message)
        )
        while not (line := f.readline()).startswith(b"a "):
            assert line
        assert line.startswith(b"a OK"), line
        s.sendall(b"Q LOGOUT\r\n")
        f.read()


async def test_an_idle_client_sees_new_mail_at_once(
    target: Dovecot, tmp_path: Path, tls_material: TlsMaterial
) -> None:
    context = tls_material.client_context()
    async with veil(target.address, tmp_path, **tls_settings(tls_material)) as v:
        client = await run(lambda: Squeezed(v.address, context, user=b"bob", password=b"builder"))
        with client:
            await run(client.send, b"s SELECT INBOX\r\n")
            assert (await run(client.until, b"s")).startswith(b"s OK")
            await run(client.send, b"i IDLE\r\n")
            assert (await run(client.line)).startswith(b"+ idling")
            start = time.monotonic()
            await run(append_directly, target.address, b"bob", b"builder")
            while not (line := await run(client.line)).endswith(b" EXISTS\r\n"):
                assert line
            took = time.monotonic() - start
            await run(client.send, b"DONE\r\n")
            assert (await run(client.until, b"i")).startswith(b"i OK")
        await v.sessions_ended(1)
    print("took", took)
    assert took < 2


class Blocked:
    """After IDLE's `+ idling`, one EXISTS line at a time, each once the proxy has read the one
    before, until the proxy's send of one to the client waits (the client reads nothing): the
    proxy's reader of this server is then blocked at a response boundary. Then silence, until
    the proxy closes."""

    def __init__(self) -> None:
        self.proxy: object = None
        self.blocked = trio.Event()
        self.closed = trio.Event()

    async def __call__(self, peer: scripted.Peer) -> None:
        try:
            stream = peer.stream
            await stream.send_all(b"* OK [CAPABILITY IMAP4rev1 IDLE] ready\r\n")
            while line := await peer.line():
                tag, _, rest = line.rstrip(b"\r\n").partition(b" ")
                if rest.upper() != b"IDLE":
                    await stream.send_all(tag + b" OK done\r\n")
                    continue
                await stream.send_all(b"+ idling\r\n")
                (conn,) = self.proxy.connections  # type: ignore[attr-defined]
                n = 0
                await trio.testing.wait_all_tasks_blocked()  # the "+" on its way
                while not conn.client.write_lock.locked():
                    n += 1
                    await stream.send_all(b"* %d EXISTS\r\n" % n)
                    await trio.testing.wait_all_tasks_blocked()  # read, sent or waiting
                self.blocked.set()
                while await peer.line():
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self.closed.set()


async def test_a_closing_session_does_not_wait_for_a_client_that_reads_nothing(
    tmp_path: Path, tls_material: TlsMaterial
) -> None:
    """Found (attack17i): a client in IDLE that reads nothing, the server's reader blocked
    sending it an EXISTS (under the client leg's write lock, at a response boundary), sends
    something other than DONE. The core decides `* BYE` and the close; the BYE waited for the
    lock, the close behind it, and the session stayed open, its server connection logged in and
    idling, until the idle timeout (31 minutes) or for as long as the client kept its window
    shut. Now what is said once the session is closing waits at most `CLOSE_GRACE`."""
    server = Blocked()
    context = tls_material.client_context()
    async with (
        scripted.serve(server, bytearray()) as upstream,
        veil(upstream, tmp_path, **tls_settings(tls_material)) as v,
    ):
        server.proxy = v.proxy
        client = await run(lambda: Squeezed(v.address, context, rcvbuf=4096))
        with client:
            await run(client.send, b"i IDLE\r\n")
            with trio.fail_after(TIMEOUT):
                await server.blocked.wait()
            (conn,) = v.proxy.connections
            assert conn.core._out.can_speak  # the BYE is due at once, not at a boundary to come
            await run(client.send, b"x NOOP\r\n")
            with trio.fail_after(CLOSE_GRACE + 2):
                await server.closed.wait()
                (end,) = await v.sessions_ended(1)
    assert end.reason == "protocol_error", end
    assert [r.kind for r in v.sink.of(Violation)] == ["idle_not_done"]


async def test_the_bye_of_a_timed_out_session_waits_for_no_full_socket() -> None:
    """The same for the proxy's own last words outside a reader: a session timed out (here
    before its greeting) says `* BYE` from `Connection.run`, after the readers were stopped,
    where nothing else would end the wait: a client whose buffers are full and that reads
    nothing kept the session for good (until the proxy's shutdown)."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:  # the client reads nothing: every buffer between us is full
                ours.send(b"x" * 65536)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        settings = RelaySettings("127.0.0.1", 1, CoreConfig())
        conn = Connection(
            stream, client_address="c", session_id="s1", settings=settings, sink=MemorySink(),
            timers=Timers(),
        )  # fmt: skip
        with trio.fail_after(CLOSE_GRACE + 2):
            await conn._apply(conn.core.timed_out(trio.current_time()))
        assert conn.core.closed and conn.client.broken


# --- What ends an IDLE in a flood.


def done_pipelined(c: Squeezed) -> None:
    """DONE and three commands in one sync flush."""
    c.send(b"DONE\r\nn1 NOOP\r\nn2 NOOP\r\nQ LOGOUT\r\n")


def done_partially_flushed(c: Squeezed) -> None:
    """DONE and LOGOUT in one partial flush (Thunderbird's, K-9's), an octet per TLS record."""
    data = c.deflate.compress(b"DONE\r\nQ LOGOUT\r\n") + c.deflate.flush(zlib.Z_PARTIAL_FLUSH)
    for i in range(len(data)):
        c.sock.sendall(data[i : i + 1])


def compress_where_done_must_be(c: Squeezed) -> None:
    c.send(b"z COMPRESS DEFLATE\r\n")


def compress_in_an_idle_begun_uncompressed(c: Squeezed) -> None:
    """COMPRESS where DONE must be, DONE compressed right after it, as if COMPRESS were on."""
    c.sock.sendall(b"z COMPRESS DEFLATE\r\n")
    c.compressed = True
    c.send(b"DONE\r\n")
    c.compressed = False


def tls_closed_without_close_notify(c: Squeezed) -> None:
    """The client's FIN, with no TLS close_notify before it, the flood unread."""
    socket.socket.shutdown(c.sock, socket.SHUT_WR)


ENDINGS = {
    "done_pipelined": (done_pipelined, [b"i OK", b"n1 OK", b"n2 OK", b"Q OK"], "logout"),
    "done_partially_flushed": (done_partially_flushed, [b"i OK", b"Q OK"], "logout"),
    "compress_where_done_must_be": (compress_where_done_must_be, [], "protocol_error"),
    "compress_in_an_idle_begun_uncompressed": (
        compress_in_an_idle_begun_uncompressed,
        [],
        "protocol_error",
    ),
    "tls_closed_without_close_notify": (tls_closed_without_close_notify, [], "client_closed"),
}


def idle_then(
    address: tuple[str, int], context: ssl.SSLContext, then: Callable[[Squeezed], None]
) -> list[bytes]:
    """IDLE, then `then` mid-flood; the tagged answers (their first words) until the end."""
    compress = then is not compress_in_an_idle_begun_uncompressed
    with Squeezed(address, context, compress=compress) as c:
        c.send(b"i IDLE\r\n")
        assert c.line().startswith(b"+ idling")
        then(c)
        answers = []
        while line := c.line():
            if line[:1] in b"inQz" and line[1:3] != b"\r\n":  # not the flood's (`x...`, `)`)
                answers.append(b" ".join(line.split(b" ")[:2]))
        return answers


@pytest.mark.parametrize("ending", sorted(ENDINGS))
async def test_what_ends_an_idle_in_a_flood(
    tmp_path: Path, tls_material: TlsMaterial, ending: str
) -> None:
    """Held: DONE with commands pipelined after it, or in a partial flush split into TLS records
    an octet each, ends the IDLE mid-flood; COMPRESS where DONE must be ends the session (never
    reaching the server), whether DEFLATE is on already or not (then what follows it is never
    inflated, nor the IDLE ended); a TLS leg closed without close_notify ends it as the
    client's close."""
    then, answers, reason = ENDINGS[ending]
    flood = Flood()
    context = tls_material.client_context()
    async with (
        scripted.serve(flood, bytearray()) as upstream,
        veil(upstream, tmp_path, **tls_settings(tls_material)) as v,
    ):
        got = await run(idle_then, v.address, context, then)
        (end,) = await v.sessions_ended(1)
        with trio.fail_after(TIMEOUT):
            await flood.closed.wait()
    assert got == answers
    assert end.reason == reason, end
    assert not any(b"COMPRESS" in line for line in flood.lines), flood.lines
    if reason == "protocol_error":
        assert [r.kind for r in v.sink.of(Violation)] == ["idle_not_done"]
        assert flood.done == 0


def read_to_the_end(
    address: tuple[str, int], context: ssl.SSLContext
) -> tuple[int, bytes, float, bool]:
    """IDLE, then everything until the connection ends: (EXISTS lines, the last line, seconds
    from it to the end, whether the end came without close_notify)."""
    with Squeezed(address, context) as c:
        c.send(b"i IDLE\r\n")
        assert c.line().startswith(b"+ idling")
        exists, last, at = 0, b"", time.monotonic()
        while line := c.line():
            exists += line.endswith(b" EXISTS\r\n")
            last, at = line, time.monotonic()
        return exists, last, time.monotonic() - at, c.ragged


async def test_a_server_that_drops_mid_idle(tmp_path: Path, tls_material: TlsMaterial) -> None:
    """The server closes mid-IDLE, after three floods: the client gets all of them, whole
    (through DEFLATE and TLS), then the end of the connection; `server_closed`.

    Found (attack17i): the end came `CLOSE_GRACE` (2 s) after the last octet: closing a TLS
    leg, the proxy waited for the client to close first (draining it) without telling it
    anything, where a plain leg gets our FIN at once; an IDLE client learnt that its server had
    gone 2 s late, and so did a client waiting for the end after a BYE or its LOGOUT; and then
    the end came without close_notify (a truncation, to a strict TLS client). Now a TLS leg
    gets our close_notify and FIN at once and is drained below its TLS, as a COMPRESS leg is
    below its DEFLATE."""
    flood = Flood(floods=3)
    context = tls_material.client_context()
    async with (
        scripted.serve(flood, bytearray()) as upstream,
        veil(upstream, tmp_path, **tls_settings(tls_material)) as v,
    ):
        exists, last, took, ragged = await run(read_to_the_end, v.address, context)
        (end,) = await v.sessions_ended(1)
    assert took < CLOSE_GRACE / 2, f"the end came {took:.2f} s after the last line"
    assert not ragged, "no close_notify"
    assert exists == 3 * FLOOD.count(b" EXISTS\r\n")
    assert last == b")\r\n" or last.startswith(b"* SEARCH"), last[:40]
    assert end.reason == "server_closed", end


class Quiet(Flood):
    """`Flood` without the flood: IDLE waits for DONE in silence."""

    async def _idle(self, peer: scripted.Peer) -> bool:
        line = await peer.line()
        self.done += line == b"DONE\r\n"
        return bool(line)


def refused_then_more(address: tuple[str, int], context: ssl.SSLContext) -> tuple[float, bool]:
    """IDLE, then a NOOP where DONE must be and 100 KB more after it, unread by the proxy:
    (seconds to the end of the connection, whether it came without close_notify)."""
    with Squeezed(address, context, compress=False) as c:
        c.send(b"i IDLE\r\n")
        assert c.line().startswith(b"+ idling")
        c.send(b"x NOOP\r\n" + b"y" * 100_000)
        started = time.monotonic()
        while c.line():
            pass
        return time.monotonic() - started, c.ragged


async def test_a_closing_tls_leg_says_close_notify_though_the_client_said_more(
    tmp_path: Path, tls_material: TlsMaterial
) -> None:
    """Found (attack17i), with the close above: TLS records of the client's that the proxy had
    not read made OpenSSL's shutdown fail at its second step, after it had written our
    close_notify, and the alert was thrown away: the end came ragged (in most sessions: it
    depends on what the proxy has read of the client's records). A quiet server: a send of the
    server's cut short by the close leaves half a record, after which nothing is said."""
    flood = Quiet()
    context = tls_material.client_context()
    async with (
        scripted.serve(flood, bytearray()) as upstream,
        veil(upstream, tmp_path, **tls_settings(tls_material)) as v,
    ):
        ends = [await run(refused_then_more, v.address, context) for _ in range(5)]
        sessions = await v.sessions_ended(5)
    assert {end.reason for end in sessions} == {"protocol_error"}, sessions
    assert max(took for took, _ in ends) < CLOSE_GRACE / 2, ends
    assert not any(ragged for _, ragged in ends), f"no close_notify: {ends}"
