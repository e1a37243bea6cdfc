"""Records into the statistics store, without ever holding up a session.

`emit` only updates small per-session counters and appends finished rows to a bounded queue.
One writer task commits the queue in batches from a worker thread. If the store is slow or gone,
relaying goes on: rows beyond the queue's capacity are dropped and counted (`dropped`, a metric
and a warning), and the writer reconnects with backoff. On a clean shutdown the queue is drained
first. Retention: rows older than `retention_days` are purged at start and once a day.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import trio

from imapveil.records import CommandCompleted, IdExchange, Record, SessionEnded, SessionStarted
from imapveil.stats.identify import identify
from imapveil.stats.store import Batch, Store

log = logging.getLogger(__name__)

BATCH = 500
COALESCE = 0.25  # seconds
DAY = 24 * 3600.0


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


@dataclass
class _Open:
    started_at: str
    client: dict[str, str | None] | None = None
    commands: Counter[tuple[str, str]] = field(default_factory=Counter)


class StoreSink:
    def __init__(
        self,
        url: str,
        *,
        proxy: str = "imapveil",
        capacity: int = 10_000,
        retention_days: int = 400,
    ) -> None:
        self.store = Store(url)
        self.proxy = proxy
        self.capacity = capacity
        self.retention_days = retention_days
        self.dropped = 0
        self.written = 0
        self._open: dict[str, _Open] = {}
        self._queue: deque[tuple[str, tuple[Any, ...]]] = deque()
        self._wake = trio.Event()
        self._writing = trio.Lock()
        self.connected = False
        self.ready = trio.Event()
        """Set once the store has been reached (and its schema migrated)."""

    @property
    def depth(self) -> int:
        return len(self._queue)

    def emit(self, record: Record) -> None:
        if isinstance(record, SessionStarted):
            if len(self._open) < 10 * self.capacity:
                self._open[record.session] = _Open(now_iso())
        elif isinstance(record, CommandCompleted):
            state = self._open.get(record.session)
            if state is not None:
                state.commands[(record.verb[:32], record.status or "none")] += 1
        elif isinstance(record, IdExchange):
            self._id(record)
        elif isinstance(record, SessionEnded):
            self._ended(record)

    def _put(self, kind: str, row: tuple[Any, ...]) -> None:
        if len(self._queue) >= self.capacity:
            self.dropped += 1
            return
        self._queue.append((kind, row))
        self._wake.set()

    def _id(self, r: IdExchange) -> None:
        state = self._open.get(r.session)
        if state is not None and r.client and not r.injected and state.client is None:
            state.client = r.client
        fields = r.client or {}
        client = identify(fields) if not r.injected else identify({"name": "imapveil"})
        self._put(
            "id",
            (
                r.session, r.tag, now_iso(), r.state, r.status, int(r.malformed),
                int(r.injected), client.family, fields.get("name"), fields.get("version"),
                fields.get("os"), fields.get("os-version"), fields.get("vendor"),
                json.dumps(list(r.dropped)), r.policy, r.policy_digest,
            ),
        )  # fmt: skip

    def _ended(self, r: SessionEnded) -> None:
        state = self._open.pop(r.session, None) or _Open(now_iso())
        client = identify(state.client)
        os_version = (state.client or {}).get("os-version")
        self._put(
            "session",
            (
                r.session, self.proxy, state.started_at, now_iso(), state.started_at[:10],
                r.user, r.reason, r.duration_ms, r.bytes_from_client, r.bytes_from_server,
                r.commands, int(r.client_tls), client.family, client.version, client.platform,
                os_version[:64] if os_version else None,
            ),
        )  # fmt: skip
        for (verb, status), count in state.commands.items():
            self._put("command", (r.session, verb, status, count))

    async def run(self) -> None:
        """Write until cancelled; then drain what is queued (bounded time)."""
        backoff = 1.0
        last_purge = -DAY
        try:
            while True:
                if not self.connected:
                    try:
                        await trio.to_thread.run_sync(self.store.connect)
                        self.connected, backoff = True, 1.0
                        self.ready.set()
                        log.info("statistics store ready (%s)", _redacted(self.store.url))
                    except Exception as exc:  # StoreError, or any driver's error
                        log.warning(
                            "statistics store unavailable, retrying in %gs: %s", backoff, exc
                        )
                        await trio.sleep(backoff)
                        backoff = min(backoff * 2, 60.0)
                        continue
                if trio.current_time() - last_purge >= DAY:
                    await self._purge()
                    last_purge = trio.current_time()
                if not self._queue:
                    self._wake = trio.Event()
                    with trio.move_on_after(DAY):
                        await self._wake.wait()
                    # Let rows gather: one commit (and one thread hand-off) for many sessions.
                    await trio.sleep(COALESCE)
                    continue
                await self._write_some()
        finally:
            with trio.move_on_after(10) as scope:
                scope.shield = True
                while self._queue and self.connected:
                    await self._write_some()
                if self.connected:
                    await trio.to_thread.run_sync(self.store.close)

    async def flush(self) -> None:
        """Write everything queued so far (waits for the store to be reachable)."""
        await self.ready.wait()
        while self._queue and self.connected:
            await self._write_some()

    async def _write_some(self) -> None:
        async with self._writing:
            await self._write_locked()

    async def _write_locked(self) -> None:
        items = [self._queue[i] for i in range(min(BATCH, len(self._queue)))]
        batch = Batch(
            sessions=[row for kind, row in items if kind == "session"],
            ids=[row for kind, row in items if kind == "id"],
            commands=[row for kind, row in items if kind == "command"],
        )
        try:
            await trio.to_thread.run_sync(self.store.write, batch)
        except Exception as exc:  # any driver's error: reconnect and retry
            log.warning("statistics store write failed, reconnecting: %s", exc)
            self.connected = False
            await trio.to_thread.run_sync(self.store.close)
            return
        for _ in items:
            self._queue.popleft()
        self.written += len(items)

    async def _purge(self) -> None:
        cutoff = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=self.retention_days)
        try:
            removed = await trio.to_thread.run_sync(self.store.purge, cutoff.isoformat())
        except Exception as exc:  # any driver's error
            log.warning("statistics retention purge failed: %s", exc)
            return
        if removed:
            log.info("purged %d sessions older than %d days", removed, self.retention_days)


def _redacted(url: str) -> str:
    """A store URL without its password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url
