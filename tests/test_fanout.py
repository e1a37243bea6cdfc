"""Records reach the sinks in batches (`sinks.Fanout`): in order, with the time they were made,
when the event loop is idle or soon after, and none lost on the way; and the event log encodes
what it queued only when it writes (`JsonLinesSink`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from imapveil import sinks
from imapveil.records import CommandCompleted, Record, SessionEnded, SessionStarted
from imapveil.sinks import Fanout, jsonl
from imapveil.sinks.jsonl import JsonLinesSink
from imapveil.stats.metrics import Metrics
from imapveil.stats.sink import StoreSink


class Timed:
    """A sink that keeps what it was given, and when the record was made."""

    def __init__(self) -> None:
        self.got: list[tuple[Record, float | None]] = []
        self.arrived = trio.Event()

    def emit(self, record: Record, when: float | None = None) -> None:
        self.got.append((record, when))
        self.arrived.set()

    def tags(self) -> list[str]:
        return [r.tag for r, _ in self.got if isinstance(r, CommandCompleted)]


class Failing(Timed):
    def emit(self, record: Record, when: float | None = None) -> None:
        if isinstance(record, CommandCompleted) and record.tag == "bad":
            raise RuntimeError("a bug in a sink")
        super().emit(record, when)


def command(tag: str, session: str = "s1") -> CommandCompleted:
    return CommandCompleted(session, tag, "NOOP", "authenticated", "OK", None, 0.1)


def ended(session: str = "s1") -> SessionEnded:
    return SessionEnded(
        session=session, client="127.0.0.1:1", upstream="127.0.0.1:143", reason="client_closed",
        detail=None, state="authenticated", user="u", duration_ms=1.0, bytes_from_client=1,
        bytes_from_server=2, commands=1, client_tls=False, compressed=False,
    )  # fmt: skip


async def test_a_batch_waits_until_the_loop_is_idle_then_goes_in_order_with_its_time() -> None:
    a, b = Timed(), Timed()
    fanout = Fanout(a, b)
    records: list[Record] = [SessionStarted("s1", "127.0.0.1:1", "127.0.0.1:143")]
    records += [command(f"t{i}") for i in range(sinks.IDLE_BATCH - 2)] + [ended()]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fanout.run)
        await trio.testing.wait_all_tasks_blocked()
        before = time.time()
        for record in records:
            fanout.emit(record)
        after = time.time()
        assert a.got == [] and b.got == []  # kept, not handed over while the emitter runs
        await trio.testing.wait_all_tasks_blocked()
        await trio.lowlevel.checkpoint()
        for sink in (a, b):
            assert [r for r, _ in sink.got] == records
            assert all(when is not None and before <= when <= after for _, when in sink.got)
        nursery.cancel_scope.cancel()


async def test_a_few_records_wait_for_more_or_for_the_time_bound() -> None:
    a = Timed()
    fanout = Fanout(a)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fanout.run)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        fanout.emit(command("t1"))
        fanout.emit(command("t2"))
        await trio.testing.wait_all_tasks_blocked()
        assert a.got == []  # idle, but two records are not worth a delivery yet
        with trio.fail_after(5):
            await a.arrived.wait()
        waited = trio.current_time() - start
        nursery.cancel_scope.cancel()
    assert a.tags() == ["t1", "t2"]
    assert sinks.DELIVER_WITHIN * 0.9 <= waited < sinks.DELIVER_WITHIN + 1.0


async def test_a_loop_that_is_never_idle_still_gets_its_records_delivered_soon() -> None:
    a = Timed()
    fanout = Fanout(a)
    delivered = trio.Event()
    delivered_after: list[float] = []

    async def busy() -> None:
        # Never lets the loop go idle: always runnable.
        while True:
            await trio.lowlevel.checkpoint()
            if a.got and not delivered.is_set():
                delivered_after.append(trio.current_time() - start)
                delivered.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fanout.run)
        nursery.start_soon(busy)
        await trio.sleep(0.01)
        start = trio.current_time()
        fanout.emit(command("t1"))
        with trio.fail_after(5):
            await delivered.wait()
        nursery.cancel_scope.cancel()
    assert sinks.DELIVER_WITHIN * 0.9 <= delivered_after[0] < sinks.DELIVER_WITHIN + 1.0


async def test_a_full_batch_goes_at_once_without_the_writer_task() -> None:
    a = Timed()
    fanout = Fanout(a)  # no `run`: only the bound delivers
    for i in range(sinks.PENDING_MAX - 1):
        fanout.emit(command(f"t{i}"))
    assert a.got == []
    fanout.emit(command("last"))
    assert len(a.got) == sinks.PENDING_MAX
    assert a.tags()[-1] == "last"


async def test_the_last_records_are_delivered_when_the_task_is_cancelled() -> None:
    a = Timed()
    fanout = Fanout(a)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fanout.run)
        await trio.lowlevel.checkpoint()
        fanout.emit(command("t1"))
        nursery.cancel_scope.cancel()
    assert [r for r, _ in a.got] == [command("t1")]


async def test_a_sink_that_raises_loses_that_record_and_nothing_else(
    caplog: pytest.LogCaptureFixture,
) -> None:
    good, bad = Timed(), Failing()
    fanout = Fanout(bad, good)
    caplog.set_level(logging.ERROR)
    for tag in ("t1", "bad", "t2", "bad", "t3"):
        fanout.emit(command(tag))
    fanout.deliver()
    assert good.tags() == ["t1", "bad", "t2", "bad", "t3"]
    assert bad.tags() == ["t1", "t2", "t3"]
    assert fanout.failures == 2
    failures = [r for r in caplog.records if "could not take" in r.getMessage()]
    assert len(failures) == 1  # logged once a minute, not per record
    assert "Failing could not take a command record" in failures[0].getMessage()


async def test_the_event_log_stamps_records_with_the_time_they_were_made(tmp_path: Path) -> None:
    log_path = tmp_path / "events.jsonl"
    sink = JsonLinesSink(str(log_path))
    sink.open()
    fanout = Fanout(sink)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        made = time.time()
        fanout.emit(command("t1"))
        await trio.sleep(1.1)  # delivered a second later: its time is when it was made
        fanout.deliver()
        await sink.flush()
        nursery.cancel_scope.cancel()
    line = json.loads(log_path.read_text())
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(made))
    assert line["ts"].startswith(stamp)
    assert line["tag"] == "t1"


async def test_the_store_keeps_the_times_records_were_made(tmp_path: Path) -> None:
    store = StoreSink(f"sqlite:///{tmp_path / 's.sqlite'}", proxy="p", spool=tmp_path / "spool")
    started, finished = 1_700_000_000.25, 1_700_000_003.5
    store.emit(SessionStarted("s1", "127.0.0.1:1", "127.0.0.1:143"), started)
    store.emit(ended("s1"), finished)
    kind, row = store._queue[0]
    assert kind == "session"
    assert row[2:5] == (
        "2023-11-14T22:13:20.250+00:00",
        "2023-11-14T22:13:23.500+00:00",
        "2023-11-14",
    )


async def test_a_scrape_counts_every_record_made_before_it() -> None:
    metrics = Metrics()
    fanout = Fanout(metrics)
    metrics.refresh = fanout.deliver
    fanout.emit(ended())
    assert 'imapveil_sessions_total{reason="client_closed"} 1.0' in metrics.exposition()


async def test_the_event_log_drops_and_counts_a_record_it_cannot_encode(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log_path = tmp_path / "events.jsonl"
    sink = JsonLinesSink(str(log_path))
    sink.open()
    broken = dataclasses.replace(command("t2"), tag=2)  # type: ignore[arg-type]  # a bug of ours
    caplog.set_level(logging.ERROR)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        for record in (command("t1"), broken, command("t3")):
            sink.emit(record)
        await sink.flush()
        assert [json.loads(x)["tag"] for x in log_path.read_text().splitlines()] == ["t1", "t3"]
        assert sink.dropped == 1
        assert any("could not be encoded" in r.getMessage() for r in caplog.records)
        sink.emit(command("t4"))  # the loss is said in the log itself
        await sink.flush()
        nursery.cancel_scope.cancel()
    lines = [json.loads(x) for x in log_path.read_text().splitlines()]
    assert lines[2] == {"ts": lines[2]["ts"], "event": "records_dropped", "count": 1}
    assert lines[3]["tag"] == "t4"


async def test_the_event_log_lets_the_loop_run_between_slices_of_one_large_write(
    tmp_path: Path,
) -> None:
    log_path = tmp_path / "events.jsonl"
    sink = JsonLinesSink(str(log_path))
    sink.open()
    ticks = 0
    seen: list[tuple[int, int]] = []  # (records in a slice, the other task's ticks by then)
    encode = sink._encode

    def counted(items: Iterable[tuple[Record | dict[str, Any], float, str | None]]) -> bytes:
        data = encode(items)
        seen.append((data.count(b"\n"), ticks))
        return data

    sink._encode = counted  # type: ignore[method-assign]
    writes: list[int] = []
    write = sink._write

    def write_counted(data: bytes) -> tuple[int, OSError | None]:
        writes.append(data.count(b"\n"))
        return write(data)

    sink._write = write_counted  # type: ignore[method-assign]

    async def other() -> None:
        nonlocal ticks
        while True:
            await trio.lowlevel.checkpoint()
            ticks += 1

    n = jsonl.ENCODE_SLICE * 2 + jsonl.ENCODE_SLICE // 2
    for i in range(n):
        sink.emit(SessionStarted(f"s{i}", "127.0.0.1:1", "127.0.0.1:143"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        nursery.start_soon(other)
        await sink.flush()
        nursery.cancel_scope.cancel()
    assert [size for size, _ in seen] == [jsonl.ENCODE_SLICE] * 2 + [jsonl.ENCODE_SLICE // 2]
    # The other task ran meanwhile (trio runs each runnable task once a batch, in an order of its
    # own: between two slices, or just before the next; between the first and the last, surely).
    assert seen[0][1] < seen[2][1]
    assert writes == [n]  # one worker-thread round trip: BATCH is more than n
    assert len(log_path.read_text().splitlines()) == n
