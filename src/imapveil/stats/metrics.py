"""Prometheus metrics and a health check, over plain HTTP.

The exposition is `prometheus_client`'s (the text format Prometheus negotiates, OpenMetrics when
it asks for it): counters are exact (every significant digit: 20002235 octets print as
`2.0002235e+07`, as Prometheus's own clients write them, never rounded), typed as counters or
gauges as they behave. Besides imapveil's own there are the usual `process_*` metrics and
`imapveil_build_info{version=...} 1`.

Label values are bounded whatever clients send: verbs outside the IMAP command set, client
families outside the identification table, and ID field names outside the well-known ones are
counted as "other".
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from imapveil import __version__
from imapveil.records import (
    CommandCompleted,
    IdExchange,
    Record,
    SessionEnded,
    Violation,
)
from imapveil.relay.server import serve_each
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


Read = Callable[[], float]


def _nothing() -> None:
    pass


class Metrics:
    """imapveil's metrics, the process's and the build's, in one registry of their own."""

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self.sessions: Counter[str] = Counter()
        self.commands: Counter[tuple[str, str]] = Counter()
        self.bytes: Counter[str] = Counter()
        self.ids: Counter[str] = Counter()
        self.dropped_fields: Counter[str] = Counter()
        self.violations: Counter[str] = Counter()
        self.gauges: dict[str, tuple[str, Read]] = {}
        """Values that go up and down, read at each scrape: name -> (help, read)."""
        self.counters: dict[str, tuple[str, Read]] = {}
        """Totals kept elsewhere (they only grow), read at each scrape: name (without
        `_total`) -> (help, read)."""
        self.store: StoreSink | None = None
        """The statistics writer whose queue, spool and outcomes are exposed (`watch_store`)."""
        self.refresh: Callable[[], None] = _nothing
        """Called before each collection: hands over records held for delivery in batches
        (`sinks.Fanout.deliver`), so that a scrape counts every record made before it."""
        self.registry = CollectorRegistry()
        self.registry.register(self)
        self.registry.register(ProcessCollector(proc))

    def gauge(self, name: str, text: str, read: Read) -> None:
        self.gauges[name] = (text, read)

    def counter(self, name: str, text: str, read: Read) -> None:
        self.counters[name] = (text, read)

    def watch_store(self, store: StoreSink) -> None:
        self.store = store

    def emit(self, record: Record, when: float | None = None) -> None:
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
        """The Prometheus text format (0.0.4), as a scrape without an Accept header gets it."""
        return generate_latest(self.registry).decode()

    def collect(self) -> Iterator[Metric]:
        """For the registry: every imapveil_* family, as it is now."""
        self.refresh()
        build = GaugeMetricFamily(
            "imapveil_build_info", "The imapveil version running", labels=["version"]
        )
        build.add_metric([__version__], 1)
        yield build
        for name, (text, read) in self.gauges.items():
            yield GaugeMetricFamily(f"imapveil_{name}", text, value=read())
        for name, (text, read) in self.counters.items():
            yield CounterMetricFamily(f"imapveil_{name}", text, value=read())
        yield _counter("sessions", "Sessions ended, by how they ended", ["reason"],
                       {(k,): v for k, v in self.sessions.items()})  # fmt: skip
        yield _counter("commands", "Commands, by verb and status", ["verb", "status"],
                       {(v, s): n for (v, s), n in self.commands.items()})  # fmt: skip
        yield _counter("bytes", "Octets relayed, by direction", ["direction"],
                       {(k,): v for k, v in self.bytes.items()})  # fmt: skip
        yield _counter("id_exchanges", "ID exchanges, by client family", ["family"],
                       {(k,): v for k, v in self.ids.items()})  # fmt: skip
        yield _counter("id_fields_dropped", "ID fields the policy kept from the server",
                       ["field"], {(k,): v for k, v in self.dropped_fields.items()})  # fmt: skip
        yield _counter("violations", "Protocol violations, by kind", ["kind"],
                       {(k,): v for k, v in self.violations.items()})  # fmt: skip
        if self.store is not None:
            yield from _store_families(self.store)


def _store_families(store: StoreSink) -> Iterator[Metric]:
    yield GaugeMetricFamily("imapveil_store_up", "1 while the statistics store takes rows",
                            value=int(store.connected))  # fmt: skip
    yield GaugeMetricFamily("imapveil_store_queue_depth", "Statistics rows waiting in memory",
                            value=store.depth)  # fmt: skip
    yield GaugeMetricFamily("imapveil_store_spool_bytes",
                            "Octets in the statistics spool on local disk",
                            value=store.spool_bytes)  # fmt: skip
    yield _counter(
        "store_sessions",
        "Statistics session rows: written (from memory), spooled (to local disk), "
        "replayed (from the spool into the store), dropped (lost)",
        ["outcome"],
        {(k,): v.sessions for k, v in store.counts.items()},
    )
    yield _counter(
        "store_items",
        "Statistics rows of every kind (sessions, ID exchanges, command counts, session traits), "
        "by outcome",
        ["outcome"],
        {(k,): v.items for k, v in store.counts.items()},
    )
    yield CounterMetricFamily("imapveil_store_collisions",
                              "Session rows not stored because another session had their id",
                              value=store.collisions)  # fmt: skip


def _counter(
    name: str, text: str, labels: Sequence[str], samples: Mapping[tuple[str, ...], int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(f"imapveil_{name}", text, labels=labels)
    for values, value in samples.items():
        family.add_metric(list(values), value)
    return family


class ProcessCollector:
    """process_cpu_seconds_total, process_resident_memory_bytes, process_virtual_memory_bytes,
    process_open_fds, process_max_fds and process_start_time_seconds, from /proc/self.

    prometheus_client's own collector needs the boot time from /proc/stat, which the shipped unit
    hides (`ProcSubset=pid`): it then reports nothing at all. Here the boot time comes from
    /proc/stat where it can be read, else from the clock (CLOCK_BOOTTIME counts from boot).
    """

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self.proc = proc
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.page = os.sysconf("SC_PAGE_SIZE")

    def boot_time(self) -> float:
        try:
            with (self.proc / "stat").open("rb") as stat:
                for line in stat:
                    if line.startswith(b"btime "):
                        return float(line.split()[1])
        except OSError:
            pass
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)

    def collect(self) -> Iterator[Metric]:
        me = self.proc / "self"
        try:
            # Fields after the command name, which is in parentheses and may hold anything.
            fields = (me / "stat").read_bytes().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            fields = []
        if len(fields) > 21:
            cpu = (int(fields[11]) + int(fields[12])) / self.ticks
            yield CounterMetricFamily("process_cpu_seconds", "User and system CPU time, seconds",
                                      value=cpu)  # fmt: skip
            yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory size",
                                    value=int(fields[21]) * self.page)  # fmt: skip
            yield GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory size",
                                    value=int(fields[20]))  # fmt: skip
            yield GaugeMetricFamily(
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch, seconds",
                value=round(self.boot_time() + int(fields[19]) / self.ticks, 2),
            )
        try:
            open_fds = len(os.listdir(me / "fd"))
        except OSError:
            pass
        else:
            yield GaugeMetricFamily("process_open_fds", "Open file descriptors", value=open_fds)
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if limit != resource.RLIM_INFINITY:
            yield GaugeMetricFamily("process_max_fds", "The limit of open file descriptors",
                                    value=limit)  # fmt: skip


SCRAPES_AT_ONCE = 16
"""Connections to the metrics port served at a time; one more is closed as soon as it is
accepted. Each holds a descriptor until it is answered or `SCRAPE_WITHIN` has passed: without a
limit, connections held open there could take every descriptor the process may have, and the
mail listeners could accept nobody."""
SCRAPE_WITHIN = 5.0
"""Seconds a connection to the metrics port has to send its request and take the answer."""


async def serve_metrics(
    metrics: Metrics,
    listeners: list[trio.SocketListener],
    health: Callable[[], tuple[bool, str]],
) -> None:
    """Serve `/metrics` and `/healthz`. `health` says whether the proxy serves sessions and, in
    one line, anything an operator should know (the body: `ok`, `ok; …`, or why not)."""

    serving = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal serving
        if serving >= SCRAPES_AT_ONCE:
            await trio.aclose_forcefully(stream)  # its descriptor back at once
            return
        serving += 1
        try:
            with trio.move_on_after(SCRAPE_WITHIN):
                request = b""
                while b"\r\n\r\n" not in request and len(request) < 8192:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    request += chunk
                path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
                if path == b"/metrics":
                    encode, content_type = _encoder(_header(request, b"accept"))
                    status, body = b"200 OK", encode(metrics.registry)
                    kind = content_type.encode()
                elif path == b"/healthz":
                    ok, detail = health()
                    status = b"200 OK" if ok else b"503 Service Unavailable"
                    body, kind = detail.encode() + b"\n", b"text/plain"
                else:
                    status, body, kind = b"404 Not Found", b"not found\n", b"text/plain"
                await stream.send_all(
                    b"HTTP/1.1 " + status + b"\r\nContent-Type: " + kind
                    + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
                )  # fmt: skip
        except (trio.BrokenResourceError, OSError):
            pass
        except Exception:
            # A bug (a gauge's reading, a library's): this scrape fails, nothing else does.
            log.exception("a metrics scrape failed")
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await stream.send_all(
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n"
                    b"Content-Length: 6\r\nConnection: close\r\n\r\nerror\n"
                )
        finally:
            serving -= 1
            await trio.aclose_forcefully(stream)

    await serve_each(handle, listeners)  # the handler closes each stream


def _encoder(accept: str) -> tuple[Callable[[CollectorRegistry], bytes], str]:
    """The format the scraper asks for; the default text format when prometheus_client cannot
    read its Accept header (`choose_encoder` raises TypeError on a version such as `1.x`)."""
    try:
        return choose_encoder(accept)
    except (TypeError, ValueError):
        return choose_encoder("")


def _header(request: bytes, name: bytes) -> str:
    """A request header's value ("" if absent), as text."""
    for line in request.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name:
            return value.strip().decode("latin-1")
    return ""
