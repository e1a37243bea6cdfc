"""The event log whose writes fail (d36c3c1), attacked from outside (attack10): a real `imapveil
serve` in front of a real Dovecot, its event log under a file size limit (RLIMIT_FSIZE, the
kernel's own way to make writes fail part of the way through, and succeed again once the limit
is raised), rotated while writes fail, restarted on a file a failed write cut short, and
written to a pipe nobody reads.

What must hold: every record made is in a file as a whole, parsable line, or counted in a
`records_dropped` line (and in imapveil_events_dropped_total); no line of a record is glued to a
fragment, and no blank line; the service relays and stops cleanly and in time.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from imapveil.records import IdExchange, SessionStarted
from imapveil.sinks.jsonl import _DROPS, COALESCE, JsonLinesSink, encode
from tests.helpers.dovecot import Dovecot, free_port
from tests.helpers.process import imapveil, read_log, wait_until_listening

pytestmark = pytest.mark.dovecot

LIMIT = 4000
"""Octets the event log may grow to (RLIMIT_FSIZE): the start's records and a few sessions."""


def session(port: int, timeout: float = 10) -> None:
    """LOGIN, NOOP, LOGOUT, read to the end (the end record is made once the proxy closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s, s.makefile("rb") as f:
        f.readline()
        s.sendall(b"a LOGIN alice wonderland\r\nb NOOP\r\nc LOGOUT\r\n")
        f.read()


def metrics_text(port: int) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        return connection.getresponse().read().decode()
    finally:
        connection.close()


def scrape(port: int) -> dict[str, float]:
    """The proxy's own counters: records dropped, and how many it made (start: config and
    policy; each session: start, commands, end)."""
    text = metrics_text(port)
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, _, number = line.rpartition(" ")
        name = name.split("{")[0]
        values[name] = values.get(name, 0.0) + float(number)
    return values


def made(metrics: dict[str, float], reloads: int = 0) -> int:
    sessions = metrics["imapveil_sessions_total"]
    return int(2 + 2 * reloads + 2 * sessions + metrics["imapveil_commands_total"])


def until_dropped(proxy_port: int, metrics_port: int) -> dict[str, float]:
    """Sessions until the event log has lost records (its writes hit the limit)."""
    for _ in range(40):
        session(proxy_port)
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            metrics = scrape(metrics_port)
            if metrics["imapveil_events_dropped_total"]:
                return metrics
            time.sleep(0.05)
    raise AssertionError("the event log never failed")


def accounted(records: list[dict[str, Any]]) -> tuple[int, int]:
    """(records written, records said to be lost)."""
    said = sum(r["count"] for r in records if r["event"] == "records_dropped")
    return sum(r["event"] != "records_dropped" for r in records), said


def limited() -> list[str]:
    return ["prlimit", f"--fsize={LIMIT}:unlimited", "--"]  # the soft limit: raised later


def test_a_rotation_while_writes_fail_starts_the_new_file_with_a_record(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """The log hits the limit (a line cut short), is renamed, and SIGHUP opens a new one. The
    cut line was remembered, and the new file began with the newline meant to end it: a blank
    line, which a reader of JSON lines cannot parse. The new file holds only whole records, and
    every record made is in one of the files or said lost there."""
    port = free_port()
    args = ("--store", "off", "--metrics", f"127.0.0.1:{port}")
    with imapveil(tmp_path, dovecot.address, *args, wrap=limited()) as proxy:
        until_dropped(proxy.port, port)
        old = proxy.events.with_name("old.jsonl")
        proxy.events.rename(old)
        proxy.signal(signal.SIGHUP)
        assert b"reloaded" in proxy.stderr_until(b" imapveil: reload")
        session(proxy.port)
        metrics = scrape(port)
        (help_line,) = [
            x for x in metrics_text(port).splitlines() if x.startswith("# HELP imapveil_events_d")
        ]
        assert proxy.stop() == 0
    # What the metric counts, as an operator reads it: not only a full queue.
    assert "writes failed" in help_line
    new_records, new_other = read_log(proxy.events)
    assert new_other == []
    assert new_records[0]["event"] == "records_dropped"
    old_records, old_other = read_log(old)
    assert len(old_other) <= 1  # the line the limit cut, at the end
    written_old, said_old = accounted(old_records)
    written_new, said = accounted(new_records)
    assert said_old == 0
    assert said == metrics["imapveil_events_dropped_total"]
    assert written_old + written_new + said == made(metrics, reloads=1)


def test_records_lost_are_said_at_exit_once_writes_go_through(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """Writes fail (the limit), then would go through (the limit raised: the disk freed), and
    the service is stopped before another record comes: the records lost were counted in the
    metric but said nowhere in the log, which looked complete. The last write says them."""
    port = free_port()
    args = ("--store", "off", "--metrics", f"127.0.0.1:{port}")
    with imapveil(tmp_path, dovecot.address, *args, wrap=limited()) as proxy:
        until_dropped(proxy.port, port)
        time.sleep(0.5)  # the last session's records: written or lost
        metrics = scrape(port)
        unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
        resource.prlimit(proxy.process.pid, resource.RLIMIT_FSIZE, unlimited)  # the disk freed
        assert proxy.stop() == 0
    records, other = read_log(proxy.events)
    assert len(other) == 1 and other[0].startswith(b'{"ts":')  # the line cut short, alone
    written, said = accounted(records)
    assert said == metrics["imapveil_events_dropped_total"] > 0
    assert written + said == made(metrics)


def test_a_restart_on_a_log_cut_short_does_not_glue_the_first_record_to_it(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """The service stopped while its event log's last line was cut short (a full disk), the disk
    freed, the service started again: its first record was appended to the fragment, one line
    that no reader can parse, the record lost and counted nowhere."""
    events = tmp_path / "events.jsonl"
    whole = b'{"ts":"2026-12-01T00:00:00.000Z","event":"config","source":"x","ok":true}\n'
    events.write_bytes(whole + whole[:30])
    with imapveil(tmp_path, dovecot.address, "--store", "off", "--events", str(events)) as proxy:
        session(proxy.port)
        assert proxy.stop() == 0
    records, other = read_log(events)
    assert other == [whole[:30]]
    assert [r["event"] for r in records[:3]] == ["config", "config", "policy"]
    assert records[-1]["event"] == "session_end"


@pytest.mark.parametrize("reload", [False, True], ids=["stop", "reload-then-stop"])
def test_stdout_a_pipe_nobody_reads_neither_stops_relaying_nor_the_exit(
    dovecot: Dovecot, tmp_path: Path, reload: bool
) -> None:
    """`--events -` into a pipe nobody reads (a stuck log collector): the writer's thread blocks
    in write(2) once the pipe is full. Sessions go on (records beyond the queue dropped), and on
    SIGTERM the service waited for that write for ever; it now gives the event log a few
    seconds, counts and logs what it could not write, and exits 0. A SIGHUP first (a reload:
    stdout is not reopened) waited for the stuck write too, and the SIGTERM after it was never
    read."""
    with imapveil(tmp_path, dovecot.address, "--store", "off", "--events", "-") as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"l LOGIN alice wonderland\r\n")
            assert f.readline().startswith(b"l OK")
            burst = b"".join(b"n%d NOOP\r\n" % i for i in range(1000))
            for _ in range(3):  # some 400 KB of records: six pipes' worth
                s.sendall(burst)
                while not f.readline().startswith(b"n999 "):
                    pass
            s.sendall(b"q LOGOUT\r\n")
            f.read()
            f.close()
        session(proxy.port)  # relayed while the writer is stuck
        if reload:
            proxy.signal(signal.SIGHUP)
            time.sleep(0.5)  # not waited for: the reload itself waited for the stuck write
        stopped = time.monotonic()
        proxy.signal(signal.SIGTERM)
        try:
            status = proxy.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            status = None
        took = time.monotonic() - stopped
        assert proxy.process.stderr is not None
        if status is None:
            proxy.process.kill()
            proxy.process.wait()
        stderr = proxy.process.stderr.read()
        for pipe in (proxy.process.stdout, proxy.process.stderr):
            assert pipe is not None
            pipe.close()
    assert status == 0, stderr.decode()
    assert took < 10
    assert b"records lost" in stderr
    assert not reload or b"reloaded" in stderr


def test_a_full_disk_under_the_statistics_spool_lets_the_service_exit_cleanly(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """The statistics store (SQLite, the default) and its spool on a disk that is full (the
    file size limit): the spool's failed write left its rows in the file object's buffer, which
    every later write and the close tried to write again; the close at exit raised, and the
    service ended with status 1 and a traceback. The rows are lost and said so; the exit is 0,
    and sessions were relayed."""
    with imapveil(tmp_path, dovecot.address, wrap=limited()) as proxy:
        for _ in range(12):  # some 6 KB of spooled rows: more than the limit
            session(proxy.port)
        status = proxy.stop()
    assert status == 0, proxy.stderr.decode()
    assert b"Traceback" not in proxy.stderr
    assert b"could not be stored or spooled and are lost" in proxy.stderr


SPOOL_SCRIPT = """
import os, resource, sys
from pathlib import Path
from imapveil.stats.spool import Spool
from imapveil.stats.store import COMMAND_COLUMNS

directory = Path(sys.argv[1])
spool = Spool(directory)
spool.open()
def row(i):
    return ("command", [f"s{i}"] + [0] * (len(COMMAND_COLUMNS) - 1))
assert spool.append([row(0)]) == 1
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
size = os.path.getsize(next(directory.glob("0*.jsonl")))
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 10, hard))  # the disk full
try:
    spool.append([row(1)])
except OSError:
    pass
else:
    raise AssertionError("the write went through")
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # the disk freed
assert spool.append([row(1)]) == 1  # the same rows again: they stayed queued
items, _ = spool.read(100)
spool.close()
print(" ".join(item[1][0] for item in items))
"""


def test_rows_a_full_disk_refused_are_spooled_once_when_it_takes_them(tmp_path: Path) -> None:
    """The spool's write fails (the disk full): its rows stay queued, to be written again. They
    also stayed in the spool file's buffer, and went out with the next write as well: each row
    twice in the spool, replayed twice into the store."""
    run = subprocess.run(
        [sys.executable, "-c", SPOOL_SCRIPT, str(tmp_path / "spool")],
        capture_output=True,
        timeout=60,
        check=False,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src")),
    )
    assert run.returncode == 0, run.stderr.decode()
    assert run.stdout.split() == [b"s0", b"s1"]


def test_a_reload_with_the_event_log_a_fifo_nobody_reads_freezes_nothing(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """`--events` a named pipe, its reader gone (writes fail: EPIPE, counted), then SIGHUP: the
    reopen's open(2) waited for a reader, in the event loop itself: no session was relayed any
    more, and SIGTERM was never read. The FIFO is not reopened (the one open before stays, its
    failure logged), sessions go on, the service stops."""
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.DEVNULL)
    try:
        with imapveil(tmp_path, dovecot.address, "--store", "off", "--events", str(fifo)) as proxy:
            session(proxy.port)
            reader.terminate()
            reader.wait()
            session(proxy.port)
            proxy.signal(signal.SIGHUP)
            session(proxy.port, timeout=3)  # (timed out: the event loop waited in open)
            # The reopen runs in a worker thread: its failure is said once it is over, which a
            # stop right after the session could come before (a full run saw it, loaded).
            proxy.early_stderr += proxy.stderr_until(b"still writing to the file open before")
            assert proxy.stop() == 0
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert b"Broken pipe" in proxy.stderr
    assert b"still writing to the file open before" in proxy.stderr


def test_a_full_disk_then_freed_while_sessions_run(dovecot: Dovecot, tmp_path: Path) -> None:
    """A real full disk (a 64 KB tmpfs, filled but for a page: ENOSPC, a write taken in part),
    then freed, sessions all along: each record made is in the log whole, or counted in
    the metric and said in a `records_dropped` line, the line cut short stands alone."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        events = disk / "events.jsonl"
        filler = disk / "filler"
        port = free_port()
        args = ("--store", "off", "--metrics", f"127.0.0.1:{port}", "--events", str(events))
        with imapveil(tmp_path, dovecot.address, *args) as proxy:
            session(proxy.port)
            # The disk filled but for a page (and the room left in the log's last page): a few
            # sessions' records.
            with filler.open("wb", buffering=0) as f:
                with contextlib.suppress(OSError):
                    while f.write(b"x" * 1024):
                        pass
                f.truncate(f.tell() - 4096)
            until_dropped(proxy.port, port)
            session(proxy.port)  # lost too
            filler.unlink()  # the disk freed
            session(proxy.port)
            session(proxy.port)
            metrics = scrape(port)
            assert proxy.stop() == 0
        records, other = read_log(events)
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    assert len(other) == 1 and other[0].startswith(b'{"ts":')  # cut short, on a line alone
    written, said = accounted(records)
    assert said == metrics["imapveil_events_dropped_total"] > 0
    assert written + said == made(metrics)
    assert records[-1]["event"] == "session_end"


def test_a_client_cannot_make_its_id_pass_for_a_records_dropped_line(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """A policy that records every ID field a client sends: a client names its fields so that
    its ID record holds `","event":"records_dropped","count":` (the marker of our own count
    lines) and a count. Lost with the rest (the log on /dev/full), it is counted as one record
    lost, not read as a count of lost records: the metric is exactly the records made."""
    policy = tmp_path / "all.toml"
    policy.write_text(
        'name = "all"\ndefault = { forward = "keep", record = "keep" }\ndetectors = []\n'
    )
    port = free_port()
    args = ("--store", "off", "--metrics", f"127.0.0.1:{port}", "--events", "/dev/full")
    with imapveil(tmp_path, dovecot.address, *args, "--policy", str(policy)) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b'i ID ("x" "" "event" "records_dropped" "count" "100000")\r\n')
            while not f.readline().startswith(b"i "):
                pass
            s.sendall(b"q LOGOUT\r\n")
            f.read()
            f.close()
        time.sleep(2 * COALESCE + 0.2)  # written (lost); a count read from it said after
        metrics = scrape(port)
        assert proxy.stop() == 0
    assert metrics["imapveil_id_exchanges_total"] == 1
    everything = made(metrics) + 1  # and the ID exchange's own record
    assert metrics["imapveil_events_dropped_total"] == everything
    # The record as the log writes it (a writable log shows the same line): the marker is in it.
    client: dict[str, str | None] = {"x": "", "event": "records_dropped", "count": "100000"}
    record = IdExchange("s", "i", "not_authenticated", "OK", False, client, (), None, None)
    assert _DROPS in encode(record)


def test_stdout_a_non_blocking_pipe_loses_nothing(dovecot: Dovecot, tmp_path: Path) -> None:
    """`--events -` into a pipe whose file description another process made non-blocking (the
    flag is shared: a supervisor's own end, say), read as fast as it comes: a write of more than
    the pipe holds (a batch of a few hundred records) failed with EAGAIN, the batch counted
    lost. The writer waits for room, as a blocking write would."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    port = free_port()
    command = [
        sys.executable, "-m", "imapveil", "serve",
        "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{dovecot.address[1]}",
        "--events", "-", "--store", "off", "--user-key-file", str(tmp_path / "user-key"),
    ]  # fmt: skip
    got = bytearray()

    def read() -> None:
        while chunk := os.read(read_end, 1 << 16):
            got.extend(chunk)

    reader = threading.Thread(target=read)
    process = subprocess.Popen(command, stdout=write_end, stderr=subprocess.PIPE)
    os.close(write_end)
    reader.start()
    try:
        assert process.stderr is not None
        wait_until_listening(process)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"l LOGIN alice wonderland\r\n")
            f.readline()
            for _ in range(2):  # 500 records in a batch: some 100 KB, the pipe holds 64
                s.sendall(b"".join(b"n%d NOOP\r\n" % i for i in range(500)))
                while not f.readline().startswith(b"n499 "):
                    pass
                time.sleep(2 * COALESCE)
            s.sendall(b"q LOGOUT\r\n")
            f.read()
            f.close()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        reader.join(20)
        os.close(read_end)
    assert process.returncode == 0, stderr.decode()
    assert b"cannot write the event log" not in stderr, stderr.decode()
    records = [json.loads(line) for line in got.splitlines()]
    assert [r["event"] for r in records].count("command") == 1 + 1000 + 1
    assert records[-1]["event"] == "session_end"


async def test_a_write_that_raises_counts_its_records_lost(tmp_path: Path) -> None:
    """A write that raised something other than OSError (a bug): its records were taken off the
    queue as if written, nothing counted. They are counted lost; the next write goes out."""
    sink = JsonLinesSink(str(tmp_path / "events.jsonl"))
    sink.open()
    write = sink._write
    calls = []

    def broken(data: bytes) -> tuple[int, OSError | None]:
        calls.append(data)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return write(data)

    sink._write = broken  # type: ignore[method-assign]
    sink.emit(SessionStarted("a", "c", "u"))
    with pytest.raises(RuntimeError):
        await sink.flush()
    sink.emit(SessionStarted("b", "c", "u"))
    await sink.flush()
    assert sink.dropped == 1
    sink.emit(SessionStarted("c", "c", "u"))
    await sink.flush()
    assert sink._file is not None
    sink._file.close()
    lines = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(x["event"], x.get("session"), x.get("count")) for x in lines] == [
        ("session_start", "b", None),
        ("records_dropped", None, 1),
        ("session_start", "c", None),
    ]


def test_a_copytruncate_rotation_while_writes_fail_starts_the_file_with_a_record(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """logrotate's `copytruncate` (the file copied, then truncated in place, no SIGHUP) after a
    write the limit cut short: the newline meant to end that line was written first, to the
    empty file: a blank line. What follows is whole records, the first of them saying the
    loss."""
    port = free_port()
    args = ("--store", "off", "--metrics", f"127.0.0.1:{port}")
    with imapveil(tmp_path, dovecot.address, *args, wrap=limited()) as proxy:
        until_dropped(proxy.port, port)
        time.sleep(2 * COALESCE)  # the last session's records: written or lost
        with proxy.events.open("r+b") as f:
            f.truncate(0)
        session(proxy.port)
        assert proxy.stop() == 0
    records, other = read_log(proxy.events)
    assert other == []
    assert records[0]["event"] == "records_dropped"
