"""Real clients with corpus IDs through the real proxy to a real Dovecot; then `imapveil stats`
and the HTML report (rendered by a real headless Chromium) say which clients were in use —
with SQLite and with PostgreSQL; metrics while it runs; a store that goes away and comes back."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.corpus import rows
from tests.helpers.dovecot import Dovecot, free_port
from tests.helpers.postgres import Postgres
from tests.helpers.process import imapveil
from tests.stats.test_durability import query

pytestmark = pytest.mark.dovecot
CLIENT_ROWS = [r for r in rows() if r.direction == "C"]


def session_with_id(port: int, user: str, password: str, id_line: bytes | None) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s, s.makefile("rb") as f:
        f.readline()
        payload = b"L LOGIN %s %s\r\n" % (user.encode(), password.encode())
        if id_line is not None:
            payload += id_line
        s.sendall(payload + b"Z LOGOUT\r\n")
        f.read()


def http_get(port: int, path: str) -> tuple[bytes, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0], body


def imapveil_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imapveil", *args],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip


def run_sessions(dovecot: Dovecot, tmp_path: Path, store: str) -> list[dict[str, object]]:
    metrics_port = free_port()
    args = ("--store", store, "--metrics", f"127.0.0.1:{metrics_port}")
    with imapveil(tmp_path, dovecot.address, *args) as proxy:
        users = list(dovecot.users.items())
        for i, row in enumerate(CLIENT_ROWS):
            session_with_id(proxy.port, *users[i % 2], row.data)
        for _ in range(2):
            session_with_id(proxy.port, "alice", "wonderland", None)
        status, body = http_get(metrics_port, "/metrics")
        assert status == b"HTTP/1.1 200 OK"
        text = body.decode()
        assert 'imapveil_id_exchanges_total{family="Apple Mail"} 5' in text
        assert 'imapveil_commands_total{status="OK",verb="LOGIN"}' in text
        assert 'imapveil_id_fields_dropped_total{field="aguid"} 1' in text
        assert "imapveil_sessions_active" in text and "imapveil_store_queue_depth" in text
        assert http_get(metrics_port, "/healthz")[0] == b"HTTP/1.1 200 OK"
        assert proxy.stop() == 0
    stats = imapveil_cli("stats", "--store", store, "--format", "json", "--min-users", "1")
    assert stats.returncode == 0, stats.stderr
    data = json.loads(stats.stdout)
    assert data["sessions"] == len(CLIENT_ROWS) + 2 and data["users"] == 2
    result: list[dict[str, object]] = data["rows"]
    return result


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_stats_and_report_from_real_sessions(
    dovecot: Dovecot, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    if backend == "postgresql":
        store = request.getfixturevalue("postgres").url
    else:
        store = str(tmp_path / "stats.sqlite")
    found = {r["group"]: r["sessions"] for r in run_sessions(dovecot, tmp_path, store)}
    assert found["Apple Mail"] == 5  # three macOS rows, two iOS rows in the corpus
    assert found["Thunderbird"] == 1 and found["Android Email"] == 1
    # Two without ID, two that sent ID NIL, and the webmail whose only field was its client's
    # address (dropped): nothing names a program.
    assert found["no ID"] == 5
    # With the default minimum group size (5 users) everything folds: two users in all.
    folded = json.loads(imapveil_cli("stats", "--store", store, "--format", "json").stdout)
    assert [r["group"] for r in folded["rows"]] == ["other"]
    table = imapveil_cli("stats", "--store", store, "--by", "version", "--min-users", "1")
    assert "Thunderbird 52.4.0" in table.stdout
    report, tables = tmp_path / "report.html", tmp_path / "tables"
    made = imapveil_cli("report", "--store", store, "--html", str(report), "--min-users", "1",
                        "--export", str(tables))  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert_renders(report, tmp_path)
    # The extensions each client used, as the proxy recorded them: every ID sent is one.
    used = json.loads((tables / "extensions.json").read_text(encoding="utf-8"))["rows"]
    assert {"Apple Mail", "Thunderbird", "Android Email"} <= {c for c, e, *_ in used if e == "ID"}
    assert [r[2:4] for r in used if r[:2] == ["Apple Mail", "ID"]] == [[2, 1.0]]


def assert_renders(report: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    assert chromium, "chromium is installed by scripts/check"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}"]  # fmt: skip
    dom = subprocess.run(
        [*flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert dom.stdout.count("<svg") == 8, dom.stderr[-2000:]  # the extensions' matrix too
    assert "Apple Mail" in dom.stdout
    shot = tmp_path / "report.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1000,2400", report.as_uri()],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000  # eight charts, not a blank page


def test_store_goes_away_and_comes_back(
    dovecot: Dovecot, tmp_path: Path, postgres: Postgres
) -> None:
    metrics_port = free_port()
    args = ("--store", postgres.url, "--metrics", f"127.0.0.1:{metrics_port}")
    with imapveil(tmp_path, dovecot.address, *args) as proxy:
        proxy.stderr_until(b"statistics store ready")
        session_with_id(proxy.port, "alice", "wonderland", b'a ID ("name" "Thunderbird")\r\n')
        assert http_get(metrics_port, "/healthz") == (b"HTTP/1.1 200 OK", b"ok\n")
        postgres.stop()
        # Relaying goes on while the store is down.
        for _ in range(3):
            session_with_id(proxy.port, "bob", "builder", b'b ID ("name" "NeoMutt")\r\n')
        proxy.stderr_until(b"statistics store")  # it noticed
        # A statistics outage must not take every proxy out of a load balancer's pool (they
        # share the store): healthy, and saying why the statistics wait.
        status, body = http_get(metrics_port, "/healthz")
        assert status == b"HTTP/1.1 200 OK"
        assert body.startswith(b"ok; statistics store away") and b"spool" in body
        assert "imapveil_store_up 0.0" in http_get(metrics_port, "/metrics")[1].decode()
        postgres.restart()
        proxy.stderr_until(b"statistics store ready")
        proxy.signal(signal.SIGTERM)
        assert proxy.stop() == 0
    stats = imapveil_cli("stats", "--store", postgres.url, "--format", "json", "--min-users", "1")
    data = json.loads(stats.stdout)
    assert data["sessions"] == 4  # nothing lost: queued while the store was away
    assert {r["group"]: r["sessions"] for r in data["rows"]} == {"Thunderbird": 1, "NeoMutt": 3}


def test_a_stop_while_the_store_is_down_loses_nothing(
    dovecot: Dovecot, tmp_path: Path, postgres: Postgres
) -> None:
    """SIGTERM while PostgreSQL is down: the rows wait in the spool (in the state directory,
    beside the user key) and reach the store exactly once after the next start."""
    args = ("--store", postgres.url, "--proxy-name", "gw-1")
    with imapveil(tmp_path, dovecot.address, *args) as proxy:
        proxy.stderr_until(b"statistics store ready")
        session_with_id(proxy.port, "alice", "wonderland", b'a ID ("name" "Thunderbird")\r\n')
        postgres.stop()
        for _ in range(3):
            session_with_id(proxy.port, "bob", "builder", b'b ID ("name" "NeoMutt")\r\n')
        assert proxy.stop() == 0
    assert b"spooled to" in proxy.stderr
    assert not [r for r in proxy.records() if r["event"] == "store_dropped"]
    assert list((tmp_path / "stats-spool" / "gw-1").glob("*.jsonl"))
    postgres.restart()
    with imapveil(tmp_path, dovecot.address, *args) as proxy:
        proxy.stderr_until(b"statistics spool replayed")
        session_with_id(proxy.port, "alice", "wonderland", None)
        assert proxy.stop() == 0
    assert not list((tmp_path / "stats-spool" / "gw-1").glob("*.jsonl"))
    rows = query(
        postgres.url, "SELECT proxy, family, COUNT(*) FROM sessions GROUP BY proxy, family"
    )
    assert sorted(rows) == [
        ("gw-1", "NeoMutt", 3),
        ("gw-1", "Thunderbird", 1),
        ("gw-1", "no ID", 1),
    ]
