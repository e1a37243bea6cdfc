"""JA4 of the client leg, end to end: real clients over TLS through the proxy to a real Dovecot.

Three TLS stacks: Python's ssl (imaplib), curl (OpenSSL too, with other cipher suites and
extensions) and gnutls-cli (GnuTLS), each with implicit TLS and with STARTTLS. The fingerprint
is read from the `SessionTraits` record the core emits before `SessionEnded` (the event log never
writes it). curl and gnutls-cli (Debian: curl, gnutls-bin) must be installed: the test fails,
never skips, without them.
"""

from __future__ import annotations

import contextlib
import functools
import imaplib
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio

from imapveil.identity import identifier
from imapveil.protocol.session import CoreConfig
from imapveil.records import SessionEnded, SessionTraits
from imapveil.relay.connection import RelaySettings
from imapveil.relay.server import Proxy, open_listeners
from imapveil.relay.tls import server_context
from tests.conftest import RecordingSink, TlsMaterial
from tests.helpers.dovecot import Dovecot

pytestmark = pytest.mark.dovecot
Client = Callable[[], Awaitable[object]]


@dataclass
class TlsProxy:
    sink: RecordingSink
    plain_port: int
    tls_port: int
    tls: TlsMaterial

    async def session(self, client: Client, ends: tuple[str, ...] = ("logout",)) -> SessionTraits:
        """Run one client session (in a thread or a process) and return its traits record."""
        before = len(self.sink.of(SessionEnded))
        await client()
        ended = await self.sink.wait_for(SessionEnded, before + 1)
        assert len(ended) == before + 1 and ended[-1].reason in ends, ended[-1]
        (traits,) = [r for r in self.sink.of(SessionTraits) if r.session == ended[-1].session]
        return traits


@asynccontextmanager
async def tls_proxy(dovecot: Dovecot, tls: TlsMaterial) -> AsyncIterator[TlsProxy]:
    config = CoreConfig(identify_user=identifier("hash", b"k" * 32), client_tls="offer")
    settings = RelaySettings(
        dovecot.address[0],
        dovecot.address[1],
        config,
        connect_timeout=5.0,
        client_context=server_context(str(tls.cert), str(tls.key)),
    )
    sink = RecordingSink()
    proxy = Proxy(settings, sink, shutdown_grace=2.0)
    plain = await open_listeners("127.0.0.1", 0)
    implicit = await open_listeners("127.0.0.1", 0)
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(proxy.serve, plain, tls_listeners=implicit))
        yield TlsProxy(
            sink, plain[0].socket.getsockname()[1], implicit[0].socket.getsockname()[1], tls
        )
        proxy.stop()


@pytest.fixture
async def running(dovecot: Dovecot, tls_material: TlsMaterial) -> AsyncIterator[TlsProxy]:
    async with tls_proxy(dovecot, tls_material) as p:
        yield p


def program(name: str) -> str:
    found = shutil.which(name)
    if found is None:  # not a skip: scripts/check installs it (Debian: curl, gnutls-bin)
        raise RuntimeError(f"{name} is not installed; the JA4 end-to-end test needs it")
    return found


# -- the three clients ---------------------------------------------------------------------------


def python_client(p: TlsProxy, host: str, mode: str) -> None:
    context = p.tls.client_context()
    if mode == "implicit":
        conn: imaplib.IMAP4 = imaplib.IMAP4_SSL(host, p.tls_port, ssl_context=context, timeout=10)
    else:
        conn = imaplib.IMAP4(host, p.plain_port, timeout=10)
        conn.starttls(ssl_context=context)
    conn.login("alice", "wonderland")
    conn.select("INBOX", readonly=True)
    conn.logout()


async def curl_client(p: TlsProxy, host: str, mode: str) -> None:
    url = (
        f"imaps://{host}:{p.tls_port}/" if mode == "implicit" else f"imap://{host}:{p.plain_port}/"
    )
    args = [program("curl"), "-sS", "--max-time", "10", "--cacert", str(p.tls.ca_file)]
    args += ["--user", "alice:wonderland", url]
    if mode == "starttls":
        args.insert(1, "--ssl-reqd")
    result = await trio.run_process(args, capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr


async def gnutls_client(p: TlsProxy, host: str, mode: str) -> None:
    """gnutls-cli sends its standard input as it comes and quits at its end: LOGOUT is written
    once its handshake is done (it says so), and the input closed after the answer."""
    args = [program("gnutls-cli"), "--x509cafile", str(p.tls.ca_file), "--crlf"]
    if mode == "implicit":
        args += ["-p", str(p.tls_port)]
    else:
        args += ["-p", str(p.plain_port), "--starttls-proto=imap"]
    args.append(host)
    seen = b""
    with trio.fail_after(15):
        process = await trio.lowlevel.open_process(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert process.stdin is not None and process.stdout is not None
        try:
            for wanted, line in ((b"Simple Client Mode", b"a1 LOGOUT\n"), (b"a1 OK", b"")):
                while wanted not in seen:
                    data = await process.stdout.receive_some()
                    assert data, seen
                    seen += data
                if line:
                    await process.stdin.send_all(line)
            await process.stdin.aclose()
            await process.wait()
        finally:
            if process.returncode is None:  # only when something above failed
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()


def client(p: TlsProxy, stack: str, host: str, mode: str) -> Client:
    if stack == "python":
        return functools.partial(trio.to_thread.run_sync, python_client, p, host, mode)
    if stack == "curl":
        return functools.partial(curl_client, p, host, mode)
    return functools.partial(gnutls_client, p, host, mode)


STACKS = ("python", "curl", "gnutls")


# -- the tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["implicit", "starttls"])
async def test_three_stacks_three_fingerprints_each_the_same_twice(
    running: TlsProxy, mode: str
) -> None:
    seen: dict[str, str] = {}
    for stack in STACKS:
        first = (await running.session(client(running, stack, "localhost", mode))).ja4
        again = (await running.session(client(running, stack, "localhost", mode))).ja4
        assert first is not None and first.startswith("t1"), (stack, first)
        assert first[3] == "d"  # a host name: SNI
        assert again == first, stack
        seen[stack] = first
    assert len(set(seen.values())) == len(STACKS), seen


async def test_implicit_tls_and_starttls_give_the_same_fingerprint(running: TlsProxy) -> None:
    for stack in STACKS:
        implicit = await running.session(client(running, stack, "localhost", "implicit"))
        starttls = await running.session(client(running, stack, "localhost", "starttls"))
        assert implicit.ja4 is not None and implicit.ja4 == starttls.ja4, stack


@pytest.mark.parametrize("stack", ["python", "curl"])
async def test_an_address_instead_of_a_name_changes_only_the_sni_marks(
    running: TlsProxy, stack: str
) -> None:
    # Python's ssl and curl send no SNI for an IP address (RFC 6066 allows only host names).
    # JA4 shows that twice in `a`: "i" for "d", and one extension fewer (SNI is counted);
    # the cipher and extension hashes leave SNI out and do not change.
    named = (await running.session(client(running, stack, "localhost", "implicit"))).ja4
    numeric = (await running.session(client(running, stack, "127.0.0.1", "implicit"))).ja4
    assert named is not None and numeric is not None
    assert named[3] == "d" and numeric[3] == "i"
    assert int(named[6:8]) == int(numeric[6:8]) + 1
    assert named[:3] == numeric[:3] and named[4:6] == numeric[4:6] and named[8:] == numeric[8:]


async def test_no_client_tls_no_fingerprint(running: TlsProxy) -> None:
    def plain() -> None:
        conn = imaplib.IMAP4("127.0.0.1", running.plain_port, timeout=10)
        conn.login("alice", "wonderland")
        conn.logout()

    traits = await running.session(functools.partial(trio.to_thread.run_sync, plain))
    assert traits.ja4 is None
    with_tls = await running.session(client(running, "python", "localhost", "starttls"))
    assert with_tls.ja4 is not None  # the same proxy, the same client, once with TLS


async def test_a_failed_handshake_still_names_the_client_hello(running: TlsProxy) -> None:
    """A client that rejects our certificate sent a whole ClientHello all the same."""

    def untrusting() -> None:
        conn = imaplib.IMAP4("localhost", running.plain_port, timeout=10)
        with pytest.raises(ssl.SSLError):
            conn.starttls(ssl_context=ssl.create_default_context())  # does not trust the test CA
        with contextlib.suppress(OSError):  # the failed handshake may have closed it
            conn.shutdown()

    failed = await running.session(
        functools.partial(trio.to_thread.run_sync, untrusting), ends=("tls_error",)
    )
    ok = await running.session(client(running, "python", "localhost", "starttls"))
    assert failed.ja4 is not None and failed.ja4 == ok.ja4
