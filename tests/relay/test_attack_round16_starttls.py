"""Our OK to STARTTLS and the TLS handshake on the client leg, under one hold of its write lock.

Found (after attack16c's COMPRESS twin): the OK went out under one hold of the client leg's write
lock and the handshake began under the next, so a server response waiting for the lock (an
untagged `* OK` a server may send at any time, RFC 9051 section 7) went out between them in
clear text, where the client reads the TLS handshake. The client's handshake then fails
("wrong version number"): a server that talks before login could break STARTTLS for everyone.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
import trio

from imapveil.relay import streams
from tests.conftest import TlsMaterial
from tests.helpers import scripted
from tests.helpers.attack import veil
from tests.helpers.scripted import Peer

run = trio.to_thread.run_sync

NOTE = b"* OK [ALERT] still here\r\n"


async def chatty(peer: Peer) -> None:
    """An upstream that sends untagged responses without end from its greeting on."""
    await scripted.talkative(peer, NOTE * 200, after_login=False)


def line(s: socket.socket) -> bytes:
    """One line, read an octet at a time: nothing after it is taken from the socket."""
    got = bytearray()
    while not got.endswith(b"\n"):
        octet = s.recv(1)
        assert octet, bytes(got)
        got += octet
    return bytes(got)


def starttls_in_a_flood(address: tuple[str, int], context: ssl.SSLContext) -> str:
    """STARTTLS while the upstream talks: "clean" if the handshake after our OK succeeds and
    the server's lines come over TLS, else what went wrong."""
    with socket.create_connection(address, timeout=5) as s:
        assert line(s).startswith(b"* OK")
        s.sendall(b"s STARTTLS\r\n")
        while (got := line(s)) == NOTE:
            pass
        assert got.startswith(b"s OK"), got
        try:
            with context.wrap_socket(s, server_hostname="localhost") as tls:
                f = tls.makefile("rb")
                return "clean" if f.readline() == NOTE else "not a server line over TLS"
        except ssl.SSLError as exc:
            return f"handshake failed: {exc.reason}"


async def test_nothing_of_the_servers_goes_between_our_ok_and_the_handshake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tls_material: TlsMaterial
) -> None:
    """Each send is made to wait (a checkpoint, as a full socket makes it) so the server's
    reader runs in between whenever it can: before the fix most sessions failed."""
    send_fd = streams._send_fd

    async def waiting(fd: int, chunks: list[bytes | memoryview]) -> None:
        await send_fd(fd, chunks)
        await trio.lowlevel.checkpoint()

    monkeypatch.setattr(streams, "_send_fd", waiting)
    tls = {"client_tls": "offer", "cert": str(tls_material.cert), "key": str(tls_material.key)}
    context = tls_material.client_context()
    async with (
        scripted.serve(chatty, bytearray()) as upstream,
        veil(upstream, tmp_path, **tls) as v,
    ):
        outcomes = [await run(starttls_in_a_flood, v.address, context) for _ in range(8)]
    assert set(outcomes) == {"clean"}, outcomes
