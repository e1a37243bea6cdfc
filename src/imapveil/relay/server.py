"""Accept clients, run a `Connection` for each, and shut down cleanly.

`stop()` (the service calls it on SIGTERM/SIGINT) closes the listeners at once and gives sessions
`shutdown_grace` seconds to end on their own; then every session still open gets
`* BYE [UNAVAILABLE] Server shutting down` at its next response boundary (RFC 5530) and is
closed, and after CLOSE_WAIT more seconds whatever is left is cut off.

A connection over a limit gets `* BYE [UNAVAILABLE]` and is closed without a session: refusals
are counted per address, and reported (a line on stderr, an `over_limit` record) for the first
and then once per `REFUSAL_INTERVAL`, so a client reconnecting in a loop cannot flood the logs.
"""

from __future__ import annotations

import errno
import functools
import logging
import secrets
import select
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from imapveil.protocol import proxy_header
from imapveil.protocol.proxy_header import ProxyHeaderError, ProxyInfo
from imapveil.records import OverLimit
from imapveil.relay.connection import Connection, RelaySettings
from imapveil.relay.limits import Admission, Limits, Occurrences, Refusals, RefusalSummary
from imapveil.relay.streams import (
    Networks,
    close_now,
    describe,
    format_address,
    in_networks,
    keepalive,
)
from imapveil.relay.timers import Timers
from imapveil.sinks import Sink

log = logging.getLogger(__name__)


PROXY_HEADER_TIMEOUT = 5.0
CLOSE_WAIT = 5.0
"""Seconds sessions get to deliver their BYE and close once the grace period is over."""
REFUSAL_CLOSE_WAIT = 1.0
"""Seconds a refused client gets to read its BYE before the socket is closed."""
OVER_LIMIT_BYE = b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n"
SHUTDOWN_BYE = b"* BYE [UNAVAILABLE] Server shutting down\r\n"


@dataclass
class Stats:
    active: int = 0
    accepted: int = 0
    refused: int = 0


@dataclass(frozen=True, slots=True)
class Admittance:
    """What the proxy applies to new connections; replaced as a whole on reload."""

    relay: RelaySettings
    limits: Limits = field(default_factory=Limits)
    proxy_protocol_from: Networks = ()

    def expects_proxy_header(self, host: str) -> bool:
        return in_networks(host, self.proxy_protocol_from)


class Proxy:
    def __init__(
        self,
        settings: RelaySettings | Admittance,
        sink: Sink,
        *,
        shutdown_grace: float = 30.0,
    ) -> None:
        self.admittance = settings if isinstance(settings, Admittance) else Admittance(settings)
        self.sink = sink
        self.shutdown_grace = shutdown_grace
        self.stats = Stats()
        self.connections: set[Connection] = set()
        self.stopping = trio.Event()
        """Set by `stop()`: listeners close, sessions may go on for `shutdown_grace`."""
        self.shutdown = trio.Event()
        """Set when the grace period is over: every session says BYE and closes."""
        self._admission = Admission(self.admittance.limits)
        self.refusals = Refusals()
        self._unavailable = Occurrences()
        """Sessions the upstream was not there for: each client can make one (and a client out
        of descriptors, connect(2)'s EMFILE), so they are said once a minute, not each."""
        self._tls_failures = Occurrences()
        """Client TLS handshakes that failed: a client that resets makes one."""
        self._idle = trio.Event()
        self._idle.set()
        self.timers = Timers()
        """Every session's timeouts, kept by one task (see `relay.timers`)."""
        self._prefix = secrets.token_hex(8)
        """64 random bits per process start: session ids of all proxies and all starts sharing
        one store never collide in practice (statistics rows are keyed by them)."""

    @property
    def settings(self) -> RelaySettings:
        return self.admittance.relay

    def reconfigure(self, admittance: Admittance) -> None:
        """New settings for new connections; open sessions keep theirs."""
        self.admittance = admittance
        self._admission.limits = admittance.limits

    def _session_id(self) -> str:
        return f"{self._prefix}-{self.stats.accepted:06d}"

    async def handle(self, stream: trio.SocketStream, *, implicit_tls: bool = False) -> None:
        self.stats.accepted += 1
        self.stats.active += 1
        if self._idle.is_set():
            self._idle = trio.Event()
        connection: Connection | None = None
        admitted: str | None = None
        try:
            # Admission in a coroutine of its own: this frame stays for the whole session (a
            # session's task waits in it), that one's locals and stack are gone once it returns.
            opened = await self._admit(stream, implicit_tls)
            if opened is not None:
                connection, admitted = opened
                del opened
                self.connections.add(connection)
                await connection.run()
                self._ended(connection.core.end_reason, connection.core.end_detail)
        except Exception:
            # `run` never raises; this is what comes before it. One connection's failure must
            # not reach the nursery every session shares.
            log.exception("connection handler failed")
        finally:
            if admitted is not None:
                self._admission.release(admitted)
            if connection is not None:
                self.connections.discard(connection)
            self.stats.active -= 1
            if not self.stats.active:
                self._idle.set()
            await close_now(stream)  # closed already, but for a failure before

    async def _admit(
        self, stream: trio.SocketStream, implicit_tls: bool
    ) -> tuple[Connection, str | None] | None:
        """The session for a new connection, and the address it was admitted under (None: a
        refused PROXY header, the session says so); None when a limit refused it (answered), or
        when the connection ended before anything could be read from it (reset before it was
        accepted, or from a balancer before the first octet of its header)."""
        admittance = self.admittance  # keepalive: from the listener (`_serve_listeners`)
        peer = _peer_pair(stream)
        local = _local_pair(stream)
        if peer is None or local is None:
            # getpeername(2) fails (ENOTCONN) once the peer has reset the connection: HAProxy's
            # layer-4 check does, right after its header. Whom it came from cannot be told, so
            # neither whether it had to start with a PROXY header: nothing of it is read and no
            # upstream connection is made; nobody is left to answer, so there is no session.
            log.debug("a connection was reset before it was accepted")
            return None
        refusal: tuple[str, str] | None = None
        if admittance.expects_proxy_header(peer[0]):
            try:
                info = await _read_proxy_header(stream)
            except _Silent:
                # Ended before its first octet: a balancer's connect-only health check (or one
                # reset too late to fail getpeername above). Nothing heard, nobody to answer.
                log.debug("a connection from %s ended before its PROXY header", peer[0])
                return None
            except ProxyHeaderError as exc:
                refusal = ("proxy_header", str(exc))
            else:
                if info.source is not None and info.destination is not None:
                    peer, local = info.source, info.destination
        host = peer[0]
        if self.shutdown.is_set():
            # Its header was still coming when the grace period ended: the sessions have been
            # told BYE by now, and this one would not be (nor be waited for).
            log.debug("a connection's PROXY header came after the grace period")
            await _refuse(stream, SHUTDOWN_BYE)
            return None
        admitted: str | None = None
        if refusal is None:
            why = self._admission.admit(host, trio.current_time())
            if why is not None:
                self._note_refusal(host, why)
                await _refuse(stream)
                return None
            admitted = self._admission.key(host)
        try:
            connection = Connection(
                stream,
                client_address=format_address(*peer),
                client_host=host,
                session_id=self._session_id(),
                settings=admittance.relay,
                sink=self.sink,
                timers=self.timers,
                client_endpoints=(peer, local),
                refusal=refusal,
                implicit_tls=implicit_tls,
            )
        except BaseException:
            if admitted is not None:
                self._admission.release(admitted)
            raise
        return connection, admitted

    def _ended(self, reason: str | None, detail: str | None) -> None:
        """What an operator must hear of, of the ways a session can end, and a client can make
        happen over and over: said once a minute with a count (the records have every one)."""
        now = trio.current_time()
        if reason == "upstream_unavailable":
            said = self._unavailable.note(now)
            if said is not None:
                log.warning("upstream %s unavailable: %s%s", self.settings.upstream, detail, said)
        elif reason == "tls_error" and detail and detail.startswith("client: "):
            said = self._tls_failures.note(now)
            if said is not None:
                log.info("client TLS failed: %s%s", detail.removeprefix("client: "), said)

    def _note_refusal(self, host: str, why: str) -> None:
        self.stats.refused += 1
        log.debug("refused a connection from %s over a limit: %s", host, why)
        # Under whom it was counted: an IPv6 client rotating its address within its prefix
        # gets one report, not one per address.
        client = self._admission.limits.client(host)
        summary = self.refusals.note(client, why, trio.current_time())
        if summary is not None:
            self._report(summary)

    def _report(self, summary: RefusalSummary) -> None:
        log.warning("%s", summary.describe())
        self.sink.emit(
            OverLimit(summary.address, summary.count, summary.why, round(summary.seconds, 1))
        )

    async def _report_refusals(self) -> None:
        """Summaries of refusals as their intervals end, until the listeners close."""
        tick = self.refusals.interval / 12
        while not self.stopping.is_set():
            with trio.move_on_after(tick):
                await self.stopping.wait()
            for summary in self.refusals.due(trio.current_time()):
                self._report(summary)

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        tls_listeners: list[trio.SocketListener] | None = None,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until `stop()`; then let sessions finish, say BYE to the rest, and return.

        `tls_listeners` accept implicit TLS (993-style): the handshake comes first."""
        async with trio.open_nursery() as sessions:
            sessions.start_soon(self.timers.run)  # cancelled with the sessions, at the end
            async with trio.open_nursery() as accepting:
                accepting.start_soon(self._serve_until_stopped, listeners, sessions, False)
                if tls_listeners:
                    accepting.start_soon(self._serve_until_stopped, tls_listeners, sessions, True)
                accepting.start_soon(self._report_refusals)
                task_status.started(listeners)
            # Listeners are closed: no new sessions. The current ones may finish on their own
            # (unless `shutdown` is set early: a second SIGTERM).
            with trio.move_on_after(self.shutdown_grace):
                async with trio.open_nursery() as waiting:
                    waiting.start_soon(_then_cancel, self._idle.wait, waiting.cancel_scope)
                    waiting.start_soon(_then_cancel, self.shutdown.wait, waiting.cancel_scope)
            if self.stats.active:
                log.info("grace period over: %d sessions get BYE", self.stats.active)
            self.shutdown.set()
            with trio.move_on_after(CLOSE_WAIT):
                async with trio.open_nursery() as goodbyes:
                    for connection in list(self.connections):
                        goodbyes.start_soon(connection.shut_down)
                await self._idle.wait()
            if self.stats.active:
                log.warning("cutting off %d sessions", self.stats.active)
            sessions.cancel_scope.cancel()
        for summary in self.refusals.due(trio.current_time(), final=True):
            self._report(summary)

    async def _serve_until_stopped(
        self, listeners: list[trio.SocketListener], sessions: trio.Nursery, implicit_tls: bool
    ) -> None:
        handler = functools.partial(self.handle, implicit_tls=implicit_tls)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve_listeners, handler, listeners, sessions)
            await self.stopping.wait()
            nursery.cancel_scope.cancel()
        for listener in listeners:
            await listener.aclose()

    def stop(self) -> None:
        self.stopping.set()


async def _then_cancel(wait: Callable[[], Awaitable[object]], scope: trio.CancelScope) -> None:
    await wait()
    scope.cancel()


async def _refuse(stream: trio.SocketStream, bye: bytes = OVER_LIMIT_BYE) -> None:
    """`* BYE [UNAVAILABLE]`, then close once the client has read it (or after a short wait)."""
    with trio.move_on_after(REFUSAL_CLOSE_WAIT):
        try:
            await stream.send_all(bye)
            # Closing with unread input would send a reset, which can destroy the BYE in flight.
            await stream.send_eof()
            while await stream.receive_some(4096):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    await close_now(stream)


class _Silent(Exception):
    """The connection ended (closed or reset) before its first octet."""


async def _read_proxy_header(stream: trio.SocketStream) -> ProxyInfo:
    """The PROXY header a trusted balancer sends first, and not one octet more.

    What follows the header stays in the socket for whoever reads next: on an implicit-TLS
    listener that is the TLS handshake, which a balancer often sends in the same segment as the
    header. Each step peeks at what has arrived and takes exactly the part that is header."""
    data = b""
    with trio.move_on_after(PROXY_HEADER_TIMEOUT):
        while True:
            try:
                peeked = await stream.socket.recv(4096, socket.MSG_PEEK)
            except OSError:
                peeked = b""
            if not peeked:
                raise _Silent() if not data else ProxyHeaderError("closed before a PROXY header")
            # raises ProxyHeaderError for what cannot be one
            parsed = proxy_header.parse(data + peeked)
            take = len(peeked) if parsed is None else parsed[1] - len(data)
            data += await _receive_exactly(stream, take)
            if parsed is not None:
                return parsed[0]
            if len(data) > 16 + proxy_header.V2_MAX_BODY:
                raise ProxyHeaderError("PROXY header too long")
    raise ProxyHeaderError(f"no PROXY header within {PROXY_HEADER_TIMEOUT:g} s")


async def _receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    """`size` octets that a peek has shown to be there already."""
    data = b""
    while len(data) < size:
        try:
            chunk = await stream.socket.recv(size - len(data))
        except OSError:
            chunk = b""
        if not chunk:
            raise ProxyHeaderError("closed before a PROXY header")
        data += chunk
    return data


ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
"""accept(2) errors that a wait may cure (as trio's `serve_listeners` has them)."""
ACCEPT_RETRY = 0.1
"""Seconds before accepting again after the process or the system ran out of descriptors or
memory (trio's `serve_listeners` waits as long)."""


async def _serve_listeners(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    listeners: list[trio.SocketListener],
    sessions: trio.Nursery,
) -> None:
    """What `trio.serve_listeners` does, but each session's task runs `handler` itself, not
    inside trio's `_run_handler` (whose closing of the stream `Proxy.handle` does): one coroutine
    frame fewer that every session's task keeps for as long as it lives."""
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            # TCP keepalive, set once on the listener: Linux copies it to each connection made
            # from then on (one system call a session fewer). Not to those already made and
            # waiting in its queue (the one that started a socket-activated service, those that
            # came while it started): `_accept` gives them their own.
            keepalive(listener.socket)
            nursery.start_soon(_accept, listener, handler, sessions, True)


async def serve_each(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    listeners: list[trio.SocketListener],
) -> None:
    """`trio.serve_listeners` for a service beside the mail listeners (the metrics port): the
    handler closes its stream, and a lack of descriptors is said as `_accept` says it (trio's
    loop logs every retry, ten a second, each with its traceback)."""
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept, listener, handler, nursery)


async def _accept(
    listener: trio.SocketListener,
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    sessions: trio.Nursery,
    queued: bool = False,
) -> None:
    """Accept until cancelled. `queued`: connections may wait in the listener's queue that were
    made before its keepalive was set; each connection accepted is given keepalive of its own
    until the queue has been seen empty once, which is after the last of them."""
    failures = Occurrences()  # while the backlog holds connections, every retry fails
    async with listener:
        while True:
            if queued:
                queued = _waiting(listener.socket)
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                if (said := failures.note(trio.current_time())) is not None:
                    log.error(
                        "accept failed: %s; retrying every %g s%s",
                        describe(exc), ACCEPT_RETRY, said,
                    )  # fmt: skip
                await trio.sleep(ACCEPT_RETRY)
                continue
            if queued:
                keepalive(stream)
            sessions.start_soon(handler, stream)
            del stream


def _waiting(sock: trio.socket.SocketType) -> bool:
    """Whether a connection waits in a listening socket's queue (it is readable)."""
    poll = select.poll()
    try:
        poll.register(sock.fileno(), select.POLLIN)
        return bool(poll.poll(0))
    except (OSError, ValueError):
        return False  # closed: its accept says so


async def open_listeners(host: str, port: int) -> list[trio.SocketListener]:
    return await trio.open_tcp_listeners(port, host=host or None)


def listener_address(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return format_address(host, port)


def _peer_pair(stream: trio.SocketStream) -> tuple[str, int] | None:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return None
    return str(host), int(port)


def _local_pair(stream: trio.SocketStream) -> tuple[str, int] | None:
    try:
        host, port = stream.socket.getsockname()[:2]
    except OSError:
        return None
    return str(host), int(port)
