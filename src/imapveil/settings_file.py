"""Reading a file imapveil takes its settings from (the configuration, a policy, fingerprint
labels): bounded, so that a file of megabytes is refused before it is parsed."""

from __future__ import annotations

from pathlib import Path

MAX_FILE = 1024 * 1024
"""Octets of such a file at most. Real ones are kilobytes; Python's TOML reader takes some
0.4 s a megabyte of pure-Python work, holding the interpreter lock in turns with the sessions
(a reload reads in a worker thread, but the lock is shared)."""


class TooLarge(ValueError):
    pass


def read_limited(path: Path) -> bytes:
    """The file's octets; OSError if it cannot be read, TooLarge beyond `MAX_FILE`."""
    with path.open("rb") as f:
        data = f.read(MAX_FILE + 1)
    if len(data) > MAX_FILE:
        raise TooLarge(f"larger than {MAX_FILE // (1024 * 1024)} MiB: not a settings file")
    return data
