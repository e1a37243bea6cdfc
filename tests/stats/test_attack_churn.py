"""The statistics writer's rest after a write (03cc437: after a write that left less than a full
batch queued, the writer lets rows gather for `COALESCE` seconds), attacked (attack6): a churn
of real sessions through `imapveil serve` stopped by SIGTERM while sessions are ending, and a
writer cancelled in the middle of that rest.

Whatever the writer is doing when the service stops, every session that ended is in the store
exactly once (its `session_end` record and its row agree), and the rest costs the shutdown
nothing: a cancelled rest goes straight to the final drain.
"""

from __future__ import annotations

import signal
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from imapveil.stats import sink as sink_module
from imapveil.stats.sink import StoreSink
from tests.helpers.dovecot import Dovecot
from tests.helpers.process import imapveil
from tests.stats.test_durability import Load, query, table_counts, until

WAIT = 15.0


def churn(port: int, stop: threading.Event, done: list[int], k: int) -> None:
    """Sessions one after another until `stop` (or the proxy stops answering): LOGIN, NOOP,
    LOGOUT pipelined and read to the end; every third one resets after its LOGIN instead."""
    n = 0
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                f = s.makefile("rb")
                f.readline()
                if n % 3 == 2:
                    s.sendall(b"L LOGIN alice wonderland\r\n")
                    f.readline()
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    s.sendall(b"L LOGIN bob builder\r\nN NOOP\r\nQ LOGOUT\r\n")
                    f.read()
                f.close()
        except OSError:
            if stop.is_set():
                break
            time.sleep(0.01)  # refused while the proxy stops: try again (it may be gone)
            continue
        n += 1
        done[k] = n


@pytest.mark.dovecot
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_stop_in_a_churn_stores_every_ended_session_once(
    dovecot: Dovecot, tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    """Four clients open and end sessions as fast as they can (a third of them with a reset);
    SIGTERM comes while they do. The service stops in its grace and drain, not later; every
    `session_end` the event log has is one row in the store, none missing, none twice."""
    if backend == "postgresql":
        url = request.getfixturevalue("postgres").url
    else:
        url = str(tmp_path / "stats.sqlite")
    with imapveil(tmp_path, dovecot.address, "--store", url) as proxy:
        proxy.stderr_until(b"statistics store ready")
        stop = threading.Event()
        done = [0] * 4
        threads = [
            threading.Thread(target=churn, args=(proxy.port, stop, done, k)) for k in range(4)
        ]
        for t in threads:
            t.start()
        try:
            # Sessions end all the time: the writer writes, rests, and writes again.
            deadline = time.monotonic() + WAIT
            while sum(done) < 60:
                assert time.monotonic() < deadline, done
                time.sleep(0.01)
            t0 = time.monotonic()
            proxy.signal(signal.SIGTERM)
            code = proxy.process.wait(timeout=20)
            stopped = time.monotonic() - t0
        finally:
            stop.set()
            for t in threads:
                t.join(20)
        assert proxy.stop() == code == 0
    ends = [r["session"] for r in proxy.records() if r["event"] == "session_end"]
    assert len(ends) >= 60 and len(set(ends)) == len(ends)
    assert not [r for r in proxy.records() if r["event"] == "store_dropped"]
    rows = [r for (r,) in query(url, "SELECT session FROM sessions")]
    assert sorted(rows) == sorted(ends)
    assert not list(tmp_path.glob("stats-spool/**/*.jsonl"))  # all in the store, none spooled
    # The grace (0.5 s), the BYEs, the drain: far less than the drain timeout and CLOSE_WAIT.
    assert stopped < 4.0, stopped


async def test_a_writer_cancelled_while_it_rests_drains_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows keep coming while each (slow) write goes on, so the writer rests after each one; it
    is cancelled (the service stopping) in that rest: it drains what is queued at once, not
    after the rest, and every row is stored once. `flush()` returns once the load stops."""
    url = str(tmp_path / "stats.sqlite")
    sink = StoreSink(url, spool=tmp_path / "spool")
    write = sink.store.write
    rests: list[float] = []
    resting = [False]

    def slow(batch: Any) -> Any:
        time.sleep(0.02)  # sessions end meanwhile (the write is in its thread)
        return write(batch)

    monkeypatch.setattr(sink.store, "write", slow)
    rest = sink._rest

    async def noted(seconds: float) -> None:
        rests.append(seconds)
        resting[0] = True
        try:
            await rest(seconds)
        finally:
            resting[0] = False

    monkeypatch.setattr(sink, "_rest", noted)
    load, stop = Load(sink, "s"), trio.Event()
    async with trio.open_nursery() as outer:
        outer.start_soon(load.run, stop)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sink.run)
            await until(
                lambda: (
                    rests.count(sink_module.COALESCE) >= 3
                    and resting[0]
                    and rests[-1] == sink_module.COALESCE
                    and sink.depth > 0
                )
            )
            # In a rest after a write, rows queued: the service stops now.
            stop.set()
            t0 = trio.current_time()
            nursery.cancel_scope.cancel()
        drained = trio.current_time() - t0
    assert drained < sink_module.COALESCE, drained
    assert sink.depth == 0 and sink.counts["spooled"].sessions == 0
    assert table_counts(url)[:2] == (load.done, load.done)

    again = StoreSink(url, spool=tmp_path / "spool")
    load, stop = Load(again, "t"), trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(again.run)
        nursery.start_soon(load.run, stop)
        await until(lambda: again.counts["written"].sessions >= 100)
        stop.set()
        with trio.fail_after(1.0):  # a rest and a write at most
            await again.flush()
        nursery.cancel_scope.cancel()
    assert query(url, "SELECT COUNT(*) FROM sessions WHERE session LIKE 't-%'") == [(load.done,)]
