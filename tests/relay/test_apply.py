"""How the relay carries out the core's actions: a command's record is written once its answer
is on its way (not before: the client does not wait for the event log), and never lost, even when
the answer cannot be delivered and the session is stopped meanwhile."""

from __future__ import annotations

import socket

import trio

from imapveil.protocol.actions import Direction, Emit, Forward
from imapveil.protocol.config import CoreConfig
from imapveil.records import CommandCompleted, Record
from imapveil.relay.connection import Connection, RelaySettings
from imapveil.relay.timers import Timers
from imapveil.sinks import MemorySink


def record(tag: str) -> CommandCompleted:
    return CommandCompleted("s1", tag, "NOOP", "authenticated", "OK", None, 0.1)


def connection(ours: socket.socket, sink: MemorySink) -> Connection:
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    settings = RelaySettings("127.0.0.1", 1, CoreConfig())
    return Connection(
        stream, client_address="c", session_id="s1", settings=settings, sink=sink, timers=Timers()
    )


def tags(sink: MemorySink) -> list[str]:
    return [r.tag for r in sink.records if isinstance(r, CommandCompleted)]


def pending(peer: socket.socket) -> bytes:
    try:
        return peer.recv(100, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""


async def test_records_follow_their_sends_in_order() -> None:
    ours, theirs = socket.socketpair()
    sink = MemorySink()
    sent = []

    class Watching(MemorySink):
        def emit(self, r: Record) -> None:  # what the peer had received when it was written
            sent.append(pending(theirs))
            sink.emit(r)

    with ours, theirs:
        conn = connection(ours, Watching())
        await conn._apply(
            [Emit(record("a")), Forward(Direction.TO_CLIENT, b"a OK\r\n"), Emit(record("b"))]
        )
    assert tags(sink) == ["a", "b"]
    assert sent == [b"a OK\r\n", b""]  # the answer went out before the first record was written


async def test_a_record_whose_answer_cannot_be_delivered_is_still_written() -> None:
    ours, theirs = socket.socketpair()
    sink = MemorySink()
    with ours, theirs:
        conn = connection(ours, sink)
        huge = b"x" * (64 << 20)  # more than any socket buffer: the peer never reads it
        with trio.move_on_after(0.5) as stopped:
            await conn._apply([Emit(record("a")), Forward(Direction.TO_CLIENT, huge)])
    assert stopped.cancelled_caught  # the send was stopped half-way
    assert tags(sink) == ["a"]
