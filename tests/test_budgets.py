"""Issue 12: one client costs only its own session — the login deadline, limits that fit an
office, refusals summarised instead of logged one by one, and terminal-safe `imapveil stats`.

The attacks run against the real `imapveil serve` in front of the real Dovecot. Loopback is always
exempt from the per-address limits, so a flooding client is made a non-exempt one the way a load
balancer makes it: the test connects from 127.0.0.1, listed in `--proxy-protocol-from`, and
names a TEST-NET source (192.0.2.7) in a PROXY header. No traffic goes to that address.
"""

from __future__ import annotations

import contextlib
import imaplib
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from imapveil.records import IdExchange, SessionEnded, SessionStarted
from imapveil.stats.report import safe
from imapveil.stats.sink import StoreSink
from tests.helpers.dovecot import Dovecot
from tests.helpers.process import imapveil

USER, PASSWORD = "alice", "wonderland"


# --- against the real service and Dovecot -------------------------------------------------------


@pytest.mark.dovecot
def test_a_trickling_client_is_closed_at_the_login_deadline(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    args = ("--login-deadline", "2", "--login-timeout", "60")
    with imapveil(tmp_path, dovecot.address, *args) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as slow:
            started = time.monotonic()
            slow.settimeout(0.5)  # the attack's pacing: one octet every half second
            received, closed, logged_in = b"", False, False
            while time.monotonic() - started < 10:
                with contextlib.suppress(OSError):  # closed by the proxy: read its last words
                    slow.sendall(b"a")
                try:
                    chunk = slow.recv(4096)
                except TimeoutError:
                    chunk = None
                if chunk == b"":
                    closed = True
                    break
                received += chunk or b""
                if not logged_in and time.monotonic() - started > 1:
                    # Another connection, meanwhile, logs in as usual.
                    normal = imaplib.IMAP4("127.0.0.1", proxy.port, timeout=10)
                    normal.login(USER, PASSWORD)
                    normal.logout()
                    logged_in = True
            elapsed = time.monotonic() - started
        assert proxy.stop() == 0
    assert closed and logged_in
    assert 1.9 < elapsed < 10
    assert received.startswith(b"* OK") and received.endswith(b"* BYE Login time limit reached\r\n")
    ends = {r["reason"]: r for r in proxy.records() if r["event"] == "session_end"}
    assert sorted(ends) == ["login_timeout", "logout"]
    assert ends["login_timeout"]["user"] is None


# --- terminal-safe statistics -------------------------------------------------------------------

HOSTILE = "Mail\x1b[2J\x1b]0;owned\x07\r\nThunderbird,99,99,forged\u202eeulav\u2066x\u2069\x85\x9b"
UNSAFE_OCTETS = re.compile(
    rb"[\x00-\x09\x0b-\x1f\x7f]|\xc2[\x80-\x9f]|\xe2\x80[\xa8-\xae]|\xe2\x81[\xa6-\xa9]"
)  # UTF-8: C0 but the line feed ending a row, DEL, C1, U+2028-U+202E, U+2066-U+2069


async def _store_with(path: Path, name: str) -> None:
    sink = StoreSink(str(path), proxy="test")
    for i in range(3):
        sid = f"s{i}"
        sink.emit(SessionStarted(sid, "192.0.2.1:1", "u"))
        client: dict[str, str | None] = {"name": name, "version": name, "os": name}
        sink.emit(IdExchange(sid, "a", "authenticated", "OK", False, client, (), ("name",), None))
        ended = SessionEnded(sid, "192.0.2.1:1", "u", "logout", None, "logout", f"u{i}", 1, 1, 1, 1)
        sink.emit(ended)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        with trio.fail_after(10):
            await sink.flush()
        nursery.cancel_scope.cancel()


def _cli(*args: str) -> bytes:
    done = subprocess.run(
        [sys.executable, "-m", "imapveil", *args], capture_output=True, check=True, timeout=60
    )
    return done.stdout


async def test_stats_output_holds_no_control_octet(tmp_path: Path) -> None:
    hostile, plain = tmp_path / "hostile.sqlite", tmp_path / "plain.sqlite"
    await _store_with(hostile, HOSTILE)
    await _store_with(plain, "Mail")
    for by in ("family", "version", "os"):
        for fmt in ("table", "csv"):
            options = ("stats", "--by", by, "--format", fmt, "--min-users", "1")
            bad = _cli(*options, "--store", str(hostile))
            good = _cli(*options, "--store", str(plain))
            if fmt == "csv":  # CSV ends its rows with CRLF (RFC 4180): that CR is no content
                bad, good = bad.replace(b"\r\n", b"\n"), good.replace(b"\r\n", b"\n")
            assert not UNSAFE_OCTETS.search(bad), (by, fmt, bad)
            assert len(bad.splitlines()) == len(good.splitlines()), (by, fmt, bad)
            assert b"Mail\\x1b[2J" in bad  # shown, escaped (the table cuts long names)
            if fmt == "csv":
                assert b"\\x1b]0;owned\\x07\\x0d\\x0aThunderbird,99" in bad
                assert b"\\u202eeulav\\u2066x\\u2069\\x85\\x9b" in bad
    page = tmp_path / "report.html"
    _cli("report", "--store", str(hostile), "--min-users", "1", "--html", str(page))
    assert not UNSAFE_OCTETS.search(page.read_bytes())


def test_safe_escapes_only_what_is_unsafe() -> None:
    assert safe("Thunderbird 115.3 — Grüße, 日本") == "Thunderbird 115.3 — Grüße, 日本"
    assert safe("a\x1bb\x7f\x9b\u202e\u2069\u2028") == "a\\x1bb\\x7f\\x9b\\u202e\\u2069\\u2028"
