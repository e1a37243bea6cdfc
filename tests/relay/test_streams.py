"""The legs' plumbing (`relay/streams.py`): the write lock does what `trio.StrictFIFOLock`
guarantees (strict FIFO hand-over, no barging, a cancelled waiter leaves the queue, release only
when held) and keeps nothing once the queue is empty; a plain read is the caller's own copy;
and the proxy's accept loop (`relay/server.py`), which replaced `trio.serve_listeners`."""

from __future__ import annotations

import errno
import os
import socket
import ssl
from typing import Any, cast

import pytest
import trio
import trio.testing

from imapveil.relay import server
from imapveil.relay.streams import (
    IOV_MAX,
    RECEIVE_SIZE,
    Leg,
    WriteLock,
    close_now,
    connect_numeric,
)


async def test_waiters_get_the_lock_in_arrival_order_and_newcomers_do_not_barge() -> None:
    lock = WriteLock()
    order: list[int] = []

    async def sender(i: int) -> None:
        async with lock:
            order.append(i)
            await trio.sleep(0.01)

    assert lock.take_if_free()
    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(sender, i)
            await trio.testing.wait_all_tasks_blocked()
        lock.release()
        # Handed to the first waiter: still held, and a newcomer must queue behind the others.
        assert lock.locked()
        assert not lock.take_if_free()
        nursery.start_soon(sender, 4)
    assert order == [0, 1, 2, 3, 4]
    assert not lock.locked()
    assert lock._lot is None  # nothing kept while idle


async def test_a_cancelled_waiter_leaves_the_queue_without_the_lock() -> None:
    lock = WriteLock()
    got: list[str] = []

    async def waiter(name: str, scope_out: list[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            scope_out.append(scope)
            async with lock:
                got.append(name)

    assert lock.take_if_free()
    scopes: list[trio.CancelScope] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter, "a", scopes)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(waiter, "b", scopes)
        await trio.testing.wait_all_tasks_blocked()
        scopes[0].cancel()
        await trio.testing.wait_all_tasks_blocked()
        lock.release()
    assert got == ["b"]
    assert not lock.locked()


async def test_uncontended_acquire_is_a_checkpoint_and_release_needs_the_lock() -> None:
    lock = WriteLock()
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await lock.acquire()
    assert not lock.locked()
    await lock.acquire()
    assert lock.locked()
    lock.release()
    with pytest.raises(RuntimeError):
        lock.release()


def test_a_plain_read_is_a_copy_the_next_read_leaves_alone() -> None:
    """`Leg.read` receives into one buffer all legs share: what it returns must be the caller's
    own octets, not a view that the next receive (of any leg) overwrites."""
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    with a, b, c, d:
        b.setblocking(False)
        assert Leg.read(b.fileno()) is None  # nothing there: wait again
        a.sendall(b"1 NOOP\r\n")
        first = Leg.read(b.fileno())
        c.sendall(b"* OK something else entirely\r\n")
        second = Leg.read(d.fileno())
        assert first == b"1 NOOP\r\n" and type(first) is bytes
        assert second == b"* OK something else entirely\r\n"
        big = bytes(range(256)) * (RECEIVE_SIZE // 256)
        a.sendall(big[:100_000])
        got = b""
        while len(got) < 100_000:
            chunk = Leg.read(b.fileno())
            got += chunk or b""
        assert got == big[:100_000]
        a.close()
        assert Leg.read(b.fileno()) == b""  # the end


class _Listener(trio.abc.Listener[trio.abc.Stream]):
    """Accepts as scripted: an OSError to raise, or a stream to hand out; then waits forever."""

    def __init__(self, script: list[OSError | trio.abc.Stream]) -> None:
        self.script = script
        self.closed = False

    async def accept(self) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        if not self.script:
            await trio.sleep_forever()
        step = self.script.pop(0)
        if isinstance(step, OSError):
            raise step
        return step

    async def aclose(self) -> None:
        self.closed = True


async def test_the_accept_loop_waits_out_a_lack_of_descriptors_and_raises_anything_else(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """The proxy's own accept loop (`relay/server.py: _accept`, in place of
    `trio.serve_listeners`): EMFILE and the like are logged and retried after ACCEPT_RETRY,
    each accepted stream gets a task of its own, and any other error ends the loop."""
    stream, _peer = trio.testing.memory_stream_pair()
    listener = _Listener([OSError(errno.EMFILE, "Too many open files"), stream])
    handled: list[tuple[float, trio.abc.Stream]] = []

    async def handler(s: trio.abc.Stream) -> None:
        handled.append((trio.current_time(), s))

    start = trio.current_time()
    async with trio.open_nursery() as sessions:
        sessions.start_soon(server._accept, cast(Any, listener), handler, sessions)
        await trio.sleep(1)
        sessions.cancel_scope.cancel()
    assert [s for _t, s in handled] == [stream]
    assert handled[0][0] - start >= server.ACCEPT_RETRY
    assert "accept failed: emfile" in caplog.text
    assert listener.closed

    broken = _Listener([OSError(errno.EBADF, "Bad file descriptor")])
    with pytest.RaisesGroup(OSError):
        async with trio.open_nursery() as sessions:
            sessions.start_soon(server._accept, cast(Any, broken), handler, sessions)
    assert broken.closed


@pytest.mark.parametrize("count", [1, 3, IOV_MAX + 5])
async def test_a_batch_reaches_a_slow_reader_whole_and_in_order(count: int) -> None:
    """A batch larger than the peer's buffers goes out in several writes, each resuming where
    the last one stopped (inside a chunk or between chunks), empty chunks and views included."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.create_connection(listener.getsockname()[:2])
        ours, _ = listener.accept()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours.setblocking(False)
    total = 3 * 1024 * 1024
    size = total // count
    chunks: list[bytes | memoryview] = []
    for i in range(count):
        data = os.urandom(size)
        chunks.append(memoryview(data) if i % 2 else data)
        if i % 3 == 0:
            chunks.append(b"")
    expected = b"".join(bytes(c) for c in chunks)

    def read_slowly() -> bytes:
        got = bytearray()
        peer.settimeout(10)
        while len(got) < len(expected):
            got += peer.recv(7919)
        return bytes(got)

    leg = Leg("client", trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
    with peer:
        async with trio.open_nursery() as nursery:
            received: list[bytes] = []

            async def reader() -> None:
                received.append(await trio.to_thread.run_sync(read_slowly))

            nursery.start_soon(reader)
            with trio.fail_after(20):
                await leg.send_many(chunks)
        assert received == [expected]
        await leg.stream.aclose()


async def test_closing_at_once_closes_the_socket_and_wakes_its_reader() -> None:
    """`close_now` (no cancelled scope, no checkpoint) does what `aclose_forcefully` did for a
    plain stream: the descriptor is gone, a task waiting to read is woken with
    ClosedResourceError, the peer sees the end, and closing again does nothing."""
    a, b = socket.socketpair()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    woken: list[type[BaseException]] = []

    async def reader() -> None:
        try:
            await stream.receive_some(10)
        except trio.ClosedResourceError as exc:
            woken.append(type(exc))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        await close_now(stream)
        assert stream.socket.fileno() == -1
    assert woken == [trio.ClosedResourceError]
    assert b.recv(10) == b""  # the peer sees the end
    await close_now(stream)
    b.close()


async def test_closing_a_tls_stream_at_once_closes_what_is_under_it() -> None:
    """Anything but a plain stream goes through `aclose_forcefully`: a TLS stream's socket is
    closed without waiting for the peer's close_notify."""
    a, b = socket.socketpair()
    inner = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    context = ssl.create_default_context()
    tls = trio.SSLStream(inner, context, server_hostname="example.org")
    await close_now(tls)
    assert inner.socket.fileno() == -1
    b.close()


# --- The upstream connect (`connect_numeric`): a non-blocking connect(2) of its own.


def _closed_port() -> int:
    """A loopback port nobody listens on (bound, never listening: nothing else takes it)."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    _closed_ports.append(holder)
    return int(holder.getsockname()[1])


_closed_ports: list[socket.socket] = []


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_connect_takes_the_first_address_that_accepts_and_gives_a_working_stream() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    refused = _closed_port()
    addresses = ((socket.AF_INET, ("127.0.0.1", refused)), (socket.AF_INET, ("127.0.0.1", port)))
    stream = await connect_numeric(addresses)
    peer, _ = listener.accept()
    try:
        assert stream.socket.getpeername() == ("127.0.0.1", port)
        assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        await stream.send_all(b"* OK\r\n")
        assert peer.recv(100) == b"* OK\r\n"
        peer.sendall(b"a NOOP\r\n")
        assert await stream.receive_some(100) == b"a NOOP\r\n"
    finally:
        await close_now(stream)
        peer.close()
        listener.close()


async def test_connect_says_why_when_no_address_accepts() -> None:
    addresses = tuple((socket.AF_INET, ("127.0.0.1", _closed_port())) for _ in range(2))
    before = _open_fds()
    with pytest.raises(OSError) as caught:
        await connect_numeric(addresses)
    assert caught.value.errno == errno.ECONNREFUSED
    assert _open_fds() == before  # both sockets closed
    with pytest.raises(OSError, match="no upstream address"):
        await connect_numeric(())


async def test_connect_is_a_checkpoint_and_a_cancelled_connect_closes_its_socket() -> None:
    # A listener whose accept queue is full: the kernel drops the next SYN, the connect waits.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    queued = []
    for _ in range(4):  # a backlog of 0 still admits one or two
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(address)
        queued.append(s)
    before = _open_fds()
    try:
        with trio.move_on_after(0.3) as scope:
            await connect_numeric(((socket.AF_INET, address),))
        assert scope.cancelled_caught, "the connect should have waited for the full queue"
        assert _open_fds() == before
        with trio.CancelScope() as cancelled:
            cancelled.cancel()
            await connect_numeric(((socket.AF_INET, address),))  # cancelled before it connects
        assert cancelled.cancelled_caught
        assert _open_fds() == before
    finally:
        for s in queued:
            s.close()
        listener.close()
