"""Attack round 15 on operations (ops15): the systemd notify socket, the metrics port, what
configuration errors echo, the statistics spool, log flooding, SIGHUP storms. Each test failed
before the fix named in its docstring, or guards what held."""

from __future__ import annotations

import contextlib
import imaplib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from imapveil import systemd
from imapveil.systemd import Notifier
from tests.helpers.dovecot import Dovecot
from tests.helpers.process import imapveil


@pytest.fixture
def full_notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket in place of systemd's ($NOTIFY_SOCKET) that nobody reads: its receive
    queue is full (net.unix.max_dgram_qlen datagrams), as a wedged PID 1's would be."""
    path = str(tmp_path / "notify")
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler,
    ):
        sock.bind(path)
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            for _ in range(100_000):
                filler.sendto(b"FILLER=1", path)
        yield sock, path


def _drain(sock: socket.socket) -> list[str]:
    """Each datagram waiting now, its first line; filler left out."""
    sock.setblocking(False)
    seen = []
    with contextlib.suppress(BlockingIOError):
        while True:
            line = sock.recv(4096).decode().split("\n")[0]
            if line != "FILLER=1":
                seen.append(line)
    return seen


def test_a_notify_socket_nobody_reads_does_not_block_the_sender(
    full_notify_socket: tuple[socket.socket, str],
) -> None:
    """Found: `Notifier.send` was a blocking `sendto`; to a notify socket whose receive queue
    is full (PID 1 wedged, or slow to read) it waited until there was room: the event loop,
    every session and the signals with it. The datagram waits in the notifier now, sent in
    order once the socket takes it again (`Notifier.run` retries)."""
    sock, path = full_notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    sent = threading.Thread(target=notifier.ready, args=("serving",), daemon=True)
    sent.start()
    sent.join(2)
    blocked = sent.is_alive()
    seen = _drain(sock)  # lets a blocked send go, so that the test ends either way
    sent.join(5)
    assert not blocked, "sd_notify blocked on a full notify socket"
    assert seen == []  # not sent yet: the socket was full
    notifier.flush()
    notifier.stopping()
    notifier.close()
    assert _drain(sock) == ["READY=1", "STOPPING=1"]  # in order, once there is room


async def test_datagrams_the_socket_cannot_take_are_retried_and_bounded(
    full_notify_socket: tuple[socket.socket, str],
) -> None:
    """Held with the fix above: while the socket stays full, watchdog pings are one waiting
    (not one per interval) and at most `MAX_PENDING` datagrams wait, the oldest dropped first,
    said in a warning (not one per datagram); `run` sends what waits once there is room."""
    sock, path = full_notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(notifier.run)
        for _ in range(50):
            notifier.watchdog()
        assert list(notifier.pending) == [b"WATCHDOG=1"]
        for i in range(systemd.MAX_PENDING + 5):
            notifier.status(f"{i}")
        assert len(notifier.pending) == systemd.MAX_PENDING
        assert notifier.dropped == 6  # the ping and the first five
        notifier.ready()
        with trio.fail_after(5):
            while notifier.pending:
                _drain(sock)
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    notifier.close()
    # What the last drain did not see came in the meantime, or not at all: READY=1 is last.
    assert _drain(sock)[-1:] in (["READY=1"], [])


@pytest.mark.dovecot
def test_the_service_serves_while_its_notify_socket_is_full(
    dovecot: Dovecot, tmp_path: Path, full_notify_socket: tuple[socket.socket, str]
) -> None:
    """Found with the first: `imapveil serve` with $NOTIFY_SOCKET full blocked in READY=1,
    after its listeners were open: connections were accepted and never greeted. Now sessions
    are served, and READY=1 reaches systemd once its socket has room."""
    sock, path = full_notify_socket
    env = {**os.environ, "NOTIFY_SOCKET": path}
    with imapveil(tmp_path, dovecot.address, env=env) as proxy:
        try:
            client = imaplib.IMAP4("127.0.0.1", proxy.port, timeout=5)
            assert client.login("alice", "wonderland")[0] == "OK"
            client.logout()
        finally:
            seen = _drain(sock)
        deadline = time.monotonic() + 5
        while "READY=1" not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
            seen += _drain(sock)
        assert seen[:1] == ["READY=1"], seen
        assert proxy.stop() == 0
