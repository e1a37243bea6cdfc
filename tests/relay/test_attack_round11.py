"""Round 11 of attacks from outside: raw sockets through the proxy (built as `imapveil serve`
builds it) to a real Dovecot that logs every ID it receives (`imap_id_log = *`).

Aimed at what the earlier attack modules do not cover:

- COMPRESS=DEFLATE: a client that ends its DEFLATE stream (a final block) and goes on sending.
  zlib keeps whatever follows the end in `unused_data`, copying it whole at each receive: the
  proxy's memory grew without bound and its CPU with the square of what came, on the one event
  loop every session shares.
- AUTHENTICATE: a client that left its mechanism out put its SASL-IR where the mechanism goes,
  and the command record kept it as the mechanism (upper-cased base64: the password, recoverable).
  Held: `*` cancel, the response pipelined before the "+" with commands behind, LOGIN's two steps.
- ID (held, regression guards): values and names as literals of every kind, 8-bit octets and
  NULs, a field again in another case, far more pairs than RFC 2971 allows, ID twice, ID in a
  burst behind LITERAL+ APPENDs, a literal value that looks like the next command, empty literals
  and NIL in any case, before login, after AUTHENTICATE with SASL-IR: nothing the default policy
  drops reaches Dovecot (its `ID sent:` line, a session's first ID) or a record, and a NOOP after
  each is answered (the proxy's view of the stream is Dovecot's).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import socket
import struct
import threading
import time
import uuid
import zlib
from pathlib import Path

import pytest
import trio

from imapveil.protocol.command import MAX_LITERALS
from imapveil.protocol.proxy_header import V2_SIGNATURE
from imapveil.records import CommandCompleted, IdExchange, SessionEnded, Violation
from tests.helpers.attack import (
    CLIENT_IP,
    MAC,
    Client,
    DovecotLog,
    Identifiers,
    compress_after_login,
    veil,
)
from tests.helpers.dovecot import Dovecot

pytestmark = pytest.mark.dovecot
run = trio.to_thread.run_sync


# --- COMPRESS: data after the end of the DEFLATE stream.

AFTER_END = 32 * 1024 * 1024
"""Octets the attacker offers after its final DEFLATE block (64 KiB a send)."""


def deflate_then_garbage(address: tuple[str, int]) -> tuple[bytes, int, float]:
    """COMPRESS, then a NOOP in a DEFLATE stream that ends (Z_FINISH), then up to AFTER_END
    octets more: (what came back, octets sent after the end, seconds until the proxy closed)."""
    with socket.create_connection(address, timeout=10) as s:
        compress_after_login(s)
        deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        s.sendall(deflate.compress(b"n NOOP\r\n") + deflate.flush(zlib.Z_FINISH))
        started = time.monotonic()
        sent = 0
        chunk = b"\x00" * 65536
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < AFTER_END:
                s.sendall(chunk)
                sent += len(chunk)
        got = b""
        with contextlib.suppress(ConnectionResetError):
            try:
                while data := s.recv(65536):
                    got += data
            except TimeoutError:
                raise AssertionError(
                    f"the proxy took {sent} octets after the end of the DEFLATE stream and did"
                    " not close the session"
                ) from None
        return got, sent, time.monotonic() - started


def noop_round_trips(address: tuple[str, int], stop: trio.Event | None = None) -> float:
    """A bystander: NOOPs one after another until told to stop; the longest wait (seconds)."""
    worst = 0.0
    with Client(address) as c:
        c.greeting()
        for i in range(200):
            began = time.monotonic()
            c.send(b"n%d NOOP\r\n" % i)
            assert c.until(b"n%d" % i).startswith(b"n%d OK" % i), c.transcript[-300:]
            worst = max(worst, time.monotonic() - began)
    return worst


async def test_data_after_the_end_of_a_deflate_stream_ends_the_session(
    target: Dovecot, tmp_path: Path
) -> None:
    """Found (attack11): after the client's final DEFLATE block every octet it sent was kept
    (zlib's `unused_data`, copied whole at each receive): 32 MiB took minutes of the event
    loop, during which no other session was served, and as much memory as was sent. Now
    data after the end of the stream ends that session, like any other bad DEFLATE input: with
    `* BYE` and a `bad_deflate` violation since attack16c, whose graceful close drains what
    follows as it came (never inflated), so the octets offered are taken and thrown away."""
    async with veil(target.address, tmp_path, compress=True) as v:
        with trio.fail_after(60):
            got, sent, took = await run(deflate_then_garbage, v.address)
        (end,) = await v.sessions_ended(1)
        # The bystander comes after: the proxy serves as before.
        worst = await run(noop_round_trips, v.address)
        await v.sessions_ended(2)
    assert took < 10, f"{sent} octets after the DEFLATE end took {took:.1f} s"
    assert end.reason == "protocol_error", end
    assert [r.kind for r in v.sink.of(Violation)] == ["bad_deflate"]
    assert end.compressed
    assert worst < 1.0
    assert isinstance(end, SessionEnded)
    # What came after the COMPRESS answer, compressed: the NOOP's answer, if the proxy relayed it
    # before it read the octets after the end, and the BYE.
    answer = zlib.decompressobj(-15).decompress(got)
    bye = rb"\* BYE \[CLIENTBUG\] Invalid DEFLATE data\r\n"
    assert re.fullmatch(rb"(n OK [^\r\n]*\r\n)?" + bye, answer), answer


# --- ID in unusual forms and positions: nothing the policy drops reaches Dovecot or a record,
# and the proxy's view of the command stream stays Dovecot's (a NOOP after each is answered).

IDS = Identifiers()
DEVICE = IDS.device.encode()
MACB = MAC.encode()


def lit(value: bytes, plus: bool = False) -> bytes:
    return b"{%d%s}\r\n" % (len(value), b"+" if plus else b"") + value


def sync_literal(c: Client, head: bytes, value: bytes) -> None:
    """`head` ending in a synchronizing `{N}`: wait for a "+" (the proxy's own), then the value."""
    c.send(head)
    until_plus(c)
    c.send(value)


def until_plus(c: Client) -> None:
    """Read up to a continuation request (answers to earlier commands may come first)."""
    while not (line := c.line()).startswith(b"+"):
        assert line, c.transcript[-300:]


def case_literal_values(c: Client) -> list[bytes]:
    """Every value (and the identifying names) as literals, LITERAL+ and synchronizing."""
    c.send(
        b'i1 ID ("name" ' + lit(b"Thunderbird", True) + b" " + lit(b"x-device-id", True) + b" "
        + lit(DEVICE, True) + b' "x-mac" ' + lit(MACB, True) + b")\r\n"
    )  # fmt: skip
    sync_literal(c, b'i2 ID ("x-device-id" {%d}\r\n' % len(DEVICE), DEVICE)
    sync_literal(c, b' "name" {5}\r\n', b"Mutt1)\r\n")
    return [b"i1", b"i2"]


def case_eight_bit_and_nul(c: Client) -> list[bytes]:
    """8-bit octets and NULs in kept fields' values, and in names, via literals."""
    name = b"Thunderbird\xc3\xa9 " + MACB
    c.send(
        b'i1 ID ("name" ' + lit(name, True) + b' "version" ' + lit(b"115.0\x00" + DEVICE, True)
        + b" " + lit(b"x-device-id\x00junk", True) + b" " + lit(DEVICE, True)
        + b' "os" "Linux\xff ' + DEVICE + b'")\r\n'
    )  # fmt: skip
    return [b"i1"]


def case_duplicates_in_case(c: Client) -> list[bytes]:
    """The same field again in another case, with an identifier the second time."""
    c.send(
        b'i1 ID ("name" "Thunderbird" "NAME" "' + MACB + b'" "Name" "' + DEVICE + b'"'
        b' "version" "115.0" "VERSION" "' + DEVICE + b'" "X-Device-Id" "' + DEVICE + b'")\r\n'
    )
    return [b"i1"]


def case_many_pairs(c: Client) -> list[bytes]:
    """Far more pairs than RFC 2971 allows (30), the identifiers last; then just over 30."""
    filler = b" ".join(b'"name" "Thunderbird"' for _ in range(200))
    c.send(b"i1 ID (" + filler + b" " + IDS.pairs() + b")\r\n")
    kept = b" ".join(b'"x-f%d" "v"' % i for i in range(31))
    c.send(b'i2 ID ("name" "Mutt" ' + kept + b" " + IDS.pairs() + b")\r\n")
    return [b"i1", b"i2"]


def named_id(tag: bytes) -> bytes:
    """An ID with a field the default policy keeps (Dovecot logs it: the ID got there)."""
    return tag + b' ID ("name" "Thunderbird" ' + IDS.pairs() + b")\r\n"


def case_twice(c: Client) -> list[bytes]:
    """ID twice, pipelined, then once more after the answers."""
    c.send(named_id(b"i1") + IDS.id_command(b"i2"))
    c.until(b"i2")
    c.send(IDS.id_command(b"i3"))
    return [b"i1", b"i2", b"i3"]


def case_after_literal_plus_append(c: Client) -> list[bytes]:
    """One burst: a LITERAL+ APPEND whose message holds an ID line, an ID, another APPEND."""
    message = b"Subject: x\r\n\r\n" + IDS.id_command(b"s1")
    c.send(
        b"a1 APPEND INBOX {%d+}\r\n" % len(message) + message + b"\r\n"
        + named_id(b"i1")
        + b"a2 APPEND INBOX (\\Seen) {%d+}\r\n" % len(message) + message + b"\r\n"
        + IDS.id_command(b"i2")
    )  # fmt: skip
    return [b"a1", b"i1", b"a2", b"i2"]


def case_literal_looks_like_a_command(c: Client) -> list[bytes]:
    """A literal value whose octets end a line and start another ID: they are a value."""
    smuggled = b'x")\r\n' + IDS.id_command(b"s1") + b'i9 ID ("a" "'
    c.send(
        b'i1 ID ("name" "Thunderbird" "x-a" ' + lit(smuggled, True) + b' "os" ~'
        + lit(smuggled, True) + b")\r\n"
    )  # fmt: skip
    return [b"i1"]


def case_empty_and_odd(c: Client) -> list[bytes]:
    """Empty literals, NIL names' values, NIL in every case, tabs... whatever parses."""
    c.send(b'i1 ID ("name" {0+}\r\n "x-device-id" nil "os" Nil)\r\n')
    c.send(b"i2 ID nIl\r\n")
    c.send(b'i3 ID ("x-mac" {0+}\r\n "x-device-id" ' + lit(DEVICE, True) + b")\r\n")
    c.send(b'i4 ID ( "name"  "Mutt"  "x-device-id"  "' + DEVICE + b'" )\r\n')
    return [b"i1", b"i2", b"i3", b"i4"]


def case_after_authenticate(c: Client) -> list[bytes]:
    """AUTHENTICATE PLAIN with SASL-IR (no LOGIN), then the ID; and an ID pipelined behind."""
    ir = __import__("base64").b64encode(b"\x00alice\x00wonderland")
    c.send(b"A AUTHENTICATE PLAIN " + ir + b"\r\n" + named_id(b"i1"))
    return [b"A", b"i1"]


ID_CASES = {
    "literal-values": (case_literal_values, True),
    "eight-bit-and-nul": (case_eight_bit_and_nul, True),
    "duplicates-in-case": (case_duplicates_in_case, True),
    "many-pairs": (case_many_pairs, True),
    "twice": (case_twice, True),
    "after-literal-plus-append": (case_after_literal_plus_append, True),
    "literal-looks-like-a-command": (case_literal_looks_like_a_command, True),
    "empty-and-odd": (case_empty_and_odd, False),
    "before-login": (case_duplicates_in_case, False),
    "after-authenticate": (case_after_authenticate, False),
}
OBSERVED = {"eight-bit-and-nul": None, "many-pairs": None, "empty-and-odd": "os=NIL"}
"""What Dovecot logs of each case's first ID (it logs only a session's first): `name=Thunderbird`
unless said here (None: the policy left nothing, `ID NIL`, which Dovecot does not log)."""


def id_session(address: tuple[str, int], name: str) -> bytes:
    case, login = ID_CASES[name]
    with Client(address) as c:
        c.greeting()
        if login:
            c.login()
        tags = case(c)
        c.send(b"z NOOP\r\n")
        assert c.until(b"z").startswith(b"z OK"), c.transcript[-1500:]
        for tag in tags:
            assert any(line.startswith(tag + b" OK") for line in c.transcript.splitlines()), (
                tag,
                c.transcript[-1500:],
            )
        c.logout()
        return c.transcript


@pytest.mark.parametrize("name", list(ID_CASES))
async def test_ids_in_odd_forms_carry_no_identifier(
    target: Dovecot, tmp_path: Path, name: str
) -> None:
    log = DovecotLog(target)
    async with veil(target.address, tmp_path) as v:
        await run(id_session, v.address, name)
        await v.sessions_ended(1)
    text = await run(log.settled, 1)
    sent = [line.split("ID sent: ", 1)[1] for line in text.splitlines() if "ID sent: " in line]
    observed = OBSERVED.get(name, "name=Thunderbird")
    assert [s.split(",")[0] for s in sent] == ([observed] if observed else []), sent
    assert IDS.in_log(text) == [], [line for line in text.splitlines() if "ID sent" in line]
    records = v.records_json()
    assert IDS.in_records(records) == [], records
    assert b"wonderland" not in records.encode()


# --- AUTHENTICATE in odd forms: no credential in any record, the stream in step.

PASSWORD = b"wonderland"
PLAIN_IR = base64.b64encode(b"\x00alice\x00" + PASSWORD)
LONG_JUNK = base64.b64encode(b"SECRET-" + b"x" * 9000)


def auth_no_mechanism(c: Client) -> None:
    """SASL-IR data where the mechanism goes (a script that lost its mechanism), twice."""
    c.send(b"A1 AUTHENTICATE " + PLAIN_IR + b"\r\n")
    assert c.until(b"A1").startswith((b"A1 NO", b"A1 BAD")), c.transcript[-300:]
    c.send(b"A2 AUTHENTICATE " + PLAIN_IR + b" PLAIN\r\n")
    assert c.until(b"A2").startswith((b"A2 NO", b"A2 BAD")), c.transcript[-300:]
    c.login()


def auth_cancelled(c: Client) -> None:
    """`*` cancels; then the real one, its response sent before the "+" with a NOOP behind."""
    c.send(b"A1 AUTHENTICATE PLAIN\r\n")
    until_plus(c)
    c.send(b"*\r\n")
    assert c.until(b"A1").startswith(b"A1 BAD"), c.transcript[-300:]
    c.send(b"n NOOP\r\nA2 AUTHENTICATE PLAIN\r\n" + PLAIN_IR + b"\r\nz1 NOOP\r\n")
    assert c.until(b"A2").startswith(b"A2 OK"), c.transcript[-300:]
    assert c.until(b"z1").startswith(b"z1 OK"), c.transcript[-300:]


def auth_login_mechanism(c: Client) -> None:
    """LOGIN: the user as SASL-IR, the password after the second challenge."""
    c.send(b"A1 AUTHENTICATE LOGIN " + base64.b64encode(b"alice") + b"\r\n")
    until_plus(c)
    c.send(base64.b64encode(PASSWORD) + b"\r\n")
    assert c.until(b"A1").startswith(b"A1 OK"), c.transcript[-300:]


AUTH_CASES = {
    "no-mechanism": auth_no_mechanism,
    "cancelled": auth_cancelled,
    "login-mechanism": auth_login_mechanism,
}


def auth_session(address: tuple[str, int], name: str) -> bytes:
    with Client(address) as c:
        c.greeting()
        AUTH_CASES[name](c)
        c.send(b"z NOOP\r\n")
        assert c.until(b"z").startswith(b"z OK"), c.transcript[-1500:]
        c.logout()
        return c.transcript


def credentials_in(text: str) -> list[str]:
    """Any form of the password in `text`, case-blind (an upper-cased base64 is recoverable)."""
    low = text.lower()
    forms = [PASSWORD, PLAIN_IR, base64.b64encode(PASSWORD), LONG_JUNK[:40], b"secret-"]
    return [f.decode() for f in forms if f.decode().lower() in low]


@pytest.mark.parametrize("name", list(AUTH_CASES))
async def test_authenticate_in_odd_forms_records_no_credential(
    target: Dovecot, tmp_path: Path, name: str
) -> None:
    """Found (attack11), `no-mechanism`: the record's `mechanism` was the SASL-IR upper-cased
    (`AGFSAWNLAHDVBMRLCMXHBMQ=`). Now a mechanism outside `sasl.MECHANISMS` is `OTHER`."""
    async with veil(target.address, tmp_path, user_identity="plain") as v:
        await run(auth_session, v.address, name)
        await v.sessions_ended(1)
    assert credentials_in(v.records_json()) == [], v.records_json()


# --- Many literals in one command: the record stays small.

EMPTY_LITERALS = 200_000


def many_empty_literals(address: tuple[str, int]) -> bytes:
    """An ID made of EMPTY_LITERALS empty LITERAL+ values (the proxy says "+" to none, the
    server sees none: nothing paces them), then a NOOP."""
    with Client(address, timeout=30) as c:
        c.greeting()
        c.login()
        c.send(b'i ID ("name" {0+}\r\n' + b' "x" {0+}\r\n' * EMPTY_LITERALS + b")\r\n")
        assert c.until(b"i").startswith(b"i OK"), c.transcript[-300:]
        c.send(b"z NOOP\r\n")
        assert c.until(b"z").startswith(b"z OK"), c.transcript[-300:]
        c.logout()
        return c.transcript


async def test_an_id_of_many_empty_literals_makes_a_small_record(
    target: Dovecot, tmp_path: Path
) -> None:
    """Found (attack11): each literal's size went into the command's record: an ID of 200,000
    empty LITERAL+ values (1.2 MB, which the proxy takes without the server: up to
    `max_discard`, 64 MiB, some 11 million literals) made one event-log line of 200,000 sizes
    and kept a list of them in memory for the session. Now a command keeps the first
    `command.MAX_LITERALS` sizes for its record."""
    async with veil(target.address, tmp_path) as v:
        await run(many_empty_literals, v.address)
        await v.sessions_ended(1)
    (record,) = [r for r in v.sink.of(CommandCompleted) if r.verb == "ID"]
    assert record.literals == (0,) * MAX_LITERALS, len(record.literals)
    assert len(json.dumps(record.to_dict())) < 4096


# --- The proxy's own lines owed while the server is mid-response.

BIG = 8 * 1024 * 1024
BAD_LINE = b"\x01" + b"x" * 61 + b"\r\n"
"""A line the proxy refuses itself (a control octet where a tag goes): it owes a BAD for each,
sent once the server's stream is at a response boundary."""
OFFER = 64 * 1024 * 1024
"""Octets of such lines the attacker offers while the server's answer is stalled mid-literal."""


def big_mailbox(address: tuple[str, int]) -> bytes:
    """bob's own new mailbox holding one BIG-octet message (directly, not through the proxy)."""
    box = b"R11-" + uuid.uuid4().hex.encode()
    body = b"Subject: big\r\n\r\n" + b"y" * (BIG - 18) + b"\r\n"
    with Client(address, timeout=30) as c:
        c.greeting()
        c.login(b"bob", b"builder")
        c.send(b"c CREATE " + box + b"\r\n")
        assert c.until(b"c").startswith(b"c OK"), c.transcript[-300:]
        c.send(b"a APPEND " + box + b" {%d+}\r\n" % len(body) + body + b"\r\n")
        assert c.until(b"a").startswith(b"a OK"), c.transcript[-300:]
        c.logout()
    return box


def flood_while_stalled(address: tuple[str, int], box: bytes) -> tuple[int, int, bytes]:
    """FETCH the big message and stop reading it mid-literal; then offer OFFER octets of lines
    the proxy refuses, as fast as it takes them (until it has taken none for a second). Then
    read everything: (octets the proxy took while stalled, BAD lines received, the rest)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the answer stalls at once
    s.settimeout(30)
    s.connect(address)
    with s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"* OK")
        s.sendall(b"l LOGIN bob builder\r\ns SELECT " + box + b"\r\nf FETCH 1 BODY[]\r\n")
        while not (line := f.readline()).startswith(b"* 1 FETCH"):
            assert line, "no FETCH answer"
        s.setblocking(False)
        chunk = BAD_LINE * 1024
        sent, idle_since = 0, time.monotonic()
        while sent < OFFER and time.monotonic() - idle_since < 1.0:
            try:
                sent += s.send(chunk[sent % len(chunk) :] if sent % len(chunk) else chunk)
                idle_since = time.monotonic()
            except BlockingIOError:
                time.sleep(0.01)
        # Now read (in a thread: what is left to send may wait for that), and end with whole
        # lines (the last send may have stopped mid-line) and a NOOP.
        s.settimeout(30)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        received: list[bytes] = []

        def read_all() -> None:
            got = b""
            while not re.search(rb"(^|\n)z OK", got[-300:]):
                data = f.read1(1 << 20)
                if not data:
                    break
                got += data
            received.append(got)

        reader = threading.Thread(target=read_all)
        reader.start()
        rest = (-sent) % len(BAD_LINE)
        s.sendall(BAD_LINE[len(BAD_LINE) - rest :] + b"z NOOP\r\n")
        sent += rest
        reader.join(60)
        assert received, "no answer to the NOOP"
        got = received[0]
        assert re.search(rb"(^|\n)z OK", got[-300:]), got[-300:]
        return sent, got.count(b"* BAD [CLIENTBUG]"), got


async def test_lines_owed_while_the_server_is_mid_answer_hold_the_client_back(
    target: Dovecot, tmp_path: Path
) -> None:
    """A client that stops reading a big answer (the server's stream stalls mid-literal, where
    the proxy may not speak) and sends lines the proxy refuses: each BAD is owed until the
    answer ends. Found (attack11): the proxy went on reading the client meanwhile, keeping every
    BAD in memory (an 18-fold amplification for 3-octet lines), without bound. Now it stops
    reading the client while it owes more than `max_held`; the lines wait in the client's
    socket, and every one is answered, in order, once the answer has gone out."""
    box = await run(big_mailbox, target.address)
    async with veil(target.address, tmp_path) as v:
        with trio.fail_after(120):
            sent, bads, got = await run(flood_while_stalled, v.address, box)
        await v.sessions_ended(0)
    lines = sent // len(BAD_LINE)
    assert sent < OFFER // 2, (
        f"the proxy took {sent} octets of refused lines while it could not answer"
    )
    assert bads == lines, (bads, lines)
    assert got.index(b")\r\nf OK") < got.index(b"* BAD [CLIENTBUG]")


# --- Pipelined commands whose answers the client does not read.


def rss_mib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // (1 << 20)


def pipeline_without_reading(address: tuple[str, int]) -> tuple[int, int, int]:
    """LOGIN, then NOOPs (all tagged `a`) as fast as the proxy takes them, reading nothing, until
    it has taken none for a second; then read every answer: (NOOPs sent, answered, the growth of
    this process's memory meanwhile in MiB: the proxy runs in it)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    # A small send buffer of its own: what waits on the client's side is no part of the test,
    # and every NOOP sent is one Dovecot answers at the end (5 MB of them took 11 s; 1.7 MB now).
    # Without `max_unanswered` the proxy still reads all it is offered (28 MB, and fails).
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    s.settimeout(30)
    s.connect(address)
    with s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"* OK")
        s.sendall(b"l LOGIN alice wonderland\r\n")
        while not f.readline().startswith(b"l OK"):
            pass
        before = rss_mib()
        s.setblocking(False)
        noop = b"a NOOP\r\n"
        chunk = noop * 8192
        sent, idle_since, grown = 0, time.monotonic(), 0
        while sent < OFFER and time.monotonic() - idle_since < 1.0:
            try:
                sent += s.send(chunk[sent % len(chunk) :] if sent % len(chunk) else chunk)
                idle_since = time.monotonic()
            except BlockingIOError:
                grown = max(grown, rss_mib() - before)
                time.sleep(0.01)
        grown = max(grown, rss_mib() - before)
        s.settimeout(60)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        rest = (-sent) % len(noop)
        received: list[int] = []

        def count_answers() -> None:
            answered, line = 0, b""
            while not line.startswith(b"z "):
                line = f.readline()
                if not line:
                    break
                answered += line.startswith(b"a OK")
            received.append(answered)

        reader = threading.Thread(target=count_answers)
        reader.start()
        s.sendall(noop[len(noop) - rest :] + b"z NOOP\r\n")
        reader.join(120)
        assert received, "no answer to the last NOOP"
        return (sent + rest) // len(noop), received[0], grown


async def test_pipelined_commands_a_client_does_not_read_hold_it_back(
    target: Dovecot, tmp_path: Path
) -> None:
    """Found (attack11): a client that pipelines NOOPs and reads none of the answers. The proxy
    kept a command object for each one sent and not yet answered (as far as it had read the
    server): as many as the socket buffers between client, proxy and Dovecot hold, some 740,000
    for 10 MB sent, 200 MB of the proxy's memory for one session, a thousand times as much for
    the thousand sessions one address may open. Now it stops reading the client while
    `max_unanswered` commands wait for their answers; every command is answered, in order."""
    async with veil(target.address, tmp_path) as v:
        with trio.fail_after(180):
            sent, answered, grown = await run(pipeline_without_reading, v.address)
        await v.sessions_ended(0)
    assert grown < 48, f"{grown} MiB more for one session's {sent} NOOPs"
    assert answered == sent, (answered, sent)


# --- Identifiers as ID field names.

NAME_IDS = (MAC, CLIENT_IP, "490154203237518", "x-" + uuid.UUID(int=0x1234_5678_9ABC).hex)
"""A MAC, an IP address, an IMEI and a UUID, each as a field's name (at most 30 octets)."""


def ids_as_names(address: tuple[str, int]) -> bytes:
    with Client(address) as c:
        c.greeting()
        c.login()
        pairs = b" ".join(b'"%s" "1"' % n.encode() for n in NAME_IDS)
        c.send(b'i ID ("name" "Thunderbird" "x-device-id" "2" ' + pairs + b")\r\n")
        assert c.until(b"i").startswith(b"i OK"), c.transcript[-300:]
        c.logout()
        return c.transcript


async def test_identifiers_as_field_names_reach_no_record(target: Dovecot, tmp_path: Path) -> None:
    """Found (attack11): the names of the fields the policy drops are recorded as the client sent
    them (the event log's `id` record, the statistics store, the debug log), so an identifier
    sent as a field's name reached them all. Now a dropped name in which a detector of the
    policy finds an identifier is recorded as `detected:<kind>`; other names stay as they were
    (`x-device-id`)."""
    log = DovecotLog(target)
    async with veil(target.address, tmp_path) as v:
        await run(ids_as_names, v.address)
        await v.sessions_ended(1)
    text = await run(log.settled, 1)
    assert [n for n in NAME_IDS if n in text] == [], text
    records = v.records_json()
    assert [n for n in NAME_IDS if n.lower() in records.lower()] == [], records
    (exchange,) = v.sink.of(IdExchange)
    assert "x-device-id" in exchange.dropped
    assert {"detected:mac", "detected:ip", "detected:imei", "detected:uuid"} <= set(
        exchange.dropped
    ), exchange.dropped


# --- PROXY v2 headers with TLVs (held: a regression guard; nothing else sends TLVs).


def v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


INET = bytes([203, 0, 113, 9, 127, 0, 0, 1]) + struct.pack("!HH", 40000, 143)
TLVS = (
    b"\x01" + struct.pack("!H", 8) + b"imap/1.0"  # ALPN
    + b"\x02" + struct.pack("!H", 11) + b"example.org"  # authority
    + b"\x20" + struct.pack("!H", 5) + b"\x01\x00\x00\x00\x00"  # SSL, no sub-TLVs
    + b"\xee" + struct.pack("!H", 3) + b"abc"  # a custom type
)  # fmt: skip
PROXY_V2 = {
    # name: (header, accepted, the client address the session is recorded with)
    "tlvs": (v2(1, 0x11, INET + TLVS), True, "203.0.113.9:40000"),
    # Accepted until round 17 (the TLVs were not read): HAProxy's own reader refuses it.
    "tlv-longer-than-the-body": (v2(1, 0x11, INET + b"\x01\xff\xff" + b"x"), False, None),
    "local-with-tlvs": (v2(0, 0x00, TLVS), True, None),
    "unix-family": (v2(1, 0x31, bytes(216)), False, None),
    "short-inet": (v2(1, 0x11, INET[:8]), False, None),
    "bad-version": (V2_SIGNATURE + b"\x11\x11" + struct.pack("!H", 12) + INET, False, None),
    "too-long": (v2(1, 0x11, INET + bytes(3000)), False, None),
}


def behind_balancer(address: tuple[str, int], header: bytes) -> bytes:
    """The header and LOGIN in one segment, as a balancer forwards them; the transcript."""
    with Client(address) as c:
        c.send(header + b"L LOGIN alice wonderland\r\nQ LOGOUT\r\n")
        return c.rest()


@pytest.mark.parametrize("name", list(PROXY_V2))
async def test_proxy_v2_headers_with_tlvs(target: Dovecot, tmp_path: Path, name: str) -> None:
    header, accepted, client = PROXY_V2[name]
    log = DovecotLog(target)
    async with veil(target.address, tmp_path, proxy_protocol_from=("127.0.0.0/8",)) as v:
        got = await run(behind_balancer, v.address, header)
        (end,) = await v.sessions_ended(1)
    if accepted:
        assert b"L OK" in got and end.reason == "logout", (got, end)
        assert end.client == (client or end.client) and end.client.startswith(
            "203.0.113.9" if client else "127.0.0.1"
        ), end
        await run(log.settled, 1)
    else:
        assert b"OK" not in got and end.reason == "proxy_header", (got, end)
        assert "alice" not in log.new_text()


def long_sasl_response(address: tuple[str, int]) -> bytes:
    """A SASL response longer than Dovecot takes (it closes the connection without a word)."""
    with Client(address) as c:
        c.greeting()
        c.send(b"A AUTHENTICATE PLAIN\r\n")
        until_plus(c)
        c.send(LONG_JUNK + b"\r\nz NOOP\r\n")
        return c.rest()


async def test_a_sasl_response_too_long_for_dovecot_records_nothing_of_it(
    target: Dovecot, tmp_path: Path
) -> None:
    """Held (a regression guard): the proxy relays a SASL response as it comes (up to
    `max_line_length`); Dovecot closes the connection on one of 12 KB, and the session ends
    as the server's close with nothing of the response in a record, and the NOOP after it
    never run."""
    async with veil(target.address, tmp_path, user_identity="plain") as v:
        got = await run(long_sasl_response, v.address)
        (end,) = await v.sessions_ended(1)
    assert b"z OK" not in got
    assert end.reason == "server_closed", end
    assert credentials_in(v.records_json()) == [], v.records_json()


def id_under_compress(address: tuple[str, int]) -> bytes:
    """LOGIN, COMPRESS, then an ID cut into 1-octet DEFLATE flushes, then a NOOP; the
    answers inflated."""
    with socket.create_connection(address, timeout=10) as s:
        compress_after_login(s)
        out, back = zlib.compressobj(6, zlib.DEFLATED, -15), zlib.decompressobj(-15)
        for octet in named_id(b"i") + b"n NOOP\r\n":
            s.sendall(out.compress(bytes([octet])) + out.flush(zlib.Z_SYNC_FLUSH))
        got = b""
        while b"\r\nn OK" not in got:
            data = s.recv(65536)
            assert data, got[-300:]
            got += back.decompress(data)
        s.sendall(out.compress(b"Q LOGOUT\r\n") + out.flush(zlib.Z_SYNC_FLUSH))
        while s.recv(65536):
            pass
        return got


async def test_an_id_under_compress_carries_no_identifier(target: Dovecot, tmp_path: Path) -> None:
    """Held (a regression guard): an ID over a COMPRESS=DEFLATE client leg, each octet its own
    DEFLATE flush, is read and cleaned as in clear text."""
    log = DovecotLog(target)
    async with veil(target.address, tmp_path, compress=True) as v:
        got = await run(id_under_compress, v.address)
        (end,) = await v.sessions_ended(1)
    text = await run(log.settled, 1)
    assert b"\r\ni OK" in got and end.compressed
    assert "ID sent: name=Thunderbird" in text, text
    assert IDS.in_log(text) == [] and IDS.in_records(v.records_json()) == []


# --- Serial numbers inside the fields the default policy keeps.

SERIALS = ("C02XK1ZTJGH5", "H4V9K2P7QX", "DNPXK2ZJHG7F", "R58M12ABCDE")
"""Device serial numbers as Apple and Samsung print them: ten or more capitals and digits, few
digits (random ones of ten have three on average, within the four a name's word may have)."""


def serials_in_kept_fields(address: tuple[str, int]) -> bytes:
    with Client(address) as c:
        c.greeting()
        c.login()
        c.send(
            b'i ID ("name" "Mail %s" "vendor" "Apple %s" "os" "iOS %s" "version" "16.0 %s"'
            b' "os-version" "17.1 (%s)")\r\n' % tuple(s.encode() for s in (*SERIALS, SERIALS[0]))
        )
        assert c.until(b"i").startswith(b"i OK"), c.transcript[-300:]
        c.logout()
        return c.transcript


@pytest.mark.parametrize("policy", ["default", "strict"])
async def test_serial_numbers_in_kept_fields_are_not_kept(
    target: Dovecot, tmp_path: Path, policy: str
) -> None:
    """Found (attack11): a name's words may hold four digits ("Outlook 2016"), and a version's
    words ten octets with digits, so a serial number such as `C02XK1ZTJGH5` passed as part of a
    `name`, `vendor`, `os` or `version`: forwarded to Dovecot and recorded. Now a word of ten or
    more capitals and digits (at least one digit, two capitals, no small letter) is no word of
    a program's, vendor's or system's name, nor of a version."""
    log = DovecotLog(target)
    async with veil(target.address, tmp_path, policy=policy) as v:
        await run(serials_in_kept_fields, v.address)
        await v.sessions_ended(1)
    text = await run(log.settled, 1)
    assert [s for s in SERIALS if s in text] == [], [
        line for line in text.splitlines() if "ID sent" in line
    ]
    records = v.records_json()
    assert [s for s in SERIALS if s in records] == [], records


# --- A synchronising literal sent before the server's "+", which the server then refuses.

BODY_TAG = "Mark" + uuid.uuid4().hex[:12]
BODY = (
    b"From: a@example.org\r\nSubject: private matters\r\n\r\n"
    + BODY_TAG.encode() + b" NOOP\r\nsecond line of the body\r\n"
)  # fmt: skip


def literal_before_plus(address: tuple[str, int]) -> bytes:
    """An APPEND to a mailbox that does not exist, with its message in the same segment as the
    command (no LITERAL+: the client should have waited for "+"). Dovecot answers NO
    [TRYCREATE] before any "+"; the message is then what the client sends next."""
    with Client(address) as c:
        c.greeting()
        c.login()
        c.send(b"a APPEND nosuch {%d}\r\n" % len(BODY) + BODY + b"\r\n")
        return c.rest()


async def test_a_refused_literal_sent_before_its_plus_ends_the_session(
    target: Dovecot, tmp_path: Path
) -> None:
    """Found (after attack11): octets a client sends after `{N}` before the server's "+" are
    the literal, whatever they look like. When the server refused the command instead of asking
    for them (Dovecot's NO [TRYCREATE] for an APPEND to a mailbox that does not exist), the
    proxy read what it held as the client's next commands: a line of the message became a
    command with the message's words as its tag and verb, in the records and at Dovecot. The
    client cannot be followed: BYE, and the held octets go nowhere."""
    log = DovecotLog(target)
    async with veil(target.address, tmp_path) as v:
        transcript = await run(literal_before_plus, v.address)
        (end,) = await v.sessions_ended(1)
    assert b"a NO [TRYCREATE]" in transcript
    assert b"* BYE" in transcript and BODY_TAG.encode() not in transcript
    assert end.reason == "protocol_error", end
    records = v.records_json()
    assert BODY_TAG not in records and "Subject" not in records and "private" not in records
    commands = [r for r in v.sink.records if isinstance(r, CommandCompleted)]
    assert [(c.tag, c.verb, c.status) for c in commands] == [
        ("L", "LOGIN", "OK"),
        ("a", "APPEND", "NO"),
    ]
    assert BODY_TAG not in await run(log.settled, 1)
