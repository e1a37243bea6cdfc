"""The statistics spool: rows on local disk while the store cannot take them.

Numbered append-only JSON-lines files in one directory per instance, one fsync per batch, read
back in order and deleted once stored (see `sink` for when it is written and replayed).

Each line is `[kind, row]`, kind one of `KINDS`. A `traits` line (a session's traits, from
version 3 of the store's schema on) follows its session's line and is read in the same batch;
files written before it existed hold none and replay as they always did.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from imapveil.stats.store import COMMAND_COLUMNS, ID_COLUMNS, SESSION_COLUMNS, TRAITS_COLUMNS

log = logging.getLogger(__name__)

SPOOL_CAP = 256 * 1024 * 1024
"""Octets of spool at most (default); beyond it rows are dropped."""
SEGMENT = 8 * 1024 * 1024
"""Octets per spool file: a replay interrupted by a crash repeats at most one file."""
KINDS = ("session", "id", "command", "traits")
FOLLOWS = "traits"
"""The kind of item that belongs with the session row before it: never a batch of its own."""
_FOLLOWER = f'["{FOLLOWS}",'.encode()

Item = tuple[str, Sequence[Any]]


@dataclass
class Tally:
    """Session rows, and items of all kinds (session rows, ID exchanges, command counts, session
    traits)."""

    sessions: int = 0
    items: int = 0

    def add(self, items: Iterable[Item]) -> None:
        for kind, _ in items:
            self.items += 1
            self.sessions += kind == "session"


ARITY = {
    "session": len(SESSION_COLUMNS),
    "id": len(ID_COLUMNS),
    "command": len(COMMAND_COLUMNS),
    "traits": len(TRAITS_COLUMNS) + 1,
}
"""Values in a row of each kind (a `traits` row ends with its list of extension names)."""


def well_formed(kind: Any, row: Any) -> bool:
    """Whether `[kind, row]` is a spooled item the store can take: a known kind, a list of its
    length of plain values (and a `traits` row's names: a list of texts). The sink drops one
    that is not (a hand-edited or damaged line) before a replay, instead of failing every one."""
    if kind not in KINDS or not isinstance(row, list) or len(row) != ARITY[kind]:
        return False
    values = row[:-1] if kind == FOLLOWS else row
    if not all(v is None or isinstance(v, float) or _storable(v) for v in values):
        return False
    return kind != FOLLOWS or (
        isinstance(row[-1], list) and all(isinstance(n, str) and _storable(n) for n in row[-1])
    )


INT64 = 2**63
"""Integers a store column holds: within 64 bits, signed."""


def _storable(value: Any) -> bool:
    """A text a database can hold (UTF-8: no lone surrogate, which JSON may spell `\\ud800`),
    or an integer within 64 bits. Either one past that makes the driver raise an error that is
    not the database's (UnicodeEncodeError, OverflowError), taken for the store being away: the
    line replayed at every probe, every later session behind it."""
    if isinstance(value, str):
        return value.isascii() or not any("\ud800" <= c <= "\udfff" for c in value)
    return isinstance(value, int) and -INT64 <= value < INT64


def spool_directory(state: Path, proxy: str) -> Path:
    """`stats-spool/<proxy>` in the state directory: one spool per instance."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", proxy)[:64].lstrip(".") or "proxy"
    return state / "stats-spool" / name


class SpoolError(Exception):
    pass


class Spool:
    """Rows on local disk, in order: numbered append-only JSON-lines files in one directory.

    Each line is `[kind, row]`. Blocking: used from the writer's worker thread only. A file of a
    previous run is never appended to (its last line may be torn by a crash: such a line is
    skipped and counted); a file is deleted once everything in it is stored.
    """

    def __init__(self, directory: Path, cap: int = SPOOL_CAP) -> None:
        self.directory = directory
        self.cap = cap
        self.bytes = 0
        self.corrupt = 0
        self._files: list[Path] = []  # in order; the last may be `_tail`
        self._tail: IO[bytes] | None = None
        self._tail_path: Path | None = None
        self._next = 1
        self._offset = 0  # read position in _files[0]
        self._lock: int | None = None

    @property
    def pending(self) -> bool:
        """Whether rows wait in the spool (or the head file is yet to be read to its end)."""
        return bool(self._files)

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SpoolError(f"{self.directory} is in use by another process") from None
        self._lock = fd
        found = sorted(self.directory.glob("*.jsonl"))
        self._files = [p for p in found if p.stem.isdigit()]
        self.bytes = sum(p.stat().st_size for p in self._files)
        self._next = max((int(p.stem) for p in self._files), default=0) + 1

    def close(self) -> None:
        self._close_tail()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _close_tail(self) -> None:
        if self._tail is not None:
            self._tail.close()
            self._tail = self._tail_path = None

    def append(self, items: Sequence[Item]) -> int:
        """Write the items that fit under the cap, durably; returns how many did."""
        lines: list[bytes] = []
        size = 0
        for kind, row in items:
            line = json.dumps([kind, list(row)], separators=(",", ":")).encode() + b"\n"
            if self.bytes + size + len(line) > self.cap:
                break
            lines.append(line)
            size += len(line)
        if not lines:
            return 0
        if self._tail is None or self._tail.tell() >= SEGMENT:
            self._close_tail()
            path = self.directory / f"{self._next:012d}.jsonl"
            self._next += 1
            # Unbuffered: a write that fails (a full disk) leaves no rows in a buffer of ours, to
            # go out with a later write (the rows then twice in the spool: they stay queued) or
            # to fail again at close (an exception at exit).
            self._tail = path.open("ab", buffering=0)
            self._tail_path = path
            self._files.append(path)
            _fsync_directory(self.directory)
        start = self._tail.tell()
        data = memoryview(b"".join(lines))
        try:
            done = 0
            while done < len(data):
                taken = self._tail.write(data[done:])  # what the file takes of it
                if not taken:
                    raise OSError(errno.EIO, "the spool file took nothing")
                done += taken
            os.fsync(self._tail.fileno())
        except OSError:
            # A full disk, say: leave the file as it was, so that the rows stay in memory only.
            with contextlib.suppress(OSError):
                self._tail.truncate(start)
                self._tail.seek(start)
            raise
        self.bytes += size
        return len(lines)

    def read(self, limit: int) -> tuple[list[Item], int]:
        """Up to `limit` items from the head, and the position after them (for `consume`)."""
        while self._files:
            head = self._files[0]
            items: list[Item] = []
            with head.open("rb") as f:
                f.seek(self._offset)
                while len(items) < limit:
                    line = f.readline()
                    if not line:
                        break
                    item = self._parse(head, line)
                    if item is not None:
                        items.append(item)
                position = self._follower(f, head, items)
            if position > self._offset:
                return items, position
            self._remove_head()  # an empty file (a crash right after it was made)
        return [], 0

    def _follower(self, f: IO[bytes], path: Path, items: list[Item]) -> int:
        """The position after the items read, taking the next line too if it is the traits of
        the session row read last (a batch never parts them); a line is peeked at only."""
        position = f.tell()
        line = f.readline()
        if items and items[-1][0] == "session" and line.startswith(_FOLLOWER):
            item = self._parse(path, line)
            if item is not None:
                items.append(item)
            return f.tell()
        return position

    def _parse(self, path: Path, line: bytes) -> Item | None:
        if line.endswith(b"\n"):
            try:
                parsed = json.loads(line)
            except ValueError:
                parsed = None
            if isinstance(parsed, list) and len(parsed) == 2:  # a JSON scalar is no item
                kind, row = parsed
                if kind in KINDS and isinstance(row, list):
                    return (kind, row)
        self.corrupt += 1  # a torn last line of a file that a crash interrupted, say
        log.warning("statistics spool: skipped an unreadable line in %s", path)
        return None

    def consume(self, position: int) -> None:
        """Everything before `position` in the head file is stored; a file stored to its end
        is deleted (the file being written too: the next append starts another)."""
        self._offset = position
        if self._files and position >= self._files[0].stat().st_size:
            self._remove_head()

    def _remove_head(self) -> None:
        head = self._files.pop(0)
        if head == self._tail_path:
            self._close_tail()
        size = head.stat().st_size
        head.unlink()
        _fsync_directory(self.directory)
        self.bytes = max(0, self.bytes - size)
        self._offset = 0


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
