"""The sans-IO core's time per command and per session, warm and with the caches evicted.

    python bench/cold.py                 # evicting 0, 2 and 8 MiB between steps
    python bench/cold.py --evict 0 32 --steps 5000

In the serving process the core's `feed_client` takes about 5.6 us a NOOP and `feed_server` about
10 us (timestamps around them, 5,000 NOOPs through `imapveil serve`), where the same calls in a
loop take 2 and 3.5: between two of a session's wake-ups, Dovecot, the client and the kernel
run on the same cores, and the core's code and objects are out of the caches again. This
measures that: each step (a NOOP and its answer; a FETCH of flags and its answer; a whole
LOGIN/LOGOUT session through a new core) runs after writing to every cache line of an
`--evict` MiB buffer, and the median of `--steps` is printed beside the warm one. The buffer's
own writing is not timed. Python objects and bytecode a step touches are what it costs cold: a
step that touches less memory costs less here, whatever it costs in instructions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from imapveil.protocol.actions import Action
from imapveil.protocol.config import CoreConfig
from imapveil.protocol.session import SessionCore

GREETING = b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+] ready\r\n"
LOGGED_IN = b"a OK [CAPABILITY IMAP4rev1 IDLE NAMESPACE UIDPLUS LITERAL+] Logged in\r\n"
FLAGS = b"".join(b"* %d FETCH (FLAGS (\\Seen) UID %d)\r\n" % (i, i) for i in range(1, 21))


def core() -> SessionCore:
    return SessionCore(CoreConfig(), session_id="s", client="c", upstream="u", now=0.0)


def logged_in() -> SessionCore:
    c = core()
    c.start()
    c.feed_server(GREETING, 0.0)
    c.feed_client(b"a LOGIN alice secret\r\n", 0.0)
    c.feed_server(LOGGED_IN, 0.0)
    c.feed_client(b"s SELECT INBOX\r\n", 0.0)
    c.feed_server(b"* 20 EXISTS\r\ns OK [READ-WRITE] Select completed.\r\n", 0.0)
    return c


Step = Callable[[int], list[Action]]
"""A step: the actions the core returned (for tests/test_bench_cold.py to check)."""


def steps() -> dict[str, Step]:
    noop, fetch = logged_in(), logged_in()

    def noop_step(i: int) -> list[Action]:
        return noop.feed_client(b"n%d NOOP\r\n" % i, 1.0) + noop.feed_server(
            b"n%d OK NOOP completed (0.001 + 0.000 secs).\r\n" % i, 1.0
        )

    def fetch_step(i: int) -> list[Action]:
        return fetch.feed_client(b"f%d FETCH 1:* (FLAGS UID)\r\n" % i, 1.0) + fetch.feed_server(
            FLAGS + b"f%d OK Fetch completed.\r\n" % i, 1.0
        )

    def session_step(i: int) -> list[Action]:
        c = core()
        actions = c.start()
        actions += c.feed_server(GREETING, 0.0)
        actions += c.feed_client(b"a LOGIN alice secret\r\n", 0.0)
        actions += c.feed_server(LOGGED_IN, 0.0)
        actions += c.feed_client(b"b LOGOUT\r\n", 0.0)
        actions += c.feed_server(b"* BYE Logging out\r\nb OK Logout completed.\r\n", 0.0)
        actions += c.server_closed(0.1)
        return actions + c.finish(0.1)

    return {"NOOP": noop_step, "FETCH flags": fetch_step, "LOGIN/LOGOUT session": session_step}


def measure(step: Step, evict: bytearray, count: int) -> float:
    """The median microseconds of `step`, each after writing to every line of `evict`."""
    zeros = bytes(len(evict[::64]))
    took = []
    for i in range(count):
        if evict:
            evict[::64] = zeros
        began = time.perf_counter_ns()
        step(i)
        took.append(time.perf_counter_ns() - began)
    return statistics.median(took) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--evict", type=int, nargs="+", default=[0, 2, 8], help="MiB")
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()
    print("microseconds a step (median), warm and after evicting N MiB of cache")
    print(f"{'step':<22}" + "".join(f"{f'{m} MiB':>10}" for m in args.evict))
    for name, step in steps().items():
        for i in range(200):  # warm-up: first calls, caches of compiled patterns
            step(i)
        row = [measure(step, bytearray(m << 20), args.steps) for m in args.evict]
        print(f"{name:<22}" + "".join(f"{us:>10.1f}" for us in row))


if __name__ == "__main__":
    main()
