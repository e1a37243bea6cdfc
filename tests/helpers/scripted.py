"""A scripted upstream for tests that must know every octet a server sends: a handler reads the
proxy's lines and says what the script says, and `serve` runs it on a loopback port."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio


class Peer:
    """One connection's side of a script: `line()` reads a line from the proxy (b"" at its end),
    `say()` sends and keeps what was sent in `sent`."""

    def __init__(self, stream: trio.SocketStream, sent: bytearray) -> None:
        self.stream = stream
        self.sent = sent
        self._buffer = bytearray()

    async def line(self) -> bytes:
        while b"\n" not in self._buffer:
            data = await self.stream.receive_some(4096)
            if not data:
                return b""
            self._buffer.extend(data)
        end = self._buffer.index(b"\n") + 1
        got = bytes(self._buffer[:end])
        del self._buffer[:end]
        return got

    async def say(self, data: bytes) -> None:
        self.sent += data
        await self.stream.send_all(data)


@asynccontextmanager
async def serve(
    script: Callable[[Peer], Awaitable[None]], sent: bytearray
) -> AsyncIterator[tuple[str, int]]:
    """Runs `script` for each connection to the address yielded; what it says goes into `sent`."""

    async def handler(stream: trio.SocketStream) -> None:
        await script(Peer(stream, sent))

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        yield listeners[0].socket.getsockname()[:2]
        nursery.cancel_scope.cancel()


async def talkative(peer: Peer, lines: bytes, *, after_login: bool) -> None:
    """An upstream that sends `lines` (untagged responses, which a server may send at any time:
    RFC 9051 section 7) without end: from its greeting on, or once the client has logged in
    (any first command is answered OK), until the proxy closes its side."""
    await peer.say(b"* OK [CAPABILITY IMAP4rev1] hi\r\n")
    if after_login:
        tag = (await peer.line()).split(b" ")[0]
        await peer.say(tag + b" OK logged in\r\n")

    async def flood(cancel: trio.CancelScope) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while True:
                await peer.say(lines)
        cancel.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood, nursery.cancel_scope)
        while await peer.line():  # until the proxy closes its side: then the flood ends
            pass
        nursery.cancel_scope.cancel()
    await peer.stream.aclose()


def fetch_until_closed(address: tuple[str, int], logout: bool = True) -> bytes:
    """A client for those scripts: LOGIN, `a2 FETCH 1 BODY[]` and (with `logout`, once the
    answer is complete) LOGOUT; everything it receives until EOF."""
    with socket.create_connection(address, timeout=30) as s:
        received = bytearray(s.recv(4096))
        s.sendall(b"a1 LOGIN x y\r\n")
        while not received.endswith(b"a1 OK logged in\r\n"):
            received += s.recv(4096)
        s.sendall(b"a2 FETCH 1 BODY[]\r\n")
        while data := s.recv(1 << 20):
            received += data
            if logout and received.endswith(b"a2 OK done\r\n"):
                s.sendall(b"a3 LOGOUT\r\n")
        return bytes(received)
