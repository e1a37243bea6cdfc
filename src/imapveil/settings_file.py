"""Reading a file imapveil takes its settings from (the configuration, a policy, fingerprint
labels): bounded, so that a file of megabytes is refused before it is parsed, and only a regular
file, so that a named pipe nobody writes is refused, not waited for."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import IO

MAX_FILE = 1024 * 1024
"""Octets of such a file at most. Real ones are kilobytes; Python's TOML reader takes some
0.4 s a megabyte of pure-Python work, holding the interpreter lock in turns with the sessions
(a reload reads in a worker thread, but the lock is shared)."""


class TooLarge(ValueError):
    pass


def open_regular(path: str | Path) -> IO[bytes]:
    """`path` opened for reading if it is a regular file; else OSError ("not a regular file").
    Opened without waiting: open(2) of a named pipe waits for a writer (a reload's thread, and
    every reload after it, held for good), and reading a device may never end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return open(fd, "rb")  # the caller closes it


def read_limited(path: Path) -> bytes:
    """The file's octets; OSError if it cannot be read (or is no regular file), TooLarge beyond
    `MAX_FILE`."""
    with open_regular(path) as f:
        data = f.read(MAX_FILE + 1)
    if len(data) > MAX_FILE:
        raise TooLarge(f"larger than {MAX_FILE // (1024 * 1024)} MiB: not a settings file")
    return data
