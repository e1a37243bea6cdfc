"""`imapveil serve` as an administrator runs it: a real process, a config file, a real Dovecot."""

from __future__ import annotations

import imaplib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.dovecot import Dovecot, free_port
from tests.helpers.process import stderr_until, wait_until_listening

pytestmark = pytest.mark.dovecot


def test_serve_with_config_file_events_and_sigterm(dovecot: Dovecot, tmp_path: Path) -> None:
    port = free_port()
    events = tmp_path / "events.jsonl"
    (tmp_path / "state").mkdir()  # an explicitly configured directory must exist
    config = tmp_path / "imapveil.toml"
    config.write_text(
        f'listen = "127.0.0.1:{port}"\n'
        'upstream = "127.0.0.1:1"\n'  # overridden by the flag below
        f'events = "{events}"\n'
        f'user_key_file = "{tmp_path / "state" / "user-key"}"\n'
        "shutdown_grace = 0.5\n"
    )
    upstream = f"127.0.0.1:{dovecot.port}"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "imapveil",
            "serve",
            "--config",
            str(config),
            "--upstream",
            upstream,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        early = wait_until_listening(process)
        m = imaplib.IMAP4("127.0.0.1", port)
        m.login("alice", "wonderland")
        m.select("INBOX")
        m.logout()

        # A session that is still open when the proxy is told to stop hears why.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s, s.makefile("rb") as f:
            assert f.readline().startswith(b"* OK")
            s.sendall(b"a LOGIN bob builder\r\n")
            assert f.readline().startswith(b"a OK")
            process.send_signal(signal.SIGTERM)
            assert f.readline() == b"* BYE [UNAVAILABLE] Server shutting down\r\n"
            assert f.read() == b""
        stdout, stderr = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr.decode()
    assert stdout == b""  # records went to the file
    assert b"Traceback" not in early + stderr
    records = [json.loads(line) for line in events.read_text().splitlines()]
    starts = [r["session"] for r in records if r["event"] == "session_start"]
    ends = sorted(
        (r for r in records if r["event"] == "session_end"),
        key=lambda r: starts.index(r["session"]),
    )
    assert len(starts) == len(ends) == 2
    assert [e["reason"] for e in ends] == ["logout", "shutdown"]
    assert ends[0]["user"].startswith("hmac:")
    assert ends[0]["upstream"] == upstream
    key = tmp_path / "state" / "user-key"
    assert key.stat().st_mode & 0o777 == 0o600
    text = events.read_text()
    for secret in ("wonderland", "builder", "alice", "bob"):
        assert secret not in text


def test_bad_config_is_refused_at_start(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('upstream = "127.0.0.1:143"\nidle_timout = 5\n')
    result = subprocess.run(
        [sys.executable, "-m", "imapveil", "serve", "--config", str(config)],
        capture_output=True,
        check=False,
        timeout=30,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert result.returncode == 1  # a configuration error: as from check-config
    assert result.stderr.decode() == f"imapveil: {config}: unknown setting 'idle_timout'\n"


def id_session(port: int, command: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s, s.makefile("rb") as f:
        f.readline()
        s.sendall(command + b"Z LOGOUT\r\n")
        return f.read()


def test_sighup_reloads_the_policy_and_refuses_a_broken_one(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    port = free_port()
    events = tmp_path / "events.jsonl"
    policy = tmp_path / "mine.toml"
    policy.write_text((Path(__file__).parents[1] / "policies" / "default.toml").read_text())
    process = subprocess.Popen(
        [
            sys.executable, "-m", "imapveil", "serve",
            "--listen", f"127.0.0.1:{port}",
            "--upstream", f"127.0.0.1:{dovecot.port}",
            "--events", str(events),
            "--user-key-file", str(tmp_path / "user-key"),
            "--policy", str(policy),
            "--shutdown-grace", "0.5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        wait_until_listening(process)
        id_session(port, b'a ID ("name" "Mail" "x-device" "Pixel")\r\n')

        policy.write_text(
            policy.read_text().replace('fields = ["name", ', 'fields = ["x-device", "name", ')
        )
        process.send_signal(signal.SIGHUP)
        assert b"reloaded" in stderr_until(process, b" imapveil: reload")
        id_session(port, b'b ID ("name" "Mail" "x-device" "Pixel")\r\n')

        policy.write_text("this is not = = toml")
        process.send_signal(signal.SIGHUP)
        assert b"reload refused" in stderr_until(process, b" imapveil: reload")
        id_session(port, b'c ID ("name" "Mail" "x-device" "Pixel")\r\n')
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0
    records = [json.loads(line) for line in events.read_text().splitlines()]
    loads = [(r["ok"], r["error"] is not None) for r in records if r["event"] == "policy"]
    assert loads == [(True, False), (True, False), (False, True)]
    ids = {r["tag"]: r for r in records if r["event"] == "id"}
    assert ids["a"]["dropped"] == ["x-device"]
    assert ids["b"]["dropped"] == [] and ids["b"]["client"]["x-device"] == "Pixel"
    assert ids["c"]["dropped"] == []  # the broken file was refused; the reloaded policy stays
    assert ids["a"]["policy_digest"] != ids["b"]["policy_digest"] == ids["c"]["policy_digest"]


def test_policy_tool(tmp_path: Path) -> None:
    def imapveil(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "imapveil", *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )

    ok = imapveil("policy", "check", "default", "strict", "passthrough")
    assert ok.returncode == 0 and ok.stdout.count(": ok (") == 3
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nfields = ["name"]\nforward = "hash"\n')
    broken = imapveil("policy", "check", str(bad))
    assert broken.returncode == 1
    assert f"{bad}: rule[0].forward: expected one of" in broken.stderr
    shown = imapveil(
        "policy", "test", "default", 'ID ("name" "K-9 Mail" "x-originating-ip" "10.1.2.3")'
    )
    assert shown.returncode == 0
    assert 'forwarded: ID ("name" "K-9 Mail" "x-imapveil"' in shown.stdout
    assert "x-originating-ip" in shown.stdout and "by anti-spoof" in shown.stdout
