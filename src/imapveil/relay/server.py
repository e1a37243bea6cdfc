"""Accept clients, run a `Connection` for each, and shut down cleanly.

On SIGTERM or SIGINT the listeners close at once, every session gets
`* BYE [UNAVAILABLE] Server shutting down` at its next response boundary (RFC 5530), and the
proxy waits up to `shutdown_grace` seconds for sessions to end before cutting them off.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from imapveil.relay.connection import Connection, RelaySettings, _address
from imapveil.sinks import Sink

log = logging.getLogger(__name__)


@dataclass
class Stats:
    active: int = 0
    accepted: int = 0


class Proxy:
    def __init__(self, settings: RelaySettings, sink: Sink, *, shutdown_grace: float = 10.0):
        self.settings = settings
        self.sink = sink
        self.shutdown_grace = shutdown_grace
        self.stats = Stats()
        self.connections: set[Connection] = set()
        self.shutdown = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self._prefix = secrets.token_hex(3)

    def _session_id(self) -> str:
        return f"{self._prefix}-{self.stats.accepted:06d}"

    async def handle(self, stream: trio.SocketStream) -> None:
        self.stats.accepted += 1
        self.stats.active += 1
        if self._idle.is_set():
            self._idle = trio.Event()
        connection: Connection | None = None
        try:
            _tune(stream)
            peer = _peer_host(stream)
            connection = Connection(
                stream,
                client_address=_peer(stream),
                client_host=peer,
                session_id=self._session_id(),
                settings=self.settings,
                sink=self.sink,
                shutdown=self.shutdown,
            )
            self.connections.add(connection)
            await connection.run()
        finally:
            if connection is not None:
                self.connections.discard(connection)
            self.stats.active -= 1
            if not self.stats.active:
                self._idle.set()

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until `stop()` or a signal; then drain sessions and return."""
        async with trio.open_nursery() as sessions:
            async with trio.open_nursery() as accepting:
                accepting.start_soon(self._serve_until_shutdown, listeners, sessions)
                task_status.started(listeners)
            # Listeners are closed: no new sessions. Let the current ones say goodbye.
            with trio.move_on_after(self.shutdown_grace):
                await self._idle.wait()
            if self.stats.active:
                log.warning(
                    "cutting off %d sessions after %gs", self.stats.active, self.shutdown_grace
                )
            sessions.cancel_scope.cancel()

    async def _serve_until_shutdown(
        self, listeners: list[trio.SocketListener], sessions: trio.Nursery
    ) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve_listeners, self.handle, listeners, sessions)
            await self.shutdown.wait()
            nursery.cancel_scope.cancel()
        for listener in listeners:
            await listener.aclose()

    def stop(self) -> None:
        self.shutdown.set()

    async def stop_on_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s, shutting down", signal.Signals(signum).name)
                self.stop()
                return


async def _serve_listeners(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    listeners: list[trio.SocketListener],
    sessions: trio.Nursery,
) -> None:
    await trio.serve_listeners(handler, listeners, handler_nursery=sessions)


async def open_listeners(host: str, port: int) -> list[trio.SocketListener]:
    return await trio.open_tcp_listeners(port, host=host or None)


def listener_address(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return _address(host, port)


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "unknown"
    return _address(host, port)


def _peer_host(stream: trio.SocketStream) -> str:
    try:
        host: str = stream.socket.getpeername()[0]
    except OSError:
        return ""
    return host


def _tune(stream: trio.SocketStream) -> None:
    # Keepalive finds clients that vanished without a FIN (laptops closing, NAT timeouts).
    with contextlib.suppress(OSError):
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, True)
