"""The client leg's DEFLATE (COMPRESS=DEFLATE, RFC 4978): what it costs a session to hold.

A session holds its compressor for as long as it lasts, idle ones (IDLE, hours) included. zlib's
default compressor (a 32 KiB window, memory level 8) is about 262 KiB a session: sixteen times
the whole of an idle plain session (about 13 KiB), and with `max_sessions` of them ~2.6 GB.
"""

from __future__ import annotations

import random
import tracemalloc
import zlib

import trio
import trio.testing

from imapveil.relay.deflate import DeflateStream

KIB = 1024


def envelopes(n: int) -> bytes:
    """FETCH (UID FLAGS ENVELOPE) answers for `n` messages, as a mail client's sync gets them."""
    rng = random.Random(7)
    names = ["Alice Example", "Bob Builder", "Carol Danvers", "Dave Grohl", "Eve Online"]
    subjects = ["Re: quarterly report", "Lunch?", "Meeting notes", "[list] weekly digest"]
    lines = []
    for i in range(1, n + 1):
        name, subject = rng.choice(names), rng.choice(subjects)
        lines.append(
            f"* {i} FETCH (UID {i + 1000} FLAGS (\\Seen) RFC822.SIZE {rng.randint(1000, 90000)} "
            f'ENVELOPE ("Mon, {rng.randint(1, 28)} Nov 2026 10:00:00 +0000" "{subject}" '
            f'(("{name}" NIL "{name.split()[0].lower()}" "example.org")) NIL NIL '
            f'(("Me" NIL "me" "example.com")) NIL NIL NIL "<{rng.getrandbits(64):x}@example.org>"))'
            "\r\n"
        )
    return "".join(lines).encode()


async def test_a_compressed_session_holds_little_zlib_state() -> None:
    """What zlib holds for a session that has sent a sync's answers and read a command: the
    compressor's window and hash chains and the decompressor's window (the client chooses that
    one: 32 KiB). Failed before: 301 KiB (the compressor alone 262)."""
    ours, theirs = trio.testing.memory_stream_pair()
    deflate = zlib.compressobj(6, zlib.DEFLATED, -15)  # the client's, not counted
    command = deflate.compress(b"a NOOP\r\n") + deflate.flush(zlib.Z_SYNC_FLUSH)
    answers = envelopes(300)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        leg = DeflateStream(ours)
        await leg.send_all(answers)
        await theirs.receive_some()  # not held by the session: the client's
        await theirs.send_all(command)
        assert await leg.receive_some() == b"a NOOP\r\n"
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held <= 128 * KIB, f"{held / KIB:.0f} KiB"


async def test_what_we_send_inflates_with_any_window_and_compresses_nearly_as_well() -> None:
    """Clients inflate with a 32 KiB window (any smaller window of ours is within it): a sync's
    answers, sent in pieces as the proxy sends them, come back whole, within 10 % of the size
    zlib's default compressor would make of them."""
    ours, theirs = trio.testing.memory_stream_pair()
    leg = DeflateStream(ours)
    data = envelopes(2000)
    pieces = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    inflate, got, wire = zlib.decompressobj(-15), b"", 0
    for piece in pieces:
        await leg.send_all(piece)
        chunk = await theirs.receive_some()
        wire += len(chunk)
        got += inflate.decompress(chunk)
    assert got == data
    default = zlib.compressobj(6, zlib.DEFLATED, -15)
    best = sum(len(default.compress(p) + default.flush(zlib.Z_SYNC_FLUSH)) for p in pieces)
    assert wire <= best * 1.10, (wire, best)
