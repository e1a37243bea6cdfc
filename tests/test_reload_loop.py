"""A reload (SIGHUP) reads the configuration and policy files and looks the upstream's name up
again: work that may block (a resolver that answers late, a file on a hung mount). It must not
hold up the sessions being served meanwhile."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio

from imapveil import service as service_module
from imapveil.relay import streams
from imapveil.service import Service, load_all
from tests.helpers.dovecot import Dovecot, free_port
from tests.helpers.process import service_overrides, signal_handlers_restored

SLOW = 1.5
"""Seconds the resolver takes during the reload."""


async def _connect(port: int) -> trio.SocketStream:
    while True:
        try:
            return await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            await trio.sleep(0.01)


async def _ask(stream: trio.SocketStream, tag: bytes, command: bytes) -> float:
    """Seconds until the tagged answer."""
    began = trio.current_time()
    await stream.send_all(tag + b" " + command + b"\r\n")
    received = b""
    while b"\r\n" + tag + b" OK" not in b"\r\n" + received:
        chunk = await stream.receive_some(65536)
        assert chunk, received
        received += chunk
    return trio.current_time() - began


async def test_a_slow_lookup_at_reload_holds_up_no_session(
    dovecot: Dovecot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found: `reload` ran `load_all` and the upstream's lookup (getaddrinfo) on the event loop;
    with a resolver that answers in 1.5 s every session waited 1.5 s. Now in a worker thread."""
    port = free_port()
    overrides = service_overrides(dovecot.address, port, tmp_path)
    service = Service(None, overrides, load_all(None, overrides))
    resolve = streams.resolve
    slow, reloaded = trio.Event(), trio.Event()

    def late(host: str, port: int) -> Any:
        if slow.is_set():
            time.sleep(SLOW)  # blocks the thread that asks, as getaddrinfo(3) does
        return resolve(host, port)

    monkeypatch.setattr(service_module, "resolve", late)
    before: list[float] = []
    during: list[float] = []

    async def noops(stream: trio.SocketStream) -> None:
        i = 0
        while not reloaded.is_set():
            i += 1
            waited = await _ask(stream, b"n%d" % i, b"NOOP")
            (during if slow.is_set() else before).append(waited)

    async def client() -> None:
        async with await _connect(port) as stream:
            await _ask(stream, b"l", b"LOGIN alice wonderland")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(noops, stream)
                await trio.sleep(0.2)  # NOOPs answered before the reload
                slow.set()
                await service.reload()
                reloaded.set()
            await stream.send_all(b"q LOGOUT\r\n")
        service.proxy.stop()

    with signal_handlers_restored():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client)
            await service.run()
    assert before, "no NOOP answered before the reload"
    assert max(during, default=0.0) < SLOW / 3, f"a NOOP waited {max(during):.2f} s"
    assert len(during) >= 5, f"{len(during)} NOOPs answered while the reload ran"
    assert service.loaded.settings.upstream is not None  # the reload took
