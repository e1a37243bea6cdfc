"""Issue 11, as an attacker tries it: malformed input must not carry an identifier or a credential
past the proxy. Raw sockets, byte-exact, through the proxy (built as `imapveil serve` builds it,
default configuration and default policy unless a test says otherwise) to a real Dovecot 2.3 that
logs every ID it receives (`imap_id_log = *`).

Each attack is checked where it would land: Dovecot's log (all of it that this test made it write,
read once Dovecot has logged the end of every connection) and every record the proxy emitted.
The `control` tests send the same bytes to Dovecot directly and see the identifiers arrive: they
prove both that the attack works on this Dovecot and that the log is read correctly, so no
attack test can pass because it attacked nothing.

Every attack test was written first and failed against the code that issue 11 describes (as a
strict xfail, so that a fix could not forget to say so); the fixes removed the marks. Attacks
found later (by bench/fuzz_dovecot.py) start the same way.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from imapveil.protocol.proxy_header import build_v2
from imapveil.records import CommandCompleted, IdExchange, SessionEnded
from tests.conftest import TlsMaterial
from tests.helpers.attack import (
    MAC,
    SPOOF_FIELDS,
    Client,
    DovecotLog,
    FakeUpstream,
    Identifiers,
    Veil,
    answered_properly,
    marker,
    own_dovecot,
    veil,
)
from tests.helpers.dovecot import USERS, Dovecot
from tests.helpers.process import imapveil

pytestmark = pytest.mark.dovecot

run = trio.to_thread.run_sync


def xfail(item: int, what: str) -> pytest.MarkDecorator:
    """An attack that still works: the fix removes the mark (a strict xfail that passes is an
    error, so it cannot be forgotten)."""
    return pytest.mark.xfail(strict=True, reason=f"issue 11 item {item}: {what}")


CAROL = marker("PW") + " with a space"
"""A password with a space."""


@pytest.fixture(scope="module")
def target() -> Iterator[Dovecot]:
    """A Dovecot of this module's own (carol's password has a space)."""
    with own_dovecot({**USERS, "carol": CAROL}) as server:
        yield server


async def settled(log: DovecotLog, connections: int = 1) -> str:
    text: str = await run(log.settled, connections)
    return text


# --- The log reader sees what it must (controls).


def send_id(address: tuple[str, int], tag: bytes, command: bytes, *, login: bool = False) -> bytes:
    """Greeting, (LOGIN,) the ID command, its tagged answer, LOGOUT."""
    with Client(address) as c:
        c.greeting()
        if login:
            c.login()
        c.send(command)
        c.until(tag)
        return c.logout()


async def test_control_passthrough_forwards_a_well_formed_id(
    target: Dovecot, tmp_path: Path
) -> None:
    ids = Identifiers()
    log = DovecotLog(target)
    async with veil(target.address, tmp_path, policy="passthrough") as v:
        transcript = await run(send_id, v.address, b"b", ids.id_command())
        await v.sessions_ended(1)
    text = await settled(log)
    assert b"b OK" in transcript
    # Kept by passthrough: the log reader finds them, the records hold them.
    assert ids.device in text and MAC in text
    assert ids.device in v.records_json()
    # Dropped by the anti-spoofing rule, whatever the policy (except x-client-transport: item 7).
    assert not {"x-originating-ip", "x-session-id", "x-proxy-ttl"} & set(ids.in_log(text))


async def test_default_policy_drops_the_identifiers_of_a_well_formed_id(
    target: Dovecot, tmp_path: Path
) -> None:
    ids = Identifiers()
    log = DovecotLog(target)
    command = b'b ID ("name" "Mail" ' + ids.pairs() + b")\r\n"
    async with veil(target.address, tmp_path) as v:
        transcript = await run(send_id, v.address, b"b", command)
        await v.sessions_ended(1)
    text = await settled(log)
    assert b"b OK" in transcript
    assert "ID sent: name=Mail" in text
    assert ids.in_log(text) == []
    assert ids.in_records(v.records_json()) == []


# --- Item 1: IDs the proxy's parser rejects, but Dovecot accepts.


def filler(count: int) -> bytes:
    return b"".join(b' "x-f%d" "v%d"' % (i, i) for i in range(count))


def malformed_id(kind: str, ids: Identifiers) -> tuple[bytes, bytes]:
    """(tag, command) for one malformed form; the identifiers come first in the list."""
    pairs = ids.pairs()
    count = len(ids.fields())
    if kind == "backslash-before-letter":
        return b"b", b"b ID (" + pairs + b' "name" "x\\qy")\r\n'
    if kind == "31-pairs":
        return b"b", b"b ID (" + pairs + filler(31 - count) + b")\r\n"
    if kind == "121-pairs":
        return b"b", b"b ID (" + pairs + filler(121 - count) + b")\r\n"
    if kind == "text-after-list":
        return b"b", b"b ID (" + pairs + b") trailing\r\n"
    if kind == "65-octet-tag":
        tag = b"T" * 65
        return tag, tag + b" ID (" + pairs + b")\r\n"
    if kind == "over-64-KiB":
        # Literal values of 1000 octets: Dovecot logs no ID with a value over 1024 octets.
        big = b"".join(b' "x-p%d" {1000+}\r\n' % i + b"y" * 1000 for i in range(67))
        return b"b", b"b ID (" + pairs + big + b")\r\n"
    raise AssertionError(kind)


MALFORMED = [
    pytest.param("backslash-before-letter"),
    pytest.param("31-pairs"),
    pytest.param("121-pairs"),
    pytest.param("text-after-list"),
    pytest.param("65-octet-tag"),
    pytest.param("over-64-KiB"),
]


@pytest.mark.parametrize("kind", MALFORMED)
async def test_malformed_id_carries_no_identifier(
    target: Dovecot, tmp_path: Path, kind: str
) -> None:
    ids = Identifiers()
    tag, command = malformed_id(kind, ids)
    log = DovecotLog(target)
    async with veil(target.address, tmp_path) as v:
        transcript = await run(send_id, v.address, tag, command)
        await v.sessions_ended(1)
    text = await settled(log)
    assert ids.in_log(text) == []
    assert ids.in_records(v.records_json()) == []
    # Answered: the proxy's own BAD, or the server's answer to `ID NIL` or to a cleaned ID.
    assert re.search(rb"^" + re.escape(tag) + rb" (OK|NO|BAD)\b", transcript, re.M), transcript


@pytest.mark.parametrize("kind", [p.values[0] for p in MALFORMED])
async def test_control_dovecot_accepts_the_malformed_id(target: Dovecot, kind: str) -> None:
    ids = Identifiers()
    tag, command = malformed_id(str(kind), ids)
    log = DovecotLog(target)
    transcript = await run(send_id, target.address, tag, command)
    text = await settled(log)
    assert tag + b" OK" in transcript
    assert sorted(ids.in_log(text)) == sorted((*ids.values(), *SPOOF_FIELDS))


# --- Item 2: literal octets the server does not read as a literal.


def smuggle(address: tuple[str, int], login: bool, command: bytes, hidden: bytes) -> bytes:
    """`command` ends in a literal announcement; its octets are `hidden` (with an ID command
    line), then the command ends; then a NOOP and LOGOUT show whether the session still works."""
    with Client(address) as c:
        c.greeting()
        if login:
            c.login()
        c.send(command + b"\r\n" + hidden + b"\r\nz NOOP\r\n")
        c.until(b"z")
        return c.logout()


@dataclass(frozen=True)
class Framing:
    login: bool
    command: bytes  # ends in a literal announcement; `%d`: the size of the hidden octets
    lead: bytes = b""  # literal octets before the hidden ID command

    def octets(self, ids: Identifiers) -> tuple[bytes, bytes]:
        """(the command, its literal octets: `lead` and an ID command carrying `ids`)."""
        hidden = self.lead + ids.id_command(b"b")
        command = self.command % len(hidden) if b"%d" in self.command else self.command
        return command, hidden


FRAMING = {
    "literal8-in-noop": Framing(False, b"a NOOP ~{%d+}"),
    "login-unterminated-quote": Framing(False, b'a LOGIN "x {%d+}'),
    "select-unterminated-quote": Framing(True, b'a SELECT "x {%d+}'),
    "append-bad-flag": Framing(True, b"a APPEND INBOX (\\Bogus) {%d+}"),
    "append-bad-date": Framing(True, b'a APPEND INBOX "not a date" {%d+}'),
    "literal-2^63": Framing(False, b"a NOOP {9223372036854775807+}"),
    # Found by bench/fuzz_dovecot.py: after login Dovecot 2.3 answers commands without arguments
    # (and unknown ones) at once, without reading a LITERAL+ literal that follows.
    "noop-literal-after-login": Framing(True, b"a NOOP {%d+}"),
    "check-literal-after-login": Framing(True, b"a CHECK {%d+}"),
    "unknown-command-after-login": Framing(True, b"a FROB {%d+}"),
    # A bare LF after a literal ends the command for Dovecot, not for RFC 3501's framing.
    "append-bare-lf-after-literal": Framing(True, b"a APPEND INBOX {5+}\r\nhello\n {%d+}"),
    # Dovecot answers IDLE with `+ idling`, which is not a `+` for the literal: it leaves IDLE
    # at the first line of the octets (DONE, or anything: `BAD Expected DONE`) and runs the rest.
    "idle-literal-done": Framing(True, b"a IDLE {%d+}", lead=b"DONE\r\n"),
    "idle-literal-junk": Framing(True, b"a IDLE {%d+}", lead=b"x\r\n"),
}


@pytest.mark.parametrize("case", list(FRAMING))
async def test_literal_octets_never_run_as_commands(
    target: Dovecot, tmp_path: Path, case: str
) -> None:
    framing = FRAMING[case]
    ids = Identifiers()
    command, hidden = framing.octets(ids)
    log = DovecotLog(target)
    async with veil(target.address, tmp_path) as v:
        transcript = await run(smuggle, v.address, framing.login, command, hidden)
        await v.sessions_ended(1)
    text = await settled(log)
    assert ids.in_log(text) == []
    assert ids.in_records(v.records_json()) == []
    # The session went on (the NOOP after it was answered OK), or it ended with a proper answer.
    assert b"\r\nz OK" in transcript or answered_properly(transcript, b"a"), transcript


@pytest.mark.parametrize("case", [name for name in FRAMING if name != "literal-2^63"])
async def test_control_dovecot_runs_the_literal_octets_as_commands(
    target: Dovecot, case: str
) -> None:
    framing = FRAMING[case]
    ids = Identifiers()
    command, hidden = framing.octets(ids)
    log = DovecotLog(target)
    transcript = await run(smuggle, target.address, framing.login, command, hidden)
    text = await settled(log)
    assert b"\r\nb OK ID completed" in transcript
    assert ids.device in text


# --- Item 3: credentials in records.


def login_literal(address: tuple[str, int], command: bytes, password: bytes) -> bytes:
    """`command` followed by the password as a LITERAL+ literal."""
    with Client(address) as c:
        c.greeting()
        c.send(command + b" {%d+}\r\n" % len(password) + password + b"\r\nz NOOP\r\n")
        c.until(b"z")
        return c.logout()


def login_sync_literal(address: tuple[str, int], tag: bytes, password: bytes) -> bytes:
    """LOGIN carol with the password as a synchronizing literal, sent after the `+`."""
    with Client(address) as c:
        c.greeting()
        c.send(tag + b" LOGIN carol {%d}\r\n" % len(password))
        if c.line().startswith(b"+"):
            c.send(password + b"\r\n")
            c.until(tag)
        c.send(b"z NOOP\r\n")
        c.until(b"z")
        return c.logout()


def assert_no_credential(v: Veil, passwords: list[bytes]) -> None:
    dump = v.records_json()
    for password in passwords:
        secret = password.decode()
        words = [secret, secret.split()[0]]  # the whole password, and its first word
        assert not [w for w in words if w in dump], "a password in the records"
        hashed = [v.identity(w.encode()) for w in words]
        assert not [h for h in hashed if h and h in dump], "a password's HMAC in the records"
    real = {None, v.identity(b"alice"), v.identity(b"carol")}
    users = [r.user for r in v.sink.records if isinstance(r, CommandCompleted | SessionEnded)]
    assert set(users) <= real, users
    tags = [r.tag for r in v.sink.records if isinstance(r, CommandCompleted | IdExchange)]
    assert not [t for t in tags if "PW-" in t], tags


UNPARSABLE_USER = {
    "unterminated-quote": b'a LOGIN "alice',
    "parenthesis": b"a LOGIN (alice",
    "8bit-atom": b"a LOGIN \xe9lice",
}


@pytest.mark.parametrize("identity", ["plain", "hash"])
@pytest.mark.parametrize("form", list(UNPARSABLE_USER))
async def test_unparsable_login_user_records_no_password(
    target: Dovecot, tmp_path: Path, form: str, identity: str
) -> None:
    passwords = [marker("PW").encode(), marker("PW").encode() + b" with spaces in it"]
    log = DovecotLog(target)
    async with veil(target.address, tmp_path, user_identity=identity) as v:
        for password in passwords:
            transcript = await run(login_literal, v.address, UNPARSABLE_USER[form], password)
            assert answered_properly(transcript, b"a"), transcript
        await v.sessions_ended(len(passwords))
    await settled(log, len(passwords))
    assert_no_credential(v, passwords)


@pytest.mark.parametrize("identity", ["plain", "hash"])
async def test_long_tag_login_records_no_password(
    target: Dovecot, tmp_path: Path, identity: str
) -> None:
    password = CAROL.encode()  # the right one: Dovecot logs carol in, unless misled
    log = DovecotLog(target)
    async with veil(target.address, tmp_path, user_identity=identity) as v:
        transcript = await run(login_sync_literal, v.address, b"T" * 65, password)
        await v.sessions_ended(1)
    await settled(log)
    assert b"z OK" in transcript or answered_properly(transcript, b"T" * 65)
    assert_no_credential(v, [password])


# --- Item 4: identifiers in the fields the default policy keeps.


def kept_field_identifier(kind: str) -> tuple[bytes, str]:
    """(ID command, the identifier in it)."""
    if kind == "uuid-with-underscores":
        value = str(uuid.uuid4()).replace("-", "_")
        return b'b ID ("name" "Mail" "os-version" "%s")\r\n' % value.encode(), value
    if kind == "mac-without-separators":
        value = "a4c3f0" + uuid.uuid4().hex[:6]
        return b'b ID ("name" "Mail" "version" "%s")\r\n' % value.encode(), value
    if kind == "email-dotless-domain":
        value = f"jane.{uuid.uuid4().hex[:8]}@mailhost"
        return b'b ID ("name" "%s" "version" "1.0")\r\n' % value.encode(), value
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["uuid-with-underscores", "mac-without-separators", "email-dotless-domain"]
)
async def test_kept_fields_carry_no_identifier(target: Dovecot, tmp_path: Path, kind: str) -> None:
    command, value = kept_field_identifier(kind)
    log = DovecotLog(target)
    async with veil(target.address, tmp_path) as v:
        transcript = await run(send_id, v.address, b"b", command)
        await v.sessions_ended(1)
    text = await settled(log)
    assert b"b OK" in transcript
    assert value not in text
    assert value not in v.records_json()


async def test_foxmail_version_is_kept(target: Dovecot, tmp_path: Path) -> None:
    log = DovecotLog(target)
    async with veil(target.address, tmp_path) as v:
        command = b'b ID ("name" "Foxmail" "version" "7.2.25.230")\r\n'
        await run(send_id, v.address, b"b", command)
        await v.sessions_ended(1)
    text = await settled(log)
    assert "ID sent: name=Foxmail, version=7.2.25.230" in text, text


# --- Item 5: a PROXY header from an address not configured to send one.

V1 = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
V2 = build_v2(("1.2.3.4", 1), ("5.6.7.8", 2))


def send_in_segments(address: tuple[str, int], segments: list[bytes]) -> bytes:
    with Client(address) as c:
        for i, segment in enumerate(segments):
            if i:
                time.sleep(0.05)  # only so that the segments arrive as separate reads
            c.send(segment)
        c.send(b"z NOOP\r\n")
        c.until(b"z")
        return c.logout()


@pytest.mark.parametrize(
    "segments",
    [
        pytest.param([V1], id="v1-whole"),
        pytest.param([V1[:1], V1[1:]], id="v1-P|ROXY"),
        pytest.param([V1[:5], V1[5:]], id="v1-PROXY|rest"),
        pytest.param([V2], id="v2-whole"),
        pytest.param([V2[:1], V2[1:]], id="v2-split"),
    ],
)
async def test_proxy_header_from_untrusted_client_is_refused(
    target: Dovecot, tmp_path: Path, segments: list[bytes]
) -> None:
    async with veil(target.address, tmp_path) as v:
        transcript = await run(send_in_segments, v.address, segments)
        (end,) = await v.sessions_ended(1)
    lines = transcript.splitlines()
    # Dovecot never answered the header as a command, and the session did not go on.
    assert not [line for line in lines if not line.startswith((b"* OK", b"* BYE"))], transcript
    assert end.reason == "proxy_header"


# --- Item 6: STARTTLS after authentication.


def starttls_after_login(address: tuple[str, int]) -> tuple[bytes, bytes, bytes]:
    """(greeting, what came with LOGIN and CAPABILITY, the answer to STARTTLS)."""
    with Client(address) as c:
        greeting = c.greeting()
        c.login()
        c.send(b"c CAPABILITY\r\n")
        c.until(b"c")
        after_login = c.transcript[len(greeting) :]
        c.send(b"x STARTTLS\r\n")
        answer = c.until(b"x")
        return greeting, after_login, answer


@pytest.fixture
def tls_settings(tls_material: TlsMaterial) -> dict[str, str]:
    return {"client_tls": "offer", "cert": str(tls_material.cert), "key": str(tls_material.key)}


async def test_no_starttls_in_capabilities_after_login(
    target: Dovecot, tmp_path: Path, tls_settings: dict[str, str]
) -> None:
    async with veil(target.address, tmp_path, **tls_settings) as v:
        greeting, after_login, _ = await run(starttls_after_login, v.address)
        await v.sessions_ended(1)
    assert b"STARTTLS" in greeting  # offered before authentication
    assert b"CAPABILITY" in after_login
    assert b"STARTTLS" not in after_login


async def test_starttls_after_login_is_bad(
    target: Dovecot, tmp_path: Path, tls_settings: dict[str, str]
) -> None:
    async with veil(target.address, tmp_path, **tls_settings) as v:
        _, _, answer = await run(starttls_after_login, v.address)
        await v.sessions_ended(1)
    assert answer.startswith(b"x BAD"), answer


# --- Item 7: field names under the passthrough policy; x-client-transport.


def id_with_literal_name(address: tuple[str, int], name: bytes, value: bytes, plus: bool) -> bytes:
    """`b ID ({N}` name `"value")`: the field name as a literal (synchronizing or LITERAL+)."""
    rest = name + b' "' + value + b'")\r\n'
    with Client(address) as c:
        c.greeting()
        if plus:
            c.send(b"b ID ({%d+}\r\n" % len(name) + rest)
        else:
            c.send(b"b ID ({%d}\r\n" % len(name))
            if c.line().startswith(b"+"):
                c.send(rest)
        c.until(b"b")
        return c.logout()


@pytest.mark.parametrize("plus", [False, True], ids=["sync", "literal+"])
async def test_field_name_with_nul_does_not_reach_dovecot(
    target: Dovecot, tmp_path: Path, plus: bool
) -> None:
    value = marker()
    log = DovecotLog(target)
    async with veil(target.address, tmp_path, policy="passthrough") as v:
        transcript = await run(
            id_with_literal_name, v.address, b"x-proxy-ttl\0a", value.encode(), plus
        )
        await v.sessions_ended(1)
    text = await settled(log)
    assert answered_properly(transcript, b"b"), transcript
    assert "x-proxy-ttl" not in text
    assert value not in text


@pytest.mark.parametrize(
    "policy",
    [
        pytest.param("default"),
        pytest.param("passthrough"),
    ],
)
async def test_client_transport_does_not_reach_dovecot(
    target: Dovecot, tmp_path: Path, policy: str
) -> None:
    value = marker("TRANSPORT")
    command = b'b ID ("name" "Mail" "x-client-transport" "%s")\r\n' % value.encode()
    log = DovecotLog(target)
    async with veil(target.address, tmp_path, policy=policy) as v:
        transcript = await run(send_id, v.address, b"b", command)
        await v.sessions_ended(1)
    text = await settled(log)
    assert b"b OK" in transcript
    assert "ID sent: name=Mail" in text
    assert "x-client-transport" not in text
    assert value not in text


# --- Item 8: an upstream that is not an IMAP server.

CONNECT_TIMEOUT = 1.0


def impatient_login(address: tuple[str, int], password: bytes) -> bytes:
    """LOGIN at once, without waiting for a greeting; then the first line back."""
    with Client(address, timeout=CONNECT_TIMEOUT + 2) as c:
        c.send(b"a LOGIN alice " + password + b"\r\n")
        first = c.line()
        if first.startswith(b"* BYE"):
            c.rest()
        return c.transcript


@pytest.mark.parametrize(
    "banner",
    [
        pytest.param(b"220 smtp.example ESMTP\r\n", id="smtp"),
        pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n", id="ssh"),
        pytest.param(None, id="never-greets"),
    ],
)
async def test_non_imap_upstream_gets_nothing_from_the_client(
    tmp_path: Path, banner: bytes | None
) -> None:
    password = marker("PW").encode()
    with FakeUpstream(banner) as upstream:
        async with veil(upstream.address, tmp_path, connect_timeout=CONNECT_TIMEOUT) as v:
            transcript = await run(impatient_login, v.address, password)
            await v.sessions_ended(1)
        received = await run(upstream.wait_closed)
    assert transcript.startswith(b"* BYE [UNAVAILABLE]"), transcript
    assert upstream.connections == 1
    assert received == [b""]
    assert password.decode() not in v.records_json()


def test_serve_names_a_non_imap_upstream_on_stderr(tmp_path: Path) -> None:
    password = marker("PW").encode()
    with FakeUpstream(b"220 smtp.example ESMTP\r\n") as upstream:
        with imapveil(tmp_path, upstream.address, "--connect-timeout", "1") as serve:
            transcript = impatient_login(("127.0.0.1", serve.port), password)
            serve.stop()
        received = upstream.wait_closed()
    assert transcript.startswith(b"* BYE [UNAVAILABLE]"), transcript
    assert received == [b""]
    stderr = serve.stderr.decode(errors="replace")
    assert f"127.0.0.1:{upstream.address[1]}" in stderr
    assert "220 smtp.example" in stderr
    assert password.decode() not in stderr
