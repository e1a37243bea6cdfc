"""TLS on both legs, every combination, with real clients, a real Dovecot and the real process;
STARTTLS injection; COMPRESS=DEFLATE; handshake failures."""

from __future__ import annotations

import hashlib
import imaplib
import signal
import socket
import ssl
import zlib
from pathlib import Path

import pytest
import trustme
from imapclient import IMAPClient

from tests.conftest import TlsMaterial
from tests.helpers.dovecot import Dovecot, free_port
from tests.helpers.process import imapveil

pytestmark = pytest.mark.dovecot

MESSAGE = b"Subject: tls\r\n\r\n" + b"all the way through, encrypted\r\n" * 100000


@pytest.fixture(scope="module")
def seeded(tls_dovecot: Dovecot) -> Dovecot:
    tls_dovecot.seed("bob", [MESSAGE])
    return tls_dovecot


def upstream_args(
    dovecot: Dovecot, mode: str, tls: TlsMaterial
) -> tuple[tuple[str, int], list[str]]:
    address = dovecot.tls_address if mode == "implicit" else dovecot.address
    args = ["--upstream-tls", mode]
    if mode != "plain":
        args += ["--upstream-ca", str(tls.ca_file)]
    return address, args


def fetch(client: imaplib.IMAP4) -> bytes:
    client.login("bob", "builder")
    client.select("INBOX", readonly=True)
    typ, data = client.fetch("1", "(BODY.PEEK[])")
    client.logout()
    assert typ == "OK"
    first = data[0]
    assert isinstance(first, tuple)
    return first[1]


@pytest.mark.parametrize("upstream", ["plain", "implicit", "starttls"])
@pytest.mark.parametrize("client", ["plain", "implicit", "starttls"])
def test_every_leg_combination(
    seeded: Dovecot, tls_material: TlsMaterial, tmp_path: Path, client: str, upstream: str
) -> None:
    address, args = upstream_args(seeded, upstream, tls_material)
    tls_port = free_port()
    args += ["--cert", str(tls_material.cert), "--key", str(tls_material.key)]
    args += ["--listen-tls", f"127.0.0.1:{tls_port}", "--client-tls", "offer"]
    context = tls_material.client_context()
    with imapveil(tmp_path, address, *args) as proxy:
        if client == "implicit":
            conn: imaplib.IMAP4 = imaplib.IMAP4_SSL("127.0.0.1", tls_port, ssl_context=context)
        else:
            conn = imaplib.IMAP4("127.0.0.1", proxy.port)
            assert "STARTTLS" in conn.capabilities
            if client == "starttls":
                conn.starttls(ssl_context=context)
                assert "STARTTLS" not in conn.capabilities  # re-learned under TLS
        body = fetch(conn)
        assert proxy.stop() == 0
    assert hashlib.sha256(body).digest() == hashlib.sha256(MESSAGE).digest()
    (end,) = [r for r in proxy.records() if r["event"] == "session_end"]
    assert end["reason"] == "logout"
    assert end["client_tls"] is (client != "plain")
    login = [r for r in proxy.records() if r["event"] == "command" and r["verb"] == "LOGIN"]
    assert login[0]["status"] == "OK"


def test_imapclient_over_tls(seeded: Dovecot, tls_material: TlsMaterial, tmp_path: Path) -> None:
    tls_port = free_port()
    args = ["--cert", str(tls_material.cert), "--key", str(tls_material.key)]
    args += ["--listen-tls", f"127.0.0.1:{tls_port}", "--client-tls", "require"]
    address, up = upstream_args(seeded, "starttls", tls_material)
    with imapveil(tmp_path, address, *args, *up) as proxy:
        context = tls_material.client_context()
        with IMAPClient("127.0.0.1", port=tls_port, ssl=True, ssl_context=context) as c:
            c.login("bob", "builder")
            assert c.select_folder("INBOX", readonly=True)[b"EXISTS"] >= 1
        with IMAPClient("127.0.0.1", port=proxy.port, ssl=False) as c:
            assert b"LOGINDISABLED" in c.capabilities()
            with pytest.raises(imaplib.IMAP4.error, match=r"PRIVACYREQUIRED|STARTTLS"):
                c._imap.login("bob", "builder")
            c.starttls(context)
            c.login("bob", "builder")
            c.logout()
        assert proxy.stop() == 0


def test_starttls_injection_is_never_executed(
    seeded: Dovecot, tls_material: TlsMaterial, tmp_path: Path
) -> None:
    args = [
        "--cert",
        str(tls_material.cert),
        "--key",
        str(tls_material.key),
        "--client-tls",
        "offer",
    ]
    with imapveil(tmp_path, seeded.address, *args) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:
            f = raw.makefile("rb")
            f.readline()
            raw.sendall(b"a STARTTLS\r\nX CAPABILITY\r\n")
            assert f.readline() == b"a OK Begin TLS negotiation now\r\n"
            f.close()
            with tls_material.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"b NOOP\r\n")
                answer = b""
                while b"b OK" not in answer:
                    chunk = tls.recv(65536)
                    assert chunk
                    answer += chunk
                tls.sendall(b"c LOGOUT\r\n")
        assert proxy.stop() == 0
    assert b"X " not in answer  # the injected command was never answered: never executed
    kinds = [(r["kind"], r["detail"]) for r in proxy.records() if r["event"] == "violation"]
    assert kinds == [("starttls_pipelining", "14 octets")]


def test_compress_deflate_on_the_client_leg(
    seeded: Dovecot, tls_material: TlsMaterial, tmp_path: Path
) -> None:
    with imapveil(tmp_path, seeded.address, "--compress", "true") as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:
            f = raw.makefile("rb")
            assert b"COMPRESS=DEFLATE" not in f.readline()  # RFC 4978: after login only
            raw.sendall(b"y COMPRESS DEFLATE\r\n")
            assert f.readline() == b"y BAD COMPRESS is only valid after authentication\r\n"
            raw.sendall(b"a LOGIN bob builder\r\n")
            assert b"COMPRESS=DEFLATE" in f.readline()  # the OK's capabilities
            raw.sendall(b"z COMPRESS DEFLATE\r\n")
            assert f.readline() == b"z OK DEFLATE active\r\n"
            f.close()
            deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
            inflate = zlib.decompressobj(-15)
            commands = b"b SELECT INBOX\r\nc FETCH 1 BODY.PEEK[]\r\n"
            raw.sendall(deflate.compress(commands) + deflate.flush(zlib.Z_SYNC_FLUSH))
            received = b""
            while b"\r\nc OK" not in received:
                chunk = raw.recv(65536)
                assert chunk
                received += inflate.decompress(chunk)
            raw.sendall(deflate.compress(b"d LOGOUT\r\n") + deflate.flush(zlib.Z_SYNC_FLUSH))
        assert proxy.stop() == 0
    start = received.index(b"BODY[] {")
    size = int(received[start + 8 : received.index(b"}", start)])
    body_at = received.index(b"}\r\n", start) + 3
    assert received[body_at : body_at + size] == MESSAGE
    (end,) = [r for r in proxy.records() if r["event"] == "session_end"]
    assert end["compressed"] is True


def test_handshake_failures_are_recorded(
    seeded: Dovecot, tls_material: TlsMaterial, tmp_path: Path
) -> None:
    tls_port = free_port()
    args = ["--cert", str(tls_material.cert), "--key", str(tls_material.key)]
    args += ["--listen-tls", f"127.0.0.1:{tls_port}"]
    with imapveil(tmp_path, seeded.address, *args) as proxy:
        with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as s:
            s.sendall(b"a LOGIN bob builder\r\n")  # plain text on the TLS port
            assert s.recv(100) == b""
        hello = ssl.create_default_context()
        hello.check_hostname = False
        hello.verify_mode = ssl.CERT_NONE
        with (
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s,
            pytest.raises((ssl.SSLError, ConnectionError, OSError)),
        ):
            hello.wrap_socket(s)  # a ClientHello on the plain port
        assert proxy.stop() == 0
    ends = [r for r in proxy.records() if r["event"] == "session_end"]
    assert sorted(e["reason"] for e in ends) == ["tls_error", "tls_error"]


def test_upstream_certificate_is_verified(seeded: Dovecot, tmp_path: Path) -> None:
    # No CA given: the system's CAs do not know the test CA, so the upstream is refused.
    with imapveil(tmp_path, seeded.tls_address, "--upstream-tls", "implicit") as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
            reply = s.makefile("rb").read()
        assert proxy.stop() == 0
    assert reply == b"* BYE [UNAVAILABLE] Mail server is not reachable\r\n"
    (end,) = [r for r in proxy.records() if r["event"] == "session_end"]
    assert end["reason"] == "upstream_unavailable"
    assert end["detail"] == "tls: certificate_verify_failed"


def test_sighup_rereads_the_certificate(seeded: Dovecot, tmp_path: Path) -> None:
    first, second = trustme.CA(), trustme.CA()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"

    def install(ca: trustme.CA) -> None:
        issued = ca.issue_cert("127.0.0.1")
        issued.cert_chain_pems[0].write_to_path(cert)
        issued.private_key_pem.write_to_path(key)

    def handshake(ca: trustme.CA, port: int) -> bool:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as s,
                context.wrap_socket(s, server_hostname="127.0.0.1") as tls,
            ):
                return tls.recv(4).startswith(b"* OK")
        except ssl.SSLCertVerificationError:
            return False

    install(first)
    tls_port = free_port()
    args = ["--listen-tls", f"127.0.0.1:{tls_port}", "--cert", str(cert), "--key", str(key)]
    with imapveil(tmp_path, seeded.address, *args) as proxy:
        assert handshake(first, tls_port) and not handshake(second, tls_port)
        install(second)
        proxy.signal(signal.SIGHUP)
        proxy.stderr_until(b" imapveil: reload")
        assert handshake(second, tls_port) and not handshake(first, tls_port)
        assert proxy.stop() == 0
