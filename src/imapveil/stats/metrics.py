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
import math
import os
import re
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


FD_COUNT_EVERY = 10.0
"""Seconds between two listings of /proc/self/fd, where its size does not say the count."""


def _counted_by_size(fd: Path) -> int:
    """The number of open descriptors as the size of /proc/PID/fd (Linux 6.2 on), else 0. Only
    procfs says it so: a directory elsewhere (a test's stand-in) has a size of its own."""
    if not str(fd).startswith("/proc/"):
        return 0
    return os.stat(fd).st_size


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
        self._fds: int | None = None  # the last listing's count, and when it was made
        self._fds_at = -math.inf

    def open_fds(self) -> int | None:
        """Open descriptors: the size of /proc/self/fd where the kernel puts the count there
        (Linux 6.2 on: one stat), else a listing, made at most every `FD_COUNT_EVERY` seconds:
        a listing costs some 2 us a descriptor (39 ms at 10,000 sessions), in the event loop."""
        fd = self.proc / "self" / "fd"
        try:
            counted = _counted_by_size(fd)
            if counted > 0:
                return counted
            now = time.monotonic()
            if self._fds is None or now - self._fds_at >= FD_COUNT_EVERY:
                self._fds, self._fds_at = len(os.listdir(fd)), now
        except OSError:
            return None
        return self._fds

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
        open_fds = self.open_fds()
        if open_fds is not None:
            yield GaugeMetricFamily("process_open_fds", "Open file descriptors", value=open_fds)
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if limit != resource.RLIM_INFINITY:
            yield GaugeMetricFamily("process_max_fds", "The limit of open file descriptors",
                                    value=limit)  # fmt: skip


SCRAPES_AT_ONCE = 16
"""Connections to the metrics port served at a time. Each holds a descriptor until it is
answered or its time is up: without a limit, connections held open there could take every
descriptor the process may have, and the mail listeners could accept nobody. When all are
taken, a new connection closes the oldest that has not sent its whole request (as nginx reuses
its oldest idle connections): a scraper sends its request at once, so a flood of connections
that send nothing, or a byte at a time, cannot keep it out. When every one is being answered,
the new one gets a 503."""
REQUEST_WITHIN = 2.0
"""Seconds a connection to the metrics port has to send its whole request head (nginx's
`client_header_timeout`, Go's `ReadHeaderTimeout`)."""
SCRAPE_WITHIN = 5.0
"""Seconds a connection to the metrics port has in all, to send its request and take the
answer."""
STUCK = 1.0
"""Seconds after which a connection whose answer is still being sent (its client does not
read) may be closed for a new one, when no connection is left that is still sending."""
MAX_REQUEST = 8192
"""Octets of a request head at most (the request line and the headers); beyond, 414 or 431."""
ALLOW = b"GET, HEAD, OPTIONS"
_END_OF_HEAD = re.compile(rb"\n\r?\n")
_TARGET = re.compile(rb"[!-~]+")  # printable ASCII, no space: no control or 8-bit octet
_VERSION = re.compile(rb"HTTP/1\.[0-9]")


class _Slot:
    """One connection being served: when it came, whether its answer is being sent, and how to
    close it."""

    __slots__ = ("answering", "scope", "since")

    def __init__(self, scope: trio.CancelScope) -> None:
        self.since = trio.current_time()
        self.answering = False
        self.scope = scope


class _Refused(Exception):
    """A request answered with an error status (`status`), not served."""

    def __init__(self, status: bytes) -> None:
        super().__init__(status.decode())
        self.status = status


async def serve_metrics(
    metrics: Metrics,
    listeners: list[trio.SocketListener],
    health: Callable[[], tuple[bool, str]],
) -> None:
    """Serve `/metrics` and `/healthz`. `health` says whether the proxy serves sessions and, in
    one line, anything an operator should know (the body: `ok`, `ok; …`, or why not).

    HTTP/1.0 and 1.1, one request per connection (`Connection: close`; a pipelined second one is
    not read): GET, HEAD (GET's headers, no body) and OPTIONS; lines may end in LF alone, as most
    servers read them; a query is ignored; the head is bounded (`MAX_REQUEST`). Nothing here is
    logged but a failure of imapveil's own: a client cannot flood the log from this port."""

    slots: list[_Slot] = []
    overflow = 0  # connections beyond the slots being told 503

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal overflow
        live = sum(not s.scope.cancel_called for s in slots)  # not closed for another
        if live >= SCRAPES_AT_ONCE and not _make_room(slots):
            if overflow >= SCRAPES_AT_ONCE:
                await trio.aclose_forcefully(stream)  # its descriptor back at once
                return
            overflow += 1
            try:
                with trio.move_on_after(STUCK):
                    await _answer(stream, b"503 Service Unavailable", b"busy\n")
            except (trio.BrokenResourceError, OSError):
                pass
            finally:
                overflow -= 1
                await trio.aclose_forcefully(stream)
            return
        with trio.CancelScope(deadline=trio.current_time() + SCRAPE_WITHIN) as scope:
            slot = _Slot(scope)
            slots.append(slot)
            try:
                await _serve_one(stream, slot, metrics, health)
            finally:
                slots.remove(slot)
                await trio.aclose_forcefully(stream)

    await serve_each(handle, listeners)  # the handler closes each stream


def _make_room(slots: list[_Slot]) -> bool:
    """Close the connection that has waited longest for its request (else one whose answer has
    been stuck for `STUCK`); False if none may be closed."""
    reading = [s for s in slots if not s.answering and not s.scope.cancel_called]
    if not reading:
        stuck = trio.current_time() - STUCK
        reading = [s for s in slots if s.since < stuck and not s.scope.cancel_called]
    if not reading:
        return False
    min(reading, key=lambda s: s.since).scope.cancel()
    return True


async def _serve_one(
    stream: trio.SocketStream,
    slot: _Slot,
    metrics: Metrics,
    health: Callable[[], tuple[bool, str]],
) -> None:
    try:
        try:
            with trio.fail_after(REQUEST_WITHIN):
                head = await _read_head(stream)
            if head is None:
                return  # closed before its request ended
            method, path, headers = _parse(head)
        except _Refused as refused:
            slot.answering = True
            await _answer(stream, refused.status, b"")
            return
        except trio.TooSlowError:
            return
        slot.answering = True
        extra = b""
        if method == b"OPTIONS":
            status, body, kind, extra = b"200 OK", b"", b"", b"Allow: " + ALLOW + b"\r\n"
        elif path == b"/metrics":
            encode, content_type = _encoder(_header(headers, b"accept"))
            status, body = b"200 OK", encode(metrics.registry)
            kind = content_type.encode()
        elif path == b"/healthz":
            ok, detail = health()
            status = b"200 OK" if ok else b"503 Service Unavailable"
            body, kind = detail.encode() + b"\n", b"text/plain"
        else:
            status, body, kind = b"404 Not Found", b"not found\n", b"text/plain"
        await _answer(stream, status, body, kind, extra, send_body=method != b"HEAD")
    except (trio.BrokenResourceError, OSError):
        pass
    except Exception:
        # A bug (a gauge's reading, a library's): this scrape fails, nothing else does.
        log.exception("a metrics scrape failed")
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await _answer(stream, b"500 Internal Server Error", b"error\n")


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    """The request line and headers, up to the empty line (CRLF or LF); None at an EOF before
    it. Raises _Refused past `MAX_REQUEST` octets."""
    request = b""
    while True:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return None
        searched = max(0, len(request) - 2)  # the end may straddle two chunks
        request += chunk
        end = _END_OF_HEAD.search(request, searched)
        if end is not None and end.start() < MAX_REQUEST:
            return request[: end.start()]
        if len(request) >= MAX_REQUEST:
            line_ended = b"\n" in request[:MAX_REQUEST]
            raise _Refused(
                b"431 Request Header Fields Too Large" if line_ended else b"414 URI Too Long"
            )


def _parse(head: bytes) -> tuple[bytes, bytes, list[bytes]]:
    """(method, path, header lines) of a request head; raises _Refused for what is no
    HTTP/1.x request, or a method other than GET, HEAD and OPTIONS."""
    line, *headers = [h.removesuffix(b"\r") for h in head.split(b"\n")]
    parts = line.split(b" ")
    if len(parts) != 3 or not _VERSION.fullmatch(parts[2]) or not _TARGET.fullmatch(parts[1]):
        raise _Refused(b"400 Bad Request")
    method, target, _ = parts
    if method not in (b"GET", b"HEAD", b"OPTIONS"):
        raise _Refused(b"405 Method Not Allowed")
    if target.startswith((b"http://", b"https://")):  # the absolute form (RFC 9112 §3.2.2)
        target = b"/" + target.split(b"/", 3)[3] if target.count(b"/") >= 3 else b"/"
    elif not target.startswith(b"/") and not (method == b"OPTIONS" and target == b"*"):
        raise _Refused(b"400 Bad Request")
    return method, target.split(b"?", 1)[0], headers


async def _answer(
    stream: trio.SocketStream,
    status: bytes,
    body: bytes,
    kind: bytes = b"text/plain",
    extra: bytes = b"",
    *,
    send_body: bool = True,
) -> None:
    if status.startswith(b"405"):
        extra += b"Allow: " + ALLOW + b"\r\n"
    typed = b"Content-Type: " + kind + b"\r\n" if kind else b""
    await stream.send_all(
        b"HTTP/1.1 " + status + b"\r\n" + typed + extra
        + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        + (body if send_body else b"")
    )  # fmt: skip


def _encoder(accept: str) -> tuple[Callable[[CollectorRegistry], bytes], str]:
    """The format the scraper asks for; the default text format when prometheus_client cannot
    read its Accept header (`choose_encoder` raises TypeError on a version such as `1.x`)."""
    try:
        return choose_encoder(accept)
    except (TypeError, ValueError):
        return choose_encoder("")


def _header(headers: list[bytes], name: bytes) -> str:
    """A request header's value ("" if absent), as text."""
    for line in headers:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name:
            return value.strip().decode("latin-1")
    return ""
