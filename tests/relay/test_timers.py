"""The shared session timers: a deadline fires when it is due, traffic moves it on, an earlier
deadline overrides a later one, and ended sessions are neither expired nor kept."""

from __future__ import annotations

import math

import trio

from imapveil.relay.timers import Timers


class Session:
    def __init__(self, timers: Timers, timeout: float) -> None:
        self.timers = timers
        self.timeout = timeout
        self.active = trio.current_time()
        self.timer_due = math.inf
        self.expired_at: float | None = None
        timers.enter(self)

    def deadline(self) -> float:
        return self.active + self.timeout

    def expire(self) -> None:
        self.expired_at = trio.current_time()

    def touch(self) -> None:
        self.active = trio.current_time()
        due = self.deadline()
        if due < self.timer_due:
            self.timers.at(due, self)


async def test_deadlines_fire_when_due_and_traffic_moves_them_on(
    autojump_clock: trio.abc.Clock,
) -> None:
    timers = Timers()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        start = trio.current_time()
        quiet, busy = Session(timers, 10.0), Session(timers, 10.0)
        quiet.touch()
        busy.touch()
        for _ in range(5):  # traffic every 4 s keeps `busy` alive past its first deadline
            await trio.sleep(4)
            busy.touch()
        assert quiet.expired_at == start + 10.0
        assert busy.expired_at is None
        await trio.sleep(11)
        assert busy.expired_at == start + 20.0 + 10.0
        nursery.cancel_scope.cancel()


async def test_an_earlier_deadline_overrides_a_later_one(autojump_clock: trio.abc.Clock) -> None:
    timers = Timers()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        start = trio.current_time()
        session = Session(timers, 100.0)
        session.touch()
        await trio.sleep(1)
        session.timeout = 2.0  # e.g. a literal's short timeout
        session.touch()
        await trio.sleep(5)
        assert session.expired_at == start + 3.0
        nursery.cancel_scope.cancel()


async def test_ended_sessions_are_not_expired_nor_kept(autojump_clock: trio.abc.Clock) -> None:
    timers = Timers()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        ended = []
        for _ in range(1000):
            session = Session(timers, 60.0)
            session.touch()
            timers.leave(session)
            ended.append(session)
        assert len(timers) <= 64 + 1  # stale entries are dropped, not kept for 60 s
        await trio.sleep(61)
        assert all(s.expired_at is None for s in ended)
        nursery.cancel_scope.cancel()
