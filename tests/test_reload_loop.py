"""A reload (SIGHUP) reads the configuration and policy files and looks the upstream's name up
again: work that may block (a resolver that answers late, a file on a hung mount). It must not
hold up the sessions being served meanwhile."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from imapveil import service as service_module
from imapveil.relay import streams
from imapveil.service import Service, load_all
from tests.helpers.dovecot import Dovecot, free_port
from tests.helpers.process import (
    ask,
    connect_until_listening,
    service_overrides,
    signal_handlers_restored,
)

SLOW = 1.5
"""Seconds the resolver takes during the reload."""


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
            waited = await ask(stream, b"n%d" % i, b"NOOP")
            (during if slow.is_set() else before).append(waited)

    async def client() -> None:
        async with await connect_until_listening(port) as stream:
            await ask(stream, b"l", b"LOGIN alice wonderland")
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


async def test_a_stop_during_a_reload_that_hangs_does_not_wait_for_it(
    dovecot: Dovecot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found: the signal task handled one signal at a time, and a reload waited for its worker
    thread; with the files on a hung mount (here: a lookup that never returns) a SIGTERM was not
    even read, and `systemctl stop` ended in SIGKILL, the records not yet written lost. Now the
    stop abandons the reload; a SIGHUP during it asks for one more reload, not one more thread."""
    port = free_port()
    overrides = service_overrides(dovecot.address, port, tmp_path)
    service = Service(None, overrides, load_all(None, overrides))
    resolve = streams.resolve
    hang, release = threading.Event(), threading.Event()
    entered = trio.Event()
    calls = 0

    def hung(host: str, port: int) -> Any:
        nonlocal calls
        if hang.is_set():
            calls += 1
            trio.from_thread.run_sync(entered.set)
            release.wait(10)
        return resolve(host, port)

    monkeypatch.setattr(service_module, "resolve", hung)
    finished: list[int] = []

    async def serve() -> None:
        finished.append(await service.run())

    try:
        with signal_handlers_restored(), trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve)
                async with await connect_until_listening(port) as stream:
                    await ask(stream, b"l", b"LOGIN alice wonderland")
                    hang.set()
                    os.kill(os.getpid(), signal.SIGHUP)
                    await entered.wait()
                    os.kill(os.getpid(), signal.SIGHUP)  # a second one, while the first hangs
                    waited = await ask(stream, b"n", b"NOOP")  # sessions still served
                    assert waited < 1.0
                    os.kill(os.getpid(), signal.SIGTERM)
                    await ask(stream, b"q", b"LOGOUT")
        assert finished == [0]
        assert calls == 1, f"{calls} lookups started"
    finally:
        release.set()


async def test_sighups_during_a_reload_make_one_more_reload(
    dovecot: Dovecot,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A file changed while a reload reads it is read again: the SIGHUPs that come during a
    reload make one reload after it (not one each, and not none)."""
    port = free_port()
    overrides = service_overrides(dovecot.address, port, tmp_path)
    service = Service(None, overrides, load_all(None, overrides))
    resolve = streams.resolve
    release = threading.Event()
    entered = trio.Event()
    calls = 0

    def held(host: str, port: int) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            trio.from_thread.run_sync(entered.set)
            release.wait(10)
        return resolve(host, port)

    monkeypatch.setattr(service_module, "resolve", held)
    reloaded = 0
    second_done, again = trio.Event(), trio.Event()
    reload = service.reload

    async def counted() -> None:
        nonlocal reloaded
        await reload()
        reloaded += 1
        if reloaded == 2:
            second_done.set()

    class Heard(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "reloading again" in record.getMessage():
                again.set()  # logged by the signal task, in this trio run

    monkeypatch.setattr(service, "reload", counted)
    heard = Heard()
    caplog.set_level(logging.INFO, logger="imapveil")
    logging.getLogger("imapveil").addHandler(heard)
    try:
        with signal_handlers_restored(), trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(service.run)
                (await connect_until_listening(port)).socket.close()  # serving, signals handled
                os.kill(os.getpid(), signal.SIGHUP)
                await entered.wait()
                for _ in range(3):
                    os.kill(os.getpid(), signal.SIGHUP)
                await again.wait()
                release.set()
                await second_done.wait()
                service.proxy.stop()
        assert (calls, reloaded) == (2, 2)
    finally:
        logging.getLogger("imapveil").removeHandler(heard)
        release.set()
