"""Round 13 of attacks from outside: the server's side of the stream, through the proxy (built
as `imapveil serve` builds it) to a real Dovecot.

- A mailbox name in modified UTF-7 whose run decodes to LF or CR LF (`x&AAo-+ y`): Dovecot
  decodes it and writes it into its answer's text as it is (`a NO Mailbox doesn't exist: x`,
  LF, `+ y`), so the client chooses lines the server sends. A `+` made so, behind a pipelined
  command with a LITERAL+ literal the server refuses, released that literal to Dovecot, which
  ran its octets as a command: an ID with identifiers reached Dovecot past the policy. The
  proxy now refuses such a run in any command line (`classify.shifted_control`), and ends the
  session at a literal of at most `max_line` octets that holds one, before its command ends.
- The same with a string Dovecot writes back as it came (`SORT (<literal>)`: "Unknown sort
  argument: ...", `SEARCH <literal>`: "Unexpected string as search key: ..."), a raw CR LF in
  a literal: such a literal ends the session too (not APPEND's message, nor a metadata value).
- Held (regression guards), compared with what Dovecot gives a direct connection, with the
  server's octets reaching the proxy a few at a time (`Trickle`): ENVELOPE and BODYSTRUCTURE
  with literals (8-bit and quoted text), BINARY literal8 on 8-bit and binary parts, a body
  whose lines look like tagged answers, `+` and `* BYE`; lines longer than the proxy holds;
  mailbox names Dovecot sends as literals in LIST and STATUS. A session `doveadm kick` ends
  mid-IDLE ends with Dovecot's `* BYE`, recorded as `server_bye`, IDLE unanswered.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import trio

from imapveil.records import CommandCompleted, Violation
from tests.helpers.attack import Client, DovecotLog, Identifiers, veil
from tests.helpers.dovecot import Dovecot

pytestmark = pytest.mark.dovecot
run = trio.to_thread.run_sync


class Trickle:
    """A TCP relay in front of `upstream` that sends what the server says `step` octets per
    send (TCP_NODELAY), so the proxy receives it cut at many places."""

    def __init__(self, upstream: tuple[str, int], step: int) -> None:
        self.upstream = upstream
        self.step = step
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> Trickle:
        return self

    def __exit__(self, *_exc: object) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for s in self.sockets:
            s.close()

    def _accept(self) -> None:
        while True:
            try:
                proxy_side, _ = self.listener.accept()
            except OSError:
                return
            server_side = socket.create_connection(self.upstream)
            for s in (proxy_side, server_side):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.sockets.append(s)
            threading.Thread(
                target=_pipe, args=(server_side, proxy_side, self.step), daemon=True
            ).start()
            threading.Thread(
                target=_pipe, args=(proxy_side, server_side, 1 << 20), daemon=True
            ).start()


def _pipe(source: socket.socket, sink: socket.socket, step: int) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            for i in range(0, len(data), step):
                sink.sendall(data[i : i + step])
        sink.shutdown(socket.SHUT_WR)


def comparable(transcript: bytes) -> bytes:
    """What may differ between two runs or a direct and a proxied one: Dovecot's timings, the
    capability lists the proxy mediates, RECENT (the first session to see a message takes it)."""
    t = re.sub(rb"\(\d+\.\d+ \+ \d+\.\d+(?: \+ \d+\.\d+)? secs\)", b"(T)", transcript)
    t = re.sub(rb"(?m)^.*CAPABILITY.*$", b"CAP", t)
    return re.sub(rb"(?m)^\* \d+ RECENT", b"* n RECENT", t)


# --- Mailbox names that decode to line ends.

SMUGGLE = [b"x&AAo-+ y", b"x&AA0ACg-+ y", b"&AGEACgArACA-y"]
"""Runs that decode to `x LF + y`, `x CR LF + y`, `a LF + SP y`: each makes Dovecot write a
line `+ y...` after its NO."""


def echo_then_literal(c: Client, name: bytes, smuggled: bytes) -> None:
    """A SELECT of `name`, then pipelined a command Dovecot refuses without reading its
    LITERAL+ literal (an unknown one), whose literal is a command of its own."""
    quoted = b'"' + name + b'"' if b" " in name else name
    c.send(
        b"a SELECT "
        + quoted
        + b"\r\nb XFOO {%d+}\r\n" % len(smuggled)
        + smuggled
        + b"\r\nd NOOP\r\n"
    )
    assert c.until(b"d").startswith(b"d OK"), c.transcript[-600:]


def test_dovecot_echoes_a_decoded_line_end(target: Dovecot) -> None:
    """The premise, on a direct connection: the decoded name's LF starts a line of its own."""
    with Client(target.address) as c:
        c.greeting()
        c.login()
        c.send(b'a SELECT "x&AAo-+ y"\r\n')
        c.until(b"a")
        c.send(b"z NOOP\r\n")
        c.until(b"z")
        assert b"\n+ y" in c.transcript, c.transcript[-300:]


def smuggling_session(address: tuple[str, int], name: bytes, smuggled: bytes) -> bytes:
    with Client(address) as c:
        c.greeting()
        c.login()
        echo_then_literal(c, name, smuggled)
        c.send(b"i IDLE\r\n")
        assert c.line().startswith(b"+ "), c.transcript[-300:]
        c.send(b"DONE\r\n")
        assert c.until(b"i").startswith(b"i OK"), c.transcript[-300:]
        return c.logout()


@pytest.mark.parametrize("name", SMUGGLE)
async def test_a_line_end_in_a_mailbox_name_is_refused(
    target: Dovecot, tmp_path: Path, name: bytes
) -> None:
    ids = Identifiers()
    log = DovecotLog(target)
    async with veil(target.address, tmp_path) as v:
        transcript = await run(smuggling_session, v.address, name, ids.id_command(b"c"))
        await v.sessions_ended(1)
    text = log.settled(1)
    assert ids.in_log(text) == [], text[-2000:]
    assert not re.search(rb"\n\+ (?!idling)", transcript), transcript[-600:]
    answers = {r.tag: r.status for r in v.sink.of(CommandCompleted)}
    assert answers["a"] == "BAD" and answers["b"] == "BAD" and "c" not in answers, answers
    kinds = [r.kind for r in v.sink.of(Violation)]
    assert "refused_shifted_control" in kinds, kinds
    assert "unknown_tag" not in kinds, kinds
    assert ids.in_records(v.records_json()) == []


def atom_session(address: tuple[str, int]) -> bytes:
    with Client(address) as c:
        c.greeting()
        c.login()
        c.send(b"a STATUS x&AA0ACg-b9+OK (MESSAGES)\r\n")
        assert c.until(b"a").startswith(b"a BAD"), c.transcript[-300:]
        c.send(b"z NOOP\r\n")
        assert c.until(b"z").startswith(b"z OK"), c.transcript[-300:]
        return c.logout()


async def test_a_line_end_in_a_mailbox_name_as_an_atom_is_refused(
    target: Dovecot, tmp_path: Path
) -> None:
    """The same name as an atom, in a command the one-match path takes (`Commands.simple`)."""
    async with veil(target.address, tmp_path) as v:
        transcript = await run(atom_session, v.address)
        await v.sessions_ended(1)
    # After the greeting: Dovecot's ends in eight random hex digits, "b9" among them 3 runs
    # in 100 (a run with the CPUs loaded failed so).
    greeting, rest = transcript.split(b"\r\n", 1)
    assert greeting.startswith(b"* OK ") and b"b9" not in rest, transcript


def utf7_session(address: tuple[str, int]) -> bytes:
    with Client(address) as c:
        c.greeting()
        c.login()
        c.send(b'a STATUS "caf&AOk-" (MESSAGES)\r\nb STATUS &AOk-t&AOk- (MESSAGES)\r\n')
        assert c.until(b"b").startswith(b"b NO"), c.transcript[-300:]
        assert b"a NO" in c.transcript
        return c.logout()


async def test_mailbox_names_in_utf7_that_are_no_controls_pass(
    target: Dovecot, tmp_path: Path
) -> None:
    async with veil(target.address, tmp_path) as v:
        await run(utf7_session, v.address)
        await v.sessions_ended(1)


def literal_session(address: tuple[str, int], name: bytes, smuggled: bytes) -> bytes:
    """The name as a LITERAL+ literal (its octets are counted, not read as a line)."""
    with Client(address) as c:
        c.greeting()
        c.login()
        c.send(
            b"a SELECT {%d+}\r\n" % len(name)
            + name
            + b"\r\nb XFOO {%d+}\r\n" % len(smuggled)
            + smuggled
            + b"\r\nd NOOP\r\n"
        )
        c.until(b"d")  # b"": the proxy ended the session
        return c.logout()


@pytest.mark.parametrize("length", [0, 2000, 65000])
async def test_a_line_end_in_a_mailbox_name_as_a_literal_ends_the_session(
    target: Dovecot, tmp_path: Path, length: int
) -> None:
    """Dovecot echoes names up to its line limit (64 KiB): a run after 65,000 octets too."""
    ids = Identifiers()
    log = DovecotLog(target)
    name = b"n" * length + b"x&AAo-+ y"
    async with veil(target.address, tmp_path) as v:
        transcript = await run(literal_session, v.address, name, ids.id_command(b"c"))
        await v.sessions_ended(1)
    assert ids.in_log(log.settled(1)) == []
    assert b"* BYE" in transcript and b"\n+ y" not in transcript, transcript[-600:]
    answers = {r.tag: r.status for r in v.sink.of(CommandCompleted)}
    assert "c" not in answers and answers.get("a") is None, answers
    assert ids.in_records(v.records_json()) == []


# --- Held: the server's literals and long lines, cut at many places (regression guards).

SUBJECT = b"SUBJECT-13f2c0de"
BODY_MARK = b"BODY-9b1e77aa"
ODD = [
    b'From: "Al \\"x\\"" <alice@example.org>\r\nTo: b\xc3\xa9b <bob@example.org>\r\n'
    b"Subject: caf\xe9 " + SUBJECT + b' "q" \\ x\r\n'
    b'Content-Type: text/plain; charset="utf-8"; name="a\xc3\xa9"\r\n'
    b"Content-Transfer-Encoding: 8bit\r\n\r\n"
    b"a1 OK fake\r\n+ go on\r\n* BYE fake\r\n* 1 FETCH (BODY[] {3}\r\n" + BODY_MARK + b"\r\n",
    b'From: x@y\r\nSubject: bin\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"'
    b"\r\n\r\n--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64"
    b"\r\n\r\nAAECA0ZPTwAKDQ==\r\n--b\r\nContent-Type: text/plain\r\n"
    b"Content-Transfer-Encoding: binary\r\n\r\nL OK \x00\x01 x}\r\n--b--\r\n",
    b"From: a@b\r\nSubject: " + b"w" * 100_000 + b"{5}\r\n\r\nbody\r\n",
]
ODD_COMMANDS = [
    b"e FETCH 1:* (ENVELOPE BODYSTRUCTURE)",
    b"f FETCH 1:* (BINARY.PEEK[] BINARY.SIZE[1] BINARY.PEEK[1] BINARY.PEEK[2])",
    b"g FETCH 1:* (BODY.PEEK[] BODY.PEEK[HEADER.FIELDS (SUBJECT)])",
    b"h UID SEARCH ALL",
]


def odd_session(address: tuple[str, int]) -> bytes:
    with Client(address) as c:
        c.greeting()
        c.login(b"bob", b"builder")
        c.send(b"s EXAMINE INBOX\r\n")
        c.until(b"s")
        for command in ODD_COMMANDS:
            c.send(command + b"\r\n")
            assert c.until(command[:1]).startswith(command[:1] + b" OK"), c.transcript[-300:]
        c.send(b"i IDLE\r\n")
        assert c.line().startswith(b"+ "), c.transcript[-300:]
        c.send(b"DONE\r\n")
        assert c.until(b"i").startswith(b"i OK"), c.transcript[-300:]
        return c.logout()


@pytest.fixture(scope="module")
def seeded(target: Dovecot) -> Dovecot:
    target.seed("bob", ODD)
    return target


@pytest.mark.parametrize("step", [1, 3, 4096])
async def test_server_literals_in_odd_places_stay_in_step(
    seeded: Dovecot, tmp_path: Path, step: int
) -> None:
    direct = await run(odd_session, seeded.address)
    with Trickle(seeded.address, step) as trickle:
        async with veil(trickle.address, tmp_path) as v:
            proxied = await run(odd_session, v.address)
            await v.sessions_ended(1)
    assert comparable(proxied) == comparable(direct)
    assert v.sink.of(Violation) == []
    answers = [(r.tag, r.status) for r in v.sink.of(CommandCompleted)]
    assert answers == [(t, "OK") for t in ("L", "s", "e", "f", "g", "h", "i", "Q")], answers
    records = v.records_json()
    assert SUBJECT.decode() not in records and BODY_MARK.decode() not in records


NAMES = [b'q"""""x', b"end}", b"sp ace{3}", b"ta OK x"]
"""Folders made on disk: the first Dovecot sends as a literal (five quotes)."""


def names_session(address: tuple[str, int]) -> bytes:
    with Client(address) as c:
        c.greeting()
        c.login(b"bob", b"builder")
        for command in (
            b'a LIST "" *',
            b'b LIST "" * RETURN (STATUS (MESSAGES UIDNEXT))',
            b'c LSUB "" *',
        ):
            c.send(command + b"\r\n")
            assert c.until(command[:1]).startswith(command[:1] + b" OK"), c.transcript[-300:]
        c.send(b"d STATUS {7}\r\n")
        assert c.line().startswith(b"+ "), c.transcript[-300:]
        c.send(b'q"""""x (MESSAGES)\r\n')
        assert c.until(b"d").startswith(b"d OK"), c.transcript[-300:]
        return c.logout()


async def test_mailbox_names_dovecot_sends_as_literals_stay_in_step(
    seeded: Dovecot, tmp_path: Path
) -> None:
    box = bytes(seeded.maildir("bob") / "Maildir")
    for name in NAMES:
        for sub in (b"", b"/cur", b"/new", b"/tmp"):
            os.makedirs(box + b"/." + name + sub, exist_ok=True)
            os.chown(box + b"/." + name + sub, seeded.mail_uid, seeded.mail_gid)
    direct = await run(names_session, seeded.address)
    assert b'"." {7}\r\nq"""""x\r\n' in direct
    with Trickle(seeded.address, 2) as trickle:
        async with veil(trickle.address, tmp_path) as v:
            proxied = await run(names_session, v.address)
            await v.sessions_ended(1)
    assert comparable(proxied) == comparable(direct)
    assert v.sink.of(Violation) == []
    records = v.records_json()
    assert [n for n in (b'q\\"', b"end}", b"sp ace", b"ta OK") if n.decode() in records] == []


# --- Held: the server ends a session on its own (regression guard).


def kicked_session(address: tuple[str, int], server: Dovecot) -> bytes:
    with Client(address) as c:
        c.greeting()
        c.login(b"bob", b"builder")
        c.send(b"s SELECT INBOX\r\n")
        c.until(b"s")
        c.send(b"i IDLE\r\n")
        assert c.line().startswith(b"+ "), c.transcript[-300:]
        kick = [shutil.which("doveadm") or "doveadm", "-c", str(server.root / "dovecot.conf")]
        subprocess.run([*kick, "kick", "bob"], check=True, capture_output=True, timeout=10)
        return c.rest()


async def test_a_session_dovecot_kicks_mid_idle_ends_with_its_bye(
    target: Dovecot, tmp_path: Path
) -> None:
    async with veil(target.address, tmp_path) as v:
        transcript = await run(kicked_session, v.address, target)
        (ended,) = await v.sessions_ended(1)
    assert transcript.endswith(b"* BYE Server shutting down.\r\n"), transcript[-300:]
    assert (ended.reason, ended.state) == ("server_bye", "logout")
    answers = [(r.tag, r.status) for r in v.sink.of(CommandCompleted)]
    assert answers == [("L", "OK"), ("s", "OK"), ("i", None)], answers


def append_session(address: tuple[str, int]) -> tuple[bytes, bytes]:
    message = b"Subject: on mUTF-7\r\n\r\nA name like x&AAo-+ y decodes to a LF.\r\n"
    with Client(address) as c:
        c.greeting()
        c.login(b"bob", b"builder")
        c.send(b"a APPEND INBOX {%d+}\r\n" % len(message) + message + b"\r\n")
        assert c.until(b"a").startswith(b"a OK"), c.transcript[-300:]
        kept = c.transcript
        c.send(b"b APPEND {9+}\r\nx&AAo-+ y {%d+}\r\n" % len(message) + message + b"\r\n")
        return kept, c.rest()


async def test_appends_mailbox_literal_is_read_and_its_message_is_not(
    target: Dovecot, tmp_path: Path
) -> None:
    """A message that holds such a run goes (no mailbox name); a mailbox literal does not."""
    async with veil(target.address, tmp_path) as v:
        _, transcript = await run(append_session, v.address)
        await v.sessions_ended(1)
    assert b"\n+ y" not in transcript and b"* BYE" in transcript, transcript[-300:]
    answers = [(r.tag, r.status) for r in v.sink.of(CommandCompleted)]
    assert answers == [("L", "OK"), ("a", "OK"), ("b", None)], answers


# --- A literal Dovecot writes back into its answer as it came.

ECHOED = {
    "sort-criterion": (b"s1 SORT ({%d+}\r\n", b") UTF-8 ALL\r\n"),  # Unknown sort argument: ...
    "search-key": (b"s1 SEARCH {%d+}\r\n", b"\r\n"),  # Unexpected string as search key: ...
}


def echoed_literal_session(
    address: tuple[str, int], head: bytes, tail: bytes, smuggled: bytes
) -> bytes:
    echoed = b"X\r\n+ OK"
    with Client(address) as c:
        c.greeting()
        c.login(b"bob", b"builder")
        c.send(b"s EXAMINE INBOX\r\n")
        c.until(b"s")
        c.send(
            head % len(echoed)
            + echoed
            + tail
            + b"b XFOO {%d+}\r\n" % len(smuggled)
            + smuggled
            + b"\r\nd NOOP\r\n"
        )
        c.until(b"d")  # b"": the proxy ended the session
        return c.logout()


@pytest.mark.parametrize("where", ECHOED)
async def test_a_literal_with_a_line_end_dovecot_echoes_ends_the_session(
    target: Dovecot, tmp_path: Path, where: str
) -> None:
    head, tail = ECHOED[where]
    ids = Identifiers()
    log = DovecotLog(target)
    async with veil(target.address, tmp_path) as v:
        transcript = await run(echoed_literal_session, v.address, head, tail, ids.id_command(b"c"))
        await v.sessions_ended(1)
    assert ids.in_log(log.settled(1)) == []
    assert b"\n+ OK" not in transcript and b"* BYE" in transcript, transcript[-600:]
    answers = {r.tag: r.status for r in v.sink.of(CommandCompleted)}
    assert "c" not in answers and answers.get("s1") is None, answers
    assert ids.in_records(v.records_json()) == []


def catenate_session(address: tuple[str, int], smuggled: bytes) -> bytes:
    echoed = b"X\r\n+ OK"
    with Client(address) as c:
        c.greeting()
        c.login(b"bob", b"builder")
        c.send(
            b"u APPEND INBOX CATENATE (URL {%d+}\r\n" % len(echoed)
            + echoed
            + b")\r\nb XFOO {%d+}\r\n" % len(smuggled)
            + smuggled
            + b"\r\nd NOOP\r\n"
        )
        c.until(b"d")  # b"": the proxy ended the session
        return c.logout()


async def test_a_catenate_url_with_a_line_end_ends_the_session(
    target: Dovecot, tmp_path: Path
) -> None:
    """`NO [BADURL <url>]`: Dovecot writes the URL back as it came."""
    ids = Identifiers()
    log = DovecotLog(target)
    async with veil(target.address, tmp_path) as v:
        transcript = await run(catenate_session, v.address, ids.id_command(b"c"))
        await v.sessions_ended(1)
    assert ids.in_log(log.settled(1)) == []
    assert b"\n+ OK" not in transcript and b"* BYE" in transcript, transcript[-600:]
    assert ids.in_records(v.records_json()) == []
