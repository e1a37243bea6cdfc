"""Paired A/B: is a change cheaper? Two relays at once, in front of one Dovecot, under one load.

    python bench/ab.py --a /path/to/old/src --b src churn --rounds 8
    python bench/ab.py --a naive --b src mixed
    python bench/ab.py --a naive --b src churn --rate 100 --seconds 8
    python bench/ab.py --a /path/to/old/src --b src latency --noops 20000

`--a` and `--b` are source trees (`imapveil serve` runs with that tree first on PYTHONPATH; a git
worktree of the commit before, say) or `naive` (bench/naive_relay.py). On a shared machine the load
of the moment moves a relay's CPU per session by 5 to 10 % from one run to the next: more than most
changes are worth. Here both relays are measured in the same seconds: churn and mixed load both at
once, each with the workload of `run.py` (churn with `--rate N`: N sessions a second to each
relay on a fixed schedule, a load far from saturation, as most proxies see; its own spread,
the same tree twice, was 0.97-1.02 on a quiet machine, 0.97-1.16 while other work loaded it);
latency sends one
NOOP to each in turn; bulk fetches run.py's 150 MB through both at once (plain legs). Each round
prints both relays' CPU per unit (session, operation, NOOP, GB) and B/A. The rounds run twice: with
B's relay started (and loaded) first, then A's, each pair of relays fresh, because the position
alone has moved CPU per unit by up to 7 % on this machine (where the scheduler put each process).
The end: the median of each order's ratios with their min-max, and B/A with the position's share
taken out (the geometric mean of the two medians). Run it with A and B the same tree to see what
the method's own spread is on this machine.
"""

from __future__ import annotations

import argparse
import base64
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # run.py is a script beside this one, not a package

from tests.helpers.dovecot import Dovecot, stop_group  # noqa: E402

import run as bench  # noqa: E402

Percentiles = dict[str, float]


def start(which: str, work: Path, dovecot: Dovecot, cert: Path, key: Path) -> bench.ProxyProcess:
    if which == "naive":
        return bench.start_naive(dovecot)
    src = str(Path(which).resolve())
    return bench.start_proxy(work, dovecot, cert, key, env=dict(os.environ, PYTHONPATH=src))


async def paced_churn(address: tuple[str, int], rate: float, seconds: float) -> int:
    """Sessions (connect, LOGIN, LOGOUT) at `rate` a second for `seconds`, from 4 workers each
    starting its next session on a fixed schedule, whatever the last one took: the relay sees
    the same offered load however fast it is, far below what saturates it."""
    done = 0

    async def worker(i: int) -> None:
        nonlocal done
        start = trio.current_time()
        for k in range(int(seconds * rate / PACED_WORKERS)):
            await trio.sleep_until(start + k * PACED_WORKERS / rate)
            c = await bench.logged_in(address, f"u{i}")
            await c.command(b"LOGOUT")
            await c.close()
            done += 1

    async with trio.open_nursery() as nursery:
        for i in range(PACED_WORKERS):
            nursery.start_soon(worker, i)
    return done


PACED_WORKERS = 4


async def loaded(
    relays: dict[str, bench.ProxyProcess], workload: str, seconds: float, rate: float = 0.0
) -> Percentiles:
    """Both relays under the same workload at the same time: CPU microseconds per unit
    (`rate`: churn paced at that many sessions a second, instead of as fast as they go)."""
    done: dict[str, float] = {}

    async def one(name: str, relay: bench.ProxyProcess) -> None:
        address = ("127.0.0.1", relay.port)
        if workload == "churn" and rate:
            units: float = await paced_churn(address, rate, seconds)
        elif workload == "churn":
            result = await bench.churn(address, None, relay, seconds)
            units = result["sessions/s"] * seconds
        elif workload == "bulk":
            result = await bench.bulk(address, None, relay)
            done[name] = 1e6 / result["CPU s/GB"]  # turned back into CPU s/GB below
            return
        else:
            result = await bench.mixed(address, None, seconds, relay)
            units = result["ops/s"] * seconds
        done[name] = units

    before = {name: relay.cpu() for name, relay in relays.items()}
    async with trio.open_nursery() as nursery:
        for name, relay in relays.items():
            nursery.start_soon(one, name, relay)
    if workload == "bulk":  # measured per relay by `bench.bulk` itself: CPU seconds per GB
        return {name: 1e6 / units for name, units in done.items()}
    return {
        name: relay.cpu_since(before[name]) / done[name] * 1e6 for name, relay in relays.items()
    }


async def alternating(relays: dict[str, bench.ProxyProcess], noops: int) -> dict[str, Percentiles]:
    """One NOOP to each relay in turn (which goes first alternates): latency percentiles in
    milliseconds and CPU microseconds per NOOP."""
    clients = {
        name: await bench.logged_in(("127.0.0.1", relay.port), "u1")
        for name, relay in relays.items()
    }
    times: dict[str, list[float]] = {name: [] for name in relays}
    names = list(relays)
    before = {name: relay.cpu() for name, relay in relays.items()}
    for i in range(noops):
        for name in names if i % 2 else reversed(names):
            start = time.perf_counter()
            await clients[name].command(b"NOOP")
            times[name].append(time.perf_counter() - start)
    out = {}
    for name, relay in relays.items():
        used = relay.cpu_since(before[name])
        await clients[name].close()
        x = sorted(times[name])
        out[name] = {
            "p50 ms": x[len(x) // 2] * 1e3,
            "p99 ms": x[len(x) * 99 // 100] * 1e3,
            "p99.9 ms": x[len(x) * 999 // 1000] * 1e3,
            "CPU us": used / noops * 1e6,
        }
    return out


def one_round(
    relays: dict[str, bench.ProxyProcess], args: argparse.Namespace, r: int, order: str
) -> float:
    """One round of the workload on both relays: B's CPU per unit over A's."""
    if args.workload == "latency":
        lat = trio.run(alternating, relays, args.noops)
        shown = " | ".join(
            name + ": " + ", ".join(f"{k} {v:.4g}" for k, v in lat[name].items())
            for name in ("A", "B")
        )
        print(f"{order}, round {r}: {shown}", flush=True)
        return lat["B"]["CPU us"] / lat["A"]["CPU us"]
    cpu = trio.run(loaded, relays, args.workload, args.seconds, args.rate)
    ratio = cpu["B"] / cpu["A"]
    unit = "CPU s per GB" if args.workload == "bulk" else "CPU us per unit"
    print(
        f"{order}, round {r}: {unit} A {cpu['A']:.3g}, B {cpu['B']:.3g}, B/A {ratio:.3f}",
        flush=True,
    )
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("workload", choices=["churn", "mixed", "latency", "bulk"])
    parser.add_argument("--a", required=True, help="a source tree, or naive")
    parser.add_argument("--b", required=True, help="a source tree, or naive")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=5.0, help="churn and mixed")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="churn: sessions a second to each relay, paced (default: as fast as they go)",
    )
    parser.add_argument("--noops", type=int, default=10_000, help="latency: NOOPs to each")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imapveil-ab-"))
    _ca, cert, key = bench.certificate(work)
    (work / "user-key").write_bytes(os.urandom(32))
    dovecot = Dovecot(bench.USERS, tls=(cert, key), extra_config=bench.dovecot_limits(200))
    relays: dict[str, bench.ProxyProcess] = {}
    try:
        dovecot.start()
        users = list(bench.USERS)
        if args.workload == "bulk":  # run.py's: 20 + 5 + 5 MB in u0's INBOX, fetched 5 times
            body = base64.encodebytes(os.urandom(23 * 1024 * 1024)).replace(b"\n", b"\r\n")
            big = b"Subject: big\r\n\r\n" + body[: 20 * 1000 * 1000]
            five = b"Subject: five\r\n\r\n" + body[: 5 * 1000 * 1000]
            dovecot.seed(users.pop(0), [big, five, five])
        for user in users:
            dovecot.seed(user, [b"Subject: small %d\r\n\r\nhello\r\n" % i for i in range(20)])
        ratios: dict[str, list[float]] = {"B first": [], "A first": []}
        for order, rounds in ratios.items():
            # Each relay once started (and loaded) first, once second: on a shared machine the
            # position alone has moved CPU per unit by up to 7 % (where the scheduler put each
            # process), which one order of runs would count as the change's effect.
            first, second = ("B", "A") if order == "B first" else ("A", "B")
            paths = {"A": args.a, "B": args.b}
            relays = {
                name: start(paths[name], work, dovecot, cert, key) for name in (first, second)
            }
            for r in range(args.rounds):
                rounds.append(one_round(relays, args, r, order))
            for relay in relays.values():
                stop_group(relay.process, signal.SIGTERM)
            relays = {}
        for order, rs in ratios.items():
            print(
                f"{args.workload}, {order}: CPU B/A median {statistics.median(rs):.3f} "
                f"({min(rs):.3f}-{max(rs):.3f}) over {len(rs)} rounds"
            )
        b_first, a_first = (statistics.median(rs) for rs in ratios.values())
        effect, leading = math.sqrt(b_first * a_first), math.sqrt(b_first / a_first)
        print(
            f"{args.workload}: CPU B/A {effect:.3f} with the position's share taken out (the"
            f" relay started and loaded first costs {leading:.3f} times the other)"
        )
    finally:
        for relay in relays.values():
            stop_group(relay.process, signal.SIGTERM)
        dovecot.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
