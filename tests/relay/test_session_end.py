"""The end of a session costs no more scheduler steps than it needs: the client's EOF goes on to
a plain server leg at once (shutdown(2) under the write lock, no checkpoint), as the core expects
it (the session then ends as the client's close); and the end takes no cancel scope of its own
(what waits there is shielded where it waits)."""

from __future__ import annotations

import socket
import traceback

import pytest
import trio
import trio.testing

from imapveil.protocol.config import CoreConfig
from imapveil.relay.connection import Connection, RelaySettings
from imapveil.relay.streams import Leg
from imapveil.relay.timers import Timers
from imapveil.sinks import MemorySink


def stream_of(sock: socket.socket) -> trio.SocketStream:
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


def connection(client: socket.socket, server: socket.socket) -> Connection:
    settings = RelaySettings("127.0.0.1", 1, CoreConfig())
    conn = Connection(
        stream_of(client),
        client_address="c",
        session_id="s1",
        settings=settings,
        sink=MemorySink(),
        timers=Timers(),
    )
    conn.server = Leg("server", stream_of(server))
    return conn


async def test_the_clients_eof_goes_to_a_plain_server_leg_without_a_checkpoint() -> None:
    ours_c, client = socket.socketpair()
    ours_s, server = socket.socketpair()
    with client, server, ours_c, ours_s:
        conn = connection(ours_c, ours_s)
        with trio.testing.assert_no_checkpoints():
            assert await conn._client_half_closed()
        server.settimeout(5)
        assert server.recv(100) == b""  # our EOF
        assert conn.server is not None and not conn.server.write_lock.locked()
        # The leg still carries the server's answers to the client.
        server.sendall(b"* BYE logging out\r\n")
        ours_s.setblocking(True)
        assert ours_s.recv(100) == b"* BYE logging out\r\n"


async def test_the_clients_eof_waits_for_a_send_in_progress() -> None:
    ours_c, client = socket.socketpair()
    ours_s, server = socket.socketpair()
    with client, server, ours_c, ours_s:
        conn = connection(ours_c, ours_s)
        assert conn.server is not None
        lock = conn.server.write_lock
        assert lock.take_if_free()  # the other pump is sending
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def half_close() -> None:
                assert await conn._client_half_closed()
                done.set()

            nursery.start_soon(half_close)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()
            server.setblocking(False)
            try:
                early = server.recv(100)
            except BlockingIOError:
                early = None
            assert early is None  # no EOF while the send is on its way
            lock.release()
        server.setblocking(True)
        server.settimeout(5)
        assert server.recv(100) == b""
        assert not lock.locked()


async def test_a_closed_server_leg_takes_no_eof() -> None:
    ours_c, client = socket.socketpair()
    ours_s, server = socket.socketpair()
    with client, server, ours_c, ours_s:
        conn = connection(ours_c, ours_s)
        assert conn.server is not None
        conn.server.stream.socket.close()  # type: ignore[attr-defined]
        assert not await conn._client_half_closed()
        assert not conn.server.write_lock.locked()


async def test_a_logout_session_enters_two_cancel_scopes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The connect's timeout and the pumps' nursery: the session's end takes none of its own
    (what waits there is shielded where it waits). A cancel scope is some 50 calls of trio."""
    upstream = socket.create_server(("127.0.0.1", 0))
    upstream.setblocking(False)
    port = upstream.getsockname()[1]
    ours, client = socket.socketpair()
    client.setblocking(False)
    address = ((socket.AF_INET, ("127.0.0.1", port)),)  # resolved, as the service has it
    settings = RelaySettings("127.0.0.1", port, CoreConfig(), upstream_addresses=address)
    conn = Connection(
        stream_of(ours),
        client_address="c",
        session_id="s1",
        settings=settings,
        sink=MemorySink(),
        timers=Timers(),
    )
    me = trio.lowlevel.current_task()
    entered: list[str] = []
    enter = trio.CancelScope.__enter__

    def counting(scope: trio.CancelScope) -> trio.CancelScope:
        if trio.lowlevel.current_task() is not me:
            entered.append(
                " < ".join(f"{f.name}:{f.lineno}" for f in traceback.extract_stack(limit=5)[:-1])
            )
        return enter(scope)

    monkeypatch.setattr(trio.CancelScope, "__enter__", counting)

    async def received(sock: socket.socket) -> bytes:
        while True:
            await trio.testing.wait_all_tasks_blocked()
            try:
                return sock.recv(1000)
            except BlockingIOError:
                await trio.sleep(0.001)

    with upstream, client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run)
            while True:
                await trio.testing.wait_all_tasks_blocked()
                try:
                    server, _ = upstream.accept()
                    break
                except BlockingIOError:
                    await trio.sleep(0.001)
            with server:
                server.setblocking(False)
                server.send(b"* OK ready\r\n")
                assert await received(client) == b"* OK ready\r\n"
                client.send(b"a LOGOUT\r\n")
                assert await received(server) == b"a LOGOUT\r\n"
                server.send(b"* BYE bye\r\na OK done\r\n")
                assert await received(client) == b"* BYE bye\r\na OK done\r\n"
                client.shutdown(socket.SHUT_WR)  # the client's EOF, passed on to the server
                assert await received(server) == b""
        # the server's close ends the session (both legs ended: closed at once)
    assert len(entered) == 2, entered
