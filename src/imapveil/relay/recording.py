"""A stream that keeps a copy of the first octets it receives, for the client's TLS ClientHello.

Python's `ssl` does not show the ClientHello, but `trio.SSLStream` reads the raw TLS records
from the stream under it: put a `RecordingStream` there before the handshake, and what the client
sent first is at hand afterwards (`protocol/ja4.py` makes the fingerprint of it).

The copy is bounded by `RECORD_LIMIT` (16 KiB, the largest TLS record): a ClientHello is usually
200 to 600 octets, about 1.8 KB with a post-quantum key share (X25519MLKEM768); what follows it in
the handshake (a TLS 1.3 client's Finished) adds a few hundred. A ClientHello longer than what was
kept gives no fingerprint. `stop()` ends the copying and hands the octets over (the caller keeps
only the fingerprint); from then on a receive costs one attribute check more than the stream
under it (measured in docs/tls-fingerprint.md).
"""

from __future__ import annotations

import trio

RECORD_LIMIT = 16 * 1024


class RecordingStream(trio.abc.Stream):
    """Forwards everything to `inner`; keeps the first `limit` octets received until `stop()`."""

    __slots__ = ("_kept", "_room", "inner")

    def __init__(self, inner: trio.abc.Stream, limit: int = RECORD_LIMIT) -> None:
        self.inner = inner
        self._kept = bytearray()
        self._room = limit

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        if self._room:
            piece = data[: self._room]
            self._kept += piece
            self._room -= len(piece)
        return data

    def recording(self) -> bool:
        """Whether receives are still copied (until `stop()`)."""
        return self._room > 0

    def stop(self) -> bytes:
        """What was received so far (at most the limit); nothing more is kept after this."""
        kept = bytes(self._kept)
        self._kept = bytearray()
        self._room = 0
        return kept

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()
