"""The JSON-lines event log: one object per line, appended to a file or written to stdout.

`emit` is called from the relay and must never block it: it only queues the record with the
time it came (a bounded queue). A writer task, in the event loop, encodes what is queued
(`ENCODE_SLICE` records between two checkpoints: about half a millisecond of the loop's time) and
writes up to `BATCH` records at a time from a worker thread, which runs no Python while it
writes: a slow disk slows the writer, not the sessions, and nothing competes with the event loop
for the interpreter lock. Encoding many records in one go costs a quarter of encoding each as it
comes: between two records of a session the proxy runs everything else (the other sessions, the
kernel, Dovecot on the same cores), and each record would be encoded with cold caches. When the
queue is full the record is dropped and counted; the count is written as a record of its own
once there is room again, so a reader of the log knows something is missing. A record that
cannot be encoded (a bug) is dropped, counted and logged the same way.

The queue is shared fairly, so that one session's flood cannot cost another session its
records: per-command and violation records ("bulk") may fill only three quarters of it, and one
session's bulk records at most an eighth; session starts and ends, ID exchanges and the service's
own records use the rest. Session traits (fingerprints) are never written here.
"""

from __future__ import annotations

import errno
import functools
import itertools
import json
import logging
import math
import os
import select
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import trio

from imapveil.records import CommandCompleted, Record, SessionEnded, SessionStarted
from imapveil.shown import shown
from imapveil.sinks import FAILURE_LOG_INTERVAL

log = logging.getLogger(__name__)


COALESCE = 0.25
"""Seconds the writer waits after a wake-up, so that one write carries many records (and the
encoding is a few long turns of the loop a second, not many: at 0.05 s, twenty a second, the
NOOP round trips they delayed were more than one in a hundred, and p99 rose 10-25 %)."""
BATCH = 5000
"""Records one write carries at most (one worker-thread round trip: slow while the loop is busy,
so a flood's records need large writes not to be crowded out of the queue)."""
ENCODE_SLICE = 250
"""Records encoded between two checkpoints: about half a millisecond of the event loop."""

CLOSE_WITHIN = 5.0
"""Seconds the event log gets at exit to take what is queued: a pipe nobody reads (a stuck log
collector) would keep the service from exiting for ever. What it has not taken by then is
counted lost and logged."""

_DROPS = b'","event":"records_dropped","count":'
"""In a line of ours that says how many records were dropped. Not only there: a client's ID
fields, recorded by a policy that keeps them all, can spell it as keys of the record's `client`
object (tests/test_attack_event_log.py); such a line has no `count` of its own, and is counted
as a record lost."""

BULK = frozenset(("command", "violation"))
"""Record kinds a single session can produce without bound (one per command it sends)."""


PRIVATE = frozenset(("traits",))
"""Record kinds the event log never writes (see `records.SessionTraits`)."""


_ENCODER = json.JSONEncoder(separators=(",", ":"))
"""Built once: `json.dumps` with separators builds an encoder per call."""


class _Clock:
    """`ts` values: the ISO 8601 text of a second is built once per second, not per record."""

    __slots__ = ("prefix", "second")

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""

    def stamp(self, when: float) -> str:
        # As datetime.fromtimestamp: microseconds rounded half to even, then cut to milliseconds.
        fraction, whole = math.modf(when)
        micros = round(fraction * 1e6)
        if micros >= 1_000_000:
            whole, micros = whole + 1, micros - 1_000_000
        second = int(whole)
        if second != self.second:
            self.second = second
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self.prefix}.{micros // 1000:03d}Z"


_CLOCK = _Clock()


def _timestamp(when: float | None = None) -> str:
    return _CLOCK.stamp(time.time() if when is None else when)


MAX_LINE = 32 * 1024
"""Octets of a record's line at most, its newline included: well within journald's `LineMax=`
(48 KiB by default), past which the journal cuts a line of stdout into entries none of which
is JSON. Only an `id` record comes near it: 30 recorded values of 256 control octets each, six
octets apiece in JSON (`\\u0001`), and up to 120 fields' names in `dropped` make 50 KB."""

_CUTS = ((64, 30), (16, 10), (4, 4))
"""How a record longer than `MAX_LINE` is cut, one step after another until it fits: each text
inside its objects and lists to so many characters, each list to so many items."""


def encode(record: Record | dict[str, Any], when: float | None = None) -> bytes:
    """One JSON line: `ts` first, then the record's fields; at most `MAX_LINE` octets."""
    ts = _timestamp(when)
    fast = _FAST.get(type(record))
    if fast is not None:
        line = fast(record, ts)
        if len(line) <= MAX_LINE:
            return line
    body = record if isinstance(record, dict) else record.to_dict()
    whole = {"ts": ts, **body}
    line = line if fast is not None else (_ENCODER.encode(whole) + "\n").encode()
    return line if len(line) <= MAX_LINE else _fitted(whole)


def _fitted(whole: dict[str, Any]) -> bytes:
    """A record too long for one line, cut to fit: the texts inside its objects and lists cut
    (ending `…[N more characters]`), its lists ending `…[N more]`, its own texts as they are
    (the record's kind, session, status); then its own texts cut too (a plain user name as long
    as a command line, in a session's end); failing all, its objects and lists null and its
    own texts cut to the first cut's length."""
    for own in (False, True):
        for chars, items in _CUTS:
            cut = {k: _cut(v, chars, items, own) for k, v in whole.items()}
            line = (_ENCODER.encode(cut) + "\n").encode()
            if len(line) <= MAX_LINE:
                return line
    bare = {
        k: None if isinstance(v, dict | list | tuple) else _cut(v, _CUTS[0][0], 0, True)
        for k, v in whole.items()
    }
    return (_ENCODER.encode(bare) + "\n").encode()


def _cut(value: Any, chars: int, items: int, nested: bool) -> Any:
    if isinstance(value, str):
        return shown(value, chars) if nested else value
    if isinstance(value, dict):
        return {k: _cut(v, chars, items, True) for k, v in value.items()}
    if isinstance(value, list | tuple):
        kept = [_cut(v, chars, items, True) for v in value[:items]]
        return [*kept, f"\u2026[{len(value) - items} more]"] if len(value) > items else kept
    return value


_STRING = json.encoder.encode_basestring_ascii
"""The encoder's own string escaping (in C): a JSON string, quotes included, ASCII only."""


def _value(value: str | None) -> str:
    return "null" if value is None else _STRING(value)


def _float(value: float | None) -> str:
    """As the encoder writes it: a finite float as float.__repr__ does, NaN and infinities as
    JavaScript names them."""
    if value is None:
        return "null"
    return repr(value) if math.isfinite(value) else _ENCODER.encode(value)


def _encode_command(r: CommandCompleted, ts: str) -> bytes:
    """The per-command record, the most frequent by far, written out field by field: the same
    octets as the general encoder (tests/test_jsonl_encoding.py compares them), at a third of
    its cost."""
    duration = _float(r.duration_ms)
    literals = ",".join([str(n) for n in r.literals])
    return (
        f'{{"ts":"{ts}","event":"command","session":{_STRING(r.session)},"tag":{_STRING(r.tag)},'
        f'"verb":{_STRING(r.verb)},"state":{_STRING(r.state)},"status":{_value(r.status)},'
        f'"code":{_value(r.code)},"duration_ms":{duration},"literals":[{literals}],'
        f'"mechanism":{_value(r.mechanism)},"user":{_value(r.user)}}}\n'
    ).encode()


def _encode_start(r: SessionStarted, ts: str) -> bytes:
    """Every session's first record, field by field (compared as `_encode_command` is)."""
    return (
        f'{{"ts":"{ts}","event":"session_start","session":{_STRING(r.session)},'
        f'"client":{_STRING(r.client)},"upstream":{_STRING(r.upstream)}}}\n'
    ).encode()


def _encode_end(r: SessionEnded, ts: str) -> bytes:
    """Every session's last record, field by field (compared as `_encode_command` is)."""
    return (
        f'{{"ts":"{ts}","event":"session_end","session":{_STRING(r.session)},'
        f'"client":{_STRING(r.client)},"upstream":{_STRING(r.upstream)},'
        f'"reason":{_STRING(r.reason)},"detail":{_value(r.detail)},"state":{_STRING(r.state)},'
        f'"user":{_value(r.user)},"duration_ms":{_float(r.duration_ms)},'
        f'"bytes_from_client":{int.__repr__(r.bytes_from_client)},'
        f'"bytes_from_server":{int.__repr__(r.bytes_from_server)},'
        f'"commands":{int.__repr__(r.commands)},'
        f'"client_tls":{"true" if r.client_tls else "false"},'
        f'"compressed":{"true" if r.compressed else "false"}}}\n'
    ).encode()


_FAST: dict[type, Callable[[Any, str], bytes]] = {
    CommandCompleted: _encode_command,
    SessionStarted: _encode_start,
    SessionEnded: _encode_end,
}
"""Encoders for the records every command and every session makes."""


class JsonLinesSink:
    def __init__(self, target: str, *, capacity: int = 10_000) -> None:
        self.target = target
        self.capacity = capacity
        self.dropped = 0
        self._unreported_drops = 0
        # (a record, when it came, its bulk session): encoded when written, see the module's text
        self._queue: deque[tuple[Record | dict[str, Any], float, str | None]] = deque()
        self._unencodable = 0  # records dropped because they could not be encoded (logged once)
        self._bulk = 0  # bulk records queued
        self._bulk_by_session: dict[str, int] = {}
        self._wake = trio.Event()
        self._file: IO[bytes] | None = None
        self._torn = False  # a failed write cut the file's last line short
        self._failing = False  # the last write failed
        self._failure_logged = 0.0
        self._writing = trio.Lock()
        self._job: _Write | None = None  # a write its task stopped waiting for (cancelled)

    def open(self, *, wait: bool = True) -> None:
        """Open the target now, so a bad path fails at start-up, not at the first record.
        `wait=False`: a named pipe nobody reads is an error (ENXIO), not waited for."""
        self._file, self._torn = _open_target(self.target, wait=wait)

    async def reopen(self, target: str) -> None:
        """Write to `target` from now on (the same path after log rotation, or a new one). If it
        cannot be opened (OSError), the file open before stays the one written to."""
        if target == "-" and self.target == "-":
            return  # stdout stays: nothing to wait for (a reader that stopped reading)
        async with self._writing:
            await self._drain_locked()
            # In a worker thread, as a reload reads its files: the log's file system may answer
            # late (a hung mount), and every session would wait. Not waited for: a named pipe
            # whose reader went away would keep the thread in open(2) until another came.
            # Abandoned if the reload is (a stop): the file open before stays.
            file, torn = await trio.to_thread.run_sync(
                functools.partial(_open_target, target, wait=False), abandon_on_cancel=True
            )
            old = self._file
            self.target, self._file, self._torn = target, file, torn
            if old is not None and old is not sys.stdout.buffer and old is not file:
                await trio.to_thread.run_sync(old.close, abandon_on_cancel=True)

    def emit(self, record: Record, when: float | None = None) -> None:
        """`when`: the time the record was made (`time.time()`), if not now."""
        if record.event in PRIVATE:
            return
        session = _bulk_session(record)
        if session is not None:
            mine = self._bulk_by_session.get(session, 0)
            if self._bulk >= self.capacity * 3 // 4 or mine >= self.capacity // 8:
                self.dropped += 1
                self._unreported_drops += 1
                return
            self._bulk += 1
            self._bulk_by_session[session] = mine + 1
        elif len(self._queue) >= self.capacity:
            self.dropped += 1
            self._unreported_drops += 1
            return
        now = time.time() if when is None else when
        if self._unreported_drops:
            self._say_drops(now)
        self._queue.append((record, now, session))
        self._wake.set()

    def _say_drops(self, now: float) -> None:
        """Queue a `records_dropped` record for the records lost and not said yet."""
        drops = {"event": "records_dropped", "count": self._unreported_drops}
        self._queue.append((drops, now, None))
        self._unreported_drops = 0

    async def run(self) -> None:
        """Write queued records until cancelled; then write what is left, and a
        `records_dropped` line for records lost that no record after them said."""
        try:
            while True:
                await self._wake.wait()
                await trio.sleep(COALESCE)
                self._wake = trio.Event()
                await self._drain()
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(CLOSE_WITHIN) as late:
                    while self._queue or self._job is not None:
                        await self._drain()
                    if self._unreported_drops:  # records lost, and none came after to say so
                        self._say_drops(time.time())
                        await self._drain()
                if late.cancelled_caught:
                    self._give_up()
                elif self._file is not None and self.target != "-":
                    self._file.close()

    async def flush(self) -> None:
        """Write everything queued so far."""
        await self._drain()

    async def _drain(self) -> None:
        async with self._writing:
            await self._drain_locked()

    async def _drain_locked(self) -> None:
        """Write what is queued now, and only that: records emitted meanwhile wait for the next
        round (after COALESCE), so that a steady trickle of records costs one write, one
        worker-thread round trip, per COALESCE, not one per record or two."""
        if self._job is not None:  # its records are the first queued
            job = self._job
            await trio.to_thread.run_sync(job.done.wait, abandon_on_cancel=True)
            self._written(job)
        queue = self._queue
        todo = len(queue)
        while todo and queue:
            count = min(todo, len(queue), BATCH)
            todo -= count
            parts = []
            for start in range(0, count, ENCODE_SLICE):
                if start:
                    # The others' turn. The queue only grows at its end meanwhile (the lock is
                    # ours): the records up to `count` stay where they are.
                    await trio.lowlevel.checkpoint()
                end = min(start + ENCODE_SLICE, count)
                parts.append(self._encode(itertools.islice(queue, start, end)))
            # Not waited for once cancelled (at exit: a write that never ends must not keep the
            # service from exiting): the final drain waits for it, as long as it may.
            job = _Write(self._write, count, b"".join(parts))
            # Cancelled since the last checkpoint (a cancel scope's holder runs while this
            # task waits in one that does not raise, as a lock taken does): not started, and
            # not the write in progress, which the final drain would wait for in vain. With
            # nothing run between this check and the thread's start, the write does start.
            await trio.lowlevel.checkpoint_if_cancelled()
            self._job = job
            await trio.to_thread.run_sync(job.run, abandon_on_cancel=True)
            self._written(job)

    def _written(self, job: _Write) -> None:
        """`job`'s write is over: its records are taken off the queue, those lost counted."""
        self._job = None
        written, error = job.result
        if error is not None:
            self._failed(job.data, written, error)
        elif self._failing:
            self._failing = False
            log.warning("the event log %s is written again", self.target)
        # Taken off the queue only once written (or failed): a cancellation before the write
        # leaves them for the final drain.
        queue = self._queue
        for _ in range(job.count):
            _record, _when, session = queue.popleft()
            if session is not None:
                self._bulk -= 1
                left = self._bulk_by_session[session] - 1
                if left:
                    self._bulk_by_session[session] = left
                else:
                    del self._bulk_by_session[session]

    def _give_up(self) -> None:
        """At exit, the event log took nothing for `CLOSE_WITHIN` seconds: what is queued (the
        write in progress included) is lost. The file stays open: the write may yet end."""
        lost = sum(not _is_drops(record) for record, _when, _session in self._queue)
        self._queue.clear()
        self.dropped += lost
        log.error(
            "the event log %s took nothing more for %g s: %d records lost at exit "
            "(%d in all)",
            self.target, CLOSE_WITHIN, lost, self.dropped,
        )  # fmt: skip

    def _encode(self, items: Iterable[tuple[Record | dict[str, Any], float, str | None]]) -> bytes:
        """The lines of `items`, joined. A record that cannot be encoded (a bug of ours: records
        hold strings, numbers and lists of them) is left out, counted as dropped, and logged
        once with its kind, never its content; the others are written."""
        lines = []
        for record, when, _session in items:
            try:
                lines.append(encode(record, when))
            except Exception:
                self.dropped += 1
                self._unreported_drops += 1  # said in the next record's company
                self._unencodable += 1
                if self._unencodable == 1:
                    kind = record.get("event") if isinstance(record, dict) else record.event
                    log.exception("an event log record (%s) could not be encoded", kind)
        return b"".join(lines)

    def _write(self, data: bytes) -> tuple[int, OSError | None]:
        """All of `data`, or what the file takes of it before an error: (octets written, the
        error or None). In a worker thread; nothing else writes meanwhile (`_writing`)."""
        file = self._file
        assert file is not None, "open() the sink first"
        try:
            fd = file.fileno()
        except (OSError, ValueError):  # a stream without a descriptor (stdout replaced)
            try:
                file.write(data)
                file.flush()
            except OSError as exc:
                return 0, exc
            return len(data), None
        if file is sys.stdout.buffer:
            file.flush()  # what went to stdout by other means first
        view, done = memoryview(data), 0
        try:
            if self._torn and _emptied(fd):  # truncated in place (copytruncate): no line left
                self._torn = False
            if self._torn and _write_some(fd, b"\n"):  # the last line was cut short
                self._torn = False
            while done < len(data):
                n = _write_some(fd, view[done:])
                if not n:
                    raise OSError(errno.EIO, "the event log took nothing")
                done += n
        except OSError as exc:
            return done, exc
        finally:
            view.release()
        return done, None

    def _failed(self, data: bytes, written: int, error: OSError) -> None:
        """A write took `written` octets of `data`, then failed (a full disk, an I/O error):
        the records whose lines did not go out whole are lost. They are counted (`dropped`,
        the metric) and said in a `records_dropped` line once writes go through again; a lost
        `records_dropped` line's own count is said again instead of being counted. A line cut
        short is ended before the next write, so that it stands on a line of its own."""
        start = data.rfind(b"\n", 0, written) + 1  # the first line not written whole
        if written > start:
            self._torn = True
        lost = 0
        for line in data[start:].splitlines():
            if _DROPS in line:
                try:
                    self._unreported_drops += int(json.loads(line)["count"])
                    continue
                except (ValueError, KeyError, TypeError):
                    pass
            lost += 1
        self.dropped += lost
        self._unreported_drops += lost
        now = time.monotonic()
        if not self._failing or now - self._failure_logged >= FAILURE_LOG_INTERVAL:
            self._failure_logged = now
            log.error(
                "cannot write the event log %s: %s (%d records lost so far)",
                self.target, error.strerror or error, self.dropped,
            )  # fmt: skip
        self._failing = True


def _emptied(fd: int) -> bool:
    """Whether `fd` is a regular file with nothing in it."""
    try:
        status = os.fstat(fd)
    except OSError:
        return False
    return stat.S_ISREG(status.st_mode) and not status.st_size


def _write_some(fd: int, data: bytes | memoryview) -> int:
    """`os.write`, waiting for room if the descriptor is non-blocking (stdout, a pipe another
    process made so: the flag is the file description's, shared), as a blocking write would."""
    while True:
        try:
            return os.write(fd, data)
        except BlockingIOError:
            waiting = select.poll()
            waiting.register(fd, select.POLLOUT)
            waiting.poll()


class _Write:
    """One write of the event log, in a worker thread that may outlive the task that started it
    (cancelled at exit): its result is kept here, not returned."""

    __slots__ = ("count", "data", "done", "result", "write")

    def __init__(self, write: Callable[[bytes], tuple[int, OSError | None]], count: int,
                 data: bytes) -> None:  # fmt: skip
        self.write = write
        self.count = count  # the records queued first that `data` holds
        self.data = data
        self.done = threading.Event()
        # Until the write says otherwise (it may raise: a bug), nothing of `data` went out.
        self.result: tuple[int, OSError | None] = (0, OSError(errno.EIO, "the write failed"))

    def run(self) -> None:
        try:
            self.result = self.write(self.data)
        finally:
            self.done.set()


def _is_drops(record: Record | dict[str, Any]) -> bool:
    """Whether `record` is our `records_dropped` record (its count is counted already)."""
    return isinstance(record, dict) and record.get("event") == "records_dropped"


def _open_target(target: str, *, wait: bool) -> tuple[IO[bytes], bool]:
    """(the file to write `target` with, whether its last line is cut short). Blocking."""
    if target == "-":
        return sys.stdout.buffer, False
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    fd = os.open(path, flags | (0 if wait else os.O_NONBLOCK), 0o666)
    if not wait:  # writes block (in the worker thread), as they always did
        os.set_blocking(fd, True)
    # Unbuffered: a write that fails leaves nothing in a buffer of ours, to go out later (the
    # disk freed) after records counted as lost, or to fail again at close.
    file = open(fd, "ab", buffering=0)  # noqa: SIM115 (kept open)
    # This file's own last line: one cut short (a full disk, by this process or one before it)
    # is ended before the first write; a new file (a rotation) has none.
    return file, _cut_short(target, file)


def _cut_short(target: str, file: IO[bytes]) -> bool:
    """Whether `file`, a regular file, ends with an unfinished line (not with a newline)."""
    if target == "-":
        return False
    try:
        status = os.fstat(file.fileno())
        if not status.st_size or not stat.S_ISREG(status.st_mode):
            return False
        with open(target, "rb", buffering=0) as f:  # ours is opened to append only
            return os.pread(f.fileno(), 1, status.st_size - 1) != b"\n"
    except (OSError, ValueError):  # not readable: assume it is whole
        return False


def _bulk_session(record: Record) -> str | None:
    """The session of a bulk record, or None for the records that are never crowded out."""
    if record.event not in BULK:
        return None
    return str(getattr(record, "session", ""))
