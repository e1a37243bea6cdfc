"""An attacker's kit against the proxy in front of a real Dovecot (issue 11).

- `veil()`: the proxy in this trio run, built from `Settings` exactly as `imapveil serve` builds
  it (`service.load_all` + `service.admittance`): the default configuration and the default policy
  unless a test overrides a setting. Its records are kept in a `RecordingSink`.
- `Client`: a raw, blocking socket with timeouts, keeping the transcript; a missing answer is an
  `AssertionError` ("hang"), never a wait without end.
- `Identifiers`: unique markers plus realistic identifiers, as ID fields; what of them shows up
  in a text (Dovecot's log, the records).
- `DovecotLog`: what Dovecot logged since a test began, read once Dovecot has logged the end of
  every connection the test made (its `Disconnected` lines come last, from the same process, so
  nothing the session made Dovecot log is still on its way). No sleeping.
- `FakeUpstream`: a TCP server that is not an IMAP server (an SMTP banner, an SSH banner, or
  silence) and records what it received.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from imapveil.identity import identifier
from imapveil.records import SessionEnded
from imapveil.relay.server import Proxy, open_listeners
from imapveil.service import PolicyHolder, admittance, load_all
from tests.conftest import RecordingSink
from tests.helpers.dovecot import Dovecot

TIMEOUT = 5.0
"""Seconds a client waits for any one answer before calling it a hang."""

DISCONNECTED = "Disconnected"
"""Dovecot logs one such line per connection, at its end (imap-login or imap process)."""

MAC = "a4:c3:f0:85:1b:2e"
CLIENT_IP = "198.51.100.77"
SPOOF_FIELDS = ("x-originating-ip", "x-session-id", "x-proxy-ttl", "x-client-transport")


@contextlib.contextmanager
def own_dovecot(users: dict[str, str] | None = None) -> Iterator[Dovecot]:
    """A Dovecot of the caller's own: every connection to it but its readiness probe's (whose
    lines are not counted: `Dovecot.logged`) is the caller's, so counting its `Disconnected`
    lines tells when it has logged everything a test made it do."""
    server = Dovecot(users).start()
    try:
        yield server
    finally:
        server.cleanup()


def marker(kind: str = "MARKER") -> str:
    return f"{kind}-{uuid.uuid4().hex}"


# --- The proxy, as `imapveil serve` builds it.


@dataclass
class Veil:
    proxy: Proxy
    sink: RecordingSink
    address: tuple[str, int]
    key: bytes
    user_identity: str

    def records_json(self) -> str:
        """Every record the proxy emitted, as the event log would hold them."""
        return json.dumps([r.to_dict() for r in self.sink.records])

    def identity(self, user: bytes) -> str | None:
        """What the records would say of a user name (its HMAC with `hash`)."""
        return identifier(self.user_identity, self.key)(user)

    async def sessions_ended(self, count: int) -> list[SessionEnded]:
        return await self.sink.wait_for(SessionEnded, count)


@contextlib.asynccontextmanager
async def veil(upstream: tuple[str, int], state: Path, **settings: Any) -> AsyncIterator[Veil]:
    """The proxy in front of `upstream`, with `settings` as `imapveil serve` flags would give
    them (`policy="passthrough"`, `user_identity="plain"`, `connect_timeout=1`, ...)."""
    overrides = {
        "upstream": f"{upstream[0]}:{upstream[1]}",
        "user_key_file": str(state / "user-key"),
        **settings,
    }
    loaded = load_all(None, overrides)
    sink = RecordingSink()
    proxy = Proxy(admittance(loaded, PolicyHolder(loaded.policy)), sink, shutdown_grace=2.0)
    listeners = await open_listeners("127.0.0.1", 0)
    host, port = listeners[0].socket.getsockname()[:2]
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve, listeners)
        try:
            yield Veil(proxy, sink, (host, port), loaded.key, loaded.settings.user_identity)
        finally:
            proxy.stop()


# --- A client that types raw bytes.


def compress_after_login(s: socket.socket) -> None:
    """The greeting, LOGIN (COMPRESS is for after login, RFC 4978), then COMPRESS DEFLATE."""
    f = s.makefile("rb")
    assert f.readline().startswith(b"* OK")
    s.sendall(b"L LOGIN alice wonderland\r\n")
    assert f.readline().startswith(b"L OK")
    s.sendall(b"z COMPRESS DEFLATE\r\n")
    assert f.readline().startswith(b"z OK"), "COMPRESS refused"
    f.close()


class Client:
    """One connection; `transcript` is everything received, in order."""

    def __init__(self, address: tuple[str, int], timeout: float = TIMEOUT) -> None:
        self.timeout = timeout
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")
        self._received = bytearray()
        self.eof = False

    @property
    def transcript(self) -> bytes:
        # Kept in a bytearray: appending each line to bytes copied the whole transcript per line
        # (a FETCH of 1.5 MB in 80-octet lines: 38 s; a test of alice's full INBOX hung).
        return bytes(self._received)

    @transcript.setter
    def transcript(self, value: bytes) -> None:
        self._received = bytearray(value)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def send(self, data: bytes) -> None:
        """Send; if the proxy has already closed the connection, the reads will say so."""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.sendall(data)

    def line(self) -> bytes:
        """The next line; b"" once the proxy has closed the connection."""
        if self.eof:
            return b""
        try:
            line = self.file.readline()
        except TimeoutError:
            raise AssertionError(
                f"no answer within {self.timeout:g} s (a hang); received so far: "
                f"{bytes(self._received[-2000:])!r}"
            ) from None
        except ConnectionResetError:
            line = b""
        self._received += line
        if not line:
            self.eof = True
        return line

    def until(self, tag: bytes) -> bytes:
        """Lines up to the tagged answer for `tag` (returned), or b"" if the connection ended."""
        while line := self.line():
            if line.startswith(tag + b" "):
                return line
        return b""

    def rest(self) -> bytes:
        """Everything until the connection ends."""
        while self.line():
            pass
        return self.transcript

    def greeting(self) -> bytes:
        line = self.line()
        assert line.startswith(b"* OK"), self.transcript
        return line

    def command(self, tag: bytes, text: bytes, status: bytes = b"OK") -> bytes:
        """`tag text` CRLF sent (`text` may hold literals and CRLFs of its own); its tagged
        answer, which must be `status`."""
        self.send(tag + b" " + text + b"\r\n")
        answer = self.until(tag)
        assert answer.startswith(tag + b" " + status), self.transcript[-2000:]
        return answer

    def login(self, user: bytes = b"alice", password: bytes = b"wonderland") -> bytes:
        return self.command(b"L", b"LOGIN " + user + b" " + password)

    def logout(self) -> bytes:
        """LOGOUT (unless the connection already ended), then read until it ends."""
        if not self.eof:
            self.send(b"Q LOGOUT\r\n")
        return self.rest()


def answered_properly(transcript: bytes, tag: bytes) -> bool:
    """The command `tag` got a tagged answer, or the session ended with `* BYE`."""
    lines = transcript.splitlines()
    return any(line.startswith(tag + b" ") for line in lines) or any(
        line.startswith(b"* BYE") for line in lines
    )


# --- What must not get through.


@dataclass(frozen=True)
class Identifiers:
    """Device identifiers and spoofing fields, as an attacker's ID would carry them."""

    device: str = field(default_factory=marker)
    session: str = field(default_factory=lambda: marker("SESSION"))
    transport: str = field(default_factory=lambda: marker("TRANSPORT"))

    def fields(self) -> list[tuple[str, str]]:
        return [
            ("x-device-id", self.device),
            ("x-mac", MAC),
            ("x-originating-ip", CLIENT_IP),
            ("x-session-id", self.session),
            ("x-proxy-ttl", "5"),
            ("x-client-transport", self.transport),
        ]

    def pairs(self) -> bytes:
        """The field-value pairs, quoted, space-separated (no parentheses)."""
        return b" ".join(b'"%s" "%s"' % (n.encode(), v.encode()) for n, v in self.fields())

    def id_command(self, tag: bytes = b"b") -> bytes:
        return tag + b" ID (" + self.pairs() + b")\r\n"

    def values(self) -> tuple[str, ...]:
        return (self.device, MAC, CLIENT_IP, self.session, self.transport)

    def in_log(self, text: str) -> list[str]:
        """Which identifiers (values, and the spoofing field names) Dovecot's log shows."""
        return [s for s in (*self.values(), *SPOOF_FIELDS) if s in text]

    def in_records(self, text: str) -> list[str]:
        """Which identifier values the records hold (field names may be named as dropped)."""
        return [s for s in self.values() if s in text]


# --- Dovecot's log, per test.


class DovecotLog:
    """What Dovecot logs from now on."""

    def __init__(self, dovecot: Dovecot) -> None:
        self.dovecot = dovecot
        self.paths = (dovecot.log_path, dovecot.info_log_path)
        self.offsets = [_size(p) for p in self.paths]
        self.ends = dovecot.logged(DISCONNECTED)

    def new_text(self) -> str:
        parts = []
        for path, offset in zip(self.paths, self.offsets, strict=True):
            with contextlib.suppress(OSError), path.open("rb") as f:
                f.seek(offset)
                parts.append(f.read().decode(errors="replace"))
        return "".join(parts)

    def settled(self, connections: int) -> str:
        """The new text, once Dovecot has logged the end of `connections` more connections."""
        self.dovecot.wait_for_log(DISCONNECTED, self.ends + connections)
        return self.new_text()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# --- Something that is not an IMAP server.


class FakeUpstream:
    """Accepts connections, sends `banner` (if any), records what each connection received
    until it ends."""

    def __init__(self, banner: bytes | None) -> None:
        self.banner = banner
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.received: list[bytes] = []
        self.connections = 0
        self._done = threading.Condition()
        self._open = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> FakeUpstream:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() below
        self.listener.close()
        self._thread.join(TIMEOUT)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._done:
                self.connections += 1
                self._open += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        data = b""
        with conn:
            conn.settimeout(30)
            try:
                if self.banner is not None:
                    conn.sendall(self.banner)
                while chunk := conn.recv(65536):
                    data += chunk
            except OSError:
                pass
        with self._done:
            self.received.append(data)
            self._open -= 1
            self._done.notify_all()

    def wait_closed(self, timeout: float = 10.0) -> list[bytes]:
        """What every connection received, once the proxy has closed them all."""
        with self._done:
            assert self._done.wait_for(lambda: self._open == 0, timeout), "still connected"
            return list(self.received)
