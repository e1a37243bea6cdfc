"""The relay's plumbing, attacked from outside (attack3): raw sockets through the proxy (built as
`imapveil serve` builds it) to a real Dovecot, as tests/relay/test_fail_closed.py does.

What changed and is attacked here: plain legs receive into one buffer all sessions share
(`Leg.read`), a leg's sends are ordered by `WriteLock`, a batch is written as it is first
(`_send_fd`), a leg whose peer closed is closed at once (`Leg.ended`), the proxy accepts with a
loop of its own (`server._accept`), and whether an address is exempt from the limits is cached
(`limits._exempts`). What must hold: every session gets exactly its own octets, a slow reader
slows only its own session, a client that half-closes still gets every answer, resets at any
moment leak no descriptor, and the service keeps serving others through floods and stops cleanly.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from imapveil.records import CommandCompleted
from imapveil.relay import splice
from tests.helpers.attack import DISCONNECTED, Client, veil
from tests.helpers.dovecot import Dovecot

pytestmark = pytest.mark.dovecot
run = trio.to_thread.run_sync


@pytest.fixture(scope="module")
def target() -> Iterator[Dovecot]:
    server = Dovecot().start()
    try:
        server.wait_for_log(DISCONNECTED, 1)  # the readiness probe's connection
        yield server
    finally:
        server.cleanup()


def message(size: int, seed: int) -> bytes:
    """A message of exactly `size` octets whose body is this session's own (`seed`)."""
    rng = random.Random(seed)
    head = b"Subject: session %d\r\n\r\n" % seed
    line_count = (size - len(head)) // 80 + 1
    lines = (
        b"%08d " % seed
        + bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz0123456789", k=69))
        + b"\r\n"
        for _ in range(line_count)
    )
    return (head + b"".join(lines))[:size]


# --- A client that half-closes (shutdown(SHUT_WR)) and keeps reading.


def half_close(address: tuple[str, int], data: bytes) -> bytes:
    """The greeting, then `data` and our EOF at once; everything received until the end."""
    with socket.create_connection(address, timeout=5) as s:
        got = s.recv(4096)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        while chunk := s.recv(65536):
            got += chunk
    return got


def shape(transcript: bytes) -> list[bytes]:
    """Each line's first two words (a tag or `*`, and the status or kind): what a direct
    connection and a proxied one share, timings and capability lists apart."""
    return [b" ".join(line.split(b" ")[:2]) for line in transcript.split(b"\r\n")]


HALF_CLOSED = {
    "after-logout": b"L LOGIN alice wonderland\r\nQ LOGOUT\r\n",
    "after-commands": b"L LOGIN alice wonderland\r\nS SELECT INBOX\r\nN NOOP\r\n",
    "before-login": b"N NOOP\r\nC CAPABILITY\r\n",
    "after-a-big-fetch": b"L LOGIN bob builder\r\nS EXAMINE INBOX\r\nF FETCH 1:* BODY[]\r\n",
}


@pytest.mark.parametrize("name", list(HALF_CLOSED))
async def test_a_client_that_half_closes_still_gets_every_answer(
    target: Dovecot, tmp_path: Path, name: str
) -> None:
    """Found attacking the close (attack3): `nc -N`, or a script's shutdown(SHUT_WR) after its
    LOGOUT, got nothing but the greeting through the proxy (the client's EOF ended the session
    at once), where Dovecot directly answers every command, then closes. Now the EOF goes on to
    the server and its answers are relayed until it closes."""
    data = HALF_CLOSED[name]
    if name == "after-a-big-fetch":  # a server literal big enough to be spliced
        with Client(target.address) as c:
            c.greeting()
            c.login(b"bob", b"builder")
            big = message(3 * splice.SPLICE_MIN + 5, 1)
            c.send(b"A APPEND INBOX {%d+}\r\n" % len(big) + big + b"\r\n")
            assert c.until(b"A").startswith(b"A OK"), c.transcript
            c.logout()
    direct = await run(half_close, target.address, data)
    literals = splice.totals.literals
    async with veil(target.address, tmp_path) as v:
        proxied = await run(half_close, v.address, data)
        (end,) = await v.sessions_ended(1)
    tags = [line.split(b" ")[0].decode() for line in data.split(b"\r\n") if line]
    assert shape(proxied) == shape(direct), (direct, proxied)
    assert proxied.split(b"\r\n")[-2].startswith(tags[-1].encode() + b" OK"), proxied[-300:]
    if name == "after-a-big-fetch":
        assert big in proxied
        assert splice.totals.literals > literals
    answered = [(r.tag, r.status) for r in v.sink.of(CommandCompleted)]
    assert answered == [(tag, "OK") for tag in tags]
    assert end.reason == ("logout" if name == "after-logout" else "client_closed")
    assert end.bytes_from_client == len(data)


def close_early(address: tuple[str, int], data: bytes) -> None:
    """The greeting, then `data`, then a full close before any answer came (a FIN: nothing
    unread yet); the answers that come later meet a closed socket."""
    with socket.create_connection(address, timeout=5) as s:
        s.recv(4096)
        s.sendall(data)


async def test_a_client_that_closes_before_a_big_answer_has_closed_not_failed(
    target: Dovecot, tmp_path: Path
) -> None:
    """The EOF cannot tell a half-close from a close: a client that closed for good before a
    big answer came ends as `client_closed`, as it did before half-closes were honoured, not
    as an `error` of the send that met its closed socket."""
    with Client(target.address) as c:
        c.greeting()
        c.login(b"bob", b"builder")
        big = message(4 * 1024 * 1024, 2)  # far more than the socket buffers hold
        c.send(b"A APPEND INBOX {%d+}\r\n" % len(big) + big + b"\r\n")
        assert c.until(b"A").startswith(b"A OK"), c.transcript[-300:]
        c.logout()
    data = b"L LOGIN bob builder\r\nS EXAMINE INBOX\r\nF FETCH 1:* BODY[]\r\n"
    async with veil(target.address, tmp_path) as v:
        await run(close_early, v.address, data)
        (end,) = await v.sessions_ended(1)
    assert (end.reason, end.bytes_from_client) == ("client_closed", len(data))
