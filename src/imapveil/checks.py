"""`imapveil check-config --online`: what a configuration needs from the network and the store.

Offline checking (the default, and what the unit runs before every start) must not fail because
of a DNS or database blip at boot; `--online` asks: does the upstream resolve, does the store
open? It never creates anything: a SQLite store that does not exist yet is reported as such, an
existing one is opened read-only (a root shell must not leave root-owned files in the service's
state directory, which would lock the service out).
"""

from __future__ import annotations

import os
import socket
import sqlite3
from pathlib import Path

from imapveil.config import ConfigError, Settings
from imapveil.stats.store import Store, StoreError
from imapveil.stats.store import redact as redact_url


def redact(url: str) -> str:
    """A store URL without its password."""
    return redact_url(url)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (drivers' messages may span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def online(settings: Settings) -> list[str]:
    """One line per thing checked; ConfigError for the first that fails."""
    return [resolve_upstream(settings), open_store(settings)]


def resolve_upstream(settings: Settings) -> str:
    upstream = settings.upstream
    assert upstream is not None
    try:
        found = socket.getaddrinfo(upstream.host, upstream.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(f"upstream {upstream}: does not resolve: {exc.strerror or exc}") from None
    addresses = sorted({str(info[4][0]) for info in found})
    return f"upstream {upstream} resolves to {', '.join(addresses)}"


def open_store(settings: Settings) -> str:
    url = settings.store_url()
    if url is None:
        return "statistics store: off"
    if url.startswith(("postgresql://", "postgres://")):
        store = Store(url, timeout=5.0)
        try:
            store.connect()
            version = store.version
        except StoreError as exc:
            raise ConfigError(f"store {redact(url)}: {exc}") from None
        except Exception as exc:
            raise ConfigError(f"store {redact(url)}: {one_line(exc)}") from None
        finally:
            store.close()
        return f"statistics store {redact(url)}: connected, schema version {version}"
    path = Path(url.removeprefix("sqlite://"))
    if not path.exists():
        parent = path.parent
        if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"store {path}: directory {parent} is not writable")
        return f"statistics store {path}: not there yet, serve creates it"
    try:
        # immutable: no lock, no -wal or -shm file left behind (owned by root, they would lock
        # the service out of its own database).
        uri = f"{path.resolve().as_uri()}?mode=ro&immutable=1"
        conn = sqlite3.connect(uri, uri=True, timeout=5.0)
        try:
            tables = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
            version = 0
            if ("schema_version",) in tables:
                version = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise ConfigError(f"store {path}: not a usable SQLite database: {exc}") from None
    return f"statistics store {path}: SQLite, schema version {version or 0}"
