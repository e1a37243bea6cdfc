"""Round 16: diagnostics into a stderr nobody reads.

Under systemd stderr is a stream socket to journald, and journald does stall (a full disk, an
fsync storm, its restart, `systemctl stop systemd-journald` with the socket still open); a
terminal can be paused (Ctrl-S), a container runtime's log pipe can stop being read. The rule
under attack: nothing a session waits for ever waits for stderr; one client costs only its own
session. Here stderr is a pipe (or a journald-like AF_UNIX stream socket) the test does not
read, made small and filled with reload lines (SIGHUP), and a logged-in client sends NOOP."""

from __future__ import annotations

import array
import fcntl
import http.client
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from imapveil.logs import FLUSH_WITHIN, StderrHandler
from tests.helpers.dovecot import Dovecot, free_port
from tests.helpers.process import complete_records, poll

PIPE_SIZE = 4096
"""The smallest pipe Linux makes (one page): a few reload lines fill it."""


def waiting(fd: int) -> int:
    """Octets written to the pipe or socket `fd` reads and not read yet (FIONREAD)."""
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return buf[0]


@dataclass
class Proxy:
    process: subprocess.Popen[bytes]
    port: int
    events: Path
    reader: int  # our end of its stderr, read only when the test says so
    metrics: int
    journal: bool

    def scrape(self) -> str:
        connection = http.client.HTTPConnection("127.0.0.1", self.metrics, timeout=2)
        try:
            connection.request("GET", "/metrics")
            return connection.getresponse().read().decode()
        finally:
            connection.close()

    def stderr_until(self, marker: bytes, within: float = 5.0) -> bytes:
        seen = b""
        deadline = time.monotonic() + within
        while marker not in seen:
            assert time.monotonic() < deadline, seen.decode()
            assert poll(lambda: waiting(self.reader) > 0 or self.process.poll() is not None, 5)
            chunk = os.read(self.reader, 65536)
            assert chunk, seen.decode()
            seen += chunk
        return seen

    def drain(self) -> bytes:
        """Everything said until the process exits (read in a thread, as a reader coming back)."""
        chunks: list[bytes] = []

        def read() -> None:
            while chunk := os.read(self.reader, 65536):
                chunks.append(chunk)

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=10) == 0
        thread.join(5)
        return b"".join(chunks)

    def reloads_done(self) -> int:
        return (
            sum(1 for r in complete_records(self.events) if r["event"] == "policy" and r["ok"]) - 1
        )  # the start's


@contextmanager
def serving(tmp_path: Path, upstream: tuple[str, int], *, journal: bool) -> Iterator[Proxy]:
    """`imapveil serve`, stderr to a small pipe (`journal` False) or to an AF_UNIX stream
    socket with a small send buffer, named in JOURNAL_STREAM as systemd names journald's."""
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    if journal:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PIPE_SIZE)
        st = os.fstat(theirs.fileno())
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        reader, writer = os.dup(ours.fileno()), os.dup(theirs.fileno())
        ours.close()
        theirs.close()
    else:
        reader, writer = os.pipe()
        fcntl.fcntl(writer, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    port, metrics = free_port(), free_port()
    events = tmp_path / "events.jsonl"
    command = [
        sys.executable, "-m", "imapveil", "serve",
        "--listen", f"127.0.0.1:{port}",
        "--upstream", f"127.0.0.1:{upstream[1]}",
        "--events", str(events),
        "--user-key-file", str(tmp_path / "user-key"),
        "--shutdown-grace", "0.5",
        "--metrics", f"127.0.0.1:{metrics}",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=writer, env=env)
    os.close(writer)
    proxy = Proxy(process, port, events, reader, metrics, journal)
    try:
        proxy.stderr_until(b"listening on")
        yield proxy
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        os.close(reader)


class Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.file = self.sock.makefile("rb")
        assert self.file.readline().startswith(b"* OK")
        self.ask(b"l", b"LOGIN alice wonderland")

    def ask(self, tag: bytes, command: bytes) -> bytes:
        self.sock.sendall(tag + b" " + command + b"\r\n")
        while True:
            line = self.file.readline()
            assert line
            if line.startswith(tag + b" "):
                return line

    def close(self) -> None:
        self.file.close()
        self.sock.close()  # twice is harmless


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    opened: list[Client] = []
    yield opened
    for client in opened:
        client.close()


def fill(proxy: Proxy) -> int:
    """SIGHUP until stderr takes no more; the number of SIGHUPs sent. Full: a reload's line did
    not arrive within 0.3 s, twice in a row, and (a pipe, where a line is written whole or not
    at all) less room is left than two lines take. A reload slow on a loaded machine is no
    reason to stop."""
    quiet = 0
    for sent in range(1, 400):
        before = waiting(proxy.reader)
        proxy.process.send_signal(signal.SIGHUP)
        if poll(lambda: waiting(proxy.reader) > before, 0.3):  # noqa: B023 (called here)
            quiet = 0
            continue
        quiet += 1
        if quiet >= 2 and (proxy.journal or PIPE_SIZE - waiting(proxy.reader) < 200):
            return sent
    raise AssertionError("stderr never filled")


def answered_within(client: Client, within: float) -> float | None:
    """Seconds a NOOP took, or None if it was not answered within `within`."""
    client.sock.settimeout(within)
    start = time.perf_counter()
    try:
        line = client.ask(b"n", b"NOOP")
    except TimeoutError:
        return None
    finally:
        client.sock.settimeout(5)
    assert line.startswith(b"n OK"), line
    return time.perf_counter() - start


@pytest.mark.dovecot
@pytest.mark.parametrize("journal", [False, True], ids=["pipe", "journald socket"])
def test_a_stderr_nobody_reads_does_not_freeze_the_sessions(
    dovecot: Dovecot, tmp_path: Path, clients: list[Client], journal: bool
) -> None:
    """Found: logging's StreamHandler wrote to stderr from the event loop, blocking: once the
    pipe (or journald's socket) was full, the next diagnostic line stopped every session, and
    a logged-in client's NOOP was never answered. Now the lines go through a writer thread:
    the NOOP is answered, reloads go on, and once stderr is read again every line is there,
    in order (the buffer was not exceeded: nothing dropped)."""
    with serving(tmp_path, dovecot.address, journal=journal) as proxy:
        client = Client(proxy.port)
        clients.append(client)
        fill(proxy)
        took = answered_within(client, 1.5)
        assert took is not None, "a NOOP was not answered while stderr was full"
        # Held, not dropped (the buffer is far from full): the metric says none lost.
        assert "imapveil_diagnostics_dropped_total 0.0" in proxy.scrape()
        # The reloads go on (they are said in the event log) while stderr takes nothing.
        done = proxy.reloads_done()
        proxy.process.send_signal(signal.SIGHUP)
        assert poll(lambda: proxy.reloads_done() > done, 2.0)
        assert answered_within(client, 1.5) is not None
        client.ask(b"z", b"LOGOUT")
        client.close()
        said = proxy.drain()
    reloaded = [line for line in said.split(b"\n") if b"imapveil: reloaded;" in line]
    assert len(reloaded) == proxy.reloads_done()
    assert b"dropped" not in said
    if journal:
        assert all(line.startswith(b"<6>imapveil: reloaded;") for line in reloaded)
    # In order: received SIGTERM after the last reload, stopped last.
    assert said.index(b"received SIGTERM") > said.rindex(b"reloaded;")
    assert said.rstrip().endswith(b"sessions") and b"stopped after" in said


@pytest.mark.dovecot
def test_a_stop_with_stderr_full_exits_in_bounded_time(dovecot: Dovecot, tmp_path: Path) -> None:
    """Found with the freeze: a SIGTERM's own line (`received SIGTERM`) blocked the loop, and
    `systemctl stop` waited out its timeout for a SIGKILL. Now the stop goes on, what is held
    gets `FLUSH_WITHIN` seconds at exit, and the process exits 0 with stderr still unread."""
    with serving(tmp_path, dovecot.address, journal=False) as proxy:
        fill(proxy)
        start = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        assert poll(lambda: proxy.process.poll() is not None, FLUSH_WITHIN + 2.0), "stop hung"
        assert proxy.process.returncode == 0
        assert time.monotonic() - start >= FLUSH_WITHIN  # stderr had its time
        said = b""
        while waiting(proxy.reader):
            said += os.read(proxy.reader, 65536)
    assert b"received SIGTERM" not in said  # held, never taken: the pipe was full


def test_a_start_that_fails_still_says_why(tmp_path: Path) -> None:
    """What goes wrong before the service serves is said before it exits: a configuration
    error at once (before the event loop), a listener it cannot open through the writer thread,
    taken before exit."""
    bad = subprocess.run(
        [sys.executable, "-m", "imapveil", "serve", "--listen", "127.0.0.1:1", "--upstream",
         "127.0.0.1:143", "--events", str(tmp_path / "e.jsonl"), "--shutdown-grace", "x"],
        capture_output=True, timeout=10, check=False,
    )  # fmt: skip
    assert bad.returncode in (2, 78) and b"shutdown" in bad.stderr, bad.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = subprocess.run(
            [sys.executable, "-m", "imapveil", "serve", "--listen", f"127.0.0.1:{port}",
             "--upstream", "127.0.0.1:143", "--events", str(tmp_path / "e.jsonl"),
             "--user-key-file", str(tmp_path / "user-key")],
            capture_output=True, timeout=10, check=False,
        )  # fmt: skip
    assert busy.returncode == 1
    assert b"cannot listen on 127.0.0.1:%d" % port in busy.stderr, busy.stderr


# --- The handler itself, on a pipe this test reads when it chooses.


@contextmanager
def handler_on_pipe(capacity: int) -> Iterator[tuple[StderrHandler, logging.Logger, int]]:
    reader, writer = os.pipe()
    fcntl.fcntl(writer, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    stream = open(writer, "w", encoding="utf-8")  # noqa: SIM115 (closed below)
    handler = StderrHandler(stream, capacity=capacity)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(f"imapveil.test.stderr.{time.monotonic_ns()}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler, logger, reader
    finally:
        logger.removeHandler(handler)
        os.close(reader)  # a write still waiting ends (EPIPE)
        handler.close()
        stream.close()


def read_until(reader: int, marker: bytes, within: float = 2.0) -> bytes:
    seen = b""
    deadline = time.monotonic() + within
    while marker not in seen:
        assert time.monotonic() < deadline, seen[-500:]
        if poll(lambda: waiting(reader) > 0, deadline - time.monotonic()):
            seen += os.read(reader, 65536)
    return seen


def test_lines_beyond_the_buffer_are_dropped_counted_and_said_once() -> None:
    """Nobody reads: the pipe takes what it holds, the handler holds `capacity` characters
    more, and the rest is dropped without the logging call waiting. Once read again, the lines
    kept come in order, and in each gap one warning says how many lines it lost: the numbers
    add up, and what came after the last gap follows its warning."""
    with handler_on_pipe(capacity=2000) as (handler, logger, reader):
        handler.start()
        start = time.perf_counter()
        for n in range(3000):
            logger.info("line %05d", n)
        assert time.perf_counter() - start < 1.0  # never waited for the pipe
        assert handler.dropped > 0
        dropped = handler.dropped
        said = b""
        while not handler.drain(0.01):  # until the last gap's warning is written
            said += os.read(reader, 65536) if waiting(reader) else b""
        logger.info("after")
        said += read_until(reader, b"after\n")
    expected, warned = 0, 0
    lines = said.decode().splitlines()
    for line in lines[:-1]:
        if line.startswith("WARNING "):
            assert line.endswith(" diagnostic lines dropped: stderr was not being read")
            lost = int(line.split()[1])
            expected += lost
            warned += lost
        else:
            assert line == f"INFO line {expected:05d}", (line, expected)  # in order
            expected += 1
    assert expected == 3000  # every line kept or said lost
    assert warned == dropped == handler.dropped  # the warnings themselves were not lost
    assert lines[-2].startswith("WARNING") and lines[-1] == "INFO after"


def test_a_traceback_with_room_is_whole_and_in_place() -> None:
    with handler_on_pipe(capacity=100_000) as (handler, logger, reader):
        handler.start()
        logger.info("before")
        try:
            raise ValueError("the reason")
        except ValueError:
            logger.exception("it failed")
        logger.info("after")
        said = read_until(reader, b"after\n").decode()
    assert said.startswith("INFO before\nERROR it failed\nTraceback (most recent call last):\n")
    assert said.endswith("ValueError: the reason\nINFO after\n")


def test_at_once_before_start_and_after_a_stop_that_emptied_it() -> None:
    stream = io.StringIO()
    handler = StderrHandler(stream)
    record = logging.LogRecord("imapveil", logging.INFO, __file__, 0, "one", (), None)
    handler.handle(record)
    assert stream.getvalue() == "one\n"  # no thread: written before handle() returned
    handler.start()
    handler.handle(record)
    assert handler.stop(1.0)
    assert stream.getvalue() == "one\none\n"
    handler.handle(record)
    assert stream.getvalue() == "one\none\none\n"
    handler.close()


def test_a_flush_into_a_full_pipe_gives_up_in_time() -> None:
    """At exit, a stderr that takes nothing gets `within` seconds, once: a second flush (the
    interpreter's, logging.shutdown) does not wait again."""
    with handler_on_pipe(capacity=100_000) as (handler, logger, reader):
        handler.start()
        for n in range(1000):
            logger.info("line %05d", n)
        start = time.monotonic()
        assert not handler.stop(0.3)
        assert 0.3 <= time.monotonic() - start < 1.0
        start = time.monotonic()
        assert not handler.drain(5.0)
        assert time.monotonic() - start < 0.1
        assert waiting(reader) > 0
