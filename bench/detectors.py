"""Worst cases for the ID value checks: adversarial values of 1 KB, 60 KB and 1 MB.

    python bench/detectors.py

Prints, per value (1024 octets, the most the proxy examines; 60 KB; 1 MB): the slowest detector
run on the whole value (no 1024-octet cap, to show the detectors are linear by themselves),
`detect()` and the named shapes (capped, as the proxy runs them), one `apply()` of the default
policy to four such fields, and the e-mail pattern this replaced (quadratic, so not on 1 MB).
Tests do not time things; this does.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from imapveil.policy import apply
from imapveil.policy.detectors import DETECTORS, detect
from imapveil.policy.load import resolve_policy
from imapveil.policy.shapes import NAMED

# The e-mail pattern before issue 12: a search retries the local part from every position.
OLD_EMAIL = re.compile(rb"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")


def values(size: int) -> dict[str, bytes]:
    """Each value exactly `size` octets: a repeated unit, then a tail that spoils a match."""
    shapes = {
        "a*n + @": (b"a", b"@"),
        "@ + a*n": (b"a", b""),
        "a.a.a...": (b"a.", b""),
        "hex run": (b"0123456789abcdef", b"g"),
        "base64 run": (b"Ab1+", b"!"),
        "::::": (b":", b""),
        "1.1.1...": (b"1.", b""),
        "digits": (b"1", b""),
        "aa:aa:...": (b"aa:", b""),
        "a1 words": (b"a1 ", b""),
    }
    made = {}
    for label, (unit, tail) in shapes.items():
        body = unit * (size // len(unit) + 1)
        made[label] = (b"a@" if label.startswith("@") else b"") + body
        made[label] = made[label][: size - len(tail)] + tail
    return made


def seconds(f: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    f(*args)
    return time.perf_counter() - start


def shapes(value: bytes) -> None:
    for check in NAMED.values():
        check(value[:1024])  # as Shape.fits: never more than RFC 2971 allows


def main() -> None:
    policy = resolve_policy("default")
    everything = tuple(DETECTORS)
    print(
        f"{'value':<12} {'octets':>8} {'worst detector':>20} {'detect':>9} {'shapes':>9} "
        f"{'apply':>9} {'old email':>10}"
    )
    for size in (1024, 60_000, 1_000_000):
        for label, value in values(size).items():
            worst, slowest = max((seconds(f, value), name) for name, f in DETECTORS.items())
            capped = seconds(detect, value, everything)
            shaped = seconds(shapes, value)
            fields = tuple((f, value) for f in (b"name", b"version", b"os", b"os-version"))
            applied = seconds(lambda fs: apply(policy, fs, hasher=lambda v: "h"), fields)
            old = f"{seconds(OLD_EMAIL.search, value):9.3f}s" if size <= 60_000 else "-"
            print(
                f"{label:<12} {len(value):>8} {worst:>9.4f}s {slowest:>9} {capped:>8.5f}s "
                f"{shaped:>8.5f}s {applied:>8.5f}s {old:>10}"
            )


if __name__ == "__main__":
    main()
