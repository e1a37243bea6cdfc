"""Real clients through the proxy to a real Dovecot, compared with talking to Dovecot directly."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import imaplib
import json
import os
import re
import socket
import threading
from collections.abc import Iterator
from typing import BinaryIO, TypeVar

import pytest
import trio
from imapclient import IMAPClient

from imapveil.records import CommandCompleted, Record, SessionEnded, SessionStarted, Violation
from tests.conftest import RunningProxy, start_proxy
from tests.helpers.dovecot import Dovecot

pytestmark = pytest.mark.dovecot
R = TypeVar("R", bound=Record)

run = trio.to_thread.run_sync


@contextlib.contextmanager
def connect(address: tuple[str, int]) -> Iterator[tuple[socket.socket, BinaryIO]]:
    with socket.create_connection(address, timeout=10) as s, s.makefile("rb") as f:
        yield s, f


def big_message(size: int) -> bytes:
    header = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: big\r\n\r\n"
    rng = os.urandom(size * 3 // 4)
    body = base64.encodebytes(rng).replace(b"\n", b"\r\n")
    return header + body


def of(proxy: RunningProxy, kind: type[R]) -> list[R]:
    return [r for r in proxy.sink.records if isinstance(r, kind)]


def commands(proxy: RunningProxy) -> list[CommandCompleted]:
    return [r for r in proxy.sink.records if isinstance(r, CommandCompleted)]


def all_records_json(proxy: RunningProxy) -> str:
    return json.dumps([r.to_dict() for r in proxy.sink.records])


async def session_ended(proxy: RunningProxy, count: int = 1) -> list[SessionEnded]:
    """Wait (event-driven, bounded) until `count` sessions have ended."""
    return await proxy.sink.wait_for(SessionEnded, count)


def fetch_body(address: tuple[str, int], user: str, password: str, mailbox: str, n: int) -> bytes:
    m = imaplib.IMAP4(*address)
    try:
        m.login(user, password)
        m.select(mailbox, readonly=True)
        typ, data = m.fetch(str(n), "(BODY.PEEK[])")
        assert typ == "OK"
        first = data[0]
        assert isinstance(first, tuple)
        return first[1]
    finally:
        m.logout()


async def test_login_select_and_multi_megabyte_fetch(dovecot: Dovecot, proxy: RunningProxy) -> None:
    message = big_message(5 * 1024 * 1024)
    dovecot.seed("alice", [message])
    direct = await run(fetch_body, dovecot.address, "alice", "wonderland", "INBOX", 1)
    relayed = await run(fetch_body, proxy.address, "alice", "wonderland", "INBOX", 1)
    assert hashlib.sha256(relayed).hexdigest() == hashlib.sha256(direct).hexdigest()
    assert hashlib.sha256(relayed).hexdigest() == hashlib.sha256(message).hexdigest()

    (end,) = await session_ended(proxy)
    verbs = [(c.verb, c.status, c.state) for c in commands(proxy) if c.verb != "CAPABILITY"]
    assert verbs[:3] == [
        ("LOGIN", "OK", "not_authenticated"),
        ("EXAMINE", "OK", "authenticated"),
        ("FETCH", "OK", "selected"),
    ]
    assert verbs[-1] == ("LOGOUT", "OK", "selected")
    assert end.reason == "logout"
    assert end.bytes_from_server > len(message)
    (login,) = [c for c in commands(proxy) if c.verb == "LOGIN"]
    assert login.user is not None and login.user.startswith("hmac:")
    assert end.user == login.user
    assert "wonderland" not in all_records_json(proxy)
    assert "alice" not in all_records_json(proxy)


def imaplib_authenticate_plain(address: tuple[str, int]) -> list[str]:
    m = imaplib.IMAP4(*address)
    typ, _ = m.authenticate("PLAIN", lambda _: b"\0bob\0builder")
    assert typ == "OK"
    m.select("INBOX")
    m.logout()
    return [m.state]


def imapclient_sasl_ir_and_wrong_password(address: tuple[str, int]) -> None:
    # imapclient's plain_login sends the response as SASL-IR when the server offers it.
    with IMAPClient(address[0], port=address[1], ssl=False) as c:
        with pytest.raises(Exception, match="uthentication failed"):
            c.plain_login("bob", "not-the-password")
        c.plain_login("bob", "builder")
        c.select_folder("INBOX")
        c.logout()


async def test_authenticate_plain_with_and_without_sasl_ir(proxy: RunningProxy) -> None:
    assert await run(imaplib_authenticate_plain, proxy.address) == ["LOGOUT"]
    await run(imapclient_sasl_ir_and_wrong_password, proxy.address)
    await session_ended(proxy, 2)
    auth = [c for c in commands(proxy) if c.verb == "AUTHENTICATE"]
    assert [(a.mechanism, a.status) for a in auth] == [
        ("PLAIN", "OK"),
        ("PLAIN", "NO"),
        ("PLAIN", "OK"),
    ]
    assert len({a.user for a in auth}) == 1 and auth[0].user is not None
    dump = all_records_json(proxy)
    for secret in ("builder", "not-the-password", base64.b64encode(b"\0bob\0builder").decode()):
        assert secret not in dump
    assert not of(proxy, Violation)


def append_both_ways(address: tuple[str, int], body: bytes) -> tuple[bytes, bytes]:
    """APPEND with a synchronizing literal (imaplib) and with LITERAL+ (by hand)."""
    m = imaplib.IMAP4(*address)
    m.login("bob", "builder")
    m.create("Appended")
    typ, data = m.append("Appended", None, None, body)
    assert typ == "OK", data
    m.logout()

    with connect(address) as (s, f):
        assert f.readline().startswith(b"* OK")
        s.sendall(
            b"a LOGIN bob builder\r\nb APPEND Appended {%d+}\r\n%s\r\nc LOGOUT\r\n"
            % (len(body), body)
        )
        transcript = b""
        while b"c OK Logout completed" not in transcript:
            line = f.readline()
            assert line, transcript
            transcript += line
    assert b"b OK [APPENDUID" in transcript
    m = imaplib.IMAP4(*address)
    m.login("bob", "builder")
    m.select("Appended")
    typ, fetched = m.fetch("1:2", "(BODY.PEEK[])")
    m.delete("Appended")
    m.logout()
    first, second = fetched[0], fetched[2]
    assert isinstance(first, tuple) and isinstance(second, tuple)
    return first[1], second[1]


async def test_append_synchronizing_and_non_synchronizing(proxy: RunningProxy) -> None:
    body = b"Subject: append\r\n\r\n" + b"line with a tag-like a OK\r\n" * 2000 + b"{5}\r\n"
    first, second = await run(append_both_ways, proxy.address, body)
    assert first == body
    assert second == body
    appends = [c for c in commands(proxy) if c.verb == "APPEND"]
    assert [(a.status, a.literals) for a in appends] == [("OK", (len(body),))] * 2
    assert not of(proxy, Violation)


def idle_until_exists(proxy_address: tuple[str, int], direct: tuple[str, int]) -> list[object]:
    with IMAPClient(proxy_address[0], port=proxy_address[1], ssl=False) as c:
        c.login("alice", "wonderland")
        c.select_folder("INBOX")
        c.idle()
        with IMAPClient(direct[0], port=direct[1], ssl=False) as other:
            other.login("alice", "wonderland")
            other.append("INBOX", b"Subject: while idling\r\n\r\nhi\r\n")
        responses = c.idle_check(timeout=10)
        c.idle_done()
        c.logout()
    return list(responses)


async def test_idle_sees_a_message_appended_elsewhere(
    dovecot: Dovecot, proxy: RunningProxy
) -> None:
    responses = await run(idle_until_exists, proxy.address, dovecot.address)
    assert any(r[1] == b"EXISTS" for r in responses if isinstance(r, tuple) and len(r) > 1)
    (end,) = await session_ended(proxy)
    idle = [c for c in commands(proxy) if c.verb == "IDLE"]
    assert [(i.status, i.state) for i in idle] == [("OK", "selected")]
    assert end.reason == "logout"
    assert not of(proxy, Violation)


PIPELINE = b"".join(
    b"p%d STATUS INBOX (MESSAGES UIDNEXT)\r\n" % i for i in range(50)
) + b"\r\n".join(
    [
        b"q1 NOOP",
        b"q2 EXAMINE INBOX",
        b"q3 UID SEARCH ALL",
        b"q4 FETCH 1:* (FLAGS UID)",
        b"q5 LOGOUT",
        b"",
    ]
)


def raw_session(address: tuple[str, int], payload: bytes) -> bytes:
    with connect(address) as (s, f):
        greeting = f.readline()
        s.sendall(b"a LOGIN alice wonderland\r\n")
        assert f.readline().startswith(b"a OK")
        s.sendall(payload)
        data = greeting + f.read()  # until the server closes after LOGOUT
    return data


def normalised(transcript: bytes) -> bytes:
    # Dovecot says how long each command took; nothing else differs between two sessions.
    return re.sub(rb"\(\d+\.\d+ \+ \d+\.\d+(?: \+ \d+\.\d+)? secs\)", b"(t)", transcript)


async def test_pipelined_commands_match_a_direct_session(
    dovecot: Dovecot, proxy: RunningProxy
) -> None:
    direct = await run(raw_session, dovecot.address, PIPELINE)
    relayed = await run(raw_session, proxy.address, PIPELINE)
    assert normalised(relayed) == normalised(direct)
    assert b"q5 OK" in relayed
    (end,) = await session_ended(proxy)
    assert end.reason == "logout"
    assert end.commands == 56  # LOGIN and the 55 pipelined
    assert [c.status for c in commands(proxy)].count("OK") == 56


def send_and_read_all(address: tuple[str, int], payload: bytes) -> bytes:
    with socket.create_connection(address) as s:
        s.settimeout(10)
        s.sendall(payload)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def noop_then_long_line(address: tuple[str, int]) -> tuple[bytes, bytes]:
    with connect(address) as (s, f):
        head = f.readline()
        s.sendall(b"a NOOP\r\n")
        head += f.readline()
        s.sendall(b"b SEARCH " + b"1," * 10000)
        return head, f.read()


async def test_line_too_long_gets_bye(dovecot: Dovecot) -> None:
    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(nursery, dovecot.address, max_line=4096)
        head, tail = await run(noop_then_long_line, proxy.address)
        (end,) = await session_ended(proxy)
        proxy.proxy.stop()
    assert head.startswith(b"* OK")
    assert b"a OK" in head
    assert tail == b"* BYE [TOOBIG] Command line too long (limit 4096 octets)\r\n"
    assert end.reason == "line_too_long"
    assert [v.kind for v in of(proxy, Violation)] == ["line_too_long"]


async def test_upstream_unavailable(dovecot: Dovecot) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        async with trio.open_nursery() as nursery:
            proxy = await start_proxy(nursery, ("127.0.0.1", port))
            reply = await run(send_and_read_all, proxy.address, b"")
            (end,) = await session_ended(proxy)
            proxy.proxy.stop()
    assert reply == b"* BYE [UNAVAILABLE] Mail server is not reachable\r\n"
    assert (end.reason, end.detail) == ("upstream_unavailable", "econnrefused")
    assert len(of(proxy, SessionStarted)) == 1


async def test_client_vanishing_mid_literal_leaves_others_alone(
    dovecot: Dovecot, proxy: RunningProxy
) -> None:
    def vanish() -> None:
        with connect(proxy.address) as (s, f):
            f.readline()
            s.sendall(b"a LOGIN alice wonderland\r\nb APPEND INBOX {100000+}\r\npartial")

    await run(vanish)
    body = await run(fetch_body, proxy.address, "alice", "wonderland", "INBOX", 1)
    assert body
    ends = await session_ended(proxy, 2)
    reasons = sorted((e.reason, e.detail) for e in ends)
    assert reasons == [("client_closed", "mid_literal"), ("logout", None)]


def slow_reader(address: tuple[str, int], go_on: threading.Event) -> int:
    """Ask for a big message, read nothing until told to, then read it all."""
    with connect(address) as (s, f):
        greeting = f.readline()
        s.sendall(b"a LOGIN bob builder\r\nb EXAMINE Big\r\nc FETCH 1 BODY.PEEK[]\r\nd LOGOUT\r\n")
        assert go_on.wait(20)
        return len(greeting) + len(f.read())


async def test_a_client_that_does_not_read_slows_only_its_session(
    dovecot: Dovecot, proxy: RunningProxy
) -> None:
    size = 32 * 1024 * 1024
    await run(seed_mailbox, dovecot.address, "Big", big_message(size))
    go_on = threading.Event()
    async with trio.open_nursery() as nursery:
        received: list[int] = []

        async def client() -> None:
            received.append(await run(slow_reader, proxy.address, go_on))

        nursery.start_soon(client)
        with trio.fail_after(20):
            await proxy.sink.wait_for(SessionStarted)
            (connection,) = proxy.proxy.connections
            # Wait until the relay stops reading from the server: the client is not reading.
            last = -1
            # Stalling is the absence of events, so this one loop samples the clock.
            while connection.core.bytes_from_server != last or last < 64 * 1024:
                last = connection.core.bytes_from_server
                await trio.sleep(0.2)
        # Meanwhile another session is served at full speed.
        try:
            other = await run(fetch_body, proxy.address, "bob", "builder", "Big", 1)
            assert len(other) > size
            stalled_at = connection.core.bytes_from_server
        finally:
            go_on.set()
    (end, *_) = [
        e for e in await session_ended(proxy, 2) if e.session == connection.core.session_id
    ]
    # Socket buffers hold a few MB; the proxy itself holds one receive at most.
    assert stalled_at < size // 2
    assert received == [end.bytes_from_server]
    assert end.reason == "logout"


def seed_mailbox(address: tuple[str, int], mailbox: str, message: bytes) -> None:
    with IMAPClient(address[0], port=address[1], ssl=False) as c:
        c.login("bob", "builder")
        if not c.folder_exists(mailbox):
            c.create_folder(mailbox)
        c.append(mailbox, message)
        c.logout()


def greet_then_wait(address: tuple[str, int]) -> tuple[bytes, bytes]:
    with connect(address) as (s, f):
        greeting = f.readline()
        s.sendall(b"a NOOP\r\n")
        greeting += f.readline()
        return greeting, f.read()  # the proxy speaks next, when the login timeout passes


async def test_login_timeout_says_bye_and_closes_both_sides(dovecot: Dovecot) -> None:
    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(nursery, dovecot.address, idle_timeout_login=0.3)
        with trio.fail_after(10):
            head, tail = await run(greet_then_wait, proxy.address)
        (end,) = await session_ended(proxy)
        proxy.proxy.stop()
    assert head.startswith(b"* OK") and b"a OK" in head
    assert tail == b"* BYE Disconnected for inactivity\r\n"
    assert end.reason == "idle_timeout"
    assert end.duration_ms >= 300


async def test_both_legs_of_a_session_have_tcp_keepalive(proxy: RunningProxy) -> None:
    """Peers that vanish without a FIN (a laptop shut, a NAT entry dropped) are found by TCP
    keepalive on both legs. The client leg's comes from the listener, set once: Linux copies it
    to every connection the listener accepts."""
    client = await trio.open_tcp_stream(*proxy.address)
    try:
        assert (await client.receive_some(1000)).startswith(b"* OK")  # both legs are open
        (connection,) = proxy.proxy.connections
        for leg in (connection.client, connection.server):
            stream = leg.stream if leg is not None else None
            assert isinstance(stream, trio.SocketStream)
            assert stream.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1, leg
    finally:
        await client.aclose()
