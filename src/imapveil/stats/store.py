"""The statistics store: SQLite (default, stdlib) or PostgreSQL (a fleet of proxies), one schema.

Schema changes are forward migrations, applied in order at start; `schema_version` says which
have run. Timestamps are ISO 8601 UTC strings (they sort as text on both databases). Only what
the policy let records keep is stored: pseudonymous users, client names and versions, counts.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
        """CREATE TABLE id_exchanges (
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
        )""",
        "CREATE INDEX id_exchanges_at ON id_exchanges (at)",
        """CREATE TABLE command_counts (
            session TEXT NOT NULL,
            verb TEXT NOT NULL,
            status TEXT NOT NULL,
            count INTEGER NOT NULL
        )""",
        "CREATE INDEX command_counts_session ON command_counts (session)",
    ),
)


class StoreError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Batch:
    sessions: Sequence[tuple[Any, ...]] = ()
    ids: Sequence[tuple[Any, ...]] = ()
    commands: Sequence[tuple[Any, ...]] = ()


class Store:
    """One connection, used from one thread at a time (the writer's, or a report's)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.postgres = url.startswith(("postgresql://", "postgres://"))
        self._conn: Any = None

    def connect(self) -> None:
        if self.postgres:
            try:
                import psycopg  # noqa: PLC0415 (only fleets need it installed)
            except ImportError:
                raise StoreError(
                    "a postgresql:// store needs: pip install 'psycopg[binary]'"
                ) from None
            try:
                self._conn = psycopg.connect(self.url, connect_timeout=5)
            except psycopg.Error as exc:
                raise StoreError(f"cannot connect to the store: {exc}") from None
        else:
            path = Path(self.url.removeprefix("sqlite://"))
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(path, timeout=10, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
        self.migrate()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

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
        conn = self._conn
        cur = conn.cursor()
        try:
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
        finally:
            cur.close()

    @property
    def version(self) -> int:
        return int(self.execute("SELECT MAX(version) FROM schema_version")[0][0] or 0)

    def write(self, batch: Batch) -> None:
        """One transaction per batch."""
        conn = self._conn
        cur = conn.cursor()
        try:
            if batch.sessions:
                cur.executemany(
                    self._sql(_insert("sessions", 16) + " ON CONFLICT (session) DO NOTHING"),
                    batch.sessions,
                )
            if batch.ids:
                cur.executemany(
                    self._sql(_insert("id_exchanges", 16)),
                    batch.ids,
                )
            if batch.commands:
                cur.executemany(self._sql(_insert("command_counts", 4)), batch.commands)
            conn.commit()
        except Exception:
            conn.rollback()
            raise
        finally:
            cur.close()

    def purge(self, before: str) -> int:
        """Delete what ended before `before` (ISO time); returns sessions removed."""
        old = self.execute("SELECT session FROM sessions WHERE ended_at < ?", (before,))
        self.execute(
            "DELETE FROM command_counts WHERE session IN "
            "(SELECT session FROM sessions WHERE ended_at < ?)",
            (before,),
        )
        self.execute("DELETE FROM id_exchanges WHERE at < ?", (before,))
        self.execute("DELETE FROM sessions WHERE ended_at < ?", (before,))
        self._conn.commit()
        return len(old)

    def rows(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        return self.execute(sql, tuple(params))


def _insert(table: str, columns: int) -> str:
    return f"INSERT INTO {table} VALUES ({', '.join('?' * columns)})"  # noqa: S608 (fixed names)
