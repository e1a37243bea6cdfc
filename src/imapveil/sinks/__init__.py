"""Where records go. A sink's `emit` never blocks the relay."""

from __future__ import annotations

import logging
import time
from typing import Protocol

import trio

try:
    # trio.testing's own, without importing trio.testing: that imports pytest when pytest is
    # installed (about 70 modules, 9 MB of resident memory for every `imapveil serve`).
    from trio._core._run import wait_all_tasks_blocked
except ImportError:  # pragma: no cover (a trio that moved it)
    from trio.testing import wait_all_tasks_blocked

from imapveil.records import Record

log = logging.getLogger(__name__)

DELIVER_WITHIN = 0.1
"""Seconds a record waits at most in `Fanout` before its sinks get it."""
IDLE_BATCH = 32
"""Records `Fanout` gathers before it delivers at the loop's next idle moment (fewer wait for
`DELIVER_WITHIN`): each delivery costs a few task switches, worth it for a batch, not a record."""
PENDING_MAX = 1000
"""Records `Fanout` holds at most: the next one delivers them all at once."""
FAILURE_LOG_INTERVAL = 60.0
"""Seconds between two logged failures of one sink (and of the event log's writes)."""


class Sink(Protocol):
    def emit(self, record: Record) -> None: ...


class TimedSink(Protocol):
    """A sink that can be told when a record was made (it may get it later)."""

    def emit(self, record: Record, when: float | None = None) -> None: ...


class MemorySink:
    """Keeps records in a list; for tests and for embedding."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def emit(self, record: Record) -> None:
        self.records.append(record)


class Fanout:
    """Every record to every sink, in order, in batches.

    `emit` only keeps the record with the time it came; `deliver` hands what is kept to each
    sink in turn, with that time. `run` delivers `IDLE_BATCH` records or more when the event
    loop has nothing else to run (every task waits), and whatever is kept `DELIVER_WITHIN`
    seconds after the first record; `PENDING_MAX` records kept are delivered at once.

    Batches, because each record handed over as it comes runs the sinks' code with cold caches:
    between two records of a session the proxy runs everything else (the other sessions, the
    kernel, the server on the same cores), and the sinks cost about three times what they cost
    one record after another (a LOGIN/LOGOUT session's five records: about 85 us as they came,
    40 in batches).

    A sink that raises loses that record, nothing more; the failure is logged (at most once a
    `FAILURE_LOG_INTERVAL` for each sink).
    """

    def __init__(self, *sinks: TimedSink) -> None:
        self.sinks = sinks
        self._pending: list[tuple[Record, float]] = []
        self._wake = trio.Event()  # a first record is kept
        self._batch = trio.Event()  # IDLE_BATCH records are kept
        self._failed_at: dict[int, float] = {}
        self.failures = 0
        """Records some sink could not take."""

    def emit(self, record: Record) -> None:
        pending = self._pending
        pending.append((record, time.time()))
        n = len(pending)
        if n == 1:
            self._wake.set()
        elif n == IDLE_BATCH:
            self._batch.set()
        elif n >= PENDING_MAX:
            self.deliver()

    def deliver(self) -> None:
        """Every record kept, to every sink, now."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        sinks = self.sinks
        for record, when in pending:
            for sink in sinks:
                try:
                    sink.emit(record, when)
                except Exception:
                    self._failed(sink, record)

    def _failed(self, sink: TimedSink, record: Record) -> None:
        self.failures += 1
        now = time.monotonic()
        last = self._failed_at.get(id(sink))
        if last is None or now - last >= FAILURE_LOG_INTERVAL:
            self._failed_at[id(sink)] = now
            log.exception(
                "%s could not take a %s record (it is lost to that sink; %d so far)",
                type(sink).__name__, record.event, self.failures,
            )  # fmt: skip

    async def run(self) -> None:
        """Deliver until cancelled, then deliver what is left."""
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                with trio.move_on_after(DELIVER_WITHIN):
                    if len(self._pending) < IDLE_BATCH:
                        await self._batch.wait()
                    await wait_all_tasks_blocked()
                self._batch = trio.Event()
                self.deliver()
        finally:
            self.deliver()
