"""Attacks on a TLS leg's receive taking every record its socket's receive brought
(`Leg._more_records`, 5a3805e; since done by `TlsPath`, and `_more_records` is gone), through a
real `imapveil serve` (an implicit-TLS listener) in front
of a real Dovecot (its imaps port, or its plain one), with a client whose TLS records and TCP
segments are the test's own (`RawTls`: Python's ssl over memory BIOs and a raw socket).

Found:
- A record that does not decrypt, in the segment after a command the client then waits on (IDLE,
  a `{N}` literal; or COMPRESS, which the proxy answers), is decrypted with the records before
  it; OpenSSL has then failed the connection (its alert written, its write side shut), so the
  server's `+` (our OK) to the client failed to be sent, and the session ended as `error`,
  "send to client: enoexec" (the SSLError's code read as an errno), where it had ended as the
  client's reset (`client_closed`, `mid_literal`), as it does for a bad record anywhere else.
  The leg is now broken when that happens: nothing more is said on it, and its reader says the
  end where it said it before. The server's leg likewise: its `+` and a bad record in one
  segment made the held literal's send to it fail (`error`, "send to server: enoexec"), where
  the session had ended as the server's reset (a scripted TLS upstream, `BadAfterPlus`).
- 64 KiB of one-octet records (one receive from the socket) were decrypted in one go: ~2,900
  records, ~9 ms of the loop every session shares; another session's NOOP waited 9 ms at the
  90th percentile during such a flood (1 ms before). A record now counts as 4 KiB of a receive
  at least (`RECORD_COST`): 64 records a receive at most.

Pinned (held before and after): every octet in order whatever the records' sizes and however the
segments cut them (inside the 5-octet header included); a literal's octets sent ahead of the
server's `+` in the same segment are held, and when the server refuses the command they go
nowhere (BYE); an ID's identifiers spread over one-octet records are still dropped; the client's
close_notify right after a command in the same segment comes after the command's answer; a FIN
inside a record after whole ones, and a bad record after a NOOP, end the session as the client's
close; a TLS 1.3 KeyUpdate from the client (`openssl s_client`'s `K`) changes nothing.
"""

from __future__ import annotations

import contextlib
import select
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import TlsMaterial
from tests.helpers import process, scripted
from tests.helpers.attack import veil
from tests.helpers.dovecot import Dovecot, free_port
from tests.relay.test_tls_path import pair

pytestmark = pytest.mark.dovecot

TIMEOUT = 5.0


class RawTls:
    """A TLS client whose records (one per payload of `records`) and segments (`raw`) are the
    caller's."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.port = self.sock.getsockname()[1]
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._in, self._out, server_hostname="localhost")
        self.plain = bytearray()
        self.eof = False
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self._out.read())
                data = self.sock.recv(65536)
                assert data, "the proxy closed during the handshake"
                self._in.write(data)
        self.sock.sendall(self._out.read())

    def close(self) -> None:
        self.sock.close()

    def records(self, *payloads: bytes) -> bytes:
        for payload in payloads:
            self.tls.write(payload)
        return self._out.read()

    def close_notify(self) -> bytes:
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.unwrap()
        return self._out.read()

    def raw(self, data: bytes) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.sendall(data)

    def send(self, *payloads: bytes) -> None:
        self.raw(self.records(*payloads))

    def _more(self) -> None:
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        except TimeoutError:
            raise AssertionError(f"a hang; so far: {bytes(self.plain[-300:])!r}") from None
        if not data:
            self.eof = True
            return
        self._in.write(data)
        while True:
            try:
                got = self.tls.read(65536)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLError:
                self.eof = True
                return
            if not got:
                self.eof = True
                return
            self.plain += got

    def until(self, marker: bytes) -> bytes:
        """Everything up to and with `marker`; b"" if the connection ends first."""
        while marker not in self.plain:
            if self.eof:
                return b""
            self._more()
        end = self.plain.index(marker) + len(marker)
        got = bytes(self.plain[:end])
        del self.plain[:end]
        return got

    def rest(self) -> bytes:
        while not self.eof:
            self._more()
        got = bytes(self.plain)
        self.plain.clear()
        return got

    def login(self) -> None:
        assert self.until(b"\r\n").startswith(b"* OK")
        self.send(b"L LOGIN alice wonderland\r\n")
        assert self.until(b"Logged in\r\n").startswith(b"L OK"), bytes(self.plain)


@contextlib.contextmanager
def serving(
    tmp: Path, dovecot: Dovecot, tls: TlsMaterial, upstream_tls: bool
) -> Iterator[process.Running]:
    port = free_port()
    upstream = ("--upstream-tls", "implicit", "--upstream-ca", str(tls.ca_file))
    with process.imapveil(
        tmp,
        ("127.0.0.1", dovecot.tls_port if upstream_tls else dovecot.port),
        "--listen-tls", f"127.0.0.1:{port}",
        "--cert", str(tls.cert), "--key", str(tls.key),
        "--store", "off", "--user-identity", "plain", "--compress",
        *(upstream if upstream_tls else ()),
    ) as running:  # fmt: skip
        running.port = port  # the TLS listener's
        yield running


@pytest.fixture(scope="module")
def both_tls(
    tmp_path_factory: pytest.TempPathFactory, tls_dovecot: Dovecot, tls_material: TlsMaterial
) -> Iterator[process.Running]:
    """TLS on both legs: the client's implicit TLS, Dovecot's imaps port."""
    with serving(tmp_path_factory.mktemp("both"), tls_dovecot, tls_material, True) as running:
        yield running


@pytest.fixture(scope="module")
def client_tls(
    tmp_path_factory: pytest.TempPathFactory, tls_dovecot: Dovecot, tls_material: TlsMaterial
) -> Iterator[process.Running]:
    """TLS on the client leg only (a plain upstream can be half-closed)."""
    with serving(tmp_path_factory.mktemp("client"), tls_dovecot, tls_material, False) as running:
        yield running


def session_end(running: process.Running, client: RawTls) -> dict[str, Any]:
    """The `session_end` record of `client`'s session, once written."""
    me = f"127.0.0.1:{client.port}"
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        for record in running.records():
            if record.get("event") == "session_end" and record.get("client") == me:
                return record
        time.sleep(0.02)
    raise AssertionError(f"no session_end for {me}")


def bad(wire: bytes) -> bytes:
    """`wire` (records) with the last octet flipped: the last record's tag no longer matches."""
    return wire[:-1] + bytes([wire[-1] ^ 0x01])


# --- Found: a bad record read ahead of a command the client waits on.


@pytest.mark.parametrize(
    ("command", "detail"),
    [
        (b"a IDLE\r\n", None),
        (b"a APPEND INBOX {5}\r\n", "mid_literal"),
        (b"a COMPRESS DEFLATE\r\n", None),
    ],
    ids=["idle", "literal", "compress"],
)
def test_a_bad_record_after_a_command_that_waits_ends_as_the_clients_reset(
    both_tls: process.Running, tls_material: TlsMaterial, command: bytes, detail: str | None
) -> None:
    """The command, then a record that does not decrypt, in one segment: the proxy waits for the
    server's `+` before it reads on (or says its own OK to COMPRESS, then turns DEFLATE). Before
    the fix the bad record was read with the command, the `+` (the OK) could not be sent on the
    failed TLS, and the session ended as `error` ("send to client: enoexec"); it ends as the
    client's reset, where the reader comes to the record, as it did when a receive took one
    record."""
    client = RawTls(both_tls.port, tls_material.client_context())
    try:
        client.login()
        client.raw(client.records(command) + bad(client.records(b"b NOOP\r\n")))
        client.rest()
        end = session_end(both_tls, client)
    finally:
        client.close()
    assert (end["reason"], end["detail"]) == ("client_closed", detail)


class BadAfterPlus:
    """An upstream with implicit TLS that asks for an APPEND's literal (`+ OK`) and sends, in the
    same segment, a record that does not decrypt; `received` is what it decrypted of the proxy's."""

    def __init__(self, tls: TlsMaterial) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(tls.cert, tls.key)
        self.received = bytearray()
        self.before_plus = b""

    async def __call__(self, peer: scripted.Peer) -> None:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.context.wrap_bio(incoming, outgoing, server_side=True)
        stream = peer.stream

        async def more() -> bool:
            data = await stream.receive_some(65536)
            incoming.write(data) if data else incoming.write_eof()
            return bool(data)

        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await stream.send_all(outgoing.read())
                await more()
        tls.write(b"* OK [CAPABILITY IMAP4rev1] hi\r\n")
        await stream.send_all(outgoing.read())
        while True:
            try:
                self.received += tls.read(65536)
            except ssl.SSLWantReadError:
                if not await more():
                    return
                continue
            except ssl.SSLError:
                return
            if self.received.startswith(b"L ") and self.received.endswith(b"\r\n"):
                tls.write(b"L OK done\r\n")
                await stream.send_all(outgoing.read())
                self.received.clear()
            elif b"{5}\r\n" in self.received:
                self.before_plus = bytes(self.received)
                tls.write(b"+ OK\r\n")
                good = outgoing.read()
                tls.write(b"* 1 EXISTS\r\n")
                await stream.send_all(good + bad(outgoing.read()))
                while await more():
                    with contextlib.suppress(ssl.SSLError):
                        self.received += tls.read(65536)
                return


async def test_a_bad_record_from_the_server_after_its_plus_ends_as_the_servers_reset(
    tmp_path: Path, tls_material: TlsMaterial
) -> None:
    """The server's `+` to a literal the client sent ahead (held), and a record that does not
    decrypt, in one segment. Before the fix the held literal's send to the server failed on the
    failed TLS (`error`, "send to server: enoexec"); it ends as the server's reset, as it did
    when a receive took one record."""
    upstream_script = BadAfterPlus(tls_material)
    settings = {"upstream_tls": "implicit", "upstream_ca": str(tls_material.ca_file)}
    async with (
        scripted.serve(upstream_script, bytearray()) as upstream,
        veil(upstream, tmp_path, **settings) as v,
    ):

        def client() -> bytes:
            with socket.create_connection(v.address, timeout=TIMEOUT) as s:
                f = s.makefile("rb")
                assert f.readline().startswith(b"* OK")
                s.sendall(b"L LOGIN alice wonderland\r\n")
                assert f.readline().startswith(b"L OK")
                s.sendall(b"a APPEND INBOX {5}\r\nhello\r\n")
                return f.read()

        await trio.to_thread.run_sync(client)
        (end,) = await v.sessions_ended(1)
    assert end.reason == "server_closed", (end.reason, end.detail)
    assert upstream_script.before_plus == b"a APPEND INBOX {5}\r\n"  # the literal was held


# --- Found: a receive decrypts a bounded number of records.


async def test_one_receive_decrypts_a_bounded_number_of_records(
    tls_material: TlsMaterial,
) -> None:
    """3,000 one-octet records in one receive from the socket: each costs the loop some 3 us to
    decrypt, whatever it holds; all in one go were ~9 ms of the loop every session shares.
    Each receive takes 64 of them at most (as many as Dovecot's 4 KiB records fill a receive
    with); all come, in order."""
    payloads = [bytes([65 + i % 26]) for i in range(3000)]
    leg, peer, recording = await pair(tls_material)
    recording.stop()
    await peer.wire.send_all(peer.records(*payloads))
    got: list[bytes | bytearray] = []
    while sum(map(len, got)) < len(payloads):
        got.append(await leg.receive())
    assert b"".join(got) == b"".join(payloads)
    assert max(map(len, got)) <= 64


# --- Pinned.


def test_every_octet_in_order_whatever_the_records_and_segments(
    both_tls: process.Running, tls_material: TlsMaterial
) -> None:
    """A message APPENDed (LITERAL+) in one-octet records, a 16 KiB record and odd sizes, the
    first 300 octets of the wire a segment each (every cut inside the first records' headers),
    the rest in one segment; FETCHed back from Dovecot through its TLS: the same octets."""
    body = b"".join(b"Subject: r18 %d\r\n" % i for i in range(40)) + b"\r\n"
    body += bytes(range(32, 127)) * 400 + b"\r\n"
    client = RawTls(both_tls.port, tls_material.client_context())
    try:
        client.login()
        client.send(b"c CREATE r18box\r\n")
        assert client.until(b"c ")
        client.until(b"\r\n")
        command = b"a APPEND r18box {%d+}\r\n" % len(body)
        cuts = [1] * 200 + [16384, 7, 4000, 1, 3, 16383]
        pieces, at = [command], 0
        for size in cuts:
            pieces.append(body[at : at + size])
            at += size
        pieces.append(body[at:] + b"\r\n")
        wire = client.records(*[p for p in pieces if p])
        for i in range(300):
            client.raw(wire[i : i + 1])
            time.sleep(0.0005)
        client.raw(wire[300:])
        assert b"a OK" in client.until(b"a OK")
        client.send(b"s SELECT r18box\r\n")
        client.until(b"s OK")
        client.until(b"\r\n")
        client.send(b"f FETCH 1 BODY.PEEK[]\r\n")
        fetched = client.until(b"f OK")
        client.send(b"d DELETE r18box\r\n", b"z LOGOUT\r\n")
        client.rest()
    finally:
        client.close()
    literal = b"{%d}\r\n" % len(body)
    assert literal + body + b")\r\n" in fetched


def test_a_literal_sent_ahead_in_the_same_segment_reaches_the_server_only_when_asked(
    both_tls: process.Running, tls_material: TlsMaterial
) -> None:
    """`{N}` to a mailbox that does not exist, and the literal's octets (a command, were they
    read as one) in records of the same segment: the server answers NO instead of `+`, and the
    octets go nowhere: BYE, the LOGOUT inside them never runs."""
    client = RawTls(both_tls.port, tls_material.client_context())
    try:
        client.login()
        literal = b"x LOGOUT\r\n"
        client.send(b"a APPEND no-such-box {%d}\r\n" % len(literal), literal[:4], literal[4:])
        rest = client.rest()
        end = session_end(both_tls, client)
    finally:
        client.close()
    assert b"* BYE Literal sent before the server asked for it" in rest, rest
    assert b"x OK" not in rest and b"Logging out" not in rest, rest
    assert end["reason"] == "protocol_error"


def test_an_ids_identifiers_over_one_octet_records_are_still_dropped(
    both_tls: process.Running, tls_dovecot: Dovecot, tls_material: TlsMaterial
) -> None:
    """An ID after login, one octet a record, in one segment: Dovecot logs the name only (the
    default policy); the device's serial and address never reach it."""
    marker = "r18serial8c1d"
    command = (
        b'i ID ("name" "Thunderbird" "x-device" "%s" "x-originating-ip" "203.0.113.9")\r\n'
        % marker.encode()
    )
    before = tls_dovecot.log_text().count("ID sent: ")
    client = RawTls(both_tls.port, tls_material.client_context())
    try:
        client.login()
        client.send(*[command[i : i + 1] for i in range(len(command))])
        assert b"i OK" in client.until(b"i OK")
        client.send(b"z LOGOUT\r\n")
        client.rest()
    finally:
        client.close()
    text = tls_dovecot.wait_for_log("ID sent: ", before + 1, timeout=TIMEOUT)
    assert "ID sent: name=Thunderbird" in text
    assert marker not in text and "203.0.113.9" not in text


def test_close_notify_after_a_command_in_the_same_segment_comes_after_its_answer(
    client_tls: process.Running, tls_material: TlsMaterial
) -> None:
    """NOOP and the client's close_notify in one segment (a plain upstream: the proxy half-closes
    it, Dovecot answers what it read): the NOOP is answered, then the session ends as the
    client's close."""
    client = RawTls(client_tls.port, tls_material.client_context())
    try:
        client.login()
        client.raw(client.records(b"n NOOP\r\n") + client.close_notify())
        rest = client.rest()
        end = session_end(client_tls, client)
    finally:
        client.close()
    assert b"n OK" in rest, rest
    assert end["reason"] == "client_closed"


@pytest.mark.parametrize("ending", ["fin_mid_record", "bad_record"])
def test_an_end_after_whole_records_comes_after_them(
    both_tls: process.Running, tls_material: TlsMaterial, ending: str
) -> None:
    """A NOOP's record, then half a record and a FIN, or a record that does not decrypt, in one
    segment: the NOOP reaches the server (counted), the session ends as the client's close."""
    client = RawTls(both_tls.port, tls_material.client_context())
    try:
        client.login()
        noop = client.records(b"n NOOP\r\n")
        after = client.records(b"m NOOP\r\n")
        if ending == "fin_mid_record":
            client.raw(noop + after[:10])
            client.sock.shutdown(socket.SHUT_WR)
        else:
            client.raw(noop + bad(after))
        client.rest()
        end = session_end(both_tls, client)
    finally:
        client.close()
    assert end["reason"] == "client_closed"
    assert end["commands"] == 2  # LOGIN, NOOP


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl")
def test_a_key_update_from_the_client_changes_nothing(
    both_tls: process.Running, tls_material: TlsMaterial
) -> None:
    """`openssl s_client`'s `K` (a TLS 1.3 KeyUpdate asking for ours) between commands: each
    command is answered, the session ends with LOGOUT."""
    lines = [b"L LOGIN alice wonderland", b"K", b"a NOOP", b"k", b"b NOOP", b"K", b"c LOGOUT"]
    with subprocess.Popen(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{both_tls.port}", "-tls1_3", "-crlf",
         "-CAfile", str(tls_material.ca_file)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    ) as s_client:  # fmt: skip
        assert s_client.stdin is not None and s_client.stdout is not None
        seen = b""
        updates = 0
        for line in lines:
            s_client.stdin.write(line + b"\n")
            s_client.stdin.flush()
            # Each waited for: s_client reads a `K` and the next line in one read as one command.
            update = line in (b"K", b"k")
            updates += update
            wanted = line.split(b" ")[0] + b" OK"
            while seen.count(b"KEYUPDATE") < updates if update else wanted not in seen:
                ready, _, _ = select.select([s_client.stdout], [], [], TIMEOUT)
                got = s_client.stdout.readline() if ready else b""
                assert got, seen
                seen += got
        s_client.stdin.close()
        s_client.wait(TIMEOUT)
    assert seen.count(b"KEYUPDATE") == 3, seen
