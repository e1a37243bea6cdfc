"""Diagnostics on stderr: their format, and their level (set at start, changed on reload).

Under systemd, stderr is a stream into journald, and systemd says so in `JOURNAL_STREAM`
(`device:inode` of that stream, systemd.exec(5)). Then each line starts with its syslog priority
(`<3>` error, `<4>` warning, `<6>` info, `<7>` debug, as sd-daemon(3) describes) and carries no
time of its own: journald stamps every entry, and reads the prefix as the entry's priority, so
`journalctl -p warning` finds imapveil's warnings. Elsewhere (a terminal, a file, a container
runtime, stderr redirected by the unit) the format is `TIME LEVEL LOGGER: MESSAGE`.

The variable is compared with stderr itself, not just looked for: a child of a service inherits
it, and so does a process whose stderr was redirected since.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(name)s: %(message)s"

PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
"""Python's levels as syslog priorities (crit, err, warning, info); anything lower is debug (7)."""


def syslog_priority(levelno: int) -> int:
    for level, priority in PRIORITIES:
        if levelno >= level:
            return priority
    return 7


def is_journal(fd: int = 2, environ: Mapping[str, str] | None = None) -> bool:
    """Whether `fd` is the stream systemd connected to journald (`JOURNAL_STREAM` names it)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(fd)
        return st.st_dev == int(device) and st.st_ino == int(inode)
    except (OSError, ValueError):
        return False


class JournalFormatter(logging.Formatter):
    """`<N>logger: message`; every line of a multi-line message (a traceback) gets the prefix,
    since journald makes an entry of each line."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def setup(level: str, stream: TextIO | None = None) -> logging.Handler:
    """Diagnostics of every logger to `stream` (stderr), at `level` (`debug` … `error`)."""
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    try:
        journal = is_journal(stream.fileno())
    except (AttributeError, OSError, ValueError):  # a stream without a descriptor
        journal = False
    handler.setFormatter(JournalFormatter() if journal else logging.Formatter(PLAIN_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    set_level(level)
    return handler


def set_level(level: str) -> bool:
    """Apply `level` (a reload may change it); True if it changed."""
    root = logging.getLogger()
    new = logging.getLevelName(level.upper())
    if not isinstance(new, int) or root.level == new:
        return False
    root.setLevel(new)
    return True
