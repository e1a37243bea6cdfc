"""Attack round 15 on operations (ops15): the systemd notify socket, the metrics port, what
configuration errors echo, the statistics spool, log flooding, SIGHUP storms. Each test failed
before the fix named in its docstring, or guards what held."""

from __future__ import annotations

import contextlib
import imaplib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from imapveil import systemd
from imapveil.config import DECLARATIONS, ConfigError
from imapveil.policy import PolicyError
from imapveil.policy_files import load_policy
from imapveil.records import IdExchange, SessionEnded, SessionStarted
from imapveil.service import Service, load_all
from imapveil.stats import metrics as metrics_module
from imapveil.stats import sink as sink_module
from imapveil.stats.metrics import SCRAPES_AT_ONCE, Metrics, ProcessCollector, serve_metrics
from imapveil.stats.sink import StoreSink
from imapveil.stats.store import Store
from imapveil.systemd import Notifier
from tests.conftest import TlsMaterial
from tests.helpers.dovecot import Dovecot, free_port
from tests.helpers.postgres import Postgres
from tests.helpers.process import (
    datagrams_waiting,
    imapveil,
    read_log,
    service_overrides,
    signal_handlers_restored,
)


@pytest.fixture
def full_notify_socket(
    notify_socket: tuple[socket.socket, str],
) -> Iterator[tuple[socket.socket, str]]:
    """conftest's notify socket, nobody reading it: its receive queue is full
    (net.unix.max_dgram_qlen datagrams), as a wedged PID 1's would be."""
    _, path = notify_socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            for _ in range(100_000):
                filler.sendto(b"FILLER=1", path)
        yield notify_socket


def _drain(sock: socket.socket) -> list[str]:
    """Each datagram waiting now, its first line; filler left out."""
    return [line for line in datagrams_waiting(sock) if line != "FILLER=1"]


def test_a_notify_socket_nobody_reads_does_not_block_the_sender(
    full_notify_socket: tuple[socket.socket, str],
) -> None:
    """Found: `Notifier.send` was a blocking `sendto`; to a notify socket whose receive queue
    is full (PID 1 wedged, or slow to read) it waited until there was room: the event loop,
    every session and the signals with it. The datagram waits in the notifier now, sent in
    order once the socket takes it again (`Notifier.run` retries)."""
    sock, path = full_notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    sent = threading.Thread(target=notifier.ready, args=("serving",), daemon=True)
    sent.start()
    sent.join(2)
    blocked = sent.is_alive()
    seen = _drain(sock)  # lets a blocked send go, so that the test ends either way
    sent.join(5)
    assert not blocked, "sd_notify blocked on a full notify socket"
    assert seen == []  # not sent yet: the socket was full
    notifier.flush()
    notifier.stopping()
    notifier.close()
    assert _drain(sock) == ["READY=1", "STOPPING=1"]  # in order, once there is room


async def test_datagrams_the_socket_cannot_take_are_retried_and_bounded(
    full_notify_socket: tuple[socket.socket, str],
) -> None:
    """Held with the fix above: while the socket stays full, watchdog pings are one waiting
    (not one per interval) and at most `MAX_PENDING` datagrams wait, the oldest dropped first,
    said in a warning (not one per datagram); `run` sends what waits once there is room."""
    sock, path = full_notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(notifier.run)
        for _ in range(50):
            notifier.watchdog()
        assert list(notifier.pending) == [b"WATCHDOG=1"]
        for i in range(systemd.MAX_PENDING + 5):
            notifier.status(f"{i}")
        assert len(notifier.pending) == systemd.MAX_PENDING
        assert notifier.dropped == 6  # the ping and the first five
        notifier.ready()
        with trio.fail_after(5):
            while notifier.pending:
                _drain(sock)
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    notifier.close()
    # What the last drain did not see came in the meantime, or not at all: READY=1 is last.
    assert _drain(sock)[-1:] in (["READY=1"], [])


@pytest.mark.dovecot
def test_the_service_serves_while_its_notify_socket_is_full(
    dovecot: Dovecot, tmp_path: Path, full_notify_socket: tuple[socket.socket, str]
) -> None:
    """Found with the first: `imapveil serve` with $NOTIFY_SOCKET full blocked in READY=1,
    after its listeners were open: connections were accepted and never greeted. Now sessions
    are served, and READY=1 reaches systemd once its socket has room."""
    sock, path = full_notify_socket
    env = {**os.environ, "NOTIFY_SOCKET": path}
    with imapveil(tmp_path, dovecot.address, env=env) as proxy:
        try:
            client = imaplib.IMAP4("127.0.0.1", proxy.port, timeout=5)
            assert client.login("alice", "wonderland")[0] == "OK"
            client.logout()
        finally:
            seen = _drain(sock)
        deadline = time.monotonic() + 5
        while "READY=1" not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
            seen += _drain(sock)
        assert seen[:1] == ["READY=1"], seen
        assert proxy.stop() == 0


# --- The metrics port, from outside: raw sockets, as anyone who reaches it can.


@contextlib.asynccontextmanager
async def metrics_port() -> AsyncIterator[int]:
    """`serve_metrics` in this process, on a port of its own."""
    metrics = Metrics()
    metrics.gauge("up_here", "A gauge of the test's", lambda: 1.0)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_metrics, metrics, listeners, lambda: (True, "ok"))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def exchange(port: int, request: bytes, within: float = 2.0) -> bytes:
    """What the port answers to `request` (sent at once) before it closes, within `within`."""
    with trio.fail_after(within):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(request)
            answer = b""
            with contextlib.suppress(trio.BrokenResourceError):
                while chunk := await stream.receive_some(65536):
                    answer += chunk
    return answer


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def head_and_body(answer: bytes) -> tuple[bytes, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


async def test_a_request_ended_by_bare_line_feeds_is_answered_at_once() -> None:
    """Found: the metrics port read a request until CRLF CRLF; one whose lines end in a bare
    LF (`printf 'GET /metrics HTTP/1.0\\n\\n' | nc`, some health checkers) waited out the
    5 seconds and was closed unanswered. Request lines and headers ending in LF are read as
    most HTTP servers read them (RFC 9112 §2.2)."""
    async with metrics_port() as port:
        answer = await exchange(port, b"GET /metrics HTTP/1.0\nAccept: text/plain\n\n", 1.0)
        assert status(answer) == 200 and b"imapveil_up_here 1.0" in answer
        answer = await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\n\r\n", 1.0)
        assert status(answer) == 200 and head_and_body(answer)[1] == b"ok\n"


async def test_connections_holding_every_slot_do_not_lock_the_scraper_out() -> None:
    """Found: `SCRAPES_AT_ONCE` connections that send nothing (or a request a byte at a time)
    held the metrics port's slots for 5 s each, and every connection beyond them was closed
    unanswered: whoever reaches the port could keep Prometheus out for good by reconnecting.
    As nginx does when it runs out of connections, a new one now closes the oldest that has not
    sent its whole request; a scraper sends its request at once and is answered."""
    async with metrics_port() as port:
        held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(SCRAPES_AT_ONCE)]
        for stream in held[::2]:
            await stream.send_all(b"GET /metr")  # slowloris: a request begun, never ended
        await trio.sleep(0.2)
        for _ in range(3):
            answer = await exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 1.0)
            assert status(answer) == 200
        for stream in held:
            await stream.aclose()


async def test_a_request_never_finished_is_closed_by_its_own_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Held with the fix above: a request whose head does not end within `REQUEST_WITHIN`
    is closed, however it trickles (a byte every 0.1 s)."""
    monkeypatch.setattr(metrics_module, "REQUEST_WITHIN", 0.5)
    async with metrics_port() as port, await trio.open_tcp_stream("127.0.0.1", port) as stream:
        with trio.fail_after(2):
            with contextlib.suppress(trio.BrokenResourceError):
                for octet in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"y" * 100:
                    await stream.send_all(bytes([octet]))
                    await trio.sleep(0.1)
            assert await stream.receive_some(4096) in (b"", None)


@pytest.mark.parametrize(
    ("request_line", "expected"),
    [
        (b"HEAD /metrics HTTP/1.1", 200),
        (b"OPTIONS /metrics HTTP/1.1", 200),
        (b"OPTIONS * HTTP/1.1", 200),
        (b"POST /metrics HTTP/1.1", 405),
        (b"DELETE /healthz HTTP/1.1", 405),
        (b"GET /metrics?name[]=imapveil_up_here HTTP/1.1", 200),
        (b"GET http://127.0.0.1/healthz HTTP/1.1", 200),
        (b"GET /metrics\x01\x1b[2J HTTP/1.1", 400),
        (b"GET /metr\x7fics HTTP/1.1", 400),
        (b"GET /metrics HTTP/1.1 extra", 400),
        (b"GET /metrics", 400),
        (b"GET /metrics FTP/1.0", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),  # a TLS ClientHello
        (b"GET /%2e%2e/etc/passwd HTTP/1.1", 404),
        (b"GET /metrics\xc3\xa9 HTTP/1.1", 400),
    ],
)
async def test_methods_and_targets_get_the_answer_http_gives(
    request_line: bytes, expected: int
) -> None:
    """Found: the port answered any method with the metrics (a HEAD with the body, which an
    HTTP client then reads as the next response's start) and any line with three spaces as a
    request. HEAD gets the headers of GET and no body, OPTIONS what is allowed, another method
    405 with `Allow`, a target with a control or 8-bit octet or a line that is no HTTP/1.x
    request line 400; a query is ignored (Prometheus's `params`), an absolute URI read as its
    path (RFC 9112 §3.2.2)."""
    async with metrics_port() as port:
        answer = await exchange(port, request_line + b"\r\nHost: x\r\n\r\n")
    assert status(answer) == expected, answer[:200]
    head, body = head_and_body(answer)
    assert b"\r\nConnection: close\r\n" in head + b"\r\n"
    if request_line.startswith(b"HEAD"):
        assert body == b""
        assert b"Content-Length: 0" not in head  # the length GET's body would have
    if expected == 405:
        assert b"\r\nAllow: GET, HEAD, OPTIONS" in head
    if request_line.startswith(b"OPTIONS"):
        assert b"\r\nAllow: GET, HEAD, OPTIONS" in head and body == b""


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        (b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET /metrics HTTP/1.1\r\n" + b"X-Many: y\r\n" * 5000 + b"\r\n", 431),
        (b"GET /metrics HTTP/1.1\r\nX-Big: " + b"y" * 100_000 + b"\r\n\r\n", 431),
    ],
    ids=["a huge request line", "many headers", "a huge header"],
)
async def test_a_request_head_too_large_is_refused_at_its_bound(sent: bytes, expected: int) -> None:
    """Held, made explicit: a request head is read up to `MAX_REQUEST` octets; beyond, the
    port answers 414 (the request line alone is too long) or 431 and closes, having read no
    more than that (before: a 404 for a cut request line, or the metrics)."""
    async with metrics_port() as port:
        answer = await exchange(port, sent)
    assert status(answer) == expected, answer[:200]


async def test_pipelined_requests_get_one_answer_and_the_close() -> None:
    """Held: two requests in one segment (HTTP/1.1 pipelining) get the first one's answer
    and `Connection: close`; the second is not read as anything."""
    async with metrics_port() as port:
        answer = await exchange(
            port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n"
        )
    assert answer.count(b"HTTP/1.1 ") == 1 and head_and_body(answer)[1] == b"ok\n"


async def test_a_flood_of_connections_keeps_the_port_bounded_and_serving() -> None:
    """Held with the fix above: 200 connections at once, half of them never sending a request,
    leave at most `SCRAPES_AT_ONCE` served; the port answers a scrape afterwards at once."""
    async with metrics_port() as port:
        streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(200)]
        for stream in streams[::2]:
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(b"GET /metrics HTTP/1.1\r\n\r\n")
        await trio.sleep(0.3)
        answer = await exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n", 1.0)
        assert status(answer) == 200
        for stream in streams:
            await stream.aclose()


# --- What configuration and policy errors echo of the file.

HUGE = "k" * 1_000_000
LONG_PATH = "/" + "d/" * 400_000 + "f"


def _config_cases() -> dict[str, str]:
    cases = {
        "unknown key": f"{HUGE} = 1\n",
        "unknown quoted key": f'"{HUGE}\\n" = 1\n',
        "inject_id name": f'inject_id = {{ "{HUGE}" = "v" }}\n',
        "inject_id value": f'inject_id = {{ name = "{HUGE}" }}\n',
    }
    for d in DECLARATIONS:
        cases[d.name] = f'{d.name} = "{HUGE}"\n'
        cases[f"{d.name} in a list"] = f'{d.name} = ["{HUGE}"]\n'
        cases[f"{d.name} deep"] = f'{d.name} = "{LONG_PATH}"\n'
    return cases


CONFIG_CASES = _config_cases()


@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_a_configuration_error_quotes_a_bounded_part_of_the_value(
    tmp_path: Path, name: str
) -> None:
    """Found: a key or value of a megabyte (a file filled by mistake, or by someone who may
    write it) was quoted whole in the error (`unknown setting 'kkk…'`, `listen: 'kkk…' is not
    HOST:PORT`, `cert: /d/d/…: No such file`): at start one line of megabytes on stderr, at a
    reload the same in the log and in the event log's `config` record; a path too long for the
    system (ENAMETOOLONG from the directory check of `events` or `store`) was no ConfigError at
    all: a traceback. Errors quote at most `MAX_SHOWN` characters of it, marked as cut, and a
    file name too long for the system is refused as such."""
    config = tmp_path / "c.toml"
    config.write_text(CONFIG_CASES[name])
    overrides = {"upstream": "127.0.0.1:143", "user_key_file": str(tmp_path / "key")}
    try:
        load_all(str(config), overrides)
    except ConfigError as exc:
        message = str(exc)
    else:
        return  # taken as it is (a name imapveil will create, say): nothing echoed
    assert len(message) <= 1000, (len(message), message[:300])
    if "k" * 100 in message or "d/" * 100 in message:
        assert "more characters]" in message, message  # said to be cut


@pytest.mark.parametrize(
    "text",
    [
        f'{HUGE} = "x"\n',
        f'detectors = ["{HUGE}"]\n',
        f'[[rule]]\nfields = ["name"]\n{HUGE} = "keep"\n',
        f'[[rule]]\nfields = ["{HUGE}"]\nforward = "keep"\n',
        f'[[rule]]\nfields = ["name"]\nforward = "{HUGE}"\n',
        f'[[rule]]\nfields = ["name"]\nforward = "keep"\nshape = "{HUGE}"\n',
        f'[[rule]]\nfields = ["name"]\nforward = "keep"\nshape = "^{HUGE}$"\n',
        f'[default]\nforward = "{HUGE}"\n',
        f'[default]\n{HUGE} = "keep"\n',
    ],
    ids=["top key", "detector", "rule key", "field", "action", "shape", "pattern",
         "default action", "default key"],
)  # fmt: skip
def test_a_policy_error_quotes_a_bounded_part_of_the_file(tmp_path: Path, text: str) -> None:
    """Found with the one above: the policy file's errors quoted unknown keys and values whole
    (`imapveil policy check`, and at a reload the log and the `policy` record)."""
    policy = tmp_path / "p.toml"
    policy.write_text(text)
    with pytest.raises(PolicyError) as refused:
        load_policy(policy)
    assert len(str(refused.value)) <= 1000, str(refused.value)[:300]


def test_a_label_error_quotes_a_bounded_part_of_the_file(tmp_path: Path) -> None:
    """Found with the one above: `fingerprint_labels` errors listed unknown keys whole."""
    labels = tmp_path / "labels.toml"
    labels.write_text(f'{HUGE} = 1\n[[label]]\nfingerprint = "b1_0123456789ab"\n{HUGE} = 2\n')
    overrides = {
        "upstream": "127.0.0.1:143",
        "user_key_file": str(tmp_path / "key"),
        "fingerprint_labels": str(labels),
    }
    with pytest.raises(ConfigError) as refused:
        load_all(None, overrides)
    assert len(str(refused.value)) <= 1000


async def test_a_reload_of_a_key_tens_of_megabytes_long_logs_a_bounded_line(
    dovecot: Dovecot, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Found: a reload of a file with a key of 20 MB wrote a 20 MB log line and a 20 MB
    `config` record (and one more in the `policy` record). Both quote at most `MAX_SHOWN`
    characters of it now."""
    config = tmp_path / "imapveil.toml"
    config.write_text("")
    port = free_port()
    overrides = service_overrides(dovecot.address, port, tmp_path)
    service = Service(str(config), overrides, load_all(str(config), overrides))
    config.write_text("k" * 20_000_000 + " = 1\n")
    with signal_handlers_restored(), trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.run)
            await service.reload()
            service.proxy.stop()
    refused = [r.getMessage() for r in caplog.records if "reload refused" in r.getMessage()]
    assert refused and all(len(line) < 1000 for line in refused)
    records, other = read_log(tmp_path / "events.jsonl")
    assert not other and len(repr(records)) < 10_000
    oks = [r["ok"] for r in records if r["event"] == "config"]
    assert oks.count(True) == 1 and False in oks  # the start's, the reload's (in either order:
    # the reload is asked for before `run` has said its start)


@pytest.mark.parametrize("command", ["serve", "check-config"])
def test_a_huge_key_at_start_is_one_short_line(tmp_path: Path, command: str) -> None:
    """Found with the reload: at start (`serve`, `check-config`) the error was one line of the
    key's size on stderr, the journal's."""
    config = tmp_path / "imapveil.toml"
    config.write_text('upstream = "127.0.0.1:143"\n' + "k" * 20_000_000 + " = 1\n")
    args = ["--config", str(config)] if command == "serve" else [str(config)]
    done = subprocess.run(
        [sys.executable, "-m", "imapveil", command, *args],
        check=False,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.count(b"\n") == 1 and len(done.stderr) < 1000, done.stderr[:300]


# --- SIGHUP storms during sessions.


def _noops(
    port: int, stop: threading.Event, worst: list[float], errors: list[BaseException]
) -> None:
    """A logged-in session doing NOOPs until `stop`; the slowest round trip into `worst`."""
    try:
        client = imaplib.IMAP4("127.0.0.1", port, timeout=10)
        client.login("alice", "wonderland")
        while not stop.is_set():
            began = time.monotonic()
            assert client.noop()[0] == "OK"
            worst[0] = max(worst[0], time.monotonic() - began)
        client.logout()
    except BaseException as exc:  # the test reports it
        errors.append(exc)


@pytest.mark.dovecot
def test_a_sighup_storm_during_sessions_coalesces_and_stalls_nothing(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """Held (a guard): 2,000 SIGHUPs as fast as `kill` sends them, while three sessions do
    NOOPs: the reloads coalesce (a SIGHUP during a reload asks for one more, no more), no NOOP
    waits long, systemd hears RELOADING=1 and READY=1 in pairs ending with READY=1, the event
    log is whole and every session's end is written once."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
        config = tmp_path / "imapveil.toml"
        config.write_text('log_level = "info"\n')
        env = {**os.environ, "NOTIFY_SOCKET": path}
        with imapveil(tmp_path, dovecot.address, "--config", str(config), env=env) as proxy:
            stop, worst = threading.Event(), [0.0]
            errors: list[BaseException] = []
            workers = [
                threading.Thread(target=_noops, args=(proxy.port, stop, worst, errors))
                for _ in range(3)
            ]
            for worker in workers:
                worker.start()
            time.sleep(0.3)
            for _ in range(2000):
                os.kill(proxy.process.pid, signal.SIGHUP)
            time.sleep(1.0)
            stop.set()
            for worker in workers:
                worker.join(20)
            assert proxy.stop() == 0
        said = [line for line in _drain(sock) if line in ("RELOADING=1", "READY=1")]
    assert not errors, errors
    assert worst[0] < 1.0, f"a NOOP waited {worst[0]:.2f} s"
    reloads = proxy.stderr.count(b"reloaded;")
    assert 1 <= reloads < 500, reloads
    assert said[0] == "READY=1" and said[-1] == "READY=1"
    assert said[1:] == ["RELOADING=1", "READY=1"] * reloads, said[:10]
    records, other = read_log(proxy.events)
    assert not other
    ends = [r["session"] for r in records if r["event"] == "session_end"]
    assert len(ends) == len(set(ends)) == 3


# --- Log flooding by clients (RFC 2971 §7).


def _label_sets(port: int) -> int:
    """Samples in the metrics exposition: each label set of each family is one."""
    answer = http_get(port, "/metrics")
    return sum(1 for line in answer.splitlines() if line and not line.startswith(b"#"))


def http_get(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer.partition(b"\r\n\r\n")[2]


def _flood(port: int, session: int) -> None:
    """One session of 40 IDs, each with names and values never seen before, then unknown verbs
    and refused lines (violations)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        stream = s.makefile("rb")
        assert stream.readline().startswith(b"* OK")
        commands = []
        for i in range(40):
            fields = " ".join(f'"x-f{session}-{i}-{k}" "v{session}.{i}.{k}"' for k in range(20))
            commands.append(f'i{i} ID ("name" "Client {session}-{i}" {fields})\r\n')
        commands.append("l LOGIN alice wonderland\r\n")
        for i in range(8):
            commands.append(f"u{i} XUNKNOWN{session}X{i} arg\r\n")
            commands.append(f'b{i} NOOP "unterminated\r\n')
        commands.append("z LOGOUT\r\n")
        s.sendall("".join(commands).encode())
        while stream.readline():
            pass


@pytest.mark.dovecot
def test_clients_with_ever_new_ids_and_verbs_grow_neither_metrics_nor_the_log(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """Held (a guard): sessions sending 40 IDs each with names, fields and values never seen
    before, unknown verbs and refused lines: the metrics keep the label sets they had after the
    first such session (families, verbs and fields outside the known ones are `other`), the
    event log has at most 10 `id` records a session and its violations capped, stderr says
    nothing of them at the default level, and no value a client sent is in a record."""
    metrics = free_port()
    with imapveil(tmp_path, dovecot.address, "--metrics", f"127.0.0.1:{metrics}") as proxy:
        _flood(proxy.port, 0)
        before = _label_sets(metrics)
        for session in range(1, 11):
            _flood(proxy.port, session)
        after = _label_sets(metrics)
        assert proxy.stop() == 0
    assert after == before, (before, after)
    records, other = read_log(proxy.events)
    assert not other
    by_session: dict[str, list[dict[str, object]]] = {}
    for r in records:
        if "session" in r:
            by_session.setdefault(str(r["session"]), []).append(r)
    assert len(by_session) == 11
    for rows in by_session.values():
        assert 1 <= sum(r["event"] == "id" for r in rows) <= 10
        assert any(r["event"] == "violation" for r in rows)
        (end,) = [r for r in rows if r["event"] == "session_end"]
        assert end["reason"] == "logout" and end["commands"] == 50  # refused lines: none
        assert sum(r["event"] == "violation" for r in rows) <= 21  # the cap and its summary
    text = proxy.events.read_text()
    assert "v3.7.2" not in text and "Client 3-17" not in text  # values; names are kept (10 IDs)
    assert b"Client 3" not in proxy.stderr and b"XUNKNOWN" not in proxy.stderr


# --- What a scrape costs the event loop.


def test_a_scrape_with_ten_thousand_sessions_open_costs_the_loop_little() -> None:
    """Found: `process_open_fds` listed /proc/self/fd at every scrape: with 10,000 sessions
    open (two descriptors each) that took 39 ms of the event loop, every session stalled that
    long at each scrape, and whoever reaches the metrics port could scrape back to back and
    stall them all the time. The count is the directory's size where the kernel says it
    (Linux 6.2 on: one stat), else a listing at most every `FD_COUNT_EVERY` seconds."""
    collector = ProcessCollector()
    held = [socket.socket() for _ in range(15_000)]
    try:
        began = time.process_time()
        for _ in range(20):
            found = {f.name: f for f in collector.collect()}
        took = (time.process_time() - began) / 20
        (sample,) = found["process_open_fds"].samples
        assert sample.value >= 15_000
    finally:
        for s in held:
            s.close()
    assert took < 0.01, f"{took * 1000:.1f} ms a collection"


def test_without_the_kernel_s_count_the_descriptors_are_listed_seldom(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the fix above, on a kernel older than 6.2 (no count in the directory's size): 50
    collections in a row list /proc/self/fd once, and the gauge keeps that count."""
    listed = []
    listdir = os.listdir

    def counted(path: object) -> list[str]:
        listed.append(path)
        return listdir(path)  # type: ignore[call-overload,no-any-return]

    monkeypatch.setattr(metrics_module, "_counted_by_size", lambda path: 0)
    monkeypatch.setattr(os, "listdir", counted)
    collector = ProcessCollector()
    for _ in range(50):
        found = {f.name: f for f in collector.collect()}
    assert len(listed) == 1
    assert found["process_open_fds"].samples[0].value > 0


@pytest.mark.dovecot
def test_clients_failing_tls_by_the_hundred_are_one_line_on_stderr(
    dovecot: Dovecot, tls_material: TlsMaterial, tmp_path: Path
) -> None:
    """Found: every connection to the TLS port that failed its handshake (clear text, a port
    scanner, nothing at all) wrote an info line to stderr (the journal): anyone could write
    lines there at the rate of their connections. Now the first is said, and then one line a
    minute with how many more there were (`limits.Occurrences`); each session is still
    recorded (`tls_error`), and the debug level still says each one."""
    tls_port = free_port()
    args = ["--cert", str(tls_material.cert), "--key", str(tls_material.key)]
    args += ["--listen-tls", f"127.0.0.1:{tls_port}"]
    with imapveil(tmp_path, dovecot.address, *args) as proxy:
        for i in range(150):
            with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as s:
                s.sendall(b"a%d LOGIN bob builder\r\n" % i)
                assert s.recv(100) == b""
        assert proxy.stop() == 0
    said = proxy.stderr.count(b"client TLS failed")
    assert 1 <= said <= 2, said
    ends = [r for r in proxy.records() if r["event"] == "session_end"]
    assert [e["reason"] for e in ends] == ["tls_error"] * 150


def test_an_upstream_that_is_away_is_not_a_warning_per_connection(tmp_path: Path) -> None:
    """Found with the one above: with the upstream away, each client connection wrote a
    warning (`upstream ... unavailable`): a reconnect storm of thousands of mail clients during
    an outage, thousands of lines a second. The first is said, then one a minute with the
    count; every session is recorded (`upstream_unavailable`)."""
    nowhere = ("127.0.0.1", free_port())  # nothing listens there
    with imapveil(tmp_path, nowhere, "--store", "off") as proxy:
        for _ in range(100):
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
                assert s.makefile("rb").readline().startswith(b"* BYE [UNAVAILABLE]")
        assert proxy.stop() == 0
    said = proxy.stderr.count(b"unavailable: ")
    assert 1 <= said <= 2, proxy.stderr.decode()[-2000:]
    ends = [r for r in proxy.records() if r["event"] == "session_end"]
    assert [e["reason"] for e in ends] == ["upstream_unavailable"] * 100


MANY_KEYS = "".join(f'k{i} = "v{i}"\n' for i in range(1_000_000))  # 20 MB of TOML


@pytest.mark.parametrize("which", ["config", "policy", "fingerprint_labels"])
def test_a_file_of_megabytes_is_refused_before_it_is_parsed(tmp_path: Path, which: str) -> None:
    """Found: a configuration (or policy, or labels) file of 20 MB was read whole and parsed
    before anything was checked: 8 s of pure-Python TOML parsing in the reload's worker thread,
    holding the interpreter lock in turns with every session, and its size in memory again.
    Files imapveil reads its settings from are at most `MAX_FILE` (1 MiB) now: a larger one is
    refused at once, with its size said."""
    big = tmp_path / "big.toml"
    big.write_text(MANY_KEYS)
    overrides = {"upstream": "127.0.0.1:143", "user_key_file": str(tmp_path / "key")}
    config = None
    if which == "config":
        config = str(big)
    else:
        overrides[which] = str(big)
    began = time.monotonic()
    with pytest.raises(ConfigError) as refused:
        load_all(config, overrides)
    assert time.monotonic() - began < 1.0
    assert "larger than 1 MiB" in str(refused.value), str(refused.value)[:300]


# --- The statistics store and what clients put in it.


async def test_a_nul_in_an_id_value_costs_no_statistics_row_in_postgresql(
    postgres: Postgres, caplog: pytest.LogCaptureFixture
) -> None:
    """A policy that records a field as sent (`passthrough`, or one's own `record = "keep"`)
    records an ID value sent as a literal with a NUL in it (`ID ("name" {5}` a NUL `bcd)`):
    PostgreSQL takes no NUL in text, refused the batch, then each of the session's rows, one
    transaction a row (and every other session's in the batch the same way): its statistics
    lost, and a warning each on stderr. So did a LOGIN name with a NUL (`user_identity =
    "plain"`). A NUL in a client's text is stored as U+FFFD now."""
    sink = StoreSink(postgres.url, spool=None, spool_cap=0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        with trio.fail_after(15):
            await sink.ready.wait()
            for i in range(20):
                sid = f"nul-{i}"
                sink.emit(SessionStarted(sid, "127.0.0.1:1", "u"))
                client: dict[str, str | None] = {"name": f"Evil\x00{i}", "version": "1\x002"}
                sink.emit(IdExchange(sid, "a", "authenticated", "OK", False, client, (), (), None))
                sink.emit(
                    SessionEnded(sid, "127.0.0.1:1", "u", "logout", None, "logout", "bo\x00b",
                                 5.0, 10, 20, 3)
                )  # fmt: skip
            await sink.flush()
        nursery.cancel_scope.cancel()
    assert sink.counts["dropped"].items == 0, sink.counts
    assert sink.counts["written"].sessions == 20
    assert "refused" not in caplog.text
    store = Store(postgres.url)
    store.connect()
    try:
        names = store.rows("SELECT DISTINCT name FROM id_exchanges")
    finally:
        store.close()
    assert ("Evil\ufffd3",) in [tuple(n) for n in names]


@pytest.mark.dovecot
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_a_read_only_spool_with_the_store_away_loses_rows_and_says_so(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """Held (a guard): the store away (PostgreSQL unreachable) and the spool's directory
    read-only (root without CAP_DAC_OVERRIDE, as the shipped unit runs: a dynamic user): the
    spool is said to be unusable once, sessions are relayed, the rows beyond the memory queue
    are dropped and counted, a `store_dropped` record says how many at exit, and the exit is
    clean."""
    spool = tmp_path / "stats-spool" / "p1"
    spool.mkdir(parents=True)
    spool.chmod(0o500)
    wrap = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    if os.geteuid() != 0:
        wrap = []  # the permissions hold for anyone else as they are
    args = ("--proxy-name", "p1", "--store", f"postgresql://nobody@127.0.0.1:{free_port()}/x")
    with imapveil(tmp_path, dovecot.address, *args, wrap=wrap) as proxy:
        for _ in range(10):
            client = imaplib.IMAP4("127.0.0.1", proxy.port, timeout=10)
            client.login("alice", "wonderland")
            client.logout()
        # Said when the writer first finds the store away, a batch's gathering after the first
        # session: ten sessions can be over before (a full run saw it, loaded).
        proxy.early_stderr += proxy.stderr_until(b"unusable")
        assert proxy.stop() == 0
    assert proxy.stderr.count(b"unusable") == 1
    assert b"Traceback" not in proxy.stderr
    dropped = [r for r in proxy.records() if r["event"] == "store_dropped"]
    assert [(d["sessions"], d["total_sessions"]) for d in dropped] == [(10, 10)]
    ends = [r for r in proxy.records() if r["event"] == "session_end"]
    assert [e["reason"] for e in ends] == ["logout"] * 10


async def test_a_frozen_postgresql_is_spooled_for_not_waited_for(
    postgres: Postgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found: a PostgreSQL that stops answering but whose kernel still acknowledges (its
    processes stopped, its host's disk hung, a paused VM with a running hypervisor network) held
    the writer's thread in a write for ever: neither `statement_timeout` (the server's own) nor
    TCP's timeouts end it. The writer counted the store as connected and did not spool; the
    queue filled and everything beyond it was dropped (here 1,000 of 3,000 sessions). Now a
    call the store does not answer within `STORE_WITHIN` is left to its thread, the store counts
    as away, rows go to the spool, and once the server runs again the spool is replayed: every
    session stored once."""
    monkeypatch.setattr(sink_module, "STORE_WITHIN", 1.0, raising=False)
    assert postgres.process is not None
    sink = StoreSink(postgres.url, spool=tmp_path / "spool", capacity=4000)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sink.run)
            with trio.fail_after(15):
                await sink.ready.wait()
            frozen = _process_tree(postgres.process.pid)  # each backend in a session of its own
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
            for i in range(3000):
                emit_one(sink, f"frozen-{i}")
                if i % 100 == 99:
                    await trio.sleep(0.25)  # 400 sessions a second
            await trio.sleep(2)
            spooled, dropped = sink.counts["spooled"].sessions, sink.counts["dropped"].items
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
            with trio.fail_after(60):
                await sink.flush()
            nursery.cancel_scope.cancel()
    finally:
        for pid in _process_tree(postgres.process.pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)
    assert dropped == 0, sink.counts
    assert spooled > 0
    store = Store(postgres.url)
    store.connect()
    try:
        (count,) = store.rows("SELECT count(*) FROM sessions WHERE session LIKE ?", ["frozen-%"])
    finally:
        store.close()
    assert count == (3000,)


def _process_tree(root: int) -> list[int]:
    """`root` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parent = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def emit_one(sink: StoreSink, sid: str) -> None:
    """What the relay emits for one session with an ID."""
    sink.emit(SessionStarted(sid, "127.0.0.1:1", "u"))
    client: dict[str, str | None] = {"name": "Thunderbird", "version": "128.1"}
    sink.emit(IdExchange(sid, "a", "authenticated", "OK", False, client, (), ("name",), None))
    sink.emit(
        SessionEnded(sid, "127.0.0.1:1", "u", "logout", None, "logout", "hmac:u", 5.0, 10, 20, 3)
    )
