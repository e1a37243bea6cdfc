"""Diagnostics on stderr: their format, and their level (set at start, changed on reload).

Under systemd, stderr is a stream into journald, and systemd says so in `JOURNAL_STREAM`
(`device:inode` of that stream, systemd.exec(5)). Then each line starts with its syslog priority
(`<3>` error, `<4>` warning, `<6>` info, `<7>` debug, as sd-daemon(3) describes) and carries no
time of its own: journald stamps every entry, and reads the prefix as the entry's priority, so
`journalctl -p warning` finds imapveil's warnings. Elsewhere (a terminal, a file, a container
runtime, stderr redirected by the unit) the format is `TIME LEVEL LOGGER: MESSAGE`.

The variable is compared with stderr itself, not just looked for: a child of a service inherits
it, and so does a process whose stderr was redirected since.

While the service runs, no line is written from the event loop: stderr may take nothing for a
while (journald stalls on a full disk or an fsync storm, or is restarted; a paused terminal; a
container runtime that stopped reading its pipe), and a blocking write there would stop every
session. `StderrHandler` hands its lines to a writer thread instead, holding up to `BUFFER`
characters of them; beyond, a line is dropped and counted, and once stderr takes lines again a
warning says how many were lost. Until the event loop runs (a configuration error at start) and
once the service has stopped and stderr took what was held, lines are written at once, as
`logging.StreamHandler` writes them. The file description is not made non-blocking: it is
shared with whoever else holds it (the shell's terminal, the unit's other processes, journald's
socket handed to every process of the service), and they would get EAGAIN for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import sys
import threading
import time
import traceback
from collections import deque
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


BUFFER = 256 * 1024
"""Characters of diagnostics held for a stderr that takes nothing (a few thousand lines, on top
of what the pipe or socket holds itself); a line that would go beyond is dropped and counted."""

FLUSH_WITHIN = 1.0
"""Seconds stderr gets, when the service stops, to take the lines held: a stderr nobody reads
must not keep the service from exiting (nor a restart waiting: the lines of a stop are a few,
and a journal that took nothing for a second is stalled, not slow)."""

DROPPED = "%d diagnostic lines dropped: stderr was not being read"


class StderrHandler(logging.Handler):
    """Lines to `stream`: at once until `start`, then through a writer thread (see the module's
    text), in order, none lost while fewer than `capacity` characters wait."""

    def __init__(self, stream: TextIO, capacity: int = BUFFER) -> None:
        super().__init__()
        self.stream = stream
        self.capacity = capacity
        self.dropped = 0
        """Lines lost in all (`imapveil_diagnostics_dropped_total`)."""
        self._unsaid = 0  # lost since the last warning that said so
        self._queue: deque[tuple[str, int]] = deque()  # (text, lines of ours it holds)
        self._held = 0  # characters queued or being written
        self._cond = threading.Condition(threading.Lock())
        self._idle = False  # the writer waits for lines
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._writes = 0  # writes done (the thread's)
        self._broken = False  # a write failed (stderr closed): the thread has ended
        self._stuck_at: int | None = None  # `_writes` when a flush ran out of time

    # --- Synchronous (before the event loop, after it).

    def emit(self, record: logging.LogRecord) -> None:
        if self._thread is None:
            try:
                self.stream.write(self.format(record) + "\n")
                self.stream.flush()
            except RecursionError:
                raise
            except Exception:
                self.handleError(record)
            return
        if self._held >= self.capacity:  # not even formatted (read unlocked: a hint only)
            with self._cond:
                self.dropped += 1
                self._unsaid += 1
            return
        try:
            text = self.format(record) + "\n"
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
            return
        self._put(text, 1)

    def handleError(self, record: logging.LogRecord) -> None:
        """What `logging` prints of a line it could not format (a bug), through the writer
        thread once it runs; the message's template, never its arguments (they may hold what
        a log must not)."""
        if self._thread is None or not logging.raiseExceptions:
            super().handleError(record)
            return
        self._put(f"--- Logging error ---\n{traceback.format_exc()}Message: {record.msg!r}\n", 1)

    # --- The writer thread.

    def start(self) -> None:
        """From now on the lines go through the writer thread."""
        if self._thread is not None:
            return
        with contextlib.suppress(OSError, ValueError):
            self.stream.flush()  # what went before by other means
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="stderr", daemon=True)
        self._thread.start()

    def stop(self, within: float = FLUSH_WITHIN) -> bool:
        """Give stderr up to `within` seconds to take the lines held; if it took them, the
        thread ends and lines are written at once again (True). Otherwise the thread stays,
        holding what comes (False): a write that never ends must not keep the process."""
        if self._thread is None:
            return True
        if not self.drain(within):
            return False
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(within)
        if self._thread.is_alive():
            return False
        self._thread = None
        return True

    def flush(self) -> None:
        """`drain` (logging.shutdown calls it at exit)."""
        self.drain()

    def drain(self, within: float = FLUSH_WITHIN) -> bool:
        """Wait, up to `within` seconds, until stderr took every line held. Once a wait ran out
        of time, the next do not wait unless stderr took something meanwhile."""
        if self._thread is None:
            with contextlib.suppress(OSError, ValueError):
                self.stream.flush()
            return True
        with self._cond:
            if self._stuck_at is not None and self._stuck_at == self._writes:
                within = 0  # stderr took nothing since a flush gave up on it
            deadline = time.monotonic() + within
            while self._held or self._unsaid:
                if self._broken:
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    self._stuck_at = self._writes
                    return False
                self._cond.wait(left)
            self._stuck_at = None
        return True

    def close(self) -> None:
        self.stop()
        super().close()

    def _put(self, text: str, lines: int) -> None:
        with self._cond:
            if self._held >= self.capacity or self._broken:
                self.dropped += lines
                self._unsaid += lines
                return
            if self._unsaid:  # room again: stderr took lines since they were lost
                self._say_drops()
            self._queue.append((text, lines))
            self._held += len(text)
            if self._idle:
                self._cond.notify()

    def _say_drops(self) -> None:
        """The warning that lines were lost, queued where they were (`_cond` held)."""
        record = logging.LogRecord(
            "imapveil", logging.WARNING, __file__, 0, DROPPED, (self._unsaid,), None
        )
        text = self.format(record) + "\n"
        self._unsaid = 0
        self._queue.append((text, 0))
        self._held += len(text)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._unsaid and not self._stopping:
                    self._idle = True
                    self._cond.wait()
                self._idle = False
                if not self._queue:
                    if not self._unsaid:  # stopping, everything written
                        return
                    self._say_drops()  # lines were lost, none came after them to say so
                batch = list(self._queue)
                self._queue.clear()
            text = "".join(t for t, _ in batch)
            ok = self._write(text)
            with self._cond:
                self._held -= len(text)
                self._writes += 1
                if not ok:
                    lost = sum(n for _, n in batch)
                    self.dropped += lost
                    self._unsaid += lost
                    self._broken = True
                self._cond.notify_all()
            if not ok:
                return  # stderr is gone (closed, EPIPE): what comes is held, then dropped

    def _write(self, text: str) -> bool:
        stream = self.stream
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # a stream without a descriptor
            try:
                stream.write(text)
                stream.flush()
            except (OSError, ValueError):
                return False
            return True
        # Straight to the descriptor, not through the stream's buffer: its lock, held by this
        # thread in a write that does not end, would stop the interpreter's exit (it flushes
        # sys.stderr) and anyone printing to it.
        data = text.encode(getattr(stream, "encoding", None) or "utf-8", "backslashreplace")
        done = 0
        try:
            while done < len(data):
                try:
                    done += os.write(fd, data[done:] if done else data)
                except BlockingIOError:  # made non-blocking by another holder of it
                    waiting = select.poll()
                    waiting.register(fd, select.POLLOUT)
                    waiting.poll()
        except OSError:
            return False
        return True


def installed() -> StderrHandler | None:
    """The root logger's `StderrHandler` (`setup` installs it), if any."""
    for h in logging.getLogger().handlers:
        if isinstance(h, StderrHandler):
            return h
    return None


def setup(level: str, stream: TextIO | None = None) -> logging.Handler:
    """Diagnostics of every logger to `stream` (stderr), at `level` (`debug` … `error`)."""
    stream = sys.stderr if stream is None else stream
    handler = StderrHandler(stream)
    try:
        journal = is_journal(stream.fileno())
    except (AttributeError, OSError, ValueError):  # a stream without a descriptor
        journal = False
    handler.setFormatter(JournalFormatter() if journal else logging.Formatter(PLAIN_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        if isinstance(old, StderrHandler):
            old.close()
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
