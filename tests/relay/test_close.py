"""How a session's legs are closed: one whose peer has closed at once (nothing is left to read,
so closing cannot reset anything), one whose peer is still there gracefully (our EOF first, then
what the peer still sends is read until it closes, so that our last words are not destroyed by
a reset)."""

from __future__ import annotations

import socket
import struct

import trio

from imapveil.relay.streams import CLOSE_GRACE, Leg


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.create_connection(listener.getsockname()[:2])
        ours, _ = listener.accept()
    ours.setblocking(False)
    return ours, peer


def leg_of(ours: socket.socket) -> Leg:
    return Leg("client", trio.SocketStream(trio.socket.from_stdlib_socket(ours)))


async def test_a_leg_whose_peer_closed_is_closed_at_once() -> None:
    ours, peer = tcp_pair()
    with peer:
        leg = leg_of(ours)
        await leg.send_many([b"* BYE bye\r\n"])
        peer.shutdown(socket.SHUT_WR)  # the peer is done sending, but never closes
        assert await leg.receive() == b""
        leg.ended = True  # as the relay marks it
        with trio.fail_after(CLOSE_GRACE / 4):
            await leg.close_gracefully()
        assert ours.fileno() == -1
        peer.settimeout(5)
        assert peer.recv(100) == b"* BYE bye\r\n"
        assert peer.recv(100) == b""  # and then our FIN


async def test_a_leg_whose_peer_is_still_there_is_closed_gracefully() -> None:
    ours, peer = tcp_pair()
    with peer:
        leg = leg_of(ours)
        await leg.send_many([b"* BYE bye\r\n"])
        peer.sendall(b"a NOOP\r\n")  # unread: closing now would send a reset

        def peer_reads_then_closes() -> bytes:
            peer.settimeout(5)
            got = b""
            while chunk := peer.recv(100):  # until our EOF
                got += chunk
            peer.sendall(b"b NOOP\r\n")  # still talking after our EOF: read and dropped
            peer.shutdown(socket.SHUT_WR)
            return got

        async with trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def run_peer() -> None:
                got.append(await trio.to_thread.run_sync(peer_reads_then_closes))

            nursery.start_soon(run_peer)
            with trio.fail_after(CLOSE_GRACE):
                await leg.close_gracefully()
        assert got == [b"* BYE bye\r\n"]
        assert ours.fileno() == -1


async def test_a_leg_whose_peer_resets_while_it_closes_is_closed_at_once() -> None:
    ours, peer = tcp_pair()
    leg = leg_of(ours)
    await leg.send_many([b"* BYE bye\r\n"])  # unread by the peer: its close sends a reset
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    with trio.fail_after(CLOSE_GRACE / 4):
        await leg.close_gracefully()
    assert ours.fileno() == -1
