"""An event log whose writes fail (a full disk, a file size limit) loses records: it counts every
one (`dropped`, `imapveil_events_dropped_total`), says so in the log once writes go through
again, leaves no line of another record glued to a line cut short, and exits cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import trio

from imapveil.records import SessionStarted
from imapveil.sinks.jsonl import JsonLinesSink
from tests.helpers.process import read_log

# In a process of its own: a file size limit (RLIMIT_FSIZE) is the kernel's own way to make
# writes fail part of the way through, then succeed again once the limit is raised.
SCRIPT = textwrap.dedent(
    """
    import json, os, resource, signal, sys
    import trio
    from imapveil.records import SessionStarted
    from imapveil.sinks.jsonl import JsonLinesSink

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
    path = sys.argv[1]
    sink = JsonLinesSink(path)
    sink.open()

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sink.run)
            for i in range(10):
                sink.emit(SessionStarted(f"a{i}", "c", "u"))
            await sink.flush()
            line = os.path.getsize(path) // 10
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            # Room for one more line and half of the next.
            resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + line * 3 // 2, hard))
            for i in range(10):
                sink.emit(SessionStarted(f"b{i}", "c", "u"))
            await sink.flush()
            while_failing = sink.dropped
            for i in range(5):  # still failing: the records_dropped line is lost too
                sink.emit(SessionStarted(f"d{i}", "c", "u"))
            await sink.flush()
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            for i in range(3):
                sink.emit(SessionStarted(f"c{i}", "c", "u"))
            await sink.flush()
            nursery.cancel_scope.cancel()
        print(json.dumps({"while_failing": while_failing, "dropped": sink.dropped}))

    trio.run(main)
    """
)


def test_failed_writes_are_counted_said_and_leave_no_glued_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(path)],
        capture_output=True,
        timeout=60,
        check=False,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src")),
    )
    assert run.returncode == 0, run.stderr.decode()
    counts = json.loads(run.stdout)
    assert counts == {"while_failing": 9, "dropped": 9 + 5}  # b1..b9, then d0..d4
    errors = [x for x in run.stderr.decode().splitlines() if "cannot write the event log" in x]
    assert len(errors) == 1, run.stderr.decode()  # not one per failed write
    assert "File too large" in errors[0]
    assert path.read_bytes().endswith(b"\n")
    parsed, torn = read_log(path)
    # b1 was cut short (half of it went out): a line of its own, a prefix of a record's line.
    assert len(torn) == 1 and torn[0].startswith(b'{"ts":')
    whole = json.dumps(parsed[10], separators=(",", ":")).encode()  # b0's, as long as b1's
    assert whole.startswith(torn[0][: len(b'{"ts":"')]) and len(torn[0]) < len(whole)
    sessions = [x.get("session") or f"dropped {x['count']}" for x in parsed]
    expected = [f"a{i}" for i in range(10)] + ["b0", "dropped 14", "c0", "c1", "c2"]
    assert sessions == expected


async def test_a_drain_cancelled_before_its_write_starts_leaves_no_write_to_wait_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found (a SIGTERM abandoning a reload, under load): a drain whose task was cancelled after
    its last checkpoint (the lock taken) kept its write as the one in progress, then raised
    Cancelled at the worker thread's start, so the write never ran; the final drain at exit
    waited for it `CLOSE_WITHIN` seconds and gave up, sessions' ends lost. A write is the one in
    progress only once it cannot be cancelled before it runs."""
    path = tmp_path / "events.jsonl"
    sink = JsonLinesSink(str(path))
    sink.open()
    sink.emit(SessionStarted("s1", "c", "u"))
    encode = sink._encode
    scope = trio.CancelScope()

    def encode_then_cancel(records: Any) -> bytes:
        scope.cancel()  # as the signal task does, while this task runs no checkpoint
        return encode(records)

    monkeypatch.setattr(sink, "_encode", encode_then_cancel)
    with scope:
        await sink.flush()
    monkeypatch.setattr(sink, "_encode", encode)
    try:
        with trio.fail_after(2):
            await sink.flush()
    finally:
        assert sink._file is not None
        sink._file.close()
    assert [json.loads(line)["session"] for line in path.read_text().splitlines()] == ["s1"]
