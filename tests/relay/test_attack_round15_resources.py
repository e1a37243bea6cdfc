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
"""

from __future__ import annotations

import enum
import gc
import socket
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from imapveil.protocol.config import CoreConfig
from imapveil.protocol.session import SessionCore
from tests.helpers.attack import own_dovecot, veil
from tests.helpers.dovecot import Dovecot

pytestmark = pytest.mark.dovecot
run = trio.to_thread.run_sync

MIB = 1 << 20


@pytest.fixture(scope="module")
def target() -> Iterator[Dovecot]:
    with own_dovecot() as server:
        yield server


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


async def one_core(commands: int) -> SessionCore:
    """The only open session's core, once it has read `commands` commands."""
    with trio.fail_after(60):
        while True:
            cores = live_cores()
            if len(cores) == 1 and cores[0].commands >= commands:
                return cores[0]
            await trio.sleep(0.05)


def attacker(address: tuple[str, int]) -> socket.socket:
    """A client that reads nothing after its LOGIN's answer (a 4 KiB receive buffer)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(30)
    s.connect(address)
    f = s.makefile("rb")
    assert f.readline().startswith(b"* OK")
    s.sendall(b"l LOGIN alice wonderland\r\n")
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
            core = await one_core(count + 1)
            kept = retained(core)
        await v.sessions_ended(1)
    assert kept < 2 * MIB, f"{kept} octets kept for one session"
