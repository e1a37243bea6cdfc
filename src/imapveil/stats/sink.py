"""Records into the statistics store, without ever holding up a session, and without losing any.

`emit` only updates small per-session counters and appends finished rows to a bounded queue in
memory; it never touches a disk or the network. One writer task does the rest, from a worker
thread, one thing at a time:

- While the store takes rows, it commits the queue in batches (one transaction each), after
  gathering rows for `COALESCE` seconds: once the first row comes, and again after each write
  that left less than a full batch queued.
- While the store cannot take them (down, unreachable, a locked or full SQLite database, or no
  answer to a call within `STORE_WITHIN`: a frozen server), it
  appends the queue to the spool, a directory of append-only JSON-lines files on local disk
  (one fsync per batch), and probes the store every `PROBE` seconds. When the store is back, it
  replays the spool in order, batch by batch, before anything newer; a replayed file is deleted
  once all of it is stored.
- At shutdown, the queue goes to the store if it is connected and takes it within
  `drain_timeout`, and to the spool otherwise; the spool is replayed after the next start.

Writes are idempotent (see `store`), so a batch stored twice — a crash in the middle of a
replay, a shutdown that gave up waiting for a write that then went through — is stored once.
A session's traits (`records.SessionTraits`, emitted just before its end) are kept on its open
state, bounded (`bounded_traits`), and queued as one `traits` item right after the session's
row; a batch, in memory or read back from the spool, never parts the two, so they are stored in
one transaction. A session whose traits never came is stored without them.

Rows are lost only when memory and spool are both full (`capacity` items queued, `spool_cap`
octets spooled), when the spool cannot be written, or when the store refuses their content; they
are counted (sessions and items), logged, and reported by `take_drops`. Retention: rows older
than `retention_days` are purged at start and once a day.
"""

from __future__ import annotations

import datetime
import itertools
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import trio

from imapveil.identity import default_key_file
from imapveil.protocol.traits import EXTENSIONS, known_verb, tag_style
from imapveil.records import (
    CommandCompleted,
    IdExchange,
    Record,
    SessionEnded,
    SessionStarted,
    SessionTraits,
)
from imapveil.relay.limits import Occurrences
from imapveil.stats.identify import identify
from imapveil.stats.labels import BEHAVIOUR, JA4
from imapveil.stats.spool import (
    FOLLOWS,
    KINDS,
    SPOOL_CAP,
    Item,
    Spool,
    SpoolError,
    Tally,
    spool_directory,
    well_formed,
)
from imapveil.stats.store import CODECS, WRITE_TIMEOUT, Batch, Collision, Store, redact

log = logging.getLogger(__name__)

BATCH = 500
COALESCE = 0.25
"""Seconds the writer gathers rows after a wake-up: what a `kill -9` can cost."""
PROBE = 1.0
"""Seconds between attempts to reach a store that is away."""
STORE_TIMEOUT = 2.0
"""Seconds to connect, or to wait for a SQLite lock, before the store counts as away."""
DRAIN_TIMEOUT = 5.0
"""Seconds a shutdown waits for the store to take the queue before spooling the rest."""
STORE_WITHIN = WRITE_TIMEOUT + 5.0
"""Seconds the writer waits for the store to answer one call (a write, a purge, a connection)
before it takes the store for away: a frozen server (stopped, or its host paused with its
kernel running) acknowledges what is sent, so neither PostgreSQL's `statement_timeout` nor
TCP's timeouts end the wait, and the writer would wait for ever while the queue overflowed
(rows dropped, not spooled). The call is left to its thread, which closes its connection when
it returns; writes are idempotent, so one that goes through later is stored once."""
REMIND = 60.0
"""Seconds between reminders that the store is still away."""
DAY = 24 * 3600.0
T = TypeVar("T")
MAX_EXTENSION = 32
MAX_EXTENSIONS = 64
MAX_BEHAVIOUR_TEXT = 400
MAX_FINGERPRINT = 64
"""Bounds on what a session's traits may put in the store: longer values are dropped. The
values come from fixed vocabularies by construction; the bounds are a second line."""


def now_iso(when: float | None = None) -> str:
    """`when` (`time.time()`; now if None) in ISO 8601, UTC, to the millisecond."""
    moment = time.time() if when is None else when
    return datetime.datetime.fromtimestamp(moment, datetime.UTC).isoformat(timespec="milliseconds")


OUTCOMES = ("written", "spooled", "replayed", "dropped")
"""written: stored from memory; spooled: appended to the spool; replayed: stored from the spool;
dropped: lost (memory and spool full, spool unusable, refused by the store, an id collision)."""


_COMMAND_KEYS: dict[tuple[str, str], tuple[str, str]] = {}
"""(verb, status) keys of `_Open.commands`, one object for all sessions (verbs are known verbs,
statuses a few words; bounded all the same, see `_command_key`)."""


def _command_key(verb: str, status: str) -> tuple[str, str]:
    key = (verb, status)
    shared = _COMMAND_KEYS.get(key)
    if shared is not None:
        return shared
    if len(_COMMAND_KEYS) < 4096:
        _COMMAND_KEYS[key] = key
    return key


@dataclass(slots=True)
class _Open:
    """What the store keeps of an open session until it ends (one per open session: small)."""

    started_at: str
    client: dict[str, str | None] | None = None
    commands: dict[tuple[str, str], int] = field(default_factory=dict)
    traits: tuple[Any, ...] | None = None
    """The session's `traits` row but its first column (see `bounded_traits`)."""


class StoreSink:
    def __init__(
        self,
        url: str,
        *,
        proxy: str = "imapveil",
        capacity: int = 10_000,
        retention_days: int = 400,
        spool: Path | None = None,
        spool_cap: int = SPOOL_CAP,
        timeout: float = STORE_TIMEOUT,
        drain_timeout: float = DRAIN_TIMEOUT,
    ) -> None:
        """`spool`: the spool's directory; by default `spool_directory(state, proxy)` with the
        SQLite database's directory or, for PostgreSQL, the default state directory as `state`.
        `spool_cap` 0 disables the spool."""
        self.store = Store(url, timeout=timeout)
        self.proxy = proxy
        self.capacity = capacity
        self.retention_days = retention_days
        self.drain_timeout = drain_timeout
        if spool is None:
            state = (
                default_key_file().parent
                if self.store.postgres
                else Path(url.removeprefix("sqlite://")).parent
            )
            spool = spool_directory(state, proxy)
        self.spool: Spool | None = Spool(spool, spool_cap) if spool_cap > 0 else None
        self.counts = {outcome: Tally() for outcome in OUTCOMES}
        self.collisions = 0
        self._refusals = Occurrences()
        """Rows the store refused for their content: a client might cause one per session
        (as a name a LATIN1 database cannot hold did, before `store.escaper`), so said once a
        minute at most, with a count."""
        self._reported = Tally()
        self._open: dict[str, _Open] = {}
        self._seq = itertools.count(1)
        self._queue: deque[Item] = deque()
        self._wake = trio.Event()
        self._full = trio.Event()  # a full batch is queued: no more gathering
        self._stepped = trio.Event()
        self.connected = False
        self.ready = trio.Event()
        """Set once the store has been reached (and its schema migrated)."""
        self._away_since: float | None = None
        self._reminded = 0.0
        self._abandoned = False
        self._spool_failing = False
        self._spool_full = False
        self._escaping_said = False

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def dropped(self) -> int:
        """Items lost (of all kinds); `counts["dropped"]` has sessions too."""
        return self.counts["dropped"].items

    @property
    def written(self) -> int:
        """Items stored, from memory or from the spool."""
        return self.counts["written"].items + self.counts["replayed"].items

    @property
    def spool_bytes(self) -> int:
        return self.spool.bytes if self.spool is not None else 0

    def take_drops(self) -> Tally | None:
        """What was dropped since the last call (None if nothing): for a `store_dropped` record."""
        dropped = self.counts["dropped"]
        new = Tally(
            dropped.sessions - self._reported.sessions, dropped.items - self._reported.items
        )
        if not new.items:
            return None
        self._reported = Tally(dropped.sessions, dropped.items)
        return new

    # --- from the relay: memory only ------------------------------------------------------------

    def emit(self, record: Record, when: float | None = None) -> None:
        """`when`: the time the record was made (`time.time()`), if not now."""
        if isinstance(record, SessionStarted):
            if len(self._open) < 10 * self.capacity:
                self._open[record.session] = _Open(now_iso(when))
        elif isinstance(record, CommandCompleted):
            state = self._open.get(record.session)
            if state is not None:
                verb = known_verb(record.verb)
                key = _command_key(verb, record.status or "none")
                state.commands[key] = state.commands.get(key, 0) + 1
        elif isinstance(record, IdExchange):
            self._id(record, when)
        elif isinstance(record, SessionTraits):
            state = self._open.get(record.session)
            if state is not None:
                state.traits = bounded_traits(record)
        elif isinstance(record, SessionEnded):
            self._ended(record, when)

    def _put(self, kind: str, row: tuple[Any, ...]) -> None:
        if len(self._queue) >= self.capacity:
            self.counts["dropped"].add([(kind, row)])
            return
        self._queue.append((kind, row))
        self._wake.set()
        if len(self._queue) >= BATCH:
            self._full.set()

    def _id(self, r: IdExchange, when: float | None) -> None:
        recorded = _without_nul(r.client) if r.client else r.client
        state = self._open.get(r.session)
        if state is not None and recorded and not r.injected and state.client is None:
            state.client = recorded
        fields = recorded or {}
        client = identify(fields) if not r.injected else identify({"name": "imapveil"})
        self._put(
            "id",
            (
                r.session, tag_style(r.tag.encode()), now_iso(when), r.state, r.status,
                int(r.malformed), int(r.injected), client.family, fields.get("name"),
                fields.get("version"), fields.get("os"), fields.get("os-version"),
                fields.get("vendor"), json.dumps(list(r.dropped)), r.policy,
                r.policy_digest, next(self._seq),
            ),
        )  # fmt: skip

    def _ended(self, r: SessionEnded, when: float | None) -> None:
        ended = now_iso(when)
        state = self._open.pop(r.session, None) or _Open(ended)
        client = identify(state.client)
        os_version = (state.client or {}).get("os-version")
        user = r.user.replace("\0", NUL_SHOWN) if r.user else r.user
        self._put(
            "session",
            (
                r.session, self.proxy, state.started_at, ended, state.started_at[:10],
                user, r.reason, r.duration_ms, r.bytes_from_client, r.bytes_from_server,
                r.commands, int(r.client_tls), client.family, client.version, client.platform,
                os_version[:64] if os_version else None,
            ),
        )  # fmt: skip
        if state.traits is not None:
            self._put(FOLLOWS, (r.session, *state.traits))
        for (verb, status), count in state.commands.items():
            self._put("command", (r.session, verb, status, count))

    # --- the writer -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Write until cancelled; then drain the queue to the store or the spool (bounded time)."""
        last_purge = -DAY
        last_probe = -math.inf
        try:
            with trio.CancelScope(shield=True):  # a stop at once still finds the spool open
                await self._open_spool()
            while True:
                self._step()
                if not self.connected:
                    if trio.current_time() - last_probe >= PROBE:
                        last_probe = trio.current_time()
                        await self._connect()
                    if not self.connected:
                        if self._queue:
                            await self._spill()
                        wait = max(0.0, last_probe + PROBE - trio.current_time())
                        await self._rest(wait)
                        continue
                if trio.current_time() - last_purge >= DAY:
                    await self._purge()
                    last_purge = trio.current_time()
                    if not self.connected:  # the store did not answer it (`STORE_WITHIN`)
                        continue
                if self.spool is not None and self.spool.pending:
                    await self._replay_some()
                    if len(self._queue) >= self.capacity // 2:
                        # Newer than the spool: behind it, in order.
                        await self._spill(drop=False)
                    continue
                if not self._queue:
                    await self._rest(DAY)
                    continue
                await self._write_some()
                if 0 < len(self._queue) < BATCH:
                    # Rows came while that batch was written: a busy proxy's next batch gathers
                    # too, or each write would take the few sessions that ended meanwhile, and a
                    # transaction costs its pages whether it holds one session or hundreds
                    # (SQLite: about 70 us a session in batches of one or two, 9 in batches of
                    # BATCH). Only a full batch goes at once.
                    await self._rest(COALESCE)
        finally:
            with trio.CancelScope(shield=True):
                await self._shutdown()

    def _step(self) -> None:
        self._stepped.set()
        self._stepped = trio.Event()

    async def _rest(self, seconds: float) -> None:
        """Wait for rows (or `seconds`), then let rows gather: one write for many sessions.
        A full batch queued ends both at once: a burst must not fill the queue (rows beyond
        `capacity` are dropped) while the writer rests."""
        self._wake = trio.Event()
        self._full = trio.Event()
        if len(self._queue) >= BATCH:
            return
        with trio.move_on_after(seconds):
            await self._wake.wait()
            with trio.move_on_after(COALESCE):
                await self._full.wait()

    async def flush(self) -> None:
        """Return once everything emitted so far is stored (waits for the store to be back)."""
        while not self.connected or self._queue or (self.spool is not None and self.spool.pending):
            self._wake.set()
            await self._stepped.wait()

    async def _on_store(self, fn: Callable[[], T], *, abandon: bool = False) -> T:
        """`fn` (a call on `self.store`) in a worker thread, for at most `STORE_WITHIN`; then
        (or when cancelled, with `abandon`) the store is left to that thread and a new one
        (not connected) takes its place: StoreHung, or the cancellation. Without `abandon` a
        stop waits for the call, within the same bound."""
        call = _Call(self.store)

        def run() -> T:
            try:
                return fn()
            finally:
                call.finished()

        try:
            with trio.CancelScope(shield=not abandon), trio.move_on_after(STORE_WITHIN):
                return await trio.to_thread.run_sync(run, abandon_on_cancel=True)
        except trio.Cancelled:
            self._forsake(call)
            raise
        self._forsake(call)
        raise StoreHung(f"no answer within {STORE_WITHIN:g} s")

    def _forsake(self, call: _Call) -> None:
        """Leave `call`'s store (and connection) to its thread; a new one takes its place."""
        if call.forsake():  # its thread returned meanwhile: nobody else will close it
            call.store.close()
        if self.store is call.store:
            self.store = Store(call.store.url, timeout=call.store.timeout)
        self.connected = False

    async def _thread(self, fn: Callable[[], T], *, abandon: bool = False) -> T:
        return await trio.to_thread.run_sync(fn, abandon_on_cancel=abandon)

    async def _open_spool(self) -> None:
        spool = self.spool
        if spool is None:
            return
        try:
            await self._thread(spool.open)
        except (OSError, SpoolError) as exc:
            log.error(
                "statistics spool %s unusable (%s): while the store is away, rows are dropped",
                spool.directory, exc,
            )  # fmt: skip
            self.spool = None
            return
        if spool.pending:
            log.info("statistics spool %s holds %d octets to replay", spool.directory, spool.bytes)

    async def _connect(self) -> None:
        try:
            await self._on_store(self.store.connect)
        except Exception as exc:  # StoreError, or any driver's error
            self._away(f"statistics store unavailable: {exc}")
            return
        self.connected = True
        self.ready.set()
        if self.store.escape is not None and not self._escaping_said:
            self._escaping_said = True
            log.warning("%s", escaping(self.store.encoding))
        away = f" after {time.monotonic() - self._away_since:.1f} s" if self._away_since else ""
        self._away_since = None
        spooled = self.spool.bytes if self.spool is not None else 0
        log.info(
            "statistics store ready (%s)%s%s", _redacted(self.store.url), away,
            f"; replaying {spooled} octets of spool" if spooled else "",
        )  # fmt: skip

    def _away(self, message: str) -> None:
        """Log that the store is away: at once, then once a minute while it stays away."""
        now = time.monotonic()
        if self._away_since is None:
            self._away_since = self._reminded = now
            where = self.spool.directory if self.spool is not None else None
            then = f"spooling to {where}" if where else "no spool: rows beyond the queue drop"
            log.warning("%s; %s, probing every %g s", message, then, PROBE)
        elif now - self._reminded >= REMIND:
            self._reminded = now
            log.warning(
                "%s (away %.0f s; %d octets spooled)", message, now - self._away_since,
                self.spool_bytes,
            )  # fmt: skip

    def _disconnect(self, message: str) -> None:
        self.connected = False
        self._away(message)
        self.store.close()

    async def _store(self, items: Sequence[Item], *, abandon: bool = False) -> list[Item] | None:
        """Write `items` in one transaction: the items stored, or None if the store is away
        (then disconnected).

        Rows the store refuses for their content (not for being away) are written one by one,
        and each one refused is dropped, counted and logged (and not among the items stored).
        """
        stored = list(items)
        try:
            try:
                collisions = await self._on_store(
                    partial(self.store.write, _batch(items)), abandon=abandon
                )
            except trio.Cancelled:
                self._abandoned = abandon  # the write goes on in its thread, with the connection
                raise
            except Exception as exc:  # any driver's error
                if not self.store.refuses(exc):
                    raise
                collisions, stored = await self._one_by_one(items)
        except Exception as exc:  # any driver's error: the store is away
            self._disconnect(f"statistics store write failed: {exc}")
            return None
        for collision in collisions:
            self._collided(collision)
            # Counted as dropped there, so not as stored: one session row of that id fewer.
            stored = _without_session(stored, collision.session)
        return stored

    async def _one_by_one(self, items: Sequence[Item]) -> tuple[list[Collision], list[Item]]:
        """Each item in a transaction of its own: the collisions, and the items stored."""
        collisions: list[Collision] = []
        stored: list[Item] = []
        for item in items:
            try:
                collisions += await self._on_store(partial(self.store.write, _batch([item])))
                stored.append(item)
            except Exception as exc:  # any driver's error
                if not self.store.refuses(exc):
                    raise
                self.counts["dropped"].add([item])
                said = self._refusals.note(time.monotonic())
                if said is not None:
                    log.warning(
                        "statistics store refused a %s row (dropped): %s%s", item[0], exc, said
                    )
        return collisions, stored

    def _collided(self, c: Collision) -> None:
        self.collisions += 1
        self.counts["dropped"].add([("session", ())])
        log.warning(
            "statistics: session id %s is stored already for a different session (digest %s, "
            "this one %s): an id collision; this session's row is not stored",
            c.session, c.stored, c.refused,
        )  # fmt: skip

    async def _write_some(self, *, abandon: bool = False) -> None:
        items = list(itertools.islice(self._queue, BATCH + 1))
        if len(items) > BATCH and items[-1][0] != FOLLOWS:  # a session's traits go with it
            items.pop()
        stored = await self._store(items, abandon=abandon)
        if stored is not None:
            for _ in items:
                self._queue.popleft()
            self.counts["written"].add(stored)

    async def _replay_some(self, *, abandon: bool = False) -> None:
        spool = self.spool
        assert spool is not None
        try:
            items, position = await self._thread(partial(spool.read, BATCH))
            items = self._replayable(items)
            if items:
                stored = await self._store(items, abandon=abandon)
                if stored is None:
                    return
                self.counts["replayed"].add(stored)
            with trio.CancelScope(shield=True):  # stored: say so, even if stopping now
                await self._thread(partial(spool.consume, position))
        except OSError as exc:
            log.error("statistics spool %s unusable (%s): no longer used", spool.directory, exc)
            self.spool = None
            return
        if spool.corrupt:
            self.counts["dropped"].items += spool.corrupt
            spool.corrupt = 0
        if not spool.pending:
            log.info("statistics spool replayed")

    def _replayable(self, items: list[Item]) -> list[Item]:
        """What the store can take of items read back from the spool: malformed ones dropped
        (counted, logged), a session's traits bounded as at its end (`bounded_values`)."""
        kept = [item for item in items if well_formed(*item)]
        if len(kept) < len(items):
            self.counts["dropped"].add([i for i in items if not well_formed(*i)])
            log.warning("statistics spool: dropped %d malformed rows", len(items) - len(kept))
        return [
            (k, (row[0], *bounded_values(*row[1:]))) if k == FOLLOWS else (k, row)
            for k, row in kept
        ]

    async def _spill(self, *, drop: bool = True) -> bool:
        """Move the queue to the spool (in order); False if some of it could not go there.

        Beyond the spool's cap, rows are dropped (`drop`), or stay in memory (while the store
        takes rows, the queue has its own chance).
        """
        spool = self.spool
        while self._queue:
            items = list(itertools.islice(self._queue, BATCH * 4))
            if spool is None:
                return False
            try:
                done = await self._thread(partial(spool.append, items))
            except OSError as exc:
                if not self._spool_failing:
                    self._spool_failing = True
                    log.error("statistics spool %s: cannot write (%s)", spool.directory, exc)
                return False
            if self._spool_failing:
                self._spool_failing = False
                log.info("statistics spool %s: writable again", spool.directory)
            for _ in range(done):
                self._queue.popleft()
            self.counts["spooled"].add(items[:done])
            if done == len(items):
                self._spool_full = False
                continue
            if not drop:
                return False
            full = items[done:]  # the cap: what does not fit is lost
            for _ in full:
                self._queue.popleft()
            self.counts["dropped"].add(full)
            if not self._spool_full:
                self._spool_full = True
                log.warning(
                    "statistics spool %s is full (%d octets): rows are dropped until the store "
                    "is back", spool.directory, spool.cap,
                )  # fmt: skip
        return True

    async def _shutdown(self) -> None:
        with trio.move_on_after(self.drain_timeout):
            while self.connected and (self._queue or (self.spool and self.spool.pending)):
                if self.spool is not None and self.spool.pending:
                    await self._replay_some(abandon=True)
                else:
                    await self._write_some(abandon=True)
        if self._queue:
            queued = Tally()
            queued.add(self._queue)
            if await self._spill():
                log.warning(
                    "statistics store %s at shutdown: %d sessions (%d items) spooled to %s, "
                    "stored after the next start",
                    "still busy" if self.connected else "unavailable", queued.sessions,
                    queued.items, self.spool.directory if self.spool else None,
                )  # fmt: skip
            else:
                self.counts["dropped"].add(self._queue)
                self._queue.clear()
        dropped = self.counts["dropped"]
        if dropped.items:
            log.warning(
                "statistics: %d sessions (%d items) could not be stored or spooled and are lost",
                dropped.sessions, dropped.items,
            )  # fmt: skip
        if not self._abandoned:
            await self._thread(self.store.close)
        self.connected = False
        if self.spool is not None:
            self.spool.close()

    async def _purge(self) -> None:
        cutoff = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=self.retention_days)
        try:
            removed = await self._on_store(partial(self.store.purge, cutoff.isoformat()))
        except Exception as exc:  # any driver's error
            log.warning("statistics retention purge failed: %s", exc)
            return
        if removed:
            log.info("purged %d sessions older than %d days", removed, self.retention_days)


NUL_SHOWN = "\ufffd"
"""What a NUL in a client's text becomes in the store. PostgreSQL takes no NUL in text: a
value with one (an ID value sent as a literal, recorded by a policy that keeps it as sent; a
LOGIN name, with `user_identity = "plain"`) had the store refuse the batch, then each of that
session's rows, one transaction a row: the rows lost, a warning each, and every other
session of the batch written one by one."""


def _without_nul(fields: dict[str, str | None]) -> dict[str, str | None]:
    """`fields`, each NUL in a value replaced by `NUL_SHOWN` (the same dict if there is none)."""
    if not any(v and "\0" in v for v in fields.values()):
        return fields
    return {k: v.replace("\0", NUL_SHOWN) if v else v for k, v in fields.items()}


def escaping(encoding: str | None) -> str:
    """What the writer says once, at its first connection to a PostgreSQL database whose
    encoding lacks characters (`store.escaper`)."""
    lacks = (
        f"{encoding} lacks"
        if encoding in CODECS
        else f"are outside ASCII ({encoding} is not an encoding imapveil maps)"
    )
    return (
        f"statistics store: the database's encoding is {encoding}, not UTF8: characters of what "
        f"clients send (ID values, user names) that {lacks} are stored escaped (U+20AC as "
        "\\u20ac), their sessions counted; to store them as sent, move the statistics to a "
        "database created with ENCODING 'UTF8' (pg_dump, then restore into it)"
    )


class StoreHung(Exception):
    """The store did not answer a call within `STORE_WITHIN`."""


class _Call:
    """A call on a store in a worker thread, and whether the writer has left the store to it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._done = False
        self._forsaken = False

    def finished(self) -> None:
        """In the thread, as the call returns: close the store if the writer has left it."""
        with self._lock:
            self._done = True
            forsaken = self._forsaken
        if forsaken:
            self.store.close()

    def forsake(self) -> bool:
        """The writer leaves the store to the thread; True if the call had returned already."""
        with self._lock:
            self._forsaken = True
            return self._done


def _batch(items: Iterable[Item]) -> Batch:
    by_kind: dict[str, list[Sequence[Any]]] = {kind: [] for kind in KINDS}
    for kind, row in items:
        by_kind[kind].append(row)
    return Batch(
        sessions=by_kind["session"], ids=by_kind["id"], commands=by_kind["command"],
        traits=by_kind["traits"],
    )  # fmt: skip


def _printable(value: str | None, limit: int) -> str | None:
    """`value` if it is 1 to `limit` printable ASCII characters, else None."""
    if value and len(value) <= limit and value.isascii() and value.isprintable():
        return value
    return None


def bounded_traits(r: SessionTraits) -> tuple[Any, ...]:
    """`(behaviour, behaviour_text, ja4, extensions)` as the store keeps them (`bounded_values`)."""
    return bounded_values(r.behaviour, r.behaviour_text, r.ja4, r.extensions)


def bounded_values(
    behaviour: Any, text: Any, ja4: Any, extensions: Iterable[Any]
) -> tuple[Any, ...]:
    """Traits as the store keeps them, whether from a session's end or a spool read back (which
    anyone who can write the file may have edited): a behaviour name only of its form (`b1_`
    and 12 hex digits) and its text only with it, a JA4 only of JA4's form, extensions only from
    the vocabulary (unique, sorted, at most `MAX_EXTENSIONS`); each printable ASCII within its
    bound. Anything else is dropped (None; an extension left out)."""
    name = behaviour if isinstance(behaviour, str) and BEHAVIOUR.fullmatch(behaviour) else None
    text = _printable(text, MAX_BEHAVIOUR_TEXT) if name and isinstance(text, str) else None
    ja4 = ja4 if isinstance(ja4, str) and JA4.fullmatch(ja4) else None
    names = sorted({e for e in extensions if isinstance(e, str) and e in EXTENSIONS})
    return (name, text, ja4, names[:MAX_EXTENSIONS])


def _redacted(url: str) -> str:
    """A store URL without its password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        url = f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return redact(url)  # a password given as a parameter


def _without_session(items: list[Item], session: str) -> list[Item]:
    """`items` but for the first session row of `session` (a collided one: not stored)."""
    for i, (kind, row) in enumerate(items):
        if kind == "session" and row[0] == session:
            return items[:i] + items[i + 1 :]
    return items
