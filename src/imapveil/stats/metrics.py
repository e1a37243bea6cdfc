"""Prometheus metrics (text exposition format 0.0.4) and a health check, over plain HTTP.

Label values are bounded whatever clients send: verbs outside the IMAP command set, client
families outside the identification table, and ID field names outside the well-known ones are
counted as "other".
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from imapveil.records import (
    CommandCompleted,
    IdExchange,
    Record,
    SessionEnded,
    Violation,
)
from imapveil.stats.identify import NO_ID, identify, load_table

if TYPE_CHECKING:
    from imapveil.stats.sink import StoreSink

log = logging.getLogger(__name__)

VERBS = frozenset(
    """APPEND AUTHENTICATE CAPABILITY CHECK CLOSE COMPRESS COPY CREATE DELETE ENABLE EXAMINE
    EXPUNGE FETCH GETQUOTA GETQUOTAROOT ID IDLE LIST LOGIN LOGOUT LSUB MOVE NAMESPACE NOOP
    RENAME SEARCH SELECT SETQUOTA SORT STARTTLS STATUS STORE SUBSCRIBE THREAD UNSELECT
    UNSUBSCRIBE XLIST GETMETADATA SETMETADATA""".split()  # noqa: SIM905
)
FIELDS = frozenset(
    """name version os os-version vendor support-url address date command arguments
    environment x-originating-ip x-originating-port x-connected-ip x-connected-port
    x-session-id x-session-ext-id x-forward x-proxy-ttl x-multiplex guid aguid""".split()  # noqa: SIM905
)
FAMILIES = frozenset({r.family for r in load_table()} | {NO_ID})


def _verb(verb: str) -> str:
    base = verb.removeprefix("UID ")
    return verb if base in VERBS else "other"


class Metrics:
    def __init__(self) -> None:
        self.sessions: Counter[str] = Counter()
        self.commands: Counter[tuple[str, str]] = Counter()
        self.bytes: Counter[str] = Counter()
        self.ids: Counter[str] = Counter()
        self.dropped_fields: Counter[str] = Counter()
        self.violations: Counter[str] = Counter()
        self.gauges: dict[str, Callable[[], float]] = {}
        self.store: StoreSink | None = None
        """The statistics writer whose queue, spool and outcomes are exposed (`watch_store`)."""

    def watch_store(self, store: StoreSink) -> None:
        self.store = store

    def emit(self, record: Record) -> None:
        if isinstance(record, SessionEnded):
            self.sessions[record.reason] += 1
            self.bytes["from_client"] += record.bytes_from_client
            self.bytes["from_server"] += record.bytes_from_server
        elif isinstance(record, CommandCompleted):
            self.commands[(_verb(record.verb), record.status or "none")] += 1
        elif isinstance(record, IdExchange):
            if not record.injected:
                family = identify(record.client).family
                self.ids[family if family in FAMILIES else "other"] += 1
            for name in record.dropped:
                self.dropped_fields[name if name in FIELDS else "other"] += 1
        elif isinstance(record, Violation):
            self.violations[record.kind] += 1

    def exposition(self) -> str:
        out: list[str] = []

        def family(name: str, kind: str, text: str, samples: dict[str, float]) -> None:
            out.append(f"# HELP imapveil_{name} {text}")
            out.append(f"# TYPE imapveil_{name} {kind}")
            for labels, value in samples.items():
                out.append(f"imapveil_{name}{labels} {value:g}")

        for name, read in self.gauges.items():
            family(name, "gauge", name.replace("_", " "), {"": read()})
        family(
            "sessions_total",
            "counter",
            "Sessions ended, by how they ended",
            {_labels(reason=k): v for k, v in self.sessions.items()},
        )
        family(
            "commands_total",
            "counter",
            "Commands, by verb and status",
            {_labels(verb=v, status=s): n for (v, s), n in self.commands.items()},
        )
        family(
            "bytes_total",
            "counter",
            "Octets relayed, by direction",
            {_labels(direction=k): v for k, v in self.bytes.items()},
        )
        family(
            "id_exchanges_total",
            "counter",
            "ID exchanges, by client family",
            {_labels(family=k): v for k, v in self.ids.items()},
        )
        family(
            "id_fields_dropped_total",
            "counter",
            "ID fields the policy kept from the server",
            {_labels(field=k): v for k, v in self.dropped_fields.items()},
        )
        family("violations_total", "counter", "Protocol violations, by kind",
               {_labels(kind=k): v for k, v in self.violations.items()})  # fmt: skip
        if self.store is not None:
            self._store_families(self.store, family)
        return "\n".join(out) + "\n"

    @staticmethod
    def _store_families(
        store: StoreSink, family: Callable[[str, str, str, dict[str, float]], None]
    ) -> None:
        family("store_up", "gauge", "1 while the statistics store takes rows",
               {"": float(store.connected)})  # fmt: skip
        family("store_queue_depth", "gauge", "Statistics rows waiting in memory",
               {"": float(store.depth)})  # fmt: skip
        family("store_spool_bytes", "gauge", "Octets in the statistics spool on local disk",
               {"": float(store.spool_bytes)})  # fmt: skip
        family(
            "store_sessions_total",
            "counter",
            "Statistics session rows: written (from memory), spooled (to local disk), "
            "replayed (from the spool into the store), dropped (lost)",
            {_labels(outcome=k): v.sessions for k, v in store.counts.items()},
        )
        family(
            "store_items_total",
            "counter",
            "Statistics rows of every kind (sessions, ID exchanges, command counts), by outcome",
            {_labels(outcome=k): v.items for k, v in store.counts.items()},
        )
        family("store_collisions_total", "counter",
               "Session rows not stored because another session had their id",
               {"": float(store.collisions)})  # fmt: skip


def _labels(**labels: str) -> str:
    body = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in labels.items()
    )
    return "{" + body + "}"


async def serve_metrics(
    metrics: Metrics,
    listeners: list[trio.SocketListener],
    healthy: Callable[[], bool],
) -> None:
    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(5):
                request = b""
                while b"\r\n\r\n" not in request and len(request) < 8192:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    request += chunk
                path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
                if path == b"/metrics":
                    status, body = b"200 OK", metrics.exposition().encode()
                    kind = b"text/plain; version=0.0.4; charset=utf-8"
                elif path == b"/healthz":
                    ok = healthy()
                    status = b"200 OK" if ok else b"503 Service Unavailable"
                    body, kind = (b"ok\n" if ok else b"unhealthy\n"), b"text/plain"
                else:
                    status, body, kind = b"404 Not Found", b"not found\n", b"text/plain"
                await stream.send_all(
                    b"HTTP/1.1 " + status + b"\r\nContent-Type: " + kind
                    + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
                )  # fmt: skip
        except (trio.BrokenResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(handle, listeners)
