"""The Dovecot the integration tests run against is real: greets, logs in, serves mail, logs IDs."""

from __future__ import annotations

import contextlib
import imaplib
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.helpers.dovecot import PROBE_SOURCE, Dovecot

pytestmark = pytest.mark.dovecot

# imaplib has no ID command; xatom() would register it as valid before login only.
imaplib.Commands["ID"] = ("NONAUTH", "AUTH", "SELECTED")


def message(subject: str, body: str) -> bytes:
    return (
        f"From: Carol <carol@example.org>\r\nTo: alice@example.org\r\nSubject: {subject}\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@example.org>\r\n\r\n{body}\r\n"
    ).encode()


def wait_for_line(server: Dovecot, needle: str) -> str:
    """The info-log line containing ``needle``; Dovecot's log process writes asynchronously."""
    deadline = time.monotonic() + 5.0
    while True:
        text = server.info_log_path.read_text(errors="replace")
        for line in text.splitlines():
            if needle in line:
                return line
        if time.monotonic() > deadline:
            pytest.fail(f"no {needle!r} in {server.info_log_path}:\n{server.log_text()}")
        time.sleep(0.02)


@pytest.fixture
def own_dovecot() -> Iterator[Dovecot]:
    """A Dovecot of this test's own, not started yet, so mail can be seeded before and after."""
    server = Dovecot()
    try:
        yield server
    finally:
        server.cleanup()


def test_greeting_has_capabilities(dovecot: Dovecot) -> None:
    with imaplib.IMAP4(*dovecot.address, timeout=5) as imap:
        greeting = imap.welcome
    assert greeting.startswith(b"* OK [CAPABILITY ")
    advertised = greeting.split(b"[CAPABILITY ", 1)[1].split(b"]", 1)[0].split()
    for capability in (b"IMAP4rev1", b"LITERAL+", b"IDLE", b"SASL-IR", b"ID", b"AUTH=PLAIN"):
        assert capability in advertised


def test_login(dovecot: Dovecot) -> None:
    with imaplib.IMAP4(*dovecot.address, timeout=5) as imap:
        typ, _ = imap.login("alice", dovecot.users["alice"])
        assert typ == "OK"
        assert imap.select("INBOX", readonly=True)[0] == "OK"


def test_seeded_messages_come_back_byte_for_byte(own_dovecot: Dovecot) -> None:
    before = [message(f"before {i}", f"seeded before start, number {i}") for i in range(11)]
    after = [message("after", "seeded while running")]
    own_dovecot.seed("bob", before)
    own_dovecot.start()
    own_dovecot.seed("bob", after)
    with imaplib.IMAP4(*own_dovecot.address, timeout=5) as imap:
        imap.login("bob", own_dovecot.users["bob"])
        assert imap.select("INBOX") == ("OK", [str(len(before) + len(after)).encode()])
        typ, parts = imap.fetch("1:*", "(BODY.PEEK[])")
        assert typ == "OK"
        fetched = [part[1] for part in parts if isinstance(part, tuple)]
    assert fetched == before + after  # same bytes, and UIDs in seeding order


def test_id_is_accepted_and_logged(dovecot: Dovecot) -> None:
    token = uuid.uuid4().hex
    with imaplib.IMAP4(*dovecot.address, timeout=5) as imap:
        typ, _ = imap.xatom("ID", f'("name" "pre-{token}" "version" "1.0")')
        assert typ == "OK"
        assert imap.response("ID")[1] != [None]  # Dovecot answers with its own ID
        imap.login("alice", dovecot.users["alice"])
        typ, _ = imap.xatom("ID", f'("name" "post-{token}")')
        assert typ == "OK"
    # Before login imap-login logs it, after login the user's imap process; both in the info log.
    pre = wait_for_line(dovecot, f"ID sent: name=pre-{token}, version=1.0")
    post = wait_for_line(dovecot, f"ID sent: name=post-{token}")
    assert "imap-login: Info: ID sent:" in pre
    assert "rip=127.0.0.1" in pre
    assert " imap(alice)<" in post
    assert token not in dovecot.log_path.read_text()  # the error log stays clean


def test_a_port_taken_before_dovecot_binds_it_is_not_mistaken_for_dovecot() -> None:
    """Two test processes: the port `free_port` found free is bound by the other one's server
    (Linux hands a port just freed out again to the next bind to port 0) before Dovecot binds
    it. The readiness probe read that server's `* OK` and took it for Dovecot, which then
    exited, its port in use: the test's own Dovecot was gone (seen as its probe's disconnect
    never logged). Now the probe knows this Dovecot's own greeting, and Dovecot is started
    again on new ports."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen(8)
        taken = other.getsockname()[1]
        stop = threading.Event()

        def greet() -> None:
            other.settimeout(0.1)
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    conn, _ = other.accept()
                    with conn:
                        conn.sendall(b"* OK [CAPABILITY IMAP4rev1] Dovecot ready.\r\n")

        greeter = threading.Thread(target=greet, daemon=True)
        greeter.start()
        server = Dovecot()
        server.port = taken
        try:
            server.start()
            assert server.port != taken
            with socket.create_connection(server.address, timeout=5) as s:
                assert server.greeting_text.encode() in s.recv(1024)
            assert "Disconnected" in server.wait_for_log("Disconnected", 1)
        finally:
            stop.set()
            greeter.join()
            server.cleanup()


@pytest.mark.dovecot
def test_the_readiness_probes_lines_are_never_counted() -> None:
    """The probe comes from PROBE_SOURCE and its lines do not count (`Dovecot.logged`): tests
    count Dovecot's `Disconnected` lines from 0, and do not wait for the probe's, which Dovecot
    now and then never logged (a fresh-clone CI lost a module's tests to it)."""
    server = Dovecot().start()
    try:
        deadline = time.monotonic() + 60
        while f"rip={PROBE_SOURCE}," not in (probe := server.log_text()):
            assert time.monotonic() < deadline, probe
            time.sleep(0.02)
        assert any("Disconnected" in x and PROBE_SOURCE in x for x in probe.splitlines())
        assert server.logged("Disconnected") == 0
        with socket.create_connection(server.address, timeout=5) as s:
            assert server.greeting_text.encode() in s.recv(1024)
        text = server.wait_for_log("Disconnected", 1)
        assert server.logged("Disconnected", text) == 1
        assert text.count("Disconnected") == 2  # the probe's and the client's
    finally:
        server.cleanup()
