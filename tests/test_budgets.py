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
import ipaddress
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from imapveil.config import ConfigError, load
from imapveil.records import IdExchange, SessionEnded, SessionStarted
from imapveil.relay.limits import OTHERS, Admission, Limits, Refusals
from imapveil.stats.report import safe
from imapveil.stats.sink import StoreSink
from tests.helpers.dovecot import Dovecot
from tests.helpers.process import imapveil

BYE_OVER_LIMIT = b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n"
USER, PASSWORD = "alice", "wonderland"


# --- limits, pure -------------------------------------------------------------------------------


def test_exempt_and_loopback_addresses_are_never_rate_limited() -> None:
    office = ipaddress.ip_network("198.51.100.0/24")
    limits = Limits(
        max_sessions=10_000,
        max_sessions_per_client=1,
        max_connection_rate=1,
        exempt=(office,),
        burst_seconds=1,
    )
    gate = Admission(limits)
    for host in ("127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1", "198.51.100.7"):
        for _ in range(2000):  # at one instant, all kept open
            assert gate.admit(host, 0.0) is None, host
    assert gate.active == 10_000 - 0  # everything counted toward max_sessions...
    assert gate.admit("198.51.100.8", 0.0) == "10000 sessions in all"  # ...which still applies
    assert not gate._per_address and not gate._buckets  # exempt ones leave no per-address state
    for host in ("127.0.0.1", "::1"):
        gate.release(host)
    # Anyone else: one session (max_sessions_per_client), one new connection per second.
    assert gate.admit("192.0.2.7", 0.0) is None
    assert gate.admit("192.0.2.7", 0.0) == "1 sessions from one address"
    gate.release("192.0.2.7")
    assert gate.admit("192.0.2.7", 0.1) == (
        "more than 1 new connections per second from one address"
    )
    # The same client seen on a dual-stack listener (IPv4-mapped): the same bucket.
    assert gate.admit("::ffff:192.0.2.7", 0.1) == (
        "more than 1 new connections per second from one address"
    )
    assert gate.admit("::ffff:192.0.2.8", 0.1) is None  # another address: its own bucket
    assert gate.admit("not an address", 0.1) is None
    assert gate.admit("not an address", 0.1) is not None


def test_the_default_rate_admits_a_reconnect_storm_from_one_address() -> None:
    """300 people behind one NAT address, each with a desktop client and a phone that open up
    to five connections at once: 3000 connections in the same instant are admitted; a client
    that goes on reconnecting in a loop is then held to 100 a second."""
    limits = Limits(max_sessions_per_client=100_000)
    assert limits.max_connection_rate == 100 and limits.burst == 3000
    gate = Admission(limits)
    assert all(gate.admit("203.0.113.9", 0.0) is None for _ in range(3000))
    assert gate.admit("203.0.113.9", 0.0) is not None
    admitted = sum(gate.admit("203.0.113.9", i / 1000) is None for i in range(1, 10_001))
    assert 990 <= admitted <= 1010  # ten seconds of reconnecting: about 100 a second


def test_refusals_are_reported_first_then_once_per_interval() -> None:
    tally = Refusals(interval=60.0, capacity=3)
    first = tally.note("192.0.2.7", "why", 0.0)
    assert first is not None and first.first and first.count == 1
    assert "refused a connection from 192.0.2.7: why" in first.describe()
    for i in range(1, 1000):
        assert tally.note("192.0.2.7", "why now", i / 100) is None
    assert tally.due(59.0) == []  # within the interval: nothing
    (summary,) = tally.due(60.0)
    assert (summary.address, summary.count, summary.why, summary.seconds) == (
        "192.0.2.7",
        999,
        "why now",
        60.0,
    )
    assert summary.describe() == "refused 999 connections from 192.0.2.7 in the last 60 s: why now"
    assert tally.due(119.0) == []
    assert tally.due(120.0) == [] and len(tally) == 0  # a quiet interval: forgotten
    # Bounded: past `capacity` addresses, the others are counted together.
    for i in range(10):
        tally.note(f"192.0.2.{i}", "why", 200.0)
        tally.note(f"192.0.2.{i}", "why", 200.0)
    assert len(tally) == 4  # three addresses and "other addresses"
    final = {s.address: s.count for s in tally.due(201.0, final=True)}
    assert final == {"192.0.2.0": 1, "192.0.2.1": 1, "192.0.2.2": 1, OTHERS: 13}
    assert len(tally) == 0


# --- settings -----------------------------------------------------------------------------------


def test_login_deadline_and_limits_exempt_settings(tmp_path: Path) -> None:
    defaults = load(None, {"upstream": "h:1"})
    assert defaults.login_deadline == 180.0 and defaults.limits_exempt == ()
    assert defaults.max_connection_rate == 100.0
    flags = load(
        None, {"upstream": "h:1", "login_deadline": "0", "limits_exempt": "10.0.0.0/8, ::1"}
    )
    assert flags.login_deadline == 0.0 and flags.limits_exempt == ("10.0.0.0/8", "::1")
    conf = tmp_path / "c.toml"
    conf.write_text('upstream = "h:1"\nlogin_deadline = 30\nlimits_exempt = ["192.0.2.0/24"]\n')
    assert load(conf, {}).login_deadline == 30.0
    for key, bad, message in [
        ("login_deadline", "-1", "at least 0"),
        ("login_deadline", "nan", "at least 0"),
        ("login_deadline", "inf", "at least 0"),
        ("limits_exempt", "10.0.0.300/8", "limits_exempt"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load(None, {"upstream": "h:1", key: bad})
    conf.write_text('upstream = "h:1"\nlogin_deadline = "soon"\n')
    with pytest.raises(ConfigError, match="login_deadline"):
        load(conf, {})


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


class _FromAddress(imaplib.IMAP4):
    """imaplib from a chosen local address (127.0.0.2: loopback, but not 127.0.0.1)."""

    def __init__(self, source: str, port: int) -> None:
        self._source = source
        super().__init__("127.0.0.1", port, timeout=10)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self._source, 0)
        )


def _through_balancer(port: int, source: str, then: bytes = b"") -> bytes:
    """Connect as a client `source` behind a balancer (a PROXY v1 header), send `then`, and
    read everything until the proxy closes."""
    header = f"PROXY TCP4 {source} 198.51.100.1 40000 143\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(header + then)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
            if not then and data.endswith(b"\r\n"):
                break  # admitted: the greeting is all it wanted; a refusal ends with EOF
        return data


@pytest.mark.dovecot
def test_a_reconnect_flood_is_summarised_and_others_still_log_in(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    args = (
        "--proxy-protocol-from", "127.0.0.1/32",
        "--max-connection-rate", "0.1",  # a burst of 3, then one every ten seconds
        "--limits-exempt", "198.51.100.0/24",
    )  # fmt: skip
    login = b"a LOGIN alice wonderland\r\nb LOGOUT\r\n"
    with imapveil(tmp_path, dovecot.address, *args) as proxy:
        replies = []
        for i in range(300):
            replies.append(_through_balancer(proxy.port, "192.0.2.7"))
            if i == 150:  # during the flood: an exempt network behind the balancer...
                assert b"a OK" in _through_balancer(proxy.port, "198.51.100.20", login)
                m = _FromAddress("127.0.0.2", proxy.port)  # ...and loopback, directly
                m.login(USER, PASSWORD)
                m.logout()
        assert proxy.stop() == 0
    refused = replies.count(BYE_OVER_LIMIT)
    admitted = sum(r.startswith(b"* OK") for r in replies)
    assert admitted + refused == 300 and 3 <= admitted <= 5
    records = proxy.records()
    summaries = [r for r in records if r["event"] == "over_limit"]
    assert 1 <= len(summaries) <= 3
    assert {r["client"] for r in summaries} == {"192.0.2.7"}
    assert sum(r["refused"] for r in summaries) == refused
    assert all(r["detail"].startswith("more than 0.1 new connections") for r in summaries)
    # One start and one end per admitted session (the flood's and the two normal logins), none
    # per refusal.
    assert len([r for r in records if r["event"] == "session_start"]) == admitted + 2
    ends = [r["reason"] for r in records if r["event"] == "session_end"]
    assert len(ends) == admitted + 2 and ends.count("logout") == 2
    lines = [line for line in proxy.stderr.splitlines() if b"refused" in line]
    assert 1 <= len(lines) <= 3, lines
    assert b"refused a connection from 192.0.2.7" in lines[0]
    assert re.search(rb"refused %d connections from 192\.0\.2\.7 in the last" % (refused - 1),
                     lines[-1])  # fmt: skip


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
            await sink.ready.wait()
        # Not flush(): it would write from a second task while run() does its first retention
        # purge, two threads on one SQLite connection. Stopping, run() writes what is queued.
        nursery.cancel_scope.cancel()
    assert sink.written == 6


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
            # Operating systems are named by the text before ";" or "(" (a device model may
            # follow), so the rest of the hostile name is not in that grouping at all.
            if fmt == "csv" and by != "os":
                assert b"\\x1b]0;owned\\x07\\x0d\\x0aThunderbird,99" in bad
                assert b"\\u202eeulav\\u2066x\\u2069\\x85\\x9b" in bad
    page = tmp_path / "report.html"
    _cli("report", "--store", str(hostile), "--min-users", "1", "--html", str(page))
    assert not UNSAFE_OCTETS.search(page.read_bytes())


def test_safe_escapes_only_what_is_unsafe() -> None:
    assert safe("Thunderbird 115.3 — Grüße, 日本") == "Thunderbird 115.3 — Grüße, 日本"
    assert safe("a\x1bb\x7f\x9b\u202e\u2069\u2028") == "a\\x1bb\\x7f\\x9b\\u202e\\u2069\\u2028"
