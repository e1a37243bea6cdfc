"""Session timeouts (idle, greeting, literal, login deadline), kept by one task for all sessions.

Moving a trio deadline at every receive (a cancel scope's deadline: trio's own heap, re-sorted
each time) costs every round trip a few microseconds. Here a session only notes when it last saw
traffic; its deadline sits in one heap for the whole proxy, keyed by the time it was last
computed, and is recomputed only when that time comes: if traffic moved it on, the entry goes
back into the heap for the new time; if not, the session's timeout scope is cancelled. A session
whose deadline comes *earlier* than the one in the heap (a literal's short timeout, say) puts a
new entry in at once, so nothing fires later than it would have with a deadline per receive.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Protocol

import trio


class Timed(Protocol):
    timer_due: float
    """The time of this session's current entry (inf: none); entries for other times are stale."""

    def deadline(self) -> float:
        """The session's deadline now (inf: none)."""
        ...

    def expire(self) -> None:
        """The deadline has passed: time the session out."""
        ...


class Timers:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timed]] = []
        self._order = itertools.count()  # ties never compare the sessions themselves
        self._sleep: trio.CancelScope | None = None
        self._sessions = 0

    def __len__(self) -> int:
        return len(self._heap)

    def enter(self, session: Timed) -> None:
        """`session` is timed from now on (its first `at` follows)."""
        session.timer_due = math.inf
        self._sessions += 1

    def leave(self, session: Timed) -> None:
        """`session` is over: its entries are stale (and forgotten soon, see `_prune`)."""
        session.timer_due = math.inf
        self._sessions -= 1
        self._prune()

    def at(self, when: float, session: Timed) -> None:
        """Check `session` at `when` (inf: never); an earlier entry of it becomes stale."""
        session.timer_due = when
        if when == math.inf:
            return
        heapq.heappush(self._heap, (when, next(self._order), session))
        sleep = self._sleep
        if sleep is not None and when < sleep.deadline:
            sleep.deadline = when
        self._prune()

    def _prune(self) -> None:
        """Drop stale entries once they outnumber the sessions: the heap, and what it keeps
        alive of sessions that ended, stays within twice the sessions open (amortised O(1))."""
        heap = self._heap
        if len(heap) > 2 * self._sessions + 64:
            heap[:] = [entry for entry in heap if entry[2].timer_due == entry[0]]
            heapq.heapify(heap)

    async def run(self) -> None:
        """Expire sessions as their deadlines come, until cancelled."""
        heap = self._heap
        while True:
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as sleep:
                self._sleep = sleep
                await trio.sleep_forever()
            self._sleep = None
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                when, _order, session = heapq.heappop(heap)
                if session.timer_due != when:
                    continue  # stale: moved earlier, or the session is over
                due = session.deadline()
                if due <= now:
                    session.timer_due = math.inf
                    session.expire()
                else:
                    self.at(due, session)
