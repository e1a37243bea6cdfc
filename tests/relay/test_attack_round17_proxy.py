"""Round 17: the PROXY protocol front and the HAProxy deployment, attacked from outside with raw
sockets and with Debian's real HAProxy (as tests/relay/test_haproxy.py runs it)."""

from __future__ import annotations

import functools
import imaplib
import ipaddress
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from imapveil.identity import identifier
from imapveil.protocol.proxy_header import V2_SIGNATURE, build_v2, parse
from imapveil.protocol.session import CoreConfig
from imapveil.records import SessionEnded
from imapveil.relay.connection import RelaySettings
from imapveil.relay.server import Admittance, Proxy, open_listeners
from tests.conftest import RecordingSink
from tests.helpers.dovecot import Dovecot
from tests.helpers.process import imapveil, socket_activated
from tests.relay.test_haproxy import (
    HAProxy,
    SourcedIMAP,
    poll,
    session,
)
from tests.stats.test_durability import query

LOCAL = V2_SIGNATURE + bytes([0x20, 0x00, 0, 0])
SPOOF = b"PROXY TCP4 192.0.2.66 198.51.100.1 51234 143\r\n"


def reset_after(port: int, data: bytes) -> None:
    """Connect, send `data`, and reset the connection (SO_LINGER 0), as HAProxy's layer-4
    health check does (`check` on a `send-proxy-v2` server: a LOCAL header, then RST)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(data)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


async def upstream_for(
    nursery: trio.Nursery,
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    *,
    proxy_protocol: bool = False,
) -> RelaySettings:
    """Relay settings toward `handler`, served on a loopback port in `nursery` (with a PROXY v2
    header to it if `proxy_protocol`)."""
    (server,) = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return RelaySettings(
        "127.0.0.1",
        server.socket.getsockname()[1],
        CoreConfig(identify_user=identifier("none", None)),
        upstream_proxy_protocol=proxy_protocol,
    )


class CountingUpstream:
    """An upstream that greets and reads until the proxy closes, counting the connections made
    to it (a session that should have none must not have made one)."""

    def __init__(self) -> None:
        self.connections = 0

    def __repr__(self) -> str:
        return f"<CountingUpstream connections={self.connections}>"

    async def __call__(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        async with stream:
            await stream.send_all(b"* OK ready\r\n")
            while await stream.receive_some():
                pass


@pytest.mark.parametrize("trusted", [True, False], ids=["proxy_protocol_from", "direct"])
@pytest.mark.parametrize("data", [LOCAL, SPOOF, b"a LOGIN alice wonderland\r\n", b""])
async def test_a_connection_reset_before_it_was_accepted_is_no_session(
    trusted: bool, data: bytes
) -> None:
    """Found (attack17): a connection reset before the proxy accepted it has no peer address
    (getpeername(2): ENOTCONN), and `_admit` then skipped `proxy_protocol_from` altogether: no
    header was read (a balancer's LOCAL, or anything a client sent, went to the core as the
    client's first octets), the session was recorded from `unknown`, and with
    `upstream_proxy_protocol` the upstream connection was made without a header (Dovecot with
    `haproxy = yes` waits for one: every such session hung until Dovecot gave up or the proxy
    stopped). HAProxy's plain `check` on a `send-proxy-v2` server makes one every `inter`. Now
    such a connection is closed at once: no upstream connection, no session, no record."""
    fake_dovecot = CountingUpstream()

    sink = RecordingSink()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            relay = await upstream_for(nursery, fake_dovecot, proxy_protocol=True)
            trusted_nets = (ipaddress.ip_network("127.0.0.0/8"),) if trusted else ()
            proxy = Proxy(Admittance(relay, proxy_protocol_from=trusted_nets), sink)
            nursery.start_soon(proxy.timers.run)
            listener = trio.socket.socket()
            with listener:
                await listener.bind(("127.0.0.1", 0))
                listener.listen(4)
                reset_after(listener.getsockname()[1], data)
                await trio.sleep(0.05)  # the reset has arrived before the accept
                accepted, _ = await listener.accept()
            await proxy.handle(trio.SocketStream(accepted))
            await trio.sleep(0.05)  # an upstream connection, had one been made, is counted
            nursery.cancel_scope.cancel()
    assert sink.records == [] and fake_dovecot.connections == 0, (sink.records, fake_dovecot)
    assert proxy.stats.active == 0


# --- HAProxy's layer-4 health check on the IMAP port, through reloads and a stop.


@pytest.fixture(scope="module")
def proxied_dovecot() -> Iterator[Dovecot]:
    """Dovecot with `haproxy = yes`: the instance passes the real client on (PROXY v2)."""
    server = Dovecot(haproxy=True).start()
    try:
        yield server
    finally:
        server.cleanup()


def check_config(port: int, imap_port: int, admin: Path, check: str) -> str:
    """`l4`: the simplest HAProxy configuration there is, `check` on a `send-proxy-v2` server
    and no `port` (the check goes to the IMAP port with a LOCAL header, and resets). `imap`:
    the IMAP-level check of docs/scale-out.md (`tcp-check`, `check-send-proxy`)."""
    how = '    option tcp-check\n    tcp-check expect string "* OK"\n' if check == "imap" else ""
    extra = " check-send-proxy" if check == "imap" else ""
    return f"""global
    stats socket {admin} mode 600 level admin
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout check 2s
frontend imap_in
    bind 127.0.0.1:{port}
    default_backend imap
backend imap
{how}    server gw-1 127.0.0.1:{imap_port} send-proxy-v2 check{extra} inter 100ms fall 2 rise 1
"""


@pytest.mark.dovecot
@pytest.mark.parametrize("check", ["l4", "imap"])
def test_health_checks_through_reloads_and_a_stop(
    tmp_path: Path, proxied_dovecot: Dovecot, check: str
) -> None:
    """HAProxy's plain `check` (layer 4), and the IMAP-level one, every 100 ms while the
    instance is reloaded (SIGHUP) three times and then stopped. Found with the reset above:
    each layer-4 check was a session from `unknown` whose upstream connection lacked the
    instance's PROXY header, hung until it stopped. Now: the checks keep it UP through the
    reloads; a check the proxy accepted before HAProxy's reset is the documented LOCAL session
    from HAProxy's own address, ended as the client's close; the rest make nothing; the real
    client's session names the real client.
    (The IMAP-level check makes such a session each time, as documented; one row each in the
    store, nothing else.)"""
    args = ("--proxy-protocol-from", "127.0.0.1/32", "--upstream-proxy-protocol",
            "--store", str(tmp_path / "stats.sqlite"))  # fmt: skip
    with imapveil(tmp_path, proxied_dovecot.address, *args) as instance:
        haproxy = HAProxy(tmp_path)
        try:
            config = tmp_path / "haproxy.cfg"
            config.write_text(check_config(haproxy.port, instance.port, haproxy.socket, check))
            with (tmp_path / "haproxy.log").open("wb") as log:
                haproxy.process = subprocess.Popen(
                    [haproxy.binary, "-db", "-f", str(config)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                    start_new_session=True,
                )  # fmt: skip
            poll("HAProxy sees the instance up", lambda: up_state(haproxy))
            for _ in range(3):
                instance.signal(signal.SIGHUP)
                instance.stderr_until(b"reloaded")
                time.sleep(0.3)  # three checks' time after each reload
            assert up_state(haproxy), haproxy.states()
            client = session(SourcedIMAP(haproxy.port, "127.0.0.2"))
            instance.signal(signal.SIGTERM)
            assert instance.stop() == 0, instance.stderr.decode()[-2000:]
            poll("HAProxy marks the stopped instance down", lambda: down_state(haproxy))
        finally:
            haproxy.stop()
    records = instance.records()
    clients = {r["client"] for r in records if "client" in r}
    assert "unknown" not in clients, records
    ends = [r for r in records if r["event"] == "session_end"]
    (real,) = [r for r in ends if r["client"] == client]
    assert real["reason"] == "logout", real
    checks = [r for r in ends if r is not real]
    assert all(r["client"].startswith("127.0.0.1:") for r in checks), checks
    assert {r["reason"] for r in checks} <= {"client_closed"}, checks
    assert not [r for r in records if r["event"] == "violation"], records
    if check == "imap":
        assert len(checks) >= 5, checks  # each check a session
    rows = query(str(tmp_path / "stats.sqlite"), "SELECT COUNT(*) FROM sessions")
    assert rows == [(len(ends),)], (rows, len(ends))


def up_state(haproxy: HAProxy) -> bool | None:
    return True if haproxy.states().get(("imap", "gw-1")) == "UP" else None


def down_state(haproxy: HAProxy) -> bool | None:
    return True if haproxy.states().get(("imap", "gw-1"), "").startswith("DOWN") else None


# --- HAProxy on the same host, to a UNIX socket systemd hands over.


def test_a_socket_activated_unix_listener_is_refused_at_start(
    tmp_path: Path, proxied_dovecot: Dovecot
) -> None:
    """Found (attack17): systemd may hand over a UNIX stream socket (`ListenStream=/run/...`,
    what HAProxy on the same host would connect to). The service listened on it, and every
    connection then failed in `_admit` (getpeername gives '' there): an ERROR line with a
    traceback per connection, which any local user could write, no record, and a PROXY header
    could never be trusted (`proxy_protocol_from` holds networks). Now it is a configuration
    error at start, said in one line."""
    path = tmp_path / "imap.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listening:
        listening.bind(str(path))
        listening.listen()
        fd = listening.fileno()
        command = [
            *socket_activated(fd),
            sys.executable, "-m", "imapveil", "serve",
            "--upstream", f"127.0.0.1:{proxied_dovecot.address[1]}",
            "--events", str(tmp_path / "events.jsonl"),
            "--user-key-file", str(tmp_path / "user-key"),
            "--proxy-protocol-from", "127.0.0.1/32",
        ]  # fmt: skip
        result = subprocess.run(
            command, pass_fds=[fd], capture_output=True, timeout=60, check=False
        )
    err = result.stderr.decode()
    assert result.returncode != 0, err
    assert "socket-activated listener 'imap': not a TCP socket" in err, err
    assert "Traceback" not in err, err


# --- IPv6 loopback: the balancer at ::1, headers of both families; a spoof from ::1 untrusted.

V1_6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 143\r\n"
V1_4 = b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 143\r\n"
V6_CASES = {
    # name: (trusted networks, header, the client recorded, the source Dovecot is told)
    "v1-tcp6": ("::1/128", V1_6, "[2001:db8::7]:51234", "2001:db8::7"),
    "v1-tcp4": ("::1/128", V1_4, "192.0.2.7:51234", "192.0.2.7"),
    "v2-inet6": (
        "::1/128",
        build_v2(("2001:db8::7", 51234), ("2001:db8::1", 143)),
        "[2001:db8::7]:51234",
        "2001:db8::7",
    ),
    "v2-inet": (
        "::1/128",
        build_v2(("192.0.2.7", 51234), ("198.51.100.1", 143)),
        "192.0.2.7:51234",
        "192.0.2.7",
    ),
    "v2-local": ("::1/128", LOCAL, "[::1]:", "::1"),
    # The balancer's header, then a client's own as its first octets (a client behind HAProxy).
    "v1-then-a-client-spoof": ("::1/128", V1_4 + V1_6, "192.0.2.7:51234", "192.0.2.7"),
    "v2-then-a-client-spoof": (
        "::1/128",
        build_v2(("192.0.2.7", 51234), ("198.51.100.1", 143))
        + build_v2(("2001:db8::7", 51234), ("2001:db8::1", 143)),
        "192.0.2.7:51234",
        "192.0.2.7",
    ),
    "untrusted-v1-spoof": ("127.0.0.1/32", V1_6, "[::1]:", "::1"),
    "untrusted-v2-spoof": (
        "127.0.0.1/32",
        build_v2(("2001:db8::7", 51234), ("2001:db8::1", 143)),
        "[::1]:",
        "::1",
    ),
}


@pytest.mark.parametrize("name", list(V6_CASES))
async def test_the_client_address_over_ipv6_loopback(name: str) -> None:
    """Held (a guard: every earlier test had the balancer on 127.0.0.1): a listener on ::1 with
    the balancer at ::1. The header's client, IPv6 or IPv4, v1 or v2, is the one recorded and
    the one the upstream PROXY header names; LOCAL is the balancer's own; a header from ::1
    when only 127.0.0.1 may send one, or a second header after the balancer's (a client's),
    ends the session, and the address in it reaches nothing."""
    trusted, header, client, told = V6_CASES[name]
    headers: list[bytes] = []

    async def fake_dovecot(stream: trio.SocketStream) -> None:
        async with stream:
            got = await stream.receive_some()
            headers.append(got)
            await stream.send_all(b"* OK ready\r\n")
            while data := await stream.receive_some():
                if b"LOGOUT" in data:
                    await stream.send_all(b"* BYE bye\r\nq OK done\r\n")
                    return

    sink = RecordingSink()
    reply = b""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            relay = await upstream_for(nursery, fake_dovecot, proxy_protocol=True)
            networks = (ipaddress.ip_network(trusted),)
            proxy = Proxy(Admittance(relay, proxy_protocol_from=networks), sink)
            listeners = await open_listeners("::1", 0)
            await nursery.start(proxy.serve, listeners)
            port = listeners[0].socket.getsockname()[1]
            async with await trio.open_tcp_stream("::1", port) as stream:
                await stream.send_all(header + b"q LOGOUT\r\n")
                while chunk := await stream.receive_some():
                    reply += chunk
            await sink.wait_for(SessionEnded)
            proxy.stop()
            nursery.cancel_scope.cancel()
    (end,) = sink.of(SessionEnded)
    assert end.client.startswith(client), end
    (upstream_header,) = headers
    result = parse(upstream_header)
    assert result is not None and result[0].source is not None, upstream_header
    assert result[0].source[0] == told
    if "spoof" in name:
        assert end.reason == "proxy_header" and b"q OK" not in reply, (end, reply)
        assert "2001:db8::7" not in repr(sink.records), sink.records
    else:
        assert end.reason == "logout" and b"q OK" in reply, (end, reply)


def close_silently(port: int, reset: bool) -> None:
    """Connect and end the connection without an octet: a FIN, or a reset once the proxy has
    surely accepted it (a balancer's connect-only health check, without a PROXY header)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    time.sleep(0.1)
    if reset:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_a_balancer_connection_that_says_nothing_is_no_session(reset: bool) -> None:
    """Found (attack17): a connect-only health check (HAProxy's `check` with
    `no-check-send-proxy`, a cloud balancer's TCP check) from a network that must send a PROXY
    header: when the proxy accepted it before it ended, the end was a `proxy_header` refusal
    (a session, its records, a statistics row), the same as a balancer sending garbage; when
    it ended before the accept, nothing (the reset case above). Now a connection from there
    that ends before its first octet is no session either way; one octet makes it a refusal."""
    sink = RecordingSink()
    relay = RelaySettings("127.0.0.1", 9, CoreConfig(identify_user=identifier("none", None)))
    trusted = (ipaddress.ip_network("127.0.0.0/8"),)
    proxy = Proxy(Admittance(relay, proxy_protocol_from=trusted), sink)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await open_listeners("127.0.0.1", 0)
            await nursery.start(proxy.serve, listeners)
            port = listeners[0].socket.getsockname()[1]
            await trio.to_thread.run_sync(close_silently, port, reset)
            await trio.sleep(0.3)  # the end reaches the proxy; it has done with it
            assert (proxy.stats.accepted, proxy.stats.active) == (1, 0)
            assert sink.records == [], sink.records
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                await stream.send_all(b"P")  # one octet: a header begun, not finished
            await sink.wait_for(SessionEnded)
            proxy.stop()
    (end,) = sink.of(SessionEnded)
    assert end.reason == "proxy_header" and end.detail == "closed before a PROXY header", end


async def test_a_header_that_completes_after_the_grace_period_gets_bye() -> None:
    """Found (attack17): a balancer's connection whose PROXY header was still coming when the
    grace period ended became a session after the BYEs had been said: it connected upstream,
    relayed the greeting, was never told BYE, and was cut off CLOSE_WAIT (5 s) later ("cutting
    off 1 sessions"), recorded as the client's close. Now it gets `* BYE [UNAVAILABLE] Server
    shutting down` at once, as a connection over a limit gets its BYE: no session, no upstream
    connection."""
    fake_dovecot = CountingUpstream()

    sink = RecordingSink()
    header = build_v2(("192.0.2.7", 51234), ("198.51.100.1", 143))
    got = b""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            relay = await upstream_for(nursery, fake_dovecot)
            trusted = (ipaddress.ip_network("127.0.0.0/8"),)
            proxy = Proxy(Admittance(relay, proxy_protocol_from=trusted), sink, shutdown_grace=0.1)
            listeners = await open_listeners("127.0.0.1", 0)
            port = listeners[0].socket.getsockname()[1]
            served = trio.Event()

            async def serve() -> None:
                await proxy.serve(listeners)
                served.set()

            nursery.start_soon(serve)
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                await stream.send_all(header[:5])
                await trio.testing.wait_all_tasks_blocked()
                proxy.stop()
                await proxy.shutdown.wait()
                started = trio.current_time()
                await stream.send_all(header[5:])
                while chunk := await stream.receive_some():
                    got += chunk
                took = trio.current_time() - started
            await served.wait()
            nursery.cancel_scope.cancel()
    assert got == b"* BYE [UNAVAILABLE] Server shutting down\r\n" and took < 2.0, (got, took)
    assert fake_dovecot.connections == 0 and sink.of(SessionEnded) == [], sink.records


# --- Real HAProxy, v1 and v2, clients over IPv4 and IPv6 loopback.


class SourcedIMAP6(SourcedIMAP):
    """imaplib's client over IPv6 loopback."""

    def __init__(self, port: int) -> None:
        self.source = "::1"
        imaplib.IMAP4.__init__(self, "::1", port, timeout=10)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection(("::1", self.port), timeout, source_address=("::1", 0))


def both_families_config(port: int, imap_port: int, send: str) -> str:
    return f"""defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
frontend imap_in
    bind 127.0.0.1:{port}
    bind [::1]:{port}
    default_backend imap
backend imap
    server gw-1 127.0.0.1:{imap_port} {send}
"""


@pytest.mark.dovecot
@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2"])
def test_real_haproxy_v1_and_v2_name_ipv4_and_ipv6_clients(
    tmp_path: Path, proxied_dovecot: Dovecot, send: str
) -> None:
    """Held (a guard: test_haproxy.py has v2 and IPv4 clients only): HAProxy's own v1 and v2
    headers for a client from 127.0.0.2 and one from ::1; each record names the client as it
    connected to HAProxy, none HAProxy's own address, and Dovecot learns the same clients."""
    args = ("--proxy-protocol-from", "127.0.0.1/32", "--upstream-proxy-protocol")
    with imapveil(tmp_path, proxied_dovecot.address, *args) as instance:
        haproxy = HAProxy(tmp_path)
        try:
            config = tmp_path / "haproxy.cfg"
            config.write_text(both_families_config(haproxy.port, instance.port, send))
            with (tmp_path / "haproxy.log").open("wb") as log:
                haproxy.process = subprocess.Popen(
                    [haproxy.binary, "-db", "-f", str(config)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                    start_new_session=True,
                )  # fmt: skip
            v4 = poll("HAProxy listening", lambda: try_session(haproxy.port))
            host, _, port = session(SourcedIMAP6(haproxy.port)).rpartition(":")
            v6 = f"[{host}]:{port}"
        finally:
            haproxy.stop()
        assert instance.stop() == 0
    ends = {r["client"]: r for r in instance.records() if r["event"] == "session_end"}
    assert set(ends) == {v4, v6} and v4.startswith("127.0.0.2:"), ends
    assert v6.startswith("[::1]:") and all(e["reason"] == "logout" for e in ends.values())
    seen = proxied_dovecot.wait_for_log("rip=::1,", 1)
    assert "rip=127.0.0.2," in seen


def try_session(port: int) -> str | None:
    try:
        return session(SourcedIMAP(port, "127.0.0.2"))
    except ConnectionRefusedError:
        return None
