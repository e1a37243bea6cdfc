"""The event log's encoding: the same lines as `json.dumps` with a `datetime` timestamp gave
before the encoder and the per-second timestamp were cached."""

from __future__ import annotations

import datetime
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from imapveil.records import CommandCompleted, Violation
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
