"""Round 16 of attacks from outside, on COMPRESS=DEFLATE on the client leg (`compress = true`):
raw sockets through the proxy (built as `imapveil serve` builds it) to a real Dovecot, the
client's side deflated with Python's zlib (raw DEFLATE, wbits -15). Found and fixed:

- A decompression bomb after the session ends: a line of 64 MiB of `x` in 65 KiB of DEFLATE.
  The proxy answered `* BYE [TOOBIG]` at the line limit, then, closing the leg gracefully (let
  the peer read our last words, drain what it sends), inflated everything the client had sent
  and went on sending for `CLOSE_GRACE` (2 s): 64 MiB inflated to be thrown away, in runs of
  about 0.17 s of the event loop every session shares (another client's NOOP took up to 0.7 s),
  about 1.2 s of CPU per 200 KB the attacker sent; and the client saw its connection end only
  after those 2 s (a DEFLATE stream cannot be half-closed, so no FIN came before).
- A partially flushed burst (Z_PARTIAL_FLUSH, which Thunderbird, K-9 and iOS Mail use) a few
  octets over 256 KiB inflated: those octets stayed inside zlib until the client sent more.
- DEFLATE that cannot be inflated ended the session as a reset: no answer, no violation,
  `session_end` `client_closed`.
- Our OK to COMPRESS and the switch to DEFLATE were two holds of the write lock: a server
  response went out between them, in clear text where the client reads DEFLATE.
- COMPRESS while a FETCH's literal streamed: its BAD was written into the message.

Held (measured, not kept as tests): a 200 MiB line, literal, ID literal or quoted ID value in
about 200 KB of DEFLATE each ends at its limit with `* BYE [TOOBIG]` and a record, the proxy at
about 39 MB RSS, another client's NOOPs at most 36 ms (a 200 MiB APPEND that Dovecot takes
costs about 1 s of the proxy's CPU: linear in what is relayed); a client that reads nothing of
20 compressed FETCHes of 6 MB slows only itself (another client's NOOP: 6 ms); NOOPs one at a
time cost 235-315 us of the proxy's CPU compressed, 175-185 us plain; an ID in 3-octet partial
flushes, over STARTTLS, is cleaned as in clear text (Dovecot's `ID sent:` line); COMPRESS before
login (BAD), twice (NO [COMPRESSIONACTIVE]), with an unknown mechanism (BAD), pipelined behind
LOGIN (BAD [CLIENTBUG]) or during IDLE (BYE, `idle_not_done`); AUTHENTICATE and LOGIN after
COMPRESS reach Dovecot (BAD) and no password reaches a record.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
import zlib
from pathlib import Path

import pytest
import trio

from imapveil.records import Violation
from imapveil.relay import streams
from imapveil.relay.deflate import DeflateStream
from imapveil.relay.streams import CLOSE_GRACE
from tests.helpers import scripted
from tests.helpers.attack import compress_after_login, veil
from tests.helpers.dovecot import Dovecot
from tests.helpers.scripted import Peer

pytestmark = pytest.mark.dovecot
run = trio.to_thread.run_sync

MIB = 1 << 20


def bomb(prefix: bytes, mib: int, suffix: bytes = b"") -> bytes:
    """`prefix`, `mib` MiB of `x`, `suffix`, as one raw DEFLATE flush (about 1 KiB per MiB)."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = b"x" * MIB
    parts = [deflate.compress(prefix)]
    parts += [deflate.compress(chunk) for _ in range(mib)]
    parts += [deflate.compress(suffix), deflate.flush(zlib.Z_SYNC_FLUSH)]
    return b"".join(parts)


@pytest.fixture
def inflated(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Octets the proxy's DEFLATE streams gave out (inflated), counted as they come."""
    counted = [0]
    receive_some = DeflateStream.receive_some

    async def counting(self: DeflateStream, max_bytes: int | None = None) -> bytes:
        data = await receive_some(self, max_bytes)
        counted[0] += len(data)
        return data

    monkeypatch.setattr(DeflateStream, "receive_some", counting)
    return counted


# --- A bomb the proxy need not read: inflated only to be thrown away.


def bomb_after_the_end(address: tuple[str, int]) -> tuple[bytes, float]:
    """LOGIN, COMPRESS, then a 64 MiB line in one flush: (what came back inflated, seconds from
    the `* BYE` to the end of the connection)."""
    with socket.create_connection(address, timeout=10) as s:
        compress_after_login(s)
        s.sendall(bomb(b"a NOOP ", 64, b"\r\n"))
        inflate, got = zlib.decompressobj(-15), b""
        while b"\r\n" not in got:
            data = s.recv(65536)
            assert data, got
            got += inflate.decompress(data)
        bye = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            while data := s.recv(65536):
                got += inflate.decompress(data)
        return got, time.monotonic() - bye


async def test_a_bomb_after_the_bye_is_not_inflated(
    target: Dovecot, tmp_path: Path, inflated: list[int]
) -> None:
    """Found (attack16c): after its `* BYE` the proxy inflated all the client sent while it
    closed the leg (64 MiB here, 2 s of draining); the connection ended only after
    `CLOSE_GRACE`. Now the compressed octets are drained as they came, never inflated, and the
    client sees the end of the connection at once."""
    async with veil(target.address, tmp_path, compress=True) as v:
        got, took = await run(bomb_after_the_end, v.address)
        (end,) = await v.sessions_ended(1)
    assert got.startswith(b"* BYE [TOOBIG]"), got
    assert end.reason == "line_too_long" and end.compressed, end
    assert [r.kind for r in v.sink.of(Violation)] == ["line_too_long"]
    assert inflated[0] < 4 * MIB, f"{inflated[0]} octets inflated for a line limit of 64 KiB"
    assert took < CLOSE_GRACE / 2, f"the connection ended {took:.2f} s after the BYE"


# --- Partial flushes (Z_PARTIAL_FLUSH), as Thunderbird, K-9 Mail and iOS Mail flush.

BURST = b"ppp NOOP\r\n" + b"n NOOP\r\n" * 32791
"""262,338 octets in 1.3 KiB of DEFLATE (level 9): the proxy inflates 256 KiB at a time, and this
burst's last 194 octets come out of zlib only on a call after the one that took its last input."""


def partially_flushed_burst(address: tuple[str, int]) -> int:
    """LOGIN, COMPRESS, then `BURST` in one partial flush: how many of its NOOPs were answered
    before the answers stopped (a read timed out) or all came."""
    with socket.create_connection(address, timeout=5) as s:
        compress_after_login(s)
        deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
        s.sendall(deflate.compress(BURST) + deflate.flush(zlib.Z_PARTIAL_FLUSH))
        inflate, answered, last = zlib.decompressobj(-15), 0, b""
        with contextlib.suppress(TimeoutError):
            while answered < BURST.count(b"\r\n"):
                data = s.recv(1 << 20)
                assert data, "the proxy closed the connection"
                lines = (last + inflate.decompress(data)).split(b"\r\n")
                last = lines.pop()
                answered += sum(1 for line in lines if b" OK NOOP" in line)
        return answered


async def test_a_partial_flush_is_inflated_to_its_end(target: Dovecot, tmp_path: Path) -> None:
    """Found (attack16c): a partially flushed burst whose inflated size passed 256 KiB (one
    receive of the proxy) by a few octets lost them inside zlib: the input had all been taken,
    so the proxy waited for more before asking zlib again, and the client, for its answers
    (the last 25 NOOPs here, never answered). Sync flushes end
    with four octets zlib had not read yet, which is why they never showed it."""
    async with veil(target.address, tmp_path, compress=True) as v:
        answered = await run(partially_flushed_burst, v.address)
        await v.sessions_ended(1)
    assert answered == BURST.count(b"\r\n")


# --- DEFLATE the proxy cannot inflate: an answer and a record, not a "client_closed".


def _finished(text: bytes) -> bytes:
    deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
    return deflate.compress(text) + deflate.flush(zlib.Z_FINISH)


UNREADABLE = {
    "garbage": b"\xff" * 64,
    "zlib_header": zlib.compress(b"n NOOP\r\n"),  # RFC 1950 framing, not raw DEFLATE
    "preset_dictionary": b"\x78\xbb" + b"\x00\x00\x00\x01" + _finished(b"n NOOP\r\n"),  # FDICT
    "after_the_final_block": _finished(b"n NOOP\r\n") + b"n NOOP\r\n",
}


def unreadable_deflate(address: tuple[str, int], data: bytes) -> bytes:
    """LOGIN, COMPRESS, then `data`: everything that came back, inflated (as far as it can be)."""
    with socket.create_connection(address, timeout=5) as s:
        compress_after_login(s)
        s.sendall(data)
        inflate, got = zlib.decompressobj(-15), b""
        with contextlib.suppress(ConnectionResetError):
            while data := s.recv(65536):
                got += inflate.decompress(data)
        return got


@pytest.mark.parametrize("kind", sorted(UNREADABLE))
async def test_deflate_that_cannot_be_inflated_gets_a_bye_and_a_record(
    target: Dovecot, tmp_path: Path, kind: str
) -> None:
    """Found (attack16c): invalid DEFLATE data (garbage, a zlib header, a preset dictionary) or
    data after the final block ended the session as a reset: no answer, no violation, and
    `session_end` said `client_closed`, as if the client had hung up; an administrator could not
    tell an attack (or a broken client) from a user quitting. Now the client gets `* BYE`
    (compressed: the proxy's own DEFLATE stream is intact), a `bad_deflate` violation is
    recorded, and the session ends as a `protocol_error`."""
    async with veil(target.address, tmp_path, compress=True) as v:
        got = await run(unreadable_deflate, v.address, UNREADABLE[kind])
        (end,) = await v.sessions_ended(1)
    assert got.endswith(b"* BYE [CLIENTBUG] Invalid DEFLATE data\r\n"), got
    assert end.reason == "protocol_error" and end.compressed, end
    (violation,) = v.sink.of(Violation)
    assert (violation.source, violation.kind, violation.action) == (
        "client",
        "bad_deflate",
        "closed",
    )
    assert violation.detail in (  # zlib's phrase or ours: never the client's octets
        "invalid DEFLATE data: invalid block type",
        "invalid DEFLATE data: invalid stored block lengths",
        "data after the end of the DEFLATE stream",
    ), violation.detail


# --- The switch: after our OK to COMPRESS, everything toward the client is DEFLATE.

EXISTS = b"* 1 EXISTS\r\n"


async def flooding(peer: Peer) -> None:
    """An upstream that, once logged in, sends untagged responses without end, as a busy
    mailbox's would."""
    await scripted.talkative(peer, EXISTS * 1000, after_login=True)


def compress_in_a_flood(address: tuple[str, int]) -> str:
    """LOGIN, COMPRESS while the upstream floods: "clean" if everything after our OK inflates to
    the server's lines, "refused" if COMPRESS got a BAD, else what went wrong."""
    with socket.create_connection(address, timeout=5) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"* OK")
        s.sendall(b"L LOGIN alice wonderland\r\n")
        while not f.readline().startswith(b"L OK"):
            pass
        s.sendall(b"z COMPRESS DEFLATE\r\n")
        while (line := f.readline()) == EXISTS:
            pass
        if line.startswith(b"z BAD"):
            return "refused"
        assert line == b"z OK DEFLATE active\r\n", line
        rest = f.read1(1 << 16)  # what the buffered reader took beyond the OK
        inflate, out = zlib.decompressobj(-15), b""
        try:
            out = inflate.decompress(rest)
            while len(out) < 64 * 1024:
                out += inflate.decompress(s.recv(1 << 16))
        except zlib.error as exc:
            return f"not DEFLATE after our OK: {exc}; {rest[:24]!r}"
        lines = out.split(b"\r\n")[:-1]
        return "clean" if set(lines) == {EXISTS[:-2]} else f"inflated to {lines[:2]!r}"


async def test_nothing_of_the_servers_goes_between_our_ok_and_deflate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found (attack16c): our OK to COMPRESS went out under one hold of the client leg's write
    lock, DEFLATE began under the next: a server response waiting for the lock (the client's
    socket full, so our OK had to wait) went out between them, in clear text where the client
    reads DEFLATE (its inflater failed: "invalid distance too far back"), in 2 of 5 sessions of
    a flooding upstream. Each send is made to wait here (a checkpoint, as a full socket makes
    it) so the other sender runs in between whenever it can: about 2 sessions in 3 failed, so
    all 8 clean by chance is about 1 in 4,000. Dovecot sends nothing unsolicited outside IDLE,
    which a COMPRESS cannot interrupt; other servers may."""
    send_fd = streams._send_fd

    async def waiting(fd: int, chunks: list[bytes | memoryview]) -> None:
        await send_fd(fd, chunks)
        await trio.lowlevel.checkpoint()

    monkeypatch.setattr(streams, "_send_fd", waiting)
    async with (
        scripted.serve(flooding, bytearray()) as upstream,
        veil(upstream, tmp_path, compress=True) as v,
    ):
        outcomes = [await run(compress_in_a_flood, v.address) for _ in range(8)]
    assert set(outcomes) <= {"clean", "refused"}, outcomes
    assert "clean" in outcomes


# --- A COMPRESS the proxy refuses while the server's answer streams: the BAD waits for its end.

BIG = b"Subject: big\r\n\r\n" + (b"x" * 78 + b"\r\n") * (100 * 1024)
"""8 MiB: more than the sockets between Dovecot, the proxy and a client that does not read hold."""


def fetch_then_compress(
    address: tuple[str, int], sent: trio.Event, go: threading.Event
) -> tuple[bytes, list[bytes]]:
    """bob's message fetched, and COMPRESS sent once its literal has begun (the proxy is in the
    middle of it); then, when told to, LOGOUT and everything read: (the literal, the lines
    after it)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    s.settimeout(10)
    s.connect(address)
    with s, s.makefile("rb") as f:
        assert f.readline().startswith(b"* OK")
        s.sendall(b"L LOGIN bob builder\r\ns SELECT INBOX\r\n")
        while not f.readline().startswith(b"s OK"):
            pass
        s.sendall(b"f FETCH 1 BODY[]\r\n")
        head = f.readline()
        found = re.search(rb"BODY\[\] \{(\d+)\}\r\n$", head)
        assert found, head
        s.sendall(b"z COMPRESS DEFLATE\r\n")
        trio.from_thread.run_sync(sent.set)
        assert go.wait(10)
        s.sendall(b"Q LOGOUT\r\n")
        literal = f.read(int(found.group(1)))
        return literal, f.read().splitlines(keepends=True)


async def test_a_compress_refused_mid_response_waits_for_its_end(
    target: Dovecot, tmp_path: Path
) -> None:
    """Found (attack16c): COMPRESS while a FETCH's literal streamed to the client got its
    `BAD [CLIENTBUG] Wait for the outstanding commands first` at once, written into the middle
    of the message (the literal's octets were the message's with our line among them; the
    client, counting octets, read the message's last line as a response). The proxy's own
    answer now waits for the end of the server's response, as its other lines do."""
    target.seed("bob", [BIG])
    sent, go = trio.Event(), threading.Event()
    async with veil(target.address, tmp_path, compress=True) as v, trio.open_nursery() as nursery:
        result: list[tuple[bytes, list[bytes]]] = []

        async def client() -> None:
            result.append(await run(fetch_then_compress, v.address, sent, go))

        nursery.start_soon(client)
        with trio.fail_after(10):
            await sent.wait()
            (core,) = [c.core for c in v.proxy.connections]  # this proxy's one session
            while core.commands < 4:  # noqa: ASYNC110 (LOGIN, SELECT, FETCH, COMPRESS read)
                await trio.sleep(0.01)
        go.set()
    ((literal, lines),) = result
    at = literal.find(b"z BAD")
    assert literal == BIG, f"octets {at}-: {literal[at - 8 : at + 70]!r}"
    assert lines[0] == b")\r\n", lines
    # At a response boundary (whichever: here the proxy says it after what it read with the
    # FETCH's end), a line of its own.
    assert [line[:2] for line in lines[1:]] == [b"f ", b"* ", b"Q ", b"z "] or [
        line[:2] for line in lines[1:]
    ] == [b"f ", b"z ", b"* ", b"Q "], lines
    assert b"z BAD [CLIENTBUG] Wait for the outstanding commands first\r\n" in lines
