"""Instructions per churned session and per NOOP round trip, imapveil beside the naive relay.

    python bench/instructions.py                      # naive relay and this tree's imapveil
    python bench/instructions.py --src /tmp/before/src --src src   # two trees (and naive)
    python bench/instructions.py --mypyc              # and a copy of it, core compiled
    python bench/instructions.py --json out.json

Wall-clock CPU on a shared machine moves 5-10 % between runs, more than most changes are worth.
Instructions do not: each relay runs under valgrind's callgrind, which counts the instructions
the process executes (all its threads: the event loop, the sinks' writers), whatever else the
machine is doing. Each relay gets a warm-up, then callgrind's counters are zeroed and dumped
around each workload: an idle interval (what the process does when nothing happens, subtracted
per second from the others), churn (workers doing connect + LOGIN + LOGOUT, as run.py's churn)
and NOOP round trips on one logged-in session. The sinks are on, as in production (event log
and statistics store), and each measurement lasts until the relay is quiet again, so their
batches are counted. Printed: thousands of instructions per unit, the event loop's thread and
the others apart, and each relay's total as a ratio to the naive relay's.

What instructions leave out: time in the kernel (system calls, the loopback's TCP), waits for
the interpreter lock between threads, cache and branch behaviour on real hardware. A relay can
be even in instructions and not in CPU seconds: run.py and ab.py measure those. Needs valgrind
(Debian: `apt-get install valgrind`); under it a relay runs some fifty times slower, so the
counts are small (a few hundred sessions) and a run takes minutes.

`--mypyc` measures one more tree: a copy of the first, its sans-IO core (`imapveil.protocol`)
compiled to C by mypyc (which comes with mypy, a development dependency; it needs gcc and the
Python headers). It measured the compiled core at parity with the naive relay in instructions,
but at 0.94x of the pure-Python core in CPU seconds (`bench/ab.py`, README), short of issue 17's
target: not a build imapveil offers. The tests run the pure-Python core, and some of them
(subclasses of the core, values of the wrong type on purpose) cannot run against a compiled one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # run.py is a script beside this one, not a package

from tests.helpers.dovecot import Dovecot, stop_group  # noqa: E402

import run as bench  # noqa: E402

Events = dict[str, int]
Interval = tuple[dict[str, Events], float]
"""Each thread's counts over an interval, and the interval's seconds."""

STARTUP = 180.0
"""Seconds a relay under valgrind may take to listen (imports run fifty times slower)."""


async def churn(port: int, workers: int, sessions: int) -> int:
    """`sessions` sessions from each of `workers` workers at once: connect, LOGIN, LOGOUT."""

    async def worker(i: int) -> None:
        for _ in range(sessions):
            c = await bench.logged_in(("127.0.0.1", port), f"u{i}")
            await c.command(b"LOGOUT")
            await c.close()

    async with trio.open_nursery() as nursery:
        for i in range(workers):
            nursery.start_soon(worker, i)
    return workers * sessions


async def noops(port: int, count: int) -> int:
    c = await bench.logged_in(("127.0.0.1", port), "u0")
    for _ in range(count):
        await c.command(b"NOOP")
    await c.command(b"LOGOUT")
    await c.close()
    return count


class Callgrind:
    """A relay process under callgrind, its counters zeroed and dumped on demand."""

    def __init__(self, relay: bench.ProxyProcess, out: Path) -> None:
        self.relay = relay
        self.out = out
        self.dumps = 0

    def _control(self, option: str) -> None:
        subprocess.run(
            ["callgrind_control", option, str(self.relay.process.pid)],
            capture_output=True,
            check=True,
            timeout=120,
        )

    def measure(self, work: Callable[[], Awaitable[int]] | float) -> Interval:
        """Instructions per thread during `work` (a workload, or seconds of idleness) and the
        interval's seconds; the relay is let finish what the workload left it first."""
        self._control("-z")
        started = time.monotonic()
        if isinstance(work, float):
            time.sleep(work)  # the idle interval itself is what is measured
        else:
            trio.run(work)
            trio.run(bench.settle, self.relay, 30.0)
        seconds = time.monotonic() - started
        self._control("-d")
        self.dumps += 1
        return self.threads(self.dumps), seconds

    def threads(self, dump: int) -> dict[str, Events]:
        """Each thread's counts in dump number `dump` (callgrind numbers threads from 1: the
        first is the event loop's): instructions (Ir) and, under `--caches`, the simulated
        cache misses and branch mispredictions."""
        pid = self.relay.process.pid
        found: dict[str, Events] = {}
        for path in self.out.parent.glob(f"{self.out.name}.{pid}.{dump}-*"):
            text = path.read_text()
            events = re.search(r"^events:\s*(.*)$", text, re.MULTILINE)
            totals = re.search(r"^(?:summary|totals):\s*(.*)$", text, re.MULTILINE)
            if events is None or totals is None:
                continue
            values = dict(zip(events.group(1).split(), totals.group(1).split(), strict=False))
            found[path.name.rsplit("-", 1)[1]] = {k: int(v) for k, v in values.items()}
        return found


def per_unit(busy: Interval, idle: Interval, units: int, event: str = "Ir") -> dict[str, float]:
    """Thousands of `event` (instructions unless said) per unit: the event loop's thread, the
    others, and all, with what the process does idle for as long subtracted."""
    (threads, seconds), (idle_threads, idle_seconds) = busy, idle

    def count(found: dict[str, Events], names: set[str]) -> int:
        return sum(sum(found.get(n, {}).get(e, 0) for e in event.split("+")) for n in names)

    def net(names: set[str]) -> float:
        rate = count(idle_threads, names) / max(idle_seconds, 1e-9)
        return (count(threads, names) - rate * seconds) / units / 1000

    main = {"01"}
    others = (set(threads) | set(idle_threads)) - main
    return {"loop": net(main), "threads": net(others), "total": net(main | others)}


CACHE_EVENTS = {
    "I1 misses": "I1mr",
    "D1 misses": "D1mr+D1mw",
    "LL misses": "ILmr+DLmr+DLmw",
    "branch mispredictions": "Bcm+Bim",
}
"""Under `--caches`: what callgrind's simulation counts beside the instructions, by name."""


def caches(busy: Interval, idle: Interval, units: int) -> dict[str, float]:
    """Thousands of each simulated event per unit, all threads, and a model of the cycles they
    cost: one an instruction, 10 an L1 miss, 100 a last-level miss, 15 a misprediction (the
    usual rough weights; a model, not a measurement)."""
    out = {
        name: per_unit(busy, idle, units, event)["total"] for name, event in CACHE_EVENTS.items()
    }
    out["model cycles"] = (
        per_unit(busy, idle, units)["total"]
        + 10 * (out["I1 misses"] + out["D1 misses"])
        + 100 * out["LL misses"]
        + 15 * out["branch mispredictions"]
    )
    return out


def compiled_copy(src: Path, work: Path) -> Path:
    """A copy of the source tree `src` with `imapveil.protocol` compiled by mypyc."""
    tree = work / "mypyc"
    shutil.copytree(src, tree, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    subprocess.run(
        [sys.executable, "-m", "mypyc", "imapveil/protocol/"],
        cwd=tree,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return tree


def measure(
    name: str, src: str | None, work: Path, dovecot: Dovecot, args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    out = work / f"callgrind-{len(list(work.glob('callgrind-*')))}"
    out.mkdir()
    under = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out / 'cg'}.%p",
        "--separate-threads=yes", "--dump-line=no", "--dump-instr=no",
    ]  # fmt: skip
    if args.caches:
        under += ["--cache-sim=yes", "--branch-sim=yes"]
    if src is None:
        relay = bench.start_naive(dovecot, under=under, startup=STARTUP)
    else:
        _ca, cert, key = bench.certificate(work)
        env = dict(os.environ, PYTHONPATH=str(Path(src).resolve()))
        relay = bench.start_proxy(work, dovecot, cert, key, env=env, under=under, startup=STARTUP)
    try:
        cg = Callgrind(relay, out / "cg")
        port = relay.port
        trio.run(churn, port, args.workers, 3)  # warm: imports, caches, the first rows
        trio.run(noops, port, 50)
        idle = cg.measure(2.0)
        units = args.workers * args.sessions
        sessions = cg.measure(lambda: churn(port, args.workers, args.sessions))
        round_trips = cg.measure(lambda: noops(port, args.noops))
        result = {
            "churned session": per_unit(sessions, idle, units),
            "NOOP round trip": per_unit(round_trips, idle, args.noops),
        }
        if args.caches:
            result["churned session, caches"] = caches(sessions, idle, units)
            result["NOOP round trip, caches"] = caches(round_trips, idle, args.noops)
    finally:
        relay.process.send_signal(signal.SIGTERM)
        try:
            relay.process.wait(120)
        except subprocess.TimeoutExpired:
            stop_group(relay.process, signal.SIGKILL)
    print(f"  {name}: done", file=sys.stderr, flush=True)
    return result


def report(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [
        "| relay | per | event loop (k Ir) | other threads | total | total / naive |",
        "|---|---|---|---|---|---|",
    ]
    naive = results.get("naive", {})
    for name, units in results.items():
        for unit, row in units.items():
            if unit.endswith(", caches"):
                continue
            base = naive.get(unit, {}).get("total")
            ratio = f"{row['total'] / base:.2f}x" if base else ""
            loop, threads, total = (max(0.0, row[k]) for k in ("loop", "threads", "total"))
            lines.append(
                f"| {name} | {unit} | {loop:.0f} | {threads:.0f} | {total:.0f} | {ratio} |"
            )
    simulated = [
        (n, u, row) for n, us in results.items() for u, row in us.items() if u.endswith(", caches")
    ]
    if simulated:
        names = [*CACHE_EVENTS, "model cycles"]
        lines += ["", "| relay | per | " + " | ".join(names) + " | model / naive |"]
        lines.append("|---|---|" + "---|" * (len(names) + 1))
        for name, unit, row in simulated:
            base = naive.get(unit, {}).get("model cycles")
            ratio = f"{row['model cycles'] / base:.2f}x" if base else ""
            shown = " | ".join(f"{max(0.0, row[k]):.1f}" for k in names)
            lines.append(f"| {name} | {unit.removesuffix(', caches')} (k) | {shown} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--src", action="append", help="an imapveil source tree (repeatable); default: src"
    )
    parser.add_argument("--no-naive", action="store_true", help="imapveil trees only")
    parser.add_argument(
        "--mypyc", action="store_true", help="also the first tree with its core compiled by mypyc"
    )
    parser.add_argument(
        "--caches",
        action="store_true",
        help="also simulate the caches and branch prediction (callgrind's; twice as slow)",
    )
    parser.add_argument("--workers", type=int, default=8, help="churn workers at once")
    parser.add_argument("--sessions", type=int, default=15, help="churned sessions per worker")
    parser.add_argument("--noops", type=int, default=300, help="NOOP round trips")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("bench/instructions.py needs valgrind (Debian: apt-get install valgrind)")
    trees = args.src or [str(ROOT / "src")]
    targets: list[tuple[str, str | None]] = [] if args.no_naive else [("naive", None)]
    targets += [("imapveil" if len(trees) == 1 else tree, tree) for tree in trees]
    work = Path(tempfile.mkdtemp(prefix="imapveil-instructions-"))
    (work / "user-key").write_bytes(os.urandom(32))
    if args.mypyc:
        print("  compiling the core with mypyc (a minute)", file=sys.stderr, flush=True)
        targets.append(
            ("imapveil, core compiled (mypyc)", str(compiled_copy(Path(trees[0]), work)))
        )
    dovecot = Dovecot(bench.USERS, extra_config=bench.dovecot_limits(200))
    try:
        dovecot.start()
        results = {name: measure(name, src, work, dovecot, args) for name, src in targets}
    finally:
        dovecot.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"instructions per unit (callgrind), {args.workers} x {args.sessions} churned sessions, "
        f"{args.noops} NOOPs; event log and statistics store on"
    )
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
