"""Issue 12, item 1: nothing one session raises leaves that session.

First as the attacker did it, against a real `imapveil serve`: COMPRESS DEFLATE, then more than
256 KiB of valid DEFLATE followed by junk. Then a fault injected at each stage of a session
(the core, the client and server streams, the record sink, the close), in-process: each time only
that session ends, with a `session_end` record, and the proxy goes on serving the next one.
"""

from __future__ import annotations

import contextlib
import imaplib
import inspect
import os
import socket
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from imapveil.protocol.session import SessionCore
from imapveil.records import Record, SessionEnded
from imapveil.relay import connection as connection_module
from imapveil.relay.deflate import DeflateStream
from imapveil.relay.streams import Leg
from tests.conftest import RunningProxy, start_proxy
from tests.helpers.dovecot import Dovecot
from tests.helpers.process import imapveil

pytestmark = pytest.mark.dovecot


def login_works(port: int) -> None:
    m = imaplib.IMAP4("127.0.0.1", port, timeout=10)
    m.login("alice", "wonderland")
    m.logout()


def test_bad_deflate_after_a_large_chunk_ends_only_that_session(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    with imapveil(tmp_path, dovecot.address, "--compress", "true") as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"l LOGIN alice wonderland\r\n")
            assert f.readline().startswith(b"l OK")
            s.sendall(b"a COMPRESS DEFLATE\r\n")
            assert f.readline().startswith(b"a OK")
            # More than one receive's worth of output (256 KiB) from valid DEFLATE, then junk:
            # the decompressor fails on its buffered path.
            deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
            payload = deflate.compress(os.urandom(200) * 2000) + deflate.flush(zlib.Z_SYNC_FLUSH)
            s.sendall(payload + b"\xff" * 64)
            s.settimeout(10)
            try:
                while s.recv(65536):
                    pass
            except ConnectionResetError:
                pass  # closed while our junk was still unread: a reset is fine
        assert proxy.process.poll() is None, "the service died"
        login_works(proxy.port)
        assert proxy.stop() == 0
    ends = [r for r in proxy.records() if r["event"] == "session_end"]
    assert len(ends) == 2
    assert ends[-1]["reason"] == "logout"


# --- Faults injected at each stage, in-process.


class Boom(Exception):
    """The fault: any exception a bug of ours, a library or a peer could raise."""


def sessions_ended(running: RunningProxy) -> list[SessionEnded]:
    return [r for r in running.sink.records if isinstance(r, SessionEnded)]


async def imap_login(address: tuple[str, int]) -> bytes:
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        data = b""
        await stream.send_all(b"a LOGIN alice wonderland\r\nb LOGOUT\r\n")
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    return data


Which = Callable[[object], bool]


def fail_once(
    monkeypatch: pytest.MonkeyPatch, owner: object, name: str, which: Which = lambda _: True
) -> None:
    """Make owner.name raise Boom the first time it is called on an object `which` accepts
    (methods) or at all (functions), then behave."""
    original = getattr(owner, name)
    fired: list[bool] = []

    def due(args: tuple[object, ...]) -> bool:
        if fired or not which(args[0] if args else None):
            return False
        fired.append(True)
        return True

    def wrapper(*args: object, **kwargs: object) -> object:
        if due(args):
            raise Boom("injected")
        return original(*args, **kwargs)

    async def async_wrapper(*args: object, **kwargs: object) -> object:
        if due(args):
            raise Boom("injected")
        return await original(*args, **kwargs)

    chosen = async_wrapper if inspect.iscoroutinefunction(original) else wrapper
    monkeypatch.setattr(owner, name, chosen)


def peer_port(port: int) -> Which:
    def which(stream: object) -> bool:
        assert isinstance(stream, trio.SocketStream)
        try:
            return int(stream.socket.getpeername()[1]) == port
        except OSError:
            return False

    return which


def own_port(port: int) -> Which:
    def which(stream: object) -> bool:
        assert isinstance(stream, trio.SocketStream)
        return int(stream.socket.getsockname()[1]) == port

    return which


STAGES = [
    "core-start",
    "core-feed-client",
    "core-feed-server",
    "core-finish",
    "server-connect",
    "server-receive",
    "client-send",
    "close",
]


def inject(stage: str, mp: pytest.MonkeyPatch, dovecot: Dovecot, proxy_port: int) -> None:
    if stage.startswith("core-"):
        fail_once(mp, SessionCore, stage[5:].replace("-", "_"))
    elif stage == "server-connect":
        fail_once(mp, connection_module, "connect_numeric")
    elif stage == "server-receive":  # the proxy's server leg
        fail_once(mp, trio.SocketStream, "receive_some", peer_port(dovecot.address[1]))
    elif stage == "client-send":  # the proxy's client leg
        fail_once(mp, trio.SocketStream, "send_all", own_port(proxy_port))
    else:
        fail_once(mp, Leg, "close_gracefully")


@pytest.mark.parametrize("stage", STAGES)
async def test_a_fault_at_any_stage_ends_only_that_session(
    dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    async with trio.open_nursery() as nursery:
        running = await start_proxy(nursery, dovecot.address)
        inject(stage, monkeypatch, dovecot, running.port)
        with contextlib.suppress(OSError, trio.BrokenResourceError, trio.TooSlowError):
            await imap_login(running.address)  # the faulty session may end any way it likes
        # The next session is served as if nothing had happened.
        answer = await imap_login(running.address)
        assert b"a OK" in answer
        assert b"b OK" in answer
        running.proxy.stop()
    ends = sessions_ended(running)
    assert len(ends) == 2 or stage == "core-finish"  # finish is what writes session_end
    assert ends[-1].reason == "logout"


class FailingSink:
    """Records go to `inner`, but emitting a record of type `kind` raises, once."""

    def __init__(self, inner: object, kind: type[Record]) -> None:
        self.inner = inner
        self.kind = kind
        self.fired = False

    def emit(self, record: Record) -> None:
        if isinstance(record, self.kind) and not self.fired:
            self.fired = True
            raise Boom("sink failed")
        self.inner.emit(record)  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", [Record, SessionEnded])
async def test_a_failing_sink_ends_at_most_that_session(dovecot: Dovecot, kind: type) -> None:
    async with trio.open_nursery() as nursery:
        running = await start_proxy(nursery, dovecot.address)
        running.proxy.sink = FailingSink(running.sink, kind)
        with contextlib.suppress(OSError, trio.BrokenResourceError):
            await imap_login(running.address)
        answer = await imap_login(running.address)
        assert b"a OK" in answer
        assert b"b OK" in answer
        running.proxy.stop()


async def test_deflate_stream_never_raises_zlib_errors() -> None:
    left, right = trio.testing.memory_stream_pair()
    stream = DeflateStream(left, max_output=1024)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    await right.send_all(deflate.compress(b"x" * 100_000) + deflate.flush(zlib.Z_SYNC_FLUSH))
    await right.send_all(b"\xff" * 64)
    with pytest.raises(trio.BrokenResourceError):
        while await stream.receive_some():
            pass
