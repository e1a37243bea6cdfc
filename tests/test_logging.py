"""Diagnostics as an administrator reads them: journald's priorities when stderr is the journal,
debug lines that say what happened (and nothing secret), the level re-read on reload.

Each test runs the real `imapveil serve` process."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from imapveil import logs
from tests.helpers.dovecot import Dovecot, free_port
from tests.helpers.process import imapveil, stderr_until, wait_until_listening

TIMESTAMP = re.compile(rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
PLAIN_LINE = re.compile(rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) \S+: ")


def dead_port() -> int:
    """A loopback port where nothing listens: the upstream is unavailable, and says so."""
    return free_port()


@contextmanager
def serving(
    tmp_path: Path, *args: str, journal: str | None, stderr_fd: int | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`imapveil serve` with stderr to a pipe; `journal`: what JOURNAL_STREAM says ("pipe":
    that pipe's own device:inode, as systemd sets it for a stream it connected to journald)."""
    read, write = os.pipe()
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    if journal == "pipe":
        st = os.fstat(write)
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    elif journal is not None:
        env["JOURNAL_STREAM"] = journal
    port = free_port()
    command = [
        sys.executable, "-m", "imapveil", "serve",
        "--listen", f"127.0.0.1:{port}",
        "--events", str(tmp_path / "events.jsonl"),
        "--user-key-file", str(tmp_path / "user-key"),
        "--shutdown-grace", "0.5",
        *args,
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=write, env=env)
    os.close(write)
    process.stderr = os.fdopen(read, "rb")
    try:
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stderr.close()


def knock(port: int) -> bytes:
    """A client that connects and reads what it is told (a BYE, the upstream being away)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return s.makefile("rb").read()


def finish(process: subprocess.Popen[bytes]) -> bytes:
    process.send_signal(signal.SIGTERM)
    assert process.stderr is not None
    rest = process.stderr.read()
    process.stderr.close()
    assert process.wait(timeout=20) == 0, rest.decode()
    return rest


def test_under_journald_lines_carry_priorities_and_no_timestamp(tmp_path: Path) -> None:
    upstream = f"127.0.0.1:{dead_port()}"
    with serving(tmp_path, "--upstream", upstream, "--log-level", "debug", journal="pipe") as (
        process,
        port,
    ):
        seen = wait_until_listening(process)
        assert knock(port).startswith(b"* BYE")
        seen += stderr_until(process, b"unavailable")
        seen += finish(process)
    lines = seen.splitlines()
    assert lines and all(re.match(rb"<[2-7]>\S+: ", line) for line in lines), seen.decode()
    assert not TIMESTAMP.search(seen), seen.decode()
    assert any(line.startswith(b"<6>imapveil: listening on 127.0.0.1:") for line in lines)
    assert f"<4>imapveil.relay.server: upstream {upstream} unavailable".encode() in seen
    assert b"<7>imapveil.relay.connection: session " in seen  # the failed connect, at debug


@pytest.mark.parametrize("journal", [None, "1:2", "garbage"])
def test_elsewhere_the_format_stays_with_its_timestamp(tmp_path: Path, journal: str | None) -> None:
    # No JOURNAL_STREAM, or one naming another file (inherited from a service whose child
    # redirected stderr): the format of before, time first.
    upstream = f"127.0.0.1:{dead_port()}"
    with serving(tmp_path, "--upstream", upstream, journal=journal) as (process, port):
        seen = wait_until_listening(process)
        assert knock(port).startswith(b"* BYE")
        seen += stderr_until(process, b"unavailable")
        seen += finish(process)
    lines = seen.splitlines()
    assert lines and all(PLAIN_LINE.match(line) for line in lines), seen.decode()
    assert b" INFO imapveil: listening on 127.0.0.1:" in seen
    assert b"<" not in seen.split(b"listening")[0]


def test_journal_formatter_prefixes_every_line_of_a_traceback() -> None:
    formatter = logs.JournalFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("imapveil", logging.ERROR, __file__, 1, "failed", (), None)
        record.exc_info = sys.exc_info()
    text = formatter.format(record)
    assert text.startswith("<3>imapveil: failed\n<3>Traceback")
    assert all(line.startswith("<3>") for line in text.splitlines())
    assert [logs.syslog_priority(n) for n in (50, 40, 30, 20, 10, 5)] == [2, 3, 4, 6, 7, 7]


def test_is_journal_compares_device_and_inode(tmp_path: Path) -> None:
    with (tmp_path / "f").open("w") as f:
        st = os.fstat(f.fileno())
        assert logs.is_journal(f.fileno(), {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not logs.is_journal(f.fileno(), {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not logs.is_journal(f.fileno(), {})
        assert not logs.is_journal(f.fileno(), {"JOURNAL_STREAM": "x:y"})


@pytest.mark.dovecot
def test_debug_lines_say_what_happened_and_nothing_secret(dovecot: Dovecot, tmp_path: Path) -> None:
    values = [b"Thunderbird", b"115.3.1", b"Pixel 7a", b"350000000000009", b"wonderland"]
    args = ("--log-level", "debug", "--max-sessions", "1")
    with imapveil(tmp_path, dovecot.address, *args) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
            f = s.makefile("rb")
            assert f.readline().startswith(b"* OK")
            s.sendall(
                b'a ID ("name" "Thunderbird" "version" "115.3.1" "device" "Pixel 7a" '
                b'"imei" "350000000000009")\r\n'
            )
            while not f.readline().startswith(b"a "):
                pass
            # A second client while this one is open: over max_sessions.
            assert knock(proxy.port).startswith(b"* BYE [UNAVAILABLE]")
            s.sendall(b"b LOGIN alice wonderland\r\nc LOGOUT\r\n")
            while not f.readline().startswith(b"c "):
                pass
        assert proxy.stop() == 0
    seen = proxy.early_stderr + proxy.stderr
    debug = [line for line in seen.splitlines() if b" DEBUG " in line]
    text = b"\n".join(debug).decode()
    assert re.search(
        rf"session \S+: connected to upstream 127\.0\.0\.1:{dovecot.port} "
        rf"\(127\.0\.0\.1:{dovecot.port}\) in \d+\.\d ms",
        text,
    ), text
    (record,) = [r for r in proxy.records() if r["event"] == "id"]
    assert set(record["dropped"]) == {"device", "imei"}
    assert "name" in record["forwarded"] and "version" in record["forwarded"]
    decision = next(line for line in debug if b": ID under policy" in line).decode()
    assert "policy default" in decision
    forwarded, dropped = re.findall(r"forwarded ([^;]*); dropped ([^;]*);", decision)[0]
    assert set(forwarded.split(", ")) == set(record["forwarded"])
    assert set(dropped.split(", ")) == {"device", "imei"}
    assert "refused a connection from 127.0.0.1 over a limit: 1 sessions in all" in text
    assert re.search(r"ended \(logout\) after \d+ ms, 3 commands", text), text
    for value in values:  # no ID value, no password, in any line
        assert value not in seen, value
    assert b"alice" not in seen  # nor the user


def test_log_level_is_read_again_on_reload(tmp_path: Path) -> None:
    config = tmp_path / "imapveil.toml"
    port = free_port()
    upstream = f"127.0.0.1:{dead_port()}"
    settings = (
        f'listen = "127.0.0.1:{port}"\nupstream = "{upstream}"\n'
        f'events = "{tmp_path / "events.jsonl"}"\n'
        f'user_key_file = "{tmp_path / "user-key"}"\nshutdown_grace = 0.5\n'
    )
    config.write_text(settings + 'log_level = "info"\n')
    process = subprocess.Popen(
        [sys.executable, "-m", "imapveil", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        before = wait_until_listening(process)
        assert knock(port).startswith(b"* BYE")
        before += stderr_until(process, b"unavailable")
        config.write_text(settings + 'log_level = "debug"\n')
        process.send_signal(signal.SIGHUP)
        before += stderr_until(process, b"reloaded")
        assert knock(port).startswith(b"* BYE")
        after = stderr_until(process, b"unavailable")
        after += finish(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert b" DEBUG " not in before, before.decode()
    assert b" INFO imapveil: log level now debug" in before
    assert re.search(
        rb" DEBUG imapveil\.relay\.connection: session \S+: upstream "
        + re.escape(upstream.encode())
        + rb" not connected after \d+\.\d ms: econnrefused",
        after,
    ), after.decode()


# --- records under the shipped unit: the journal's rate limit, or a file and logrotate ---------

REPO = Path(__file__).resolve().parents[1]


def unit_settings() -> dict[str, str]:
    text = (REPO / "systemd" / "imapveil.service").read_text()
    return dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and line[0].isalpha()
    )


def test_the_unit_takes_records_at_thousands_of_commands_per_second() -> None:
    unit = unit_settings()
    # journald's default (10000 lines in 30 s) would drop most records of a busy proxy.
    interval = float(unit["LogRateLimitIntervalSec"].removesuffix("s"))
    assert int(unit["LogRateLimitBurst"]) / interval >= 5000
    # Or records to a file: the one place under ProtectSystem=strict where the service may write.
    assert unit["ProtectSystem"] == "strict"
    assert unit["LogsDirectory"] == "imapveil" and unit["LogsDirectoryMode"] == "0750"
    snippet = (REPO / "systemd" / "imapveil.logrotate").read_text()
    assert "/var/log/imapveil/*.jsonl {" in snippet
    assert "systemctl reload imapveil.service" in snippet  # SIGHUP reopens the event log
    directives = [line.strip() for line in snippet.splitlines() if not line.startswith("#")]
    assert "copytruncate" not in directives


def ends_written(path: Path, count: int) -> None:
    deadline = time.monotonic() + 10
    while path.read_text().count('"event":"session_end"') < count:
        assert time.monotonic() < deadline, path.read_text()
        time.sleep(0.05)


def test_logrotate_with_the_shipped_snippet_loses_no_record(tmp_path: Path) -> None:
    logrotate = shutil.which("logrotate") or (
        "/usr/sbin/logrotate" if Path("/usr/sbin/logrotate").exists() else None
    )
    # scripts/check installs Debian's logrotate: a missing one is a failure, not a skip.
    assert logrotate is not None, "logrotate is not installed (run scripts/check)"
    logs_dir = tmp_path / "log"
    logs_dir.mkdir(mode=0o750)
    events = logs_dir / "events.jsonl"
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable, "-m", "imapveil", "serve",
            "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{dead_port()}",
            "--events", str(events), "--user-key-file", str(tmp_path / "user-key"),
            "--shutdown-grace", "0.5",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_until_listening(process)
        for _ in range(3):
            assert knock(port).startswith(b"* BYE")
        stderr_until(process, b"unavailable")
        ends_written(events, 3)  # the event log is written in batches
        # The shipped snippet, for this directory and this process instead of the unit's.
        snippet = (REPO / "systemd" / "imapveil.logrotate").read_text()
        snippet = snippet.replace("/var/log/imapveil", str(logs_dir)).replace(
            "systemctl reload imapveil.service", f"kill -HUP {process.pid}"
        )
        config = tmp_path / "logrotate.conf"
        config.write_text(snippet)
        config.chmod(0o644)
        rotated = subprocess.run(
            [logrotate, "--force", "--state", str(tmp_path / "state"), str(config)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert rotated.returncode == 0, rotated.stdout + rotated.stderr
        stderr_until(process, b"reloaded")
        for _ in range(2):
            assert knock(port).startswith(b"* BYE")
        finish(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    old = [json.loads(line) for line in (logs_dir / "events.jsonl.1").read_text().splitlines()]
    new = [json.loads(line) for line in events.read_text().splitlines()]
    assert [r["event"] for r in old].count("session_end") == 3
    assert [r["event"] for r in new].count("session_end") == 2
    assert not (logs_dir / "events.jsonl.1.gz").exists()  # delaycompress: the next rotation
