"""Scale out: Debian's real HAProxy in front of two real `imapveil serve` processes, one shared
PostgreSQL statistics store, a Dovecot that takes PROXY headers from them (docs/scale-out.md).

Everything is on loopback at free ports with configurations generated in temporary directories;
HAProxy runs in the foreground (`-db`) as this test's child and is ended by its process group.
Clients connect from their own loopback addresses (127.0.0.2, ...), so the records can tell the
real client from HAProxy (127.0.0.1). Readiness and outcomes are polled for with a deadline.
"""

from __future__ import annotations

import csv
import imaplib
import io
import ipaddress
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio.testing

from imapveil.identity import identifier
from imapveil.protocol.proxy_header import build_v2
from imapveil.protocol.session import CoreConfig
from imapveil.records import SessionEnded
from imapveil.relay.connection import RelaySettings
from imapveil.relay.server import Admittance, Proxy, open_listeners
from tests.conftest import RecordingSink, TlsMaterial
from tests.helpers.dovecot import Dovecot, free_port, stop_group
from tests.helpers.postgres import Postgres
from tests.helpers.process import Running, complete_records, imapveil
from tests.stats.test_durability import query

pytestmark = pytest.mark.dovecot
T = TypeVar("T")
DEADLINE = 20.0
NAMES = ("gw-1", "gw-2")


def ensure_haproxy() -> str:
    """The haproxy binary. Fails loudly: scripts/check installs it, tests never skip."""
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
    if found is None:
        raise RuntimeError("haproxy is not installed: run `bash scripts/check`, which installs it")
    return found


def poll(what: str, probe: Callable[[], T | None], deadline: float = DEADLINE) -> T:
    """`probe()` once it returns something (not None), polled until `deadline` seconds."""
    end = time.monotonic() + deadline
    while (found := probe()) is None:
        assert time.monotonic() < end, f"not within {deadline:g} s: {what}"
        time.sleep(0.05)  # polling for an outcome, not waiting a fixed time
    return found


@dataclass
class Instance:
    name: str
    running: Running
    tls_port: int
    metrics_port: int

    def records(self) -> list[dict[str, Any]]:
        if not self.running.events.exists():
            return []
        return complete_records(self.running.events)

    def sessions_of_balancer(self) -> list[dict[str, Any]]:
        """Ended sessions from HAProxy's own address (127.0.0.1): its health checks."""
        return [
            r
            for r in self.records()
            if r["event"] == "session_end" and r["client"].startswith("127.0.0.1:")
        ]

    def sessions_of(self, client: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["event"] == "session_end" and r["client"] == client]


def haproxy_config(
    admin: Path, port: int, tls_port: int, instances: list[Instance], check: str = "http"
) -> str:
    """What docs/scale-out.md recommends, at loopback addresses and short check intervals."""
    if check == "http":
        # The instance's own health endpoint, on its metrics port: no PROXY header there.
        how = "    option httpchk GET /healthz\n    http-check expect status 200\n"
        checks = [f"check port {i.metrics_port} inter 300ms fall 2 rise 1" for i in instances]
    else:
        # The IMAP greeting through the relay, with a PROXY v2 header (command LOCAL).
        how = '    option tcp-check\n    tcp-check expect string "* OK"\n'
        checks = ["check check-send-proxy inter 300ms fall 2 rise 1" for _ in instances]
    plain = "".join(
        f"    server {i.name} 127.0.0.1:{i.running.port} send-proxy-v2"
        f" proxy-v2-options unique-id,crc32c {c}\n"
        for i, c in zip(instances, checks, strict=True)
    )
    tls = "".join(
        f"    server {i.name} 127.0.0.1:{i.tls_port} send-proxy-v2 track imap/{i.name}\n"
        for i in instances
    )
    return f"""global
    stats socket {admin} mode 600 level admin
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout check 2s
    retries 3
    option redispatch 1
frontend imap_in
    bind 127.0.0.1:{port}
    unique-id-format %[uuid()]
    default_backend imap
frontend imaps_in
    bind 127.0.0.1:{tls_port}
    default_backend imaps
backend imap
    balance roundrobin
{how}{plain}backend imaps
    balance roundrobin
{tls}"""


class HAProxy:
    def __init__(self, root: Path) -> None:
        self.binary = ensure_haproxy()
        self.root = root
        # A short path: a UNIX socket's name has room for 107 octets, pytest's tmp_path may not.
        self.socket = Path(tempfile.mkdtemp(prefix="imapveil-haproxy-")) / "admin.sock"
        self.port = free_port()
        self.tls_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, instances: list[Instance], check: str = "http") -> HAProxy:
        config = self.root / "haproxy.cfg"
        config.write_text(haproxy_config(self.socket, self.port, self.tls_port, instances, check))
        checked = subprocess.run(
            [self.binary, "-c", "-f", str(config)], capture_output=True, timeout=30, check=False
        )
        assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
        with (self.root / "haproxy.log").open("wb") as log:
            self.process = subprocess.Popen(
                [self.binary, "-db", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        poll("HAProxy sees every instance up", lambda: self._all_up(instances))
        return self

    def _all_up(self, instances: list[Instance]) -> bool | None:
        assert self.process is not None and self.process.poll() is None, self.log()
        states = self.states()
        wanted = [("imap", i.name) for i in instances] + [("imaps", i.name) for i in instances]
        return True if all(states.get(k) == "UP" for k in wanted) else None

    def command(self, line: str) -> str:
        """One command to HAProxy's runtime API (its admin socket), and the answer."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.socket))
            s.sendall(line.encode() + b"\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data.decode()

    def states(self) -> dict[tuple[str, str], str]:
        """(backend, server) → status, from the runtime API's `show stat`."""
        try:
            table = self.command("show stat")
        except OSError:
            return {}
        rows = csv.DictReader(io.StringIO(table.removeprefix("# ")))
        return {(r["pxname"], r["svname"]): r["status"] for r in rows}

    def log(self) -> str:
        return (self.root / "haproxy.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process, signal.SIGTERM)
        shutil.rmtree(self.socket.parent, ignore_errors=True)


class SourcedIMAP(imaplib.IMAP4):
    """imaplib's client, connecting from a chosen loopback address."""

    def __init__(self, port: int, source: str) -> None:
        self.source = source
        super().__init__("127.0.0.1", port, timeout=10)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self.source, 0)
        )


class SourcedIMAPS(imaplib.IMAP4_SSL):
    def __init__(self, port: int, source: str, context: ssl.SSLContext) -> None:
        self.source = source
        super().__init__("127.0.0.1", port, ssl_context=context, timeout=10)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = socket.create_connection(
            (self.host, self.port), timeout, source_address=(self.source, 0)
        )
        context: ssl.SSLContext = self.ssl_context
        return context.wrap_socket(sock, server_hostname=self.host)


def session(client: imaplib.IMAP4) -> str:
    """LOGIN, SELECT, LOGOUT; the client's own address as the proxy's records write it."""
    try:
        host, port = client.sock.getsockname()[:2]
        assert client.login("alice", "wonderland")[0] == "OK"
        assert client.select("INBOX")[0] == "OK"
        assert client.logout()[0] == "BYE"
    finally:  # closed even if an assertion fails: no socket left to the collector
        close(client)
    return f"{host}:{port}"


def close(client: imaplib.IMAP4) -> None:
    """The client's socket and file, closed (again, if LOGOUT closed them)."""
    client.file.close()
    client.sock.close()


@dataclass
class Cluster:
    dovecot: Dovecot
    postgres: Postgres
    instances: list[Instance]
    haproxy: HAProxy
    tls: TlsMaterial

    def plain(self, source: str) -> str:
        return session(SourcedIMAP(self.haproxy.port, source))

    def implicit_tls(self, source: str) -> str:
        return session(SourcedIMAPS(self.haproxy.tls_port, source, self.tls.client_context()))

    def served_by(self, client: str) -> str:
        """The name of the instance whose event log has this client's ended session."""

        def probe() -> str | None:
            found = [i.name for i in self.instances for _ in i.sessions_of(client)]
            assert len(found) <= 1, f"{client} recorded {len(found)} times: {found}"
            return found[0] if found else None

        return poll(f"the session of {client} in an event log", probe)

    def started_on(self, client: str) -> str:
        """The name of the instance whose event log has this client's session start."""

        def probe() -> str | None:
            for instance in self.instances:
                for r in instance.records():
                    if r["event"] == "session_start" and r["client"] == client:
                        return instance.name
            return None

        return poll(f"the start of the session of {client}", probe)

    def instance(self, name: str) -> Instance:
        (found,) = [i for i in self.instances if i.name == name]
        return found

    def stop_all(self) -> None:
        self.haproxy.stop()
        for instance in self.instances:
            assert instance.running.stop() == 0, instance.running.stderr.decode()[-2000:]


@pytest.fixture(scope="module")
def proxied_dovecot() -> Iterator[Dovecot]:
    """Dovecot with `haproxy = yes`: the instances pass the real client on (PROXY v2)."""
    server = Dovecot(haproxy=True).start()
    try:
        yield server
    finally:
        server.cleanup()


def start_cluster(
    stack: ExitStack, tmp_path: Path, dovecot: Dovecot, tls: TlsMaterial, check: str = "http"
) -> Cluster:
    postgres = Postgres().start()
    stack.callback(postgres.cleanup)
    instances = []
    # One after the other: the first creates the user key both share (same user, same hash).
    for name in NAMES:
        tls_port, metrics_port = free_port(), free_port()
        args = (
            "--proxy-name", name,
            "--store", postgres.url,
            "--proxy-protocol-from", "127.0.0.1/32",
            "--upstream-proxy-protocol",
            "--listen-tls", f"127.0.0.1:{tls_port}",
            "--cert", str(tls.cert), "--key", str(tls.key),
            "--metrics", f"127.0.0.1:{metrics_port}",
        )  # fmt: skip
        running = stack.enter_context(imapveil(tmp_path, dovecot.address, *args))
        instances.append(Instance(name, running, tls_port, metrics_port))
    haproxy = HAProxy(tmp_path)
    stack.callback(haproxy.stop)
    haproxy.start(instances, check)
    return Cluster(dovecot, postgres, instances, haproxy, tls)


@pytest.fixture
def cluster(
    tmp_path: Path, proxied_dovecot: Dovecot, tls_material: TlsMaterial
) -> Iterator[Cluster]:
    with ExitStack() as stack:
        yield start_cluster(stack, tmp_path, proxied_dovecot, tls_material)


def test_the_real_client_address_reaches_the_records(cluster: Cluster) -> None:
    plain = [cluster.plain("127.0.0.2"), cluster.plain("127.0.0.3")]
    secure = cluster.implicit_tls("127.0.0.4")
    served = {client: cluster.served_by(client) for client in [*plain, secure]}
    cluster.stop_all()
    assert set(served.values()) == set(NAMES)  # round robin: both instances served
    records = [r for i in cluster.instances for r in i.records()]
    clients = {r["client"] for r in records if "client" in r}
    # Every record names a real client, none HAProxy's own address (127.0.0.1).
    assert clients == {*plain, secure}
    ends = {r["client"]: r for r in records if r["event"] == "session_end"}
    assert all(ends[c]["reason"] == "logout" and ends[c]["user"] for c in ends)
    # TLS ended at imapveil (HAProxy passed it through): the record says so.
    assert ends[secure]["client_tls"] is True
    assert not ends[plain[0]]["client_tls"]
    # And Dovecot saw the real clients too, from the instances' own PROXY v2 headers.
    log = cluster.dovecot.wait_for_log("rip=127.0.0.4", 1)
    logins = [line for line in log.splitlines() if "Login: user=<alice>" in line]
    assert all("rip=127.0.0.1," not in line for line in logins)
    assert "rip=127.0.0.2," in log and "rip=127.0.0.3," in log


def test_the_shared_store_counts_every_session_once(cluster: Cluster) -> None:
    count = 6
    clients = [cluster.plain(f"127.0.0.{10 + n}") for n in range(count)]
    served = [cluster.served_by(client) for client in clients]
    cluster.stop_all()  # each instance drains its queue to the store before it exits
    rows = query(
        cluster.postgres.url,
        "SELECT proxy, COUNT(*), COUNT(DISTINCT session), COUNT(DISTINCT user_id)"
        " FROM sessions GROUP BY proxy ORDER BY proxy",
    )
    assert rows == [(name, served.count(name), served.count(name), 1) for name in NAMES], (
        f"served by {served}"
    )
    assert sum(r[1] for r in rows) == count
    # Both instances hash the user with the shared key: one user, not one per instance.
    assert query(cluster.postgres.url, "SELECT COUNT(DISTINCT user_id) FROM sessions") == [(1,)]
    # The health checks (HTTP, on the metrics port) made no sessions in the event logs either.
    starts = [r for i in cluster.instances for r in i.records() if r["event"] == "session_start"]
    assert sorted(r["client"] for r in starts) == sorted(clients)


def test_stopping_one_instance_moves_new_sessions_to_the_other(cluster: Cluster) -> None:
    gone, staying = cluster.instances
    before = [cluster.plain("127.0.0.2") for _ in range(2)]
    assert sorted(cluster.served_by(c) for c in before) == sorted(NAMES)
    gone.running.signal(signal.SIGTERM)  # what `systemctl stop` does
    assert gone.running.stop() == 0
    # From the moment it is gone, every new session succeeds and lands on the other one:
    # a refused connection is redispatched before the health check has even noticed.
    after = [cluster.plain("127.0.0.3") for _ in range(4)]
    assert [cluster.served_by(c) for c in after] == [staying.name] * 4
    poll("HAProxy marks the stopped instance down", lambda: _down(cluster, gone.name))
    after += [cluster.plain("127.0.0.3") for _ in range(2)]
    assert [cluster.served_by(c) for c in after] == [staying.name] * 6
    cluster.stop_all()
    rows = query(cluster.postgres.url, "SELECT proxy, COUNT(*) FROM sessions GROUP BY proxy")
    assert sorted(rows) == [(gone.name, 1), (staying.name, 7)]


def test_a_drained_instance_keeps_its_sessions_and_gets_no_new_ones(cluster: Cluster) -> None:
    """The maintenance procedure of docs/scale-out.md: `set server ... state drain` on the plain
    backend; its TLS twin follows (`track`); an open session on the drained instance goes on."""
    open_client = SourcedIMAP(cluster.haproxy.port, "127.0.0.5")
    try:
        assert open_client.login("alice", "wonderland")[0] == "OK"
        host, port = open_client.sock.getsockname()[:2]
        drained = cluster.instance(cluster.started_on(f"{host}:{port}"))
        (other,) = [i for i in cluster.instances if i is not drained]
        reply = cluster.haproxy.command(f"set server imap/{drained.name} state drain")
        assert reply.strip() == "", reply
        assert cluster.haproxy.states()[("imaps", drained.name)] == "DRAIN"
        new = [
            cluster.plain("127.0.0.3"),
            cluster.implicit_tls("127.0.0.4"),
            cluster.plain("127.0.0.3"),
        ]
        assert [cluster.served_by(c) for c in new] == [other.name] * 3
        assert open_client.select("INBOX")[0] == "OK"  # the open session goes on
        assert open_client.logout()[0] == "BYE"
        assert cluster.served_by(f"{host}:{port}") == drained.name
    finally:  # closed even if an assertion above fails
        close(open_client)


def test_an_imap_level_health_check_is_recorded_as_a_session(
    tmp_path: Path, proxied_dovecot: Dovecot, tls_material: TlsMaterial
) -> None:
    """What docs/scale-out.md says an IMAP-level check costs, and why the HTTP check is the
    recommended one: HAProxy's PROXY v2 header for a check says LOCAL (no addresses), and the
    session that follows is recorded like any other, from HAProxy's own address."""
    with ExitStack() as stack:
        cluster = start_cluster(stack, tmp_path, proxied_dovecot, tls_material, check="tcp")

        def checked_twice() -> bool | None:
            counts = [len(i.sessions_of_balancer()) for i in cluster.instances]
            return True if min(counts) >= 2 else None

        poll("two recorded checks on each instance", checked_twice)
        cluster.stop_all()
        records = [r for i in cluster.instances for r in i.records()]
        sql = "SELECT family, reason, COUNT(*) FROM sessions GROUP BY family, reason"
        rows = query(cluster.postgres.url, sql)
    ends = [r for r in records if r["event"] == "session_end"]
    assert ends and all(r["client"].startswith("127.0.0.1:") for r in ends)
    shapes = {(r["reason"], r["state"], r["commands"], r["bytes_from_client"]) for r in ends}
    assert shapes == {("client_closed", "not_authenticated", 0, 0)}
    assert not [r for r in records if r["event"] == "violation"]
    assert rows == [("no ID", "client_closed", len(ends))]


def _down(cluster: Cluster, name: str) -> bool | None:
    states = cluster.haproxy.states()
    return True if states.get(("imap", name), "").startswith("DOWN") else None


def test_a_proxy_header_and_the_tls_handshake_in_one_segment(
    tmp_path: Path, proxied_dovecot: Dovecot, tls_material: TlsMaterial
) -> None:
    """A balancer may send its PROXY header and the client's ClientHello in one segment (HAProxy
    does, when the client spoke first). The header is taken, not one octet more: the handshake
    is TLS's to read. (Read with the header, it was lost and the handshake stalled.)"""
    tls_port = free_port()
    args = ("--listen-tls", f"127.0.0.1:{tls_port}", "--cert", str(tls_material.cert),
            "--key", str(tls_material.key), "--proxy-protocol-from", "127.0.0.1/32",
            "--upstream-proxy-protocol", "--store", "off")  # fmt: skip
    with imapveil(tmp_path, proxied_dovecot.address, *args) as proxy:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = tls_material.client_context().wrap_bio(
            incoming, outgoing, server_hostname="127.0.0.1"
        )
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        header = build_v2(("192.0.2.7", 40000), ("198.51.100.1", 993))
        with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as s:
            s.sendall(header + outgoing.read())
            greeting = _over_tls(s, tls, incoming, outgoing, b"a LOGOUT\r\n")
        assert proxy.stop() == 0
    assert greeting.startswith(b"* OK") and b"a OK" in greeting
    (end,) = [r for r in proxy.records() if r["event"] == "session_end"]
    assert end["client"] == "192.0.2.7:40000" and end["client_tls"] and end["reason"] == "logout"


def _over_tls(
    s: socket.socket,
    tls: ssl.SSLObject,
    incoming: ssl.MemoryBIO,
    outgoing: ssl.MemoryBIO,
    command: bytes,
) -> bytes:
    """Finish the handshake, send `command`, and return all the server says until it closes."""
    received = b""
    handshaking, sent = True, False
    while True:
        try:
            if handshaking:
                tls.do_handshake()
                handshaking = False
            if not sent:
                tls.write(command)
                sent = True
            while chunk := tls.read(65536):
                received += chunk
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return received
        if pending := outgoing.read():
            s.sendall(pending)
        data = s.recv(65536)
        if not data:
            return received
        incoming.write(data)


V1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 143\r\n"


@pytest.mark.parametrize("header", [V1, build_v2(("192.0.2.7", 51234), ("198.51.100.1", 143))])
async def test_a_header_that_arrives_in_pieces_is_taken_exactly(
    dovecot: Dovecot, header: bytes
) -> None:
    """The header reader peeks and takes only what is header, however the header is cut, and
    the commands that came in the same segment as its end are the session's."""
    relay = RelaySettings(*dovecot.address, CoreConfig(identify_user=identifier("none", None)))
    trusted = (ipaddress.ip_network("127.0.0.1/32"),)
    sink = RecordingSink()
    proxy = Proxy(Admittance(relay, proxy_protocol_from=trusted), sink, shutdown_grace=2.0)
    commands = b"a LOGIN alice wonderland\r\nb LOGOUT\r\n"
    reply = b""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            listeners = await open_listeners("127.0.0.1", 0)
            await nursery.start(proxy.serve, listeners)
            port = listeners[0].socket.getsockname()[1]
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                for piece in (header[:3], header[3:14], header[14:] + commands):
                    await stream.send_all(piece)
                    await trio.testing.wait_all_tasks_blocked()  # the proxy has peeked
                while chunk := await stream.receive_some():
                    reply += chunk
            proxy.stop()
    assert b"a OK" in reply and reply.startswith(b"* OK")
    (end,) = sink.of(SessionEnded)
    assert end.client == "192.0.2.7:51234" and end.reason == "logout"


def documented(language: str) -> str:
    """The one ```language block of docs/scale-out.md."""
    text = (Path(__file__).parents[2] / "docs" / "scale-out.md").read_text()
    (block,) = [part.split("```", 1)[0] for part in text.split(f"```{language}\n")[1:]]
    return block


def test_the_documented_configurations_are_valid(tmp_path: Path, tls_material: TlsMaterial) -> None:
    haproxy_cfg = tmp_path / "haproxy.cfg"
    haproxy_cfg.write_text(documented("haproxy"))
    checked = subprocess.run(
        [ensure_haproxy(), "-c", "-f", str(haproxy_cfg)], capture_output=True, timeout=30,
        check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
    instance = tmp_path / "imapveil.toml"
    instance.write_text(documented("toml"))
    # The files it names exist on the instance, not here: these flags stand in for them.
    here = ("--cert", str(tls_material.cert), "--key", str(tls_material.key),
            "--user-key-file", str(tmp_path / "user-key"))  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "imapveil", "check-config", str(instance), *here],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
