"""The one-match answer widened to untagged `* OK [CLOSED]` (a73b495) and `* BYE` (196d1ce) lines
before the tagged answer, attacked from outside (attack8) with the helpers of
tests/relay/test_attack_simple.py: every case runs with the one-match paths and without, and
what the client receives, the records (the `state` each command began in) and the end must be
the same.

Against Dovecot: SELECT after SELECT, EXAMINE after SELECT, a SELECT of a missing mailbox and
one with arguments Dovecot refuses after reading the name (both after `* OK [CLOSED]`), UNSELECT
and CLOSE then SELECT, the same with QRESYNC enabled and parameters, LOGOUT in every state and
after the client's EOF, all of it pipelined in one receive, and `doveadm kick`. Against a
scripted server: BYEs Dovecot will not send on demand (before a NOOP's answer, with ALERT, with
CAPABILITY, with CLOSED before or after it), the client going on after the BYE, and the close.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from imapveil.records import CommandCompleted
from tests.helpers.attack import veil
from tests.helpers.dovecot import Dovecot
from tests.helpers.scripted import Peer, serve
from tests.relay.test_attack_simple import (
    Fed,
    Outcome,
    Scripted,
    Typist,
    both_ways,
    comparable,
    normal,
    run,
    states,
)

pytestmark = pytest.mark.dovecot


def fed_from_server(out: Outcome) -> int:
    """What the server sent, as the cores were fed it (the client sees capability lists
    rewritten)."""
    return sum(len(d) for s, d in out.chunks if s == "s")


def taken_answers(out: Outcome) -> list[bytes]:
    return [d for s, d in out.taken if s == "s"]


# --- Against Dovecot, a command a receive.


def reselect(c: Typist) -> None:
    """Every way Dovecot says `* OK [CLOSED]`, each followed by a NOOP whose record has the
    state the general path gives it."""
    c.sign_in()
    for tag, command, status in [
        (b"s1", b"SELECT INBOX", b"OK"),
        (b"s2", b"SELECT T", b"OK"),  # CLOSED, then selected again
        (b"s3", b"EXAMINE INBOX", b"OK"),
        (b"s4", b"SELECT Missing", b"NO"),  # CLOSED, then NO: authenticated
        (b"n1", b"NOOP", b"OK"),
        (b"s5", b"SELECT INBOX", b"OK"),
        (b"s6", b"SELECT INBOX (FOO)", b"BAD"),  # CLOSED, then BAD: authenticated
        (b"n2", b"NOOP", b"OK"),
        (b"s7", b"SELECT T", b"OK"),
        (b"u1", b"UNSELECT", b"OK"),
        (b"s8", b"EXAMINE T", b"OK"),  # no CLOSED: nothing was selected
        (b"c1", b"CLOSE", b"OK"),
        (b"s9", b"SELECT INBOX", b"OK"),
        (b"sa", b"SELECT x (", b"BAD"),  # a parse error: no CLOSED, still selected
        (b"n3", b"NOOP", b"OK"),
    ]:
        assert c.ask(tag, command).startswith(tag + b" " + status), c.transcript[-800:]


def reselect_checked(out: Outcome) -> None:
    a, s = "authenticated", "selected"
    assert states(out) == [
        ("L", "not_authenticated", "OK"),
        ("s1", a, "OK"),
        ("s2", s, "OK"),
        ("s3", s, "OK"),
        ("s4", s, "NO"),
        ("n1", a, "OK"),
        ("s5", a, "OK"),
        ("s6", s, "BAD"),
        ("n2", a, "OK"),
        ("s7", a, "OK"),
        ("u1", s, "OK"),
        ("s8", a, "OK"),
        ("c1", s, "OK"),
        ("s9", a, "OK"),
        ("sa", s, "BAD"),
        ("n3", s, "OK"),
        ("Q", s, "OK"),
    ]
    closed = [d.split(b"\r\n")[-2][:3] for d in taken_answers(out) if b"[CLOSED]" in d]
    # Dovecot's CLOSED came in the one chunk with its answer, which the one-match path took.
    assert closed == [b"s2 ", b"s3 ", b"s4 ", b"s6 "], taken_answers(out)
    assert out.transcript.count(b"* OK [CLOSED]") == 4
    # The LOGOUT's BYE and answer: one chunk, taken.
    assert taken_answers(out)[-1].startswith(b"* BYE Logging out\r\nQ OK"), taken_answers(out)
    assert out.end.reason == "logout"
    assert out.end.bytes_from_client == out.sent
    assert out.end.bytes_from_server == fed_from_server(out)


def qresync(c: Typist) -> None:
    """With QRESYNC enabled: SELECT and EXAMINE with parameters, missing or refused, while a
    mailbox is selected (Dovecot's CLOSED, then its answer)."""
    c.sign_in()
    for tag, command, status in [
        (b"e1", b"ENABLE QRESYNC", b"OK"),
        (b"s1", b"SELECT INBOX", b"OK"),
        (b"s2", b"SELECT T (QRESYNC (1 1))", b"OK"),
        (b"s3", b"EXAMINE Missing (CONDSTORE)", b"NO"),
        (b"n1", b"NOOP", b"OK"),
        (b"s4", b"EXAMINE T (CONDSTORE)", b"OK"),
        (b"s5", b"EXAMINE INBOX (FOO)", b"BAD"),
        (b"n2", b"NOOP", b"OK"),
        (b"s6", b"select inbox", b"OK"),
        (b"s7", b"Select Missing", b"NO"),
        (b"n3", b"NOOP", b"OK"),
    ]:
        assert c.ask(tag, command).startswith(tag + b" " + status), c.transcript[-800:]


def qresync_checked(out: Outcome) -> None:
    a, s = "authenticated", "selected"
    assert states(out)[2:] == [
        ("s1", a, "OK"),
        ("s2", s, "OK"),
        ("s3", s, "NO"),
        ("n1", a, "OK"),
        ("s4", a, "OK"),
        ("s5", s, "BAD"),
        ("n2", a, "OK"),
        ("s6", a, "OK"),
        ("s7", s, "NO"),
        ("n3", a, "OK"),
        ("Q", a, "OK"),
    ]
    closed = [d.split(b"\r\n")[-2][:3] for d in taken_answers(out) if b"[CLOSED]" in d]
    assert closed == [b"s2 ", b"s3 ", b"s5 ", b"s7 "], taken_answers(out)
    assert out.transcript.count(b"* OK [CLOSED]") == 4
    assert out.end.reason == "logout"
    assert out.end.bytes_from_server == fed_from_server(out)


def pipelined(c: Typist) -> None:
    """The same, all in one receive, LOGOUT and a NOOP after it included: Dovecot answers
    what it reads, in chunks of its own, and closes after the LOGOUT."""
    c.sign_in()
    c.alone(
        b"s1 SELECT INBOX\r\ns2 SELECT T\r\ns3 EXAMINE INBOX\r\ns4 SELECT Missing\r\n"
        b"n1 NOOP\r\ns5 SELECT INBOX\r\ns6 SELECT INBOX (FOO)\r\nn2 NOOP\r\n"
        b"Q LOGOUT\r\nz NOOP\r\n"
    )
    c.rest()


def pipelined_checked(out: Outcome) -> None:
    # Read before any answer: every command began in the state before the chunk.
    tags = ["s1", "s2", "s3", "s4", "n1", "s5", "s6", "n2", "Q", "z"]
    statuses = ["OK", "OK", "OK", "NO", "OK", "OK", "BAD", "OK", "OK", None]
    assert states(out) == [
        ("L", "not_authenticated", "OK"),
        *((t, "authenticated", st) for t, st in zip(tags, statuses, strict=True)),
    ]
    assert out.end.reason == "logout"
    assert out.end.bytes_from_client == out.sent
    assert out.end.bytes_from_server == fed_from_server(out)


def logout_unauthenticated(c: Typist) -> None:
    """LOGOUT at once (the case adds it)."""


def logout_authenticated(c: Typist) -> None:
    c.sign_in()


def logout_selected(c: Typist) -> None:
    c.sign_in()
    assert c.ask(b"s", b"SELECT INBOX").startswith(b"s OK")


def logged_out(state: str) -> Callable[[Outcome], None]:
    def check(out: Outcome) -> None:
        assert states(out)[-1] == ("Q", state, "OK")
        assert normal(out.transcript).endswith(b"* BYE Logging out\r\nQ OK Logout completed.\r\n")
        assert normal(taken_answers(out)[-1]) == b"* BYE Logging out\r\nQ OK Logout completed.\r\n"
        assert out.end.reason == "logout"
        assert out.end.bytes_from_client == out.sent
        assert out.end.bytes_from_server == fed_from_server(out)

    return check


def half_closed_logout(c: Typist) -> None:
    """LOGOUT while selected, pipelined after a re-SELECT, then the client's EOF (`nc -N`):
    Dovecot's CLOSED chunk, then its BYE and answer, reach the client; the end is `logout`."""
    c.sign_in()
    assert c.ask(b"s", b"SELECT INBOX").startswith(b"s OK")
    c.alone(b"t SELECT T\r\n")
    assert c.until(b"t").startswith(b"t OK"), c.transcript[-800:]
    c.alone(b"Q LOGOUT\r\n")
    c.sock.shutdown(socket.SHUT_WR)
    c.rest()


def half_closed_checked(out: Outcome) -> None:
    assert states(out)[-2:] == [("t", "selected", "OK"), ("Q", "selected", "OK")]
    assert normal(taken_answers(out)[-1]) == b"* BYE Logging out\r\nQ OK Logout completed.\r\n"
    assert out.end.reason == "logout"
    assert out.end.bytes_from_client == out.sent
    assert out.end.bytes_from_server == fed_from_server(out)


CASES: dict[str, tuple[Callable[[Typist], None], Callable[[Outcome], None]]] = {
    "reselect": (reselect, reselect_checked),
    "qresync": (qresync, qresync_checked),
    "pipelined": (pipelined, pipelined_checked),
    "half-closed-logout": (half_closed_logout, half_closed_checked),
    "logout-unauthenticated": (logout_unauthenticated, logged_out("not_authenticated")),
    "logout-authenticated": (logout_authenticated, logged_out("authenticated")),
    "logout-selected": (logout_selected, logged_out("selected")),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_closed_and_bye_from_dovecot(
    target: Dovecot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Dovecot's CLOSED and BYE chunks, read by either path alike (see the cases)."""
    script, check = CASES[name]
    out = await both_ways(target, tmp_path, monkeypatch, script)
    check(out)


# --- Against a scripted server: BYEs Dovecot sends only when it must.


class Leaving(Scripted):
    """A server that answers a NOOP with `lines` before its tagged answer, in one receive, then
    reads what the client still sends until `c FETCH`, and closes."""

    def __init__(self, fed: Fed, lines: bytes) -> None:
        super().__init__(fed)
        self.lines = lines

    async def script(self, peer: Peer) -> None:
        await self._say(peer, b"* OK [CAPABILITY IMAP4rev1 LITERAL+] fake ready\r\n")
        await self._line(peer, b"L LOGIN")
        await self._say(peer, b"L OK in\r\n")
        await self._line(peer, b"s SELECT INBOX")
        await self._say(peer, b"* 1 EXISTS\r\ns OK [READ-WRITE] selected\r\n")
        await self._line(peer, b"n NOOP")
        await self._say(peer, self.lines + b"n OK done\r\n")
        while not self.received[-1].startswith(b"c "):
            await self._line(peer, b"")
        await trio.aclose_forcefully(peer.stream)


AFTER = [b"a NOOP\r\n", b"b UID FETCH 1 (FLAGS)\r\n", b"c FETCH 1 (FLAGS)\r\n"]
"""What the client sends after the answer with the BYE: the first two alone, then the last."""


def against_leaving(address: tuple[str, int], fed: Fed) -> tuple[bytes, int]:
    with Typist(address, fed) as c:
        c.greeting()
        assert c.ask(b"L", b"LOGIN x y").startswith(b"L OK"), c.transcript
        assert c.ask(b"s", b"SELECT INBOX").startswith(b"s OK"), c.transcript
        assert c.ask(b"n", b"NOOP").startswith(b"n OK"), c.transcript
        for line in AFTER:
            c.alone(line)
        return c.rest(), c.sent


LEAVING = {
    "bye": (b"* BYE Server shutting down.\r\n", True, "server_bye"),
    "bye-alert": (b"* BYE [ALERT] Going down now\r\n", True, "server_bye"),
    "bye-then-data": (b"* BYE x\r\n* 2 EXISTS\r\n* SEARCH 1\r\n", True, "server_bye"),
    "bye-capability": (b"* BYE [CAPABILITY IMAP4rev1] x\r\n", False, "server_bye"),
    "closed-then-bye": (b"* OK [CLOSED] a\r\n* BYE b\r\n", False, "server_bye"),
    "bye-then-closed": (b"* BYE b\r\n* OK [CLOSED] a\r\n", False, "server_bye"),
    "two-byes": (b"* BYE a\r\n* BYE b\r\n", True, "server_bye"),
    "closed": (b"* OK [CLOSED] a\r\n", True, "server_closed"),
    "bye-quoted": (b'* 1 FETCH (FLAGS (\\Seen) X "* BYE ")\r\n', True, "server_closed"),
    "bye-in-literal": (b"* 1 FETCH (BODY[] {8}\r\n* BYE x\n)\r\n", False, "server_closed"),
    "bye-lower": (b"* bye x\r\n", False, "server_bye"),
    "bye-bare": (b"* BYE\r\n", False, "server_bye"),
}


@pytest.mark.parametrize("name", list(LEAVING))
async def test_the_client_goes_on_after_a_bye(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """A BYE (or something like one) before a NOOP's answer, in the answer's receive: the
    one-match path takes it where it may (`taken`); either way the client's commands after it
    reach the server whole and in order, begin in the state the general path gives them
    (`logout` after a BYE), and the end says `server_bye` only after a real BYE."""
    lines, taken, reason = LEAVING[name]
    fed = Fed(monkeypatch)
    outcomes = []
    for simple in fed.each_way():
        server = Leaving(fed, lines)
        async with serve(server.script, server.sent) as address, veil(address, tmp_path) as v:
            transcript, sent = await run(against_leaving, v.address, fed)
            (end,) = await v.sessions_ended(1)
        assert transcript == bytes(server.sent)
        assert server.received[-3:] == AFTER
        assert (end.reason, end.bytes_from_client, end.bytes_from_server) == (
            reason,
            sent,
            len(server.sent),
        )
        answer = lines + b"n OK done\r\n"
        assert (("s", answer) in fed.taken) is (simple and taken), fed.taken
        records = comparable(v.sink.records)
        commands = [(r.tag, r.state, r.status) for r in v.sink.of(CommandCompleted)]
        outcomes.append((transcript, records, server.received))
        after = "logout" if reason == "server_bye" else "selected"
        if name == "closed":
            after = "authenticated"
        assert commands[-3:] == [("a", after, None), ("b", after, None), ("c", after, None)]
    assert outcomes[0] == outcomes[1]


def kick(dovecot: Dovecot) -> None:
    """`doveadm kick alice`: Dovecot says `* BYE Server shutting down.` and closes."""
    command = ["doveadm", "-c", str(dovecot.root / "dovecot.conf"), "kick", "alice"]
    subprocess.run(command, check=True, capture_output=True, timeout=10)


async def test_kicked_by_dovecot(
    target: Dovecot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dovecot's own BYE (the session kicked) after a SELECT that closed another mailbox: both
    paths end the session `server_bye`, in the logout state, every octet counted."""

    def kicked(c: Typist) -> None:
        c.sign_in()
        assert c.ask(b"s", b"SELECT INBOX").startswith(b"s OK")
        assert c.ask(b"t", b"SELECT T").startswith(b"t OK")
        assert c.ask(b"n", b"NOOP").startswith(b"n OK")
        kick(target)
        assert c.rest().endswith(b"secs).\r\n* BYE Server shutting down.\r\n"), c.transcript

    out = await both_ways(target, tmp_path, monkeypatch, kicked)
    assert states(out)[-2:] == [("t", "selected", "OK"), ("n", "selected", "OK")]
    assert (out.end.reason, out.end.state) == ("server_bye", "logout")
    assert out.end.bytes_from_client == out.sent
    assert out.end.bytes_from_server == fed_from_server(out)
