from __future__ import annotations

from imapveil.relay.limits import Admission, Limits


def test_limits_in_all_per_address_and_rate() -> None:
    gate = Admission(Limits(max_sessions=3, max_sessions_per_client=2, max_connection_rate=100))
    assert gate.admit("a", 0.0) is None
    assert gate.admit("a", 0.0) is None
    assert gate.admit("a", 0.0) == "2 sessions from one address"
    assert gate.admit("b", 0.0) is None
    assert gate.admit("c", 0.0) == "3 sessions in all"
    gate.release("a")
    assert gate.admit("c", 0.0) is None
    for address in ("a", "b", "c"):
        gate.release(address)
    assert gate.active == 0 and not gate._per_address


def test_rate_refills() -> None:
    gate = Admission(Limits(max_connection_rate=2, burst_seconds=1))  # a burst of 2
    assert gate.admit("a", 0.0) is None
    gate.release("a")
    assert gate.admit("a", 0.0) is None
    gate.release("a")
    assert gate.admit("a", 0.0) is not None  # a third within the same instant
    assert gate.admit("a", 0.6) is None  # 1.2 tokens back after 0.6 s
    gate.release("a")
    assert gate.admit("b", 0.6) is None  # other addresses have their own bucket
