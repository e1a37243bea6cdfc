"""Issue 12, item 4: one client's flood costs only its own records.

Against a real `imapveil serve` and Dovecot: 540 KB of garbage lines from one client before
login once made the event log drop 134,350 records, and a concurrent, normal session lost its
`session_start`. Then the two mechanisms on their own: the core's violation budget per session,
and the event log's fair share per session.
"""

from __future__ import annotations

import imaplib
import json
import socket
import threading
from pathlib import Path

import pytest
import trio

from imapveil.protocol.session import CoreConfig
from imapveil.records import CommandCompleted, SessionEnded, SessionStarted, Violation
from imapveil.sinks.jsonl import JsonLinesSink
from tests.helpers.dovecot import Dovecot
from tests.helpers.feeding import Conversation, whole
from tests.helpers.process import imapveil


@pytest.mark.dovecot
def test_a_garbage_flood_costs_no_other_session_its_records(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    with imapveil(tmp_path, dovecot.address) as proxy:
        flooder = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        flooder.recv(4096)  # the greeting
        # The proxy answers each refused line; read those answers so that it keeps reading.
        drain = threading.Thread(target=lambda: _drain(flooder), daemon=True)
        drain.start()
        garbage = b"\x01garbage line that no server could read\r\n" * 13_000  # 540 KB
        for i in range(0, len(garbage), 65536):
            flooder.sendall(garbage[i : i + 65536])
            if i == 65536 * 4:  # in the middle of the flood, a normal session
                m = imaplib.IMAP4("127.0.0.1", proxy.port, timeout=10)
                m.login("alice", "wonderland")
                m.noop()
                m.logout()
        flooder.sendall(b"z LOGOUT\r\n")
        drain.join(timeout=20)
        flooder.close()
        assert proxy.stop() == 0
    records = proxy.records()
    by_session: dict[str, list[str]] = {}
    for r in records:
        if "session" in r:
            by_session.setdefault(r["session"], []).append(r["event"])
    assert not [r for r in records if r["event"] == "records_dropped"]
    calm = [events for events in by_session.values() if "command" in events and len(events) < 10]
    (normal,) = calm
    assert normal[0] == "session_start"
    assert normal[-1] == "session_end"
    assert normal.count("command") == 4  # CAPABILITY, LOGIN, NOOP, LOGOUT
    # The flooding session: bounded, whatever it sent.
    flood = max(by_session.values(), key=len)
    assert len(flood) < 60
    assert "violations_suppressed" in json.dumps(records)


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass


def test_the_core_caps_violation_records_per_session() -> None:
    conv = Conversation(whole, CoreConfig(max_violation_records=5))
    conv.server(b"* OK ready\r\n")
    conv.client(b"\x01bad\r\n" * 100 + b"a NOOP\r\n").server(b"a OK\r\n").finish()
    violations = [r for r in conv.records if isinstance(r, Violation)]
    assert len(violations) == 6
    assert violations[-1].kind == "violations_suppressed"
    assert violations[-1].detail == "95 more"
    # Every line was still answered.
    assert conv.to_client.count(b"* BAD") == 100
    assert isinstance(conv.records[-1], SessionEnded)


async def test_the_event_log_shares_its_queue_fairly(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = JsonLinesSink(str(path), capacity=80)
    sink.open()
    for i in range(1000):  # one session's flood of command records
        sink.emit(CommandCompleted("flood", f"t{i}", "NOOP", "authenticated", "OK", None, 0.1))
    sink.emit(SessionStarted("calm", "c", "u"))
    for i in range(5):
        sink.emit(CommandCompleted("calm", f"t{i}", "NOOP", "authenticated", "OK", None, 0.1))
    sink.emit(SessionEnded("calm", "c", "u", "logout", None, "logout", None, 1.0, 1, 1, 6))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        await sink.flush()
        nursery.cancel_scope.cancel()
    events = [json.loads(line) for line in path.read_text().splitlines()]
    calm = [e["event"] for e in events if e.get("session") == "calm"]
    assert calm == ["session_start"] + ["command"] * 5 + ["session_end"]
    assert sum(e.get("session") == "flood" for e in events) == 80 // 8
    assert sink.dropped == 1000 - 80 // 8
