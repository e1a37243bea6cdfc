"""A handshaken TLS leg's data path without trio's `SSLStream` machinery (`streams.TlsPath`):
its `SSLObject` and memory BIOs driven by the leg, its socket read and written as a plain
leg's. What must hold: every octet in order both ways however the records are cut; a send and
a receive on one leg at once; what OpenSSL writes in a read (a KeyUpdate's answer) goes out in
the order written, by whoever holds the write lock; the server's TLS 1.3 session tickets, held
back by trio from the handshake, go out first; a record that does not decrypt, a close_notify
each way; a peer that reads nothing blocks only its own sender, with one batch in memory.

Real TLS over a real socket pair (the path is taken only over a socket): the leg is trio's
server-side `SSLStream` over a stopped `RecordingStream` (as the client leg of an implicit-TLS
listener), the peer a Python `SSLObject` whose records and segments are the test's own.
"""

from __future__ import annotations

import contextlib
import random
import socket
import ssl
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from imapveil.relay import tls as relay_tls
from imapveil.relay.recording import RecordingStream
from imapveil.relay.streams import (
    RECEIVE_SIZE,
    RECORD_COST,
    RECORD_SIZE,
    Leg,
    TlsPath,
    describe,
    tls_reason,
)
from tests.conftest import TlsMaterial


class Peer:
    """The other end: an `SSLObject` over memory BIOs and a trio socket, octets the test's."""

    def __init__(self, sock: trio.socket.SocketType, context: ssl.SSLContext) -> None:
        self.sock = sock
        self.wire = trio.SocketStream(sock)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.plain = bytearray()
        self.closed = False  # its close_notify read

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if self.outgoing.pending:
                    await self.wire.send_all(self.outgoing.read())
                self.incoming.write(await self.wire.receive_some(65536))
        await self.wire.send_all(self.outgoing.read())

    def records(self, *payloads: bytes) -> bytes:
        for payload in payloads:
            self.tls.write(payload)
        return self.outgoing.read()

    async def read_some(self) -> None:
        data = await self.wire.receive_some(65536)
        if not data:
            self.incoming.write_eof()
        else:
            self.incoming.write(data)
        while True:
            try:
                got = self.tls.read(65536)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:  # its close_notify after ours
                got = b""
            if not got:
                self.closed = True
                return
            self.plain += got

    async def read_until(self, size: int) -> bytes:
        with trio.fail_after(10):
            while len(self.plain) < size and not self.closed:
                await self.read_some()
        return bytes(self.plain)


_SOCKETS: list[trio.socket.SocketType] = []


@pytest.fixture(autouse=True)
async def _close_sockets() -> AsyncIterator[None]:
    yield
    while _SOCKETS:
        _SOCKETS.pop().close()


async def pair(tls: TlsMaterial) -> tuple[Leg, Peer, RecordingStream]:
    ours, theirs = trio.socket.socketpair()
    _SOCKETS.extend((ours, theirs))
    recording = RecordingStream(trio.SocketStream(ours))
    stream = trio.SSLStream(
        recording, relay_tls.server_context(str(tls.cert), str(tls.key)), server_side=True
    )
    peer = Peer(theirs, tls.client_context())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.do_handshake)
        nursery.start_soon(peer.handshake)
    return Leg("client", stream), peer, recording


async def test_the_path_is_taken_after_the_handshake_and_recording(
    tls_material: TlsMaterial,
) -> None:
    leg, _peer, recording = await pair(tls_material)
    assert leg.tls_path() is None  # still recording the ClientHello: trio's path
    recording.stop()
    path = leg.tls_path()
    assert path is not None and leg.tls_path() is path
    assert TlsPath.of(trio.SSLStream(recording, ssl.create_default_context())) is None


async def test_what_it_relies_on_in_trio(tls_material: TlsMaterial) -> None:
    """trio's private names this path uses: if trio changes them, this fails (and the path is
    not taken: `test_another_trio_takes_trios_path`)."""
    leg, _peer, recording = await pair(tls_material)
    recording.stop()
    stream = leg.stream
    assert isinstance(stream, trio.SSLStream)
    assert isinstance(stream._ssl_object, ssl.SSLObject)
    assert isinstance(stream._incoming, ssl.MemoryBIO)
    assert isinstance(stream._outgoing, ssl.MemoryBIO)
    assert stream._ssl_object.server_side
    assert stream._handshook.done
    assert stream._state.name == "OK"
    assert stream._delayed_outgoing is None or isinstance(stream._delayed_outgoing, bytes)
    assert stream.transport_stream is recording


async def test_another_trio_takes_trios_path(tls_material: TlsMaterial) -> None:
    leg, peer, recording = await pair(tls_material)
    recording.stop()
    stream = leg.stream
    assert isinstance(stream, trio.SSLStream)
    del stream._delayed_outgoing  # as if trio had renamed it
    assert leg.tls_path() is None
    await peer.wire.send_all(peer.records(b"a1 NOOP\r\n"))
    assert await leg.receive() == b"a1 NOOP\r\n"


@pytest.mark.parametrize("seed", range(6))
async def test_every_octet_in_order_both_ways_however_cut(
    tls_material: TlsMaterial, seed: int
) -> None:
    pick = random.Random(seed)
    leg, peer, recording = await pair(tls_material)
    recording.stop()
    assert leg.tls_path() is not None
    payloads = [bytes([pick.randrange(256)]) * pick.randrange(1, 20000) for _ in range(30)]
    want = b"".join(payloads)
    raw = peer.records(*payloads)
    got = bytearray()

    async def cut() -> None:
        at = 0
        while at < len(raw):
            step = pick.choice([1, 3, 5, 100, 4096, 17000, 70000])
            await peer.wire.send_all(raw[at : at + step])
            at += step
            if pick.random() < 0.3:
                await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cut)
        with trio.fail_after(10):
            while len(got) < len(want):
                got += await leg.receive()
    assert got == want
    # And back: batches of chunks, views among them.
    batches = [
        [
            memoryview(p) if pick.random() < 0.5 else p
            for p in payloads[i : i + pick.randrange(1, 5)]
        ]
        for i in range(0, len(payloads), 4)
    ]
    sent = b"".join(b"".join(bytes(c) for c in batch) for batch in batches)

    async def send() -> None:
        for batch in batches:
            await leg.send_many(batch)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        assert await peer.read_until(len(sent)) == sent


async def test_a_send_and_a_receive_at_once(tls_material: TlsMaterial) -> None:
    leg, peer, recording = await pair(tls_material)
    recording.stop()
    size = 4 * 1024 * 1024
    up = bytes(random.Random(1).randbytes(size))
    down = bytes(random.Random(2).randbytes(size))
    got = bytearray()

    async def leg_sends() -> None:
        for at in range(0, size, 50000):
            await leg.send_many([down[at : at + 30000], memoryview(down)[at + 30000 : at + 50000]])

    async def leg_receives() -> None:
        while len(got) < size:
            got.extend(await leg.receive())

    async def peer_sends() -> None:
        for at in range(0, size, 70000):
            await peer.wire.send_all(peer.records(up[at : at + 70000]))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(leg_sends)
            nursery.start_soon(leg_receives)
            nursery.start_soon(peer_sends)
            assert await peer.read_until(size) == down
    assert got == up


async def test_what_a_read_writes_goes_out_in_order_by_the_locks_holder(
    tls_material: TlsMaterial,
) -> None:
    """A read that makes octets to send (a KeyUpdate's answer) while a sender holds the lock
    leaves them to the sender, who sends them first; with the lock free, it sends them."""
    leg, peer, recording = await pair(tls_material)
    recording.stop()
    path = leg.tls_path()
    assert path is not None
    assert leg.write_lock.take_if_free()  # a sender, between two sends
    path.ssl_object.write(b"made by a read ")  # what a read would have written
    await path.flush_after_read(leg)
    assert path.outgoing.pending  # left to the holder
    leg.write_lock.release()
    await leg.send_many([b"then the sender's"])
    assert await peer.read_until(32) == b"made by a read then the sender's"
    path.ssl_object.write(b"; alone")
    await path.flush_after_read(leg)
    assert not path.outgoing.pending
    assert await peer.read_until(39) == b"made by a read then the sender's; alone"


async def test_tls13_session_tickets_reach_a_client_that_reads_them(
    tls_material: TlsMaterial,
) -> None:
    leg, peer, recording = await pair(tls_material)
    recording.stop()
    assert peer.tls.version() == "TLSv1.3"
    stream = leg.stream
    assert isinstance(stream, trio.SSLStream) and stream._delayed_outgoing  # held by trio
    await leg.send_many([b"* OK ready\r\n"])
    assert stream._delayed_outgoing is None
    assert await peer.read_until(12) == b"* OK ready\r\n"
    session = peer.tls.session
    assert session is not None and session.has_ticket


async def test_a_bad_record_after_good_ones(tls_material: TlsMaterial) -> None:
    leg, peer, recording = await pair(tls_material)
    recording.stop()
    good = peer.records(b"x" * 3000, b"y" * 3000)
    bad = bytearray(peer.records(b"w" * 100))
    bad[-1] ^= 1
    await peer.wire.send_all(good + bytes(bad))
    got = b""
    with pytest.raises(trio.BrokenResourceError) as raised:
        with trio.fail_after(5):
            while True:
                got += await leg.receive()
    assert got == b"x" * 3000 + b"y" * 3000
    assert tls_reason(raised.value) == "decryption_failed_or_bad_record_mac"
    assert leg.broken
    with pytest.raises(trio.BrokenResourceError):
        await leg.receive()


async def test_a_bad_record_alone(tls_material: TlsMaterial) -> None:
    leg, peer, recording = await pair(tls_material)
    recording.stop()
    bad = bytearray(peer.records(b"w" * 100))
    bad[-1] ^= 1
    await peer.wire.send_all(bytes(bad))
    with pytest.raises(trio.BrokenResourceError) as raised:
        await leg.receive()
    assert tls_reason(raised.value) == "decryption_failed_or_bad_record_mac"
    assert leg.broken
    with trio.fail_after(1), pytest.raises(trio.BrokenResourceError):  # again, at once
        await leg.receive()


async def test_an_eof_without_close_notify_is_a_broken_stream(tls_material: TlsMaterial) -> None:
    leg, peer, recording = await pair(tls_material)
    recording.stop()
    await peer.wire.send_all(peer.records(b"a NOOP\r\n"))
    peer.sock.shutdown(socket.SHUT_WR)
    assert await leg.receive() == b"a NOOP\r\n"
    with pytest.raises(trio.BrokenResourceError):
        await leg.receive()


async def test_close_notify_both_ways(tls_material: TlsMaterial) -> None:
    leg, peer, recording = await pair(tls_material)
    recording.stop()
    # Theirs: the octets before it, then the end, again and again.
    raw = peer.records(b"a LOGOUT\r\n")
    with contextlib.suppress(ssl.SSLWantReadError):
        peer.tls.unwrap()
    await peer.wire.send_all(raw + peer.outgoing.read())
    got = b""
    while data := await leg.receive():
        got += data
    assert got == b"a LOGOUT\r\n"
    assert await leg.receive() == b""
    # Ours: after what was sent, through `close_gracefully` (trio's state, as before).
    leg.ended = False
    await leg.send_many([b"* BYE\r\n"])
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(leg.close_gracefully)
            assert await peer.read_until(10**6) == b"* BYE\r\n"
    assert peer.closed


async def test_a_close_before_any_send_says_the_held_tickets_first(
    tls_material: TlsMaterial,
) -> None:
    """Found: a TLS 1.3 client leg closed before anything was sent on it (trio still holding
    the handshake's session tickets, `_delayed_outgoing`) said close_notify without them: the
    client, expecting the tickets' records first, read a record it could not decrypt and took
    the clean end for an attack (`decryption failed or bad record mac`). trio's own close
    sends them first."""
    leg, peer, recording = await pair(tls_material)
    recording.stop()
    stream = leg.stream
    assert isinstance(stream, trio.SSLStream) and stream._delayed_outgoing  # held by trio
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(leg.close_gracefully)
            assert await peer.read_until(10**6) == b""
    assert peer.closed
    session = peer.tls.session
    assert session is not None and session.has_ticket


async def test_a_peer_that_reads_nothing_holds_only_its_sender(
    tls_material: TlsMaterial,
) -> None:
    leg, _peer, recording = await pair(tls_material)
    recording.stop()
    path = leg.tls_path()
    assert path is not None
    sent = 0
    ticks = 0

    async def elsewhere() -> None:
        nonlocal ticks
        while True:
            await trio.sleep(0.01)
            ticks += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(elsewhere)
        with trio.move_on_after(0.5) as waited:
            while True:
                await leg.send_many([b"z" * 65536, b"z" * 65536])
                sent += 131072
                assert not path.outgoing.pending  # one batch at most, and out of OpenSSL's
        nursery.cancel_scope.cancel()
    assert waited.cancelled_caught
    assert sent < 64 * 1024 * 1024
    assert ticks > 10
    assert leg.broken  # the send was cut short


async def test_only_the_client_legs_context_refuses_renegotiation(
    tls_material: TlsMaterial,
) -> None:
    """A client's TLS 1.2 renegotiation is refused; a server's is carried out (servers that ask
    for one take a refusal as fatal: test_attack_round18_path)."""
    upstream = relay_tls.client_context(str(tls_material.ca_file), verify=True)
    client = relay_tls.server_context(str(tls_material.cert), str(tls_material.key))
    assert not upstream.options & ssl.OP_NO_RENEGOTIATION
    assert client.options & ssl.OP_NO_RENEGOTIATION


async def test_records_left_by_the_budget_come_with_a_checkpoint(tls_material: TlsMaterial) -> None:
    """One read of the socket brings more than a receive takes (a record costs RECORD_COST at
    least): the rest comes from the incoming buffer with no wait, a checkpoint all the same."""
    leg, peer, recording = await pair(tls_material)
    recording.stop()
    path = leg.tls_path()
    assert path is not None
    payloads = [bytes([97 + i % 26]) for i in range(300)]  # one-octet records, ~7 KiB
    await peer.wire.send_all(peer.records(*payloads))
    got = [await leg.receive()]
    assert len(got[0]) == RECEIVE_SIZE // RECORD_COST
    steps = 0

    async def another_session() -> None:
        nonlocal steps
        while True:
            steps += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(another_session)
        while path.incoming.pending:
            got.append(await leg.receive())
        ran = steps
        nursery.cancel_scope.cancel()
    assert len(got) > 2
    assert ran  # the other task ran meanwhile: the receives yielded
    assert b"".join(got) == b"".join(payloads)


async def test_one_receive_takes_every_record_the_socket_brought(
    tls_material: TlsMaterial,
) -> None:
    """Dovecot writes records of about 4 KiB: one a receive (trio's `receive_some`), a FETCH
    from a TLS upstream went through the core and out to the client 4 KiB at a time, at some
    16 s of CPU per GB (bench/run.py, "bulk, TLS both legs")."""
    leg, peer, recording = await pair(tls_material)
    recording.stop()
    payloads = [bytes([65 + i % 26]) * 4000 for i in range(12)]
    await peer.wire.send_all(peer.records(*payloads))
    assert await leg.receive() == b"".join(payloads)


async def test_records_past_the_receive_size_wait_for_the_next_receive(
    tls_material: TlsMaterial,
) -> None:
    leg, peer, recording = await pair(tls_material)
    recording.stop()
    payloads = [bytes([97 + i % 26]) * RECORD_SIZE for i in range(20)]  # 320 KiB
    got: list[bytes | bytearray] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.wire.send_all, peer.records(*payloads))
        with trio.fail_after(10):
            while sum(map(len, got)) < 20 * RECORD_SIZE:
                got.append(await leg.receive())
    assert b"".join(got) == b"".join(payloads)
    assert max(map(len, got)) <= RECEIVE_SIZE
    assert len(got) > 1


async def test_an_ssl_error_is_described_by_its_reason_not_its_code_as_an_errno(
    tls_material: TlsMaterial,
) -> None:
    """`describe` (a failed send's words in a `session_end` record) took an `ssl.SSLError` for
    an OSError with an errno: OpenSSL's error code 1 read as `eperm`, 8 as `enoexec`. It names
    OpenSSL's reason now, as `tls_reason` does; peer data never (a reason is OpenSSL's name)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_material.cert, tls_material.key)
    incoming = ssl.MemoryBIO()
    server = context.wrap_bio(incoming, ssl.MemoryBIO(), server_side=True)
    incoming.write(b"GET /secret HTTP/1.0\r\n\r\n")
    with pytest.raises(ssl.SSLError) as raised:
        server.do_handshake()
    try:
        raise trio.BrokenResourceError from raised.value
    except trio.BrokenResourceError as wrapped:
        assert describe(wrapped) == describe(raised.value) == "http_request"
    assert tls_reason(raised.value) == "http_request"
