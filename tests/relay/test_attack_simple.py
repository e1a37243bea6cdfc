"""The core's one-match paths (52d771c: `Commands.simple`, `Responses.simple`), attacked from
outside (attack4): raw sockets through the proxy (built as `imapveil serve` builds it) to a real
Dovecot, or to a scripted server where the server's misbehaviour is the attack.

A chunk shaped like a simple command (`x NOOP\\r\\n`) or a tagged answer (`f OK done\\r\\n`) is
made to arrive alone, as its own receive, where the session is not at a plain point: inside a
literal (after a `{N}` whose "+" came or not, after a `{N+}` the proxy made synchronizing, after
one the server refused), right after a literal before its command's end, mid-line, as a SASL
response, where IDLE wants DONE, in a refused command's skipped literal, while the first octets
could still be a PROXY header, around the proxy's own ID, after COMPRESS and STARTTLS. `Fed`
sees every chunk the cores are fed: a client sends a piece only once the proxy has read
everything before it (no sleeping), and the test knows which chunks a one-match path took.

Every Dovecot case runs twice, with the one-match paths and without (`SessionCore.SIMPLE`):
what the client receives (timings apart) and the records must be the same. Literal octets never
run at Dovecot: it would answer their tag `x`, and the message it stored shows them as octets.
"""

from __future__ import annotations

import base64
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from imapveil.protocol.commands import Commands
from imapveil.protocol.responses import Responses
from imapveil.protocol.session import SessionCore
from imapveil.records import CommandCompleted, IdExchange, SessionEnded, Violation
from imapveil.relay import splice
from tests.conftest import TlsMaterial
from tests.helpers.attack import (
    DISCONNECTED,
    TIMEOUT,
    Client,
    DovecotLog,
    Identifiers,
    veil,
)
from tests.helpers.dovecot import Dovecot
from tests.helpers.scripted import Peer, serve

pytestmark = pytest.mark.dovecot
run = trio.to_thread.run_sync

BOX = b"T"
"""The mailbox the cases append to, made afresh before each run (the same UIDs each time)."""


# --- What the cores were fed, and what the one-match paths took.


class Fed:
    """Every chunk fed to a session core, and the chunks a one-match path took (`taken`), as
    ("c" or "s", octets). Installed for one test; one session at a time goes through it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._monkeypatch = monkeypatch
        self.chunks: list[tuple[str, bytes]] = []
        self.taken: list[tuple[str, bytes]] = []
        self.cores: list[SessionCore] = []
        self._changed = threading.Condition()
        self._fed = trio.Event()  # set (and replaced) at each feed, in the proxy's trio run
        feed_client, feed_server = SessionCore.feed_client, SessionCore.feed_server
        commands_simple, responses_simple = Commands.simple, Responses.simple

        def fed_client(core: SessionCore, data: bytes, now: float) -> Any:
            return self._saw(core, "c", data, feed_client(core, data, now))

        def fed_server(core: SessionCore, data: bytes, now: float) -> Any:
            return self._saw(core, "s", data, feed_server(core, data, now))

        def took_command(commands: Commands, line: bytes) -> bool:
            taken = commands_simple(commands, line)
            if taken:
                self.taken.append(("c", bytes(line)))
            return taken

        def took_answer(responses: Responses, line: bytes) -> bool:
            taken = responses_simple(responses, line)
            if taken:
                self.taken.append(("s", bytes(line)))
            return taken

        def passed_client(core: SessionCore, n: int, now: float) -> None:
            passed(core, n, now)
            self._saw(core, "c", b"\0" * n, None)  # spliced: counted, never seen

        passed = SessionCore.passed_client
        monkeypatch.setattr(SessionCore, "passed_client", passed_client)
        monkeypatch.setattr(SessionCore, "feed_client", fed_client)
        monkeypatch.setattr(SessionCore, "feed_server", fed_server)
        monkeypatch.setattr(Commands, "simple", took_command)
        monkeypatch.setattr(Responses, "simple", took_answer)

    def each_way(self) -> Iterator[bool]:
        """For a case run twice: with the one-match paths (True), then without
        (`SessionCore.SIMPLE`), what was fed forgotten before each run."""
        for simple in (True, False):
            self._monkeypatch.setattr(SessionCore, "SIMPLE", simple)
            self.reset()
            yield simple

    def reset(self) -> None:
        with self._changed:
            self.chunks.clear()
            self.taken.clear()
            self.cores.clear()

    def _saw(self, core: SessionCore, side: str, data: bytes, actions: Any) -> Any:
        with self._changed:
            if core not in self.cores:
                self.cores.append(core)
            self.chunks.append((side, bytes(data)))
            self._changed.notify_all()
        self._fed.set()
        self._fed = trio.Event()
        return actions

    def total(self, side: str) -> int:
        return sum(len(d) for s, d in self.chunks if s == side)

    def _done(self, side: str, octets: int) -> bool:
        return self.total(side) >= octets or any(core.closed for core in self.cores)

    def wait(self, side: str, octets: int) -> None:
        """Until the cores have been fed `octets` from `side` in all, or the session closed (a
        close that no feed made, a failed TLS handshake, is seen within a poll's interval)."""
        deadline = time.monotonic() + TIMEOUT
        with self._changed:
            while not self._done(side, octets):
                assert time.monotonic() < deadline, (
                    f"the proxy read {self.total(side)} of {octets} octets: {self.chunks[-3:]}"
                )
                self._changed.wait(0.01)

    def wait_chunk(self, side: str, start: bytes) -> None:
        """Until a chunk starting with `start` has been fed from `side`."""
        with self._changed:
            assert self._changed.wait_for(
                lambda: any(s == side and d.startswith(start) for s, d in self.chunks), TIMEOUT
            ), f"no {start!r} fed: {self.chunks[-3:]}"

    async def server_fed(self, octets: int) -> None:
        """For a scripted server (in the proxy's own trio run): until the cores have been fed
        `octets` from servers."""
        with trio.fail_after(TIMEOUT):
            while not self._done("s", octets):
                await self._fed.wait()


class Typist(Client):
    """A client that sends each piece as its own receive at the proxy (`alone`)."""

    def __init__(self, address: tuple[str, int], fed: Fed | None) -> None:
        super().__init__(address)
        self.fed = fed
        self.sent = 0

    def __enter__(self) -> Typist:
        return self

    def ahead(self, data: bytes) -> None:
        """Send without waiting: the proxy may be holding the client back meanwhile."""
        self.send(data)
        self.sent += len(data)

    def alone(self, data: bytes) -> None:
        """Send, then wait until the proxy has read it (and everything before it)."""
        self.ahead(data)
        if self.fed is not None:
            self.fed.wait("c", self.sent)

    def through(self, suffix: bytes) -> None:
        """Read lines until what was received ends with `suffix` (an answer without a tag of
        the client's own, or one of several with the same tag)."""
        while not self.transcript.endswith(suffix):
            assert self.line(), self.transcript

    def ask(self, tag: bytes, command: bytes) -> bytes:
        """`tag command`, alone; its tagged answer."""
        self.alone(tag + b" " + command + b"\r\n")
        return self.until(tag)

    def sign_in(self) -> None:
        assert self.ask(b"L", b"LOGIN alice wonderland").startswith(b"L OK"), self.transcript


# --- Running a case through the proxy, with the one-match paths and without.


@dataclass
class Outcome:
    transcript: bytes
    sent: int
    records: list[dict[str, Any]]
    end: SessionEnded
    taken: list[tuple[str, bytes]]
    chunks: list[tuple[str, bytes]]
    log: str
    records_json: str
    commands: list[tuple[str, str, str | None]]
    spliced: int
    """Literals spliced in the session."""


_TIMING = re.compile(rb" \([0-9.]+(?: \+ [0-9.]+)* secs\)")
_NUMBERED = re.compile(rb"\[(UIDVALIDITY|APPENDUID) [0-9]+")
_VOLATILE = ("session", "client", "upstream", "duration_ms", "bytes_from_server")


def normal(transcript: bytes) -> bytes:
    """What two runs of a case share: Dovecot's timings and UIDVALIDITY apart."""
    return _NUMBERED.sub(rb"[\1 n", _TIMING.sub(b"", transcript))


def comparable(records: list[Any]) -> list[dict[str, Any]]:
    """The records two runs of a case share: what was answered, refused and ended, ports,
    session ids and timings apart."""
    kinds = CommandCompleted | Violation | IdExchange | SessionEnded
    return [
        {k: v for k, v in r.to_dict().items() if k not in _VOLATILE}
        for r in records
        if isinstance(r, kinds)
    ]


def fresh_box(dovecot: Dovecot) -> None:
    """alice's `T`, empty and new (directly, not through the proxy); returns once Dovecot has
    logged the connection's end."""
    ends = dovecot.logged(DISCONNECTED)
    with Client(dovecot.address) as c:
        c.greeting()
        c.login()
        c.send(b"d DELETE " + BOX + b"\r\n")
        c.until(b"d")
        c.send(b"c CREATE " + BOX + b"\r\n")
        assert c.until(b"c").startswith(b"c OK"), c.transcript
        c.logout()
    dovecot.wait_for_log(DISCONNECTED, ends + 1)


Script = Callable[[Typist], None]


async def through(
    dovecot: Dovecot, tmp_path: Path, fed: Fed, script: Script, **settings: Any
) -> Outcome:
    await run(fresh_box, dovecot)
    fed.reset()
    log = DovecotLog(dovecot)
    literals = splice.totals.literals
    async with veil(dovecot.address, tmp_path, **settings) as v:

        def session() -> tuple[bytes, int]:
            with Typist(v.address, fed) as c:
                c.greeting()
                script(c)
                if not c.eof:
                    c.ahead(b"Q LOGOUT\r\n")
                c.rest()
                return c.transcript, c.sent

        transcript, sent = await run(session)
        (end,) = await v.sessions_ended(1)
    text = await run(log.settled, 1)
    records = comparable(v.sink.records)
    commands = [(r.tag, r.verb, r.status) for r in v.sink.of(CommandCompleted)]
    return Outcome(
        transcript,
        sent,
        records,
        end,
        list(fed.taken),
        list(fed.chunks),
        text,
        v.records_json(),
        commands,
        splice.totals.literals - literals,
    )


async def both_ways(
    dovecot: Dovecot,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    script: Script,
    *,
    racy: frozenset[str] = frozenset(),
    **settings: Any,
) -> Outcome:
    """The case with the one-match paths (returned) and without: the same for the client and
    in the records; the general path never takes a chunk in one match. `racy`: tags of commands
    whose recorded state depends on whether the server's answer to an earlier command came
    before the proxy read them (Dovecot's timing, not the path taken): their state is not
    compared."""
    fed = Fed(monkeypatch)
    fast = await through(dovecot, tmp_path, fed, script, **settings)
    monkeypatch.setattr(SessionCore, "SIMPLE", False)
    try:
        general = await through(dovecot, tmp_path, fed, script, **settings)
    finally:
        monkeypatch.setattr(SessionCore, "SIMPLE", True)
    assert general.taken == []
    assert normal(fast.transcript) == normal(general.transcript), (
        fast.transcript[-1500:],
        general.transcript[-1500:],
    )
    assert _settled(fast.records, racy) == _settled(general.records, racy)
    assert fast.sent == general.sent
    return fast


def _settled(records: list[dict[str, Any]], racy: frozenset[str]) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in r.items() if k != "state"}
        if r["event"] == "command" and r["tag"] in racy
        else r
        for r in records
    ]


def states(out: Outcome, tags: str | None = None) -> list[tuple[str, str, str | None]]:
    """(tag, state the command was sent in, status) of the command records, in order: all of
    them, or those whose tag is one of `tags` (space-separated)."""
    wanted = None if tags is None else tags.split()
    return [
        (r["tag"], r["state"], r["status"])
        for r in out.records
        if r["event"] == "command" and (wanted is None or r["tag"] in wanted)
    ]


def answered(out: Outcome, tag: str) -> list[str | None]:
    """How the commands with this tag were answered, as recorded."""
    return [status for t, _verb, status in out.commands if t == tag]


def never_ran(out: Outcome, tag: bytes = b"x") -> None:
    """Nothing answered `tag` (Dovecot answers every command it runs) and no record has it
    (the proxy did not take it for a command either)."""
    answers = re.findall(rb"(?m)^" + re.escape(tag) + rb" (?:OK|NO|BAD)\b", out.transcript)
    assert answers == [], out.transcript[-1500:]
    assert tag.decode() not in [t for t, _verb, _status in out.commands], out.commands
    assert [d for _s, d in out.taken if d.startswith(tag + b" ")] == []


# --- The cases against Dovecot: a chunk shaped like `x NOOP` where no command may start.

SHOWN = Identifiers()


def shown_id() -> bytes:
    """An ID with identifiers: if the proxy lost its place, it would pass unread."""
    return b'b ID ("name" "Mail" ' + SHOWN.pairs() + b")\r\n"


def stored(c: Typist) -> None:
    """Then: an ID the proxy must read (and clean), and what Dovecot stored in `T`."""
    assert c.ask(b"b", shown_id()[2:-2]).startswith(b"b OK"), c.transcript[-1500:]
    assert c.ask(b"s", b"EXAMINE " + BOX).startswith(b"s OK")
    assert c.ask(b"f", b"UID FETCH 1:* BODY.PEEK[]").startswith(b"f OK"), c.transcript[-1500:]


def literal_after_plus(c: Typist) -> None:
    c.sign_in()
    c.alone(b"a APPEND T {8}\r\n")
    assert c.line().startswith(b"+ "), c.transcript
    c.alone(b"x NOOP\r\n")  # the literal, whole
    c.alone(b"\r\n")
    assert c.until(b"a").startswith(b"a OK"), c.transcript
    stored(c)


def literal_before_plus(c: Typist) -> None:
    """Sent before the "+" came (not waiting, as no client may): held, then literal octets."""
    c.sign_in()
    c.alone(b"a APPEND T {8}\r\n")
    c.ahead(b"x NOOP\r\n")
    assert c.line().startswith(b"+ "), c.transcript
    assert c.fed is not None
    c.fed.wait("c", c.sent)  # read once the "+" came
    c.alone(b"\r\n")
    assert c.until(b"a").startswith(b"a OK"), c.transcript
    stored(c)


def literal_plus_after_hidden_plus(c: Typist) -> None:
    """{8+}, which the proxy sends as {8}: the literal once Dovecot's "+" (the proxy's, not
    shown) has been read."""
    c.sign_in()
    c.alone(b"a APPEND T {8+}\r\n")
    assert c.fed is not None
    c.fed.wait_chunk("s", b"+ ")
    c.alone(b"x NOOP\r\n")
    c.alone(b"\r\n")
    assert c.until(b"a").startswith(b"a OK"), c.transcript
    stored(c)


SPLICED = splice.SPLICE_MIN + 8


def spliced_literal(c: Typist) -> None:
    """A literal big enough to be spliced, its last 8 octets (`x NOOP`) alone: spliced too
    (once begun, the splice goes on to the literal's end), counted, never parsed."""
    c.sign_in()
    c.alone(b"a APPEND T {%d}\r\n" % SPLICED)
    assert c.line().startswith(b"+ "), c.transcript
    c.alone(big_body()[:-8])
    c.alone(b"x NOOP\r\n")
    c.alone(b"\r\n")
    assert c.until(b"a").startswith(b"a OK"), c.transcript
    stored(c)


def big_body() -> bytes:
    line = b"y" * 78 + b"\r\n"
    return (line * (SPLICED // len(line) + 1))[: SPLICED - 8] + b"x NOOP\r\n"


def after_literal_before_line_end(c: Typist) -> None:
    """The literal whole, then `x NOOP` alone: the rest of the APPEND's line, not a command."""
    c.sign_in()
    c.alone(b"a APPEND T {8}\r\n")
    assert c.line().startswith(b"+ "), c.transcript
    c.alone(b"12345678")
    c.alone(b"x NOOP\r\n")
    assert c.until(b"a").startswith(b"a BAD"), c.transcript
    stored(c)


def literal_plus_refused_by_dovecot(c: Typist) -> None:
    """Dovecot answers the {8} the proxy sent with a BAD without a code (a one-match answer):
    the client's LITERAL+ octets, and the rest of its command, are skipped."""
    c.sign_in()
    assert c.ask(b"a", b"APPEND T (\\Bogus) {8+}").startswith(b"a BAD"), c.transcript
    c.alone(b"x NOOP\r\n")  # the literal
    c.alone(b"x NOOP\r\n")  # the rest of the refused command
    assert c.ask(b"y", b"NOOP").startswith(b"y OK"), c.transcript
    stored(c)


def refused_by_the_proxy(c: Typist) -> None:
    c.sign_in()
    assert c.ask(b"a", b'FROB "x\\q" {8+}').startswith(b"a BAD"), c.transcript
    c.alone(b"x NOOP\r\n")  # the literal
    c.alone(b"x NOOP\r\n")  # the rest of the refused command
    assert c.ask(b"y", b"NOOP").startswith(b"y OK"), c.transcript
    stored(c)


PLAIN = base64.b64encode(b"\0alice\0wonderland")


def empty_literals(c: Typist) -> None:
    """Dovecot answers an APPEND of {0} at once (`NO Can't save a zero byte message`, a
    one-match answer), without a "+": after {0} the client's next command is one; after
    {0+} (sent as {0}) the line goes on after the empty literal, and `x NOOP` is its rest."""
    c.sign_in()
    assert c.ask(b"a", b"APPEND T {0}").startswith(b"a NO"), c.transcript
    assert c.ask(b"y", b"NOOP").startswith(b"y OK"), c.transcript
    assert c.ask(b"e", b"APPEND T {0+}").startswith(b"e NO"), c.transcript
    c.alone(b"x NOOP\r\n")
    assert c.ask(b"z", b"NOOP").startswith(b"z OK"), c.transcript


def empty_checked(out: Outcome) -> None:
    never_ran(out)
    assert [(t, s) for t, _v, s in out.commands if t in ("a", "y", "e", "z")] == [
        ("a", "NO"),
        ("y", "OK"),
        ("e", "NO"),
        ("z", "OK"),
    ]
    answers = [d[:2] for s, d in out.taken if s == "s" and b"zero byte" in d]
    assert answers == [b"a ", b"e "]
    assert out.end.bytes_from_client == out.sent


def sasl_response(c: Typist) -> None:
    """`x NOOP` as the SASL response, after the challenge and before it came."""
    c.alone(b"a AUTHENTICATE PLAIN\r\n")
    assert c.line().startswith(b"+"), c.transcript
    c.alone(b"x NOOP\r\n")
    assert c.until(b"a").startswith(b"a NO [ALERT] Invalid base64"), c.transcript
    c.alone(b"c AUTHENTICATE PLAIN\r\n")
    c.ahead(b"x NOOP\r\n")
    assert c.line().startswith(b"+"), c.transcript
    assert c.until(b"c").startswith(b"c NO [ALERT] Invalid base64"), c.transcript
    c.alone(b"L AUTHENTICATE PLAIN\r\n")
    assert c.line().startswith(b"+"), c.transcript
    c.alone(PLAIN + b"\r\n")
    assert c.until(b"L").startswith(b"L OK"), c.transcript
    stored(c)


def idle_not_done(c: Typist) -> None:
    c.sign_in()
    c.alone(b"i IDLE\r\n")
    assert c.line().startswith(b"+ idling"), c.transcript
    c.alone(b"x NOOP\r\n")
    c.rest()


def idle_not_done_early(c: Typist) -> None:
    c.sign_in()
    c.alone(b"i IDLE\r\n")
    c.ahead(b"x NOOP\r\n")
    c.rest()


def first_octets(c: Typist) -> None:
    """`P` could start a PROXY header: the next chunk is read after it, not alone."""
    c.alone(b"P")
    c.alone(b"x NOOP\r\n")
    assert c.until(b"Px").startswith(b"Px OK"), c.transcript


def mid_line(c: Typist) -> None:
    c.sign_in()
    c.alone(b"w")
    c.alone(b"x NOOP\r\n")  # the end of `wx NOOP`
    assert c.until(b"wx").startswith(b"wx OK"), c.transcript
    c.alone(b"y NOOP")
    c.alone(b"\r\n")
    assert c.until(b"y").startswith(b"y OK"), c.transcript


def split_everywhere(c: Typist) -> None:
    """Pipelined simple commands, a byte per receive, then a command per receive, then
    two per receive; answers read only at the end of each."""
    c.sign_in()
    verbs = (b"NOOP", b"noop", b"Namespace", b"CHECK", b"UNSELECT", b"NOOP")
    for round_, (size, pieces) in enumerate(((1, 0), (0, 1), (0, 2))):
        data = b"".join(b"n%d%d %s\r\n" % (round_, i, verb) for i, verb in enumerate(verbs))
        if size:
            for i in range(len(data)):
                c.alone(data[i : i + 1])
        else:
            lines = data.splitlines(keepends=True)
            for i in range(0, len(lines), pieces):
                c.alone(b"".join(lines[i : i + pieces]))
        for i in range(len(verbs)):
            assert c.until(b"n%d%d" % (round_, i)), c.transcript[-1500:]


def reused_tags(c: Typist) -> None:
    c.sign_in()
    for verb in (b"NOOP", b"NAMESPACE", b"CHECK", b"noop", b"EXPUNGE"):
        c.alone(b"t " + verb + b"\r\n")
    for _ in range(5):
        assert c.until(b"t"), c.transcript
    c.alone(b"z NOOP\r\n")  # and a tag never answered twice
    assert c.until(b"z").startswith(b"z OK")


def long_tag(c: Typist) -> None:
    """A simple command longer than `max_line_length` (1024 here), in one receive."""
    c.sign_in()
    c.alone(b"x" * 2000 + b" NOOP\r\n")
    c.alone(b"z NOOP\r\n")
    c.until(b"z")


def injected_id(c: Typist) -> None:
    """With the proxy's own ID before LOGIN (tag `imapveil.1`), the client's NOOP with that
    tag, sent after LOGIN and before the answers."""
    c.alone(b"L LOGIN alice wonderland\r\n")
    c.alone(b"imapveil.1 NOOP\r\n")
    assert c.until(b"L").startswith(b"L OK"), c.transcript
    assert c.until(b"imapveil.1").startswith(b"imapveil.1 OK NOOP"), c.transcript


def injected_id_tag_taken(c: Typist) -> None:
    """The client's NOOP with the tag the proxy's ID gets (`imapveil.<count>`), still waiting
    for its answer when the LOGIN after it makes the proxy send its ID."""
    assert c.ask(b"c", b"CAPABILITY").startswith(b"c OK")
    c.alone(b"imapveil.3 NOOP\r\nL LOGIN alice wonderland\r\n")
    assert c.until(b"L").startswith(b"L OK"), c.transcript


@dataclass(frozen=True)
class Case:
    script: Script
    check: Callable[[Outcome], None]
    settings: dict[str, Any] = field(default_factory=dict)
    racy: frozenset[str] = frozenset()
    """`both_ways`'s: commands whose recorded state is Dovecot's timing's."""


def appended(body: bytes, spliced: bool = False) -> Callable[[Outcome], None]:
    """`x` never ran; `T` holds `body` as the message's octets; the ID after it was read."""

    def check(out: Outcome) -> None:
        never_ran(out)
        assert bool(out.spliced) is spliced  # the APPEND's (and maybe the FETCH's after it)
        assert (("c", b"x NOOP\r\n") in out.chunks) is not spliced  # it came alone
        assert ("c", b"x NOOP\r\n") not in out.taken
        assert b"BODY[] {%d}\r\n" % len(body) + body + b")" in out.transcript, out.transcript
        assert SHOWN.in_log(out.log) == []
        assert "ID sent: name=Mail" in out.log
        assert SHOWN.in_records(out.records_json) == []
        assert out.end.bytes_from_client == out.sent
        assert out.end.reason == "logout"

    return check


def skipped(out: Outcome) -> None:
    never_ran(out)
    assert answered(out, "y") == ["OK"]
    assert b"BODY[]" not in out.transcript  # nothing was stored
    assert SHOWN.in_log(out.log) == []
    assert "ID sent: name=Mail" in out.log
    assert out.end.bytes_from_client == out.sent


def refused_by_dovecot_checked(out: Outcome) -> None:
    skipped(out)
    # Dovecot's BAD (no code, alone) took the one-match path, which left the skipping set up.
    assert [d[:6] for s, d in out.taken if s == "s" and d.startswith(b"a ")] == [b"a BAD "]


def sasl_checked(out: Outcome) -> None:
    never_ran(out)
    assert [status for t, _v, status in out.commands if t in ("a", "c", "L")] == [
        "NO",
        "NO",
        "OK",
    ]
    for secret in (b"wonderland", PLAIN):
        assert secret.decode() not in out.records_json
    assert b"BODY[]" not in out.transcript
    assert out.end.bytes_from_client == out.sent


def idle_checked(out: Outcome) -> None:
    never_ran(out)
    assert out.transcript.endswith(b"* BYE Expected DONE to end IDLE\r\n"), out.transcript
    assert out.commands[-1] == ("i", "IDLE", None)  # Dovecot never saw the NOOP: no BAD
    assert (out.end.reason, out.end.bytes_from_client) == ("protocol_error", out.sent)


def first_checked(out: Outcome) -> None:
    never_ran(out)
    assert answered(out, "Px") == ["OK"]


def mid_line_checked(out: Outcome) -> None:
    never_ran(out)
    assert answered(out, "wx") == ["OK"]
    assert answered(out, "y") == ["OK"]


def split_checked(out: Outcome) -> None:
    tags = [t for t, _v, _s in out.commands if t.startswith("n")]
    assert tags == [f"n{r}{i}" for r in range(3) for i in range(6)]
    # The middle round, a command a receive, took the one-match path each time (what the
    # comparison with the general path covers).
    assert [d for s, d in out.taken if s == "c" and d.startswith(b"n1")] == [
        b"n10 NOOP\r\n",
        b"n11 noop\r\n",
        b"n12 Namespace\r\n",
        b"n13 CHECK\r\n",
        b"n14 UNSELECT\r\n",
        b"n15 NOOP\r\n",
    ]
    assert not [d for s, d in out.taken if s == "c" and d.startswith((b"n0", b"n2"))]
    assert out.end.bytes_from_client == out.sent


def reused_checked(out: Outcome) -> None:
    assert [(t, v, s) for t, v, s in out.commands if t == "t"] == [
        ("t", "NOOP", "OK"),
        ("t", "NAMESPACE", "OK"),
        ("t", "CHECK", "BAD"),
        ("t", "NOOP", "OK"),
        ("t", "EXPUNGE", "BAD"),
    ]
    assert re.findall(rb"(?m)^t ([A-Z]+)", out.transcript) == [b"OK", b"OK", b"BAD", b"OK", b"BAD"]


def long_checked(out: Outcome) -> None:
    """Found attacking the one-match path (attack4): it relayed the line, Dovecot answered it
    (`xxx...x OK NOOP completed`); the general path ends the session, as documented."""
    never_ran(out, b"x" * 2000)
    never_ran(out, b"z")
    assert out.transcript.endswith(b"* BYE [TOOBIG] Command line too long (limit 1024 octets)\r\n")
    assert out.end.reason == "line_too_long"


def injected_checked(out: Outcome) -> None:
    lines = out.transcript.split(b"\r\n")
    assert [line[:20] for line in lines if line.startswith(b"imapveil.1 ")] == [
        b"imapveil.1 OK NOOP c"
    ]
    assert not [line for line in lines if line.startswith(b"* ID")]
    assert answered(out, "imapveil.1") == ["OK"]
    assert "ID sent: name=imapveil" in out.log
    assert [(r["tag"], r["status"], r["injected"]) for r in out.records if r["event"] == "id"] == [
        ("imapveil.1", "OK", True)
    ]


def injected_tag_taken_checked(out: Outcome) -> None:
    """Found attacking the answers around the proxy's ID (attack4): its ID had the tag
    `imapveil.3` too, so Dovecot's answer to the NOOP was taken for the ID's (hidden), and the
    client got `* ID` and `imapveil.3 OK ID completed.` as its NOOP's answer."""
    lines = out.transcript.split(b"\r\n")
    assert [line[:24] for line in lines if line.startswith(b"imapveil.")] == [
        b"imapveil.3 OK NOOP compl"
    ], out.transcript
    assert not [line for line in lines if line.startswith(b"* ID")], out.transcript
    assert out.commands[:3] == [
        ("c", "CAPABILITY", "OK"),
        ("imapveil.3", "NOOP", "OK"),
        ("L", "LOGIN", "OK"),
    ]
    assert "ID sent: name=imapveil" in out.log
    (exchange,) = [r for r in out.records if r["event"] == "id"]
    assert (exchange["status"], exchange["injected"]) == ("OK", True)
    assert exchange["tag"] != "imapveil.3"
    assert exchange["server"] == {"name": "Dovecot"}


CASES = {
    "literal-after-plus": Case(literal_after_plus, appended(b"x NOOP\r\n")),
    "literal-before-plus": Case(literal_before_plus, appended(b"x NOOP\r\n")),
    "literal-plus-after-hidden-plus": Case(literal_plus_after_hidden_plus, appended(b"x NOOP\r\n")),
    "spliced-literal": Case(spliced_literal, appended(big_body(), spliced=True)),
    "after-literal-before-line-end": Case(after_literal_before_line_end, never_ran),
    "literal-plus-refused-by-dovecot": Case(
        literal_plus_refused_by_dovecot, refused_by_dovecot_checked
    ),
    "refused-by-the-proxy": Case(refused_by_the_proxy, skipped),
    "empty-literals": Case(empty_literals, empty_checked),
    "sasl-response": Case(sasl_response, sasl_checked),
    "idle-not-done": Case(idle_not_done, idle_checked),
    "idle-not-done-early": Case(idle_not_done_early, idle_checked),
    "first-octets": Case(first_octets, first_checked),
    "mid-line": Case(mid_line, mid_line_checked),
    "split-everywhere": Case(split_everywhere, split_checked),
    "reused-tags": Case(reused_tags, reused_checked),
    "long-tag": Case(long_tag, long_checked, {"max_line_length": 1024}),
    "injected-id": Case(
        injected_id,
        injected_checked,
        {"inject_id": "name=imapveil", "forward_client_address": True},
        # Sent before LOGIN's answer: read before it (not authenticated) unless Dovecot's
        # answer came first (about 1 run in 20).
        racy=frozenset({"imapveil.1"}),
    ),
    "injected-id-tag-taken": Case(
        injected_id_tag_taken, injected_tag_taken_checked, {"inject_id": "name=imapveil"}
    ),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_a_simple_chunk_where_no_command_may_start(
    target: Dovecot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    case = CASES[name]
    out = await both_ways(
        target, tmp_path, monkeypatch, case.script, racy=case.racy, **case.settings
    )
    case.check(out)


# --- A server that misbehaves, chunk by chunk.


class Scripted:
    """A scripted server's plumbing (`serve`): each piece it says is its own receive at the
    proxy (sent once the proxy has read everything before it); the lines it reads are kept."""

    def __init__(self, fed: Fed) -> None:
        self.fed = fed
        self.sent = bytearray()
        self.received: list[bytes] = []

    async def _line(self, peer: Peer, start: bytes) -> None:
        line = await peer.line()
        self.received.append(line)
        assert line.startswith(start), self.received

    async def _say(self, peer: Peer, *pieces: bytes) -> None:
        for piece in pieces:
            await peer.say(piece)
            await self.fed.server_fed(len(self.sent))


class Misbehaving(Scripted):
    """A scripted server that sends, each piece as its own receive: an answer inside its own
    literal, after a literal where its response goes on, to a reused tag, with a bare LF, and
    one while client octets wait in the proxy. (An answer to a tag never sent, and a line that
    is no response, end the session since round 15: tests/relay/test_attack_round15_server.py.)"""

    async def script(self, peer: Peer) -> None:
        await self._say(peer, b"* OK [CAPABILITY IMAP4rev1 LITERAL+] fake ready\r\n")
        await self._line(peer, b"imapveil.1 ID (")  # the proxy's own, before LOGIN
        await self._line(peer, b"L LOGIN")
        await self._say(peer, b"imapveil.1 OK ID done\r\n", b"L OK in\r\n")
        await self._line(peer, b"f FETCH")
        await self._say(
            peer,
            b"* 1 FETCH (BODY[] {14}\r\n",
            b"f OK fetched\r\n",  # literal octets
            b")\r\n",
            b"* 2 FETCH (BODY[] {3}\r\nabc",
            b"f NO x)\r\n",  # the rest of `* 2 FETCH`, after its literal
            b"f OK done\n",
        )
        await self._line(peer, b"t NOOP")
        await self._line(peer, b"t NOOP")
        await self._say(peer, b"t OK one\r\n", b"t NO two\r\n")
        await self._line(peer, b"a APPEND X {3}\r\n")
        await self._say(peer, b"a NO nope\r\n")  # the client's literal waits in the proxy
        await self._line(peer, b"z NOOP")
        await self._say(peer, b"z OK\r\n")
        await self._line(peer, b"Q LOGOUT")
        await self._say(peer, b"* BYE bye\r\nQ OK\r\n")
        await trio.aclose_forcefully(peer.stream)


def against_misbehaving(address: tuple[str, int], fed: Fed) -> tuple[bytes, int]:
    with Typist(address, fed) as c:
        c.greeting()
        c.alone(b"L LOGIN x y\r\n")
        c.through(b"L OK in\r\n")
        c.alone(b"f FETCH 1:2 BODY[]\r\n")
        c.through(b"f OK done\n")
        c.alone(b"t NOOP\r\n")
        c.alone(b"t NOOP\r\n")
        c.through(b"t NO two\r\n")
        c.alone(b"a APPEND X {3+}\r\nabc\r\nz NOOP\r\n")
        c.through(b"z OK\r\n")
        c.alone(b"Q LOGOUT\r\n")
        return c.rest(), c.sent


async def test_answers_from_a_misbehaving_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = Fed(monkeypatch)
    outcomes = []
    for _ in fed.each_way():
        server = Misbehaving(fed)
        async with (
            serve(server.script, server.sent) as address,
            veil(address, tmp_path, inject_id="name=imapveil") as v,
        ):
            transcript, sent = await run(against_misbehaving, v.address, fed)
            (end,) = await v.sessions_ended(1)
        records = comparable(v.sink.records)
        outcomes.append((transcript, records, list(fed.taken), server.received))
        # What the client received is what the server sent, but the answer to the proxy's ID.
        assert transcript == bytes(server.sent).replace(b"imapveil.1 OK ID done\r\n", b"")
        assert [(r.tag, r.verb, r.status) for r in v.sink.of(CommandCompleted)] == [
            ("L", "LOGIN", "OK"),
            ("f", "FETCH", "OK"),
            ("t", "NOOP", "OK"),
            ("t", "NOOP", "NO"),
            ("a", "APPEND", "NO"),
            ("z", "NOOP", "OK"),
            ("Q", "LOGOUT", "OK"),
        ]
        assert v.sink.of(Violation) == []
        (exchange,) = v.sink.of(IdExchange)
        assert (exchange.tag, exchange.status, exchange.injected) == ("imapveil.1", "OK", True)
        # The skipped literal never reached the server.
        assert not [line for line in server.received if b"abc" in line]
        assert (end.reason, end.bytes_from_client, end.bytes_from_server) == (
            "logout",
            sent,
            len(server.sent),
        )
    fast, general = outcomes
    assert fast[0] == general[0]
    assert fast[1] == general[1]
    assert general[2] == []
    assert [d for s, d in fast[2] if s == "s"] == [
        b"L OK in\r\n",
        b"f OK done\n",
        b"t OK one\r\n",
        b"t NO two\r\n",
        b"z OK\r\n",
        b"* BYE bye\r\nQ OK\r\n",  # the LOGOUT's answer after its BYE
    ]


# --- After COMPRESS and STARTTLS.


def compressed(c: Typist) -> None:
    """Deflated simple commands, one a receive (the core is fed them inflated), then `x NOOP`
    not deflated: the inflater refuses it, nothing of it reaches Dovecot."""
    assert c.fed is not None
    c.sign_in()
    assert c.ask(b"z", b"COMPRESS DEFLATE") == b"z OK DEFLATE active\r\n"
    deflate, inflate = zlib.compressobj(6, zlib.DEFLATED, -15), zlib.decompressobj(-15)
    plain = c.sent  # what the core is fed: octets before COMPRESS, then inflated ones
    for tag in (b"n1", b"n2", b"n3"):
        command = tag + b" NOOP\r\n"
        c.ahead(deflate.compress(command) + deflate.flush(zlib.Z_SYNC_FLUSH))
        plain += len(command)
        c.fed.wait("c", plain)
        while not re.search(rb"(?m)^" + tag + rb" OK", c.transcript):
            chunk = c.sock.recv(65536)
            assert chunk, c.transcript
            c.transcript += inflate.decompress(chunk)
    c.ahead(b"x NOOP\r\n")
    while chunk := c.sock.recv(65536):
        c.transcript += inflate.decompress(chunk)
    c.eof = True  # nothing more to read (the transcript holds what was inflated)


def compress_checked(out: Outcome) -> None:
    never_ran(out)
    assert [t for t, _v, s in out.commands if t.startswith("n") and s == "OK"] == ["n1", "n2", "n3"]
    assert [d for s, d in out.taken if s == "c" and d.startswith(b"n")] == [
        b"n1 NOOP\r\n",
        b"n2 NOOP\r\n",
        b"n3 NOOP\r\n",
    ]
    assert out.end.compressed
    # A broken DEFLATE stream is answered and recorded (attack16c), not taken for a reset.
    assert out.end.reason == "protocol_error"
    assert b"* BYE [CLIENTBUG] Invalid DEFLATE data\r\n" in out.transcript


async def test_after_compress(
    target: Dovecot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = await both_ways(target, tmp_path, monkeypatch, compressed, compress=True)
    compress_checked(out)


def plain_after_starttls(c: Typist) -> None:
    """`x NOOP` in clear text, alone, after the OK to STARTTLS: the handshake fails on it."""
    assert c.ask(b"a", b"STARTTLS") == b"a OK Begin TLS negotiation now\r\n"
    c.alone(b"x NOOP\r\n")
    c.rest()


async def test_clear_text_after_starttls(
    target: Dovecot,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tls_material: TlsMaterial,
) -> None:
    settings: dict[str, Any] = {
        "client_tls": "offer",
        "cert": str(tls_material.cert),
        "key": str(tls_material.key),
    }
    out = await both_ways(target, tmp_path, monkeypatch, plain_after_starttls, **settings)
    never_ran(out)
    assert out.end.reason == "tls_error"
    assert out.commands == [("a", "STARTTLS", "OK")]
