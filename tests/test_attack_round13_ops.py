"""Attack round 13 on operations (attack13o): reloads beside the signal task, per-prefix limits,
what held. Each test failed before the fix named in its docstring, or guards what held."""

from __future__ import annotations

import pytest

from imapveil.relay import limits as limits_module
from imapveil.relay.limits import Admission, Limits


def test_rotating_addresses_past_the_bucket_cap_cost_linear_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found: with `MAX_TRACKED` rate buckets all still refilling (a low `max_connection_rate`,
    addresses rotated faster than a token comes back), every new address scanned all of them
    (`_forget_full`) to drop one: 19 ms a connection at the real cap of 100,000, the event loop
    and every session stalled (quadratic). Now a full table forgets a tenth at once: the next
    scan comes after that many new addresses."""
    monkeypatch.setattr(limits_module, "MAX_TRACKED", 1000)
    scans = 0
    forget = Admission._forget_full

    def counted(self: Admission, now: float) -> None:
        nonlocal scans
        scans += 1
        forget(self, now)

    monkeypatch.setattr(Admission, "_forget_full", counted)
    gate = Admission(Limits(max_sessions=10**9, max_connection_rate=0.01, ipv6_prefix=128))
    for i in range(11_000):
        host = f"2001:db8::{i:x}"
        assert gate.admit(host, i * 0.001) is None
        gate.release(gate.key(host))
    assert len(gate._buckets) <= 1000
    assert scans <= 110, f"{scans} scans of the whole table for 10,000 addresses past the cap"
