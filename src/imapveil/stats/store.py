"""The statistics store: SQLite (default, stdlib) or PostgreSQL (a fleet of proxies), one schema.

Schema changes are forward migrations, applied in order at start; `schema_version` says which
have run. Migrating is serialised across proxies sharing one database: a transaction-scoped
advisory lock in PostgreSQL, `BEGIN IMMEDIATE` in SQLite. Timestamps are ISO 8601 UTC strings
(they sort as text on both databases). Only what the policy let records keep is stored:
pseudonymous users, client names and versions, counts.

Writes are idempotent, so that a batch written twice (replayed from the spool after a crash in
the middle of a replay, or written and spooled at a shutdown that could not wait for the answer)
is stored once: every table has a key — `sessions (session)`, `id_exchanges (session, seq)`,
`command_counts (session, verb, status)`, `session_traits (session)`, `session_extensions
(session, extension)` — and inserts ignore a row whose key is there. A session row also keeps a
digest of its content, so that a genuinely different session under an existing id (a collision)
is told apart from a replay and reported.

A PostgreSQL database need not be in UTF8. The store talks UTF-8 to it whatever its encoding
(`SHOW server_encoding`, read at connect), and the server converts; a character the database's
encoding lacks (a Cyrillic or Chinese client name, an emoji, `€` in LATIN1), which the server
refuses, is stored escaped instead (`escaper`: `\\u20ac`, the form the outputs give an invisible
character), so that no session is lost for it. A UTF8 database (and a SQL_ASCII one, which
stores the octets it is sent unchecked, and gives them back) is written as it always was, at no
cost a row.

A session's traits (`records.SessionTraits`, migration 3) are two tables beside `sessions`,
joined on `session`: `session_traits` has one row per session whose traits are known (its
behaviour signature's name and canonical text, its JA4 TLS fingerprint, each NULL when there is
none), `session_extensions` one row per IMAP extension the session used, so that SQL can group by
extension. A session without a `session_traits` row is one whose traits are unknown (written
before migration 3, or one that never reached the server). Traits are written in the batch of
their session's row, and not at all for a session id whose row collided in that batch (they
could belong to either session). Fingerprints describe programs, not people; every query over
them is floored by `min_group_users` (see `stats.traits`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from imapveil.stats.escapes import escaped

_USERINFO_PASSWORD = re.compile(r"(://[^:/@]*):[^@/]*@")
_PARAMETER = re.compile(r"([?&])([^=&#]*)=([^&#]*)")


def redact(url: str) -> str:
    """A store URL without its password: the one in its user information (`user:PASSWORD@`)
    and one given as a parameter (`?password=`, as libpq takes it, its name percent-decoded)."""
    url = _USERINFO_PASSWORD.sub(r"\1:***@", url)
    if "?" not in url:
        return url

    def hidden(match: re.Match[str]) -> str:
        if unquote(match[2]).strip().lower() != "password":
            return match[0]
        return f"{match[1]}{match[2]}=***"

    return _PARAMETER.sub(hidden, url)


SESSION_COLUMNS = (
    "session", "proxy", "started_at", "ended_at", "day", "user_id", "reason", "duration_ms",
    "bytes_from_client", "bytes_from_server", "commands", "client_tls", "family", "version",
    "platform", "os_version",
)  # fmt: skip
"""A session row as the sink makes it; the store adds `digest`."""
ID_COLUMNS = (
    "session", "tag", "at", "state", "status", "malformed", "injected", "family", "name",
    "version", "os", "os_version", "vendor", "dropped", "policy", "policy_digest", "seq",
)  # fmt: skip
COMMAND_COLUMNS = ("session", "verb", "status", "count")
TRAITS_COLUMNS = ("session", "behaviour", "behaviour_text", "ja4")
EXTENSION_COLUMNS = ("session", "extension")
WRITE_TIMEOUT = 15.0
"""Seconds PostgreSQL may take for one statement of a write."""
LOCK_KEY = 0x696D61707665696C  # "imapveil": the advisory lock that serialises migrations

_ID_EXCHANGE = """
            session TEXT NOT NULL,
            tag TEXT NOT NULL,
            at TEXT NOT NULL,
            state TEXT NOT NULL,
            status TEXT,
            malformed INTEGER NOT NULL,
            injected INTEGER NOT NULL,
            family TEXT NOT NULL,
            name TEXT,
            version TEXT,
            os TEXT,
            os_version TEXT,
            vendor TEXT,
            dropped TEXT NOT NULL,
            policy TEXT NOT NULL,
            policy_digest TEXT NOT NULL
"""
"""The columns of `id_exchanges` as migration 1 made them: part of migrations, never to change."""

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE sessions (
            session TEXT PRIMARY KEY,
            proxy TEXT NOT NULL,
            started_at TEXT NOT NULL,
            ended_at TEXT NOT NULL,
            day TEXT NOT NULL,
            user_id TEXT,
            reason TEXT NOT NULL,
            duration_ms DOUBLE PRECISION,
            bytes_from_client BIGINT NOT NULL,
            bytes_from_server BIGINT NOT NULL,
            commands INTEGER NOT NULL,
            client_tls INTEGER NOT NULL,
            family TEXT NOT NULL,
            version TEXT,
            platform TEXT,
            os_version TEXT
        )""",
        "CREATE INDEX sessions_started ON sessions (started_at)",
        f"CREATE TABLE id_exchanges ({_ID_EXCHANGE})",
        "CREATE INDEX id_exchanges_at ON id_exchanges (at)",
        """CREATE TABLE command_counts (
            session TEXT NOT NULL,
            verb TEXT NOT NULL,
            status TEXT NOT NULL,
            count INTEGER NOT NULL
        )""",
        "CREATE INDEX command_counts_session ON command_counts (session)",
    ),
    (
        # 2: keys that make a replayed insert a no-op, and a digest to tell a collision from a
        # replay. Rows written before keep their content: ID exchanges are numbered within
        # their session, duplicate command counts (only a session id collision made those) are
        # added up.
        "ALTER TABLE sessions ADD COLUMN digest TEXT",
        f"""CREATE TABLE id_exchanges_v2 ({_ID_EXCHANGE},
            seq BIGINT NOT NULL,
            CONSTRAINT id_exchanges_key PRIMARY KEY (session, seq))""",
        f"""INSERT INTO id_exchanges_v2 SELECT {", ".join(ID_COLUMNS[:-1])},
            ROW_NUMBER() OVER (PARTITION BY session ORDER BY at, tag) FROM id_exchanges""",  # noqa: S608
        "DROP TABLE id_exchanges",
        "ALTER TABLE id_exchanges_v2 RENAME TO id_exchanges",
        "CREATE INDEX id_exchanges_at ON id_exchanges (at)",
        """CREATE TABLE command_counts_v2 (
            session TEXT NOT NULL,
            verb TEXT NOT NULL,
            status TEXT NOT NULL,
            count INTEGER NOT NULL,
            CONSTRAINT command_counts_key PRIMARY KEY (session, verb, status)
        )""",
        """INSERT INTO command_counts_v2 SELECT session, verb, status, SUM(count)
            FROM command_counts GROUP BY session, verb, status""",
        "DROP TABLE command_counts",
        "ALTER TABLE command_counts_v2 RENAME TO command_counts",
    ),
    (
        # 3: each session's traits (what its client used and how it behaved), for
        # `imapveil stats --by extension` and `--by fingerprint`. Sessions stored before have
        # none (their traits are unknown, not empty).
        """CREATE TABLE session_traits (
            session TEXT NOT NULL,
            behaviour TEXT,
            behaviour_text TEXT,
            ja4 TEXT,
            CONSTRAINT session_traits_key PRIMARY KEY (session)
        )""",
        "CREATE INDEX session_traits_ja4 ON session_traits (ja4)",
        "CREATE INDEX session_traits_behaviour ON session_traits (behaviour)",
        """CREATE TABLE session_extensions (
            session TEXT NOT NULL,
            extension TEXT NOT NULL,
            CONSTRAINT session_extensions_key PRIMARY KEY (session, extension)
        )""",
        "CREATE INDEX session_extensions_extension ON session_extensions (extension)",
    ),
)


AS_SENT = frozenset({"UTF8", "SQL_ASCII"})
"""PostgreSQL's encodings that take every character the store sends (UTF-8) as it is."""
CODECS = {
    "LATIN1": "iso8859_1", "LATIN2": "iso8859_2", "LATIN3": "iso8859_3", "LATIN4": "iso8859_4",
    "LATIN5": "iso8859_9", "LATIN6": "iso8859_10", "LATIN7": "iso8859_13",
    "LATIN8": "iso8859_14", "LATIN9": "iso8859_15", "LATIN10": "iso8859_16",
    "ISO_8859_5": "iso8859_5", "ISO_8859_6": "iso8859_6", "ISO_8859_7": "iso8859_7",
    "ISO_8859_8": "iso8859_8", "KOI8R": "koi8_r", "KOI8U": "koi8_u", "WIN866": "cp866",
    "WIN874": "cp874", "WIN1250": "cp1250", "WIN1251": "cp1251", "WIN1252": "cp1252",
    "WIN1253": "cp1253", "WIN1254": "cp1254", "WIN1255": "cp1255", "WIN1256": "cp1256",
    "WIN1257": "cp1257", "WIN1258": "cp1258", "EUC_CN": "gb2312",
}  # fmt: skip
"""PostgreSQL's server encodings (as `SHOW server_encoding` names them) and the Python codec that
encodes what each holds: none keeps a character PostgreSQL's own conversion from UTF-8 refuses
(tests/stats/test_store_encodings.py hands each codec's every character to the server). Not
here, so ASCII only: EUC_JP, EUC_JIS_2004 and EUC_KR, whose Python codecs encode characters
PostgreSQL refuses (`¥` and `‾` in EUC_JP; Hangul beyond KS X 1001's 2,350 syllables in EUC_KR,
which Python spells with a sequence of jamo), EUC_TW and MULE_INTERNAL (no Python codec), and
whatever a later PostgreSQL adds."""


def escaper(encoding: str) -> Callable[[str], str] | None:
    """What a text becomes for a PostgreSQL database in `encoding` (its server encoding): each
    character the encoding lacks written as an escape (`escapes.escaped`), the rest as it is;
    None for an encoding that takes every character (`AS_SENT`). An encoding not in `CODECS`
    keeps ASCII only."""
    if encoding in AS_SENT:
        return None
    codec = CODECS.get(encoding, "ascii")

    @functools.lru_cache(maxsize=4096)
    def holds(char: str) -> bool:
        try:
            char.encode(codec)
        except UnicodeEncodeError:
            return False
        return True

    def escape(text: str) -> str:
        if text.isascii():  # every server encoding holds ASCII
            return text
        try:
            text.encode(codec)
        except UnicodeError:  # a character the encoding lacks (or a lone surrogate)
            return "".join(c if holds(c) else escaped(c) for c in text)
        return text

    return escape


def _escaped(rows: Sequence[Sequence[Any]], escape: Callable[[str], str]) -> list[tuple[Any, ...]]:
    return [tuple(escape(v) if isinstance(v, str) else v for v in row) for row in rows]


class StoreError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Batch:
    sessions: Sequence[Sequence[Any]] = ()
    ids: Sequence[Sequence[Any]] = ()
    commands: Sequence[Sequence[Any]] = ()
    traits: Sequence[Sequence[Any]] = ()
    """`(session, behaviour, behaviour_text, ja4, extensions)`: a `session_traits` row and the
    session's `session_extensions` rows (`extensions` a list of names)."""

    def __len__(self) -> int:
        return len(self.sessions) + len(self.ids) + len(self.commands) + len(self.traits)


@dataclass(frozen=True, slots=True)
class Collision:
    """A session row not stored because another one, with other content, has its id."""

    session: str
    stored: str | None
    refused: str


def digest(row: Sequence[Any]) -> str:
    """What a session row says, in 32 hex digits: equal for a replay, different for a collision.

    Stored with the row and compared with a replay's, also one a later version spooled: the text
    hashed never changes (`json.dumps(list(row), separators=(",", ":"), ensure_ascii=False)`,
    with one encoder made once instead of one per call)."""
    return hashlib.sha256(_DIGEST_TEXT(list(row)).encode()).hexdigest()[:32]


_DIGEST_TEXT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class Store:
    """One connection, used from one thread at a time (the writer's, or a report's).

    `timeout` bounds how long SQLite waits for a lock another connection holds, and how long
    PostgreSQL may take to connect, in seconds.
    """

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        self.url = url
        self.postgres = url.startswith(("postgresql://", "postgres://"))
        self.timeout = timeout
        self._conn: Any = None
        self.encoding: str | None = None
        """PostgreSQL's database's encoding (`SHOW server_encoding`), once connected."""
        self.escape: Callable[[str], str] | None = None
        """What each text of a row written becomes (`escaper`), None if it goes as it is."""

    def connect(self) -> None:
        if self.postgres:
            try:
                import psycopg  # noqa: PLC0415 (only fleets need it installed)
            except ImportError:
                raise StoreError(
                    "a postgresql:// store needs: pip install 'psycopg[binary]'"
                ) from None
            try:
                self._conn = psycopg.connect(
                    self.url,
                    connect_timeout=max(1, round(self.timeout)),
                    # A store behind a dead network fails a write within about 20 s instead of
                    # TCP's many minutes; the writer then spools.
                    keepalives=1,
                    keepalives_idle=10,
                    keepalives_interval=3,
                    keepalives_count=3,
                    tcp_user_timeout=20_000,
                    # UTF-8 whatever the database's encoding: the server converts (a value
                    # its encoding lacks is escaped first: `escaper`), where the driver,
                    # encoding to a LATIN1 database's encoding itself, raised
                    # UnicodeEncodeError, taken for the store being away (the batch retried
                    # for ever, every later session behind it); and a SQL_ASCII database's
                    # text comes back as text, not bytes.
                    client_encoding="UTF8",
                )
            except psycopg.Error as exc:
                raise StoreError(f"cannot connect to the store: {exc}") from None
        else:
            path = Path(self.url.removeprefix("sqlite://"))
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(path, timeout=self.timeout, check_same_thread=False)
        try:
            if self.postgres:
                (self.encoding,) = self._conn.execute("SHOW server_encoding").fetchone()
                self.escape = escaper(self.encoding)
            else:
                self._wal()
                self._conn.execute("PRAGMA synchronous=NORMAL")
            self.migrate()
        except Exception:
            self.close()
            raise

    def _wal(self) -> None:
        """WAL mode, which a SQLite file keeps once set. Setting it takes the database for a
        moment, and SQLite answers `database is locked` at once (its busy timeout does not
        apply) when another instance starting at the same time holds it: try again, within
        the connect timeout."""
        conn = self._conn
        if conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
            return
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):  # a broken connection: nothing to do
                conn.close()

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.postgres else sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cur = self._conn.cursor()
        try:
            cur.execute(self._sql(sql), params)
            return list(cur.fetchall()) if cur.description else []
        finally:
            cur.close()

    def migrate(self) -> None:
        """Apply what has not run yet, one instance at a time, in one transaction."""
        conn = self._conn
        cur = conn.cursor()
        try:
            if self.postgres:
                # Held to the end of the transaction: a second proxy starting at the same time
                # waits here, then finds the schema made and has nothing to do.
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            else:
                cur.execute("BEGIN IMMEDIATE")
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            cur.execute("SELECT MAX(version) FROM schema_version")
            current = cur.fetchone()[0] or 0
            for number, statements in enumerate(MIGRATIONS, start=1):
                if number <= current:
                    continue
                for statement in statements:
                    cur.execute(statement)
                cur.execute(self._sql("INSERT INTO schema_version (version) VALUES (?)"), (number,))
            conn.commit()
        except Exception:
            conn.rollback()
            raise
        finally:
            cur.close()

    @property
    def version(self) -> int:
        return int(self.execute("SELECT MAX(version) FROM schema_version")[0][0] or 0)

    def write(self, batch: Batch) -> list[Collision]:
        """One transaction per batch; rows whose key is stored already are left as they are.

        Returns the session rows that were not stored because a different session has their id.
        """
        conn = self._conn
        cur = conn.cursor()
        try:
            if self.postgres:
                # A batch a busy database holds longer than this is spooled, not waited for.
                cur.execute(f"SET LOCAL statement_timeout = {round(WRITE_TIMEOUT * 1000)}")
            collisions: list[Collision] = []
            if batch.sessions:
                rows = [(*row, digest(row)) for row in batch.sessions]
                stored = self._many(cur, "sessions", (*SESSION_COLUMNS, "digest"), rows)
                if stored != len(rows):  # some ids were there: replays, or collisions
                    collisions = self._collisions(cur, rows)
            if batch.ids:
                self._many(cur, "id_exchanges", ID_COLUMNS, batch.ids)
            if batch.commands:
                self._many(cur, "command_counts", COMMAND_COLUMNS, batch.commands)
            if batch.traits:
                self._traits(cur, batch.traits, {c.session for c in collisions})
            conn.commit()
        except Exception:
            conn.rollback()
            raise
        finally:
            cur.close()
        return collisions

    def _traits(self, cur: Any, rows: Sequence[Sequence[Any]], collided: set[str]) -> None:
        kept = [row for row in rows if row[0] not in collided]
        self._many(cur, "session_traits", TRAITS_COLUMNS, [row[:4] for row in kept])
        extensions = [(row[0], name) for row in kept for name in row[4]]
        if extensions:
            self._many(cur, "session_extensions", EXTENSION_COLUMNS, extensions)

    def _many(
        self, cur: Any, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> int:
        """Insert `rows` (see `_insert`); returns how many were stored. SQLite takes them many
        to a statement: `executemany` steps once per row, and each step lets go of the
        interpreter lock and takes it back, which the event loop, holding it, must hand over
        (a few futex calls and a stall per row). PostgreSQL's driver batches on its own."""
        if self.postgres:
            if self.escape is not None:
                rows = _escaped(rows, self.escape)
            cur.executemany(self._sql(_insert(table, columns)), rows)
            return int(cur.rowcount)
        per = max(1, SQLITE_PARAMETERS // len(columns))
        stored = 0
        for at in range(0, len(rows), per):
            chunk = rows[at : at + per]
            cur.execute(_insert(table, columns, len(chunk)), [v for row in chunk for v in row])
            stored += cur.rowcount
        return stored

    def _collisions(self, cur: Any, rows: list[tuple[Any, ...]]) -> list[Collision]:
        escape = self.escape
        ids = [row[0] for row in (_escaped(rows, escape) if escape else rows)]  # as stored
        marks = ", ".join("?" * len(ids))
        query = f"SELECT session, digest FROM sessions WHERE session IN ({marks})"  # noqa: S608
        cur.execute(self._sql(query), ids)
        stored = dict(cur.fetchall())
        return [
            Collision(row[0], stored.get(id_), row[-1])
            for row, id_ in zip(rows, ids, strict=True)
            if stored.get(id_) != row[-1]
        ]

    def refuses(self, exc: BaseException) -> bool:
        """Whether `exc` is about the rows (the store refused their content), not the store."""
        if self.postgres:
            import psycopg  # noqa: PLC0415

            return isinstance(exc, psycopg.DataError | psycopg.IntegrityError)
        return isinstance(exc, sqlite3.DataError | sqlite3.IntegrityError | sqlite3.InterfaceError)

    def purge(self, before: str) -> int:
        """Delete what ended before `before` (ISO time); returns sessions removed."""
        try:
            old = self.execute("SELECT session FROM sessions WHERE ended_at < ?", (before,))
            for table in ("command_counts", "session_traits", "session_extensions"):
                self.execute(
                    f"DELETE FROM {table} WHERE session IN "  # noqa: S608 (fixed names)
                    "(SELECT session FROM sessions WHERE ended_at < ?)",
                    (before,),
                )
            self.execute("DELETE FROM id_exchanges WHERE at < ?", (before,))
            self.execute("DELETE FROM sessions WHERE ended_at < ?", (before,))
            self._conn.commit()
        except Exception:
            self._conn.rollback()
            raise
        return len(old)

    def rows(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        return self.execute(sql, tuple(params))


SQLITE_PARAMETERS = 999
"""Parameters one SQLite statement takes at most (the oldest builds' limit; 3.32+ take 32,766)."""


def _insert(table: str, columns: Sequence[str], rows: int = 1) -> str:
    """An insert of `rows` rows that leaves a row whose key is already stored as it is (both
    databases)."""
    values = ", ".join([f"({', '.join('?' * len(columns))})"] * rows)
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES {values}"  # noqa: S608 (fixed names)
        " ON CONFLICT DO NOTHING"
    )
