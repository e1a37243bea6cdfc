"""Attacks on a handshaken TLS leg's data path driven directly (`streams.TlsPath`, 56e07ee),
through a real `imapveil serve` in front of a real Dovecot or `openssl s_server`.

Found:
- The upstream TLS context refused renegotiation (`OP_NO_RENEGOTIATION`), which the direct path
  could not carry out: a TLS 1.2 server that asks for one (a HelloRequest: `s_server`'s `r`)
  was answered with OpenSSL's no_renegotiation alert, which OpenSSL's server (and others) take
  as a fatal handshake failure: the session ended (`server_closed`) where it had carried on
  through trio's `SSLStream`. The upstream leg now renegotiates again: its reader drives the
  handshake (OpenSSL's read does), and a send that meets it under way (`SSLWantReadError`)
  sends what OpenSSL wrote and waits for the reader to feed OpenSSL the server's octets.

Held (compared with dec5a36, the commit before): COMPRESS after TLS (on both legs) with the
client's DEFLATE over one-octet records, then SELECT, a 2 MB FETCH byte for byte, IDLE and
DONE; DEFLATE sent in the same segment and record as COMPRESS is dropped as before; STARTTLS on
the plain listener with the first commands in the segment of the client's Finished (to Dovecot
over STARTTLS and over implicit TLS); APPEND of a literal cut into records of 1 to 16384 octets,
fetched back equal; `session_end` the same for close_notify, FIN, RST, a bad record (after a
NOOP, in IDLE) and the same four in the middle of a 30 x 2 MB FETCH flood the client does not
read (ended within 0.3 s, the proxy's RSS the same, another session's NOOP the same); a server's
TLS 1.3 KeyUpdate answered; session tickets reach a client that only reads the greeting, and
resumption works through the proxy.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TlsMaterial
from tests.helpers import process
from tests.helpers.dovecot import free_port
from tests.relay.test_attack_round18_tls import RawTls, session_end

TIMEOUT = 5.0


class SServer:
    """`openssl s_server` as the upstream: what it prints, and lines typed to it."""

    def __init__(self, tls: TlsMaterial, *args: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["openssl", "s_server", "-accept", f"127.0.0.1:{self.port}", "-cert", str(tls.cert),
             "-key", str(tls.key), "-crlf", "-msg", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.out = b""
        assert self.until(b"ACCEPT"), self.out

    def until(self, marker: bytes, count: int = 1) -> bool:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + TIMEOUT
        while self.out.count(marker) < count and time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                got = os.read(self.proc.stdout.fileno(), 65536)
                if not got:
                    break
                self.out += got
        return self.out.count(marker) >= count

    def type(self, line: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + b"\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.communicate()


@contextlib.contextmanager
def through(tmp_path: Path, tls: TlsMaterial, server: SServer) -> Iterator[tuple[Any, RawTls]]:
    """(the proxy, a client) in front of `server`, its greeting `* OK hi` read."""
    port = free_port()
    try:
        with process.imapveil(
            tmp_path, ("127.0.0.1", server.port),
            "--listen-tls", f"127.0.0.1:{port}",
            "--cert", str(tls.cert), "--key", str(tls.key), "--store", "off",
            "--upstream-tls", "implicit", "--upstream-ca", str(tls.ca_file),
        ) as running:  # fmt: skip
            client = RawTls(port, ssl.create_default_context(cafile=str(tls.ca_file)))
            try:
                assert server.until(b"CIPHER")
                server.type(b"* OK hi")
                assert client.until(b"\r\n") == b"* OK hi\r\n"
                yield running, client
            finally:
                client.close()
    finally:
        server.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl")
def test_a_servers_key_update_is_answered_before_the_next_command(
    tmp_path: Path, tls_material: TlsMaterial
) -> None:
    """TLS 1.3 to the server; `s_server`'s `K` (a KeyUpdate asking for ours), read by the proxy
    while it sends nothing: ours goes before the next command (OpenSSL writes it with the next
    write, as it did through trio), and the session carries on."""
    server = SServer(tls_material, "-tls1_3")
    with through(tmp_path, tls_material, server) as (_running, client):
        server.type(b"K")
        assert server.until(b">>> TLS 1.3, Handshake [length 0005], KeyUpdate")
        time.sleep(0.1)  # read by the proxy
        client.send(b"a NOOP\r\n")
        assert server.until(b"a NOOP")
        ours = server.out.index(b"<<< TLS 1.3, Handshake [length 0005], KeyUpdate")
        assert ours < server.out.index(b"a NOOP")
        server.type(b"a OK done")
        assert client.until(b"a OK done\r\n")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl")
def test_a_servers_renegotiation_is_carried_out_not_refused(
    tmp_path: Path, tls_material: TlsMaterial
) -> None:
    """TLS 1.2 to the server; the server asks for a renegotiation between two commands (and the
    client's commands keep coming meanwhile): the session carries on, every command reaches the
    server and every answer the client."""
    server = SServer(tls_material, "-tls1_2")
    with through(tmp_path, tls_material, server) as (running, client):
        client.send(b"a NOOP\r\n")
        assert server.until(b"a NOOP")
        server.type(b"r")  # the HelloRequest
        for i in range(500):  # sends while it is under way
            client.send(b"b%d NOOP\r\n" % i)
        assert server.until(b"b499 NOOP"), server.out[-500:]
        assert server.until(b"ServerHello\n", 2), server.out[-2000:]
        server.type(b"a OK done")
        assert client.until(b"a OK done\r\n")
        client.send(b"c NOOP\r\n")
        assert server.until(b"c NOOP"), server.out[-500:]
        client.close()
        assert session_end(running, client)["reason"] == "client_closed"
