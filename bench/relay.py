"""Relay cost: imapveil beside a direct connection to the same Dovecot, measured in one run.

    python bench/relay.py [--size-mb 20] [--rounds 5]

Starts a private Dovecot on loopback (as the tests do) and `imapveil serve` in front of it, then
times the same workloads both ways and prints the ratio proxy/direct (1.00 = no cost). Numbers
are wall-clock medians on this machine; compare ratios, not absolute values, across machines.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers.dovecot import Dovecot, free_port


def session(address: tuple[str, int]) -> tuple[socket.socket, socket.SocketIO]:
    s = socket.create_connection(address, timeout=60)
    s.sendall(b"a LOGIN alice wonderland\r\nb EXAMINE INBOX\r\n")
    read_until(s, b"b OK")
    return s, socket.SocketIO(s, "rb")


def read_until(s: socket.socket, marker: bytes) -> int:
    """Read until a line starting with marker arrives; returns octets read."""
    total = 0
    tail = b"\n"  # every response line starts after a line end
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            raise ConnectionError("closed")
        total += len(chunk)
        tail = (tail + chunk)[-4096:]
        if b"\n" + marker in tail:
            return total


def fetch_big(address: tuple[str, int]) -> float:
    s, _ = session(address)
    start = time.perf_counter()
    s.sendall(b"f FETCH 1 BODY.PEEK[]\r\n")
    read_until(s, b"f OK")
    elapsed = time.perf_counter() - start
    s.close()
    return elapsed


def noop_round_trips(address: tuple[str, int], count: int = 2000) -> float:
    s, _ = session(address)
    start = time.perf_counter()
    for i in range(count):
        s.sendall(b"n%d NOOP\r\n" % i)
        read_until(s, b"n%d OK" % i)
    elapsed = time.perf_counter() - start
    s.close()
    return elapsed


def pipelined(address: tuple[str, int], count: int = 20000) -> float:
    s, _ = session(address)
    payload = b"".join(b"p%d NOOP\r\n" % i for i in range(count))
    start = time.perf_counter()
    s.sendall(payload)
    read_until(s, b"p%d OK" % (count - 1))
    elapsed = time.perf_counter() - start
    s.close()
    return elapsed


def median(fn: Callable[[tuple[str, int]], float], address: tuple[str, int], rounds: int) -> float:
    fn(address)  # warm up caches on both sides
    return statistics.median(fn(address) for _ in range(rounds))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    dovecot = Dovecot().start()
    proxy: subprocess.Popen[bytes] | None = None
    try:
        raw = os.urandom(args.size_mb * 1024 * 1024 * 3 // 4)
        message = b"Subject: bench\r\n\r\n" + base64.encodebytes(raw).replace(b"\n", b"\r\n")
        dovecot.seed("alice", [message])
        port = free_port()
        proxy = subprocess.Popen(
            [
                sys.executable, "-m", "imapveil", "serve",
                "--listen", f"127.0.0.1:{port}",
                "--upstream", f"127.0.0.1:{dovecot.port}",
                "--events", os.devnull,
                "--user-identity", "none",
                "--user-key-file", str(dovecot.root / "user-key"),
                "--log-level", "warning",
            ],
        )  # fmt: skip
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        via = ("127.0.0.1", port)
        print(f"{'workload':<34}{'direct':>12}{'imapveil':>12}{'ratio':>8}")
        for name, fn, unit in (
            (f"FETCH {len(message) / 2**20:.0f} MiB message", fetch_big, "MiB/s"),
            ("2000 NOOP round trips", noop_round_trips, "ms"),
            ("20000 pipelined NOOPs", pipelined, "ms"),
        ):
            direct = median(fn, dovecot.address, args.rounds)
            relayed = median(fn, via, args.rounds)
            if unit == "MiB/s":
                d, r = len(message) / 2**20 / direct, len(message) / 2**20 / relayed
            else:
                d, r = direct * 1000, relayed * 1000
            print(f"{name:<34}{d:>9.1f} {unit:<3}{r:>8.1f} {unit:<3}{relayed / direct:>7.2f}x")
        print("ratio = imapveil time / direct time (lower is better, 1.00 = free)")
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(timeout=15)
        dovecot.cleanup()


if __name__ == "__main__":
    main()
