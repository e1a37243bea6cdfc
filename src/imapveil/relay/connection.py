"""One proxied session: a client leg, an upstream leg, and the core between them.

Each leg has a reader task that feeds the core and then performs the core's actions in order.
Writes to a leg go through a FIFO lock, so the two readers never interleave inside each other's
sends, and `send_all` is awaited before the next receive: a peer that does not read slows the
other side of its own session down (TCP backpressure) and nothing buffers without bound.

The legs themselves, and the socket helpers, are in `streams`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio
from trio.lowlevel import wait_readable

from imapveil.protocol import ja4, proxy_header
from imapveil.protocol.actions import (
    Action,
    Close,
    Direction,
    Emit,
    Forward,
    Reply,
    StartCompress,
    StartTls,
)
from imapveil.protocol.session import CoreConfig, SessionCore
from imapveil.records import IdExchange, Record, SessionEnded, Violation
from imapveil.relay import splice
from imapveil.relay.deflate import DeflateError, DeflateStream
from imapveil.relay.recording import RecordingStream
from imapveil.relay.streams import (
    CLOSE_GRACE,
    Leg,
    Networks,
    close_now,
    connect_numeric,
    describe,
    format_address,
    in_networks,
    keepalive,
    tls_reason,
)
from imapveil.relay.timers import Timers
from imapveil.relay.tls import UpstreamTlsError, upstream_starttls
from imapveil.sinks import Sink

log = logging.getLogger(__name__)

_SENDS = (Forward, Reply)  # a tuple: `isinstance` with `Forward | Reply` builds the union each call


@dataclass(frozen=True, slots=True)
class RelaySettings:
    upstream_host: str
    upstream_port: int
    core: CoreConfig
    connect_timeout: float = 10.0
    tls_handshake_timeout: float = 30.0
    """Seconds for a client's whole TLS handshake (a deadline, not per octet)."""
    trusted_networks: Networks = ()
    """Clients whose ID may carry x-originating-* and the like (see policy.model.ANTI_SPOOF)."""
    upstream_proxy_protocol: bool = False
    """Start the upstream connection with a PROXY v2 header naming the real client."""
    client_context: ssl.SSLContext | None = None
    """Our certificate, for implicit-TLS listeners and STARTTLS on the client leg."""
    upstream_addresses: tuple[tuple[int, tuple[Any, ...]], ...] = ()
    """(family, sockaddr) resolved when the configuration was loaded: connecting then costs no
    name lookup (trio resolves in a worker thread, about 2 ms of CPU per session)."""
    upstream_tls: str = "plain"  # "plain" | "implicit" | "starttls"
    upstream_context: ssl.SSLContext | None = None

    def trusts(self, client_host: str) -> bool:
        return in_networks(client_host, self.trusted_networks)

    @property
    def upstream(self) -> str:
        return format_address(self.upstream_host, self.upstream_port)


class Connection:
    __slots__ = (
        "_active",
        "_client_eof",
        "_closed",
        "_endpoints",
        "_expired",
        "_implicit_tls",
        "_pumps",
        "_readers",
        "_refusal",
        "_resume",
        "_shortest",
        "_sink_failed",
        "_splice_off",
        "_timers",
        "client",
        "core",
        "server",
        "settings",
        "sink",
        "timer_due",
    )

    def __init__(
        self,
        client_stream: trio.abc.Stream,
        *,
        client_address: str,
        session_id: str,
        client_host: str = "",
        settings: RelaySettings,
        sink: Sink,
        timers: Timers,
        client_endpoints: tuple[tuple[str, int], tuple[str, int]] | None = None,
        refusal: tuple[str, str] | None = None,
        implicit_tls: bool = False,
    ) -> None:
        self.client = Leg("client", client_stream)
        self.server: Leg | None = None
        self.settings = settings
        self.sink = sink
        self.core = SessionCore(
            settings.core,
            session_id=session_id,
            client=client_address,
            upstream=settings.upstream,
            now=trio.current_time(),
            trusted_client=settings.trusts(client_host),
            client_endpoints=client_endpoints,
            client_secure=implicit_tls,
        )
        self._implicit_tls = implicit_tls
        self._closed = False
        self._client_eof = False  # the client half-closed; the server's answers still go to it
        self._pumps: trio.CancelScope | None = None
        self._readers: trio.Nursery | None = None
        """Where the client's pump starts once the core first wants its data (see `run`)."""
        self._expired = False  # the timers cancelled the pumps: no traffic in time
        self._endpoints = client_endpoints  # (client, the address it connected to)
        self._refusal = refusal
        self._resume: trio.Event | None = None  # set when the core wants client data again
        self._sink_failed = False
        self._splice_off = False  # splice(2) refused these sockets: receive as usual
        self._timers = timers
        self._active = 0.0  # when traffic was last seen (while the timers keep this session)
        self._shortest = self.core.shortest_timeout
        self.timer_due = math.inf

    def __repr__(self) -> str:
        return f"<Connection {self.core.session_id}>"

    async def run(self) -> None:
        """Relay until either side closes, then write the end record.

        Never raises: whatever fails while serving this session (a peer, a library such as
        zlib or ssl, a bug of ours, a sink) ends this session, with its `session_end` record
        and one diagnostic, and nothing else.
        """
        try:
            await self._apply(self.core.start())
            if await self._open():
                # Relaying, here and not in a coroutine of its own: a session's task waits in
                # this frame (and in `Proxy.handle`'s, and a pump's) for as long as it lives.
                # Two tasks per session, no more: memory per idle session is a design
                # constraint. The timeouts are the timers' (one task for all sessions): `expire`
                # cancels the pumps' scope and says why (no cancel scope of its own).
                assert self.server is not None
                self._timers.enter(self)
                try:
                    self._touch()
                    async with trio.open_nursery() as pumps:
                        self._pumps = pumps.cancel_scope
                        if self._closed:  # closed while connecting (shutdown)
                            pumps.cancel_scope.cancel()
                        # The client's pump starts when the core first wants the client's data
                        # (after the greeting: `_resume_client`), not to wait for it in a task
                        # step and an Event of its own: one scheduler step a session fewer.
                        if not self._closed:
                            self._readers = pumps
                            self._resume_client()
                        await self._pump(self.server, Direction.TO_CLIENT)
                finally:
                    self._readers = None
                    self._timers.leave(self)
                if self._expired and pumps.cancel_scope.cancelled_caught and not self._closed:
                    await self._apply(self.core.timed_out(trio.current_time()))
        except Exception:
            # A bug of ours, not a peer's mistake: say so once, with the trace, and move on.
            log.exception("session %s failed", self.core.session_id)
            try:
                self._emit_all(self.core.failed("internal error", trio.current_time()))
            except Exception:
                log.exception("session %s: could not record the failure", self.core.session_id)
        finally:
            # No shield of its own: what could wait here is shielded where it waits (a leg's
            # graceful close, the nursery closing two), a cancel scope a session fewer.
            try:
                self._emit_all(self.core.finish(trio.current_time()))
            except Exception:
                log.exception("session %s: could not finish", self.core.session_id)
                self._emit(self._fallback_end())
            await self._close_legs()

    def _fallback_end(self) -> SessionEnded:
        """The end record when the core could not write its own."""
        core = self.core
        return SessionEnded(
            session=core.session_id,
            client=core.client_address,
            upstream=core.upstream_address,
            reason="error",
            detail="internal error",
            state=core.state.value,
            user=None,
            duration_ms=round((trio.current_time() - core.started) * 1000.0, 3),
            bytes_from_client=core.bytes_from_client,
            bytes_from_server=core.bytes_from_server,
            commands=core.commands,
            client_tls=core.client_secure,
            compressed=core.compressed,
        )

    def _emit(self, record: Record) -> None:
        """Hand a record to the sinks; a sink that fails costs that record, nothing more."""
        if log.isEnabledFor(logging.DEBUG):
            _debug_record(record)
        try:
            self.sink.emit(record)
        except Exception:
            if not self._sink_failed:
                self._sink_failed = True
                log.exception("session %s: a record could not be written", self.core.session_id)

    async def _open(self) -> bool:
        """Everything before relaying: a refusal's answer, the client's TLS, the upstream
        connection, its PROXY header and TLS. False: the session is over (with its records)."""
        if self._refusal is not None:
            reason, detail = self._refusal
            await self._apply(self.core.refused(reason, detail, trio.current_time()))
            return False
        if self._implicit_tls and not await self._client_handshake():
            return False
        upstream = await self._connect()
        if upstream is None:
            return False
        self.server = Leg("server", upstream)
        if self.settings.upstream_proxy_protocol and self._endpoints is not None:
            try:
                await self.server.send_many([proxy_header.build_v2(*self._endpoints)])
            except (trio.BrokenResourceError, OSError) as exc:
                now = trio.current_time()
                self._emit_all(self.core.failed(f"send to server: {describe(exc)}", now))
                return False
        return self.settings.upstream_tls == "plain" or await self._upstream_tls()

    async def _connect(self) -> trio.SocketStream | None:
        s = self.settings
        detail = f"no connection within {s.connect_timeout:g} s"
        started = trio.current_time()
        with trio.move_on_after(s.connect_timeout):
            try:
                if s.upstream_addresses:
                    stream = await connect_numeric(s.upstream_addresses)
                else:
                    stream = await trio.open_tcp_stream(s.upstream_host, s.upstream_port)
                keepalive(stream)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "session %s: connected to upstream %s (%s) in %.1f ms",
                        self.core.session_id, s.upstream, _peer_name(stream),
                        (trio.current_time() - started) * 1000.0,
                    )  # fmt: skip
                return stream
            except OSError as exc:
                detail = describe(exc)
        log.debug(
            "session %s: upstream %s not connected after %.1f ms: %s",
            self.core.session_id, s.upstream, (trio.current_time() - started) * 1000.0, detail,
        )  # fmt: skip
        await self._apply(self.core.upstream_unavailable(detail, trio.current_time()))
        return None

    async def _client_handshake(self) -> bool:
        """TLS on the client leg of an implicit-TLS listener."""
        async with self.client.write_lock:
            return await self._handshake_locked()

    async def _handshake_locked(self) -> bool:
        """TLS on the client leg, its write lock held (on an implicit-TLS listener, or after our
        OK to STARTTLS, sent under the same hold: see `_carry_out`)."""
        context = self.settings.client_context
        assert context is not None, "a TLS listener needs a certificate"
        leg = self.client
        recording = RecordingStream(leg.stream)  # the ClientHello, for its JA4
        tls = trio.SSLStream(recording, context, server_side=True)
        leg.stream = tls
        detail = ""
        with trio.move_on_after(self.settings.tls_handshake_timeout):
            try:
                await tls.do_handshake()
                self.core.tls_fingerprint(ja4.fingerprint(recording.stop()))
                return True
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                detail = tls_reason(exc)
        self.core.tls_fingerprint(ja4.fingerprint(recording.stop()))
        leg.broken = True
        detail = detail or f"no TLS handshake within {self.settings.tls_handshake_timeout:g} s"
        # Per session at debug only: any client can make one (connect, reset). The `Proxy`
        # says them at info once a minute; the session's record has the detail.
        log.debug("session %s: client TLS failed: %s", self.core.session_id, detail)
        self._emit_all(self.core.tls_failed(f"client: {detail}", trio.current_time()))
        return False

    def _switch(self, action: Action) -> Callable[[], Awaitable[object]] | None:
        """What turns the client leg after our OK, when `action` (the one after it) says so."""
        if isinstance(action, StartCompress):
            return self._deflate_locked
        if isinstance(action, StartTls):
            return self._handshake_locked  # a failure leaves the leg broken, said and recorded
        return None

    async def _deflate_locked(self) -> None:
        """The client leg turns DEFLATE (after our OK to COMPRESS), its write lock held."""
        self.client.stream = DeflateStream(self.client.stream)

    async def _upstream_tls(self) -> bool:
        s = self.settings
        assert self.server is not None and s.upstream_context is not None
        greeting = b""
        detail = ""
        with trio.move_on_after(s.connect_timeout):
            try:
                if s.upstream_tls == "implicit":
                    tls = trio.SSLStream(
                        self.server.stream, s.upstream_context, server_hostname=s.upstream_host
                    )
                    await tls.do_handshake()
                else:
                    tls, greeting = await upstream_starttls(
                        self.server.stream, s.upstream_context, s.upstream_host
                    )
                self.server.stream = tls
                if greeting:
                    await self._apply(self.core.feed_server(greeting, trio.current_time()))
                return True
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                detail = tls_reason(exc)
            except UpstreamTlsError as exc:
                detail = str(exc)
        detail = f"tls: {detail or 'no TLS within the connect timeout'}"
        await self._apply(self.core.upstream_unavailable(detail, trio.current_time()))
        return False

    def _touch(self) -> None:
        """Traffic was seen (and the core has read it: the timeout depends on what it waits
        for). Only a deadline earlier than the one the timers hold is handed to them now."""
        now = self._active = trio.current_time()
        if now + self._shortest >= self.timer_due:
            # No timeout is shorter than that, and the login deadline (if any) was in the entry
            # already: the deadline cannot have come earlier. (Nearly every receive ends here.)
            return
        due = self.core.deadline(now)
        if due < self.timer_due:
            self._timers.at(due, self)

    def deadline(self) -> float:
        """For the timers: when `timed_out` is due, counted from the last traffic."""
        return self.core.deadline(self._active)

    def expire(self) -> None:
        """For the timers: no traffic in time (see `run`)."""
        if self._pumps is not None:
            self._expired = True
            self._pumps.cancel()

    def _close(self) -> None:
        """Stop both pumps; `run` then closes the legs."""
        self._closed = True
        self._readers = None  # the client's pump, if not started yet, never starts
        if self._resume is not None:
            self._resume.set()
        if self._pumps is not None:
            self._pumps.cancel()

    async def shut_down(self) -> None:
        """The proxy is stopping: BYE at the next response boundary, then close (the core
        closes once it has said it; the proxy cuts off what is left after CLOSE_WAIT)."""
        if not self._closed:
            await self._apply(self.core.shutting_down(trio.current_time()))

    async def _pump(self, source: Leg, direction: Direction) -> None:
        core = self.core
        from_client = direction is Direction.TO_SERVER
        feed = core.feed_client if from_client else core.feed_server
        literal_left = core.client_literal_left if from_client else core.server_literal_left
        resume = core.resume_client if from_client else core.resume_server
        while not self._closed:
            if core.client_backlog if from_client else core.server_backlog:
                # What the peer sent earlier waits to be read (this session's turn was over,
                # `session.TURN`): the other sessions' turn first, then read on.
                await trio.lowlevel.checkpoint()
                await self._apply(resume(trio.current_time()))
                self._touch()
                self._resume_client()
                continue
            if from_client and not core.wants_client_data:
                # The client must wait for the server (its greeting, a "+" for a literal, an
                # AUTHENTICATE challenge): stop reading, so that what it sends ahead stays in
                # its own socket buffers (TCP backpressure), not in ours.
                self._resume = trio.Event()
                await self._resume.wait()  # no local: the frame would keep the Event for good
                continue
            if literal_left() >= splice.SPLICE_MIN and (dest := self._splice_to(source)):
                if not await self._splice(source, dest, from_client):
                    return
                continue
            try:
                # `Leg.receive`, inline for plain TCP legs: its coroutine frame would be one more
                # that each pump keeps while it waits (two a session, a few hundred octets).
                fd = source.readable_fd()
                data: bytes | bytearray | None
                if fd < 0:
                    data = await source.receive()
                else:
                    await wait_readable(fd)
                    if (data := source.read(fd)) is None:
                        continue
            except DeflateError as exc:
                # Not a reset: the client sent what cannot be read (its answer and its record).
                await self._apply(core.unreadable_deflate(str(exc), trio.current_time()))
                return
            except (trio.BrokenResourceError, OSError) as exc:
                # A reset is how many clients hang up; it is the peer's business, not an error.
                log.debug("session %s: %s reset: %s", core.session_id, source.name, exc)
                data = None  # as an end, but not a clean one: nothing more can reach the client
            except trio.ClosedResourceError:
                return
            now = trio.current_time()
            if not data:
                source.ended = True
                if from_client and data is not None and await self._client_half_closed():
                    return  # the server's pump goes on until the server closes in turn
                closed = (
                    core.client_closed if from_client or self._client_eof else core.server_closed
                )
                await self._apply(closed(now))
                return
            actions = feed(bytes(data) if type(data) is not bytes else data, now)
            del data  # this frame waits in the next receive: it keeps no chunk meanwhile
            await self._apply(actions)
            del actions
            self._touch()  # after the core saw it: the timeout depends on what it is waiting for
            self._resume_client()

    async def _client_half_closed(self) -> bool:
        """The client closed its side cleanly (an EOF, not a reset), and may still be reading:
        `nc -N`, or a script's shutdown(SHUT_WR) after its LOGOUT. As a direct connection would,
        the EOF goes on to the server, and its answers to what came before it are relayed until
        it closes in turn (Dovecot answers every command it has read, then closes); the session
        then ends as the client's close. False: the session ends now (no open server leg, or one
        that cannot be half-closed: TLS)."""
        server = self.server
        if server is None or server.ended or server.broken or self.core.closed:
            return False
        stream = server.stream
        if type(stream) is trio.SocketStream:
            # Plain TCP (nearly always): shutdown(2) at once, under the write lock taken without
            # the scheduling round trip when free (as `Leg.send_many` takes it), not through
            # `send_eof` and its checkpoint: two scheduler steps and a cancel scope fewer, and
            # no Cancelled raised in them when the server's EOF ends the session meanwhile.
            lock = server.write_lock
            if not lock.take_if_free():
                await lock.acquire()  # after anything the other pump is sending
            try:
                stream.socket.shutdown(socket.SHUT_WR)
            except OSError:
                return False
            finally:
                lock.release()
            self._client_eof = True
            return True
        if not isinstance(stream, trio.abc.HalfCloseableStream):
            return False
        async with server.write_lock:  # after anything the other pump is sending
            try:
                await stream.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return False
        self._client_eof = True
        return True

    def _resume_client(self) -> None:
        """Wake the client's reader if it waits and the core wants its data again (or closed);
        the first time, start it (see `run`). A method, not inline: a local in `_pump`'s frame
        would keep the Event while it waits."""
        resume = self._resume
        readers = self._readers
        if resume is None and readers is None:
            return
        core = self.core
        if core.wants_client_data or core.client_backlog or core.closed:
            if readers is not None:
                self._readers = None
                readers.start_soon(self._pump, self.client, Direction.TO_SERVER)
            elif resume is not None:
                self._resume = None
                resume.set()

    def _splice_to(self, source: Leg) -> Leg | None:
        """Where the literal octets that follow (at least `SPLICE_MIN` the core need not read)
        are spliced to (`relay/splice.py`) when both legs are plain TCP. None: receive them."""
        if not splice.AVAILABLE or self._splice_off:
            return None
        dest = self.server if source is self.client else self.client
        if dest is None or dest.broken or not dest.plain_socket() or not source.plain_socket():
            return None
        return dest

    async def _splice(self, source: Leg, dest: Leg, from_client: bool) -> bool:
        """The rest of the current literal from `source` to `dest` in the kernel, each pipeful
        counted by the core before it goes out, as received octets are. False: the session is
        over (the source closed or reset, or a send failed), with its records."""
        core = self.core
        left_of = core.client_literal_left if from_client else core.server_literal_left
        sock = source.plain_socket()
        assert sock is not None
        try:
            pipe = splice.Pipe(sock)
        except OSError as exc:  # out of descriptors, say: receive as usual
            log.debug("session %s: no pipe: %s", core.session_id, describe(exc))
            self._splice_off = True
            return True
        splice.totals.literals += 1
        try:
            while (left := left_of()) and not self._closed:
                try:
                    n = await pipe.fill(left)
                except splice.Unsupported as exc:
                    log.debug("session %s: no splice: %s", core.session_id, exc)
                    self._splice_off = True
                    return True
                except trio.ClosedResourceError:
                    return False
                except OSError as exc:
                    log.debug("session %s: %s reset: %s", core.session_id, source.name, exc)
                    n = 0
                if not n:
                    source.ended = True
                if not await self._spliced(dest, pipe, n, from_client):
                    return False
        finally:
            pipe.close()
        return True

    async def _spliced(self, dest: Leg, pipe: splice.Pipe, n: int, from_client: bool) -> bool:
        """`n` octets from the source are in the pipe (0: it closed): the core counts them, then
        they go out. False: the session is over."""
        core, now = self.core, trio.current_time()
        if not n:
            closed = core.client_closed if from_client or self._client_eof else core.server_closed
            await self._apply(closed(now))
            return False
        if n <= (core.client_literal_left() if from_client else core.server_literal_left()):
            (core.passed_client if from_client else core.passed_server)(n, now)
            try:
                await dest.send_pipe(pipe)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._send_failed(dest, exc, now)
                return False
        else:
            # The core changed its mind while the octets came (it is closing): it reads them.
            feed = core.feed_client if from_client else core.feed_server
            await self._apply(feed(pipe.take(), now))
            self._resume_client()
        self._touch()
        return True

    async def _apply(self, actions: list[Action]) -> None:
        """Carry out the core's actions in order.

        Consecutive sends to one leg go out under one hold of its lock: the core only speaks
        (`+`, `* BYE`) at a response boundary, and that boundary is the end of an action list,
        so the other reader must not slip its bytes in between two parts of one response.

        Records wait until the sends next to them are done (a command's record is written after
        its answer is on its way to the client, not before: the client does not wait for the
        event log), and never longer than the next action that is not a send, nor past the end
        of this call, whatever happens (a cancelled or failed send included). A TLS handshake
        that fails after our OK to STARTTLS ends the actions, but for the records after it
        (what the client sent behind STARTTLS, dropped: its violation).
        """
        records: list[Record] = []
        try:
            await self._carry_out(actions, records)
        finally:
            for record in records:
                self._emit(record)

    async def _carry_out(self, actions: list[Action], records: list[Record]) -> None:
        i, n = 0, len(actions)
        while i < n:
            action = actions[i]
            if isinstance(action, _SENDS):
                direction = action.direction
                j = i
                batch: list[bytes | memoryview] = []
                while j < n:
                    nxt = actions[j]
                    if isinstance(nxt, _SENDS) and nxt.direction is direction:
                        batch.append(nxt.data)
                    elif not isinstance(nxt, Emit):
                        break
                    else:
                        records.append(nxt.record)
                    j += 1
                # Our OK to COMPRESS or STARTTLS, then DEFLATE or the TLS handshake, under one
                # hold of the client leg's lock: no server response goes out between them.
                then = (
                    self._switch(actions[j]) if direction is Direction.TO_CLIENT and j < n else None
                )
                i = j + 1 if then is not None else j
                leg = self.server if direction is Direction.TO_SERVER else self.client
                if leg is None or leg.broken:
                    continue
                try:
                    if self.core.closed:
                        await self._last_words(leg, batch, then)
                    else:
                        await leg.send_many(batch, then=then)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self._emit_records(records)
                    self._send_failed(leg, exc, trio.current_time())
                    return
                self._emit_records(records)
                if then is not None and leg.broken:  # the handshake after our OK to STARTTLS
                    _records_after(actions, i, records)  # failed (and said so)
                    return
                continue
            if isinstance(action, Emit):
                records.append(action.record)
                i += 1
                continue
            self._emit_records(records)
            if isinstance(action, Close):
                self._close()  # an unavailable upstream is logged by the `Proxy`, not each time
            elif (then := self._switch(action)) is not None:
                # A switch with no OK of ours just before it (the core sends one with each:
                # they share a hold of the lock above); under the lock all the same.
                async with self.client.write_lock:
                    await then()
                if self.client.broken:  # the handshake failed (and said so)
                    _records_after(actions, i + 1, records)
                    return
            i += 1

    async def _last_words(
        self,
        leg: Leg,
        batch: list[bytes | memoryview],
        then: Callable[[], Awaitable[object]] | None,
    ) -> None:
        """What goes out once the session has decided to close (a `* BYE`, the end of an answer)
        waits at most `CLOSE_GRACE`, for the leg's lock and for the peer to take it: a client
        that reads nothing (its buffers full, or the other reader's send to it waiting under the
        lock) must not keep a closing session, and its server connection, open until the idle
        timeout, or for good after it. Not taken in time, the words are given up and the leg is
        broken: nothing more is said on it."""
        with trio.move_on_after(CLOSE_GRACE) as waited:
            await leg.send_many(batch, then=then)
        if waited.cancelled_caught:
            leg.broken = True
            self._close()

    def _send_failed(self, leg: Leg, exc: BaseException, now: float) -> None:
        """A send to `leg` failed: the session ends. A client that sent its EOF before (see
        `_client_half_closed`) has closed, not failed: it did not stay to read the answers."""
        if leg is self.client and (self._client_eof or _peer_gone(exc)):
            # A client that reset (or closed) while its answer was on the way has closed, as
            # the reader of its leg would have said had it seen the reset first.
            self._emit_all(self.core.client_closed(now))
        else:
            self._emit_all(self.core.failed(f"send to {leg.name}: {describe(exc)}", now))
        self._close()

    def _emit_records(self, records: list[Record]) -> None:
        """The records waiting in `_apply`, in order; the list is left empty."""
        for record in records:
            self._emit(record)
        records.clear()

    def _emit_all(self, actions: list[Action]) -> None:
        """Records only; for the moments when nothing may be sent any more."""
        for action in actions:
            if isinstance(action, Emit):
                self._emit(action.record)
            elif isinstance(action, Close):
                self._close()

    async def _close_legs(self) -> None:
        """Legs whose peer closed are closed at once; the others gracefully (`close_gracefully`
        may wait for the peer), side by side when there are two.

        Whether or not the session is being cancelled (the proxy cutting off what is left):
        nothing here takes a cancellation before the legs are closed. A plain leg closes
        without a checkpoint, any other through `trio.aclose_forcefully` (cancelled by design),
        a graceful close waits in a shielded scope, and so do two side by side."""
        client, server = self.client, self.server
        waiting = None
        for leg in (client, server):
            if leg is None:
                continue
            if leg.ended:
                await self._close_leg(leg)
            elif waiting is None:
                waiting = leg
            else:
                with trio.CancelScope(shield=True):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._close_leg, waiting)
                        nursery.start_soon(self._close_leg, leg)
                return
        if waiting is not None:
            await self._close_leg(waiting)

    async def _close_leg(self, leg: Leg) -> None:
        try:
            await leg.close_gracefully()
        except Exception:
            log.exception("session %s: closing the %s leg failed", self.core.session_id, leg.name)
            with contextlib.suppress(Exception):
                await close_now(leg.stream)


def _debug_record(record: Record) -> None:
    """A debug line for what the core decided: the ID policy's decisions by field name, the
    protocol rules and limits it enforced, how the session ended. Never a value of an ID field,
    a user, a tag or a credential: records hold none of the latter, and only names of the former
    are read here."""
    if isinstance(record, IdExchange):
        forwarded = "NIL" if record.forwarded is None else ", ".join(record.forwarded) or "none"
        log.debug(
            "session %s: ID%s under policy %s: forwarded %s; dropped %s; server answered %s",
            record.session, " (injected)" if record.injected else "", record.policy or "?",
            forwarded, ", ".join(record.dropped) or "none", record.status or "nothing",
        )  # fmt: skip
    elif isinstance(record, Violation):
        log.debug(
            "session %s: %s broke a rule: %s (%s), %s",
            record.session, record.source, record.kind, record.detail, record.action,
        )  # fmt: skip
    elif isinstance(record, SessionEnded):
        log.debug(
            "session %s: ended (%s%s) after %.0f ms, %d commands, %d/%d octets in/out",
            record.session, record.reason, f": {record.detail}" if record.detail else "",
            record.duration_ms, record.commands, record.bytes_from_client,
            record.bytes_from_server,
        )  # fmt: skip


def _records_after(actions: list[Action], start: int, records: list[Record]) -> None:
    """The records among actions[start:], for `_apply` to write when the rest is not carried
    out (a failed switch)."""
    records.extend(a.record for a in actions[start:] if isinstance(a, Emit))


def _peer_gone(exc: BaseException) -> bool:
    """A send failed because the peer reset or closed the connection (not a local error)."""
    while exc is not None and not isinstance(exc, OSError):
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return exc is not None and exc.errno in (errno.ECONNRESET, errno.EPIPE)


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "?"
    return format_address(str(host), int(port))
