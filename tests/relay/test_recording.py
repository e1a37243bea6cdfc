"""The recording stream under a TLS server stream: it forwards everything, keeps the first octets
(bounded) and, stopped, keeps nothing more."""

from __future__ import annotations

import ssl

import trio
import trio.testing
import trustme

from imapveil.protocol import ja4
from imapveil.relay.recording import RECORD_LIMIT, RecordingStream


async def test_forwards_both_ways_and_keeps_only_the_first_octets() -> None:
    near, far = trio.testing.memory_stream_pair()
    recording = RecordingStream(far, limit=10)
    await near.send_all(b"0123456")
    assert await recording.receive_some() == b"0123456"
    await near.send_all(b"789abcdef")
    assert await recording.receive_some() == b"789abcdef"
    await recording.send_all(b"back")
    assert await near.receive_some() == b"back"
    assert recording.stop() == b"0123456789"
    await near.send_all(b"more")
    assert await recording.receive_some() == b"more"
    assert recording.stop() == b""  # nothing kept once stopped
    await recording.aclose()
    await near.send_all(b"")  # the far side is closed: the near one sees it
    assert await near.receive_some() == b""


async def _handshake(limit: int, server_name: str | None) -> tuple[RecordingStream, bytes]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    if server_name is None:
        client.check_hostname = False
    near, far = trio.testing.memory_stream_pair()
    recording = RecordingStream(far, limit=limit)
    server_tls = trio.SSLStream(recording, server, server_side=True)
    client_tls = trio.SSLStream(near, client, server_hostname=server_name)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client_tls.do_handshake)
        await server_tls.do_handshake()
    kept = recording.stop()
    await client_tls.send_all(b"a1 NOOP\r\n")
    assert await server_tls.receive_some() == b"a1 NOOP\r\n"
    return recording, kept


async def test_the_client_hello_under_an_ssl_stream() -> None:
    _, kept = await _handshake(RECORD_LIMIT, "localhost")
    assert 0 < len(kept) < RECORD_LIMIT
    with_sni = ja4.fingerprint(kept)
    _, kept = await _handshake(RECORD_LIMIT, None)
    without_sni = ja4.fingerprint(kept)
    assert with_sni is not None and without_sni is not None
    assert with_sni[:4] == "t13d" and without_sni[:4] == "t13i"
    # SNI is one extension more; nothing else changes
    assert int(with_sni[6:8]) == int(without_sni[6:8]) + 1
    assert with_sni[8:] == without_sni[8:]


async def test_a_client_hello_longer_than_the_bound_gives_none_and_tls_works() -> None:
    _, kept = await _handshake(100, "localhost")
    assert len(kept) == 100
    assert ja4.fingerprint(kept) is None
