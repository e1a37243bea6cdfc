"""TCP keepalive on the client legs (b6d925e: set once on each listener, which Linux copies to
the connections it accepts, instead of on every accepted connection), attacked from outside
(attack6): raw sockets to the proxy (as `imapveil serve` builds it) in front of a real Dovecot.

Linux copies a listener's options to a connection when the connection is made (when the
three-way handshake completes, in the kernel, before `accept`), not when it is accepted: a
connection that was already waiting in the listener's queue when the option was set does not
get it. Such connections are not rare: with systemd socket activation the connection that
started the service is always one of them, as is every one that came while it started; a
service that opens its own listeners has one between its `listen` and serving them. Each must
have keepalive as much as the connections that come later.
"""

from __future__ import annotations

import functools
import socket
import time
from pathlib import Path

import pytest
import trio

from imapveil.relay.server import Proxy, open_listeners
from imapveil.service import PolicyHolder, admittance, load_all
from tests.conftest import RecordingSink, TlsMaterial
from tests.helpers.dovecot import Dovecot
from tests.helpers.process import imapveil, socket_activated

pytestmark = pytest.mark.dovecot


def keepalive_of(stream: object) -> int:
    assert isinstance(stream, trio.SocketStream)
    return int(stream.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))


async def test_connections_queued_before_serving_get_keepalive(
    target: Dovecot, tmp_path: Path
) -> None:
    """Three clients connect to the proxy's listener before it serves it (socket activation:
    the connection that started the service, and those that came while it started), a fourth
    once it serves: each one's client leg (and server leg) has TCP keepalive."""
    loaded = load_all(
        None,
        {
            "upstream": f"{target.address[0]}:{target.address[1]}",
            "user_key_file": str(tmp_path / "user-key"),
        },
    )
    sink = RecordingSink()
    proxy = Proxy(admittance(loaded, PolicyHolder(loaded.policy)), sink, shutdown_grace=2.0)
    listeners = await open_listeners("127.0.0.1", 0)
    address = listeners[0].socket.getsockname()[:2]
    early = [socket.create_connection(address, timeout=5) for _ in range(3)]  # queued, unserved
    clients = list(early)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve, listeners)
            for client in early:  # greeted: both legs of the session are open
                assert (await trio.to_thread.run_sync(client.recv, 1000)).startswith(b"* OK")
            late = socket.create_connection(address, timeout=5)  # once the proxy accepts
            clients.append(late)
            assert (await trio.to_thread.run_sync(late.recv, 1000)).startswith(b"* OK")
            connections = sorted(proxy.connections, key=lambda c: c.core.session_id)
            assert len(connections) == 4
            options = [
                (keepalive_of(c.client.stream), keepalive_of(c.server and c.server.stream))
                for c in connections
            ]
            proxy.stop()
            for client in clients:
                client.close()
    finally:
        for client in clients:
            client.close()
    assert options == [(1, 1)] * 4


def tcp_timer(local: tuple[str, int], remote: tuple[str, int]) -> int:
    """The timer the kernel runs for the established IPv4 connection `local`-`remote` (of any
    process), from /proc/net/tcp: 0 none, 1 retransmission, 2 keepalive, ..."""

    def hexed(address: tuple[str, int]) -> str:
        packed = socket.inet_aton(address[0])
        return f"{int.from_bytes(packed, 'little'):08X}:{address[1]:04X}"

    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if (fields[1], fields[2], fields[3]) == (hexed(local), hexed(remote), "01"):
                return int(fields[5].split(":")[0], 16)
    raise AssertionError(f"no connection {local} - {remote}")


def test_the_connection_that_activates_a_socket_activated_service_gets_keepalive(
    target: Dovecot, tmp_path: Path
) -> None:
    """systemd accepts the first connection's handshake on the socket it holds, then starts the
    service with that socket: that connection, made before the service set anything on the
    socket, is relayed with TCP keepalive on the proxy's side of it (the kernel's keepalive
    timer runs for it), as is a connection made later."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = listening.getsockname()[:2]
        first = socket.create_connection(address, timeout=10)  # before the service runs
        fd = listening.fileno()
        with imapveil(tmp_path, target.address, wrap=socket_activated(fd), pass_fds=[fd]) as proxy:
            listening.close()
            with first, socket.create_connection(address, timeout=10) as later:
                timers = []
                for client in (first, later):
                    assert client.recv(1000).startswith(b"* OK")  # relaying: the leg is open
                    deadline = time.monotonic() + 5
                    # (retransmission while our ACK of the greeting is on its way)
                    while (timer := tcp_timer(address, client.getsockname()[:2])) == 1:
                        assert time.monotonic() < deadline
                        time.sleep(0.001)
                    timers.append(timer)
            assert proxy.stop() == 0
    assert timers == [2, 2]


async def test_connections_queued_on_an_implicit_tls_listener_get_keepalive(
    target: Dovecot, tmp_path: Path, tls_material: TlsMaterial
) -> None:
    """The implicit-TLS listener (993-style) too: two connections made before the proxy serves
    it and one after, each waiting for its TLS handshake, have the kernel's keepalive timer on
    the proxy's side."""
    loaded = load_all(
        None,
        {
            "upstream": f"{target.address[0]}:{target.address[1]}",
            "user_key_file": str(tmp_path / "user-key"),
            "cert": str(tls_material.cert),
            "key": str(tls_material.key),
        },
    )
    proxy = Proxy(admittance(loaded, PolicyHolder(loaded.policy)), RecordingSink())
    plain = await open_listeners("127.0.0.1", 0)
    secure = await open_listeners("127.0.0.1", 0)
    address = secure[0].socket.getsockname()[:2]
    clients = [socket.create_connection(address, timeout=5) for _ in range(2)]  # queued
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(proxy.serve, plain, tls_listeners=secure))
            with trio.fail_after(5):
                while proxy.stats.accepted < 2:  # noqa: ASYNC110 (the accept loop's count)
                    await trio.sleep(0.001)
            clients.append(socket.create_connection(address, timeout=5))
            with trio.fail_after(5):
                while proxy.stats.accepted < 3:  # noqa: ASYNC110
                    await trio.sleep(0.001)
            timers = [tcp_timer(address, c.getsockname()[:2]) for c in clients]
            proxy.stop()
            for client in clients:
                client.close()
    finally:
        for client in clients:
            client.close()
    assert timers == [2, 2, 2]
