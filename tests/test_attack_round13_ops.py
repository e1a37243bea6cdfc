"""Attack round 13 on operations (attack13o): reloads beside the signal task, per-prefix limits,
what held. Each test failed before the fix named in its docstring, or guards what held."""

from __future__ import annotations

import contextlib
import imaplib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from imapveil.config import ConfigError
from imapveil.relay import limits as limits_module
from imapveil.relay.limits import Admission, Limits
from imapveil.service import Service, load_all
from tests.helpers.dovecot import Dovecot, free_port
from tests.helpers.postgres import Postgres
from tests.helpers.process import (
    datagrams_waiting,
    imapveil,
    poll,
    read_log,
    service_overrides,
    signal_handlers_restored,
    socket_activated,
)


def test_rotating_addresses_past_the_bucket_cap_cost_linear_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found: with `MAX_TRACKED` rate buckets all still refilling (a low `max_connection_rate`,
    addresses rotated faster than a token comes back), every new address scanned all of them
    (`_forget_full`) to drop one: 19 ms a connection at the real cap of 100,000, the event loop
    and every session stalled (quadratic). Now a full table forgets a tenth at once: the next
    scan comes after that many new addresses."""
    monkeypatch.setattr(limits_module, "MAX_TRACKED", 1000)
    scans = 0
    forget = Admission._forget_full

    def counted(self: Admission, now: float) -> None:
        nonlocal scans
        scans += 1
        forget(self, now)

    monkeypatch.setattr(Admission, "_forget_full", counted)
    gate = Admission(Limits(max_sessions=10**9, max_connection_rate=0.01, ipv6_prefix=128))
    for i in range(11_000):
        host = f"2001:db8::{i:x}"
        assert gate.admit(host, i * 0.001) is None
        gate.release(gate.key(host))
    assert len(gate._buckets) <= 1000
    assert scans <= 110, f"{scans} scans of the whole table for 10,000 addresses past the cap"


def _notifications(sock: socket.socket, until: str) -> list[str]:
    """Each datagram's first line, up to the first that is `until`."""
    seen: list[str] = []
    while until not in seen:
        seen.append(sock.recv(4096).decode().split("\n")[0])
    return seen


def _left(sock: socket.socket) -> list[str]:
    """The datagrams waiting now (the service has exited: no more come)."""
    return datagrams_waiting(sock)


@pytest.mark.dovecot
def test_a_sighup_while_stopping_tells_systemd_no_reload(
    dovecot: Dovecot, tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    """Found: a SIGHUP in the grace period (a log rotation's reload; or one sent with the
    SIGTERM, read before the reload had begun, so not abandoned) reloaded and sent RELOADING=1
    after STOPPING=1, with no READY=1 after it: systemd was told the stopping service was
    reloading. The reload still reopens the event log (rotation), but says nothing to systemd."""
    sock, path = notify_socket
    env = {**os.environ, "NOTIFY_SOCKET": path}
    with imapveil(tmp_path, dovecot.address, "--shutdown-grace", "20", env=env) as proxy:
        assert _notifications(sock, "READY=1")
        client = imaplib.IMAP4("127.0.0.1", proxy.port)
        client.login("alice", "wonderland")
        proxy.signal(signal.SIGTERM)
        assert _notifications(sock, "STOPPING=1")[-1] == "STOPPING=1"
        proxy.signal(signal.SIGHUP)
        proxy.stderr_until(b"reloaded")
        client.logout()
        # The stopping service ends once its last session has: a SIGTERM from `stop()` before
        # the proxy had read the LOGOUT's end (imaplib returns at `* BYE`) was the second
        # signal, and the session ended `shutdown` (seen under load).
        proxy.process.wait(timeout=15)
        assert proxy.stop() == 0
    assert _left(sock) == [], "notified after STOPPING=1"
    ends = [r for r in proxy.records() if r["event"] == "session_end"]
    assert [e["reason"] for e in ends] == ["logout"]


SECRET = "s3cret-Pw"  # noqa: S105 (a test value)


@pytest.mark.parametrize("parameter", ["password", "pass%77ord", "PASSWORD"])
def test_a_store_password_given_as_a_parameter_is_not_shown(parameter: str) -> None:
    """Found: a PostgreSQL URL's password may be a query parameter (libpq's `?password=`, its
    key percent-decoded as well); the redaction looked only at `user:PASSWORD@`, and `imapveil
    stats` and `check-config --online` printed the password when the store was away."""
    url = f"postgresql://nobody@127.0.0.1:1/stats?sslmode=disable&{parameter}={SECRET}"
    done = subprocess.run(
        [sys.executable, "-m", "imapveil", "stats", "--store", url],
        check=False,
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert b"statistics store postgresql://nobody@127.0.0.1:1/stats?" in done.stderr
    assert SECRET.encode() not in done.stderr + done.stdout


@pytest.mark.dovecot
def test_the_service_does_not_log_a_store_password_given_as_a_parameter(
    dovecot: Dovecot, tmp_path: Path, postgres: Postgres
) -> None:
    """Found with the one above: `statistics store ready (URL)` showed `?password=...`."""
    url = f"{postgres.url}?password={SECRET}"
    with imapveil(tmp_path, dovecot.address, "--store", url) as proxy:
        seen = proxy.early_stderr + proxy.stderr_until(b"statistics store ready")
        assert proxy.stop() == 0
    assert b"password=***" in seen
    assert SECRET.encode() not in seen + proxy.stderr


@pytest.mark.parametrize(
    "line",
    [
        'policy = "' + "x" * 5000 + '"',  # ENAMETOOLONG from Path.exists()
        'policy = "/etc/imapveil/p\\u0000.toml"',  # ValueError: embedded null byte
        'events = "{tmp}/events\\u0000.jsonl"',  # the reload's reopen: ValueError
        'cert = "{tmp}/c\\u0000.pem"\nkey = "{tmp}/k.pem"',  # check_files: ValueError
    ],
    ids=["long policy name", "NUL in policy", "NUL in events", "NUL in cert"],
)
async def test_a_reload_of_a_file_naming_an_impossible_path_is_refused(
    dovecot: Dovecot, tmp_path: Path, line: str
) -> None:
    """Found: a reload whose configuration named a policy too long for a file name (OSError
    from `Path.exists`, not a PolicyError) or any file with a NUL in it (TOML's `\\u0000`:
    ValueError from open) raised out of `reload`: the service ended with a traceback, exit
    status 1, every session cut off. Such names are refused now, the old configuration kept."""
    config = tmp_path / "imapveil.toml"
    config.write_text("")
    port = free_port()
    overrides = service_overrides(dovecot.address, port, tmp_path)
    service = Service(str(config), overrides, load_all(str(config), overrides))
    config.write_text(line.replace("{tmp}", str(tmp_path)) + "\n")
    loaded = service.loaded
    with signal_handlers_restored(), trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.run)
            await service.reload()
            service.proxy.stop()
    assert service.loaded is loaded
    records, other = read_log(tmp_path / "events.jsonl")
    assert not other
    refused = [r for r in records if r["event"] == "config" and not r["ok"]]
    assert len(refused) == 1, records


@pytest.mark.dovecot
def test_a_balancer_on_a_dual_stack_socket_is_known_by_its_ipv4_network(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """Found: the shipped imapveil.socket (`ListenStream=143`) is dual-stack, so an IPv4
    balancer's connections come from `::ffff:10.0.0.5`; the limits count such an address as its
    IPv4 one (ab53104), but `proxy_protocol_from = ["10.0.0.0/8"]` (and `trusted_networks`) did
    not match it: the PROXY header went to Dovecot as a command, every session was the
    balancer's. An IPv4-mapped address now lies in the IPv4 networks its IPv4 address is in."""
    with socket.socket(socket.AF_INET6) as listening:
        listening.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listening.bind(("::ffff:127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        fd = listening.fileno()
        wrap = socket_activated(fd)
        with imapveil(
            tmp_path, dovecot.address, "--proxy-protocol-from", "127.0.0.0/8",
            wrap=wrap, pass_fds=[fd],
        ) as proxy:  # fmt: skip
            listening.close()
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                client.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 143\r\n")
                stream = client.makefile("rb")
                assert stream.readline().startswith(b"* OK")
                client.sendall(b"a LOGIN alice wonderland\r\nb LOGOUT\r\n")
                answers = stream.read()
            assert proxy.stop() == 0
    assert b"a OK" in answers, answers
    starts = [r for r in proxy.records() if r["event"] == "session_start"]
    assert [s["client"] for s in starts] == ["203.0.113.7:5555"]


def test_an_exemption_written_as_ipv4_mapped_still_exempts() -> None:
    """Found with the one above: since the limits read `::ffff:198.51.100.7` as 198.51.100.7
    (ab53104), an exempt network written as the dual-stack listener shows its clients
    (`::ffff:198.51.100.0/120`, as the logs print them) exempted no one any more."""
    office = ipaddress.ip_network("::ffff:198.51.100.0/120")
    gate = Admission(Limits(max_sessions_per_client=1, exempt=(office,)))
    assert [gate.admit("::ffff:198.51.100.7", 0.0) for _ in range(3)] == [None, None, None]
    assert gate.key("::ffff:198.51.100.7") == limits_module.UNCOUNTED


def test_ipv4_clients_behind_a_translator_are_not_one_ipv6_network() -> None:
    """Found: IPv4 clients reaching an IPv6-only proxy through a stateless translator (SIIT-DC,
    RFC 7755) arrive as `64:ff9b::a.b.c.d` (RFC 6052's well-known prefix), and Teredo clients
    as `2001:0:SERVER::/64`: every IPv4 user of the translator (every user of one Teredo server)
    was one client for the per-/64 limits, and one of them reconnecting in a loop shut out all
    the others. They count as the IPv4 address in them now, as an IPv4-mapped address does."""
    gate = Admission(Limits(max_sessions_per_client=1))
    nat64 = ["64:ff9b::198.51.100.1", "64:ff9b::198.51.100.2", "64:ff9b::203.0.113.9"]
    assert [gate.admit(a, 0.0) for a in nat64] == [None, None, None]
    assert gate.admit("64:ff9b::c633:6401", 0.0) == "1 sessions from one address"  # the 1st
    assert gate.key(nat64[0]) == "198.51.100.1"
    # Teredo: server 65.54.227.120; clients 192.0.2.45 and 192.0.2.46 (obfuscated, port 40000)
    teredo = ["2001:0:4136:e378:8000:63bf:3fff:fdd2", "2001:0:4136:e378:8000:63bf:3fff:fdd1"]
    assert [gate.admit(a, 0.0) for a in teredo] == [None, None]
    assert gate.key(teredo[0]) == "192.0.2.45"


def _descriptors(pid: int) -> list[str]:
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            found.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return sorted(found)


def _shut(client: imaplib.IMAP4) -> None:
    with contextlib.suppress(OSError):  # logged out already: closed
        client.shutdown()


@pytest.mark.dovecot
def test_a_hundred_reloads_then_a_signal_storm_leak_nothing_and_lose_nothing(
    dovecot: Dovecot, tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    """Held (a guard): 100 reloads, each awaited, leave the descriptors and threads as they
    were; then SIGTERM, SIGHUP and SIGINT at once: exit 0, each session's end written once, the
    event log whole, STOPPING=1 said once and last."""
    sock, path = notify_socket
    config = tmp_path / "imapveil.toml"
    config.write_text('log_level = "info"\n')
    env = {**os.environ, "NOTIFY_SOCKET": path}
    with (
        imapveil(tmp_path, dovecot.address, "--config", str(config), env=env) as proxy,
        contextlib.ExitStack() as closing,
    ):
        pid = proxy.process.pid
        clients = [imaplib.IMAP4("127.0.0.1", proxy.port) for _ in range(3)]
        for client in clients:
            closing.callback(_shut, client)  # whatever fails: no socket left to the next test
            client.login("alice", "wonderland")
        proxy.signal(signal.SIGHUP)  # the first reload starts the worker thread and the store
        proxy.stderr_until(b"reloaded")
        fds, threads = _descriptors(pid), len(os.listdir(f"/proc/{pid}/task"))
        for _ in range(100):
            proxy.signal(signal.SIGHUP)
            proxy.stderr_until(b"reloaded")
            assert _notifications(sock, "READY=1")[-1] == "READY=1"
        assert _descriptors(pid) == fds
        # Two jobs in trio's worker threads at once (a reload's and the sinks', on a loaded
        # machine) leave one more idle thread, which trio's cache ends after 10 s idle: a leak
        # would stay.
        poll(lambda: len(os.listdir(f"/proc/{pid}/task")) <= threads, 15)
        assert len(os.listdir(f"/proc/{pid}/task")) == threads
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            proxy.signal(signum)
        proxy.stderr_until(b"sessions get BYE now")  # the SIGINT: a second stop
        for client in clients:
            with contextlib.suppress(imaplib.IMAP4.abort, OSError):
                client.logout()
        assert proxy.stop() == 0
    said = _left(sock)
    assert said.count("STOPPING=1") == 1 and said[-1] == "STOPPING=1", said
    records, other = read_log(proxy.events)
    assert not other
    ends = [r["session"] for r in records if r["event"] == "session_end"]
    starts = [r["session"] for r in records if r["event"] == "session_start"]
    assert sorted(ends) == sorted(starts) and len(set(ends)) == 3


async def test_a_reload_says_which_changes_need_a_restart(
    dovecot: Dovecot, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Found: a reload that changed the statistics store, the metrics port or the TLS
    listeners said `reloaded` and nothing else, and kept the ones it started with (only
    `listen` and `proxy_name` were said to need a restart): an operator moving the statistics
    to PostgreSQL saw them go on into the SQLite file, with no word why."""
    config = tmp_path / "imapveil.toml"
    config.write_text("")
    port = free_port()
    overrides = service_overrides(dovecot.address, port, tmp_path)
    service = Service(str(config), overrides, load_all(str(config), overrides))
    metrics = free_port()
    config.write_text(
        f'store = "{tmp_path}/other.sqlite"\nmetrics = "127.0.0.1:{metrics}"\nretention_days = 7\n'
    )
    with signal_handlers_restored(), trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.run)
            await service.reload()
            service.proxy.stop()
    said = [r.getMessage() for r in caplog.records if "restart to apply" in r.getMessage()]
    for name in ("store", "metrics", "retention_days"):
        assert any(m.startswith(f"{name} changed") for m in said), (name, said)


def test_a_reload_changing_the_ipv6_prefix_releases_sessions_where_admitted() -> None:
    """Held (a guard): sessions admitted per /64 and released after a reload to /128 (and back)
    come off the counts they were put on; none is left, none goes negative."""
    gate = Admission(Limits(max_sessions_per_client=2))
    hosts = ["2001:db8:1:2::1", "2001:db8:1:2::2"]
    assert [gate.admit(h, 0.0) for h in hosts] == [None, None]
    assert gate.admit("2001:db8:1:2::3", 0.0) == "2 sessions from one address"
    old = [gate.key(h) for h in hosts]
    gate.limits = Limits(max_sessions_per_client=2, ipv6_prefix=128)  # the reload
    assert gate.admit("2001:db8:1:2::3", 0.1) is None
    new = gate.key("2001:db8:1:2::3")
    for key in old:
        gate.release(key)
    gate.limits = Limits(max_sessions_per_client=2, ipv6_prefix=32)  # and another
    assert [gate.admit("2001:db8:ffff::1", 0.2) for _ in range(3)][:2] == [None, None]
    gate.release(new)
    assert gate._per_address == {"2001:db8::/32": 2} and gate.active == 2


def test_refusals_from_rotating_prefixes_are_tracked_within_capacity() -> None:
    """Held (a guard): refusals from ever new /64s keep at most `capacity` tallies and one for
    the others; the summaries at the end count every refusal."""
    gate = Admission(Limits(max_sessions=0))  # everyone refused: sessions in all
    refusals = limits_module.Refusals(capacity=100)
    limits = gate.limits
    for i in range(1000):
        host = f"2001:db8:{i:x}::1"
        why = gate.admit(host, 0.0)
        assert why is not None
        refusals.note(limits.client(host), why, 0.0)
    assert len(refusals) == 101
    summaries = refusals.due(1.0, final=True)
    assert sum(s.count for s in summaries) + 101 == 1000  # the first of each said at once


async def _connect(port: int) -> trio.SocketStream:
    while True:
        try:
            return await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            await trio.sleep(0.01)  # not listening yet


async def test_a_reload_cut_short_after_it_took_effect_still_says_so(
    dovecot: Dovecot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found: a SIGTERM while a reload reopened the event log (its drain waiting on a slow disk)
    abandoned the reload after the new configuration and policy had taken effect: the grace
    period's ID commands went through the new policy, but no `config` or `policy` record said
    it was loaded. They are written now whatever cuts the reopening short (to the file open
    before, if it is)."""
    config = tmp_path / "imapveil.toml"
    config.write_text("")
    port = free_port()
    overrides = service_overrides(dovecot.address, port, tmp_path)
    service = Service(str(config), overrides, load_all(str(config), overrides))
    config.write_text('policy = "strict"\n')
    reopening = trio.Event()

    async def slow_reopen(target: str) -> None:
        reopening.set()
        await trio.sleep_forever()

    monkeypatch.setattr(service.sink, "reopen", slow_reopen)
    finished: list[int] = []

    async def serve() -> None:
        finished.append(await service.run())

    with signal_handlers_restored(), trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            async with await _connect(port) as stream:
                assert (await stream.receive_some(4096)).startswith(b"* OK")
                os.kill(os.getpid(), signal.SIGHUP)
                await reopening.wait()
                os.kill(os.getpid(), signal.SIGTERM)
    assert finished == [0]
    assert service.holder.current.name == "strict"  # it took effect
    records, other = read_log(tmp_path / "events.jsonl")
    assert not other
    policies = [(r["policy"], r["ok"]) for r in records if r["event"] == "policy"]
    assert policies == [("default", True), ("strict", True)], policies


@pytest.mark.parametrize(
    "store",
    [
        f"postgresql:/imapveil:{SECRET}@db.internal/stats",  # one slash short
        f"postgres:imapveil:{SECRET}@db.internal/stats",
        f"host=db.internal user=imapveil password={SECRET} dbname=stats",  # libpq key=value
    ],
    ids=["one slash short", "no slashes", "key=value"],
)
def test_a_store_url_written_wrong_is_refused_without_its_password(
    tmp_path: Path, store: str
) -> None:
    """Found: a PostgreSQL URL written wrong was taken for a SQLite file name: one slash short,
    it was refused with the whole value in the message (`directory postgresql:/USER:PASSWORD@HOST
    does not exist`: on stderr and, at a reload, in the event log's `config` record); libpq's
    key=value form was accepted, a SQLite file created with the password in its name, and the
    name logged (`statistics store ready (...)`). Both are refused, the value not shown."""
    overrides = {"upstream": "127.0.0.1:143", "user_key_file": str(tmp_path / "key")}
    with pytest.raises(ConfigError) as refused:
        load_all(None, {**overrides, "store": store})
    assert SECRET not in str(refused.value)
    assert "postgresql://" in str(refused.value)
