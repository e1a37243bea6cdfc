"""COMPRESS=DEFLATE (RFC 4978) as a trio stream: raw DEFLATE (no zlib header, wbits -15) over
another stream, each send flushed with Z_SYNC_FLUSH so the peer can decode it at once.

Decompression is bounded: a small compressed input can expand enormously (a "zip bomb"), so
at most `max_output` octets come out of one `receive_some`; the rest waits in the decompressor's
own unconsumed input until the next call, or, all input taken, in zlib itself: after a call
that filled its limit, zlib is asked again before more input is awaited (a partial flush, as
Thunderbird, K-9 Mail and iOS Mail flush, can leave a burst's last octets there). A stream the
peer ended (a final block) takes nothing more: zlib would keep every later octet, copying it all
at each call.
"""

from __future__ import annotations

import zlib

import trio


class DeflateError(trio.BrokenResourceError):
    """The peer's DEFLATE stream cannot be read on: invalid data, or data after its end. The
    message says which (zlib's words, never the peer's octets)."""


class DeflateStream(trio.abc.Stream):
    def __init__(self, inner: trio.abc.Stream, *, max_output: int = 256 * 1024) -> None:
        self.inner = inner
        self.max_output = max_output
        # An 8 KiB window and memory level 6: 70 KiB of zlib's state, not its default's 262
        # (a 32 KiB window, level 8), held for as long as the session lasts; answers 3-9 % the
        # larger (a sync's envelopes, a text body). The client inflates with any window up to
        # 32 KiB, so a smaller one of ours is always within it.
        self._compress = zlib.compressobj(6, zlib.DEFLATED, -13, 6)
        self._decompress = zlib.decompressobj(-15)
        self._pending = b""  # compressed input not yet turned into output
        self._full = False  # the last inflate filled its limit: zlib may hold more output

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        out = self._compress.compress(bytes(data)) + self._compress.flush(zlib.Z_SYNC_FLUSH)
        await self.inner.send_all(out)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        limit = min(max_bytes or self.max_output, self.max_output)
        while True:
            if self._pending or self._full:
                out = self._inflate(self._pending, limit)
                if out:
                    return out
            self._check_end()  # what came with the final block, before waiting for more
            data = await self.inner.receive_some()
            if not data:
                return b""
            self._check_end(more=True)
            out = self._inflate(data, limit)
            if out:
                return out

    def _inflate(self, data: bytes | bytearray, limit: int) -> bytes:
        """At most `limit` octets of output; the rest of the input waits in `_pending`. Bad
        input is the peer's problem: it breaks this stream, never escapes as zlib.error."""
        try:
            out = self._decompress.decompress(data, limit)
        except zlib.error as exc:
            self._pending = b""
            # zlib's own words ("Error -3 while decompressing data: invalid block type"), the
            # part after the code: a fixed phrase, never the peer's octets.
            raise DeflateError(f"invalid DEFLATE data: {str(exc).rpartition(': ')[2]}") from None
        self._pending = self._decompress.unconsumed_tail  # b"" once the stream has ended
        self._full = len(out) >= limit
        return out

    def _check_end(self, more: bool = False) -> None:
        """The peer ended its DEFLATE stream (a final block) and something followed (`more`,
        or what came with the final block): the stream is broken. Nothing may follow, and zlib
        would keep all of it in `unused_data`, copying everything kept so far at each call:
        memory without bound, time the square of what came."""
        if self._decompress.eof and (more or self._decompress.unused_data):
            raise DeflateError("data after the end of the DEFLATE stream")

    async def aclose(self) -> None:
        await self.inner.aclose()
