"""Round 11 of attacks from outside: raw sockets through the proxy (built as `imapveil serve`
builds it) to a real Dovecot that logs every ID it receives (`imap_id_log = *`).

Aimed at what the earlier attack modules do not cover:

- COMPRESS=DEFLATE: a client that ends its DEFLATE stream (a final block) and goes on sending.
  zlib keeps whatever follows the end in `unused_data`, copying it whole at each receive: the
  proxy's memory grew without bound and its CPU with the square of what came, on the one event
  loop every session shares.
"""

from __future__ import annotations

import contextlib
import socket
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from imapveil.records import SessionEnded
from tests.helpers.attack import Client, own_dovecot, veil
from tests.helpers.dovecot import Dovecot

pytestmark = pytest.mark.dovecot
run = trio.to_thread.run_sync


@pytest.fixture(scope="module")
def target() -> Iterator[Dovecot]:
    with own_dovecot() as server:
        yield server


# --- COMPRESS: data after the end of the DEFLATE stream.

AFTER_END = 32 * 1024 * 1024
"""Octets the attacker offers after its final DEFLATE block (64 KiB a send)."""


def deflate_then_garbage(address: tuple[str, int]) -> tuple[bytes, int, float]:
    """COMPRESS, then a NOOP in a DEFLATE stream that ends (Z_FINISH), then up to AFTER_END
    octets more: (what came back, octets sent after the end, seconds until the proxy closed)."""
    with socket.create_connection(address, timeout=10) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"* OK")
        s.sendall(b"z COMPRESS DEFLATE\r\n")
        assert f.readline().startswith(b"z OK"), "COMPRESS refused"
        deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        s.sendall(deflate.compress(b"n NOOP\r\n") + deflate.flush(zlib.Z_FINISH))
        started = time.monotonic()
        sent = 0
        chunk = b"\x00" * 65536
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < AFTER_END:
                s.sendall(chunk)
                sent += len(chunk)
        got = b""
        with contextlib.suppress(ConnectionResetError):
            try:
                while data := s.recv(65536):
                    got += data
            except TimeoutError:
                raise AssertionError(
                    f"the proxy took {sent} octets after the end of the DEFLATE stream and did"
                    " not close the session"
                ) from None
        return got, sent, time.monotonic() - started


def noop_round_trips(address: tuple[str, int], stop: trio.Event | None = None) -> float:
    """A bystander: NOOPs one after another until told to stop; the longest wait (seconds)."""
    worst = 0.0
    with Client(address) as c:
        c.greeting()
        for i in range(200):
            began = time.monotonic()
            c.send(b"n%d NOOP\r\n" % i)
            assert c.until(b"n%d" % i).startswith(b"n%d OK" % i), c.transcript[-300:]
            worst = max(worst, time.monotonic() - began)
    return worst


async def test_data_after_the_end_of_a_deflate_stream_ends_the_session(
    target: Dovecot, tmp_path: Path
) -> None:
    """Found (attack11): after the client's final DEFLATE block every octet it sent was kept
    (zlib's `unused_data`, copied whole at each receive): 32 MiB took minutes of the event
    loop, during which no other session was served, and as much memory as was sent. Now
    data after the end of the stream ends that session, like any other bad DEFLATE input."""
    async with veil(target.address, tmp_path, compress=True) as v:
        with trio.fail_after(60):
            got, sent, took = await run(deflate_then_garbage, v.address)
        (end,) = await v.sessions_ended(1)
        # The bystander comes after: the proxy serves as before.
        worst = await run(noop_round_trips, v.address)
        await v.sessions_ended(2)
    assert sent < AFTER_END, f"all {sent} octets after the DEFLATE end were taken ({took:.1f} s)"
    assert end.reason == "client_closed", end
    assert end.compressed
    assert worst < 1.0
    assert isinstance(end, SessionEnded)
    assert got.startswith(b"z OK") or not got  # read past the COMPRESS answer; compressed rest
