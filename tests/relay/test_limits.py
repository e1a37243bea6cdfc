from __future__ import annotations

import ipaddress

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


def test_a_reload_ending_an_exemption_leaves_the_counts_right() -> None:
    """Found attacking reloads (attack3): a session admitted while its address was exempt was
    not counted, but its release after a reload that ended the exemption took it off the count
    of sessions admitted since: with a limit of 2, 3 old sessions closing let 2 more in (4
    open). A session is released under the key it was admitted with (`Admission.key`)."""
    office = ipaddress.ip_network("198.51.100.0/24")
    gate = Admission(Limits(max_sessions_per_client=2, exempt=(office,)))
    a = "198.51.100.77"
    assert [gate.admit(a, 0.0) for _ in range(3)] == [None, None, None]  # exempt: no limit
    old = [gate.key(a) for _ in range(3)]
    gate.limits = Limits(max_sessions_per_client=2)  # the reload: no longer exempt
    assert [gate.admit(a, 1.0) for _ in range(3)] == [None, None, "2 sessions from one address"]
    new = [gate.key(a) for _ in range(2)]
    for key in old:
        gate.release(key)
    assert gate.admit(a, 2.0) == "2 sessions from one address"  # the 2 new ones are open
    gate.limits = Limits(max_sessions_per_client=2, exempt=(office,))  # exempt again
    for key in new:
        gate.release(key)
    assert gate.active == 0 and not gate._per_address
