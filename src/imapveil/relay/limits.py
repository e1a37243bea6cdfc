"""Connection limits: in all, per client address, and new connections per second per address;
and refusals over them, counted per address and reported once per interval.

Clients from exempt networks (`Limits.exempt`, and loopback always) skip the per-address limits,
for an office behind one NAT address or a balancer without the PROXY protocol; they still count
toward `max_sessions`.

Memory is bounded whatever clients do: counters exist only for addresses with open sessions,
rate buckets are forgotten once full again (and capped in number), and refusals are tracked for
at most `MAX_REFUSING` addresses at once (the rest are counted together).
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import math
from dataclasses import dataclass

from imapveil.relay.streams import seen_as

MAX_TRACKED = 100_000
BURST_SECONDS = 30.0
"""A rate bucket holds this many seconds' worth of connections: a reconnect storm after a
network blip is admitted at once, a client reconnecting in a loop is held to the rate."""
REFUSAL_INTERVAL = 60.0
"""Seconds between two reports of refusals from one address."""
MAX_REFUSING = 10_000
OTHERS = "other addresses"
"""Where refusals are counted once `MAX_REFUSING` addresses are tracked."""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

UNCOUNTED = "(exempt)"
"""The key a session admitted from an exempt address is released under (`Admission.key`): no
address was counted for it (never an address: those are numeric)."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_sessions: int = 10_000
    max_sessions_per_client: int = 1_000
    max_connection_rate: float = 100.0  # per second per address
    exempt: tuple[Network, ...] = ()
    """Client networks without per-address limits (loopback is always exempt)."""
    burst_seconds: float = BURST_SECONDS
    ipv6_prefix: int = 64
    """IPv6 clients are counted per network of this length: one customer holds a /64, and a
    client rotating its address in it is still one client. IPv4 addresses count one by one."""

    @property
    def burst(self) -> float:
        """Connections one address may open at once: `burst_seconds` of the rate, at least 1."""
        return max(1.0, self.max_connection_rate * self.burst_seconds)

    def exempts(self, host: str) -> bool:
        """Whether `host` (an address as text) skips the per-address limits."""
        return _exempts(host, self.exempt)

    def client(self, host: str) -> str:
        """Whom `host` counts as: the address, or for IPv6 its `ipv6_prefix` network."""
        return _client(host, self.ipv6_prefix)


@functools.lru_cache(maxsize=4096)
def _exempts(host: str, exempt: tuple[Network, ...]) -> bool:
    """`Limits.exempts`, remembered for the last few thousand addresses (clients reconnect from
    the same few; parsing an address is most of the admission's cost)."""
    seen = seen_as(host)  # and a dual-stack listener's IPv4 client as its IPv4 address
    return any(a.is_loopback for a in seen) or any(a in n for a in seen for n in exempt)


NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
"""RFC 6052's well-known prefix: IPv4 addresses, translated (the last 32 bits)."""


@functools.lru_cache(maxsize=4096)
def _client(host: str, prefix: int) -> str:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv4Address):
        return host
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    if address in NAT64:  # an IPv4 client through a translator (SIIT-DC): each is its own
        return str(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if address.teredo is not None:  # a Teredo client: its /64 is its Teredo server's
        return str(address.teredo[1])
    if prefix >= 128:
        return str(address)
    return str(ipaddress.IPv6Network((address, prefix), strict=False))


class Admission:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.active = 0
        self._per_address: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, when)

    def admit(self, address: str, now: float) -> str | None:
        """None to admit (and count) the connection, else why it is refused. Counted under
        `Limits.client(address)`."""
        limits = self.limits
        if self.active >= limits.max_sessions:
            return f"{limits.max_sessions} sessions in all"
        if not limits.exempts(address):
            address = limits.client(address)
            if self._per_address.get(address, 0) >= limits.max_sessions_per_client:
                return f"{limits.max_sessions_per_client} sessions from one address"
            rate, burst = limits.max_connection_rate, limits.burst
            tokens, when = self._buckets.get(address, (burst, now))
            tokens = min(burst, tokens + (now - when) * rate)
            if tokens < 1.0:
                self._buckets[address] = (tokens, now)
                return f"more than {rate:g} new connections per second from one address"
            self._buckets[address] = (tokens - 1.0, now)
            if len(self._buckets) > MAX_TRACKED:
                self._forget_full(now)
            self._per_address[address] = self._per_address.get(address, 0) + 1
        self.active += 1
        return None

    def key(self, address: str) -> str:
        """What to `release` a session just admitted from `address` under: the address, or
        UNCOUNTED if the limits exempt it. Decided now, not at the release: a reload may have
        changed the exempt networks by then, and must not take a session off a count it is
        not in (nor leave one on)."""
        return UNCOUNTED if self.limits.exempts(address) else self.limits.client(address)

    def release(self, address: str) -> None:
        """A session admitted from `address` ended: `key(address)`, taken when it was admitted."""
        self.active -= 1
        if address == UNCOUNTED:
            return
        left = self._per_address.get(address, 0) - 1
        if left > 0:
            self._per_address[address] = left
        else:  # the last one, or an exempt address (never counted)
            self._per_address.pop(address, None)

    def _forget_full(self, now: float) -> None:
        rate, burst = self.limits.max_connection_rate, self.limits.burst
        for address, (tokens, when) in list(self._buckets.items()):
            if tokens + (now - when) * rate >= burst:
                del self._buckets[address]
        # All busy: forget the oldest, a tenth of the table at once, so that the next scan
        # comes that many new addresses later (one scan per new address was quadratic).
        keep = MAX_TRACKED - MAX_TRACKED // 10
        if len(self._buckets) > keep:
            for address in list(itertools.islice(self._buckets, len(self._buckets) - keep)):
                del self._buckets[address]


@dataclass(frozen=True, slots=True)
class RefusalSummary:
    """`count` connections from `address` were refused in the last `seconds`; `first`: the
    first refusal from it, reported as it happens."""

    address: str
    count: int
    why: str
    seconds: float
    first: bool = False

    def describe(self) -> str:
        if self.first:
            return (
                f"refused a connection from {self.address}: {self.why} (further refusals "
                f"from it are summarised every {REFUSAL_INTERVAL:g} s)"
            )
        s = "" if self.count == 1 else "s"
        return (
            f"refused {self.count} connection{s} from {self.address} in the last "
            f"{self.seconds:.0f} s: {self.why}"
        )


@dataclass(slots=True)
class _Tally:
    pending: int  # refusals not reported yet
    why: str  # the latest reason
    reported: float  # when this address was last reported


class Refusals:
    """Refused connections per address: the first is reported at once, the ones after it in one
    summary per `interval`; an address without refusals for a whole interval is forgotten."""

    def __init__(self, interval: float = REFUSAL_INTERVAL, capacity: int = MAX_REFUSING) -> None:
        self.interval = interval
        self.capacity = capacity
        self._tallies: dict[str, _Tally] = {}

    def __len__(self) -> int:
        return len(self._tallies)

    def note(self, address: str, why: str, now: float) -> RefusalSummary | None:
        """Count one refusal; returns what to report now, if anything."""
        if address not in self._tallies and len(self._tallies) >= self.capacity:
            address = OTHERS
        tally = self._tallies.get(address)
        if tally is None:
            self._tallies[address] = _Tally(0, why, now)
            return RefusalSummary(address, 1, why, 0.0, first=True)
        tally.pending += 1
        tally.why = why
        return None

    def due(self, now: float, *, final: bool = False) -> list[RefusalSummary]:
        """Summaries of the addresses whose interval is over (of all of them if `final`)."""
        out: list[RefusalSummary] = []
        for address, tally in list(self._tallies.items()):
            if not final and now - tally.reported < self.interval:
                continue
            if tally.pending:
                out.append(RefusalSummary(address, tally.pending, tally.why, now - tally.reported))
            if tally.pending and not final:
                tally.pending, tally.reported = 0, now
            else:
                del self._tallies[address]
        return out


class Occurrences:
    """A condition clients can cause over and over (accept(2) out of descriptors, an upstream
    that cannot be reached), said at most once per `interval`: the first at once, the ones after
    it counted and said with the next line. A log line per occurrence would let clients write
    the log."""

    __slots__ = ("_pending", "_said", "interval")

    def __init__(self, interval: float = REFUSAL_INTERVAL) -> None:
        self.interval = interval
        self._pending = 0
        self._said = -math.inf

    def note(self, now: float) -> str | None:
        """Count one. None: say nothing now; else say it now, with this suffix (how many times
        since the last line, or that the next ones are summarised)."""
        self._pending += 1
        if now - self._said < self.interval:
            return None
        first = math.isinf(self._said)
        pending, seconds = self._pending, now - self._said
        self._pending, self._said = 0, now
        if first:
            return f" (summarised every {self.interval:g} s from now on)"
        s = "" if pending == 1 else "s"
        return f" ({pending} time{s} in the last {seconds:.0f} s)"
