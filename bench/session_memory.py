"""What one idle session costs the relay process: memory (PSS), setup CPU, and where they go.

    python bench/session_memory.py                    # 500 sessions through imapveil
    python bench/session_memory.py --naive            # the same through bench/naive_relay.py
    python bench/session_memory.py --trace            # + tracemalloc: Python allocations/session
    python bench/session_memory.py --profile 30       # + cProfile: top 30 functions of setup
    python bench/session_memory.py --profile 5 --callees _admit   # + what _admit calls

Starts a Dovecot on loopback, and a relay: `imapveil serve` (from this checkout's src/, event
log and statistics store on, as bench/run.py starts it) or the naive relay. Opens `--warm`
sessions first (LOGIN, SELECT INBOX, IDLE: one-time costs such as imports, caches, the first
growth of the allocator's arenas are paid there), then `--sessions` more, each its own user, and
reports per session of the second set: PSS growth of the relay process and its CPU (user +
system, all threads, from schedstat: what the setup costs whatever else runs on the machine).
Memory is counted while the sessions are held in IDLE; nothing is measured while they close.
The CPU line also says how much of it other threads than the main one used (the event log's and
the store's writers).

`--trace` runs the relay under tracemalloc (25 frames): snapshots after the warm set and after
the measured set are compared, and the growth is shown per session grouped by line (`lineno`)
and by the innermost frames of imapveil or trio that allocated it (`--frames`). tracemalloc
slows the process down and adds its own memory: its PSS and CPU figures are not the real ones,
so take those from a run without it. `--profile N` runs cProfile over the measured set's setup
only (main thread) and prints the top N functions by own time and by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # run.py is a script beside this one, not a package

from tests.helpers.dovecot import Dovecot, free_port, stop_group  # noqa: E402

from run import (  # noqa: E402
    Imap,
    ProxyProcess,
    dovecot_limits,
    idle_sessions_that_fit,
    open_idle,
    start_naive,
    wait_port,
)

TRACE_FRAMES = 25


# --- The relay process's side: `--child MODE OUT -- serve ...` wraps `imapveil serve`.


def child(mode: str, out: str, argv: list[str]) -> int:
    """Run `imapveil serve` (argv) in this process; SIGUSR1 marks the start and SIGUSR2 the end
    of the measured set: a tracemalloc snapshot each (`trace`), or cProfile between (`profile`).
    The file `OUT.done` says the snapshot or profile is written."""
    if mode == "trace":
        tracemalloc.start(TRACE_FRAMES)
    profile = cProfile.Profile()
    marks = [0]

    def mark(signum: int, _frame: object) -> None:
        marks[0] += 1
        if mode == "trace":
            tracemalloc.take_snapshot().dump(f"{out}.{marks[0]}")
            census: dict[str, list[int]] = {}
            for obj in gc.get_objects():
                entry = census.setdefault(type(obj).__qualname__, [0, 0])
                entry[0] += 1
                entry[1] += sys.getsizeof(obj)
            Path(f"{out}.{marks[0]}.census").write_text(json.dumps(census))
        elif mode == "profile":
            if signum == signal.SIGUSR1:
                profile.enable()
            else:
                profile.disable()
                profile.dump_stats(f"{out}.prof")
        Path(f"{out}.done{marks[0]}").touch()

    signal.signal(signal.SIGUSR1, mark)
    signal.signal(signal.SIGUSR2, mark)
    from imapveil.cli import main  # noqa: PLC0415 -- the relay's side only (src/ of this checkout)

    return main(argv)


# --- The measuring side.


def start_imapveil(work: Path, dovecot: Dovecot, mode: str) -> ProxyProcess:
    port = free_port()
    own = work / f"imapveil-{port}"
    own.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    process = subprocess.Popen(
        [sys.executable, __file__, "--child", mode, str(work / "mark"), "--",
         "serve", "--listen", f"127.0.0.1:{port}",
         "--upstream", f"127.0.0.1:{dovecot.port}",
         "--events", str(own / "events.jsonl"),
         "--store", str(own / "stats.sqlite"),
         "--user-key-file", str(work / "user-key"), "--proxy-name", f"bench-{port}",
         "--max-sessions-per-client", "100000", "--max-connection-rate", "100000",
         "--log-level", "warning"],
        start_new_session=True, env=env,
    )  # fmt: skip
    wait_port(port, process)
    return ProxyProcess(process, port)


def signal_and_wait(proxy: ProxyProcess, signum: int, mark: Path, count: int) -> None:
    proxy.process.send_signal(signum)
    done = Path(f"{mark}.done{count}")
    deadline = time.monotonic() + 600
    while not done.exists():
        if time.monotonic() > deadline or proxy.process.poll() is not None:
            raise RuntimeError("the relay did not answer the signal")
        time.sleep(0.05)  # polling for the marker file


def settle(proxy: ProxyProcess) -> None:
    """Wait until the relay's CPU stops moving (its sinks' threads have written)."""
    for _ in range(50):
        before = proxy.cpu()
        time.sleep(0.1)
        if proxy.cpu_since(before) < 0.002:
            return


async def measure(
    args: argparse.Namespace, dovecot: Dovecot, proxy: ProxyProcess, work: Path
) -> None:
    users = [f"m{i}" for i in range(args.warm + args.sessions)]
    clients: list[Imap] = []
    await open_idle(("127.0.0.1", proxy.port), users[: args.warm], None, clients, 50)
    await trio.to_thread.run_sync(settle, proxy)
    mark = work / "mark"
    if args.trace or args.profile:
        await trio.to_thread.run_sync(signal_and_wait, proxy, signal.SIGUSR1, mark, 1)
    before, cpu = proxy.memory(), proxy.cpu()
    await open_idle(("127.0.0.1", proxy.port), users[args.warm :], None, clients, 50)
    await trio.to_thread.run_sync(settle, proxy)
    used = proxy.cpu_since(cpu)
    main_thread = str(proxy.process.pid)
    others = used - (proxy.cpu().get(main_thread, 0.0) - cpu.get(main_thread, 0.0))
    grown = proxy.memory() - before
    n = args.sessions
    print(
        f"{'naive' if args.naive else 'imapveil'}: {n} idle sessions (after {args.warm} warm):"
        f" {grown / n / 1024:.2f} KiB/session PSS, {used / n * 1000:.3f} ms CPU/session setup"
        f" ({others / n * 1000:.3f} of it in threads other than the main one)"
        f"{' (under tracemalloc: not the real figures)' if args.trace else ''}"
        f"{' (under cProfile: not the real figures)' if args.profile else ''}"
    )
    if args.trace or args.profile:
        await trio.to_thread.run_sync(signal_and_wait, proxy, signal.SIGUSR2, mark, 2)
    for c in clients:
        await c.close()
    if args.trace:
        report_trace(Path(f"{mark}.1"), Path(f"{mark}.2"), n, args)
    if args.profile:
        stats = pstats.Stats(f"{mark}.prof")
        stats.sort_stats("tottime").print_stats(args.profile)
        stats.sort_stats("cumulative").print_stats(args.profile)
        if args.callees:
            stats.print_callees(args.callees)


def _mine(frame: tracemalloc.Frame) -> bool:
    return "imapveil" in frame.filename or "/trio/" in frame.filename


def report_trace(first: Path, second: Path, n: int, args: argparse.Namespace) -> None:
    a, b = tracemalloc.Snapshot.load(str(first)), tracemalloc.Snapshot.load(str(second))
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    a, b = a.filter_traces(ignore), b.filter_traces(ignore)
    total = sum(s.size_diff for s in b.compare_to(a, "filename"))
    print(f"\ntracemalloc: {total / n:.0f} B/session of Python allocations grew\n")
    print("objects the garbage collector tracks, by type (objects/session, B/session shallow):")
    was = json.loads(Path(f"{first}.census").read_text())
    now = json.loads(Path(f"{second}.census").read_text())
    grew = sorted(
        ((count - was.get(name, [0, 0])[0], size - was.get(name, [0, 0])[1], name)
         for name, (count, size) in now.items()),
        key=lambda row: -row[1],
    )  # fmt: skip
    for count, size, name in grew[: args.top]:
        if size > 0:
            print(f"  {size / n:8.1f} {count / n:6.2f}  {name}")
    print("\nby line (B/session, blocks/session):")
    for s in b.compare_to(a, "lineno")[: args.top]:
        if s.size_diff <= 0:
            continue
        f = s.traceback[0]
        print(f"  {s.size_diff / n:8.1f} {s.count_diff / n:6.2f}  {_short(f.filename)}:{f.lineno}")
    # By the innermost frames in imapveil or trio (stdlib and C frames folded into them).
    grouped: dict[tuple[str, ...], list[int]] = {}
    old: dict[tuple[str, ...], int] = {}
    for stat in a.statistics("traceback"):
        key = _key(stat.traceback, args.frames)
        old[key] = old.get(key, 0) + stat.size
    for stat in b.statistics("traceback"):
        key = _key(stat.traceback, args.frames)
        entry = grouped.setdefault(key, [0, 0])
        entry[0] += stat.size
        entry[1] += stat.count
    rows = sorted(
        ((size - old.get(key, 0), key) for key, (size, _count) in grouped.items()),
        reverse=True,
    )
    print(f"\nby the innermost {args.frames} imapveil/trio frames (B/session):")
    for size, key in rows[: args.top]:
        if size <= 0:
            break
        print(f"  {size / n:8.1f}  " + " <- ".join(key))


def _key(traceback: tracemalloc.Traceback, frames: int) -> tuple[str, ...]:
    mine = [f for f in reversed(traceback) if _mine(f)]  # innermost first
    first = traceback[-1] if len(traceback) else None  # the allocating frame (most recent)
    key = [f"{_short(f.filename)}:{f.lineno}" for f in mine[:frames]]
    if first is not None and not _mine(first):
        key.insert(0, f"[{_short(first.filename)}:{first.lineno}]")
    return tuple(key)


def _short(filename: str) -> str:
    for marker in ("/imapveil/", "/trio/", "/python3.11/"):
        if marker in filename:
            return marker.strip("/") + "/" + filename.split(marker, 1)[1]
    return filename


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, out, rest = sys.argv[2], sys.argv[3], sys.argv[5:]
        sys.exit(child(mode, out, rest))
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=500, help="measured sessions (500)")
    parser.add_argument("--warm", type=int, default=50, help="sessions opened first (50)")
    parser.add_argument("--naive", action="store_true", help="measure bench/naive_relay.py")
    parser.add_argument("--trace", action="store_true", help="tracemalloc attribution")
    parser.add_argument("--profile", type=int, metavar="N", help="cProfile: top N functions")
    parser.add_argument("--top", type=int, default=40, help="rows of each table (40)")
    parser.add_argument("--callees", metavar="REGEX", help="with --profile: what these call")
    parser.add_argument("--frames", type=int, default=3, help="frames a traceback group (3)")
    args = parser.parse_args()
    total = idle_sessions_that_fit(args.warm + args.sessions)
    if total < args.warm + args.sessions:
        args.sessions = total - args.warm
    users = {f"m{i}": "pw" for i in range(args.warm + args.sessions)}
    work = Path(tempfile.mkdtemp(prefix="imapveil-memory-"))
    dovecot = Dovecot(users, extra_config=dovecot_limits(args.warm + args.sessions))
    proxy = None
    try:
        dovecot.start()
        if args.naive:
            proxy = start_naive(dovecot)
        else:
            mode = "trace" if args.trace else "profile" if args.profile else "plain"
            proxy = start_imapveil(work, dovecot, mode)
        trio.run(measure, args, dovecot, proxy, work)
    finally:
        if proxy is not None:
            stop_group(proxy.process, signal.SIGTERM)
        dovecot.cleanup()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
