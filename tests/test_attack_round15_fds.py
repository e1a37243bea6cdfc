"""Attack round 15: file descriptors and connection slots, from outside.

A real `imapveil serve` (under `prlimit` for a low RLIMIT_NOFILE where the test says so) in front
of a real Dovecot, attacked with raw sockets on loopback: more connections than descriptors,
connections that say nothing or stop half-way through a TLS handshake or a PROXY header, and
connections reset at every stage. What must hold: no spinning, no crash, no log line per event a
client can cause, sessions already open keep working, the proxy recovers, and nothing leaks
(descriptors counted in /proc/PID/fd).

Nothing here asserts on time but the bounds a timeout sets (with generous margins); what is
asserted is counted.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from imapveil.relay.limits import Occurrences
from tests.conftest import TlsMaterial
from tests.helpers.dovecot import Dovecot, free_port
from tests.helpers.process import Running, imapveil

pytestmark = pytest.mark.dovecot

WAIT = 30.0
"""Seconds any one expected answer or state may take on a loaded machine."""


def limited(nofile: int) -> list[str]:
    return ["prlimit", f"--nofile={nofile}:{nofile}", "--"]


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def until(what: Callable[[], bool], message: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, message
        time.sleep(0.05)


def connect(port: int, host: str = "127.0.0.1", source: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection((host, port), timeout=WAIT, source_address=(source, 0))
    return s


def greeting(s: socket.socket) -> bytes:
    return s.recv(4096)


def logged_in(port: int) -> tuple[socket.socket, BinaryIO]:
    s = connect(port)
    f = s.makefile("rb")
    assert f.readline().startswith(b"* OK")
    s.sendall(b"a LOGIN alice wonderland\r\n")
    line = f.readline()
    while line.startswith(b"*"):
        line = f.readline()
    assert line.startswith(b"a OK"), line
    return s, f


def noop(s: socket.socket, f: BinaryIO, tag: bytes) -> None:
    s.sendall(tag + b" NOOP\r\n")
    line = f.readline()
    while line.startswith(b"*"):
        line = f.readline()
    assert line.startswith(tag + b" OK"), line


def stopped(proxy: Running) -> list[str]:
    """Stop the proxy (it must stop cleanly) and return its diagnostics, line by line."""
    assert proxy.stop() == 0, proxy.stderr.decode()
    return proxy.stderr.decode().splitlines()


def count(lines: list[str], pattern: str) -> int:
    return sum(bool(re.search(pattern, line)) for line in lines)


# --- (1) The process at its descriptor limit.


def test_at_the_descriptor_limit_accept_failures_are_not_a_line_each(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """More connections than descriptors: accept(2) fails with EMFILE while the backlog holds
    connections, and the loop retries every ACCEPT_RETRY (0.1 s). Each retry logged an ERROR
    line: clients holding connections open made 10 lines a second for as long as they liked (520
    lines in 8 s here, with the upstream warnings below). Now the first failure is logged and
    the rest summarised once a minute. No spinning (CPU counted), a session open before keeps
    working, and once the attackers go, new clients are served."""
    nofile = 48
    with imapveil(tmp_path, dovecot.address, "--store", "off", wrap=limited(nofile)) as proxy:
        pid = proxy.process.pid
        before = fds(pid)
        held, held_file = logged_in(proxy.port)
        attackers = [connect(proxy.port) for _ in range(3 * nofile)]
        until(lambda: fds(pid) >= nofile - 2, "the proxy never reached its descriptor limit")
        cpu = cpu_seconds(pid)
        time.sleep(3)  # at the limit, with connections waiting in the backlog
        assert cpu_seconds(pid) - cpu < 1.5, "the accept loop spins"
        noop(held, held_file, b"h1")  # the session open before is served at the limit
        for s in attackers:
            s.close()
        until(lambda: fds(pid) <= before + 2, "descriptors not given back")
        noop(held, held_file, b"h2")
        fresh = connect(proxy.port)
        assert greeting(fresh).startswith(b"* OK"), "not served once the attackers went"
        fresh.close()
        held.close()
        lines = stopped(proxy)
    failures = count(lines, "accept failed")
    assert 1 <= failures <= 2, "\n".join(lines)


def test_an_unreachable_upstream_is_not_a_warning_per_client(tmp_path: Path) -> None:
    """Each client of an upstream that refuses connections (or of a proxy out of descriptors,
    whose connect(2) fails with EMFILE) gets `* BYE [UNAVAILABLE]`, and each made a WARNING line
    `upstream … unavailable`: a client reconnecting in a loop wrote the log. Now the first is
    logged and the rest summarised once a minute; every session still has its record."""
    dead = free_port()
    clients = 30
    with imapveil(tmp_path, ("127.0.0.1", dead), "--store", "off") as proxy:
        for _ in range(clients):
            s = connect(proxy.port)
            answer = s.makefile("rb").read()
            assert answer.startswith(b"* BYE [UNAVAILABLE]"), answer
            s.close()
        lines = stopped(proxy)
        ends = [r for r in proxy.records() if r["event"] == "session_end"]
    assert len(ends) == clients
    assert all(r["reason"] == "upstream_unavailable" for r in ends)
    warnings = count(lines, "unavailable")
    assert 1 <= warnings <= 2, "\n".join(lines)


def test_out_of_descriptors_mid_session_the_client_gets_bye_unavailable(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """Admitted, but connect(2) to the upstream fails with EMFILE: `* BYE [UNAVAILABLE]` and
    the session's record (`upstream_unavailable`, detail `emfile`), no hang, no traceback."""
    nofile = 40
    with imapveil(tmp_path, dovecot.address, "--store", "off", wrap=limited(nofile)) as proxy:
        attackers = [connect(proxy.port) for _ in range(2 * nofile)]
        answers = []
        for s in attackers:  # in the order the backlog hands them over; each closed once read
            answers.append(s.recv(4096))
            s.close()
        lines = stopped(proxy)
        ends = [r for r in proxy.records() if r["event"] == "session_end"]
    refused = [a for a in answers if a.startswith(b"* BYE [UNAVAILABLE]")]
    greeted = [a for a in answers if a.startswith(b"* OK")]
    assert refused and greeted and len(refused) + len(greeted) == len(answers), answers
    assert sum(r["detail"] == "emfile" for r in ends) == len(refused)
    assert count(lines, "Traceback") == 0, "\n".join(lines)


def test_occurrences_are_said_once_an_interval_with_their_count() -> None:
    """The summary `Occurrences` gives the log lines above: the first at once, then one line an
    interval with how many came since the last."""
    occurrences = Occurrences(interval=60)
    said = [occurrences.note(t) for t in (0.0, 1.0, 2.0, 59.0, 61.0, 62.0, 200.0)]
    assert said == [
        " (summarised every 60 s from now on)",
        None,
        None,
        None,
        " (4 times in the last 61 s)",
        None,
        " (2 times in the last 139 s)",
    ]


# --- (3) Resets at every stage: nothing leaks, nothing is logged per reset.


def reset(s: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer sees a reset (RST), not an end."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def client_hello() -> bytes:
    """The first flight of a real TLS client (a ClientHello), from an in-memory handshake."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@contextlib.contextmanager
def stalled_upstream() -> Iterator[tuple[str, int]]:
    """A listening socket that never accepts, its backlog full: connect(2) to it hangs."""
    with socket.socket() as server, contextlib.ExitStack() as fillers:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        for _ in range(4):
            c = fillers.enter_context(socket.socket())
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c.connect(server.getsockname())
        yield server.getsockname()


def unended(proxy: Running) -> list[dict[str, object]]:
    """The sessions whose end is not in the event log (yet), with what the log has of them."""
    records = proxy.records()
    ended = {r["session"] for r in records if r["event"] == "session_end"}
    return [r for r in records if r.get("session") not in ended and "session" in r]


def started_more_than(proxy: Running, n: int) -> bool:
    return proxy.events.read_text().count('"session_start"') > n


def quiet(lines: list[str]) -> list[str]:
    """Diagnostics other than the start and stop lines."""
    routine = ("listening on", "received SIGTERM", "stopped after", "grace period over")
    return [line for line in lines if not any(r in line for r in routine)]


ROUNDS = 20


def test_resets_at_every_stage_leak_nothing_and_log_nothing(
    dovecot: Dovecot, tls_material: TlsMaterial, tmp_path: Path
) -> None:
    """Clients that reset: at once, after the greeting, mid-command after login, after our OK
    to STARTTLS with half a ClientHello sent, and on the implicit-TLS port with nothing, half
    or all of a ClientHello sent. ROUNDS of each: the descriptors come back to what they were,
    every session has its end record, and the log has no line for any of them but the first TLS
    failure's (each TLS reset made an INFO line `client TLS failed`: 80 lines here, and a client
    looping on the TLS port wrote the log; now one line a minute says how many)."""
    tls_port = free_port()
    args = (
        "--store", "off", "--client-tls", "offer", "--listen-tls", f"127.0.0.1:{tls_port}",
        "--cert", str(tls_material.cert), "--key", str(tls_material.key),
    )  # fmt: skip
    hello = client_hello()
    with imapveil(tmp_path, dovecot.address, *args) as proxy:
        pid = proxy.process.pid
        warm = connect(proxy.port)  # the first session loads what sessions need, once
        assert greeting(warm).startswith(b"* OK")
        warm.close()
        until(lambda: fds(pid) <= 12, "the first session's descriptors")
        before = fds(pid)
        for _ in range(ROUNDS):
            reset(connect(proxy.port))

            s = connect(proxy.port)
            assert greeting(s).startswith(b"* OK")
            reset(s)

            s, f = logged_in(proxy.port)
            s.sendall(b"b SELECT INBOX\r\nc FETCH 1:* (FLAGS)\r\n")
            f.close()  # else the socket's descriptor stays open: no reset
            reset(s)

            s = connect(proxy.port)
            f = s.makefile("rb")
            assert f.readline().startswith(b"* OK")
            s.sendall(b"t STARTTLS\r\n")
            assert f.readline().startswith(b"t OK")
            s.sendall(hello[: len(hello) // 2])
            f.close()
            reset(s)

            for part in (b"", hello[: len(hello) // 2], hello):
                s = connect(tls_port)
                s.sendall(part)
                reset(s)
        # The connections reset right after connecting (at once, and on the TLS port) are
        # sessions only if the proxy accepted them before the reset came: one reset before is
        # closed unread (round 17).
        least, most = 1 + 3 * ROUNDS, 1 + 7 * ROUNDS
        until(
            lambda: proxy.events.read_text().count('"session_end"') >= least,
            f"ends: {unended(proxy)}",
        )
        until(lambda: fds(pid) <= before, f"descriptors leaked: {before} before")
        lines = stopped(proxy)
    assert count(lines, "client TLS failed") == 1, "\n".join(lines)  # the first, then a minute
    assert [line for line in quiet(lines) if "client TLS failed" not in line] == [], lines
    ends = [r for r in proxy.records() if r["event"] == "session_end"]
    starts = [r for r in proxy.records() if r["event"] == "session_start"]
    assert len(ends) == len(starts) and least <= len(ends) <= most, (len(starts), len(ends))


def test_resets_while_the_upstream_connect_hangs_leak_nothing(tmp_path: Path) -> None:
    """Clients that reset while the proxy's connect(2) to the upstream hangs (a server whose
    backlog is full): the proxy does not read the client meanwhile, so each session lasts until
    `connect_timeout`, then ends (its BYE cannot be delivered) with its record; descriptors come
    back, and the log has one `unavailable` line for all of them."""
    clients = 10
    with stalled_upstream() as upstream:
        args = ("--store", "off", "--connect-timeout", "2")
        with imapveil(tmp_path, upstream, *args) as proxy:
            pid = proxy.process.pid
            before = fds(pid)
            for n in range(clients):
                s = connect(proxy.port)
                # Reset once the session is there (one reset before the proxy accepted it is
                # closed unread: no session, no upstream connection; round 17).
                until(functools.partial(started_more_than, proxy, n), "its session's start")
                reset(s)
            until(lambda: proxy.events.read_text().count('"session_end"') >= clients, "ends")
            until(lambda: fds(pid) <= before, f"descriptors leaked: {before} before")
            lines = stopped(proxy)
    ends = [r for r in proxy.records() if r["event"] == "session_end"]
    assert len(ends) == clients, ends
    assert count(lines, "unavailable") == 1, "\n".join(lines)
    assert quiet([line for line in lines if "unavailable" not in line]) == [], lines


# --- (2) Slots: connections that say nothing, or say it slowly.


def dribble(s: socket.socket, data: bytes, every: float, stop: threading.Event) -> None:
    """Send `data` an octet at a time, one every `every` seconds, until done or refused."""
    for i in range(len(data)):
        if stop.wait(every):
            return
        try:
            s.sendall(data[i : i + 1])
        except OSError:
            return


def closed_within(s: socket.socket, timeout: float) -> bytes:
    """What the proxy says before it closes `s` (an AssertionError if it does not in time)."""
    s.settimeout(timeout)
    seen = b""
    try:
        while chunk := s.recv(4096):
            seen += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"still open after {timeout} s: {seen!r}") from None
    return seen


def served_within(port: int, timeout: float) -> None:
    """A new client is greeted `* OK` within `timeout`; until then, each is told the proxy is
    full (nothing else), and closed."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.closing(connect(port)) as s:
            said = greeting(s)
        if said.startswith(b"* OK"):
            return
        assert said.startswith(b"* BYE [UNAVAILABLE]"), said
        assert time.monotonic() < deadline, f"no slot came back in {timeout} s"
        time.sleep(0.05)


HANDSHAKE = 5
"""The TLS handshake's deadline in the slots test: longer than the dribbled ClientHello's gaps
(2 s), so that a timeout restarted by each octet would never end it."""


def test_silent_and_slow_handshakes_hold_a_slot_only_until_their_timeout(
    dovecot: Dovecot, tls_material: TlsMaterial, tmp_path: Path
) -> None:
    """`max_sessions` 3, taken by a plain connection that says nothing, one to the TLS port
    that says nothing, and one dribbling its ClientHello an octet every 2 s. They count (a
    fourth client gets `* BYE [UNAVAILABLE]`), but only until their timeouts: the plain one's
    `login_timeout`, the TLS ones' `tls_handshake_timeout` (5 s here, 30 by default; in all,
    however slowly the octets come: not per octet). Then a new client is served; descriptors
    come back."""
    tls_port = free_port()
    args = (
        "--store", "off", "--max-sessions", "3", "--login-timeout", "3",
        "--tls-handshake-timeout", str(HANDSHAKE),
        "--listen-tls", f"127.0.0.1:{tls_port}",
        "--cert", str(tls_material.cert), "--key", str(tls_material.key),
    )  # fmt: skip
    stop = threading.Event()
    with imapveil(tmp_path, dovecot.address, *args) as proxy:
        pid = proxy.process.pid
        warm = connect(proxy.port)
        assert greeting(warm).startswith(b"* OK")
        warm.close()
        until(lambda: proxy.events.read_text().count('"session_end"') >= 1, "the first session")
        before = fds(pid)
        plain = connect(proxy.port)
        silent = connect(tls_port)
        slow = connect(tls_port)
        refused: socket.socket | None = None
        dribbler = threading.Thread(target=dribble, args=(slow, client_hello(), 2.0, stop))
        dribbler.start()
        try:
            until(lambda: fds(pid) >= before + 4, "the three are not all in")  # 3 + upstream
            refused = connect(proxy.port)
            assert closed_within(refused, WAIT).startswith(b"* BYE [UNAVAILABLE]")
            started = time.monotonic()
            assert b"* BYE" in closed_within(plain, WAIT)
            assert closed_within(silent, HANDSHAKE + WAIT) == b""
            assert closed_within(slow, HANDSHAKE + WAIT) == b""
            assert time.monotonic() - started < HANDSHAKE + WAIT
        finally:
            stop.set()
            dribbler.join()
            for s in (plain, silent, slow, refused):
                if s is not None:
                    s.close()
        # A slot is the session's until both its legs are closed: the upstream one after
        # Dovecot closes too (`close_gracefully`, up to CLOSE_GRACE), which the client whose
        # leg was closed first does not see. So "a new client is served" is "within WAIT".
        served_within(proxy.port, WAIT)
        until(lambda: fds(pid) <= before, f"descriptors leaked: {before} before")
        lines = stopped(proxy)
    ends = [r for r in proxy.records() if r["event"] == "session_end"]
    reasons = sorted(r["reason"] for r in ends)
    # the first and the last client's, the silent plain one's, the two TLS ones'
    assert reasons == ["client_closed", "client_closed", "idle_timeout", "tls_error", "tls_error"]
    assert count(lines, "client TLS failed") == 1, "\n".join(lines)
    assert count(lines, "refused a connection") == 1, "\n".join(lines)


def proxy_v1(source: str, port: int) -> bytes:
    return f"PROXY TCP4 {source} 127.0.0.1 {port} 143\r\n".encode()


def test_per_address_limits_behind_a_balancer_lock_out_only_that_address(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """Behind a balancer (PROXY headers from 127.0.0.1; loopback itself is exempt from the
    per-address limits), `max_sessions_per_client` 2: an address holding two silent sessions
    gets `* BYE [UNAVAILABLE]` for a third, another address is served. A header sent an octet
    at a time, or none at all, is cut off after PROXY_HEADER_TIMEOUT (5 s) and is not counted
    as a session of anyone meanwhile."""
    args = (
        "--store", "off", "--max-sessions-per-client", "2", "--max-sessions", "4",
        "--proxy-protocol-from", "127.0.0.1/32",
    )  # fmt: skip
    stop = threading.Event()
    with imapveil(tmp_path, dovecot.address, *args) as proxy:
        held = []
        for i in range(2):
            s = connect(proxy.port)
            s.sendall(proxy_v1("198.51.100.1", 40000 + i))
            assert greeting(s).startswith(b"* OK")
            held.append(s)
        third = connect(proxy.port)
        third.sendall(proxy_v1("198.51.100.1", 40002))
        assert closed_within(third, WAIT).startswith(b"* BYE [UNAVAILABLE]")
        # Two slow headers and two silent ones: with the two held, six connections, more than
        # max_sessions (4); none of them takes a slot from another address.
        slow = [connect(proxy.port) for _ in range(2)]
        silent = [connect(proxy.port) for _ in range(2)]
        dribblers = [
            threading.Thread(target=dribble, args=(s, proxy_v1("198.51.100.3", 1), 0.5, stop))
            for s in slow
        ]
        for t in dribblers:
            t.start()
        try:
            other = connect(proxy.port)
            other.sendall(proxy_v1("198.51.100.2", 40003))
            assert greeting(other).startswith(b"* OK")
            other.close()
            for s in slow + silent:
                closed_within(s, 5 + WAIT)
        finally:
            stop.set()
            for t in dribblers:
                t.join()
        for s in held + slow + silent + [third]:
            s.close()
        lines = stopped(proxy)
    ends = [r for r in proxy.records() if r["event"] == "session_end"]
    refused_headers = [r for r in ends if r["reason"] == "proxy_header"]
    assert len(refused_headers) == 4, ends
    assert count(lines, "refused a connection from 198.51.100.1") == 1, "\n".join(lines)


def test_at_the_descriptor_limit_the_metrics_listener_does_not_log_a_traceback_a_retry(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """Clients take every descriptor; a scrape of /metrics waits in that listener's backlog.
    The metrics port was served by `trio.serve_listeners`, which logs every failed accept (each
    0.1 s) at ERROR with its traceback: the mail clients made the log grow by a traceback ten
    times a second for as long as they held on. Now its accept failures are summarised as the
    mail listeners' are, and the scrape is answered once descriptors are free again."""
    nofile = 48
    metrics = free_port()
    args = ("--store", "off", "--metrics", f"127.0.0.1:{metrics}")
    with imapveil(tmp_path, dovecot.address, *args, wrap=limited(nofile)) as proxy:
        pid = proxy.process.pid
        before = fds(pid)
        attackers = [connect(proxy.port) for _ in range(2 * nofile)]
        until(lambda: fds(pid) >= nofile - 1, "the proxy never reached its descriptor limit")
        scrape = connect(metrics)
        scrape.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        time.sleep(3)  # at the limit, the scrape waiting in the backlog
        for s in attackers:
            s.close()
        assert closed_within(scrape, WAIT).startswith(b"HTTP/1.1 200")
        scrape.close()
        until(lambda: fds(pid) <= before + 2, "descriptors not given back")
        lines = stopped(proxy)
    assert count(lines, "Traceback") == 0, "\n".join(lines)
    assert count(lines, "accept") <= 4, "\n".join(lines)  # the listeners' first failures


def test_at_the_descriptor_limit_the_watchdog_is_still_fed(
    dovecot: Dovecot, tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    """Under systemd (`WatchdogSec=30`) the service pings its watchdog; each sd_notify opened a
    socket of its own, which fails with EMFILE once clients hold every descriptor: no ping, a
    `sd_notify failed` warning each time, and after 30 s systemd kills the service and every
    session with it. The notification socket is now opened once and kept: the pings go on."""
    sock, path = notify_socket
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}  # a ping each 0.2 s
    nofile = 48
    with imapveil(
        tmp_path, dovecot.address, "--store", "off", env=env, wrap=limited(nofile)
    ) as proxy:
        pid = proxy.process.pid
        before = fds(pid)
        assert b"READY=1" in sock.recv(4096)
        attackers = [connect(proxy.port) for _ in range(2 * nofile)]
        until(lambda: fds(pid) >= nofile - 1, "the proxy never reached its descriptor limit")
        sock.settimeout(0)
        with contextlib.suppress(BlockingIOError):
            while True:
                sock.recv(4096)  # the pings before the limit
        time.sleep(3)  # at the limit: some 15 pings due
        pings = 0
        with contextlib.suppress(BlockingIOError):
            while True:
                pings += sock.recv(4096) == b"WATCHDOG=1"
        still_full = fds(pid) >= nofile - 1
        for s in attackers:
            s.close()
        until(lambda: fds(pid) <= before + 2, "descriptors not given back")
        lines = stopped(proxy)
    assert still_full
    assert pings >= 3, "\n".join(lines)
    assert count(lines, "sd_notify failed") == 0, "\n".join(lines)


def soft_nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no Max open files in /proc/PID/limits")


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one_and_a_short_one_is_said(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """Started from a shell (soft limit 1024 on most distributions, hard 524288), the proxy kept
    the soft limit: about 500 sessions (two descriptors each) and then EMFILE, whatever
    `max_sessions` said (10000 by default), without a word. Now it raises its soft limit to the
    hard one at start, as Go's runtime does, and says so when even that cannot hold
    `max_sessions` sessions."""
    with imapveil(
        tmp_path, dovecot.address, "--store", "off", wrap=["prlimit", "--nofile=64:4096", "--"]
    ) as proxy:
        raised = soft_nofile(proxy.process.pid)
        early = proxy.early_stderr.decode()
        lines = stopped(proxy)
    assert raised == 4096
    assert count(early.splitlines(), "max_sessions") == 1, early  # 4096 < 2 x 10000
    args = ("--store", "off", "--max-sessions", "100")
    with imapveil(tmp_path, dovecot.address, *args, wrap=limited(4096)) as proxy:
        early = proxy.early_stderr.decode()
        lines = stopped(proxy)
    assert count(lines, "max_sessions") == 0, early  # 4096 holds 100 sessions
