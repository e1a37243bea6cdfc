from __future__ import annotations

import shutil
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import trio
import trustme

from imapveil.identity import identifier
from imapveil.protocol.session import CoreConfig
from imapveil.records import Record
from imapveil.relay.connection import RelaySettings
from imapveil.relay.server import Proxy, open_listeners
from imapveil.sinks import MemorySink
from tests.helpers.dovecot import Dovecot
from tests.helpers.postgres import Postgres


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    """One real Dovecot for the whole run. Tests that change mail use their own user or box."""
    server = Dovecot().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket of our own in place of systemd's ($NOTIFY_SOCKET)."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(10)
        yield sock, path


R = TypeVar("R", bound=Record)


class RecordingSink(MemorySink):
    """Keeps records and lets a test wait, event-driven, for the ones it expects."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = trio.Event()

    def emit(self, record: Record) -> None:
        super().emit(record)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, kind: type[R], count: int = 1) -> list[R]:
        with trio.fail_after(10):
            while len(self.of(kind)) < count:
                await self._changed.wait()
        return self.of(kind)

    def of(self, kind: type[R]) -> list[R]:
        found: list[R] = [r for r in self.records if isinstance(r, kind)]
        return found


@dataclass(frozen=True)
class TlsMaterial:
    """A test CA and one certificate for 127.0.0.1/localhost, as PEM files (trustme)."""

    ca: trustme.CA
    ca_file: Path
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


@pytest.fixture(scope="session")
def tls_material() -> Iterator[TlsMaterial]:
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    # Not under pytest's 0700 tmp_path: Dovecot reads these as its own user.
    root = Path(tempfile.mkdtemp(prefix="imapveil-tls-"))
    root.chmod(0o755)
    ca.cert_pem.write_to_path(root / "ca.pem")
    issued.cert_chain_pems[0].write_to_path(root / "cert.pem")
    for extra in issued.cert_chain_pems[1:]:
        extra.write_to_path(root / "cert.pem", append=True)
    issued.private_key_pem.write_to_path(root / "key.pem")
    try:
        yield TlsMaterial(ca, root / "ca.pem", root / "cert.pem", root / "key.pem")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def tls_dovecot(tls_material: TlsMaterial) -> Iterator[Dovecot]:
    """A Dovecot offering STARTTLS on `port` and implicit TLS on `tls_port`."""
    server = Dovecot(tls=(tls_material.cert, tls_material.key)).start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    """A fresh PostgreSQL cluster (about a second to start)."""
    server = Postgres().start()
    try:
        yield server
    finally:
        server.cleanup()


@dataclass
class RunningProxy:
    proxy: Proxy
    sink: RecordingSink
    host: str
    port: int

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


async def start_proxy(
    nursery: trio.Nursery, upstream: tuple[str, int], **core: object
) -> RunningProxy:
    config = CoreConfig(identify_user=identifier("hash", b"k" * 32), **core)  # type: ignore[arg-type]
    settings = RelaySettings(upstream[0], upstream[1], config, connect_timeout=5.0)
    sink = RecordingSink()
    proxy = Proxy(settings, sink, shutdown_grace=2.0)
    listeners = await open_listeners("127.0.0.1", 0)
    await nursery.start(proxy.serve, listeners)
    host, port = listeners[0].socket.getsockname()[:2]
    return RunningProxy(proxy, sink, host, port)


@pytest.fixture
async def proxy(dovecot: Dovecot) -> AsyncIterator[RunningProxy]:
    """The proxy in front of the session Dovecot, in this test's trio run."""
    async with trio.open_nursery() as nursery:
        running = await start_proxy(nursery, dovecot.address)
        yield running
        running.proxy.stop()
