"""A session's legs and the socket helpers the relay needs: connecting to the upstream's
pre-resolved addresses, keepalive, network membership, peer-data-free error descriptions.

A leg's stream can be replaced in place (`Leg.stream`): that is how TLS and COMPRESS are layered
on an open connection.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from trio.lowlevel import wait_readable, wait_writable

from imapveil.relay.deflate import DeflateStream
from imapveil.relay.recording import RecordingStream
from imapveil.relay.splice import Pipe

RECEIVE_SIZE = 256 * 1024
_RECEIVED = memoryview(bytearray(RECEIVE_SIZE))
"""The receive buffer of every plain leg (`Leg.read`)."""
_RECEIVE_BUFFERS = [_RECEIVED]
RECORD_SIZE = 16 * 1024
"""The most a TLS record holds (RFC 8446 §5.1)."""
RECORD_COST = 4 * 1024
"""What a TLS record costs of a receive (`Leg._records`) at least, in octets: each costs some
3 us of the loop whatever it holds (its decryption, its buffer). 64 KiB of one-octet records,
one receive from the socket, were ~2,900 records and ~9 ms of the loop every session shares in
one go: while one client sent them, another session's NOOP waited 8-9 ms at the 90th
percentile and 13 at the 99th (0.5-1 and 1-3 ms when a receive took one record). Now 64 records
a receive at most, as many as Dovecot's ~4 KiB records fill it with, the rest for the next
receive: 1.1 and 1.6-2.3 ms, and the flood itself still four times as fast as one a receive."""
IOV_MAX = 1024
"""Buffers one writev(2) takes at most (Linux's UIO_MAXIOV)."""
CLOSE_GRACE = 2.0
"""Seconds to wait for the peer to read our last words before the socket is closed."""

Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def seen_as(host: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    """`host` (an address as text) as an address, none if it is not one; for an IPv4 client on
    a dual-stack listener (systemd's `ListenStream=143`: `::ffff:a.b.c.d`) its IPv4 address
    too, so that IPv4 networks hold it (as the limits count it)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return ()
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return (address,) if mapped is None else (address, mapped)


def in_networks(host: str, networks: Networks) -> bool:
    """Whether `host` (an address as text; anything else is not) lies in one of `networks`."""
    if not networks:  # the usual case, asked once per connection: no address to parse
        return False
    return any(address in network for address in seen_as(host) for network in networks)


class WriteLock:
    """A strict FIFO lock for one leg's sends (what `trio.StrictFIFOLock` does), as small as a
    lock can be: a flag, and a `ParkingLot` only while senders queue. An idle session holds two
    of these; trio's lock, its ParkingLot and the ParkingLot's OrderedDict are about 240 octets
    each. Ownership passes straight to the longest waiter on release (no barging), as in
    trio's."""

    __slots__ = ("_held", "_lot")

    def __init__(self) -> None:
        self._held = False
        self._lot: trio.lowlevel.ParkingLot | None = None

    def locked(self) -> bool:
        return self._held

    def take_if_free(self) -> bool:
        """Take the lock if it is free (True), with no checkpoint: a sender's way, whose send
        then goes out without the scheduling round trip `acquire` costs; `acquire` if False."""
        if self._held:
            return False
        self._held = True
        return True

    async def acquire(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._held:
            self._held = True
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        if self._lot is None:
            self._lot = trio.lowlevel.ParkingLot()
        await self._lot.park()  # woken by `release`, owning the lock

    def release(self) -> None:
        if not self._held:
            raise RuntimeError("release of a lock that is not held")
        lot = self._lot
        if lot:
            lot.unpark()  # the lock passes to the next waiter: it stays held
            return
        self._lot = None  # no waiter: nothing kept while the session idles
        self._held = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class Leg:
    """One side of the session. `stream` may be swapped for a wrapped one (TLS) in place."""

    __slots__ = ("_tls", "_tls_failure", "broken", "ended", "name", "stream", "write_lock")

    def __init__(self, name: str, stream: trio.abc.Stream) -> None:
        self.name = name
        self.stream = stream
        self.write_lock = WriteLock()
        self.broken = False
        """A send was interrupted: the peer may hold half a chunk, so say nothing more. Or a TLS
        record that did not decrypt was read with the records before it (`_records`):
        OpenSSL has failed the connection (a send fails), though the reader has not come to it
        yet. What is to be sent meanwhile (the server's `+` to a command the client waits on)
        goes nowhere, and the reader ends the session where it did when it read a record a
        receive: as the peer's reset, not as a failed send."""
        self.ended = False
        """Its peer closed (or reset) it: nothing is left to read, so closing needs no grace."""
        self._tls_failure: ssl.SSLError | None = None
        """What reading a TLS leg's next record raised, after records read before it were
        returned (`_records`): raised by the next `receive`, as trio would have."""
        self._tls: TlsPath | None = None
        """The direct path of a TLS leg's data (`TlsPath`), for the `SSLStream` it was made for
        (made again when `stream` is another)."""

    async def receive(self) -> bytes | bytearray:
        """Up to RECEIVE_SIZE octets (b"" at the end); raises OSError or trio's errors.

        On a plain TCP leg this is trio's own wait (`wait_readable`: a checkpoint, so a busy
        session yields to the others at every receive) and one recv(2): no conflict detector,
        no doomed first attempt and no second checkpoint, which is about a third of what a
        NOOP round trip costs a relay that goes through `SocketStream`. A handshaken TLS leg
        over a socket likewise, decrypting with trio's SSL object (`TlsPath`); COMPRESS legs,
        and TLS legs that cannot (another trio), receive through their streams.
        (`Connection._pump` does the plain path itself, with `readable_fd` and `read`: see
        there.)

        A TLS leg on its direct path returns every record its socket's receive brought
        (`_records`), not one record a receive, as trio's stream does. A COMPRESS leg inflates
        at most `DeflateStream.max_output` octets a receive.
        """
        while True:
            fd = self.readable_fd()
            if fd < 0:
                stream = self.stream
                if type(stream) is trio.SSLStream:
                    if self._tls_failure is not None:
                        raise trio.BrokenResourceError from self._tls_failure
                    if (tls := self.tls_path()) is not None:
                        return await self._tls_receive(tls)
                # Asked for no size, trio decrypts into a buffer of what it expects a receive
                # from the socket to bring (16 to 64 KiB); asked for RECEIVE_SIZE, it allocated
                # 256 KiB a record, from malloc's mmap (as `read` explains).
                return await stream.receive_some()
            await wait_readable(fd)
            data = self.read(fd)
            if data is not None:
                return data

    def tls_path(self) -> TlsPath | None:
        """The direct path of this TLS leg's data (`TlsPath`), None when it has none: not a
        handshaken `trio.SSLStream` over a socket (yet), or a trio without the internals."""
        tls = self._tls
        stream = self.stream
        if tls is not None and tls.stream is stream:
            return tls
        self._tls = tls = TlsPath.of(stream)
        return tls

    async def _tls_receive(self, tls: TlsPath) -> bytes | bytearray:
        """`receive` on the direct path: the records already in the incoming buffer, or those of
        one read(2) of the socket (`_records`: `RECORD_COST`, its errors)."""
        waited = False
        while True:
            try:
                data = self._records(tls)
            finally:
                if (done := tls.read_done) is not None:  # a send waits on a renegotiation
                    tls.read_done = None
                    done.set()
            if tls.outgoing.pending:
                await tls.flush_after_read(self)  # a KeyUpdate's answer, say
            if data is not None:
                if not waited:
                    # Records left from the last read (the budget): a checkpoint all the same,
                    # as every receive has (a busy session yields to the others); shielded,
                    # as trio's is once it has the octets, which a cancellation would lose.
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return data
            await tls.fill()
            waited = True

    def _records(self, tls: TlsPath) -> bytes | None:
        """The octets of the whole records in the incoming buffer, RECEIVE_SIZE at most, a
        record costing RECORD_COST at least; b"" for the peer's close_notify; None if no record
        is whole yet. A record that does not decrypt breaks the leg, and is raised (as
        `trio.BrokenResourceError`) now if it is the first, by the next `receive` if not."""
        ssl_object, incoming = tls.ssl_object, tls.incoming
        parts: list[bytes] = []
        cost = 0
        while cost < RECEIVE_SIZE:
            if not (incoming.pending or incoming.eof or tls.closed or ssl_object.pending()):
                # Nothing for OpenSSL to read (the usual end of a receive's records): its
                # SSLWantReadError, some 2.6 us to raise, is known without asking. (Python's
                # ssl sets no read-ahead: OpenSSL keeps no whole record of its own.)
                break
            try:
                part = ssl_object.read(RECORD_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLError as exc:
                self.broken = True  # OpenSSL has failed it: nothing more is sent on it
                self._tls_failure = exc  # raised by every receive after this one
                if not parts:
                    raise trio.BrokenResourceError from exc
                break
            if not part:  # the peer's close_notify: after the octets before it
                tls.closed = True  # read as b"" again, however often asked
                return b"".join(parts)
            parts.append(part)
            cost += max(len(part), RECORD_COST)
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def readable_fd(self) -> int:
        """The socket to wait on with `wait_readable` when this is a plain TCP leg, else -1
        (TLS, COMPRESS: receive through the stream, which raises if it is closed)."""
        stream = self.stream
        if type(stream) is not trio.SocketStream:
            return -1
        fd = stream.socket.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the leg is closed")
        return fd

    @staticmethod
    def read(fd: int) -> bytes | None:
        """One read(2) of a plain leg that `wait_readable` said is readable: up to RECEIVE_SIZE
        octets (b"" at the end), None when woken for nothing (rare): wait again.

        Into the one receive buffer all legs share (`_RECEIVED`), then copied out: the copy is
        what the caller keeps, made before anything else can run (no checkpoint in between, one
        thread). `os.read(fd, RECEIVE_SIZE)` instead allocates RECEIVE_SIZE octets each time and
        shrinks them to what came: from malloc's mmap, since it never frees a block that size
        (which is what would move its threshold): mmap, page faults and mremap for every receive,
        about 12 us for a 60-octet command and 100 us for 200 KiB, against 1.5 and 25 us here."""
        try:
            n = os.readv(fd, _RECEIVE_BUFFERS)
        except BlockingIOError:
            return None
        return _RECEIVED[:n].tobytes()

    async def send_many(
        self,
        chunks: list[bytes | memoryview],
        *,
        then: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        """`chunks`, in order, under the write lock; then `then()` before the lock is let go:
        after our OK to COMPRESS or STARTTLS, the switch to DEFLATE or the TLS handshake, so that
        nothing another task sends goes between the OK and what the client reads after it."""
        lock = self.write_lock
        if not lock.take_if_free():  # uncontended nearly always: no scheduling round trip
            await lock.acquire()
        try:
            stream = self.stream
            if type(stream) is trio.SocketStream:
                await _send_fd(stream.socket.fileno(), chunks)
            elif type(stream) is trio.SSLStream and (tls := self.tls_path()) is not None:
                await tls.send(chunks)
            else:
                for data in chunks:
                    await stream.send_all(data)
            if then is not None:
                await then()
        except BaseException:
            self.broken = True
            raise
        finally:
            lock.release()

    async def send_pipe(self, pipe: Pipe) -> None:
        """Everything `pipe` holds to this plain TCP leg (splice(2)), under the write lock: no
        other bytes go out between octets of a literal. Raises as `send_many` does."""
        lock = self.write_lock
        if not lock.take_if_free():  # as in `send_many`
            await lock.acquire()
        try:
            await pipe.drain(_fileno(self.stream))
        except BaseException:
            self.broken = True
            raise
        finally:
            lock.release()

    def plain_socket(self) -> trio.socket.SocketType | None:
        """The open socket of a plain TCP leg (no TLS, no COMPRESS), None otherwise."""
        stream = self.stream
        if type(stream) is not trio.SocketStream or stream.socket.fileno() < 0:
            return None
        return stream.socket

    async def close_gracefully(self) -> None:
        """Half-close, let the peer read what we sent, then close.

        Closing a TCP socket that still has unread input sends a reset, which can destroy our
        last `* BYE` in flight; so stop writing first and drain until the peer closes (briefly).
        A leg whose peer has closed has nothing left to read: it is closed at once.

        A COMPRESS leg is drained below its DEFLATE: what comes is thrown away, so it is never
        inflated (a few KiB of a peer's DEFLATE can be megabytes of it), and its socket can be
        half-closed. A TLS leg likewise below its TLS, after our close_notify: the peer learns at
        once that the session is over, as over plain TCP, not once it closes first or the grace
        is over, and what it sends meanwhile is not decrypted. Not a broken one (a send cut
        short, a failed handshake): it is closed as it always was, without close_notify (the
        peer may hold half a record), at once if trio's stream is broken too.
        """
        stream = self.stream
        if self.ended:
            with contextlib.suppress(Exception):
                await close_now(stream)
            return
        drained = stream.inner if isinstance(stream, DeflateStream) else stream
        notify = b""
        if isinstance(drained, trio.SSLStream) and not self.broken:
            notify = _close_notify(drained)
            drained = drained.transport_stream
            if isinstance(drained, RecordingStream):
                drained = drained.inner
        with trio.move_on_after(CLOSE_GRACE) as scope:
            scope.shield = True
            try:
                if type(drained) is trio.SocketStream:
                    if notify:
                        await _send_fd(drained.socket.fileno(), [notify])
                    await _half_close_and_drain(drained.socket)
                else:
                    if isinstance(drained, trio.abc.HalfCloseableStream):
                        await drained.send_eof()
                    while await drained.receive_some(RECEIVE_SIZE):
                        pass
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                pass
            except OSError:
                pass
        with contextlib.suppress(Exception):
            await close_now(stream)


class TlsPath:
    """A handshaken TLS leg's data path without trio's `SSLStream` machinery: its `SSLObject`
    and memory BIOs (trio's own, `_ssl_object`, `_incoming`, `_outgoing`) driven here, its
    socket read and written the way a plain leg's is (`wait_readable` and one readv(2) into the
    shared buffer; `_send_fd`). trio's `_retry` cost about 60 % of the loop under TLS (its two
    locks, conflict detectors, `SocketStream` and `RecordingStream` under it, checkpoints).

    trio's `SSLStream` stays the leg's stream: it did the handshake (the ClientHello recorded
    under it), and the close (`close_gracefully`, `close_now`) and COMPRESS (`DeflateStream`
    over it) go through it as before. Nothing here changes its state but for the handshake's
    held-back octets, sent here (below) and then forgotten, as trio forgets them once sent.

    What `_retry` does that this does too:
    - The octets OpenSSL writes to the outgoing buffer go out in the order written, whoever
      wrote them: only the holder of the leg's write lock reads that buffer, and it reads it
      until it is empty before letting the lock go. A read that makes some (a TLS 1.3
      KeyUpdate's answer, an alert) sends them if the lock is free, and leaves them to its
      holder (a sender, who sends them before or with its own) if not (`flush_after_read`).
    - The server side's TLS 1.3 session tickets, which trio holds back from the handshake
      until the first send (`_delayed_outgoing`), go out first, before anything else.
    - A peer's close_notify reads as b"", an EOF without one and a record that does not
      decrypt as `trio.BrokenResourceError` from OpenSSL's error (and the leg is broken).
    Renegotiation (TLS 1.2; there is none in 1.3): the client leg's context refuses a
    client's (`tls.server_context`); a server's is carried out, as trio did (servers that ask
    for one take a refusal as fatal): the leg's reader drives it (OpenSSL's read does, its
    octets sent as a KeyUpdate's answer is), and a write that needs the server's octets first
    (`SSLWantReadError`: one under way) sends what OpenSSL wrote and waits for the reader's
    next records (`read_done`), where trio read them itself.
    """

    __slots__ = ("closed", "incoming", "outgoing", "read_done", "sock", "ssl_object", "stream")

    def __init__(self, stream: trio.SSLStream[Any], sock: trio.socket.SocketType) -> None:
        self.stream = stream
        self.closed = False  # the peer's close_notify was read
        self.sock = sock
        self.ssl_object: ssl.SSLObject = stream._ssl_object
        self.incoming: ssl.MemoryBIO = stream._incoming
        self.outgoing: ssl.MemoryBIO = stream._outgoing
        self.read_done: trio.Event | None = None
        """Set (and forgotten) by the reader once OpenSSL has read what came (`_tls_receive`),
        for a send waiting on a renegotiation."""

    @classmethod
    def of(cls, stream: trio.abc.Stream) -> TlsPath | None:
        """The path for `stream` if it is a handshaken `trio.SSLStream` over a socket (or over
        a `RecordingStream` that has stopped recording, over a socket), whose trio has the
        internals this relies on; None otherwise (trio's own path then)."""
        if type(stream) is not trio.SSLStream:
            return None
        try:
            done = stream._handshook.done and stream._state.name == "OK"
            stream._ssl_object, stream._incoming, stream._outgoing, stream._delayed_outgoing  # noqa: B018
        except AttributeError:  # another trio
            return None
        if not done:
            return None
        transport = stream.transport_stream
        if type(transport) is RecordingStream:
            if transport.recording():
                return None
            transport = transport.inner
        if type(transport) is not trio.SocketStream:
            return None
        return cls(stream, transport.socket)

    async def fill(self) -> None:
        """Wait for the socket, and put what one read(2) of it brings in the incoming buffer
        (its EOF as the buffer's)."""
        fd = self.sock.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the leg is closed")
        await wait_readable(fd)
        try:
            n = os.readv(fd, _RECEIVE_BUFFERS)
        except BlockingIOError:
            return
        if n:
            self.incoming.write(_RECEIVED[:n])
        else:
            self.incoming.write_eof()

    async def send(self, chunks: list[bytes | memoryview]) -> None:
        """`chunks` encrypted and sent, the leg's write lock held by the caller; raises as a
        plain leg's send does, or `trio.BrokenResourceError` from an `ssl.SSLError`."""
        ssl_object = self.ssl_object
        if len(chunks) > 1 and sum(map(len, chunks)) <= RECORD_SIZE:
            chunks = [b"".join(chunks)]  # one record for the batch, not one each
        for chunk in chunks:
            data = memoryview(chunk)
            while data:
                try:
                    n = ssl_object.write(data)
                except ssl.SSLWantReadError:  # a renegotiation under way: see the class
                    await self.flush()  # what OpenSSL wrote of it
                    if self.read_done is None:
                        self.read_done = trio.Event()
                    await self.read_done.wait()
                    continue
                except ssl.SSLError as exc:
                    raise trio.BrokenResourceError from exc
                data = data[n:]
        await self.flush()

    async def flush(self) -> None:
        """Everything waiting in the outgoing buffer (and trio's held-back octets), until none
        is left; the leg's write lock held by the caller."""
        fd = self.sock.fileno()
        while pending := _pending(self.stream):
            await _send_fd(fd, pending)  # type: ignore[arg-type]

    async def flush_after_read(self, leg: Leg) -> None:
        """What a read wrote to the outgoing buffer, sent if the leg's write lock is free, else
        left to its holder (who empties the buffer before letting it go). A send that fails
        breaks the leg (its reader comes to the end next); a cancelled one too."""
        lock = leg.write_lock
        if leg.broken or not lock.take_if_free():
            return
        try:
            await self.flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            leg.broken = True
        except BaseException:
            leg.broken = True
            raise
        finally:
            lock.release()


def _pending(stream: trio.SSLStream[Any]) -> list[bytes]:
    """What waits to be sent on `stream`'s transport, in order, taken: trio's held-back
    handshake octets (the server side's TLS 1.3 session tickets, `_delayed_outgoing`), then
    the outgoing buffer's. The peer can decrypt nothing sent before the tickets."""
    held = stream._delayed_outgoing
    outgoing = stream._outgoing
    out = outgoing.read() if outgoing.pending else b""
    if held is None:
        return [out] if out else []
    stream._delayed_outgoing = None
    return [held, out] if out else [held]


def _close_notify(tls: trio.SSLStream[Any]) -> bytes:
    """The octets of `tls`'s close_notify alert, for its transport; b"" if it has none to say
    (no handshake done, or already closed). Through trio's own SSL object and outgoing buffer:
    trio says close_notify only in `aclose`, which then closes the socket at once (unread input
    makes that a reset, which can destroy the peer's last words in flight) and waits for
    nothing under a cancelled scope (where `close_now` closes it: it says nothing). Preceded,
    as trio's own close does, by what trio still holds back from the handshake (a TLS 1.3
    server's session tickets, `_delayed_outgoing`: nothing was sent on the leg yet), without
    which the peer could not decrypt the alert."""
    try:
        ssl_object = tls._ssl_object
        tls._outgoing, tls._delayed_outgoing  # noqa: B018
    except AttributeError:  # another trio
        return b""
    # Said at the first step; the peer's own close_notify is not awaited (SSLWantReadError),
    # and the peer's records not read yet may make OpenSSL's second step fail: said all the same.
    with contextlib.suppress(ssl.SSLError, ValueError):
        ssl_object.unwrap()
    return b"".join(_pending(tls))


async def close_now(stream: trio.abc.AsyncResource) -> None:
    """Close without grace. A plain TCP stream's socket is closed at once (what
    `trio.aclose_forcefully` does in the end, without its cancelled scope and the `Cancelled`
    its checkpoint raises: about 45 us a socket, and a session closes three); anything else
    (TLS, COMPRESS) through `trio.aclose_forcefully`. Closing a closed stream does nothing."""
    if type(stream) is trio.SocketStream:
        stream.socket.close()  # trio's close: tasks waiting on it are woken first
        return
    await trio.aclose_forcefully(stream)


async def _half_close_and_drain(sock: trio.socket.SocketType) -> None:
    """`send_eof`, then `receive_some` until the end, for a plain TCP socket: what
    `trio.SocketStream` does, without its per-call conflict checks and receive buffers (no task
    sends or receives on a leg being closed); what comes is dropped, read into the shared
    buffer. Errors are OSError (a reset) and `trio.ClosedResourceError`."""
    fd = sock.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("the leg is closed")
    sock.shutdown(socket.SHUT_WR)
    while True:
        await wait_readable(fd)
        try:
            if not os.readv(fd, _RECEIVE_BUFFERS):
                return
        except BlockingIOError:
            continue


def _fileno(stream: trio.abc.Stream) -> int:
    assert isinstance(stream, trio.SocketStream)
    fd = stream.socket.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("the leg is closed")
    return fd


async def _send_fd(fd: int, chunks: list[bytes | memoryview]) -> None:
    """All of `chunks` to a plain TCP socket, with writev(2): one system call for the slices of
    one batch. Waits (a checkpoint) only when the peer's buffer is full; the reader's next
    receive is the checkpoint otherwise. Errors are OSError (EPIPE, ECONNRESET)."""
    if fd < 0:
        raise trio.ClosedResourceError("the leg is closed")
    await trio.lowlevel.checkpoint_if_cancelled()
    # First as they are (nearly always the whole batch goes in one call): views of what is left
    # are made only when the peer's buffer took less.
    sent = 0
    if len(chunks) <= IOV_MAX:
        try:
            sent = os.writev(fd, chunks)
        except BlockingIOError:
            pass
        else:
            if sent == sum(map(len, chunks)):
                return
    pending: list[memoryview] = []
    for chunk in chunks:
        size = len(chunk)
        if sent >= size:
            sent -= size
            continue
        pending.append(memoryview(chunk)[sent:])
        sent = 0
    while pending:
        try:
            sent = os.writev(fd, pending[:IOV_MAX])
        except BlockingIOError:
            await wait_writable(fd)
            continue
        while sent:
            first = len(pending[0])
            if sent < first:
                pending[0] = pending[0][sent:]
                break
            sent -= first
            del pending[0]


def resolve(host: str, port: int) -> tuple[tuple[int, tuple[Any, ...]], ...]:
    """The upstream's addresses, numeric, in the resolver's order (done at start and reload)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return tuple((family, sockaddr) for family, _t, _p, _c, sockaddr in infos)


async def connect_numeric(addresses: tuple[tuple[int, tuple[Any, ...]], ...]) -> trio.SocketStream:
    """Try each address in turn; the first that accepts wins.

    A non-blocking connect(2), then trio's `wait_writable` and SO_ERROR: what trio's own
    `socket.connect` does for a numeric address, without its address checks and the
    generator-based context manager around the call (about 20 us a session)."""
    error: OSError | None = None
    for family, sockaddr in addresses:
        raw = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            code = raw.connect_ex(sockaddr)
            if code == errno.EINPROGRESS:
                await wait_writable(raw)
                code = raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            else:
                await trio.lowlevel.checkpoint()
            if code:
                raise OSError(code, os.strerror(code))
        except OSError as exc:
            raw.close()
            error = exc
            continue
        except BaseException:  # cancelled (the connect timeout, a shutdown)
            raw.close()
            raise
        return trio.SocketStream(trio.socket.from_stdlib_socket(raw))
    raise error or OSError("no upstream address")


def keepalive(stream: trio.SocketStream | trio.socket.SocketType) -> None:
    """TCP keepalive: finds peers that vanished without a FIN (laptops, NAT timeouts). On a
    listening socket, for every connection it accepts: Linux copies the option to them."""
    with contextlib.suppress(OSError):
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, True)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def tls_reason(exc: BaseException) -> str:
    """The TLS alert or error name (e.g. `certificate_verify_failed`), never peer data."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return (cause.reason or type(cause).__name__).lower()
        cause = cause.__cause__ or cause.__context__
    return describe(exc)


def describe(exc: BaseException) -> str:
    """A short, peer-data-free description of a network error: `econnrefused`, `timeout`;
    for a TLS error OpenSSL's reason (`http_request`), not its error code, which `ssl.SSLError`
    (an OSError) holds as its errno: code 1 is no `eperm`."""
    if isinstance(exc, ssl.SSLError):
        return (exc.reason or type(exc).__name__).lower()
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno)).lower()
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        return describe(cause.exceptions[0])
    if cause is not None:
        return describe(cause)
    return (str(exc) or type(exc).__name__)[:200]
