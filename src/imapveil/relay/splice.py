"""Literal bodies from socket to socket in the kernel: splice(2) through a pipe.

The octets of a large literal (a FETCH body from the server, an APPEND body from the client once
the server asked for it) are only counted by the core, never read. Between two plain TCP legs
they need not enter Python at all: `Connection` asks the core how many follow
(`SessionCore.server_literal_left`, `client_literal_left`) and, from `SPLICE_MIN` octets on,
moves them socket → pipe → socket with `os.splice`, then tells the core how many passed
(`passed_server`, `passed_client`), which counts them exactly as if they had been fed.

The mechanics are here; `Connection._splice` drives them. The pipe is the only buffer: at most
its size (`PIPE_SIZE`, kernel memory, only while a literal passes) is between the legs, and a
destination that does not read stops the source from being read (TCP backpressure, as on the
normal path). Both ends are nonblocking; waiting is trio's `wait_readable`/`wait_writable`, so
a slow peer slows only its own session.

What saves the CPU is less the copies than the wake-ups: a sender on loopback writes in pieces
of some 60 KiB, and a relay that wakes for each pays the event loop's round trip each time.
While a literal passes, the source socket's low-water mark (SO_RCVLOWAT) asks the kernel to
wake us only once a pipeful (or the literal's rest) is there; a slow sender must not make the
client wait for that, so after `LOWAT_WAIT` the mark drops to one octet and whatever came is
taken. The mark is one octet again when the literal has passed.

TLS and COMPRESS legs, and platforms without `os.splice`, take the normal path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys

import trio
from trio.lowlevel import wait_readable, wait_writable

AVAILABLE = sys.platform == "linux" and hasattr(os, "splice")
"""Whether the relay splices at all (tests switch it off to compare with the normal path)."""
SPLICE_MIN = 64 * 1024
"""Literal octets still to come from which the relay splices rather than receives."""
PIPE_SIZE = 1024 * 1024
"""The pipe's capacity asked for (F_SETPIPE_SZ: Linux's `pipe-max-size` by default); what the
kernel gives otherwise."""
LOWAT_WAIT = 0.005
"""Seconds to wait for a pipeful before taking what there is (at 200 MB/s a MiB takes 5 ms)."""

_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_UNSUPPORTED = frozenset((errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP))


class Totals:
    """What this process spliced (for the tests, and for anyone asking whether it is used)."""

    __slots__ = ("literals", "octets")

    def __init__(self) -> None:
        self.literals = 0
        self.octets = 0


totals = Totals()


class Unsupported(Exception):
    """splice(2) refused to read this socket; nothing moved, so the normal path can go on."""


class Pipe:
    """A nonblocking pipe from one socket (`source`) to others. `held` octets are in it, read
    from the source and not yet written out. `close` closes it and resets the source's
    low-water mark."""

    __slots__ = ("held", "lowat", "read_fd", "size", "source", "write_fd")

    def __init__(self, source: trio.socket.SocketType) -> None:
        self.source = source
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.size = fcntl.fcntl(self.write_fd, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # over the user's pipe quota, say: the size it has
            self.size = fcntl.fcntl(self.write_fd, _F_GETPIPE_SZ)
        self.held = 0
        self.lowat = 1

    def __repr__(self) -> str:
        return f"<pipe size={self.size} held={self.held} lowat={self.lowat}>"

    def close(self) -> None:
        self._lowat(1)
        for fd in (self.read_fd, self.write_fd):
            if fd >= 0:
                os.close(fd)
        self.read_fd = self.write_fd = -1
        self.held = 0

    def _lowat(self, mark: int) -> None:
        """The source's low-water mark (only ever an economy: a failure changes nothing)."""
        if mark != self.lowat and self.source.fileno() >= 0:
            with contextlib.suppress(OSError):
                self.source.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, mark)
                self.lowat = mark

    async def fill(self, limit: int) -> int:
        """Up to `limit` octets from the source into the (empty) pipe, waiting until some
        arrive: how many (0: the peer closed). Raises OSError (a reset), `Unsupported`."""
        want = min(limit, self.size - self.held)
        fd = self.source.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the leg is closed")
        await self._wait(fd, want)
        while True:
            try:
                n = os.splice(fd, self.write_fd, want, flags=_FLAGS)
            except BlockingIOError:  # woken for nothing (rare): wait again
                self._lowat(1)
                await wait_readable(fd)
                continue
            except OSError as exc:
                if exc.errno in _UNSUPPORTED:  # nothing moved: the normal path can go on
                    raise Unsupported(errno.errorcode.get(exc.errno or 0, "?")) from exc
                raise
            self.held += n
            totals.octets += n
            return n

    async def _wait(self, fd: int, want: int) -> None:
        """Until `want` octets are there, or `LOWAT_WAIT` has passed and some are.

        The mark is set every time, down as well as up: the kernel may wake us before a mark is
        reached (under memory pressure, say), and a mark left over from a larger `want` would
        keep the last octets of a literal waiting in the socket for good."""
        self._lowat(want)
        if want > 1:
            with trio.move_on_after(LOWAT_WAIT):
                await wait_readable(fd)
                return
            self._lowat(1)  # a slow sender: what there is goes now
        await wait_readable(fd)

    def take(self) -> bytes:
        """What the pipe holds, read out (for when the core must see it after all)."""
        data = bytearray()
        while self.held:
            chunk = os.read(self.read_fd, self.held)
            self.held -= len(chunk)
            data += chunk
        return bytes(data)

    async def drain(self, fd: int) -> None:
        """Everything in the pipe to socket `fd`, waiting while its peer does not read.
        Raises OSError (EPIPE, ECONNRESET)."""
        while self.held:
            try:
                n = os.splice(self.read_fd, fd, self.held, flags=_FLAGS)
            except BlockingIOError:
                await wait_writable(fd)
                continue
            self.held -= n
