"""Records reach the sinks in batches (670ff67: `sinks.Fanout` keeps each record with its time and
delivers when the loop is idle, within 0.1 s, at 1,000, at shutdown and before a scrape),
attacked from outside (attack9): a real `imapveil serve` in front of a real Dovecot, flooded,
rotated, reloaded, stopped and scraped while records wait in the Fanout.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import signal
import socket
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from imapveil import service as service_module
from imapveil.service import Service, load_all
from tests.helpers.dovecot import Dovecot, free_port
from tests.helpers.process import imapveil, service_overrides, signal_handlers_restored
from tests.stats.test_durability import query

pytestmark = pytest.mark.dovecot


def when(record: dict[str, Any]) -> float:
    """A record's `ts`, in seconds since the epoch."""
    return datetime.datetime.fromisoformat(record["ts"].replace("Z", "+00:00")).timestamp()


@contextmanager
def flooding(port: int, window: int = 2000) -> Iterator[list[int]]:
    """A client that pipelines NOOPs `window` at a time, always one window ahead of the answers
    it reads, until the block ends: the event loop is never idle, records wait in the Fanout.
    Yields the count of NOOPs sent (all answered once the block is over)."""
    sent = [0]
    stop = threading.Event()
    failure: list[BaseException] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s, s.makefile("rb") as f:
        f.readline()
        s.sendall(b"l LOGIN alice wonderland\r\n")
        assert f.readline().startswith(b"l OK")
        burst = b"".join(b"n%d NOOP\r\n" % i for i in range(window))
        last = b"n%d " % (window - 1)

        def flood() -> None:
            try:
                s.sendall(burst)
                while True:
                    more = not stop.is_set()
                    if more:
                        s.sendall(burst)
                    while not f.readline().startswith(last):
                        pass
                    sent[0] += window
                    if not more:
                        return
            except BaseException as exc:
                failure.append(exc)

        thread = threading.Thread(target=flood)
        thread.start()
        try:
            yield sent
        finally:
            stop.set()
            thread.join(20)
        assert not failure, failure
        s.sendall(b"q LOGOUT\r\n")
        f.read()


ROTATIONS = 20
"""Each rotation in a flood found records waiting in the Fanout about one time in four."""


def in_order(records: list[dict[str, Any]]) -> list[tuple[str, str, float]]:
    """Neighbours whose `ts` goes backwards (kind, kind, seconds back): none in a sane log."""
    return [
        (a["event"], b["event"], round(when(a) - when(b), 3))
        for a, b in itertools.pairwise(records)
        if when(b) < when(a)
    ]


def test_a_rotation_in_a_flood_keeps_each_file_in_the_order_records_were_made(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """Log rotation while a flood keeps the loop busy (records wait in the Fanout up to 0.1 s):
    the file is renamed, then SIGHUP, 20 times. The reload's `config` and `policy` records
    went straight to the event log while older session records still waited in the Fanout, so
    a new file said `config` and then records made before it (its `ts` going backwards). Each
    file is in the order records were made, none made before its SIGHUP was sent, and every
    command of the flood is in one of them."""
    files, signalled = [], []
    with imapveil(tmp_path, dovecot.address) as proxy:
        with flooding(proxy.port, 500) as sent:
            for k in range(ROTATIONS):
                while sent[0] < 1000 * (k + 1):
                    threading.Event().wait(0.005)
                files.append(proxy.events.with_name(f"{proxy.events.name}.{k}"))
                proxy.events.rename(files[-1])
                signalled.append(time.time())
                proxy.signal(signal.SIGHUP)
                assert b"reloaded" in proxy.stderr_until(b" imapveil: reload")
        assert proxy.stop() == 0
    files.append(proxy.events)
    logs = [[json.loads(line) for line in path.read_text().splitlines()] for path in files]
    assert [in_order(records) for records in logs] == [[]] * (ROTATIONS + 1)
    for records, since in zip(logs[1:], signalled, strict=True):
        # Made before the reload was asked for: in the file as it was (`ts` is to the ms).
        assert when(records[0]) >= since - 0.001
    for records in logs[1:]:
        assert [r["event"] for r in records if r["event"] in ("config", "policy")] == [
            "config",
            "policy",
        ]
    everything = [r for records in logs for r in records]
    commands = sum(1 for r in everything if r["event"] == "command")
    dropped = sum(r["count"] for r in everything if r["event"] == "records_dropped")
    assert commands + dropped == sent[0] + 2  # the NOOPs, LOGIN and LOGOUT


def test_serve_does_not_import_pytest(dovecot: Dovecot, tmp_path: Path) -> None:
    """670ff67 imported `trio.testing` (for `wait_all_tasks_blocked`) in the service; it imports
    pytest when pytest is installed: about 70 modules and 9 MB of resident memory more for every
    `imapveil serve` (37 MB idle before, 46 after). The service imports no test framework."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    with imapveil(tmp_path, dovecot.address, env=env) as proxy:
        assert proxy.stop() == 0
    imported = [
        line.rsplit("|", 1)[-1].strip()
        for line in proxy.stderr.decode().splitlines()
        if line.startswith("import time:")
    ]
    assert "imapveil.sinks" in imported
    assert not [m for m in imported if m.split(".")[0] in ("pytest", "_pytest", "pluggy")]


def logged_in_and_out(port: int, credentials: bytes) -> None:
    """A session that logs in and out, read to its end (which comes after its end record)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"l LOGIN " + credentials + b"\r\nq LOGOUT\r\n")
        while s.recv(65536):
            pass


def test_a_reload_whose_event_log_cannot_be_opened_keeps_the_old_one(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """The event log renamed for rotation, and in its place something that cannot be opened (here
    a directory; in production a path the service may not write): SIGHUP ended the service with a
    traceback, every session cut off and the records still queued lost. The reload goes on with
    the file open before (said on stderr), sessions go on, and a later reload opens the path."""
    with imapveil(tmp_path, dovecot.address) as proxy:
        rotated = proxy.events.with_name(proxy.events.name + ".1")
        proxy.events.rename(rotated)
        proxy.events.mkdir()
        proxy.signal(signal.SIGHUP)
        assert b"Is a directory" in proxy.stderr_until(b" imapveil: reload")
        logged_in_and_out(proxy.port, b"alice wonderland")
        proxy.events.rmdir()
        proxy.signal(signal.SIGHUP)
        assert b"reloaded" in proxy.stderr_until(b" imapveil: reload")
        logged_in_and_out(proxy.port, b"bob builder")
        assert proxy.stop() == 0
    old = [json.loads(line) for line in rotated.read_text().splitlines()]
    assert [r["user"] is not None for r in old if r["event"] == "session_end"] == [True]
    assert [r["ok"] for r in old if r["event"] == "config"] == [True, True]
    new = proxy.records()
    assert [r["event"] for r in new][:2] == ["config", "policy"]
    assert len([r for r in new if r["event"] == "session_end"]) == 1


def sessions_total(port: int) -> float:
    """imapveil_sessions_total, all reasons, as a scrape of /metrics says it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("imapveil_sessions_total{")
    )


def test_in_a_flood_a_scrape_counts_a_session_just_ended_and_every_sink_has_its_times(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """A flood keeps the loop busy, so records wait in the Fanout: a scrape right after a session
    ended (the client has read the end of the stream, which comes after the record) counts it,
    and the event log's and the store's times are when the session started and ended (within
    the client's own clock readings), not when they were delivered; the two agree to the
    millisecond."""
    metrics, store = free_port(), tmp_path / "stats.sqlite"
    args = ("--metrics", f"127.0.0.1:{metrics}", "--store", str(store))
    windows = []
    with imapveil(tmp_path, dovecot.address, *args) as proxy:
        proxy.stderr_until(b"statistics store ready")
        with flooding(proxy.port, 500) as sent:
            while sent[0] < 1000:
                threading.Event().wait(0.005)
            for _ in range(10):
                before = sessions_total(metrics)
                opened = time.time()
                with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
                    s.sendall(b"l LOGIN bob builder\r\nq LOGOUT\r\n")
                    while s.recv(65536):
                        pass
                windows.append((opened, time.time()))
                assert sessions_total(metrics) == before + 1
        assert proxy.stop() == 0
    records = proxy.records()
    starts = {r["session"]: r for r in records if r["event"] == "session_start"}
    ends = [r for r in records if r["event"] == "session_end" and r["commands"] == 2]
    assert len(ends) == len(windows) == 10
    for end, (opened, closed) in zip(ends, windows, strict=True):
        start = starts[end["session"]]
        assert opened - 0.002 <= when(start) <= when(end) <= closed + 0.002, (opened, closed)
    rows = query(str(store), "SELECT session, started_at, ended_at FROM sessions")
    stored = {session: (started, ended) for session, started, ended in rows}
    for end in ends:
        started, ended = stored[end["session"]]
        assert started == starts[end["session"]]["ts"].replace("Z", "+00:00")
        assert ended == end["ts"].replace("Z", "+00:00")


def churn(port: int, stop: threading.Event, churned: list[int], k: int) -> None:
    """Sessions one after another (LOGIN, NOOP, LOGOUT, read to the end) until `stop` or the
    proxy stops listening; `churned[k]` counts them."""
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"l LOGIN bob builder\r\nn NOOP\r\nq LOGOUT\r\n")
                while s.recv(65536):
                    pass
            churned[k] += 1
        except OSError:
            return


def flood(port: int, stop: threading.Event) -> None:
    """NOOPs pipelined 500 at a time, without waiting for their answers, until `stop` or the
    proxy ends the session."""
    burst = b"".join(b"n%d NOOP\r\n" % i for i in range(500))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"l LOGIN alice wonderland\r\n")
            while not stop.is_set():
                s.sendall(burst)
                if not s.recv(65536):
                    return
    except OSError:
        return


@contextmanager
def flood_and_churn(port: int) -> Iterator[None]:
    """Two clients pipelining NOOPs and two opening and ending sessions, until the block ends;
    the block starts once 20 sessions have been churned."""
    stop = threading.Event()
    churned = [0, 0]
    threads = [threading.Thread(target=flood, args=(port, stop)) for _ in range(2)]
    threads += [threading.Thread(target=churn, args=(port, stop, churned, k)) for k in range(2)]
    for thread in threads:
        thread.start()
    try:
        while sum(churned) < 20:
            threading.Event().wait(0.01)
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(20)


def test_sigterm_in_a_flood_and_a_churn_writes_every_record_once(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """Two clients pipeline NOOPs and two open and end sessions as fast as they can; SIGTERM
    comes while they do, with records waiting in the Fanout. Every session's end is written
    once, in the event log and in the store; every command a session counted is a command
    record or counted in a `records_dropped` line, and in the store's command counts."""
    store = tmp_path / "stats.sqlite"
    with imapveil(tmp_path, dovecot.address, "--store", str(store)) as proxy:
        proxy.stderr_until(b"statistics store ready")
        with flood_and_churn(proxy.port):
            proxy.signal(signal.SIGTERM)
            assert proxy.process.wait(timeout=20) == 0
        assert proxy.stop() == 0
    records = proxy.records()
    ends = [r for r in records if r["event"] == "session_end"]
    sessions = [r["session"] for r in ends]
    assert len(sessions) == len(set(sessions)) >= 22
    started = {r["session"] for r in records if r["event"] == "session_start"}
    assert sorted(sessions) == sorted(started)
    counted = sum(r["commands"] for r in ends)
    written = sum(1 for r in records if r["event"] == "command")
    dropped = sum(r["count"] for r in records if r["event"] == "records_dropped")
    assert written + dropped == counted
    rows = query(str(store), "SELECT session FROM sessions")
    assert sorted(r for (r,) in rows) == sorted(sessions)
    ((stored,),) = query(str(store), "SELECT COALESCE(SUM(count), 0) FROM command_counts")
    assert stored == counted


async def test_a_service_that_fails_still_writes_the_end_of_its_sessions(
    dovecot: Dovecot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task of the service fails (a bug; from outside, a malformed Accept header on /metrics
    did it): the service ends with the error, its sessions cut off. Before 670ff67 their
    `session_end` records still reached the event log (written last); since, they waited in
    the Fanout, whose task had delivered for the last time already, and were lost."""
    port = free_port()
    overrides = service_overrides(dovecot.address, port, tmp_path)
    overrides["metrics"] = f"127.0.0.1:{free_port()}"
    service = Service(None, overrides, load_all(None, overrides))
    logged_in = trio.Event()

    async def failing(_metrics: object, listeners: list[trio.SocketListener], _h: object) -> None:
        for listener in listeners:
            await listener.aclose()
        await logged_in.wait()
        raise RuntimeError("a bug in a task of the service")

    monkeypatch.setattr(service_module, "serve_metrics", failing)

    async def client() -> None:
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                break
            except OSError:
                await trio.sleep(0.01)
        async with stream:
            received = b""
            await stream.send_all(b"l LOGIN alice wonderland\r\n")
            while b"l OK" not in received:
                received += await stream.receive_some(65536)
            logged_in.set()
            await trio.sleep_forever()

    with signal_handlers_restored(), pytest.raises(BaseExceptionGroup) as failure:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client)
            await service.run()
    assert failure.group_contains(RuntimeError, match="a bug in a task", depth=None)
    records = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records if r["event"].startswith("session")] == [
        "session_start",
        "session_end",
    ]


def test_a_command_flood_in_batches_costs_no_other_session_its_records(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """Two clients pipeline NOOPs 2,000 at a time (records reach the event log 1,000 at once,
    past each flooder's share of its queue); a third session sends 300 commands meanwhile. The
    floods lose records, said in `records_dropped` lines; the third session loses none."""
    with imapveil(tmp_path, dovecot.address) as proxy:
        with flooding(proxy.port) as one, flooding(proxy.port) as other:
            while one[0] + other[0] < 8000:
                threading.Event().wait(0.01)
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
                f = s.makefile("rb")
                s.sendall(b"l LOGIN bob builder\r\n")
                for _ in range(3):
                    s.sendall(b"".join(b"p%d NOOP\r\n" % i for i in range(100)))
                    while not f.readline().startswith(b"p99 "):
                        pass
                s.sendall(b"q LOGOUT\r\n")
                f.read()
                f.close()
        assert proxy.stop() == 0
    records = proxy.records()
    ends = {r["session"]: r["commands"] for r in records if r["event"] == "session_end"}
    written = Counter(r["session"] for r in records if r["event"] == "command")
    (quiet,) = [session for session, commands in ends.items() if commands == 302]
    assert written[quiet] == 302
    dropped = sum(r["count"] for r in records if r["event"] == "records_dropped")
    assert dropped > 0
    assert sum(written.values()) + dropped == sum(ends.values())


def test_a_sighup_while_the_service_stops_does_not_end_it(dovecot: Dovecot, tmp_path: Path) -> None:
    """SIGTERM in a flood and a churn, then SIGHUP again and again (a log rotation's reload
    while the service stops) until it exits: once the signal task had ended, SIGHUP had its
    default action back and killed the process in its last writes, sessions' ends lost (older
    than 670ff67). It exits 0 with every session's end written."""
    with imapveil(tmp_path, dovecot.address, "--store", str(tmp_path / "stats.sqlite")) as proxy:
        proxy.stderr_until(b"statistics store ready")
        with flood_and_churn(proxy.port):
            proxy.signal(signal.SIGTERM)
            while proxy.process.poll() is None:
                proxy.signal(signal.SIGHUP)
                threading.Event().wait(0.002)
        assert proxy.stop() == 0
    records = proxy.records()
    started = sorted(r["session"] for r in records if r["event"] == "session_start")
    assert sorted(r["session"] for r in records if r["event"] == "session_end") == started
