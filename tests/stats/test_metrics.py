"""/metrics as Prometheus scrapes it: exact counters, the right types, process metrics and the
build, from the real `imapveil serve` after real traffic; parsed with prometheus_client."""

from __future__ import annotations

import http.client
import imaplib
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import parser as openmetrics
from prometheus_client.parser import text_string_to_metric_families

from imapveil import __version__
from imapveil.records import SessionEnded
from imapveil.stats.metrics import Metrics, ProcessCollector, serve_metrics
from tests.helpers.dovecot import Dovecot, free_port
from tests.helpers.process import imapveil

parse_openmetrics: Callable[[str], Iterator[Metric]] = openmetrics.text_string_to_metric_families
BIG = 12_000_000  # octets: more than `%g` could print exactly (six significant digits)


def scrape(port: int, accept: str = "") -> tuple[str, str]:
    """(Content-Type, body) of GET /metrics, as an HTTP client reads it."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/metrics", headers={"Accept": accept} if accept else {})
        response = connection.getresponse()
        assert response.status == 200
        return response.getheader("Content-Type", ""), response.read().decode()
    finally:
        connection.close()


def families(text: str) -> dict[str, Metric]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(family: Metric, **labels: str) -> float:
    (sample,) = [s for s in family.samples if s.labels == labels]
    return sample.value


def ended(bytes_from_client: int) -> SessionEnded:
    return SessionEnded("s", "c", "u", "logout", None, "logout", None, 1.0, bytes_from_client, 7, 3)


def test_counters_are_exact_and_typed() -> None:
    metrics = Metrics()
    metrics.emit(ended(20_002_235))
    metrics.emit(ended(2**52))
    metrics.counter("events_dropped", "dropped", lambda: 12_345_678)
    metrics.gauge("sessions_active", "open", lambda: 3)
    text = metrics.exposition()
    assert "2.00022e+07" not in text
    parsed = families(text)
    assert value(parsed["imapveil_bytes"], direction="from_client") == 20_002_235 + 2**52
    assert value(parsed["imapveil_events_dropped"]) == 12_345_678
    assert "# TYPE imapveil_events_dropped_total counter" in text
    assert "# TYPE imapveil_sessions_active gauge" in text
    assert parsed["imapveil_sessions_active"].type == "gauge"
    assert value(parsed["imapveil_build_info"], version=__version__) == 1


def test_process_metrics_without_proc_stat(tmp_path: Path) -> None:
    # The shipped unit's ProcSubset=pid hides /proc/stat (the boot time), which stops
    # prometheus_client's own process collector cold; ours reads the clock instead.
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "self").symlink_to(Path("/proc/self").resolve(), target_is_directory=True)
    collected = {f.name: f for f in ProcessCollector(proc).collect()}
    real = {f.name: f for f in ProcessCollector().collect()}
    assert set(collected) == set(real) >= {
        "process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds",
        "process_start_time_seconds", "process_max_fds",
    }  # fmt: skip
    start = collected["process_start_time_seconds"].samples[0].value
    assert abs(start - real["process_start_time_seconds"].samples[0].value) < 2
    assert start <= time.time()
    assert collected["process_cpu_seconds"].type == "counter"


@pytest.mark.dovecot
def test_a_scrape_after_traffic(dovecot: Dovecot, tmp_path: Path) -> None:
    metrics_port = free_port()
    args = ("--metrics", f"127.0.0.1:{metrics_port}", "--max-sessions", "1")
    message = b"Subject: big\r\n\r\n" + b"x" * (BIG - 78) + b"\r\n"
    with imapveil(tmp_path, dovecot.address, *args) as proxy:
        m = imaplib.IMAP4("127.0.0.1", proxy.port)
        m.login("alice", "wonderland")
        m.create("metrics")
        try:
            m.append("metrics", "", imaplib.Time2Internaldate(time.time()), message)
            m.select("metrics")
            _, data = m.fetch("1", "(RFC822)")
            assert message in [part[1] for part in data if isinstance(part, tuple)]
            # A second client while this one is open: over max_sessions, refused.
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as other:
                assert other.makefile("rb").read().startswith(b"* BYE [UNAVAILABLE]")
            m.close()
        finally:
            m.delete("metrics")
            m.logout()
        deadline = time.monotonic() + 10
        while True:  # the session's end is counted once the proxy saw the LOGOUT through
            head, text = scrape(metrics_port)
            parsed = families(text)
            if parsed["imapveil_sessions"].samples or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        om_head, om_text = scrape(metrics_port, "application/openmetrics-text; version=1.0.0")
        assert proxy.stop() == 0
    assert head.startswith("text/plain; version=0.0.4")
    (end,) = [r for r in proxy.records() if r["event"] == "session_end"]
    assert end["bytes_from_client"] > BIG and end["bytes_from_server"] > BIG
    # Exact, to the octet.
    assert value(parsed["imapveil_bytes"], direction="from_client") == end["bytes_from_client"]
    assert value(parsed["imapveil_bytes"], direction="from_server") == end["bytes_from_server"]
    assert value(parsed["imapveil_sessions"], reason="logout") == 1
    assert value(parsed["imapveil_commands"], verb="APPEND", status="OK") == 1
    assert value(parsed["imapveil_connections_refused"]) == 1
    assert value(parsed["imapveil_events_dropped"]) == 0
    assert value(parsed["imapveil_build_info"], version=__version__) == 1
    types = {
        "imapveil_bytes_total": "counter",
        "imapveil_sessions_total": "counter",
        "imapveil_commands_total": "counter",
        "imapveil_events_dropped_total": "counter",
        "imapveil_connections_refused_total": "counter",
        "imapveil_sessions_active": "gauge",
        "imapveil_build_info": "gauge",
        "process_cpu_seconds_total": "counter",
        "process_resident_memory_bytes": "gauge",
        "process_open_fds": "gauge",
        "process_start_time_seconds": "gauge",
    }
    for name, kind in types.items():
        assert f"\n# TYPE {name} {kind}\n" in text, name
    assert value(parsed["process_open_fds"]) >= 3
    assert value(parsed["process_resident_memory_bytes"]) > 1_000_000
    started = value(parsed["process_start_time_seconds"])
    assert time.time() - 120 < started < time.time()
    assert os.sysconf("SC_CLK_TCK") > 0
    # What Prometheus asks for first: OpenMetrics, with the same exact values.
    assert om_head.startswith("application/openmetrics-text; version=1.0.0")
    om = {f.name: f for f in parse_openmetrics(om_text)}
    assert value(om["imapveil_bytes"], direction="from_client") == end["bytes_from_client"]
    assert om["imapveil_bytes"].type == "counter"


def test_process_metrics_under_procsubset_pid() -> None:
    # What the shipped unit's ProcSubset=pid does: a /proc with process directories only.
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) to mount a /proc of its own")
    probe = (
        "from prometheus_client import CollectorRegistry\n"
        "from prometheus_client.process_collector import ProcessCollector as Theirs\n"
        "from imapveil.stats.metrics import ProcessCollector as Ours\n"
        "r = CollectorRegistry(); Theirs(registry=r)\n"
        "print(len(list(r.collect())), sorted(m.name for m in Ours().collect()))\n"
    )
    mount = "mount -t proc -o subset=pid proc /proc && test ! -e /proc/stat && exec "
    result = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         mount + shlex.join([sys.executable, "-c", probe])],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    theirs, ours = result.stdout.split(" ", 1)
    assert theirs == "0"  # prometheus_client's own collector: nothing at all
    assert "process_start_time_seconds" in ours and "process_open_fds" in ours


@pytest.mark.dovecot
@pytest.mark.parametrize(
    "accept", ["text/plain; version=abc", "application/openmetrics-text; version=1.x"]
)
def test_a_malformed_accept_header_gets_the_text_format_and_ends_nothing(
    dovecot: Dovecot, tmp_path: Path, accept: str
) -> None:
    """(attack9) prometheus_client's `choose_encoder` raises TypeError on a version it cannot
    compare: one such scrape ended `imapveil serve` with a traceback, every session cut off. The
    scrape gets the default text format; the session open meanwhile goes on."""
    port = free_port()
    with imapveil(tmp_path, dovecot.address, "--metrics", f"127.0.0.1:{port}") as proxy:
        m = imaplib.IMAP4("127.0.0.1", proxy.port)
        try:
            m.login("alice", "wonderland")
            content_type, text = scrape(port, accept)
            assert content_type.startswith("text/plain; version=0.0.4")
            assert "imapveil_sessions_active 1.0" in text
            assert m.noop()[0] == "OK"
            m.logout()
        finally:
            m.sock.close()
        assert proxy.stop() == 0


@pytest.mark.dovecot
def test_records_the_event_log_cannot_write_are_counted_as_dropped(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """(attack9) The event log on a full disk (/dev/full: every write fails with ENOSPC): the
    records are lost and imapveil_events_dropped_total stays 0, so nothing an operator alerts
    on says so. Every record made is counted there (config and policy at start, and each
    session's start, commands and end), and the service stops cleanly."""
    port = free_port()
    args = ("--metrics", f"127.0.0.1:{port}", "--events", "/dev/full")
    with imapveil(tmp_path, dovecot.address, *args) as proxy:
        for _ in range(3):
            m = imaplib.IMAP4("127.0.0.1", proxy.port)
            m.login("alice", "wonderland")
            m.noop()
            m.logout()
        deadline = time.monotonic() + 3
        while True:
            found = families(scrape(port)[1])
            sessions = sum(s.value for s in found["imapveil_sessions"].samples)
            commands = sum(s.value for s in found["imapveil_commands"].samples)
            made = 2 + 2 * sessions + commands
            dropped = value(found["imapveil_events_dropped"])
            if dropped == made or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert sessions == 3
        assert dropped == made
        assert proxy.stop() == 0
    assert b"cannot write the event log /dev/full" in proxy.stderr


async def test_a_scrape_that_fails_costs_that_scrape_only(caplog: pytest.LogCaptureFixture) -> None:
    """Whatever goes wrong while one scrape is answered (here a gauge whose reading raises: a
    bug) answers that scrape 500 and is logged; the metrics server, and the service around it,
    go on (before: the exception left the handler and ended the service)."""
    metrics = Metrics()
    failing = [True]

    def reading() -> float:
        if failing[0]:
            raise ZeroDivisionError("a bug in a gauge")
        return 1.0

    metrics.gauge("flaky", "A gauge that fails once", reading)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def get(path: str) -> tuple[int, bytes]:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            answer = b""
            while chunk := await stream.receive_some(65536):
                answer += chunk
        return int(answer.split(b" ", 2)[1]), answer.partition(b"\r\n\r\n")[2]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_metrics, metrics, listeners, lambda: (True, "ok"))
        with trio.fail_after(10):
            status, _ = await get("/metrics")
            assert status == 500
            failing[0] = False
            status, body = await get("/metrics")
            assert status == 200 and b"imapveil_flaky 1.0" in body
            assert (await get("/healthz"))[0] == 200
        nursery.cancel_scope.cancel()
    failures = [r for r in caplog.records if "scrape" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None
    assert "a bug in a gauge" not in failures[0].getMessage()  # the trace has it, not the line


@pytest.mark.dovecot
def test_connections_held_open_on_the_metrics_port_leave_the_mail_port_alone(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """Anyone who reaches the metrics port could open connections and send nothing: each one
    held a descriptor for its 5 s, without a limit, and under the process's descriptor limit
    the IMAP listener could then accept nobody (EMFILE). At most `SCRAPES_AT_ONCE` are served
    at a time; a connection beyond them is closed at once (a flood costs scrapes, not mail)."""
    port = free_port()
    wrap = ["prlimit", "--nofile=160:160", "--"]  # 160 descriptors for the whole process
    with imapveil(tmp_path, dovecot.address, "--metrics", f"127.0.0.1:{port}", wrap=wrap) as proxy:
        held = []
        try:
            for _ in range(300):
                held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            time.sleep(0.5)  # the proxy accepts what it will
            m = imaplib.IMAP4("127.0.0.1", proxy.port, timeout=2)  # the held ones live 5 s
            try:
                assert m.login("alice", "wonderland")[0] == "OK"
                m.logout()
            finally:
                m.sock.close()
        finally:
            for s in held:
                s.close()
        deadline = time.monotonic() + 5
        while True:  # the flood gone, scrapes are served again
            try:
                _, text = scrape(port)
                break
            except (OSError, http.client.HTTPException):
                assert time.monotonic() < deadline, "no scrape served after the flood"
                time.sleep(0.05)
        assert "imapveil_sessions_active" in text
        assert proxy.stop() == 0
