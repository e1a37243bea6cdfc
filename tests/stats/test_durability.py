"""Statistics lose nothing (issue 18): a store that goes away under load, a locked SQLite
database, a stop while the store is down, a crash in the middle of a replay, an id collision, two
instances on one store, two instances migrating an empty database at once.

Every scenario ends by counting rows: exactly one per completed session, no loss, no duplicate.
Waiting is for counts to be reached (polled), never for a fixed time.
"""

from __future__ import annotations

import logging
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from imapveil.config import ConfigError, load
from imapveil.records import CommandCompleted, IdExchange, SessionEnded, SessionStarted
from imapveil.stats import sink as sink_module
from imapveil.stats import store as store_module
from imapveil.stats.metrics import Metrics
from imapveil.stats.sink import StoreSink
from imapveil.stats.spool import Spool, Tally
from imapveil.stats.store import MIGRATIONS, Store
from tests.helpers.dovecot import free_port
from tests.helpers.postgres import Postgres

WAIT = 15.0  # seconds any one condition may take before the test fails


def emit_session(
    sink: StoreSink, sid: str, name: str = "Thunderbird", user: str = "hmac:u"
) -> None:
    """What the relay emits for one completed session: an ID, FETCH, LOGOUT."""
    sink.emit(SessionStarted(sid, "127.0.0.1:1", "u"))
    client: dict[str, str | None] = {"name": name, "version": "1"}
    sink.emit(IdExchange(sid, "a", "authenticated", "OK", False, client, (), ("name",), None))
    sink.emit(CommandCompleted(sid, "b", "FETCH", "selected", "OK", None, 1.0))
    sink.emit(CommandCompleted(sid, "c", "LOGOUT", "selected", "OK", None, 1.0))
    sink.emit(SessionEnded(sid, "127.0.0.1:1", "u", "logout", None, "logout", user, 5.0, 10, 20, 3))


class Load:
    """Sessions completing all the time, as many proxies' clients would, counted."""

    def __init__(self, sink: StoreSink, prefix: str) -> None:
        self.sink, self.prefix, self.done = sink, prefix, 0

    def one(self) -> None:
        emit_session(self.sink, f"{self.prefix}-{self.done:06d}")
        self.done += 1

    async def run(self, stop: trio.Event, per_tick: int = 5) -> None:
        while not stop.is_set():
            for _ in range(per_tick):
                self.one()
            await trio.sleep(0.01)


async def until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(WAIT):
        while not condition():  # noqa: ASYNC110 (counts kept by the writer and its threads)
            await trio.sleep(0.01)


def table_counts(url: str) -> tuple[int, int, int, int]:
    """(session rows, distinct session ids, ID exchange rows, commands counted)."""
    ((rows, distinct),) = query(url, "SELECT COUNT(*), COUNT(DISTINCT session) FROM sessions")
    ((ids,),) = query(url, "SELECT COUNT(*) FROM id_exchanges")
    ((commands,),) = query(url, "SELECT COALESCE(SUM(count), 0) FROM command_counts")
    return rows, distinct, ids, int(commands)


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    """Rows of one query, on a connection of its own."""
    store = Store(url)
    store.connect()
    try:
        return store.rows(sql)
    finally:
        store.close()


def exactly(sessions: int) -> tuple[int, int, int, int]:
    return sessions, sessions, sessions, 2 * sessions


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        server: Postgres = request.getfixturevalue("postgres")
        return server.url
    return str(tmp_path / "stats.sqlite")


def nowhere() -> str:
    """A PostgreSQL store nobody listens for: every connection is refused."""
    return f"postgresql://imapveil@127.0.0.1:{free_port()}/stats"


# --- an outage under load -----------------------------------------------------------------------


async def outage_under_load(
    sink: StoreSink, go_away: Callable[[], object], come_back: Callable[[], object]
) -> Load:
    """Sessions all along; the store goes away after 100 rows and comes back after 200 more
    were spooled; the end is once the spool is replayed and 100 more rows were written."""
    load = Load(sink, "load")
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        nursery.start_soon(load.run, stop)
        await until(lambda: sink.counts["written"].sessions >= 100)
        await trio.to_thread.run_sync(go_away)
        # Sessions go on; what the store cannot take goes to disk.
        await until(lambda: sink.counts["spooled"].sessions >= 200)
        await trio.to_thread.run_sync(come_back)
        spooled = sink.counts["spooled"].sessions
        await until(lambda: sink.counts["replayed"].sessions >= spooled)
        written = sink.counts["written"].sessions
        await until(lambda: sink.counts["written"].sessions >= written + 100)  # back to normal
        stop.set()
        with trio.fail_after(WAIT):
            await sink.flush()
        nursery.cancel_scope.cancel()
    print(f"{load.done} sessions completed, {sink.counts}")  # the numbers, with -s
    assert sink.counts["dropped"] == Tally() and sink.collisions == 0
    assert sink.counts["written"].sessions + sink.counts["replayed"].sessions == load.done
    assert sink.counts["replayed"] == sink.counts["spooled"] and sink.spool_bytes == 0
    return load


async def test_postgres_outage_under_load_loses_nothing(
    tmp_path: Path, postgres: Postgres, caplog: pytest.LogCaptureFixture
) -> None:
    sink = StoreSink(postgres.url, proxy="p1", spool=tmp_path / "spool")
    load = await outage_under_load(sink, postgres.stop, postgres.restart)
    assert table_counts(postgres.url) == exactly(load.done)
    assert not list((tmp_path / "spool").glob("*.jsonl"))  # replayed files are deleted
    assert "statistics store write failed" in caplog.text
    assert "probing every 1 s" in caplog.text


async def test_locked_sqlite_under_load_loses_nothing(tmp_path: Path) -> None:
    url = str(tmp_path / "stats.sqlite")
    sink = StoreSink(url, proxy="p1", spool=tmp_path / "spool", timeout=0.5)
    blocker = Store(url)

    def lock() -> None:  # another process writes (a long import, a vacuum)
        blocker.connect()
        blocker.execute("BEGIN IMMEDIATE")

    def unlock() -> None:
        blocker.execute("ROLLBACK")
        blocker.close()

    load = await outage_under_load(sink, lock, unlock)
    assert table_counts(url) == exactly(load.done)


# --- a stop while the store is down -------------------------------------------------------------


async def test_stop_while_postgres_is_down_then_restart(
    tmp_path: Path, postgres: Postgres, caplog: pytest.LogCaptureFixture
) -> None:
    spool = tmp_path / "spool"
    first = StoreSink(postgres.url, proxy="p1", spool=spool)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(first.run)
        for i in range(50):
            emit_session(first, f"before-{i}")
        with trio.fail_after(WAIT):
            await first.flush()
        await trio.to_thread.run_sync(postgres.stop)
        for i in range(300):  # queued in memory: the writer may not have tried the store yet
            emit_session(first, f"during-{i}")
        nursery.cancel_scope.cancel()  # SIGTERM: the service cancels the writer
    print(f"stopped while down: {first.counts}")
    assert first.counts["spooled"] == Tally(300, 1200)
    assert first.counts["dropped"] == Tally() and first.take_drops() is None
    assert first.spool_bytes > 0
    assert "300 sessions (1200 items) spooled" in caplog.text

    await trio.to_thread.run_sync(postgres.restart)
    second = StoreSink(postgres.url, proxy="p1", spool=spool)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(second.run)
        with trio.fail_after(WAIT):
            await second.flush()
        nursery.cancel_scope.cancel()
    assert second.counts["replayed"] == Tally(300, 1200)
    assert table_counts(postgres.url) == exactly(350)
    assert second.spool_bytes == 0


async def test_a_stop_spools_what_the_store_did_not_take_in_time(tmp_path: Path) -> None:
    """A store that holds its lock past the drain timeout: the queue goes to the spool."""
    url = str(tmp_path / "stats.sqlite")
    spool = tmp_path / "spool"
    sink = StoreSink(url, spool=spool, timeout=5.0, drain_timeout=0.2)
    blocker = Store(url)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        emit_session(sink, "first")
        with trio.fail_after(WAIT):
            await sink.flush()  # past the retention purge, which runs first
        await trio.to_thread.run_sync(blocker.connect)
        await trio.to_thread.run_sync(blocker.execute, "BEGIN IMMEDIATE")
        for i in range(40):
            emit_session(sink, f"s{i}")
        nursery.cancel_scope.cancel()
    # The write that was waiting for the lock may still go through later: the spool then holds
    # rows the store has too, and the replay leaves them as they are.
    assert sink.counts["spooled"].sessions == 40 and sink.counts["written"].sessions == 1
    await trio.to_thread.run_sync(blocker.execute, "ROLLBACK")
    blocker.close()
    await replay(url, spool)
    assert table_counts(url) == exactly(41)


# --- a crash in the middle of a replay ----------------------------------------------------------


async def spooled(spool: Path, sessions: int, prefix: str = "s") -> None:
    """A spool as a proxy leaves it when it stops while its store is away."""
    sink = StoreSink(nowhere(), spool=spool)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        for i in range(sessions):
            emit_session(sink, f"{prefix}-{i}")
        nursery.cancel_scope.cancel()
    assert sink.counts["spooled"].sessions == sessions


async def replay(url: str, spool: Path) -> StoreSink:
    sink = StoreSink(url, spool=spool)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        with trio.fail_after(WAIT):
            await sink.flush()
        nursery.cancel_scope.cancel()
    return sink


async def test_a_replay_repeated_after_a_crash_stores_each_row_once(
    url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = tmp_path / "spool"
    await spooled(spool, 1200)
    files = sorted(spool.glob("*.jsonl"))
    # What a crash leaves: the files as they were before the replay deleted them, the last one
    # with a torn line (a write that a crash cut short).
    kept = tmp_path / "kept"
    kept.mkdir()
    for f in files:
        shutil.copy(f, kept / f.name)
    with (kept / files[-1].name).open("ab") as torn:
        torn.write(b'["session",["torn-1","p"')
    first = await replay(url, spool)
    assert first.counts["replayed"] == Tally(1200, 4800)
    assert not list(spool.glob("*.jsonl"))
    for f in kept.iterdir():
        shutil.copy(f, spool / f.name)
    second = await replay(url, spool)  # the same rows again: every insert is a no-op
    assert second.counts["replayed"] == Tally(1200, 4800)
    assert second.counts["dropped"] == Tally(0, 1)  # the torn line, counted
    assert table_counts(url) == exactly(1200)
    assert "skipped an unreadable line" in caplog.text
    assert "collision" not in caplog.text
    print(f"replayed twice: {table_counts(url)}")


# --- collisions ---------------------------------------------------------------------------------


async def test_an_id_collision_is_reported(
    url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink = StoreSink(url, spool=tmp_path / "spool")
    emit_session(sink, "same", "Thunderbird", "hmac:one")
    emit_session(sink, "same", "NeoMutt", "hmac:two")  # in the same batch
    emit_session(sink, "other")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        with trio.fail_after(WAIT):
            await sink.flush()
        emit_session(sink, "same", "Outlook", "hmac:three")  # in a later batch
        with trio.fail_after(WAIT):
            await sink.flush()
        nursery.cancel_scope.cancel()
    assert query(url, "SELECT session, user_id FROM sessions ORDER BY session") == [
        ("other", "hmac:u"),
        ("same", "hmac:one"),
    ]
    collided = [r for r in caplog.records if "id collision" in r.getMessage()]
    assert len(collided) == 2 and all(r.levelno == logging.WARNING for r in collided)
    assert "session id same is stored already" in collided[0].getMessage()
    assert sink.collisions == 2
    assert sink.counts["dropped"].sessions == 2
    # Not counted as written as well (`imapveil_store_sessions_total` summed to more sessions
    # than there were): two of the four stored.
    assert sink.counts["written"].sessions == 2
    assert sink.take_drops() == Tally(2, 2)


async def test_a_batch_of_many_statements_stores_every_row_and_finds_a_collision_in_any(
    url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite takes a batch's rows many to a statement (`Store._many`, at most
    `SQLITE_PARAMETERS` parameters each): a batch of several statements stores every row of
    every table, and a collision in the last statement is found as in the first."""
    sink = StoreSink(url, spool=tmp_path / "spool")
    sessions = 3 * store_module.SQLITE_PARAMETERS // 17 + 5  # four statements' worth and more
    for i in range(sessions):
        emit_session(sink, f"s{i:04d}")
    emit_session(sink, f"s{sessions - 1:04d}", "NeoMutt", "hmac:two")  # the last one's id again
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        with trio.fail_after(WAIT):
            await sink.flush()
        nursery.cancel_scope.cancel()
    assert query(url, "SELECT count(*) FROM sessions") == [(sessions,)]
    assert query(url, "SELECT count(DISTINCT session) FROM command_counts") == [(sessions,)]
    assert sink.collisions == 1
    assert any("id collision" in r.getMessage() for r in caplog.records)


async def test_under_steady_load_rows_gather_into_few_transactions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sessions end all the time on a busy proxy: after each write the writer lets rows gather
    for `COALESCE` seconds (unless a full batch is queued), so that a transaction holds a
    quarter second of sessions, not the few that ended while the last one was written (SQLite
    pays for a transaction's pages whether it holds one session or hundreds)."""
    url = f"sqlite:///{tmp_path / 'stats.sqlite'}"
    sink = StoreSink(url, spool=tmp_path / "spool")
    writes = 0
    write = sink.store.write

    def counted(batch: Any) -> Any:
        nonlocal writes
        writes += 1
        time.sleep(0.02)  # a transaction takes a while: sessions end meanwhile (its thread)
        return write(batch)

    monkeypatch.setattr(sink.store, "write", counted)
    load, stop, seconds = Load(sink, "s"), trio.Event(), 1.0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        nursery.start_soon(load.run, stop)
        await trio.sleep(seconds)
        stop.set()
        with trio.fail_after(WAIT):
            await sink.flush()
        nursery.cancel_scope.cancel()
    assert query(url, "SELECT count(*) FROM sessions") == [(load.done,)]
    # Back to back before (a write every 20 ms, each of what ended meanwhile: about 50); one
    # per COALESCE now, and the flush's.
    assert load.done >= 100
    assert writes <= seconds / sink_module.COALESCE + 3, writes


async def test_a_full_batch_goes_at_once_however_long_the_writer_would_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows gather for COALESCE seconds before a write, unless a full batch is queued: then it
    is written at once, so that a burst cannot fill the queue (and lose rows beyond its
    capacity) while the writer rests (found attacking 03cc437, which rests after each write)."""
    monkeypatch.setattr(sink_module, "COALESCE", 60.0)
    url = f"sqlite:///{tmp_path / 'stats.sqlite'}"
    sink = StoreSink(url, spool=tmp_path / "spool")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        with trio.fail_after(WAIT):
            await sink.ready.wait()
        emit_session(sink, "first")  # the writer now rests, for a minute
        await trio.sleep(0.05)
        sessions = sink_module.BATCH // 4 + 1  # four rows each: a batch and more
        for i in range(sessions):
            emit_session(sink, f"s{i:04d}")
        await until(lambda: query(url, "SELECT count(*) FROM sessions")[0][0] >= 100)
        nursery.cancel_scope.cancel()


def test_a_session_rows_digest_never_changes() -> None:
    """A row's digest is stored with it and compared with a replay's, also one a later version
    spooled: the same row must give the same digest in every version (these were computed with
    `json.dumps(list(row), separators=(",", ":"), ensure_ascii=False)`, SHA-256, 32 digits)."""
    row = ("mx-a-000001", "mx-a", "2026-12-01T10:00:00.000+00:00", "2026-12-01T10:00:01.500+00:00",
           "2026-12-01", "hmac:ab", "logout", 1500.0, 27, 594, 2, 0, "Thunderbird", "128.0",
           "Linux", None)  # fmt: skip
    odd = ("s", "p", "\u00e9", "x", "d", None, "r", float("nan"), 1, 2, 3, 1, "f", "v\u2028",
           'p"', "o")  # fmt: skip
    assert store_module.digest(row) == "865663ec464d67ba28ba5ece0656a436"
    assert store_module.digest(odd) == "fd6db0dec9f096d7e26a70c14f043cb4"


# --- two instances ------------------------------------------------------------------------------


async def test_two_instances_name_their_rows(tmp_path: Path, postgres: Postgres) -> None:
    sinks = [
        StoreSink(postgres.url, proxy=name, spool=tmp_path / name) for name in ("mx-a", "mx-b")
    ]
    async with trio.open_nursery() as nursery:
        for n, sink in enumerate(sinks):
            nursery.start_soon(sink.run)
            for i in range(20 + n):
                emit_session(sink, f"{sink.proxy}-{i}")
        with trio.fail_after(WAIT):
            for sink in sinks:
                await sink.flush()
        nursery.cancel_scope.cancel()
    rows = query(postgres.url, "SELECT proxy, COUNT(*) FROM sessions GROUP BY proxy ORDER BY proxy")
    assert rows == [("mx-a", 20), ("mx-b", 21)]


async def test_two_instances_migrate_an_empty_database_at_once(
    postgres: Postgres, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    sinks = [StoreSink(postgres.url, proxy=f"p{n}", spool=tmp_path / str(n)) for n in range(4)]
    async with trio.open_nursery() as nursery:
        for sink in sinks:
            nursery.start_soon(sink.run)
        with trio.fail_after(WAIT):
            for sink in sinks:
                await sink.ready.wait()
        nursery.cancel_scope.cancel()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    # And straight at the store, threads released together.
    barrier = threading.Barrier(6)
    versions: list[int] = []

    def migrate(url: str) -> None:
        store = Store(url)
        barrier.wait()
        store.connect()
        versions.append(store.version)
        store.close()

    for url in (postgres.url, str(tmp_path / "stats.sqlite")):
        barrier.reset()
        threads = [threading.Thread(target=migrate, args=(url,)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        applied = query(url, "SELECT version FROM schema_version ORDER BY version")
        assert applied == [(n,) for n in range(1, len(MIGRATIONS) + 1)]
    assert versions == [len(MIGRATIONS)] * 12


# --- the migration to idempotent keys -----------------------------------------------------------


def test_migration_keeps_rows_written_before(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(store_module, "MIGRATIONS", MIGRATIONS[:1])
        old = Store(url)
        old.connect()
        assert old.version == 1
        row = ("old", "p", "2026-01-01T00:00:00", "2026-01-01T00:01:00", "2026-01-01", "hmac:u",
               "logout", 5.0, 1, 2, 3, 0, "Thunderbird", "1", None, None)  # fmt: skip
        old.execute(f"INSERT INTO sessions VALUES ({', '.join('?' * 16)})", row)  # noqa: S608
        exchange = ["old", "a", "2026-01-01T00:00:01", "authenticated", "OK", 0, 0, "Thunderbird",
                    "Thunderbird", "1", None, None, None, "[]", "default", "d"]  # fmt: skip
        for tag in ("a", "a", "b"):  # a tag used twice: numbered, both kept
            exchange[1] = tag
            old.execute(f"INSERT INTO id_exchanges VALUES ({', '.join('?' * 16)})", exchange)  # noqa: S608
        for count in (2, 3):  # what a session id collision left: added up
            old.execute("INSERT INTO command_counts VALUES ('old', 'FETCH', 'OK', ?)", (count,))
        old.execute("INSERT INTO command_counts VALUES ('old', 'LOGOUT', 'OK', 1)")
        old._conn.commit()
        old.close()
    store = Store(url)
    store.connect()
    try:
        assert store.version == len(MIGRATIONS)
        assert store.rows("SELECT session, digest FROM sessions") == [("old", None)]
        ids = store.rows("SELECT tag, seq FROM id_exchanges ORDER BY seq")
        assert ids == [("a", 1), ("a", 2), ("b", 3)]
        counts = store.rows("SELECT verb, count FROM command_counts ORDER BY verb")
        assert counts == [("FETCH", 5), ("LOGOUT", 1)]
    finally:
        store.close()


# --- the spool's cap, its lock, its metrics -----------------------------------------------------


async def test_beyond_the_spool_cap_rows_are_dropped_counted_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink = StoreSink(nowhere(), spool=tmp_path / "spool", spool_cap=20_000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        for i in range(100):
            emit_session(sink, f"s{i}")
        nursery.cancel_scope.cancel()
    spooled, dropped = sink.counts["spooled"], sink.counts["dropped"]
    assert spooled.sessions > 0 and dropped.sessions > 0
    assert spooled.sessions + dropped.sessions == 100
    assert spooled.items + dropped.items == 400
    assert 0 < sink.spool_bytes <= 20_000
    assert sink.take_drops() == dropped and sink.take_drops() is None
    assert f"{dropped.sessions} sessions ({dropped.items} items) could not be" in caplog.text


async def test_one_spool_per_process(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    try:
        sink = StoreSink(str(tmp_path / "stats.sqlite"), spool=tmp_path / "spool")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sink.run)
            await sink.ready.wait()
            nursery.cancel_scope.cancel()
        assert sink.spool is None
        assert "in use by another process" in caplog.text
    finally:
        spool.close()


def test_spool_files_in_order_across_restarts(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    spool.append([("session", ["a"]), ("command", ["a", "FETCH", "OK", 1])])
    spool.close()
    again = Spool(tmp_path)
    again.open()  # a new run never appends to a file of the last one
    again.append([("session", ["b"])])
    assert [p.name for p in sorted(tmp_path.glob("*.jsonl"))] == [
        "000000000001.jsonl",
        "000000000002.jsonl",
    ]
    items, position = again.read(10)
    assert items == [("session", ["a"]), ("command", ["a", "FETCH", "OK", 1])]
    again.consume(position)
    items, position = again.read(10)
    assert items == [("session", ["b"])]
    again.consume(position)
    assert not again.pending and again.bytes == 0
    assert again.read(10) == ([], 0)
    again.close()


async def test_metrics_say_what_the_writer_did(tmp_path: Path) -> None:
    sink = StoreSink(nowhere(), spool=tmp_path / "spool")
    metrics = Metrics()
    metrics.watch_store(sink)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        for i in range(3):
            emit_session(sink, f"s{i}")
        nursery.cancel_scope.cancel()
    text = metrics.exposition()
    assert "# TYPE imapveil_store_sessions_total counter" in text
    assert 'imapveil_store_sessions_total{outcome="spooled"} 3' in text
    assert 'imapveil_store_items_total{outcome="spooled"} 12' in text
    assert 'imapveil_store_sessions_total{outcome="dropped"} 0' in text
    assert "# TYPE imapveil_store_spool_bytes gauge" in text
    assert f"imapveil_store_spool_bytes {sink.spool_bytes}" in text
    assert "imapveil_store_up 0" in text


@pytest.fixture(autouse=True)
def _no_stray_state(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """A sink without an explicit spool must not reach outside the test's directory."""
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    yield


def test_proxy_name_setting() -> None:
    assert load(None, {"upstream": "h:1"}).proxy() == socket.gethostname()
    assert load(None, {"upstream": "h:1", "proxy_name": "gw-1"}).proxy() == "gw-1"
    for bad in ("gw\x1b[2J", "x" * 65):
        with pytest.raises(ConfigError, match="proxy_name"):
            load(None, {"upstream": "h:1", "proxy_name": bad})
