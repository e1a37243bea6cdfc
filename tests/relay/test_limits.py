from __future__ import annotations

import contextlib
import ipaddress
from pathlib import Path

import trio

from imapveil.protocol.proxy_header import build_v2
from imapveil.records import OverLimit
from imapveil.relay.limits import Admission, Limits
from tests.helpers.attack import Client, veil
from tests.helpers.dovecot import Dovecot


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


def test_ipv6_clients_are_counted_per_prefix() -> None:
    """Found: the per-address limits counted each IPv6 address alone; one customer holds a /64
    (2^64 addresses), so a single client rotating its source address escaped both the sessions
    per client and the connection rate, and could take every one of `max_sessions`. IPv6
    clients are counted per `ipv6_prefix` (64 by default); IPv4 addresses one by one."""
    gate = Admission(Limits(max_sessions_per_client=2, max_connection_rate=100))
    assert gate.admit("2001:db8:1:2::a", 0.0) is None
    assert gate.admit("2001:db8:1:2:ffff:1:2:3", 0.0) is None
    assert gate.admit("2001:db8:1:2::c", 0.0) == "2 sessions from one address"
    assert gate.admit("2001:db8:1:3::a", 0.0) is None  # another /64
    assert gate.admit("198.51.100.1", 0.0) is None
    assert gate.admit("198.51.100.2", 0.0) is None
    assert gate.admit("198.51.100.2", 0.0) is None  # IPv4: each address alone
    assert gate.key("2001:db8:1:2::a") == gate.key("2001:db8:1:2::99") == "2001:db8:1:2::/64"
    for address in ("2001:db8:1:2::a", "2001:db8:1:2::b", "2001:db8:1:3::a"):
        gate.release(gate.key(address))
    for address in ("198.51.100.1", "198.51.100.2", "198.51.100.2"):
        gate.release(gate.key(address))
    assert gate.active == 0 and not gate._per_address
    # The rate too: one bucket for the prefix.
    rate = Admission(Limits(max_connection_rate=2, burst_seconds=1))
    assert rate.admit("2001:db8::1", 0.0) is None
    assert rate.admit("2001:db8::2", 0.0) is None
    assert rate.admit("2001:db8::3", 0.0) is not None
    # A prefix of 128 counts each address alone, as before.
    alone = Admission(Limits(max_sessions_per_client=1, ipv6_prefix=128))
    assert alone.admit("2001:db8::1", 0.0) is None
    assert alone.admit("2001:db8::2", 0.0) is None
    # An IPv4 client seen on a dual-stack listener is counted as its IPv4 address.
    mapped = Admission(Limits(max_sessions_per_client=1))
    assert mapped.admit("::ffff:198.51.100.1", 0.0) is None
    assert mapped.admit("::ffff:198.51.100.2", 0.0) is None
    assert mapped.admit("198.51.100.1", 0.0) == "1 sessions from one address"


def open_behind_balancer(address: tuple[str, int], sources: list[str]) -> list[bytes]:
    """One connection a source, each announced by a PROXY v2 header; the first line each got
    (all kept open until every one has its line)."""
    with contextlib.ExitStack() as stack:
        firsts = []
        for source in sources:
            c = stack.enter_context(Client(address))
            c.send(build_v2((source, 40000), ("::1", 143)))
            firsts.append(c.line())
        return firsts


async def test_one_ipv6_prefix_behind_a_balancer_gets_one_clients_sessions(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """End to end: sessions announced by PROXY v2 headers from three addresses of one /64 and
    one of another, with two sessions allowed per client: the third of the /64 is refused."""
    sources = ["2001:db8:1:2::a", "2001:db8:1:2::b", "2001:db8:1:2::c", "2001:db8:1:3::a"]
    async with veil(
        dovecot.address,
        tmp_path,
        proxy_protocol_from=("127.0.0.0/8",),
        max_sessions_per_client=2,
    ) as v:
        firsts = await trio.to_thread.run_sync(open_behind_balancer, v.address, sources)
        await v.sessions_ended(3)
    assert [line.startswith(b"* OK") for line in firsts] == [True, True, False, True], firsts
    assert firsts[2].startswith(b"* BYE [UNAVAILABLE]"), firsts
    (refused,) = v.sink.of(OverLimit)
    assert refused.client == "2001:db8:1:2::/64", refused  # whom it counted, not one address
