"""What a stderr nobody reads costs the sessions, and what a diagnostic line costs the loop.

    python bench/stderr_stall.py latency --src src [--stalled] [--noops 2000]
    python bench/stderr_stall.py micro [--lines 200000]

`latency`: `imapveil serve` (the tree `--src` first on PYTHONPATH) in front of a real Dovecot,
its stderr a 4 KiB pipe, read by a thread or (`--stalled`) never read and filled first; a SIGHUP
every 10 ms makes a reload line each (dropped once the buffer is full). One logged-in session
sends NOOPs one at a time; printed: their latency (p50, p99, max), or that one was not answered
within 2 s (the loop frozen).

`micro`: seconds per `log.info` call on the calling thread (the event loop's cost) and the
process's CPU per line (the reader thread's and the writer thread's included), for
logging.StreamHandler and logs.StderrHandler before `start` (at once) and after (the writer
thread), stderr a pipe read by a thread; best of 5 runs.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PIPE_SIZE = 4096


def _reader(fd: int) -> threading.Thread:
    def read() -> None:
        while os.read(fd, 65536):
            pass

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def latency(src: str, *, stalled: bool, noops: int) -> None:
    from tests.helpers.dovecot import Dovecot, free_port  # noqa: PLC0415

    dovecot = Dovecot().start()
    tmp = Path(tempfile.mkdtemp(prefix="stderr-stall-"))
    reader, writer = os.pipe()
    fcntl.fcntl(writer, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
    env.pop("JOURNAL_STREAM", None)
    command = [
        sys.executable, "-m", "imapveil", "serve",
        "--listen", f"127.0.0.1:{port}",
        "--upstream", f"127.0.0.1:{dovecot.address[1]}",
        "--events", str(tmp / "events.jsonl"),
        "--user-key-file", str(tmp / "user-key"),
        "--shutdown-grace", "0.5",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=writer, env=env)
    os.close(writer)
    try:
        seen = b""
        while b"listening on" not in seen:
            chunk = os.read(reader, 65536)
            assert chunk, seen
            seen += chunk
        if not stalled:
            _reader(reader)
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        file = sock.makefile("rb")
        file.readline()
        sock.sendall(b"l LOGIN alice wonderland\r\n")
        while not file.readline().startswith(b"l "):
            pass
        stop = threading.Event()

        def hup() -> None:
            while not stop.wait(0.01):
                process.send_signal(signal.SIGHUP)

        hupper = threading.Thread(target=hup, daemon=True)
        hupper.start()
        time.sleep(1.0)  # a bench, not a test: the pipe fills with reload lines meanwhile
        sock.settimeout(2.0)
        took: list[float] = []
        for n in range(noops):
            start = time.perf_counter()
            sock.sendall(b"n%d NOOP\r\n" % n)
            try:
                while not file.readline().startswith(b"n%d " % n):
                    pass
            except TimeoutError:
                print(f"NOOP {n} not answered within 2 s (after {len(took)} answered)")
                break
            took.append(time.perf_counter() - start)
        stop.set()
        hupper.join()
        if took:
            took.sort()
            p99 = took[min(len(took) - 1, int(len(took) * 0.99))]
            print(
                f"{'stalled' if stalled else 'read'} stderr, {len(took)} NOOPs: "
                f"p50 {statistics.median(took) * 1e3:.3f} ms, p99 {p99 * 1e3:.3f} ms, "
                f"max {took[-1] * 1e3:.3f} ms"
            )
        file.close()
        sock.close()
    finally:
        process.kill()
        process.wait()
        os.close(reader)
        dovecot.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


def micro(lines: int) -> None:
    from imapveil import logs  # noqa: PLC0415

    reader, writer = os.pipe()
    _reader(reader)
    stream = open(writer, "w", encoding="utf-8")  # noqa: SIM115 (the bench's life)
    formatter = logging.Formatter(logs.PLAIN_FORMAT)

    def run(handler: logging.Handler) -> tuple[float, float]:
        handler.setFormatter(formatter)
        log = logging.getLogger("bench.stderr")
        log.propagate = False
        log.setLevel(logging.INFO)
        log.addHandler(handler)
        best, cpu = float("inf"), float("inf")
        for _ in range(5):
            start, start_cpu = time.perf_counter(), time.process_time()
            for n in range(lines):
                log.info("session %s: a diagnostic line of a usual length, number %d", "abc", n)
            best = min(best, (time.perf_counter() - start) / lines)
            if isinstance(handler, logs.StderrHandler):
                handler.drain(30)
            cpu = min(cpu, (time.process_time() - start_cpu) / lines)
        log.removeHandler(handler)
        return best, cpu

    stream_handler = run(logging.StreamHandler(stream))
    at_once = run(logs.StderrHandler(stream))
    threaded = logs.StderrHandler(stream, capacity=1 << 30)  # nothing dropped: all is written
    threaded.start()
    background = run(threaded)
    threaded.stop()
    for name, (caller, cpu) in (
        ("logging.StreamHandler", stream_handler),
        ("StderrHandler, at once", at_once),
        ("StderrHandler, writer thread", background),
    ):
        print(f"{name + ':':30} {caller * 1e6:6.2f} us per call, {cpu * 1e6:6.2f} us CPU per line")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    lat = sub.add_parser("latency")
    lat.add_argument("--src", default=str(REPO / "src"))
    lat.add_argument("--stalled", action="store_true")
    lat.add_argument("--noops", type=int, default=2000)
    mic = sub.add_parser("micro")
    mic.add_argument("--lines", type=int, default=200_000)
    args = parser.parse_args()
    if args.what == "latency":
        latency(args.src, stalled=args.stalled, noops=args.noops)
    else:
        micro(args.lines)


if __name__ == "__main__":
    main()
