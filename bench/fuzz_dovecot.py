"""Differential fuzzing of imapveil in front of a real Dovecot (issue 11): no malformed input may
carry an identifier or a credential past the proxy.

    python bench/fuzz_dovecot.py --sessions 2000 --seed 1
    python bench/fuzz_dovecot.py --replay fuzz-out/leak-00042.json

It starts its own Dovecot (`imap_id_log = *`: every ID it receives is logged) and its own
`imapveil serve` (default policy, `user_identity = plain` unless `--user-identity hash`), then
runs mutated client sessions through the proxy, several at a time. Sessions come from the command
grammar (ID, LOGIN, AUTHENTICATE, SELECT, APPEND with literals, IDLE, ...) plus mutations:
unterminated quotes, braces anywhere, literal8, huge and negative lengths, long tags, NULs, CR
without LF, 8-bit octets, unbalanced parentheses, LITERAL+ after commands the server rejects,
malformed and oversized IDs, and random segmentation. Every session carries unique markers:

- `MV...` in the values of ID fields the default policy drops, `MN...` in dropped field names,
  and whole ID commands hidden where only literal octets should be;
- `PW...` in passwords (LOGIN and AUTHENTICATE, some with spaces).

Afterwards it checks: no `MV`/`MN` marker in Dovecot's `ID sent:` lines (nor anywhere else in its
log), no `MV` or `PW` marker in any record (nor, with `hash`, the HMAC of a password), nothing of
either on the proxy's stderr. (`MN` names may be recorded: records name dropped fields. A password
counts only where the client's own framing puts it, in a LITERAL+ literal or after the server's
`+`: a mutation can make it a command line of its own, whose first word is then the client's
tag.) It prints a summary, leaks grouped by cause (the command line that carried the marker, or
that announced the literal hiding it), and exits 1 on any leak, writing each offending session
(the chunks as sent, the mutations, what leaked where, the transcript) to `--out`; `--minimize N`
shrinks N sessions per cause by dropping steps while the leak persists.

Dovecot accepts any password for any user here: no login fails, since a failed one makes it delay
every later login from 127.0.0.1 (its auth penalty). About 30 sessions a second on a laptop;
not run in CI.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import json
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers.dovecot import USERS, Dovecot, free_port

Address = tuple[str, int]

# --- Sessions: steps of bytes, some waiting for the server before the next.


@dataclass
class Step:
    data: bytes
    wait: str = ""  # "+": a continuation request; a tag: that command's answer; "": nothing
    note: str = ""  # what the step is, for the reader of a leak report

    def to_json(self) -> dict[str, str]:
        return {"data": base64.b64encode(self.data).decode(), "wait": self.wait, "note": self.note}

    @classmethod
    def from_json(cls, d: dict[str, str]) -> Step:
        return cls(base64.b64decode(d["data"]), d["wait"], d["note"])


@dataclass
class Session:
    index: int
    steps: list[Step] = field(default_factory=list)
    mutations: list[str] = field(default_factory=list)
    passwords: list[bytes] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "mutations": self.mutations,
            "passwords": [p.decode("latin-1") for p in self.passwords],
            "steps": [s.to_json() for s in self.steps],
            "bytes": b"".join(s.data for s in self.steps).decode("latin-1"),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Session:
        return cls(
            d["index"],
            [Step.from_json(s) for s in d["steps"]],
            list(d["mutations"]),
            [p.encode("latin-1") for p in d["passwords"]],
        )


MARKER = re.compile(rb"M[VN]\d+s\d+r[0-9a-f]{6}", re.IGNORECASE)
PASSWORD = re.compile(rb"PW\d+s\d+r[0-9a-f]{6}", re.IGNORECASE)
DOVECOT_MARKER = re.compile(r"M[VN]\d+s(\d+)r[0-9a-f]{6}", re.IGNORECASE)
TEXT_PASSWORD = re.compile(r"PW\d+s(\d+)r[0-9a-f]{6}", re.IGNORECASE)
TEXT_VALUE = re.compile(r"MV\d+s(\d+)r[0-9a-f]{6}", re.IGNORECASE)

KEPT = ("name", "version", "os", "os-version", "vendor")
DROPPED = ("x-device-id", "x-mac", "x-originating-ip", "x-session-id", "x-proxy-ttl", "x-imei")
TAG_CHARS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_"


class Generator:
    """Client sessions from the command grammar, then mutated."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)

    # Markers carry the session number: a leak names its session.
    def mark(self, kind: str, s: Session) -> bytes:
        return b"%s%ds%dr%06x" % (kind.encode(), self.seed, s.index, self.rng.getrandbits(24))

    def tag(self) -> bytes:
        return bytes(self.rng.choice(TAG_CHARS) for _ in range(self.rng.randint(1, 6)))

    def hidden_id(self, s: Session) -> bytes:
        """A whole ID command, to be hidden where only literal octets belong."""
        return b'h ID ("x-hidden" "%s" "%s" "v")\r\n' % (self.mark("MV", s), self.mark("MN", s))

    def id_args(self, s: Session) -> bytes:
        pairs: list[bytes] = []
        if self.rng.random() < 0.7:
            pairs.append(b'"name" "FuzzMail"')
        for _ in range(self.rng.randint(1, 4)):
            name = self.rng.choice(DROPPED).encode()
            pairs.append(b'"%s" "%s"' % (name, self.mark("MV", s)))
        if self.rng.random() < 0.3:
            pairs.append(b'"x-%s" "1"' % self.mark("MN", s).lower())
        self.rng.shuffle(pairs)
        return b"(" + b" ".join(pairs) + b")"

    def password(self, s: Session) -> bytes:
        pw = self.mark("PW", s)
        if self.rng.random() < 0.3:
            pw += b" with space"
        s.passwords.append(pw)
        return pw

    def login(self, s: Session) -> list[Step]:
        t = self.tag()
        pw = self.password(s)
        user = b"alice"
        form = self.rng.randrange(6)
        if form == 0 and b" " not in pw:
            return [Step(t + b" LOGIN " + user + b" " + pw + b"\r\n", t.decode(), "login atom")]
        if form in (0, 1):
            return [Step(t + b' LOGIN "alice" "' + pw + b'"\r\n', t.decode(), "login quoted")]
        if form == 2:
            line = t + b" LOGIN " + user + b" {%d+}\r\n" % len(pw) + pw + b"\r\n"
            return [Step(line, t.decode(), "login literal+")]
        if form == 3:
            return [
                Step(t + b" LOGIN " + user + b" {%d}\r\n" % len(pw), "+", "login literal"),
                Step(pw + b"\r\n", t.decode(), "login password"),
            ]
        sasl = base64.b64encode(b"\0alice\0" + pw)
        if form == 4:
            return [Step(t + b" AUTHENTICATE PLAIN " + sasl + b"\r\n", t.decode(), "sasl-ir")]
        return [
            Step(t + b" AUTHENTICATE PLAIN\r\n", "+", "authenticate"),
            Step(sasl + b"\r\n", t.decode(), "sasl response"),
        ]

    def message(self, s: Session) -> bytes:
        body = b"Subject: fuzz\r\n\r\n"
        if self.rng.random() < 0.5:
            body += self.hidden_id(s)
        return body + b"hello\r\n"

    def command(self, s: Session, authenticated: bool) -> list[Step]:
        t = self.tag()
        r = self.rng.random()
        if r < 0.25:
            return [Step(t + b" ID " + self.id_args(s) + b"\r\n", t.decode(), "id")]
        if not authenticated and r < 0.4:
            # Before login: forms Dovecot answers without reading the LITERAL+ literal.
            hidden = self.hidden_id(s)
            head = self.rng.choice(
                [b'LOGIN "x ', b"NOOP ~", b"LOGIN \xe9x ", b'SELECT "x ', b"LOGIN (x ", b"NOOP "]
            )
            line = t + b" " + head + b"{%d+}\r\n" % len(hidden) + hidden + b"\r\n"
            return [Step(line, t.decode(), "rejected literal+")]
        if not authenticated:
            simple = self.rng.choice([b"CAPABILITY", b"NOOP", b"ID NIL"])
            return [Step(t + b" " + simple + b"\r\n", t.decode(), "simple")]
        if r < 0.45:
            msg = self.message(s)
            kind = self.rng.randrange(4)
            if kind == 0:
                line = t + b" APPEND INBOX {%d+}\r\n" % len(msg) + msg + b"\r\n"
                return [Step(line, t.decode(), "append literal+")]
            if kind == 1:
                return [
                    Step(t + b" APPEND INBOX (\\Seen) {%d}\r\n" % len(msg), "+", "append"),
                    Step(msg + b"\r\n", t.decode(), "append body"),
                ]
            if kind == 2:
                two = self.message(s)
                line = (
                    t
                    + b" APPEND INBOX {%d+}\r\n" % len(msg)
                    + msg
                    + b" {%d+}\r\n" % len(two)
                    + two
                    + b"\r\n"
                )
                return [Step(line, t.decode(), "multiappend")]
            line = t + b" APPEND INBOX CATENATE (TEXT {%d+}\r\n" % len(msg) + msg + b")\r\n"
            return [Step(line, t.decode(), "catenate")]
        if r < 0.55:
            # LITERAL+ after a command the server rejects before reading the literal.
            hidden = self.hidden_id(s)
            head = self.rng.choice(
                [
                    b"APPEND INBOX (\\Bogus) ",
                    b'APPEND INBOX "no date" ',
                    b'APPEND "x ',
                    b"APPEND NoSuchBox ",
                    b"SELECT {0+}\r\n ",
                    b"NOOP ~",
                    b"NOOP ",
                    b"CHECK ",
                    b'SELECT "x ',
                    b"FROB ",
                    b"IDLE ",  # answered `+ idling`, not a `+` for the literal
                ]
            )
            if head == b"IDLE ":
                hidden = self.rng.choice([b"DONE\r\n", b"x\r\n"]) + hidden
            line = t + b" " + head + b"{%d+}\r\n" % len(hidden) + hidden + b"\r\n"
            return [Step(line, t.decode(), "rejected literal+")]
        if r < 0.62:
            return [
                Step(t + b" IDLE\r\n", "+", "idle"),
                Step(b"DONE\r\n", t.decode(), "done"),
            ]
        simple = self.rng.choice(
            [
                b"SELECT INBOX",
                b"EXAMINE INBOX",
                b"STATUS INBOX (MESSAGES UIDNEXT)",
                b'LIST "" "*"',
                b"FETCH 1:* (FLAGS)",
                b"UID SEARCH ALL",
                b"ENABLE QRESYNC",
                b"NOOP",
                b"CHECK",
            ]
        )
        return [Step(t + b" " + simple + b"\r\n", t.decode(), "simple")]

    def session(self, index: int) -> Session:
        s = Session(index)
        authenticated = False
        for _ in range(self.rng.randint(2, 7)):
            if not authenticated and self.rng.random() < 0.45:
                s.steps += self.login(s)
                authenticated = True
            else:
                s.steps += self.command(s, authenticated)
        for _ in range(self.rng.choice((0, 1, 1, 2, 2, 3))):
            self.mutate(s)
        return s

    # --- Mutations.

    def mutate(self, s: Session) -> None:
        kinds = [
            ("unterminated_quote", 3),
            ("brace", 4),
            ("literal8", 2),
            ("huge_length", 3),
            ("long_tag", 2),
            ("nul", 2),
            ("lone_cr", 2),
            ("bare_lf", 1),
            ("eight_bit", 2),
            ("paren", 2),
            ("backslash", 2),
            ("trailing", 2),
            ("many_pairs", 1),
            ("big_id", 0.3),
            ("nul_name", 1),
            ("split", 3),
            ("drop_crlf", 1),
            ("no_wait", 1),
        ]
        kind = self.rng.choices([k for k, _ in kinds], [w for _, w in kinds])[0]
        i = self.rng.randrange(len(s.steps))
        step = s.steps[i]
        data = step.data
        rng = self.rng
        if kind == "unterminated_quote" and b'"' in data:
            positions = [p for p, c in enumerate(data) if c == 0x22]
            p = rng.choice(positions)
            data = data[:p] + data[p + 1 :]
        elif kind in ("brace", "literal8"):
            # A literal announcement at the end of a line: the next step (or a hidden ID) is
            # its octets by the client's framing.
            nxt = s.steps[i + 1].data if i + 1 < len(s.steps) else b""
            hidden = self.hidden_id(s)
            octets = hidden if not nxt or rng.random() < 0.5 else nxt
            prefix = b"~" if kind == "literal8" else b""
            plus = b"+" if rng.random() < 0.7 else b""
            quote = b' "x ' if rng.random() < 0.3 else b" "
            end = data.rfind(b"\r\n")
            head = data[:end] if end >= 0 else data
            data = head + quote + prefix + b"{%d%s}\r\n" % (len(octets), plus)
            if octets is hidden:
                data += hidden + b"\r\n"
            step.wait = "" if plus or octets is hidden else "+"
        elif kind == "huge_length":
            size = rng.choice(
                [b"9223372036854775807", b"18446744073709551616", b"-1", b"4294967296", b"0" * 30]
            )
            plus = rng.choice([b"+", b""])
            hidden = self.hidden_id(s)
            end = data.rfind(b"\r\n")
            head = data[:end] if end >= 0 else data
            data = head + b" {" + size + plus + b"}\r\n" + hidden + b"\r\n"
            step.wait = ""
        elif kind == "long_tag":
            space = data.find(b" ")
            if space > 0:
                long = bytes(rng.choice(TAG_CHARS) for _ in range(rng.randint(65, 400)))
                data = long + data[space:]
                step.wait = long.decode() if step.wait and step.wait != "+" else step.wait
        elif kind == "nul":
            p = rng.randrange(len(data) + 1)
            data = data[:p] + b"\0" + data[p:]
        elif kind == "lone_cr":
            p = data.rfind(b"\r\n")
            data = data[:p] + b"\r" + data[p + 2 :] if p >= 0 else data + b"\r"
        elif kind == "bare_lf":
            data = data.replace(b"\r\n", b"\n", 1)
        elif kind == "eight_bit":
            p = rng.randrange(len(data) + 1)
            data = data[:p] + bytes([rng.randrange(0x80, 0x100)]) + data[p:]
        elif kind == "paren":
            if b"(" in data and rng.random() < 0.5:
                data = data.replace(b")", b"", 1)
            else:
                p = rng.randrange(len(data) + 1)
                data = data[:p] + rng.choice([b"(", b")"]) + data[p:]
        elif kind == "backslash":
            p = data.find(b'" "')
            data = data[: p + 3] + b"\\q" + data[p + 3 :] if p >= 0 else b"\\" + data
        elif kind == "trailing":
            end = data.rfind(b"\r\n")
            head = data[:end] if end >= 0 else data
            data = head + b" trailing junk\r\n"
        elif kind == "many_pairs":
            t = self.tag()
            pairs = b" ".join(b'"x-f%d" "v"' % k for k in range(rng.randint(121, 140)))
            data = t + b" ID (" + self.id_args(s)[1:-1] + b" " + pairs + b")\r\n"
            step.wait = t.decode()
        elif kind == "big_id":
            t = self.tag()
            big = b"".join(b' "x-p%d" {1000+}\r\n' % k + b"y" * 1000 for k in range(67))
            data = t + b" ID (" + self.id_args(s)[1:-1] + big + b")\r\n"
            step.wait = t.decode()
        elif kind == "nul_name":
            t = self.tag()
            name = rng.choice([b"x-proxy-ttl\0a", b"x-originating-ip\0", b"name\0x"])
            data = t + b" ID ({%d+}\r\n" % len(name) + name + b' "' + self.mark("MV", s) + b'")\r\n'
            step.wait = t.decode()
        elif kind == "split" and len(data) > 1:
            p = rng.randrange(1, len(data))
            s.steps[i : i + 1] = [
                Step(data[:p], "", step.note + " (1st part)"),
                Step(data[p:], step.wait, step.note),
            ]
            s.mutations.append(kind)
            return
        elif kind == "drop_crlf" and data.endswith(b"\r\n"):
            data = data[:-2] + b" "
        elif kind == "no_wait":
            step.wait = ""
        else:
            return
        step.data = data
        step.note += f" [{kind}]"
        s.mutations.append(kind)


# --- Running a session.


@dataclass
class Result:
    session: Session
    transcript: bytes
    port: int
    seconds: float
    error: str = ""
    plus_seen: set[int] = field(default_factory=set)
    """Offsets in the session's bytes after which the server's `+` came before more was sent:
    only there did a synchronizing literal announcement make the next octets a literal."""


async def run_session(address: Address, s: Session, deadline: float) -> Result:
    start = trio.current_time()
    received = bytearray()
    changed = trio.Event()
    closed = False
    port = 0

    async def reader(stream: trio.SocketStream) -> None:
        nonlocal changed, closed
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            while chunk := await stream.receive_some(65536):
                received.extend(chunk)
                changed.set()
                changed = trio.Event()
        closed = True
        changed.set()

    async def wait_for(what: str, seen: int) -> bool:
        """Until the server sent a continuation or `what`'s tagged answer after `seen`."""
        pattern = b"\n+" if what == "+" else b"\n" + what.encode() + b" "
        with trio.move_on_after(1.0):
            while not closed:
                if (b"\n" + received[seen:]).find(pattern) >= 0:
                    return True
                await changed.wait()
        return False

    error = ""
    plus_seen: set[int] = set()
    with trio.move_on_after(deadline):
        try:
            stream = await trio.open_tcp_stream(*address)
        except OSError as exc:
            return Result(s, b"", 0, 0.0, f"connect: {exc}")
        port = stream.socket.getsockname()[1]
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(reader, stream)
            await wait_for("*", 0)  # the greeting
            try:
                offset = 0
                for step in s.steps:
                    seen = len(received)
                    await stream.send_all(step.data)
                    offset += len(step.data)
                    if step.wait and await wait_for(step.wait, seen) and step.wait == "+":
                        plus_seen.add(offset)
                    if closed:
                        break
                if not closed:
                    await stream.send_all(b"\r\nzz LOGOUT\r\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                error = f"send: {type(exc).__name__}"
            with trio.move_on_after(2.0):
                while not closed:
                    await changed.wait()
            nursery.cancel_scope.cancel()
    return Result(s, bytes(received), port, trio.current_time() - start, error, plus_seen)


# --- Dovecot and imapveil.


def dovecot_config(dovecot: Dovecot) -> str:
    """Any password for any user (so no login fails: Dovecot's auth penalty would slow every
    later login from 127.0.0.1), and limits for many sessions."""
    return f"""
default_process_limit = 600
default_client_limit = 2000
passdb {{
  driver = static
  args = nopassword=y
}}
userdb {{
  driver = static
  args = uid={dovecot.mail_uid} gid={dovecot.mail_gid} home={dovecot.maildir("alice")}
}}
service imap {{
  process_limit = 600
}}
"""


class Serve:
    """`imapveil serve` as a process; stderr is drained in a thread (a full pipe would block)."""

    def __init__(self, root: Path, upstream: Address, identity: str, policy: str) -> None:
        self.port = free_port()
        self.events = root / "events.jsonl"
        self.key_file = root / "user-key"
        command = [
            sys.executable, "-m", "imapveil", "serve",
            "--listen", f"127.0.0.1:{self.port}",
            "--upstream", f"{upstream[0]}:{upstream[1]}",
            "--events", str(self.events),
            "--user-key-file", str(self.key_file),
            "--user-identity", identity,
            "--policy", policy,
            "--store", "off",
            "--shutdown-grace", "1",
            "--max-connection-rate", "100000",
            "--max-sessions-per-client", "100000",
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.stderr = bytearray()
        self._listening = threading.Event()
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()
        if not self._listening.wait(30):
            self.stop()
            raise RuntimeError(f"imapveil did not start:\n{self.stderr.decode(errors='replace')}")

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr += line
            if b"listening on" in line:
                self._listening.set()

    @property
    def address(self) -> Address:
        return ("127.0.0.1", self.port)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._drain.join(5)

    def records(self) -> list[dict[str, Any]]:
        if not self.events.exists():
            return []
        return [json.loads(line) for line in self.events.read_text().splitlines() if line]


@contextlib.contextmanager
def environment(identity: str, policy: str) -> Iterator[tuple[Dovecot, Serve]]:
    dovecot = Dovecot(USERS)
    dovecot.extra_config = dovecot_config(dovecot)
    dovecot.start()
    root = Path(tempfile.mkdtemp(prefix="imapveil-fuzz-"))
    serve = None
    try:
        serve = Serve(root, dovecot.address, identity, policy)
        yield dovecot, serve
    finally:
        if serve is not None:
            serve.stop()
        dovecot.cleanup()


# --- Checking.


@dataclass
class Leak:
    index: int
    where: str  # "dovecot-id", "dovecot-other", "record:<event>.<field>", "stderr"
    evidence: str
    marker: str = ""


_LITERAL_AT_END = re.compile(rb"~?\{([0-9]+)\+?\}$")


def line_starts(stream: bytes, newline: bytes, plus_seen: set[int]) -> set[int]:
    """Where a command line starts, by the client's own framing: after a line end that does not
    announce a literal, and not inside literal octets. `newline` is b"\\r\\n" (strict) or
    b"\\n" (lenient, as Dovecot reads)."""
    starts = {0}
    pos = 0
    while (end := stream.find(newline, pos)) >= 0:
        line = stream[pos:end].rstrip(b"\r")
        after = end + len(newline)
        m = _LITERAL_AT_END.search(line)
        if m and (line.endswith(b"+}") or after in plus_seen):
            pos = after + int(m.group(1))  # literal octets, then the same command goes on
        else:
            pos = after
            starts.add(pos)
    return starts


def secret_passwords(s: Session, plus_seen: set[int]) -> list[bytes]:
    """The session's passwords that its own framing puts where a password belongs, not at the
    start of a command line. A mutation can turn a password into a line of its own (and a client
    that sends a synchronizing literal without the server's `+` sends a line): its first word is
    then a tag the client chose, and may be recorded as one."""
    stream = b"".join(step.data for step in s.steps)
    starts = line_starts(stream, b"\r\n", plus_seen) | line_starts(stream, b"\n", plus_seen)
    secret = []
    for pw in s.passwords:
        found = [m.start() for m in re.finditer(re.escape(pw), stream)]
        if found and not any(p in starts for p in found):
            secret.append(pw)
    return secret


def password_identity(key: bytes, password: bytes) -> str:
    """What `user_identity = hash` would record for these octets (identity._Hasher)."""
    return "hmac:" + hmac.new(key, password.lower(), hashlib.sha256).hexdigest()[:32]


def find_leaks(
    dovecot_text: str,
    records: list[dict[str, Any]],
    stderr: str,
    sessions: dict[int, Session],
    *,
    plus_seen: dict[int, set[int]],
    key: bytes | None,
) -> list[Leak]:
    leaks: list[Leak] = []
    for line in dovecot_text.splitlines():
        for m in DOVECOT_MARKER.finditer(line):
            where = "dovecot-id" if "ID sent:" in line else "dovecot-other"
            evidence = line[max(0, m.start() - 300) : m.end() + 300]
            leaks.append(Leak(int(m.group(1)), where, evidence, m.group(0)))
    hashes: dict[str, tuple[int, str]] = {}
    if key is not None:
        for index, s in sessions.items():
            for pw in secret_passwords(s, plus_seen.get(index, set())):
                for candidate in (pw, pw.split(b" ")[0]):
                    marker = pw.split(b" ")[0].decode()
                    hashes[password_identity(key, candidate)] = (index, marker)
    secret = {
        pw.split(b" ")[0].decode()
        for index, s in sessions.items()
        for pw in secret_passwords(s, plus_seen.get(index, set()))
    }
    for record in records:
        for name, value in record.items():
            text = json.dumps(value)
            where = f"record:{record.get('event')}.{name}"
            evidence = json.dumps(record)[:1000]
            for m in TEXT_PASSWORD.finditer(text):
                if m.group(0) in secret:
                    leaks.append(Leak(int(m.group(1)), where, evidence, m.group(0)))
            for m in TEXT_VALUE.finditer(text):
                leaks.append(Leak(int(m.group(1)), where, evidence, m.group(0)))
            for digest, (index, first_word) in hashes.items():
                if digest in text:
                    leaks.append(Leak(index, where + " (password HMAC)", evidence, first_word))
    for m in TEXT_PASSWORD.finditer(stderr):
        leaks.append(Leak(int(m.group(1)), "stderr", m.group(0), m.group(0)))
    for m in TEXT_VALUE.finditer(stderr):
        leaks.append(Leak(int(m.group(1)), "stderr", m.group(0), m.group(0)))
    return leaks


def leak_class(leak: Leak, session: Session) -> str:
    """Where it leaked, and why: for an ID hidden in literal octets, the literal announcement
    the server did not honour and the command it ended; for an ID of its own, what is wrong
    with it. One cause, one class (more or less: the session's other mutations stay out)."""
    stream = b"".join(step.data for step in session.steps)
    at = stream.lower().find(leak.marker.lower().encode())
    if not leak.marker or at < 0:
        return f"{leak.where} <- ?"
    line, hidden = _carrier(stream, at)
    return f"{leak.where} <- {_cause(line, hidden)}"


def _carrier(stream: bytes, at: int) -> tuple[bytes, bool]:
    """The client line that carried offset `at` by the client's own (strict CRLF) framing, and
    whether `at` lies in literal octets (then the line is the one that announced them)."""
    pos = 0
    while (end := stream.find(b"\r\n", pos)) >= 0:
        line = stream[pos : end + 2]
        m = _LITERAL_AT_END.search(stream[pos:end])
        if pos <= at < end + 2:
            return line, False
        if m:
            size = int(m.group(1))
            if end + 2 <= at < end + 2 + size:
                return line, True
            pos = end + 2 + size
        else:
            pos = end + 2
    return stream[pos:], False


def _cause(line: bytes, hidden: bool) -> str:
    body = line[:-1] if line.endswith(b"\n") else line
    body = body[:-1] if body.endswith(b"\r") else body
    tag, _, rest = body.partition(b" ")
    verb = rest.split(b" ", 1)[0].upper().decode("latin-1") if rest else "-"
    flags = []
    if len(tag) > 64:
        flags.append("tag > 64")
    if b"\0" in body:
        flags.append("NUL")
    if b"\r" in body:
        flags.append("lone CR")
    if not line.endswith(b"\r\n") and line.endswith(b"\n"):
        flags.append("bare LF")
    if any(c >= 0x80 for c in body):
        flags.append("8-bit")
    if len(re.findall(rb'(?<!\\)"', body)) % 2:
        flags.append("open quote")
    if body.count(b"(") != body.count(b")"):
        flags.append("unbalanced ()")
    if hidden:
        m = re.search(rb"(~?)\{(-?[0-9]+)(\+?)\}$", body)
        if m is None:
            what = "no literal at the line end"
        else:
            what = ("literal8 " if m.group(1) else "") + ("{N+}" if m.group(3) else "{N}")
            if len(m.group(2)) > 10:
                what += " huge"
        return f"hidden in {what} after {verb}" + (f" [{', '.join(flags)}]" if flags else "")
    if b"\\" in body:
        flags.append("backslash")
    if re.search(rb"\)[ \t]*[^ \t)]", body):
        flags.append("text after list")
    if body.count(b'"x-f') > 120:
        flags.append("> 120 pairs")
    if body.count(b"{1000+}") > 60:
        flags.append("> 64 KiB")
    return f"{verb} line" + (f" [{', '.join(flags)}]" if flags else " [well-formed: out of step]")


# --- The run.


async def run_all(
    address: Address, sessions: list[Session], concurrency: int, time_limit: float
) -> list[Result]:
    results: list[Result] = []
    todo = iter(sessions)
    stop_at = trio.current_time() + time_limit

    async def worker() -> None:
        for s in todo:
            if trio.current_time() > stop_at:
                return
            results.append(await run_session(address, s, 10.0))

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return results


def settle(dovecot: Dovecot, connections: int, timeout: float = 20.0) -> str:
    """Dovecot's log once it holds the end of `connections` connections (or the timeout)."""
    deadline = time.monotonic() + timeout
    while (text := dovecot.log_text()).count("Disconnected") < connections:
        if time.monotonic() > deadline:
            print(f"warning: Dovecot logged {text.count('Disconnected')} of {connections} ends")
            break
        time.sleep(0.1)
    return text


def upstream_connections(records: list[dict[str, Any]]) -> int:
    """Sessions that reached Dovecot (it greeted): each ends with a `Disconnected` line there."""
    return sum(1 for r in records if r["event"] == "session_end" and r["bytes_from_server"] > 0)


def check_run(dovecot: Dovecot, serve: Serve, results: list[Result], identity: str) -> list[Leak]:
    records = serve.records()
    text = settle(dovecot, upstream_connections(records) + 1)  # and Dovecot's readiness probe
    key = serve.key_file.read_bytes() if identity == "hash" else None
    by_index = {r.session.index: r.session for r in results}
    plus_seen = {r.session.index: r.plus_seen for r in results}
    stderr = serve.stderr.decode(errors="replace")
    return find_leaks(text, records, stderr, by_index, plus_seen=plus_seen, key=key)


class Trials:
    """Single sessions, one after the other, against one Dovecot and proxy (replaying a saved
    session, shrinking a leaking one). Each trial gets fresh markers of the same length, so its
    leaks are told apart from those of earlier trials."""

    def __init__(self, dovecot: Dovecot, serve: Serve, identity: str) -> None:
        self.dovecot = dovecot
        self.serve = serve
        self.key = serve.key_file.read_bytes() if identity == "hash" else None
        self.rng = random.Random()

    def fresh(self, session: Session) -> Session:
        renamed: dict[bytes, bytes] = {}

        def rename(m: re.Match[bytes]) -> bytes:
            old = m.group(0)
            if old.lower() not in renamed:
                renamed[old.lower()] = old[:-6] + b"%06x" % self.rng.getrandbits(24)
            return renamed[old.lower()]

        pattern = re.compile(rb"(?:MV|MN|PW)\d+s\d+r[0-9a-f]{6}", re.IGNORECASE)
        steps = [Step(pattern.sub(rename, st.data), st.wait, st.note) for st in session.steps]
        passwords = [pattern.sub(rename, pw) for pw in session.passwords]
        return Session(session.index, steps, session.mutations, passwords)

    def leaks(self, session: Session) -> list[Leak]:
        return self.run(session)[0]

    def causes(self, session: Session) -> set[str]:
        """The `leak_class` of every leak this session shows now."""
        found, trial = self.run(session)
        return {leak_class(leak, trial) for leak in found}

    def run(self, session: Session) -> tuple[list[Leak], Session]:
        """The leaks, and the session as run (with its fresh markers)."""
        trial = self.fresh(session)
        (result,) = trio.run(run_all, self.serve.address, [trial], 1, 60.0)
        records = self._records_until_end(result.port)
        text = settle(self.dovecot, upstream_connections(records) + 1)
        stderr = self.serve.stderr.decode(errors="replace")
        found = find_leaks(
            text,
            records,
            stderr,
            {trial.index: trial},
            plus_seen={trial.index: result.plus_seen},
            key=self.key,
        )
        stream = b"".join(st.data for st in trial.steps).lower()
        return [leak for leak in found if leak.marker.lower().encode() in stream], trial

    def _records_until_end(self, port: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The event log once it holds the end of the session from this client port."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.serve.records()
            ids = {
                r["session"]
                for r in records
                if r["event"] == "session_start" and r["client"].endswith(f":{port}")
            }
            ended = any(r["event"] == "session_end" and r["session"] in ids for r in records)
            if ended or time.monotonic() > deadline:
                return records
            time.sleep(0.05)


def minimize(trials: Trials, session: Session, cause: str, budget: float) -> Session:
    """Drop steps, one at a time, while the session still leaks for the same `cause` (a
    `leak_class`); greedy, within `budget` seconds."""
    end = time.monotonic() + budget
    current = session
    i = 0
    while i < len(current.steps) and time.monotonic() < end:
        steps = current.steps[:i] + current.steps[i + 1 :]
        trial = Session(current.index, steps, current.mutations, current.passwords)
        if steps and cause in trials.causes(trial):
            current = trial
        else:
            i += 1
    return current


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--time-limit", type=float, default=270.0, help="seconds of sessions")
    parser.add_argument("--user-identity", choices=("plain", "hash"), default="plain")
    parser.add_argument(
        "--policy",
        choices=("default", "strict"),
        default="default",
        help="one that drops x- fields (the markers are there)",
    )
    parser.add_argument("--out", type=Path, default=Path("fuzz-out"))
    parser.add_argument(
        "--minimize", type=int, default=0, metavar="N", help="shrink N leaks per class"
    )
    parser.add_argument(
        "--minimize-budget", type=float, default=60.0, metavar="SECONDS", help="in all"
    )
    parser.add_argument("--replay", type=Path, metavar="FILE", help="run one saved session")
    args = parser.parse_args()

    if args.replay:
        session = Session.from_json(json.loads(args.replay.read_text())["session"])
        with environment(args.user_identity, args.policy) as (dovecot, serve):
            leaks = Trials(dovecot, serve, args.user_identity).leaks(session)
        for leak in leaks:
            print(f"LEAK {leak.where}: {leak.evidence}")
        print("leaks" if leaks else "no leak")
        return 1 if leaks else 0

    started = time.monotonic()
    generator = Generator(args.seed)
    sessions = [generator.session(i) for i in range(args.sessions)]
    with environment(args.user_identity, args.policy) as (dovecot, serve):
        results = trio.run(run_all, serve.address, sessions, args.concurrency, args.time_limit)
        serve.stop()  # every record written
        leaks = check_run(dovecot, serve, results, args.user_identity)
        crashes = serve.stderr.count(b"Traceback")
        records = serve.records()
        dropped = sum(r.get("count", 0) for r in records if r["event"] == "records_dropped")
    elapsed = time.monotonic() - started

    by_index = {s.index: s for s in sessions}
    classes: dict[str, list[Leak]] = {}
    for leak in leaks:
        classes.setdefault(leak_class(leak, by_index[leak.index]), []).append(leak)
    leaking_sessions = sorted({leak.index for leak in leaks})
    slow = sum(1 for r in results if r.seconds > 5)

    args.out.mkdir(parents=True, exist_ok=True)
    for index in leaking_sessions:
        own = [leak for leak in leaks if leak.index == index]
        report = {
            "session": by_index[index].to_json(),
            "leaks": [{"where": leak.where, "evidence": leak.evidence} for leak in own],
            "transcript": next(
                (r.transcript.decode("latin-1") for r in results if r.session.index == index), ""
            ),
        }
        (args.out / f"leak-{index:05d}.json").write_text(json.dumps(report, indent=1))
        (args.out / f"leak-{index:05d}.bin").write_bytes(
            b"".join(s.data for s in by_index[index].steps)
        )

    print(f"sessions run:       {len(results)} of {len(sessions)} (seed {args.seed})")
    print(f"time:               {elapsed:.1f} s")
    print(f"sessions > 5 s:     {slow}")
    print(f"proxy tracebacks:   {crashes}")
    print(f"records:            {len(records)} ({dropped} dropped by the proxy)")
    print(f"mutations:          {dict(Counter(m for s in sessions for m in s.mutations))}")
    print(f"leaking sessions:   {len(leaking_sessions)}")
    print(f"violations:         {len(leaks)}")
    for name, found in sorted(classes.items(), key=lambda kv: -len(kv[1])):
        indexes = sorted({leak.index for leak in found})
        print(f"  {len(found):5d}  {name}   e.g. sessions {indexes[:5]}")

    if args.minimize and classes:
        print(f"\nminimized reproductions (at most {args.minimize_budget:g} s):")
        end = time.monotonic() + args.minimize_budget
        with environment(args.user_identity, args.policy) as (dovecot, serve):
            trials = Trials(dovecot, serve, args.user_identity)
            for name, found in sorted(classes.items(), key=lambda kv: -len(kv[1])):
                for index in sorted({leak.index for leak in found})[: args.minimize]:
                    if time.monotonic() > end:
                        break
                    small = minimize(trials, by_index[index], name, end - time.monotonic())
                    data = b"".join(step.data for step in small.steps)
                    path = args.out / f"min-{index:05d}.json"
                    path.write_text(json.dumps({"session": small.to_json()}, indent=1))
                    print(f"  [{name}] session {index}: {data!r}")
    if leaks:
        print(f"\nLEAKS: offending sessions written to {args.out}/")
    return 1 if leaks else 0


if __name__ == "__main__":
    sys.exit(main())
