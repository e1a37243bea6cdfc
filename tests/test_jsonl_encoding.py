"""The event log's encoding: the same lines as `json.dumps` with a `datetime` timestamp gave
before the encoder and the per-second timestamp were cached."""

from __future__ import annotations

import datetime
import json
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from imapveil.records import CommandCompleted, SessionEnded, SessionStarted, Violation
from imapveil.sinks.jsonl import _timestamp, encode


def reference_timestamp(when: float) -> str:
    now = datetime.datetime.fromtimestamp(when, datetime.UTC)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@given(
    st.floats(min_value=0, max_value=4e9)
    | st.integers(0, 4_000_000_000).map(lambda s: s + 0.9999995)
)
def test_timestamps_are_datetimes_to_the_millisecond(when: float) -> None:
    assert _timestamp(when) == reference_timestamp(when)


def test_lines_are_what_json_dumps_gave() -> None:
    records: list[Any] = [
        CommandCompleted("s-1", "a1", "NOOP", "selected", "OK", None, 0.25, (3, 4)),
        Violation("s-1", "client", "odd", "9 octets \u202e\x9b", extra={"n": [1, 2.5, None]}),
        {"event": "records_dropped", "count": 7},
    ]
    for record in records:
        body = record if isinstance(record, dict) else record.to_dict()
        expected = {"ts": reference_timestamp(1764534400.1234), **body}
        line = encode(record, 1764534400.1234)
        assert line == json.dumps(expected, separators=(",", ":")).encode() + b"\n"
        assert line.isascii()  # non-ASCII escaped, as before: no raw C1 controls in the log


_text = st.text(st.characters(codec="utf-8"), max_size=40)
_maybe = st.none() | _text
_commands = st.builds(
    CommandCompleted,
    session=_text,
    tag=_text,
    verb=_text,
    state=_text,
    status=_maybe,
    code=_maybe,
    duration_ms=st.none() | st.floats(allow_nan=True, allow_infinity=True),
    literals=st.lists(st.integers(0, 2**63 - 1), max_size=4).map(tuple),
    mechanism=_maybe,
    user=_maybe,
)


@given(_commands)
@example(CommandCompleted("s", 'a"1', "NOOP", "selected", "OK", None, float("nan")))
@example(
    CommandCompleted("s", "\u2026", "X\x00", "selected", None, None, float("-inf"), (0,), "\\")
)
def test_command_records_written_field_by_field_are_what_json_dumps_gives(
    record: CommandCompleted,
) -> None:
    """The per-command record has an encoder of its own (it is by far the most frequent): any
    field values, quotes, controls, non-ASCII, NaN and infinities included, give the same octets
    as the general encoder."""
    expected = {"ts": reference_timestamp(1764534400.5), **record.to_dict()}
    line = encode(record, 1764534400.5)
    assert line == json.dumps(expected, separators=(",", ":")).encode() + b"\n"


_starts = st.builds(SessionStarted, session=_text, client=_text, upstream=_text)
_ends = st.builds(
    SessionEnded,
    session=_text,
    client=_text,
    upstream=_text,
    reason=_text,
    detail=_maybe,
    state=_text,
    user=_maybe,
    duration_ms=st.floats(allow_nan=True, allow_infinity=True),
    bytes_from_client=st.integers(0, 2**64),
    bytes_from_server=st.integers(0, 2**64),
    commands=st.integers(0, 2**40),
    client_tls=st.booleans(),
    compressed=st.booleans(),
)


@given(_starts | _ends)
def test_session_records_written_field_by_field_are_what_json_dumps_gives(
    record: SessionStarted | SessionEnded,
) -> None:
    """Every session's first and last records have encoders of their own too: the same octets
    as the general encoder, whatever the values."""
    expected = {"ts": reference_timestamp(1764534400.5), **record.to_dict()}
    line = encode(record, 1764534400.5)
    assert line == json.dumps(expected, separators=(",", ":")).encode() + b"\n"
