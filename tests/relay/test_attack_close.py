"""The close of a plain leg (807ff67: shutdown(2), then trio's `wait_readable` and readv(2) into
the receive buffer all plain legs share, under `Leg.close_gracefully`'s shielded
`move_on_after(CLOSE_GRACE)`), attacked from outside (attack6): raw sockets through the proxy
(as `imapveil serve` builds it) to a real Dovecot.

Clients that neither close nor stop sending once the proxy has closed its side: each is read
(and what it sends dropped) until `CLOSE_GRACE`, then cut; meanwhile another session is
served at once and receives exactly its own octets, though the closing legs read into the
buffer its receives go through; every session ends once, with the right reason and counts.
"""

from __future__ import annotations

import random
import re
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from imapveil.records import SessionEnded
from imapveil.relay import splice, streams
from tests.helpers.attack import veil
from tests.helpers.dovecot import Dovecot
from tests.helpers.scripted import Peer, serve

pytestmark = pytest.mark.dovecot
run = trio.to_thread.run_sync

GRACE = 1.0
"""`CLOSE_GRACE` in these tests (2 s in service): long enough for the other session's work."""
SIGN_IN = b"L LOGIN alice wonderland\r\nQ LOGOUT\r\n"


@dataclass
class Closer:
    """A client that logs in and out, reads until the proxy's EOF, and then sends `mark` over
    and over without end (never closing) until the proxy cuts it off."""

    mark: bytes
    flooding: threading.Event = field(default_factory=threading.Event)
    transcript: bytes = b""
    after_eof: int = 0
    """Octets sent after the proxy's EOF (the proxy read and dropped them, or they were lost
    in the cut)."""
    cut_after: float = 0.0
    """Seconds from the proxy's EOF to its close (the send that failed)."""
    cut_at: float = 0.0
    """When that was (monotonic)."""
    error: str = ""

    def run(self, address: tuple[str, int]) -> None:
        try:
            with socket.create_connection(address, timeout=10) as s:
                s.sendall(SIGN_IN)
                while chunk := s.recv(65536):  # the answers, then the proxy's EOF
                    self.transcript += chunk
                eof = time.monotonic()
                data = self.mark * (65536 // len(self.mark))
                try:
                    while time.monotonic() - eof < 10:
                        self.after_eof += s.send(data)
                        self.flooding.set()
                except (ConnectionResetError, BrokenPipeError):
                    pass
                self.cut_at = time.monotonic()
                self.cut_after = self.cut_at - eof
        except BaseException as exc:
            self.error = repr(exc)
        finally:
            self.flooding.set()


def body(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    return b"Subject: own\r\n\r\n" + bytes(rng.choices(b"abcdefghij0123456789", k=size - 16))


def busy(address: tuple[str, int], closers: list[Closer]) -> tuple[bytes, float, list[float]]:
    """Once every closer floods: a session of its own (LOGIN, a message appended and FETCHed
    back three times, under SPLICE_MIN: through the shared buffer, NOOPs), each answer timed.
    Its transcript, when it was done (monotonic), and the round trips."""
    for closer in closers:
        assert closer.flooding.wait(10)
    size = splice.SPLICE_MIN // 2
    message = body(size, 7)
    trips = []
    with socket.create_connection(address, timeout=10) as s:
        f = s.makefile("rb")
        transcript = f.readline()

        def ask(command: bytes, tag: bytes) -> None:
            nonlocal transcript
            t0 = time.monotonic()
            s.sendall(command)
            while not (line := f.readline()).startswith(tag + b" "):
                assert line, transcript[-300:]
                transcript += line
                if line.endswith(b"}\r\n"):
                    transcript += f.read(int(line[line.rindex(b"{") + 1 : -3]))
            transcript += line
            trips.append(time.monotonic() - t0)

        ask(b"L LOGIN bob builder\r\n", b"L")
        ask(b"D DELETE closing\r\n", b"D")
        ask(b"C CREATE closing\r\n", b"C")
        ask(b"A APPEND closing {%d+}\r\n" % size + message + b"\r\n", b"A")
        ask(b"S SELECT closing\r\n", b"S")
        for k in range(3):
            ask(b"F%d FETCH 1 BODY.PEEK[]\r\n" % k, b"F%d" % k)
            ask(b"N%d NOOP\r\n" % k, b"N%d" % k)
        done = time.monotonic()
        ask(b"Q LOGOUT\r\n", b"Q")
    assert transcript.count(b"BODY[] {%d}\r\n" % size + message + b")\r\n") == 3, transcript[-500:]
    return transcript, done, trips


async def test_clients_flooding_a_closing_leg_are_cut_at_the_grace_and_others_unaffected(
    target: Dovecot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two clients that, after their LOGOUT's answers and the proxy's EOF, send distinct octets
    as fast as they can and never close; a third session, started while they do, works
    (appends and fetches a message of its own through the shared receive buffer): its answers
    come at once and hold its own octets, none of the closers'; each closer is cut at the grace
    (not before, not much after); three session ends, one each, as LOGOUTs, counting only the
    octets before the close."""
    monkeypatch.setattr(streams, "CLOSE_GRACE", GRACE)
    closers = [Closer(b"FLOOD-A-%s\r\n" % uuid.uuid4().hex.encode()) for _ in range(2)]
    closers[1].mark = closers[1].mark.replace(b"-A-", b"-B-")
    async with veil(target.address, tmp_path) as v:
        threads = [threading.Thread(target=c.run, args=(v.address,)) for c in closers]
        for t in threads:
            t.start()
        try:
            transcript, done, trips = await run(busy, v.address, closers)
        finally:
            for t in threads:
                await run(t.join, 15)
        ends = await v.sessions_ended(3)
        with trio.fail_after(5):
            await v.proxy._idle.wait()
        records = v.records_json()
    for closer in closers:
        assert closer.error == ""
        assert re.search(rb"\r\n\* BYE [^\r\n]*\r\nQ OK [^\r\n]*\r\n\Z", closer.transcript)
        assert closer.after_eof > 0
        assert GRACE * 0.9 <= closer.cut_after < GRACE + 2.0, closer.cut_after
        # The other session's work was done while this one was being drained.
        assert done < closer.cut_at
    assert b"FLOOD" not in transcript
    assert max(trips) < 0.5, trips
    assert "FLOOD" not in records
    assert sorted(e.reason for e in ends) == ["logout"] * 3
    assert sorted(e.bytes_from_client for e in ends)[:2] == [len(SIGN_IN)] * 2
    assert len({e.session for e in ends}) == 3


def ends_its_close(address: tuple[str, int], how: str) -> float:
    """LOGIN and LOGOUT, read until the proxy's EOF, then end as `how` says; the seconds from
    that EOF to the proxy's own close (seen as the end of what the proxy reads: a reset to a
    probe sent after it, or the end of a half-close)."""
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(SIGN_IN)
        while s.recv(65536):
            pass
        eof = time.monotonic()
        if how == "reset":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif how == "send-then-reset":
            s.sendall(b"x NOOP\r\n" * 20000)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif how == "half-close":
            s.sendall(b"x NOOP\r\n" * 20000)
            s.shutdown(socket.SHUT_WR)
        return eof


async def test_a_close_the_client_ends_early_ends_at_once(
    target: Dovecot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clients that, once the proxy has half-closed their leg after LOGOUT, reset it at once,
    send and then reset, send and half-close in turn, or close: the drain ends with them (a
    reset, an EOF), not at the grace; each session ends once, as a LOGOUT."""
    monkeypatch.setattr(streams, "CLOSE_GRACE", 30.0)
    ways = ["reset", "send-then-reset", "half-close", "close"]
    async with veil(target.address, tmp_path) as v:
        for n, how in enumerate(ways, 1):
            eof = await run(ends_its_close, v.address, how)
            await v.sessions_ended(n)
            with trio.fail_after(5):  # far below the grace
                await v.proxy._idle.wait()
            assert time.monotonic() - eof < 5
        ends = v.sink.of(SessionEnded)
    assert [(e.reason, e.bytes_from_client) for e in ends] == [("logout", len(SIGN_IN))] * 4


class Server:
    """A scripted server: greets, answers LOGIN and NOOPs, and LOGOUT with BYE and OK (and does
    not close). When
    the user is `flood`, once the proxy has half-closed the connection it sends `mark` over
    and over and never closes, until the proxy cuts it off (then `cut_after` says when)."""

    def __init__(self, mark: bytes) -> None:
        self.mark = mark
        self.cut_after: list[float] = []

    async def script(self, peer: Peer) -> None:
        await peer.say(b"* OK ready\r\n")
        flood = False
        while line := await peer.line():
            tag, verb = line.split(b" ")[:2]
            if verb == b"LOGIN":
                flood = line.split(b" ")[2] == b"flood"
                await peer.say(tag + b" OK in\r\n")
            elif verb.rstrip() == b"LOGOUT":
                await peer.say(b"* BYE bye\r\n" + tag + b" OK out\r\n")
            else:
                await peer.say(tag + b" OK done\r\n")
        if not flood:
            return
        eof = time.monotonic()  # the proxy's half-close
        data = self.mark * (65536 // len(self.mark))
        try:
            while time.monotonic() - eof < 10:
                await peer.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self.cut_after.append(time.monotonic() - eof)


def normal_client(address: tuple[str, int], user: bytes, noops: int) -> bytes:
    with socket.create_connection(address, timeout=10) as s:
        f = s.makefile("rb")
        got = f.readline()
        s.sendall(b"L LOGIN " + user + b" x\r\n")
        got += f.readline()
        for k in range(noops):
            s.sendall(b"N%d NOOP\r\n" % k)
            got += f.readline()
        s.sendall(b"Q LOGOUT\r\n")
        while not got.endswith(b"Q OK out\r\n"):  # the server does not close: the client does
            line = f.readline()
            assert line, got
            got += line
        f.close()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return got


async def test_a_server_flooding_a_closing_leg_is_cut_at_the_grace_and_others_unaffected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server side of the same: a server that does not close after its LOGOUT answer (its
    client resets instead) and, after the proxy's EOF, sends without end and never closes is
    read (and dropped) until the grace, then cut; a session started meanwhile is served and
    sees none of the flood; one end record each."""
    monkeypatch.setattr(streams, "CLOSE_GRACE", GRACE)
    server = Server(b"SERVERFLOOD-%s\r\n" % uuid.uuid4().hex.encode())
    async with serve(server.script, bytearray()) as upstream, veil(upstream, tmp_path) as v:
        t0 = time.monotonic()
        flooded = await run(normal_client, v.address, b"flood", 0)
        other = await run(normal_client, v.address, b"plain", 20)
        other_done = time.monotonic() - t0
        ends = await v.sessions_ended(2)
        with trio.fail_after(GRACE + 5):
            await v.proxy._idle.wait()
        records = v.records_json()
    expected = b"* OK ready\r\nL OK in\r\n* BYE bye\r\nQ OK out\r\n"
    assert flooded == expected
    assert other.count(b" OK done\r\n") == 20 and b"FLOOD" not in other
    assert other_done < GRACE  # served while the first session's server leg was drained
    assert len(server.cut_after) == 1 and GRACE * 0.9 <= server.cut_after[0] < GRACE + 2.0
    assert [e.reason for e in ends] == ["logout", "logout"]
    assert "FLOOD" not in records
