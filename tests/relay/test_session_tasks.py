"""How many tasks a session runs: its own (the server's pump), and the client's pump only once
the core wants the client's data (after the greeting). Before that the client's pump would only
wait for an Event; starting it later saves a scheduler step and the Event per session."""

from __future__ import annotations

import socket
from typing import Any

import trio
import trio.testing

from imapveil.protocol.config import CoreConfig
from imapveil.relay.connection import Connection, RelaySettings
from imapveil.relay.timers import Timers
from imapveil.sinks import MemorySink


def pumps() -> int:
    """Tasks of this run waiting in `Connection._pump` (whatever they await in it)."""
    found = 0
    root = trio.lowlevel.current_root_task()
    assert root is not None
    todo = [root]
    while todo:
        task = todo.pop()
        coro: Any = task.coro
        while coro is not None and getattr(coro, "cr_code", None) is not None:
            if coro.cr_code is Connection._pump.__code__:
                found += 1
                break
            coro = coro.cr_await
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return found


async def test_the_clients_pump_starts_with_the_greeting() -> None:
    upstream = trio.socket.socket()
    await upstream.bind(("127.0.0.1", 0))
    upstream.listen()
    port = upstream.getsockname()[1]
    ours, client = socket.socketpair()
    sink = MemorySink()
    settings = RelaySettings("127.0.0.1", port, CoreConfig())
    with upstream, client:
        connection = Connection(
            trio.SocketStream(trio.socket.from_stdlib_socket(ours)),
            client_address="c",
            session_id="s1",
            settings=settings,
            sink=sink,
            timers=Timers(),
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.run)
            server, _ = await upstream.accept()
            with server:
                await trio.testing.wait_all_tasks_blocked()
                # The server's pump waits for the greeting; the client's has not started.
                assert connection.server is not None
                assert pumps() == 1
                await server.send(b"* OK ready\r\n")
                await trio.testing.wait_all_tasks_blocked()
                assert pumps() == 2
                client.setblocking(False)
                assert client.recv(100) == b"* OK ready\r\n"
                client.send(b"a NOOP\r\n")
                with trio.fail_after(5):
                    assert await server.recv(100) == b"a NOOP\r\n"
                    await server.send(b"a OK done\r\n")
                    await trio.testing.wait_all_tasks_blocked()
                    assert client.recv(100) == b"a OK done\r\n"
                client.shutdown(socket.SHUT_RDWR)
                client.close()
                with trio.fail_after(5):
                    await server.recv(100)  # the EOF the proxy passed on
    assert any(type(r).__name__ == "SessionEnded" for r in sink.records)
