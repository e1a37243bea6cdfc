"""A TLS leg's receive takes every record its socket's receive brought (`Leg._more_records`), not
one a receive: Dovecot writes records of about 4 KiB, and one record per receive (and per send to
the client) made a FETCH from a TLS upstream cost some 16 s of CPU per GB (bench/run.py, "bulk,
TLS both legs"). What must hold besides: every octet, in order, however the records are cut into
the socket's receives; a record not all there yet waits for the rest; and what ends the stream
(the peer's close_notify, a record that does not decrypt) comes after the octets before it, as
the same error trio gives.

Real TLS (trio's `SSLStream` both ends, trustme's certificate), over memory streams with the
octets between them handed over by the test, so that where each receive ends is the test's.
"""

from __future__ import annotations

import random
import ssl

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imapveil.relay.streams import RECORD_SIZE, Leg, describe, tls_reason
from tests.conftest import TlsMaterial

Stream = trio.abc.Stream


class Wire:
    """A client `SSLStream` and a server one, handshaken, with the client's octets kept by the
    test (`sent`) until it hands them to the server (`deliver`)."""

    def __init__(self, tls: TlsMaterial) -> None:
        client_raw, self._client_wire = trio.testing.memory_stream_pair()
        self._server_wire, server_raw = trio.testing.memory_stream_pair()
        self.client = trio.SSLStream(client_raw, tls.client_context(), server_hostname="127.0.0.1")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls.cert, tls.key)
        self.server = trio.SSLStream(server_raw, context, server_side=True)

    async def handshake(self) -> None:
        async def pump(source: Stream, sink: Stream) -> None:
            while data := await source.receive_some():
                await sink.send_all(data)

        async with trio.open_nursery() as pumps:
            pumps.start_soon(pump, self._client_wire, self._server_wire)
            pumps.start_soon(pump, self._server_wire, self._client_wire)
            async with trio.open_nursery() as both:
                both.start_soon(self.client.do_handshake)
                both.start_soon(self.server.do_handshake)
            pumps.cancel_scope.cancel()

    async def sent(self) -> bytes:
        """What the client has written since the last call, as it would cross the wire."""
        out = b""
        while True:
            with trio.move_on_after(0.01):  # a memory stream's receive checkpoints first
                data = await self._client_wire.receive_some()
                out += data
                if data:  # b"": the client closed its end
                    continue
            return out

    async def deliver(self, octets: bytes) -> None:
        await self._server_wire.send_all(octets)


async def records(wire: Wire, payloads: list[bytes]) -> bytes:
    """The client's octets for `payloads`, one TLS record (at least) each."""
    for payload in payloads:
        await wire.client.send_all(payload)
    return await wire.sent()


async def delivered(tls: TlsMaterial, payloads: list[bytes]) -> Leg:
    """The server's leg, its socket's next receive bringing the records of `payloads`."""
    wire = Wire(tls)
    await wire.handshake()
    await wire.deliver(await records(wire, payloads))
    return Leg("server", wire.server)


async def test_one_receive_takes_every_record_the_socket_brought(
    tls_material: TlsMaterial,
) -> None:
    payloads = [bytes([65 + i % 26]) * 4000 for i in range(12)]  # Dovecot's ~4 KiB records
    leg = await delivered(tls_material, payloads)
    # trio's one receive from the transport takes 64 KiB at most (memory streams: all of it);
    # its `receive_some` decrypts one record of them: the leg returns them all.
    assert await leg.receive() == b"".join(payloads)


async def test_records_past_the_receive_size_wait_for_the_next_receive(
    tls_material: TlsMaterial,
) -> None:
    payloads = [bytes([97 + i % 26]) * RECORD_SIZE for i in range(20)]  # 320 KiB
    leg = await delivered(tls_material, payloads)
    got = [await leg.receive()]
    while sum(map(len, got)) < 20 * RECORD_SIZE:
        got.append(await leg.receive())
    assert b"".join(got) == b"".join(payloads)
    assert max(map(len, got)) <= 256 * 1024
    assert len(got) > 1


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(st.integers(1, 6000), min_size=1, max_size=12),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_octet_in_order_however_the_records_are_cut(
    tls_material: TlsMaterial, sizes: list[int], seed: int
) -> None:
    """Records cut anywhere between the socket's receives (mid-header, mid-record): a record
    not all there is left for trio, which reads the rest; nothing is lost, doubled or moved."""
    pick = random.Random(seed)

    async def main() -> None:
        wire = Wire(tls_material)
        await wire.handshake()
        leg = Leg("server", wire.server)
        payloads = [bytes([pick.randrange(256)]) * n for n in sizes]
        raw = await records(wire, payloads)
        want = b"".join(payloads)
        got = b""
        cuts = sorted(pick.sample(range(1, len(raw)), min(len(raw) - 1, pick.randrange(6))))
        for start, end in zip([0, *cuts], [*cuts, len(raw)], strict=True):
            await wire.deliver(raw[start:end])
            await trio.testing.wait_all_tasks_blocked()
            # Whatever whole records have come can be received now; a receive waits only
            # when none has (given up after a moment: what it would have read stays for the
            # next one, which the end below waits for without a clock).
            while len(got) < len(want):
                with trio.move_on_after(0.01):
                    got += await leg.receive()
                    continue
                break
        with trio.fail_after(30):
            while len(got) < len(want):
                got += await leg.receive()
        assert got == want

    trio.run(main)


@pytest.mark.parametrize("ending", ["close_notify", "bad_record"])
async def test_what_ends_the_stream_comes_after_the_octets_before_it_as_trio_says_it(
    tls_material: TlsMaterial, ending: str
) -> None:
    """Records, then in the same receive the peer's close_notify, or a record whose octets do
    not decrypt: the records' octets first, then what trio itself gives for it, each time the
    leg is asked again: the end (b"", Python's ssl reads a close_notify as that), or a
    `BrokenResourceError` from OpenSSL's error, which `tls_reason` names."""

    async def ended(leg_or_trio: str) -> tuple[bytes, list[str]]:
        wire = Wire(tls_material)
        await wire.handshake()
        raw = await records(wire, [b"x" * 3000, b"y" * 3000, b"z" * 3000])
        if ending == "close_notify":
            await wire.client.aclose()
            raw += await wire.sent()
        else:
            await wire.client.send_all(b"w" * 100)
            bad = bytearray(await wire.sent())
            bad[-1] ^= 0x01  # the record's tag no longer matches
            raw += bytes(bad)
        await wire.deliver(raw)
        leg = Leg("server", wire.server)
        got = b""
        ends: list[str] = []
        while len(ends) < 2:
            try:
                data = await (leg.receive() if leg_or_trio == "leg" else wire.server.receive_some())
            except trio.BrokenResourceError as exc:
                ends.append(tls_reason(exc))
            else:
                got += data
                if not data:
                    ends.append("end")
        return got, ends

    leg = await ended("leg")
    alone = await ended("trio")
    assert leg[0] == alone[0] == b"x" * 3000 + b"y" * 3000 + b"z" * 3000
    expected = "end" if ending == "close_notify" else "decryption_failed_or_bad_record_mac"
    assert leg[1][0] == alone[1][0] == expected
    assert leg[1][1] in (expected, alone[1][1])  # trio's second word is "broken", no cause


def test_an_ssl_error_is_described_by_its_reason_not_its_code_as_an_errno(
    tls_material: TlsMaterial,
) -> None:
    """`describe` (a failed send's words in a `session_end` record) took an `ssl.SSLError` for
    an OSError with an errno: OpenSSL's error code 1 read as `eperm`, 8 as `enoexec`. It names
    OpenSSL's reason now, as `tls_reason` does; peer data never (a reason is OpenSSL's name)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_material.cert, tls_material.key)
    incoming = ssl.MemoryBIO()
    server = context.wrap_bio(incoming, ssl.MemoryBIO(), server_side=True)
    incoming.write(b"GET /secret HTTP/1.0\r\n\r\n")
    with pytest.raises(ssl.SSLError) as raised:
        server.do_handshake()
    try:
        raise trio.BrokenResourceError from raised.value
    except trio.BrokenResourceError as wrapped:
        assert describe(wrapped) == describe(raised.value) == "http_request"
    assert tls_reason(raised.value) == "http_request"
