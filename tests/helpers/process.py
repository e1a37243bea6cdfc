"""`imapveil serve` as a real process, as systemd or an administrator would run it."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from tests.helpers.dovecot import free_port


@dataclass
class Running:
    process: subprocess.Popen[bytes]
    port: int
    events: Path
    early_stderr: bytes = b""
    stderr: bytes = field(default=b"")

    def stderr_until(self, marker: bytes) -> bytes:
        return stderr_until(self.process, marker)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        _, err = self.process.communicate(timeout=20)
        self.stderr = self.early_stderr + err
        return self.process.returncode

    def records(self) -> list[dict[str, Any]]:
        return complete_records(self.events)


def complete_records(path: Path) -> list[dict[str, Any]]:
    """The records of the event log's complete lines. The proxy may be writing while a test
    reads: a line not ended yet (a batch's write seen half done) is left for the next read,
    as a log shipper following the file would."""
    done = path.read_bytes().rpartition(b"\n")[0]
    return [json.loads(line) for line in done.split(b"\n")] if done else []


def read_log(path: Path) -> tuple[list[dict[str, Any]], list[bytes]]:
    """(the records, the lines that are not one): every line ends with a newline but a last
    fragment."""
    lines = path.read_bytes().split(b"\n")
    records, other = [], []
    for line in lines[:-1]:
        try:
            records.append(json.loads(line))
        except ValueError:
            other.append(line)
    if lines[-1]:
        other.append(lines[-1])
    return records, other


def stderr_until(process: subprocess.Popen[bytes], marker: bytes) -> bytes:
    """The process's diagnostics, read up to the first line containing `marker`."""
    assert process.stderr is not None
    seen = b""
    while marker not in seen:
        line = process.stderr.readline()
        assert line, seen.decode()
        seen += line
    return seen


def poll(check: Callable[[], bool], within: float) -> bool:
    """Whether `check` comes true within `within` seconds (asked every 5 ms, and at the end)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.005)
    return check()


def wait_until_listening(process: subprocess.Popen[bytes]) -> bytes:
    """Read diagnostics until the proxy says it listens (no probe connection needed)."""
    return stderr_until(process, b"listening on")


def socket_activated(fd: int) -> list[str]:
    """A `wrap` for `imapveil` that does what systemd does for a socket-activated service: the
    listening socket `fd` (pass it in `pass_fds`) as descriptor 3, LISTEN_PID the service's own
    pid, LISTEN_FDS and LISTEN_FDNAMES saying what it is."""
    return [
        sys.executable,
        "-c",
        "import os, sys\n"
        f"os.dup2({fd}, 3)\nos.close({fd})\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1',"
        " LISTEN_FDNAMES='imap')\n"
        "os.execv(sys.argv[1], sys.argv[1:])",
    ]


@contextmanager
def imapveil(
    tmp_path: Path,
    upstream: tuple[str, int],
    *args: str,
    env: dict[str, str] | None = None,
    wrap: Sequence[str] = (),
    pass_fds: Sequence[int] = (),
    port: int | None = None,
) -> Iterator[Running]:
    port = port or free_port()
    events = tmp_path / f"events-{port}.jsonl"
    command = [
        *wrap,
        sys.executable, "-m", "imapveil", "serve",
        "--listen", f"127.0.0.1:{port}",
        "--upstream", f"127.0.0.1:{upstream[1]}",
        "--events", str(events),
        "--user-key-file", str(tmp_path / "user-key"),
        "--shutdown-grace", "0.5",
        *args,
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        pass_fds=tuple(pass_fds),
    )
    try:
        running = Running(process, port, events, wait_until_listening(process))
        yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


# --- The service in this process (for tests that patch something inside it).


def service_overrides(upstream: tuple[str, int], port: int, state: Path) -> dict[str, Any]:
    """What `imapveil serve` flags would set for an in-process `Service`: `upstream`, a
    listener on `port`, the event log and user key under `state`."""
    return {
        "upstream": f"{upstream[0]}:{upstream[1]}",
        "listen": f"127.0.0.1:{port}",
        "events": str(state / "events.jsonl"),
        "user_key_file": str(state / "user-key"),
    }


@contextmanager
def signal_handlers_restored() -> Iterator[None]:
    """`Service.run` installs handlers for SIGTERM, SIGINT and SIGHUP; the test's are put back."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def datagrams_waiting(sock: socket.socket) -> list[str]:
    """The first line of each datagram waiting on a notify socket now (none more are read)."""
    sock.setblocking(False)
    seen = []
    with contextlib.suppress(BlockingIOError):
        while True:
            seen.append(sock.recv(4096).decode().split("\n")[0])
    return seen


async def connect_until_listening(port: int) -> trio.SocketStream:
    """A connection to a proxy process on loopback, retried until it listens."""
    while True:
        try:
            return await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            await trio.sleep(0.01)


async def ask(stream: trio.SocketStream, tag: bytes, command: bytes) -> float:
    """Seconds until the tagged OK of `command`."""
    began = trio.current_time()
    await stream.send_all(tag + b" " + command + b"\r\n")
    received = b""
    while b"\r\n" + tag + b" OK" not in b"\r\n" + received:
        chunk = await stream.receive_some(65536)
        assert chunk, received
        received += chunk
    return trio.current_time() - began
