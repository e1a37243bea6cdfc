"""Operating imapveil: systemd notify and socket activation, reloads, PROXY protocol, limits.

Each test runs the real `imapveil serve` process."""

from __future__ import annotations

import imaplib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from imapveil.protocol.proxy_header import build_v2
from tests.helpers.dovecot import Dovecot
from tests.helpers.process import imapveil, socket_activated

pytestmark = pytest.mark.dovecot
REPO = Path(__file__).resolve().parents[1]


def notifications(sock: socket.socket, until: str) -> list[str]:
    """sd_notify datagrams, watchdog pings left out, up to and including one containing `until`."""
    seen = []
    while True:
        message = sock.recv(4096).decode()
        if message == "WATCHDOG=1":
            continue
        seen.append(message)
        if until in message:
            return seen


def test_sd_notify_ready_reload_watchdog_stopping(
    dovecot: Dovecot, tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}
    with imapveil(tmp_path, dovecot.address, env=env) as proxy:
        ready = notifications(sock, "READY=1")
        assert ready[-1].startswith("READY=1\nSTATUS=relaying 127.0.0.1:")
        # Pings at half the watchdog interval.
        assert sock.recv(4096) == b"WATCHDOG=1"
        proxy.signal(signal.SIGHUP)
        reload = notifications(sock, "READY=1")
        assert re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=\d+", reload[0])
        assert reload[-1] == "READY=1"
        proxy.signal(signal.SIGTERM)
        assert notifications(sock, "STOPPING=1")[-1] == "STOPPING=1"
        assert proxy.stop() == 0


def test_socket_activation(dovecot: Dovecot, tmp_path: Path) -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        fd = listening.fileno()
        # What systemd does: the socket as fd 3, and LISTEN_PID set to the service's own pid.
        with imapveil(tmp_path, dovecot.address, wrap=socket_activated(fd), pass_fds=[fd]) as proxy:
            listening.close()  # only the proxy holds it now
            assert b"using the imap socket handed over by systemd" in proxy.early_stderr
            m = imaplib.IMAP4("127.0.0.1", port)
            m.login("alice", "wonderland")
            m.logout()
            assert proxy.stop() == 0
        ends = [r for r in proxy.records() if r["event"] == "session_end"]
        assert [e["reason"] for e in ends] == ["logout"]
        # Its own `listen` address was never bound.
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", proxy.port)) != 0


def test_session_survives_sighup_and_follows_the_new_policy(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text((REPO / "policies" / "default.toml").read_text())
    with imapveil(tmp_path, dovecot.address, "--policy", str(policy)) as proxy:
        with (
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s,
            s.makefile("rb") as f,
        ):
            f.readline()
            s.sendall(b'a LOGIN alice wonderland\r\nb ID ("name" "Mail" "x-device" "P")\r\n')
            while not f.readline().startswith(b"b OK"):
                pass
            policy.write_text(
                policy.read_text().replace('["name", "vendor"]', '["x-device", "name", "vendor"]')
            )
            proxy.signal(signal.SIGHUP)
            assert b"reloaded" in proxy.stderr_until(b" imapveil: reload")
            s.sendall(b'c ID ("name" "Mail" "x-device" "P")\r\nd NOOP\r\n')
            while not (line := f.readline()).startswith(b"d "):
                pass
            assert line.startswith(b"d OK")
            s.sendall(b"e LOGOUT\r\n")
            f.read()
        assert proxy.stop() == 0
    ids = {r["tag"]: r for r in proxy.records() if r["event"] == "id"}
    assert ids["b"]["dropped"] == ["x-device"]
    assert ids["c"]["dropped"] == []
    (end,) = [r for r in proxy.records() if r["event"] == "session_end"]
    assert end["reason"] == "logout"


def test_broken_config_on_reload_keeps_the_old_one(dovecot: Dovecot, tmp_path: Path) -> None:
    config = tmp_path / "imapveil.toml"
    config.write_text("max_sessions = 5\n")
    with imapveil(tmp_path, dovecot.address, "--config", str(config)) as proxy:
        config.write_text("max_sessions = -1\n")
        proxy.signal(signal.SIGHUP)
        assert b"reload refused" in proxy.stderr_until(b" imapveil: reload")
        m = imaplib.IMAP4("127.0.0.1", proxy.port)
        m.login("alice", "wonderland")
        m.logout()
        assert proxy.stop() == 0
    configs = [r for r in proxy.records() if r["event"] == "config"]
    assert [c["ok"] for c in configs] == [True, False]
    assert "max_sessions" in configs[1]["error"]


@pytest.fixture
def haproxy_dovecot() -> Iterator[Dovecot]:
    server = Dovecot(haproxy=True).start()
    try:
        yield server
    finally:
        server.cleanup()


def login_through(port: int, header: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s, s.makefile("rb") as f:
        s.sendall(header)
        greeting = f.readline()
        s.sendall(b"a LOGIN alice wonderland\r\nb LOGOUT\r\n")
        return greeting + f.read()


def test_proxy_protocol_in_and_out(haproxy_dovecot: Dovecot, tmp_path: Path) -> None:
    args = ("--proxy-protocol-from", "127.0.0.1/32", "--upstream-proxy-protocol", "true")
    with imapveil(tmp_path, haproxy_dovecot.address, *args) as proxy:
        v1 = login_through(proxy.port, b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 143\r\n")
        v2 = login_through(proxy.port, build_v2(("2001:db8::9", 40000), ("2001:db8::1", 143)))
        bad = login_through(proxy.port, b"PROXY TCP4 not an address\r\n")
        assert proxy.stop() == 0
    assert b"a OK" in v1 and b"a OK" in v2
    assert bad == b""  # closed without a word: a balancer, not a mail client, is talking
    ends = {r["client"]: r for r in proxy.records() if r["event"] == "session_end"}
    assert ends["192.0.2.7:51234"]["reason"] == "logout"
    assert ends["[2001:db8::9]:40000"]["reason"] == "logout"
    assert [e["reason"] for e in ends.values()].count("proxy_header") == 1
    # Dovecot saw the real clients, from our PROXY v2 header.
    log = haproxy_dovecot.wait_for_log("Login: user=<alice>", 2)
    assert "rip=192.0.2.7" in log and "rip=2001:db8::9" in log


def test_proxy_header_from_an_untrusted_source_is_refused(dovecot: Dovecot, tmp_path: Path) -> None:
    with imapveil(tmp_path, dovecot.address) as proxy:
        reply = login_through(proxy.port, b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 143\r\n")
        assert proxy.stop() == 0
    assert b"a OK" not in reply
    (end,) = [r for r in proxy.records() if r["event"] == "session_end"]
    assert end["reason"] == "proxy_header" and end["client"].startswith("127.0.0.1:")
    kinds = [r["kind"] for r in proxy.records() if r["event"] == "violation"]
    assert kinds == ["proxy_header_untrusted"]


def test_connection_limits(dovecot: Dovecot, tmp_path: Path) -> None:
    # Loopback is exempt from per-address limits: the client is 192.0.2.7, by a PROXY header.
    header = b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 143\r\n"
    args = ("--max-sessions-per-client", "1", "--proxy-protocol-from", "127.0.0.1/32")
    with imapveil(tmp_path, dovecot.address, *args) as proxy:
        with (
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as first,
            first.makefile("rb") as f,
        ):
            first.sendall(header)
            assert f.readline().startswith(b"* OK")
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as second:
                second.sendall(header)
                reply = second.makefile("rb").read()
            first.sendall(b"a LOGOUT\r\n")
            f.read()
        assert proxy.stop() == 0
    assert reply == b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n"
    reasons = sorted(r["reason"] for r in proxy.records() if r["event"] == "session_end")
    assert reasons == ["logout"]  # a refusal is no session, but an over_limit record
    (refused,) = [r for r in proxy.records() if r["event"] == "over_limit"]
    assert refused["client"] == "192.0.2.7" and refused["refused"] == 1
    assert refused["detail"] == "1 sessions from one address"


def test_units_verify_and_example_config_checks(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is installed by scripts/check"
    binary = shutil.which("imapveil") or sys.executable
    for unit in ("imapveil.service", "imapveil.socket", "imapveil-tls.socket"):
        text = (REPO / "systemd" / unit).read_text().replace("/usr/local/bin/imapveil", binary)
        (tmp_path / unit).write_text(text)
    result = subprocess.run(
        [analyze, "verify", *(str(p) for p in sorted(tmp_path.glob("imapveil*")))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    checked = subprocess.run(
        [sys.executable, "-m", "imapveil", "check-config", str(REPO / "systemd" / "imapveil.toml"),
         "--user-key-file", str(tmp_path / "key")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert "test is successful" in checked.stdout
    broken = tmp_path / "broken.toml"
    broken.write_text('upstream = "h:1"\nlisten = "nowhere"\n')
    failed = subprocess.run(
        [sys.executable, "-m", "imapveil", "check-config", str(broken)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert failed.returncode == 1
    assert f"{broken}: listen:" in failed.stderr and "test failed" in failed.stderr


@pytest.fixture
def trusting_dovecot() -> Iterator[Dovecot]:
    server = Dovecot(trusting=True).start()
    try:
        yield server
    finally:
        server.cleanup()


def test_client_address_in_id_for_a_trusting_dovecot(
    trusting_dovecot: Dovecot, tmp_path: Path
) -> None:
    args = ("--proxy-protocol-from", "127.0.0.1/32", "--forward-client-address", "true")
    with imapveil(tmp_path, trusting_dovecot.address, *args) as proxy:
        reply = login_through(proxy.port, b"PROXY TCP4 203.0.113.5 198.51.100.1 40001 143\r\n")
        assert proxy.stop() == 0
    assert b"a OK" in reply
    assert b"* ID" not in reply  # the answer to our own ID is not the client's business
    log = trusting_dovecot.wait_for_log("Login: user=<alice>", 1)
    assert "rip=203.0.113.5" in log
    (rec,) = [r for r in proxy.records() if r["event"] == "id"]
    assert rec["injected"] and rec["client"] == {}
    assert "x-originating-ip" in rec["forwarded"]


def test_a_signal_during_the_final_flush_does_not_cut_it_short(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    # Once the service has stopped serving it writes its last records (the store's queue, the
    # event log). A second SIGTERM then (a repeated `systemctl stop`) used to find the default
    # action back and end the process with -15, records unwritten.
    with imapveil(tmp_path, dovecot.address) as proxy:
        m = imaplib.IMAP4("127.0.0.1", proxy.port)
        m.login("alice", "wonderland")
        m.logout()
        proxy.signal(signal.SIGTERM)
        proxy.stderr_until(b"stopped after")
        proxy.signal(signal.SIGTERM)
        proxy.signal(signal.SIGINT)
        assert proxy.stop() == 0
    ends = [r for r in proxy.records() if r["event"] == "session_end"]
    assert [e["reason"] for e in ends] == ["logout"]
