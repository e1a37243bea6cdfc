"""bench/cold.py times the core's steps warm and with the caches evicted: each step must be the
conversation it says it is (every octet forwarded as it came, each command recorded with its
answer), or it times something else, and it runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from imapveil.protocol.actions import Action, Direction, Emit, Forward
from imapveil.records import CommandCompleted, SessionEnded

BENCH = Path(__file__).resolve().parent.parent / "bench" / "cold.py"


def cold() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_cold", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def forwarded(actions: list[Action], direction: Direction) -> bytes:
    return b"".join(
        bytes(a.data) for a in actions if isinstance(a, Forward) and a.direction is direction
    )


def commands(actions: list[Action]) -> list[tuple[str, str, str | None]]:
    return [
        (a.record.tag, a.record.verb, a.record.status)
        for a in actions
        if isinstance(a, Emit) and isinstance(a.record, CommandCompleted)
    ]


def test_each_step_is_the_conversation_it_times() -> None:
    bench = cold()
    steps = bench.steps()
    noop = steps["NOOP"](7)
    assert forwarded(noop, Direction.TO_SERVER) == b"n7 NOOP\r\n"
    assert forwarded(noop, Direction.TO_CLIENT).startswith(b"n7 OK NOOP")
    assert commands(noop) == [("n7", "NOOP", "OK")]
    fetch = steps["FETCH flags"](8)
    assert forwarded(fetch, Direction.TO_SERVER) == b"f8 FETCH 1:* (FLAGS UID)\r\n"
    assert forwarded(fetch, Direction.TO_CLIENT) == bench.FLAGS + b"f8 OK Fetch completed.\r\n"
    assert commands(fetch) == [("f8", "FETCH", "OK")]
    session = steps["LOGIN/LOGOUT session"](9)
    assert forwarded(session, Direction.TO_SERVER) == b"a LOGIN alice secret\r\nb LOGOUT\r\n"
    assert commands(session) == [("a", "LOGIN", "OK"), ("b", "LOGOUT", "OK")]
    ends = [a.record for a in session if isinstance(a, Emit) and isinstance(a.record, SessionEnded)]
    assert [end.reason for end in ends] == ["logout"]


def test_it_measures_warm_and_evicted() -> None:
    bench = cold()
    step = bench.steps()["NOOP"]
    assert bench.measure(step, bytearray(), 20) > 0
    assert bench.measure(step, bytearray(1 << 20), 20) > 0
