"""A PostgreSQL statistics store whose database is not in UTF8 (LATIN1, WIN1252, SQL_ASCII...):
no session lost for a character the database cannot hold. Such a character, in anything a
client sent (an ID value, a LOGIN name kept as sent), is stored escaped, as the statistics'
outputs write an invisible one (`\\u20ac`, `\\U0001f4e7`, `\\xe9`), the rest of the row as it
was; a UTF8 database is written as before, at no cost a row. Real PostgreSQL, a database of
each encoding made in the test's cluster."""

from __future__ import annotations

import json
import logging

import psycopg
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from imapveil.records import IdExchange, Record, SessionEnded, SessionStarted
from imapveil.stats import store as store_module
from imapveil.stats.charts import safe
from imapveil.stats.metrics import Metrics
from imapveil.stats.sink import StoreSink
from imapveil.stats.spool import Tally
from tests.helpers.postgres import Postgres
from tests.stats.test_durability import query
from tests.test_attack_round17_outputs import cli

CLIENTS = {
    "cyrillic": "\u041f\u043e\u0447\u0442\u0430",  # Почта
    "emoji": "\U0001f4e7 Mail",
    "euro": "Mail \u20ac",  # not in LATIN1, in WIN1252
    "latin": "Caf\u00e9 Mail",  # in both
    "ascii": "Thunderbird",
}
ESCAPED = {
    "cyrillic": "\\u041f\\u043e\\u0447\\u0442\\u0430",
    "emoji": "\\U0001f4e7 Mail",
    "euro": "Mail \\u20ac",
    "latin": "Caf\\xe9 Mail",
    "ascii": "Thunderbird",
}
STORED = {
    "UTF8": CLIENTS,
    "SQL_ASCII": CLIENTS,  # stored as the octets sent (UTF-8), read back as sent
    "LATIN1": {**ESCAPED, "latin": CLIENTS["latin"]},
    "WIN1252": {**ESCAPED, "latin": CLIENTS["latin"], "euro": CLIENTS["euro"]},
    # Not one this version maps to a Python codec (Python's euc_jp and PostgreSQL's differ):
    # ASCII only.
    "EUC_JP": ESCAPED,
}
USER = "\u041f\u0451\u0442\u0440 \u20ac"  # a LOGIN name kept as sent (user_identity = "plain")
USER_STORED = {
    "UTF8": USER,
    "SQL_ASCII": USER,
    "LATIN1": "\\u041f\\u0451\\u0442\\u0440 \\u20ac",
    "WIN1252": "\\u041f\\u0451\\u0442\\u0440 \u20ac",
    "EUC_JP": "\\u041f\\u0451\\u0442\\u0440 \\u20ac",
}


def database(postgres: Postgres, encoding: str) -> str:
    """The URL of a new database in `encoding` (the fixture's own, `stats`, for UTF8)."""
    if encoding == "UTF8":
        return postgres.url
    admin = postgres.url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            f"CREATE DATABASE enc ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' "
            "TEMPLATE template0"
        )
    return postgres.url.rsplit("/", 1)[0] + "/enc"


def client(text: str) -> dict[str, str | None]:
    return {"name": text, "version": f"1.0 {text}", "os": f"{text} OS", "os-version": text,
            "vendor": text}  # fmt: skip


async def record(url: str, *, users: int = 2, metrics: Metrics | None = None) -> StoreSink:
    """`users` sessions of each client in `CLIENTS` (ID fields all of its text) and one plain
    session, through a `StoreSink` into `url`, until all of it is stored."""
    sink = StoreSink(url, spool=None, spool_cap=0)
    if metrics is not None:
        metrics.watch_store(sink)

    def emit(record: Record) -> None:
        sink.emit(record)
        if metrics is not None:
            metrics.emit(record)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        with trio.fail_after(20):
            await sink.ready.wait()
            for key, text in CLIENTS.items():
                for i in range(users):
                    sid = f"{key}-{i}"
                    emit(SessionStarted(sid, "127.0.0.1:1", "u"))
                    emit(IdExchange(sid, "a", "authenticated", "OK", False, client(text), (), (),
                                    None))  # fmt: skip
                    emit(SessionEnded(sid, "127.0.0.1:1", "u", "logout", None, "logout",
                                      f"{USER} {i}", 5.0, 10, 20, 3))  # fmt: skip
            await sink.flush()
        nursery.cancel_scope.cancel()
    return sink


@pytest.mark.parametrize("encoding", ["LATIN1", "WIN1252", "SQL_ASCII", "EUC_JP", "UTF8"])
async def test_no_session_is_lost_for_a_character_the_database_lacks(
    postgres: Postgres, encoding: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Found: on a LATIN1 database, a session whose ID name was `Почта`, `📧 Mail` or `Mail €`
    was refused by PostgreSQL ("character with byte sequence ... has no equivalent in encoding
    LATIN1") and lost whole (its session row and its ID's: the family is the name). Now every
    session is stored; what the database lacks is escaped in every text of the row (ID values,
    the family, version, platform and system drawn from them, the LOGIN name), the rest kept."""
    url = database(postgres, encoding)
    sink = await record(url)
    assert sink.counts["dropped"] == Tally(), sink.counts
    assert sink.counts["written"].sessions == 2 * len(CLIENTS)
    assert "refused" not in caplog.text
    want = STORED[encoding]
    ids = query(url, "SELECT session, name, version, os, os_version, vendor FROM id_exchanges")
    assert sorted(ids) == sorted(
        (f"{key}-{i}", text, f"1.0 {text}", f"{text} OS", text, text)
        for key, text in want.items()
        for i in range(2)
    )
    sessions = query(url, "SELECT session, family, version, platform, os_version FROM sessions")
    assert sorted(sessions) == sorted(
        (f"{key}-{i}", text, f"1.0 {text}", f"{text} OS", text)
        for key, text in want.items()
        for i in range(2)
    )
    users = {u for (u,) in query(url, "SELECT user_id FROM sessions")}
    assert users == {f"{USER_STORED[encoding]} {i}" for i in range(2)}


def test_the_escapes_are_the_outputs_own() -> None:
    """The form of an escape is the one `imapveil stats` and the report give an invisible
    character (`charts.safe`): one form for a reader to learn."""
    escape = store_module.escaper("LATIN1")
    assert escape is not None
    for char in ("\u200b", "\u202e", "\U000e0041"):
        assert escape(f"x{char}y") == safe(f"x{char}y")
    assert escape("\u00e9\u00ff") == "\u00e9\u00ff"
    ascii_only = store_module.escaper("MULE_INTERNAL")  # not mapped: ASCII only
    assert ascii_only is not None
    assert ascii_only("\u00e9\u20ac\U0001f4e7 \x1b") == "\\xe9\\u20ac\\U0001f4e7 \x1b"


def test_a_utf8_database_costs_nothing_a_row() -> None:
    """UTF8 (and SQL_ASCII, which stores the octets it is sent unchecked): no escaping at all."""
    assert store_module.escaper("UTF8") is None
    assert store_module.escaper("SQL_ASCII") is None


@pytest.mark.parametrize("encoding", ["LATIN1", "UTF8", "SQL_ASCII"])
async def test_the_database_s_encoding_is_said_once_at_start(
    postgres: Postgres, encoding: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A warning at start, once, when characters are stored escaped: which encoding, and what to
    do about it (a UTF8 database). None on UTF8 nor on SQL_ASCII (nothing escaped)."""
    url = database(postgres, encoding)
    caplog.set_level(logging.INFO)
    sink = await record(url, users=1)
    said = [r for r in caplog.records if "encoding" in r.getMessage()]
    if encoding != "LATIN1":
        assert said == [], [r.getMessage() for r in said]
        assert sink.store.escape is None
        return
    assert len(said) == 1, [r.getMessage() for r in said]
    (warning,) = said
    assert warning.levelno == logging.WARNING
    message = warning.getMessage()
    assert "LATIN1" in message and "escaped" in message and "ENCODING 'UTF8'" in message
    assert "\\u20ac" in message


async def test_the_outputs_show_an_escaped_value(postgres: Postgres) -> None:
    """`imapveil stats` (table and JSON) counts each client's sessions under its escaped name,
    and the writer's metrics count every session as written, none as dropped."""
    url = database(postgres, "LATIN1")
    metrics = Metrics()
    await record(url, users=2, metrics=metrics)
    table = cli("stats", "--store", url, "--by", "family", "--min-users", "0")
    for text in STORED["LATIN1"].values():
        assert text in table
    rows = json.loads(cli("stats", "--store", url, "--by", "family", "--format", "json",
                          "--min-users", "0"))  # fmt: skip
    text = json.dumps(rows, ensure_ascii=False)
    for stored in STORED["LATIN1"].values():
        assert json.dumps(stored, ensure_ascii=False)[1:-1] in text
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition())}
    outcomes = {s.labels["outcome"]: s.value for s in families["imapveil_store_sessions"].samples
                if s.name.endswith("_total")}  # fmt: skip
    assert outcomes["written"] == 2 * len(CLIENTS)
    assert outcomes.get("dropped", 0) == 0


def test_each_codec_stores_only_what_postgresql_converts(postgres: Postgres) -> None:
    """Python's codec for each PostgreSQL encoding this version maps keeps no character that
    PostgreSQL's own conversion from UTF-8 refuses (a character it kept and PostgreSQL refused
    would lose its session again): every character the codec can encode, converted by the
    server in one string (single-octet encodings: 83 to 128 characters; EUC_CN: 7,445)."""
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        for encoding, codec in store_module.CODECS.items():
            kept = EVERY.encode(codec, "ignore").decode(codec)
            assert len(kept) > 80, codec
            conn.execute("SELECT convert_to(%s, %s)", (kept, encoding))


EVERY = "".join(chr(c) for c in range(0x80, 0x110000) if not 0xD800 <= c <= 0xDFFF)
"""Every character outside ASCII."""


def test_a_replay_is_told_from_a_collision_when_ids_are_escaped(postgres: Postgres) -> None:
    """A session row whose id the database's encoding lacks (only an edited spool makes one) is
    stored escaped: written again it is a replay (no collision), and a different row under the
    same id is a collision named by the id as sent."""
    url = database(postgres, "LATIN1")
    row = {c: 0 for c in store_module.SESSION_COLUMNS} | {
        "session": "s-\u20ac", "proxy": "p", "started_at": "2026-01-01T00:00:00", "ended_at":
        "2026-01-01T00:00:01", "day": "2026-01-01", "reason": "logout", "family": "Mail \u20ac",
    }  # fmt: skip
    first = tuple(row[c] for c in store_module.SESSION_COLUMNS)
    other = tuple({**row, "family": "Other"}[c] for c in store_module.SESSION_COLUMNS)
    store = store_module.Store(url)
    store.connect()
    try:
        assert store.write(store_module.Batch(sessions=[first])) == []
        assert store.write(store_module.Batch(sessions=[first])) == []
        (collision,) = store.write(store_module.Batch(sessions=[other]))
        assert collision.session == "s-\u20ac"
        assert store.rows("SELECT session, family FROM sessions") == [("s-\\u20ac", "Mail \\u20ac")]
    finally:
        store.close()
