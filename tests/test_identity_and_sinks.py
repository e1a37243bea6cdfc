from __future__ import annotations

import json
import os
import pickle
import stat
from pathlib import Path

import pytest
import trio

from imapveil.identity import PLAIN_MAX, identifier, load_or_create_key
from imapveil.protocol.actions import Direction, Forward
from imapveil.records import CommandCompleted, SessionStarted
from imapveil.secret import Secret
from imapveil.sinks.jsonl import JsonLinesSink


def test_key_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "state" / "user-key"
    key = load_or_create_key(path)
    assert len(key) == 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_key(path) == key


def test_short_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "user-key"
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match="too short"):
        load_or_create_key(path)


def test_identities() -> None:
    hashed = identifier("hash", b"k" * 32)
    other = identifier("hash", b"j" * 32)
    h = hashed(b"Alice@Example.org")
    assert h is not None and h.startswith("hmac:") and "alice" not in h.lower()
    assert h == hashed(b"alice@example.org")  # one user, one identity
    assert h != hashed(b"bob@example.org")
    assert h != other(b"alice@example.org")  # the key matters
    assert identifier("plain")(b"alice") == "alice"
    assert identifier("none")(b"alice") is None
    with pytest.raises(ValueError):
        identifier("md5")


def test_a_plain_user_name_past_its_bound_is_recorded_cut_with_its_length() -> None:
    """Under `plain`, a login name is recorded as sent; a client could send one as long as a
    command line (64 KiB) into every record and store row of its session. Past PLAIN_MAX (256
    octets, more than an address may be) it is its first 256 octets and its length."""
    plain = identifier("plain")
    assert plain(b"a" * PLAIN_MAX) == "a" * PLAIN_MAX
    long = plain(b"b" * 40_000)
    assert long == "b" * PLAIN_MAX + "…[40000 octets]"
    # cut inside a character: the partial octets are shown escaped, as any invalid UTF-8
    cut = plain("é".encode() * 200)
    assert cut is not None and cut.startswith("é" * 128) and cut.endswith("…[400 octets]")


def test_secret_never_shows_itself() -> None:
    s = Secret(b"hunter2")
    for text in (repr(s), str(s), f"{s}", f"{s!r}", "%s" % (s,)):  # noqa: UP031
        assert "hunter2" not in text
        assert "7 octets" in text
    assert s.reveal() == b"hunter2"
    assert s == Secret(b"hunter2") and s != Secret(b"hunter3")
    with pytest.raises(TypeError):
        pickle.dumps(s)
    assert "secret" not in repr(Forward(Direction.TO_SERVER, b"a LOGIN alice secret\r\n"))


async def test_jsonl_sink_appends_records(tmp_path: Path) -> None:
    path = tmp_path / "log" / "events.jsonl"
    path.parent.mkdir()
    path.write_text('{"old": 1}\n')
    sink = JsonLinesSink(str(path))
    sink.open()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        sink.emit(SessionStarted("s", "127.0.0.1:1", "127.0.0.1:2"))
        sink.emit(CommandCompleted("s", "a", "FETCH", "selected", "OK", None, 1.5, (3, 4)))
        await sink.flush()
        nursery.cancel_scope.cancel()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"old": 1}
    assert [x["event"] for x in lines[1:]] == ["session_start", "command"]
    assert lines[2]["literals"] == [3, 4]
    assert lines[1]["ts"].endswith("Z")


async def test_jsonl_sink_drops_and_says_so_when_full(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = JsonLinesSink(str(path), capacity=2)
    sink.open()
    for i in range(5):
        sink.emit(SessionStarted(f"s{i}", "c", "u"))
    assert sink.dropped == 3
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        await sink.flush()
        sink.emit(SessionStarted("s9", "c", "u"))
        # Cancelled at once: what is queued is still written on the way out.
        nursery.cancel_scope.cancel()
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e.get("session") for e in events] == ["s0", "s1", None, "s9"]
    assert events[2] == {"ts": events[2]["ts"], "event": "records_dropped", "count": 3}
