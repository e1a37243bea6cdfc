"""Round 15 of attacks from outside, on resources: what one session can make the proxy keep in
memory, and how long one session can keep the event loop every session shares. Raw sockets
through the proxy (built as `imapveil serve` builds it) to a real Dovecot.

Memory is measured as what a session's core keeps (`retained`: every object reachable from its
`SessionCore` that is not shared with other sessions), counted, not timed: the proxy runs in
this test's trio run, and its cores are found among the live objects.

- Pipelined SELECTs with long mailbox names, the answers unread: every command waiting for its
  answer kept its mailbox name whole (up to the line limit, 64 KiB); Dovecot reads on and
  buffers its answers, so `max_unanswered` (10,000) commands could be waiting: 137 MB of the
  proxy's memory for one session after 2,300 of them (then Dovecot ran out of memory).
- Lines the proxy refuses itself, 3 octets each: one receive was read whole in one turn of the
  event loop (87,000 lines, ~370 ms); another client's NOOP took seconds meanwhile. Counted:
  the lines read in one call into the core.
- The server's side the same: a FETCH of a header field of 5,000 messages (a small literal
  each) was read a whole receive at a time, ~14,000 lines, ~70 ms.
- Pipelined NOOPs, unread: `max_unanswered` was checked before a receive, not within it (24,320
  commands seen waiting at once, 10,000 allowed), and 10,000 waiting commands are 4 MB.
- One hostile ID after another, each decided (milliseconds of the loop) once the one before
  was answered. Counted: the policy's decisions on the client's IDs.
"""

from __future__ import annotations

import base64
import binascii
import enum
import gc
import re
import socket
import sys
import threading
import time
import types
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from imapveil.policy.model import Policy
from imapveil.protocol import classify, lexer
from imapveil.protocol.commands import Commands
from imapveil.protocol.config import CoreConfig
from imapveil.protocol.responses import Responses
from imapveil.protocol.session import SessionCore
from imapveil.records import IdExchange
from tests.helpers.attack import Client, veil
from tests.helpers.dovecot import Dovecot

pytestmark = pytest.mark.dovecot
run = trio.to_thread.run_sync

MIB = 1 << 20


# --- Measuring a session.

_SHARED = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, enum.Enum)


def retained(core: SessionCore) -> int:
    """Octets of the objects reachable from `core` that are its own: not its configuration, nor
    classes, modules, functions or enum members (shared by every session)."""
    seen = {id(core.config)}
    todo: list[object] = [core]
    total = 0
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, (*_SHARED, CoreConfig)) or type(obj).__name__ == "method":
            continue
        total += sys.getsizeof(obj)
        todo.extend(gc.get_referents(obj))
    return total


def live_cores() -> list[SessionCore]:
    return [o for o in gc.get_objects() if isinstance(o, SessionCore) and not o.closed]


async def one_core(commands: int, client: socket.socket) -> SessionCore:
    """The open session's core of `client`, once it has read `commands` commands. Found by its
    client's address: a core another test left for the collector (in the same worker process)
    is no session of this one."""
    host, port = client.getsockname()[:2]
    address = f"{host}:{port}"
    with trio.fail_after(60):
        while True:
            cores = [c for c in live_cores() if c.client_address == address]
            if len(cores) == 1 and cores[0].commands >= commands:
                return cores[0]
            await trio.sleep(0.05)


def attacker(
    address: tuple[str, int], user: bytes = b"alice", password: bytes = b"wonderland"
) -> socket.socket:
    """A client that reads nothing after its LOGIN's answer (a 4 KiB receive buffer)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(30)
    s.connect(address)
    f = s.makefile("rb")
    assert f.readline().startswith(b"* OK")
    s.sendall(b"l LOGIN " + user + b" " + password + b"\r\n")
    while not (line := f.readline()).startswith(b"l "):
        assert line
    assert line.startswith(b"l OK"), line
    return s


# --- Commands waiting for their answers.

LONG_NAME = 60_000


async def test_pipelined_selects_of_long_names_keep_little(target: Dovecot, tmp_path: Path) -> None:
    """200 SELECTs of a 60,000-octet name (12 MB), answers unread: Dovecot reads them all
    (each `NO Mailbox doesn't exist: <name>` waits in its own buffer), so all wait for their
    answers in the proxy. Each kept its name whole: 12 MB for this session (and 640 MB for
    `max_unanswered` of them). A mailbox is kept up to `KEEP_LIMIT` octets, as one sent as a
    literal is."""
    count = 200
    async with veil(target.address, tmp_path) as v:
        s = await run(attacker, v.address)
        with s:
            select = b"s SELECT " + b"m" * LONG_NAME + b"\r\n"
            await run(s.sendall, select * count)
            core = await one_core(count + 1, s)
            kept = retained(core)
        await v.sessions_ended(1)
    assert kept < 2 * MIB, f"{kept} octets kept for one session"


# --- How much one session reads in one turn of the event loop.


class Turns:
    """Counts, for every call into a session's core (a turn of its reader task), the lines it
    read (the client's and the server's) and the most commands that waited for their answers."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.lines = 0
        self.most_lines = 0  # in one call
        self.most_unanswered = 0
        line, pend = Commands.line, Commands._pend

        def counting_line(commands: Commands, data: bytes) -> object:
            self.lines += 1
            return line(commands, data)

        def counting_pend(commands: Commands, cmd: object) -> None:
            pend(commands, cmd)  # type: ignore[arg-type]
            self.most_unanswered = max(self.most_unanswered, commands.unanswered_count)

        monkeypatch.setattr(Commands, "line", counting_line)
        for name in ("line", "data_line"):  # the server's lines
            monkeypatch.setattr(Responses, name, self._counting(getattr(Responses, name)))
        monkeypatch.setattr(Commands, "_pend", counting_pend)
        for name in ("feed_client", "feed_server", "resume_client", "resume_server"):
            if hasattr(SessionCore, name):
                monkeypatch.setattr(SessionCore, name, self._turn(getattr(SessionCore, name)))

    def _counting(self, call: Callable[..., object]) -> Callable[..., object]:
        def counting(*args: object) -> object:
            self.lines += 1
            return call(*args)

        return counting

    def _turn(self, call: Callable[..., list[object]]) -> Callable[..., list[object]]:
        def turn(core: SessionCore, *args: object) -> list[object]:
            before = self.lines
            try:
                return call(core, *args)
            finally:
                self.most_lines = max(self.most_lines, self.lines - before)

        return turn


REFUSED = b"x\r\n"  # no command: the proxy answers `* BAD` itself


def refused_flood(address: tuple[str, int], octets: int) -> tuple[int, bytes]:
    """`octets` of lines the proxy refuses, in one send, the answers read meanwhile; then a
    NOOP: (the BADs received, the NOOP's answer)."""
    s = attacker(address)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    with s:
        got: list[bytes] = []

        def read_all() -> None:
            data = b""
            while not re.search(rb"(^|\n)z [A-Z]", data[-300:]):
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
            got.append(data)

        reader = threading.Thread(target=read_all)
        reader.start()
        s.sendall(REFUSED * (octets // len(REFUSED)) + b"z NOOP\r\n")
        reader.join(60)
        assert got, "no answer to the NOOP"
        tail = got[0][got[0].rfind(b"\n", 0, len(got[0]) - 1) + 1 :]
        return got[0].count(b" BAD [CLIENTBUG]"), tail


async def test_a_flood_of_refused_lines_is_read_a_turn_at_a_time(
    target: Dovecot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lines the proxy refuses itself (3 octets each, a `* BAD` each): one receive (up to
    256 KiB) was read whole in one turn of the event loop every session shares, 87,000 lines,
    about 370 ms; a second client's NOOP took seconds while one session sent such lines. A
    session reads a bounded amount of lines per turn (`TURN`), then lets the others run."""
    turns = Turns(monkeypatch)
    octets = 1 << 20
    async with veil(target.address, tmp_path) as v:
        with trio.fail_after(120):
            bads, last = await run(refused_flood, v.address, octets)
        await v.sessions_ended(1)
    assert bads == octets // len(REFUSED), bads
    assert last.startswith(b"z OK"), last
    assert turns.most_lines <= 1000, f"{turns.most_lines} lines read in one turn"


def noop_flood(s: socket.socket) -> int:
    """NOOPs as fast as the proxy takes them, reading nothing, until it has taken none for a
    second: the octets sent."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    s.setblocking(False)
    chunk = b"a NOOP\r\n" * 8192
    sent, idle_since = 0, time.monotonic()
    while time.monotonic() - idle_since < 1.0:
        try:
            sent += s.send(chunk[sent % len(chunk) :])
            idle_since = time.monotonic()
        except BlockingIOError:
            time.sleep(0.01)
    return sent


async def test_pipelined_noops_unread_keep_little(
    target: Dovecot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NOOPs pipelined, the answers unread: the client was not read once `max_unanswered`
    (10,000) commands waited, but one receive (up to 256 KiB: 32,768 NOOPs) was read whole
    past it. Every waiting command is kept (its tag, its record's fields): 4-10 MB for one
    session. Now at most `max_unanswered` (1,000) wait, and the rest waits in the socket."""
    turns = Turns(monkeypatch)
    async with veil(target.address, tmp_path) as v:
        s = await run(attacker, v.address)
        with s, trio.fail_after(120):
            sent = await run(noop_flood, s)
            core = await one_core(1, s)
            kept = retained(core)
        await v.sessions_ended(1)
    assert sent > 100_000  # it flooded: 12,500 NOOPs and more, most waiting in socket buffers
    assert turns.most_unanswered <= 1000, turns.most_unanswered
    assert kept < 2 * MIB, f"{kept} octets kept for one session"


# --- IDs, one after another.

HOSTILE_ID = (
    b"("
    + b" ".join(
        b'"x-f%02d" "%s"' % (i, b"%030x:" % i + b"ab:cd:ef:01:23:45 " * 55) for i in range(30)
    )
    + b")"
)
"""30 values of ~1,000 octets full of MAC addresses: milliseconds of the loop to decide."""


def ids_one_after_another(address: tuple[str, int], count: int) -> list[bytes]:
    """`count` hostile IDs, each sent once the one before is answered: their tagged answers."""
    with Client(address) as c:
        c.greeting()
        c.login()
        answers = []
        for i in range(count):
            tag = b"i%d" % i
            c.send(tag + b" ID " + HOSTILE_ID + b"\r\n")
            answers.append(c.until(tag))
        c.logout()
    return answers


async def test_a_session_has_its_share_of_id_decisions(
    target: Dovecot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deciding a hostile ID costs milliseconds of the loop every session shares (10 ms on a
    quiet machine), and a session could send one ID after another, each decided once the one
    before was answered: a second client's NOOP took 14-22 ms (p50) meanwhile, 0.5 ms
    otherwise. IDs past the session's share (`max_id_records`, whose records it would not get
    anyway) go out as `ID NIL`, undecided, as an ID the proxy cannot parse does; each is
    answered by the server as usual."""
    decided = 0
    apply = Policy.apply

    def counting(policy: Policy, *args: Any, **kwargs: Any) -> Any:
        nonlocal decided
        decided += not kwargs.get("trusted_client")  # the client's IDs, not the server's
        return apply(policy, *args, **kwargs)

    monkeypatch.setattr(Policy, "apply", counting)
    async with veil(target.address, tmp_path) as v:
        answers = await run(ids_one_after_another, v.address, 30)
        await v.sessions_ended(1)
    assert all(a.startswith(b"i%d OK" % i) for i, a in enumerate(answers)), answers
    assert decided <= 10, f"{decided} IDs decided in one session"
    assert len(v.sink.of(IdExchange)) == 10


# --- The server's answers: many short lines in one receive.

MESSAGES = 5000


def many_messages(address: tuple[str, int]) -> bytes:
    """bob's own new mailbox with MESSAGES tiny messages (one MULTIAPPEND, directly)."""
    box = b"R15-" + uuid.uuid4().hex.encode()
    message = b"Subject: m\r\n\r\nm\r\n"
    with Client(address, timeout=60) as c:
        c.greeting()
        c.login(b"bob", b"builder")
        c.send(b"c CREATE " + box + b"\r\n")
        assert c.until(b"c").startswith(b"c OK"), c.transcript[-300:]
        each = b" {%d+}\r\n" % len(message) + message
        c.send(b"a APPEND " + box + each * MESSAGES + b"\r\n")
        assert c.until(b"a").startswith(b"a OK"), c.transcript[-300:]
        c.logout()
    return box


def fetch_unread_then_read(address: tuple[str, int], box: bytes) -> bytes:
    """A header field of every message (a small literal each: `{2}`), the answer left unread
    for a moment (it waits in the socket buffers), then read: the tagged answer."""
    s = attacker(address, b"bob", b"builder")
    with s:
        f = s.makefile("rb")
        s.sendall(b"s SELECT " + box + b"\r\nf FETCH 1:* (BODY.PEEK[HEADER.FIELDS (X-NONE)])\r\n")
        time.sleep(1.0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        while not (line := f.readline()).startswith(b"f "):
            assert line, "no answer"
        return line


async def test_a_long_answer_of_short_lines_is_read_a_turn_at_a_time(
    target: Dovecot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FETCH of a header field of 5,000 messages (a client's everyday request): each message's
    line announces a literal, which the proxy reads. The server's receive (up to 256 KiB) was
    read whole in one turn of the loop every session shares: ~14,000 lines, ~70 ms (two small
    literals a message: 135 ms). The server's side reads at most `TURN` per call too."""
    box = await run(many_messages, target.address)
    turns = Turns(monkeypatch)
    async with veil(target.address, tmp_path) as v:
        with trio.fail_after(120):
            answer = await run(fetch_unread_then_read, v.address, box)
        await v.sessions_ended(1)
    assert answer.startswith(b"f OK"), answer
    assert turns.most_lines <= 1000, f"{turns.most_lines} lines read in one turn"


# --- The lines that cost the most to read, read in C: the same answers as the loops they replace.


def _read_astring_loop(data: bytes, pos: int) -> tuple[bytes, int] | None:
    """`lexer.read_astring` as it was: a loop over octets (11 ms for a 64 KiB quoted name)."""
    n = len(data)
    if pos >= n:
        return None
    if data[pos] == ord('"'):
        out = bytearray()
        i = pos + 1
        while i < n:
            c = data[i]
            if c == ord("\\") and i + 1 < n:
                out.append(data[i + 1])
                i += 2
                continue
            if c == ord('"'):
                return bytes(out), i + 1
            if c in (0x0A, 0x0D):
                return None
            out.append(c)
            i += 1
        return None
    end = pos
    while end < n and data[end] in lexer.ASTRING_CHARS:
        end += 1
    return None if end == pos else (data[pos:end], end)


def _depth_loop(content: bytes, depth: int) -> int | None:
    """The list depth after `content` as `classify.fragment` followed it (a loop over its
    parentheses, 17 ms for 32,000 of them); None: a ")" without its "(" ."""
    for token in re.finditer(rb'"(?:[^"\\]++|\\.)*+"|[()]', content):
        c = token.group()
        if c == b"(":
            depth += 1
        elif c == b")":
            depth -= 1
            if depth < 0:
                return None
    return depth


_ASTRINGS = st.binary(max_size=40) | st.lists(
    st.sampled_from([b'"', b"\\", b"a", b"]", b"\r", b"\n", b" ", b"(", b"\x00", b"\xff"]),
    max_size=30,
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(_ASTRINGS, st.integers(0, 3), st.none() | st.integers(0, 12))
def test_read_astring_reads_as_the_loop_did(data: bytes, pos: int, limit: int | None) -> None:
    expected = _read_astring_loop(data, pos)
    got = lexer.read_astring(data, pos, limit)
    if expected is None:
        assert got is None
    else:
        assert got == (expected[0][:limit], expected[1])


_CONTENTS = st.lists(
    st.sampled_from([b"(", b")", b'"', b"\\", b" ", b"a", b"()", b'"("', b'"\\""', b"\\\\"]),
    max_size=30,
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(_CONTENTS, st.integers(0, 3))
def test_list_depth_follows_as_the_loop_did(content: bytes, depth: int) -> None:
    body = b"a FETCH " + content
    frag = classify.fragment(body, 8, depth)
    if frag.problem not in (None, "unbalanced_list"):
        return  # not read at all (an unterminated or badly escaped quoted string)
    expected = _depth_loop(content, depth)
    if expected is None:
        assert frag.problem == "unbalanced_list"
    else:
        assert (frag.problem, frag.depth) == (None, expected)


def _shifted_control_loop(content: bytes) -> bool:
    """`classify.shifted_control` as it was: each run decoded, and a loop over its units."""
    for m in re.finditer(rb"&([A-Za-z0-9+,]++)-", content):
        run = m.group(1).replace(b",", b"/")
        run = run[: len(run) // 4 * 4 + (len(run) % 4 > 1) * (len(run) % 4)]
        try:
            raw = binascii.a2b_base64(run + b"=" * (-len(run) % 4))
        except binascii.Error:
            continue
        for i in range(0, len(raw) - 1, 2):
            unit = raw[i] << 8 | raw[i + 1]
            if unit < 0x20 or unit == 0x7F:
                return True
    return False


def _utf7(text: str) -> bytes:
    """`text` as one modified UTF-7 run (any code units, controls included)."""
    encoded = base64.b64encode(text.encode("utf-16-be", "surrogatepass")).rstrip(b"=")
    return b"&" + encoded.replace(b"/", b",") + b"-"


_RUN_CHARS = st.sampled_from(list(b"AB,/+wgQa09Zz"))
_RUNS = st.lists(
    st.lists(_RUN_CHARS, max_size=20).map(lambda cs: b"&" + bytes(cs).replace(b"/", b",") + b"-")
    | st.text(st.characters(max_codepoint=0x2FFFF), max_size=6).map(_utf7)
    | st.sampled_from([b"x", b"&", b"-", b"&-", b" "]),
    max_size=8,
).map(b"".join)


@settings(max_examples=600, deadline=None)
@given(_RUNS)
def test_modified_utf7_controls_are_found_as_the_loop_found_them(content: bytes) -> None:
    assert classify.shifted_control(content) == _shifted_control_loop(content)
