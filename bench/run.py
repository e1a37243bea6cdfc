"""imapveil beside a direct connection to the same Dovecot, measured in one run.

    python bench/run.py            # the quick set (a few minutes)
    python bench/run.py --full     # 10 s runs and 10,000 idle sessions
    python bench/run.py --json results.json

It starts its own Dovecot on loopback (seeded mailboxes, limits raised for many sessions), its
own `imapveil serve` (with the event log and the statistics store on, as in production) and the
naive relay (bench/naive_relay.py: trio copying bytes, parsing nothing), runs every workload
against Dovecot directly, through imapveil and through the naive relay, in rotating order, for
several rounds, prints medians and min-max, and stops them all. Besides throughput and latency
it reports what each relay process costs: CPU (user + system) per NOOP round trip, per GB of
bulk, per churned session and per IDLE session set up, and memory per IDLE session. The machine
is shared and noisy: compare within one run, and prefer the CPU figures, which load disturbs
least, to the wall-clock ones.

The rows "TLS both legs" go through a second `imapveil serve` whose upstream is Dovecot's imaps
port (implicit TLS, Dovecot's certificate verified): it decrypts the client's TLS and encrypts
again toward Dovecot, as direct has TLS on its one connection. The naive relay speaks no TLS.

The idle workloads (plain, and TLS on the client leg: imapveil's implicit TLS listener beside
Dovecot's imaps port) hold N sessions in IDLE, each its own user, then deliver one message to
every mailbox and time until every session has seen its EXISTS. Each measurement starts its own
relay process, so KiB/session (PSS growth over N) is not hidden by memory an earlier workload
freed; `--profile` covers the shared relay of the other workloads only. Dovecot serves 100
sessions per imap process (`dovecot_limits`). A relay holds two sockets a session: where the
open-files limit cannot be raised far enough, N is lowered to what fits, and said.

    python bench/run.py --only idle --rounds 3 --idle-sessions 10000
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import os
import platform
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import trustme

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers.dovecot import Dovecot, free_port, stop_group

Address = tuple[str, int]
USERS = {f"u{i}": "pw" for i in range(20)}
TICK = os.sysconf("SC_CLK_TCK")


# --- A small IMAP client on trio: enough to drive workloads, fast enough not to be the limit.


class Imap:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.tag = 0

    @classmethod
    async def connect(
        cls, address: Address, tls: ssl.SSLContext | None = None, source: str | None = None
    ) -> Imap:
        stream: trio.abc.Stream = await trio.open_tcp_stream(*address, local_address=source)
        if tls is not None:
            stream = trio.SSLStream(stream, tls, server_hostname="127.0.0.1")
        client = cls(stream)
        await client.line()
        return client

    async def _more(self) -> None:
        chunk = await self.stream.receive_some(1 << 18)
        if not chunk:
            raise ConnectionError("closed")
        self.buf += chunk

    async def line(self) -> bytes:
        while (nl := self.buf.find(b"\n")) < 0:
            await self._more()
        out = bytes(self.buf[: nl + 1])
        del self.buf[: nl + 1]
        return out

    async def skip(self, n: int) -> int:
        left = n
        while left:
            if not self.buf:
                await self._more()
            take = min(left, len(self.buf))
            del self.buf[:take]
            left -= take
        return n

    async def command(self, text: bytes) -> int:
        """Send one command, read to its tagged OK; returns octets of literal data read."""
        self.tag += 1
        tag = b"t%d " % self.tag
        await self.stream.send_all(tag + text + b"\r\n")
        literal = 0
        while True:
            line = await self.line()
            if line.endswith(b"}\r\n"):
                literal += await self.skip(int(line[line.rfind(b"{") + 1 : -3]))
            elif line.startswith(tag):
                if not line.startswith(tag + b"OK"):
                    raise RuntimeError(line.decode(errors="replace"))
                return literal

    async def close(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def logged_in(
    address: Address, user: str, tls: ssl.SSLContext | None = None, source: str | None = None
) -> Imap:
    c = await Imap.connect(address, tls, source)
    await c.command(b"LOGIN " + user.encode() + b" pw")
    return c


# --- The proxy process, and its CPU and memory.


@dataclass
class ProxyProcess:
    """A relay under test (imapveil, or the naive relay: `tls_port` 0)."""

    process: subprocess.Popen[bytes]
    port: int
    tls_port: int = 0

    def cpu(self) -> dict[str, float]:
        """CPU seconds (user + system) each thread of the process has used so far: what a
        workload costs the relay, whatever else runs on the machine (wall-clock ratios are
        noisier). From schedstat, in nanoseconds (stat counts 10 ms ticks: too coarse for
        one bulk measurement); see `cpu_since`."""
        pid = self.process.pid
        out = {}
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                out[tid] = (
                    int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]) / 1e9
                )
            except OSError:  # the thread ended meanwhile, or no schedstat (then: ticks)
                if not Path(f"/proc/{pid}/schedstat").exists():
                    return {"all": self._ticks()}
        return out

    def cpu_since(self, before: dict[str, float]) -> float:
        """CPU seconds since `before`: threads alive now, from where they were (a worker thread
        that ended in between is missed, a new one counted whole)."""
        return sum(used - before.get(tid, 0.0) for tid, used in self.cpu().items())

    def _ticks(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK

    def memory(self) -> int:
        """PSS in bytes (RSS where smaps_rollup is missing)."""
        try:
            text, key = Path(f"/proc/{self.process.pid}/smaps_rollup").read_text(), "Pss:"
        except OSError:
            text, key = Path(f"/proc/{self.process.pid}/status").read_text(), "VmRSS:"
        line = next(x for x in text.splitlines() if x.startswith(key))
        return int(line.split()[1]) * 1024


# --- Workloads. Each returns {metric: value}; `proxy` is None when run directly.

Tls = ssl.SSLContext | None


async def bulk(address: Address, tls: Tls, proxy: ProxyProcess | None) -> dict[str, float]:
    c = await logged_in(address, "u0", tls)
    await c.command(b"EXAMINE INBOX")
    cpu = proxy.cpu() if proxy else {}
    start = time.perf_counter()
    octets = 0
    for _ in range(5):  # 150 MB a measurement: long enough to be stable, and for CPU ticks
        octets += await c.command(b"FETCH 1:3 BODY.PEEK[]")
    elapsed = time.perf_counter() - start
    used = proxy.cpu_since(cpu) if proxy else 0.0
    await c.close()
    out = {"MB/s": octets / 1e6 / elapsed}
    if proxy:
        out["CPU s/GB"] = used / (octets / 1e9)
    return out


NOOPS = 5000


async def latency(address: Address, tls: Tls, proxy: ProxyProcess | None) -> dict[str, float]:
    c = await logged_in(address, "u1", tls)
    times = []
    cpu = proxy.cpu() if proxy else {}
    for _ in range(NOOPS):
        start = time.perf_counter()
        await c.command(b"NOOP")
        times.append(time.perf_counter() - start)
    used = proxy.cpu_since(cpu) if proxy else 0.0
    await c.close()
    times.sort()
    out = {
        "NOOP p50 ms": times[NOOPS // 2] * 1000,
        "NOOP p99 ms": times[NOOPS * 99 // 100] * 1000,
    }
    if proxy:
        out["CPU us/NOOP"] = used / NOOPS * 1e6
    return out


MIXED = [b"SELECT INBOX", b"FETCH 1:* (FLAGS UID)", b"UID SEARCH ALL",
         b"STORE 1 +FLAGS (\\Flagged)", b"STORE 1 -FLAGS (\\Flagged)", b"NOOP"]  # fmt: skip


async def mixed(
    address: Address, tls: Tls, seconds: float, proxy: ProxyProcess | None = None
) -> dict[str, float]:
    ops = 0

    async def worker(i: int) -> None:
        nonlocal ops
        c = await logged_in(address, f"u{2 + i % 16}", tls)
        with trio.move_on_after(seconds):
            while True:
                for text in MIXED:
                    await c.command(text)
                    ops += 1
        await c.close()

    cpu = proxy.cpu() if proxy else {}  # the 32 log-ins included: a few us per operation
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(32):
            nursery.start_soon(worker, i)
    out = {"ops/s": ops / (time.perf_counter() - start)}
    if proxy:
        out["CPU us/op"] = proxy.cpu_since(cpu) / ops * 1e6
    return out


async def churn(
    address: Address, tls: Tls, proxy: ProxyProcess | None, seconds: float
) -> dict[str, float]:
    sessions = 0
    cpu = proxy.cpu() if proxy else {}

    async def worker(i: int) -> None:
        nonlocal sessions
        with trio.move_on_after(seconds):
            while True:
                c = await logged_in(address, f"u{i}", tls)
                await c.command(b"LOGOUT")
                await c.close()
                sessions += 1

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(16):
            nursery.start_soon(worker, i)
    out = {"sessions/s": sessions / (time.perf_counter() - start)}
    if proxy:
        out["CPU ms/session"] = proxy.cpu_since(cpu) / sessions * 1000
    return out


SOURCES = [f"127.0.0.{i}" for i in range(1, 17)]
"""Client source addresses for the idle workload, taken in turn: 10,000 sessions a target, three
targets a round, each leaving its connections in TIME_WAIT, would crowd one address's ephemeral
ports."""


class IdleUsers:
    """Users for the idle workload: one a session, in two sets used in turn.

    Dovecot serves many sessions per imap process here (`dovecot_limits`), and Dovecot 2.3 does
    not wake an IDLE when another session of the same user in the same process watches the same
    mailbox (it falls back to polling, every 30 s): so no two sessions share a user, and a run
    never reuses the users of the run just before it, whose sessions may still be closing."""

    def __init__(self, n: int) -> None:
        self.sets = [[f"i{k}x{i}" for i in range(n)] for k in range(2)]
        self.turn = 0

    def take(self) -> list[str]:
        users = self.sets[self.turn % len(self.sets)]
        self.turn += 1
        return users

    def all(self) -> dict[str, str]:
        return {user: "pw" for users in self.sets for user in users}


def deliver(dovecot: Dovecot, users: list[str]) -> None:
    """One new message into each user's INBOX, delivered as an MTA does into a Maildir (written
    in tmp/, renamed into new/): what wakes the idle sessions, the same for every target and
    cheaper than an APPEND a user."""
    message = b"Subject: ping\r\n\r\nhi\r\n"
    stamp = time.time_ns()
    for user in users:
        box = dovecot.maildir(user) / "Maildir"
        name = f"{stamp}.{user}.imapveil-bench"
        (box / "tmp" / name).write_bytes(message)
        os.chown(box / "tmp" / name, dovecot.mail_uid, dovecot.mail_gid)
        os.rename(box / "tmp" / name, box / "new" / name)


IdleTarget = Callable[[], tuple[Address, "ProxyProcess | None"]]
"""Where an idle measurement connects, and the relay process it measures (freshly started)."""


async def idle(
    target: IdleTarget, tls: Tls, dovecot: Dovecot, users: IdleUsers
) -> dict[str, float]:
    """Each measurement has a relay process of its own, started for it: memory an earlier
    workload freed (which Python keeps, and reuses) would hide what the sessions cost."""
    address, proxy = target()
    try:
        return await _idle(address, tls, dovecot, users, proxy)
    finally:
        if proxy is not None:
            stop_group(proxy.process, signal.SIGTERM)


async def open_idle(
    address: Address, users: list[str], tls: Tls, clients: list[Imap], at_once: int = 100
) -> None:
    """A session per user, logged in (from the benchmark's source addresses in turn), INBOX
    selected and in IDLE, each appended to `clients`; `at_once` opening at a time."""
    limit = trio.CapacityLimiter(at_once)

    async def open_one(i: int) -> None:
        async with limit:
            c = await logged_in(address, users[i], tls, SOURCES[i % len(SOURCES)])
            await c.command(b"SELECT INBOX")
            await c.stream.send_all(b"i IDLE\r\n")
            while not (await c.line()).startswith(b"+"):
                pass
            clients.append(c)

    async with trio.open_nursery() as nursery:
        for i in range(len(users)):
            nursery.start_soon(open_one, i)


async def _idle(
    address: Address, tls: Tls, dovecot: Dovecot, users: IdleUsers, proxy: ProxyProcess | None
) -> dict[str, float]:
    mine = users.take()
    n = len(mine)
    clients: list[Imap] = []
    before = proxy.memory() if proxy else 0
    cpu = proxy.cpu() if proxy else {}
    await open_idle(address, mine, tls, clients)
    per_session = (proxy.memory() - before) / n if proxy else 0.0
    setup = proxy.cpu_since(cpu) / n if proxy else 0.0
    seen = 0
    everyone = trio.Event()

    async def wait_exists(c: Imap) -> None:
        nonlocal seen
        while b"EXISTS" not in await c.line():
            pass
        seen += 1
        if seen == n:
            everyone.set()

    start = time.perf_counter()
    cpu = proxy.cpu() if proxy else {}
    async with trio.open_nursery() as nursery:
        for c in clients:
            nursery.start_soon(wait_exists, c)
        await trio.to_thread.run_sync(deliver, dovecot, mine)
        with trio.fail_after(120):
            await everyone.wait()
    elapsed = time.perf_counter() - start
    notify = proxy.cpu_since(cpu) / n if proxy else 0.0
    for c in clients:
        await c.close()
    out = {"all notified s": elapsed}
    if proxy:
        out["KiB/session"] = per_session / 1024
        out["setup CPU ms/session"] = setup * 1000
        out["notify CPU us/session"] = notify * 1e6
    print(
        f"    {n} idle sessions, {'TLS' if tls else 'plain'}, port {address[1]}: {out}",
        file=sys.stderr,
    )
    return out


# --- The run.


@dataclass
class Result:
    name: str
    direct: list[dict[str, float]] = field(default_factory=list)
    proxied: list[dict[str, float]] = field(default_factory=list)
    naive: list[dict[str, float]] = field(default_factory=list)


COLUMNS = ("direct", "imapveil", "naive")


def _column(values: list[dict[str, float]], metric: str) -> list[float]:
    return [x[metric] for x in values if metric in x]


def summarize(results: list[Result]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        for metric in r.proxied[0]:
            row: dict[str, Any] = {"workload": r.name, "metric": metric}
            for column, values in zip(COLUMNS, (r.direct, r.proxied, r.naive), strict=True):
                measured = _column(values, metric)
                if not measured:
                    continue
                row[column] = statistics.median(measured)
                row[f"{column}_min"], row[f"{column}_max"] = min(measured), max(measured)
                row[f"{column}_rounds"] = measured
            if "direct" in row:
                row["ratio"] = row["imapveil"] / row["direct"]
                if "naive" in row:
                    row["naive_ratio"] = row["naive"] / row["direct"]
            if row.get("naive"):
                row["vs_naive"] = row["imapveil"] / row["naive"]
            rows.append(row)
    return rows


def _num(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _cell(row: dict[str, Any], column: str) -> str:
    if column not in row:
        return "-"
    low, high = row[column + "_min"], row[column + "_max"]
    return f"{_num(row[column])} ({_num(low)}-{_num(high)})"


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'workload':<22}{'metric':<21}" + "".join(f"{c + ' (min-max)':>23}" for c in COLUMNS)
    out = [head + f"{'veil/dir':>9}{'naive/dir':>10}{'veil/naive':>11}"]
    for r in rows:
        cells = "".join(f"{_cell(r, c):>23}" for c in COLUMNS)
        ratios = "".join(
            f"{(f'{r[k]:.2f}x' if k in r else ''):>{w}}"
            for k, w in (("ratio", 9), ("naive_ratio", 10), ("vs_naive", 11))
        )
        out.append(f"{r['workload']:<22}{r['metric']:<21}{cells}{ratios}")
    return "\n".join(out)


Workload = Callable[[Address, Tls, "ProxyProcess | None"], Awaitable[dict[str, float]]]


@dataclass
class Relays:
    """The relays under test, and how to start fresh ones (for the idle workloads)."""

    imapveil: ProxyProcess
    naive: ProxyProcess
    secure: ProxyProcess
    """imapveil re-encrypting: its upstream is Dovecot's TLS port (the "TLS both legs" rows)."""
    fresh_imapveil: Callable[[], ProxyProcess]
    fresh_naive: Callable[[], ProxyProcess]


async def run(
    args: argparse.Namespace, dovecot: Dovecot, relays: Relays, ca: trustme.CA
) -> list[Result]:
    proxy, naive, reencrypting = relays.imapveil, relays.naive, relays.secure
    tls = ssl.create_default_context()
    ca.configure_trust(tls)
    seconds = 10.0 if args.full else 3.0
    plain = (dovecot.address, ("127.0.0.1", proxy.port))
    secure = (dovecot.tls_address, ("127.0.0.1", reencrypting.tls_port))

    async def mixed_w(a: Address, t: Tls, p: ProxyProcess | None) -> dict[str, float]:
        return await mixed(a, t, seconds, p)

    async def churn_w(a: Address, t: Tls, p: ProxyProcess | None) -> dict[str, float]:
        return await churn(a, t, p, seconds)

    naive_address: Address = ("127.0.0.1", naive.port)
    plan: list[tuple[str, Workload, tuple[Address, Address], Tls, ProxyProcess]] = [
        ("bulk (5 x 20+5+5 MB)", bulk, plain, None, proxy),
        ("latency", latency, plain, None, proxy),
        ("mixed (32 clients)", mixed_w, plain, None, proxy),
        ("churn (16 workers)", churn_w, plain, None, proxy),
        ("bulk, TLS both legs", bulk, secure, tls, reencrypting),
        ("mixed, TLS both legs", mixed_w, secure, tls, reencrypting),
    ]
    results = []
    for name, fn, (direct, through), context, relay in plan:
        if args.only and args.only not in name:
            continue
        result = Result(name)
        runs: list[Run] = [
            (result.direct, functools.partial(fn, direct, context, None)),
            (result.proxied, functools.partial(fn, through, context, relay)),
        ]
        if context is None:  # the naive relay speaks no TLS
            runs.append((result.naive, functools.partial(fn, naive_address, context, naive)))
        await _rounds(args.rounds, runs, (proxy, naive, reencrypting))
        results.append(result)
        print(f"  {name}: done", file=sys.stderr)
    results += await run_idle(args, dovecot, relays, tls)
    return results


async def run_idle(
    args: argparse.Namespace, dovecot: Dovecot, relays: Relays, tls: ssl.SSLContext
) -> list[Result]:
    n = args.idle_sessions or (10_000 if args.full else 1_000)
    users = IdleUsers(n)

    def direct(address: Address) -> IdleTarget:
        return lambda: (address, None)

    def through(start: Callable[[], ProxyProcess], tls_leg: bool) -> IdleTarget:
        def target() -> tuple[Address, ProxyProcess | None]:
            relay = start()
            return ("127.0.0.1", relay.tls_port if tls_leg else relay.port), relay

        return target

    plan: list[tuple[str, Tls, IdleTarget, IdleTarget, IdleTarget | None]] = [
        (f"idle ({n} sessions)", None, direct(dovecot.address),
         through(relays.fresh_imapveil, False), through(relays.fresh_naive, False)),
        (f"idle, TLS client leg ({n})", tls, direct(dovecot.tls_address),
         through(relays.fresh_imapveil, True), None),
    ]  # fmt: skip
    results = []
    for name, context, to_dovecot, to_imapveil, to_naive in plan:
        if args.only and args.only not in name:
            continue
        result = Result(name)
        runs: list[Run] = [
            (result.direct, functools.partial(idle, to_dovecot, context, dovecot, users)),
            (result.proxied, functools.partial(idle, to_imapveil, context, dovecot, users)),
        ]
        if to_naive is not None:  # the naive relay speaks no TLS
            runs.append((result.naive, functools.partial(idle, to_naive, None, dovecot, users)))
        await _rounds(args.rounds, runs)
        results.append(result)
        print(f"  {name}: done", file=sys.stderr)
    return results


Run = tuple[list[dict[str, float]], Callable[[], Awaitable[dict[str, float]]]]
"""Where a target's measurements go, and how to take one."""


async def _rounds(rounds: int, runs: list[Run], quiet: Sequence[ProxyProcess] = ()) -> None:
    """Each round runs every target once, starting one later each round (rotating order), so
    the machine's drift hits all alike; before each measurement the relays in `quiet` are let
    finish what the last one left them (imapveil's store writer inserting the rows of a churn
    run's sessions would otherwise run during the next measurement, whichever it is)."""
    for i in range(rounds):
        for k in range(len(runs)):
            values, measure = runs[(i + k) % len(runs)]
            for relay in quiet:
                await settle(relay)
            values.append(await measure())


async def settle(relay: ProxyProcess, seconds: float = 5.0) -> None:
    """Wait until `relay` uses less than 2 ms of CPU in 100 ms (at most `seconds`)."""
    with trio.move_on_after(seconds):
        while True:
            before = relay.cpu()
            await trio.sleep(0.1)
            if relay.cpu_since(before) < 0.002:
                return


def certificate(work: Path) -> tuple[trustme.CA, Path, Path]:
    """A test CA, and a certificate for 127.0.0.1 and its key written to `work`."""
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key = work / "cert.pem", work / "key.pem"
    issued.cert_chain_pems[0].write_to_path(cert)
    issued.private_key_pem.write_to_path(key)
    return ca, cert, key


def start_proxy(
    work: Path,
    dovecot: Dovecot,
    cert: Path,
    key: Path,
    env: dict[str, str] | None = None,
    *,
    under: Sequence[str] = (),
    startup: float = 15.0,
    upstream_ca: Path | None = None,
) -> ProxyProcess:
    """An `imapveil serve` with an event log and a statistics store of its own (a store and its
    spool serve one process: a second one would find them in use and drop its rows); `env`:
    its environment (PYTHONPATH for another source tree: bench/ab.py); `under`: a command it
    runs under (valgrind: bench/instructions.py), given `startup` seconds to listen;
    `upstream_ca`: relay to Dovecot's TLS port (implicit TLS, its certificate verified against
    this CA) instead of its plain one."""
    port, tls_port = free_port(), free_port()
    upstream = ["--upstream", f"127.0.0.1:{dovecot.port}"]
    if upstream_ca is not None:
        upstream = [
            "--upstream", f"127.0.0.1:{dovecot.tls_port}", "--upstream-tls", "implicit",
            "--upstream-ca", str(upstream_ca),
        ]  # fmt: skip
    own = work / f"imapveil-{port}"
    own.mkdir()
    process = subprocess.Popen(
        [*under, sys.executable, "-m", "imapveil", "serve",
         "--listen", f"127.0.0.1:{port}",
         "--listen-tls", f"127.0.0.1:{tls_port}", "--cert", str(cert), "--key", str(key),
         *upstream,
         "--events", str(own / "events.jsonl"),
         "--store", str(own / "stats.sqlite"),
         "--user-key-file", str(work / "user-key"), "--proxy-name", f"bench-{port}",
         "--max-sessions-per-client", "100000", "--max-connection-rate", "100000",
         "--log-level", "warning"],
        start_new_session=True,
        env=env,
    )  # fmt: skip
    wait_port(port, process, startup)
    return ProxyProcess(process, port, tls_port)


def start_naive(
    dovecot: Dovecot, *, under: Sequence[str] = (), startup: float = 15.0
) -> ProxyProcess:
    port = free_port()
    process = subprocess.Popen(
        [*under, sys.executable, str(Path(__file__).with_name("naive_relay.py")), str(port),
         str(dovecot.port)],
        start_new_session=True,
    )  # fmt: skip
    wait_port(port, process, startup)
    return ProxyProcess(process, port)


def wait_port(port: int, process: subprocess.Popen[bytes], startup: float = 15.0) -> None:
    deadline = time.monotonic() + startup
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise
            time.sleep(0.02)  # polling for the port


RELAY_FDS = 100
"""Descriptors a relay process holds besides its sessions' two sockets (listeners, the store, its
journal and spool, the event log, trio's own) with room to spare."""


def idle_sessions_that_fit(n: int) -> int:
    """`n`, or fewer if one relay process may not open two sockets for each (RLIMIT_NOFILE: root
    may raise the hard limit only with CAP_SYS_RESOURCE, which a container often lacks). Raises
    the limit for us and our children as far as allowed."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(hard, 2 * n + RELAY_FDS)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        want = hard
    fits = (want - RELAY_FDS) // 2
    if fits < n:
        print(
            f"open files are limited to {want} a process (hard limit; raising it needs"
            f" CAP_SYS_RESOURCE): a relay holds two sockets a session, so {fits} idle sessions,"
            f" not {n}",
            file=sys.stderr,
        )
    return min(n, fits)


def raise_limits(n: int) -> dict[Path, str]:
    """Inotify instances for Dovecot's IDLE (see `idle_sessions_that_fit` for descriptors)."""
    restore = {}
    path = Path("/proc/sys/fs/inotify/max_user_instances")
    try:
        current = path.read_text().strip()
        # One inotify instance an imap process, and Dovecot keeps one per process at most.
        want = 2 * n // IMAP_CLIENTS_PER_PROCESS + 500
        if int(current) < want and os.access(path, os.W_OK):
            path.write_text(str(want))
            restore[path] = current
    except OSError:
        pass
    return restore


IMAP_CLIENTS_PER_PROCESS = 100
"""Sessions one Dovecot imap process serves (Dovecot's default is 1, the safest): 10,000 idle
sessions as 10,000 processes would not fit the machine (a few MiB each). All the bench's users
share one system uid, which several users in one process need; and no two idle sessions share a
user (see `IdleUsers`)."""


def dovecot_limits(n: int) -> str:
    """Dovecot settings for `n` concurrent sessions a target (connections of the previous
    target may still be closing: room for twice as many)."""
    clients = 2 * n + 1000
    return f"""
default_process_limit = {2 * n // IMAP_CLIENTS_PER_PROCESS + 100}
default_client_limit = {clients}
default_vsz_limit = 0
service imap-login {{
  # High-performance mode: a few login processes, each proxying many TLS sessions (two
  # descriptors each: more login processes as they fill).
  service_count = 0
  process_min_avail = 2
  client_limit = {min(clients, 4000)}
}}
service anvil {{
  client_limit = {clients}
}}
service auth {{
  client_limit = {clients}
}}
service imap {{
  service_count = 0
  client_limit = {IMAP_CLIENTS_PER_PROCESS}
  process_limit = {2 * n // IMAP_CLIENTS_PER_PROCESS + 100}
}}
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full", action="store_true", help="10 s runs and 10,000 idle sessions")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", metavar="FILE", help="write the results here too")
    parser.add_argument(
        "--show", metavar="JSON", help="print the table of an earlier run's JSON, run nothing"
    )
    parser.add_argument("--only", metavar="WORD", help="run only workloads whose name has WORD")
    parser.add_argument("--idle-sessions", type=int, help="instead of 1,000 (10,000 with --full)")
    parser.add_argument(
        "--profile",
        metavar="SVG",
        help="record the proxy with py-spy into this flame graph (.txt: raw stacks); only samples"
        " that hold the interpreter lock, i.e. CPU, not time spent waiting in epoll",
    )
    args = parser.parse_args()
    if args.show:
        report = json.loads(Path(args.show).read_text())
        print(report.get("about", args.show))
        print(table(report["rows"]))
        return
    n = args.idle_sessions = idle_sessions_that_fit(
        args.idle_sessions or (10_000 if args.full else 1_000)
    )
    restore = raise_limits(n)
    work = Path(tempfile.mkdtemp(prefix="imapveil-bench-"))
    work.chmod(0o755)
    ca, cert, key = certificate(work)
    limits = dovecot_limits(n)
    dovecot = Dovecot(USERS | IdleUsers(n).all(), tls=(cert, key), extra_config=limits)
    proxy = secure = None
    naive: subprocess.Popen[bytes] | None = None
    try:
        dovecot.start()
        body = base64.encodebytes(os.urandom(23 * 1024 * 1024)).replace(b"\n", b"\r\n")
        big = b"Subject: big\r\n\r\n" + body[: 20 * 1000 * 1000]
        five = b"Subject: five\r\n\r\n" + body[: 5 * 1000 * 1000]
        dovecot.seed("u0", [big, five, five])
        for user in list(USERS)[1:]:
            dovecot.seed(user, [b"Subject: small %d\r\n\r\nhello\r\n" % i for i in range(20)])
        proxy = start_proxy(work, dovecot, cert, key)
        ca_file = work / "ca.pem"
        ca.cert_pem.write_to_path(ca_file)
        secure = start_proxy(work, dovecot, cert, key, upstream_ca=ca_file)
        naive_relay = start_naive(dovecot)
        naive = naive_relay.process
        relays = Relays(
            proxy,
            naive_relay,
            secure,
            functools.partial(start_proxy, work, dovecot, cert, key),
            functools.partial(start_naive, dovecot),
        )
        spy = None
        if args.profile:
            spy = subprocess.Popen(
                ["py-spy", "record", "--pid", str(proxy.process.pid), "--output", args.profile,
                 "--rate", "500", "--nonblocking", "--gil"]
                + (["--format", "raw"] if args.profile.endswith(".txt") else []),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        load = [os.getloadavg()]
        try:
            results = trio.run(run, args, dovecot, relays, ca)
        except BaseException:
            print("Dovecot's log ends:\n" + dovecot.log_text()[-3000:], file=sys.stderr)
            raise
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
        load.append(os.getloadavg())
        rows = summarize(results)
        about = (
            f"imapveil benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"{args.rounds} rounds, {'full' if args.full else 'quick'}; load average "
            f"{load[0][0]:.2f} at the start, {load[1][0]:.2f} at the end"
        )
        print("\n" + about)
        print(table(rows))
        print(
            "veil/dir: imapveil / direct; naive/dir: bench/naive_relay.py (a trio relay that"
            " parses nothing) / direct; veil/naive: imapveil / naive.\nMB/s, ops/s, sessions/s:"
            " higher is better; times, CPU and memory (of the relay process): lower is better."
        )
        if args.json:
            report = {"about": about, "load": load, "rounds": args.rounds, "rows": rows}
            Path(args.json).write_text(json.dumps(report | {"full": args.full}, indent=2))
    finally:
        if proxy is not None:
            stop_group(proxy.process, signal.SIGTERM)
        if secure is not None:
            stop_group(secure.process, signal.SIGTERM)
        if naive is not None:
            stop_group(naive, signal.SIGTERM)
        dovecot.cleanup()
        shutil.rmtree(work, ignore_errors=True)
        for path, value in restore.items():
            path.write_text(value)


if __name__ == "__main__":
    main()
