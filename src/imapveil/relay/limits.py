"""Connection limits: in all, per client address, and new connections per second per address.

Memory is bounded whatever clients do: counters exist only for addresses with open sessions,
and rate buckets are forgotten once full again (and capped in number).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_TRACKED = 100_000


@dataclass(frozen=True, slots=True)
class Limits:
    max_sessions: int = 10_000
    max_sessions_per_client: int = 1_000
    max_connection_rate: float = 50.0  # per second per address; the burst is one second's worth


class Admission:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.active = 0
        self._per_address: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, when)

    def admit(self, address: str, now: float) -> str | None:
        """None to admit (and count) the connection, else why it is refused."""
        limits = self.limits
        if self.active >= limits.max_sessions:
            return f"{limits.max_sessions} sessions in all"
        if self._per_address.get(address, 0) >= limits.max_sessions_per_client:
            return f"{limits.max_sessions_per_client} sessions from one address"
        rate = limits.max_connection_rate
        tokens, when = self._buckets.get(address, (rate, now))
        tokens = min(rate, tokens + (now - when) * rate)
        if tokens < 1.0:
            self._buckets[address] = (tokens, now)
            return f"more than {rate:g} new connections per second from one address"
        self._buckets[address] = (tokens - 1.0, now)
        if len(self._buckets) > MAX_TRACKED:
            self._forget_full(now)
        self.active += 1
        self._per_address[address] = self._per_address.get(address, 0) + 1
        return None

    def release(self, address: str) -> None:
        self.active -= 1
        left = self._per_address.get(address, 1) - 1
        if left:
            self._per_address[address] = left
        else:
            self._per_address.pop(address, None)

    def _forget_full(self, now: float) -> None:
        rate = self.limits.max_connection_rate
        for address, (tokens, when) in list(self._buckets.items()):
            if tokens + (now - when) * rate >= rate:
                del self._buckets[address]
        while len(self._buckets) > MAX_TRACKED:  # all busy: forget the oldest
            del self._buckets[next(iter(self._buckets))]
