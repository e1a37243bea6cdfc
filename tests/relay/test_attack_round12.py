"""Round 12 of attacks from outside (the wire): raw sockets through the proxy (built as
`imapveil serve` builds it) to a real Dovecot.

- AUTHENTICATE with its response sent before the server asked for it: when the server answers
  the command instead of sending "+" (a mechanism it does not offer, a state it is not valid
  in, a failed first step, or the proxy's own `NO [PRIVACYREQUIRED]`), that response is the
  client's next line, read as a command (Dovecot does the same). The proxy refused it, and its
  record kept the one word of it as the command's tag: the base64 credentials.
- AUTHENTICATE LOGIN answered with another mechanism's response (PLAIN's `authzid NUL user NUL
  password`, XOAUTH2's with its token): the whole of it was taken as LOGIN's user name, and the
  command's record kept it as its user.
- A trusted balancer's PROXY v1 header with an IPv6 zone in an address (`fe80::1%a<LF>b`): taken
  as the client's address, into the records and the ID the proxy sends before LOGIN, whose value
  then went as a synchronizing literal sent before the server's "+".
- A tag with `]` (RFC 9051 allows it; Dovecot answers `* BAD`, never the tag): the proxy took
  the command and waited for its answer, behind its literal, its rewritten ID, or for ever; the
  same with a tag longer than Dovecot's login process takes (126 octets).
- Held (regression guards), compared line by line with what Dovecot gives a direct connection:
  `*` at each step of AUTHENTICATE LOGIN, a literal's announcement, `=`, a trailing space and
  LF-only lines where SASL expects a response, a NOOP pipelined into a SASL exchange; literal8
  and LITERAL+ lengths with leading zeros, `{0}`, CATENATE with several LITERAL+ parts (binary,
  a bad URL between two, a part with a bare LF).
- Where DONE must end IDLE: DONE with a trailing space, a NUL, a CR in it, an empty line before
  it, a command: the session ends with `* BYE` (Dovecot would read some as DONE, some as a BAD
  then a command).
- TLS records of one octet each after STARTTLS (a pump turn each): all answered, a bystander
  not held up.
- TLS 1.2 renegotiation asked by the client (openssl s_client's `R`): refused, the session ends,
  others are served. That held through OpenSSL 3's default only; the client leg's context now
  refuses it itself (OpenSSL 1.1.1 allows it unless told not to).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from imapveil.protocol.session import CoreConfig
from imapveil.records import CommandCompleted, Violation
from imapveil.relay import tls
from tests.conftest import TlsMaterial
from tests.helpers.attack import Client, veil
from tests.helpers.dovecot import Dovecot
from tests.helpers.feeding import Conversation, whole
from tests.helpers.scripted import Peer, serve

pytestmark = pytest.mark.dovecot
run = trio.to_thread.run_sync


# --- A SASL response the server never asked for, read as a command.

PASSWORD = b"wonderland"
PLAIN = base64.b64encode(b"\x00alice\x00" + PASSWORD)  # no "+" in it: a tag's characters
LOGIN_PASSWORD = base64.b64encode(PASSWORD)


def credentials_in(text: str) -> list[str]:
    """Any form of the password in `text`, case-blind (an upper-cased base64 is recoverable)."""
    low = text.lower()
    forms = [PASSWORD, PLAIN, LOGIN_PASSWORD, PLAIN[:12], b"TOKEN-"]
    return [f.decode() for f in forms if f.decode().lower() in low]


def unknown_mechanism(c: Client) -> None:
    """A mechanism Dovecot does not offer: `NO` at once, no "+"; the response was sent ahead."""
    c.send(b"A AUTHENTICATE XFOO\r\n" + PLAIN + b"\r\n")
    assert c.until(b"A").startswith(b"A NO"), c.transcript[-300:]


def after_login(c: Client) -> None:
    """AUTHENTICATE once logged in: `BAD` at once (Dovecot's imap process does not know it)."""
    c.login()
    c.send(b"A AUTHENTICATE PLAIN\r\n" + PLAIN + b"\r\n")
    assert c.until(b"A").startswith(b"A BAD"), c.transcript[-300:]


def login_mechanism_ahead(c: Client) -> None:
    """LOGIN with its user as SASL-IR and its password sent ahead, for a mechanism refused."""
    c.send(b"A AUTHENTICATE XLOGIN " + base64.b64encode(b"alice") + b"\r\n")
    c.send(LOGIN_PASSWORD + b"\r\n")
    assert c.until(b"A").startswith(b"A NO"), c.transcript[-300:]


def privacy_required(c: Client) -> None:
    """The proxy's own `NO [PRIVACYREQUIRED]` (TLS required, not there yet)."""
    c.send(b"A AUTHENTICATE PLAIN\r\n" + PLAIN + b"\r\n")
    assert c.until(b"A").startswith(b"A NO [PRIVACYREQUIRED]"), c.transcript[-300:]


AHEAD: dict[str, Callable[[Client], None]] = {
    "unknown-mechanism": unknown_mechanism,
    "after-login": after_login,
    "login-mechanism": login_mechanism_ahead,
    "privacy-required": privacy_required,
}


def sasl_ahead(address: tuple[str, int], name: str) -> bytes:
    with Client(address) as c:
        c.greeting()
        AHEAD[name](c)
        # The response was read as a command and refused (as Dovecot would); the session goes on.
        c.send(b"z NOOP\r\n")
        assert c.until(b"z").startswith(b"z OK"), c.transcript[-600:]
        c.logout()
        return c.transcript


@pytest.mark.parametrize("name", list(AHEAD))
async def test_a_sasl_response_sent_ahead_reaches_no_record(
    target: Dovecot,
    tmp_path: Path,
    tls_material: TlsMaterial,
    caplog: pytest.LogCaptureFixture,
    name: str,
) -> None:
    """Found (attack12): the response became a refused command whose record kept its one word
    as the tag (`"tag": "AGFsaWNlAHdvbmRlcmxhbmQ="`). A line of one word is no command: it is
    refused (BAD) and counted as a violation, with no command record."""
    require = {
        "client_tls": "require",
        "cert": str(tls_material.cert),
        "key": str(tls_material.key),
    }
    settings = require if name == "privacy-required" else {}
    caplog.set_level(logging.DEBUG)
    async with veil(target.address, tmp_path, **settings) as v:
        transcript = await run(sasl_ahead, v.address, name)
        await v.sessions_ended(1)
    assert b" BAD [CLIENTBUG]" in transcript, transcript
    records = v.records_json()
    assert credentials_in(records) == [], records
    assert "refused_no_command" in caplog.text  # the debug log was written
    assert credentials_in(caplog.text) == [], caplog.text
    kinds = [r.kind for r in v.sink.of(Violation)]
    assert "refused_no_command" in kinds, kinds
    assert [r.verb for r in v.sink.of(CommandCompleted)][-2:] == ["NOOP", "LOGOUT"]


# --- SASL and literals in odd forms: what the client gets is what Dovecot alone would give.

Step = tuple[bytes, bytes]
"""Octets to send, and what ends their answer: a tag (its tagged line) or b"+"."""

LOGIN_STEPS: list[Step] = [(b"L LOGIN alice wonderland\r\n", b"L")]
WIRE: dict[str, list[Step]] = {
    # `*` at each step of LOGIN: Dovecot's BAD, the next command in step.
    "cancel-at-user": [(b"A AUTHENTICATE LOGIN\r\n", b"+"), (b"*\r\n", b"A")],
    "cancel-at-password": [
        (b"A AUTHENTICATE LOGIN\r\n", b"+"),
        (base64.b64encode(b"alice") + b"\r\n", b"+"),
        (b"*\r\n", b"A"),
    ],
    # Where SASL expects a line, a literal's announcement is a line (invalid base64).
    "literal-as-response": [(b"A AUTHENTICATE PLAIN\r\n", b"+"), (b"{24}\r\n", b"A")],
    "lf-only": [(b"A AUTHENTICATE PLAIN\n", b"+"), (PLAIN + b"\n", b"A")],
    "trailing-space": [(b"A AUTHENTICATE PLAIN\r\n", b"+"), (PLAIN + b" \r\n", b"A")],
    "equals-after-plus": [(b"A AUTHENTICATE PLAIN\r\n", b"+"), (b"=\r\n", b"A")],
    # A NOOP pipelined behind AUTHENTICATE with SASL-IR is the password step's response, as
    # Dovecot reads it; the password sent after it is then a command (refused, not recorded).
    "pipelined-into-sasl": [
        (
            b"n1 NOOP\r\nA AUTHENTICATE LOGIN " + base64.b64encode(b"alice") + b"\r\nn2 NOOP\r\n",
            b"A",
        ),
        (LOGIN_PASSWORD + b"\r\nn3 NOOP\r\n", b"n3"),
    ],
    # Literal forms: leading zeros (literal8, and a 20-digit LITERAL+), {0}, CATENATE parts.
    "leading-zeros": [
        *LOGIN_STEPS,
        (b"a APPEND INBOX ~{00005}\r\n", b"+"),
        (b"hello\r\n", b"a"),
        (b"b APPEND INBOX {00000000000000000005+}\r\nhello\r\n", b"b"),
    ],
    "empty-literal": [*LOGIN_STEPS, (b"a APPEND INBOX {0}\r\n", b"a"), (b"\r\n", b"*")],
    "catenate": [
        *LOGIN_STEPS,
        (
            b"a APPEND INBOX CATENATE (TEXT {5+}\r\nhello TEXT {3+}\r\nabc TEXT ~{2+}\r\nxy)\r\n",
            b"a",
        ),
        (
            b"b APPEND INBOX CATENATE (TEXT {5+}\r\nhello"
            b' URL "/INBOX;UID=99" TEXT {3+}\r\nabc)\r\n',
            b"b",
        ),
        (b"c APPEND INBOX CATENATE (TEXT {7+}\r\nSub: x\n TEXT {4+}\r\n\r\nab)\r\n", b"c"),
    ],
}


def answers(address: tuple[str, int], steps: list[Step]) -> list[bytes]:
    """Each line received, as its tag (or `*`, `+`) and status: what says where a stream is."""
    with Client(address) as c:
        c.greeting()
        for data, end in steps:
            c.send(data)
            while line := c.line():
                if line.startswith(end + b" ") or (end == b"+" and line.startswith(b"+")):
                    break
            assert line, c.transcript[-600:]
        c.send(b"z NOOP\r\n")
        assert c.until(b"z").startswith(b"z OK"), c.transcript[-600:]
        c.logout()
    shown = []
    for line in c.transcript.splitlines()[1:]:
        words = line.split(b" ")
        shown.append(b" ".join(words[:2]) if words[0] != b"+" else b"+")
    return shown


@pytest.mark.parametrize("name", list(WIRE))
async def test_sasl_and_literals_in_odd_forms_stay_in_step(
    target: Dovecot, tmp_path: Path, name: str
) -> None:
    """Held (attack12), but for `pipelined-into-sasl`, whose password was a record's tag until
    the fix above: every answer (tag and status, line by line) is the one Dovecot gives a
    direct connection, and no credential reaches a record."""
    direct = await run(answers, target.address, WIRE[name])
    async with veil(target.address, tmp_path) as v:
        proxied = await run(answers, v.address, WIRE[name])
        await v.sessions_ended(1)
    assert proxied == direct
    assert credentials_in(v.records_json()) == [], v.records_json()


# --- TLS 1.2 renegotiation on the client leg.


def renegotiate(address: tuple[str, int]) -> tuple[bytes, int | None]:
    """STARTTLS with TLS 1.2 (openssl s_client), then `R`: a client-initiated renegotiation,
    each one a full handshake's work for the proxy and no new connection (no admission limit
    sees it). What s_client printed after the `R`, and its exit status (None: still running,
    the renegotiation went through)."""
    command = ["openssl", "s_client", "-connect", f"{address[0]}:{address[1]}", "-starttls", "imap"]
    with subprocess.Popen(
        [*command, "-tls1_2", "-crlf"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        while not (line := proc.stdout.readline()).startswith(b"    Verify return code"):
            assert line, "s_client ended before its handshake was done"
        proc.stdin.write(b"R\n")
        proc.stdin.flush()
        try:
            status: int | None = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            status = None
            proc.kill()
        return proc.stdout.read(), status


def one_noop(address: tuple[str, int]) -> None:
    """A bystander: a NOOP answered."""
    with Client(address) as c:
        c.greeting()
        c.send(b"n NOOP\r\n")
        assert c.until(b"n").startswith(b"n OK"), c.transcript
        c.logout()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_a_client_initiated_renegotiation_is_refused(
    target: Dovecot, tmp_path: Path, tls_material: TlsMaterial
) -> None:
    """Held (attack12): OpenSSL 3 refuses a client's renegotiation (`no renegotiation` alert),
    the session ends there, and the proxy goes on serving others."""
    offer = {"client_tls": "offer", "cert": str(tls_material.cert), "key": str(tls_material.key)}
    async with veil(target.address, tmp_path, **offer) as v:
        after, status = await run(renegotiate, v.address)
        (end,) = await v.sessions_ended(1)
        await run(one_noop, v.address)
        await v.sessions_ended(2)
    assert b"RENEGOTIATING" in after, after
    assert status is not None, f"the renegotiation went through: {after[-500:]!r}"
    assert b"no renegotiation" in after, after
    assert end.client_tls


def test_the_client_leg_context_refuses_renegotiation_whatever_the_openssl(
    tls_material: TlsMaterial,
) -> None:
    """The test above holds through OpenSSL 3's default; OpenSSL 1.1.1 (which Python 3.11 may
    be built with) lets a client renegotiate unless told not to. The client leg's context says
    so itself (attack12: it did not)."""
    context = tls.server_context(str(tls_material.cert), str(tls_material.key))
    assert context.options & ssl.OP_NO_RENEGOTIATION


# --- A PLAIN response where LOGIN's user name goes.


TOKEN = b"ya29.TOKEN-" + PASSWORD
MIXED = {
    "plain": PLAIN,  # authzid NUL user NUL password
    "xoauth2": base64.b64encode(b"user=alice\x01auth=Bearer " + TOKEN + b"\x01\x01"),
}


def other_for_login(address: tuple[str, int], response: bytes) -> bytes:
    """AUTHENTICATE LOGIN answered with another mechanism's response: a client that mixed its
    mechanisms. It cancels at once (Dovecot refuses such a name, some after its failure delay)."""
    with Client(address) as c:
        c.greeting()
        c.send(b"A AUTHENTICATE LOGIN\r\n")
        assert c.line().startswith(b"+ "), c.transcript
        c.send(response + b"\r\n*\r\n")
        assert c.until(b"A").startswith((b"A BAD", b"A NO")), c.transcript
        c.logout()
        return c.transcript


async def login_mechanism_server(peer: Peer) -> None:
    """Dovecot's LOGIN mechanism in brief: both prompts, `*` cancels; then LOGOUT."""
    await peer.say(b"* OK [CAPABILITY IMAP4rev1 AUTH=LOGIN] scripted\r\n")
    while line := await peer.line():
        tag = line.split(b" ", 1)[0]
        if b" AUTHENTICATE " in line:
            await peer.say(b"+ VXNlcm5hbWU6\r\n")
            await peer.line()
            await peer.say(b"+ UGFzc3dvcmQ6\r\n")
            if (await peer.line()).strip() == b"*":
                await peer.say(tag + b" BAD Authentication aborted by client.\r\n")
        elif b" LOGOUT" in line:
            await peer.say(b"* BYE Logging out\r\n" + tag + b" OK Logout completed.\r\n")
            return


@pytest.mark.parametrize("name", list(MIXED))
async def test_another_mechanisms_response_to_login_is_no_user_name(
    target: Dovecot, tmp_path: Path, name: str
) -> None:
    """Found (attack12, by a fuzzer of the core): LOGIN's first response is its user name, and
    the whole of it was taken as one: `"user": "\\u0000alice\\u0000wonderland"` in the command's
    record (`user_identity = plain`; a keyed hash of it with the default), and XOAUTH2's the
    same way, its token with it. A name with a control octet in it is no user name, whatever
    the mechanism. (XOAUTH2's against a scripted server: Dovecot refuses that name only after
    its failure delay.)"""
    upstream: contextlib.AbstractAsyncContextManager[tuple[str, int]]
    upstream = contextlib.nullcontext(target.address)
    if name != "plain":
        upstream = serve(login_mechanism_server, bytearray())
    async with upstream as address, veil(address, tmp_path, user_identity="plain") as v:
        await run(other_for_login, v.address, MIXED[name])
        await v.sessions_ended(1)
    (auth,) = [r for r in v.sink.of(CommandCompleted) if r.verb == "AUTHENTICATE"]
    assert (auth.mechanism, auth.user) == ("LOGIN", None), auth
    assert credentials_in(v.records_json()) == [], v.records_json()


# --- A PROXY v1 header whose address carries an IPv6 zone (scope id).

ZONED = [
    b"PROXY TCP6 fe80::1%a\nb ::1 51234 143\r\n",  # a line feed in it
    b'PROXY TCP6 fe80::1%"x\\ ::1 51234 143\r\n',
    b"PROXY TCP6 ::1 fe80::1%eth0 51234 143\r\n",
]


def zoned_header(address: tuple[str, int], header: bytes) -> bytes:
    """A trusted balancer's v1 header with a zone in an address, then LOGIN."""
    with Client(address) as c:
        c.send(header + b"L LOGIN alice wonderland\r\n")
        return c.rest()


@pytest.mark.parametrize("header", ZONED)
async def test_a_proxy_v1_address_with_a_zone_is_refused(
    target: Dovecot, tmp_path: Path, header: bytes
) -> None:
    """Found (attack12): `ipaddress` takes `fe80::1%<anything but %>` (a zone, RFC 4007), so a v1
    header passed any octets but space and CRLF as the client's address: into the records, and
    with `forward_client_address` into the ID the proxy sends before LOGIN, where a line feed
    made the value a synchronizing literal the proxy sent whole without waiting for the "+"
    (Dovecot's "+ OK" for it then reached the client, before its LOGIN's answer). PROXY v1
    names addresses as inet_ntop writes them: no zone. Such a header is refused."""
    settings = {"proxy_protocol_from": "127.0.0.1/32", "forward_client_address": True}
    async with veil(target.address, tmp_path, **settings) as v:
        transcript = await run(zoned_header, v.address, header)
        (end,) = await v.sessions_ended(1)
    assert b"+ OK" not in transcript, transcript
    assert (end.reason, end.commands) == ("proxy_header", 0), end
    assert "%" not in v.records_json(), v.records_json()


def test_the_injected_id_never_carries_a_literal() -> None:
    """The ID the proxy sends ahead of LOGIN goes whole: a value that needs a literal (the
    zoned address above did) would send a synchronizing literal's octets before the server's
    "+". Such a value is left out; the rest is sent (attack12: it went as `{11}` CRLF value)."""
    config = CoreConfig(forward_client_address=True)
    conv = Conversation(whole, config)
    conv.core.client_endpoints = (("fe80::1%a\nb", 40001), ("198.51.100.1", 143))
    conv.server(b"* OK ready\r\n").client(b"a LOGIN alice x\r\n")
    assert conv.to_server == (
        b'imapveil.1 ID ("x-originating-port" "40001" "x-connected-ip" "198.51.100.1" '
        b'"x-connected-port" "143" "x-session-id" "s1")\r\n'
        b"a LOGIN alice x\r\n"
    )


# --- A tag Dovecot does not take.

BRACKET_TAG = {
    "append": b"t] APPEND INBOX {5+}\r\nhello\r\n",
    "id": b't] ID ("name" "x" "os" {5+}\r\nhello)\r\n',
    "noop": b"t] NOOP\r\n" * 3,
}


def bracket_tag(address: tuple[str, int], command: bytes) -> bytes:
    with Client(address) as c:
        c.greeting()
        c.login()
        c.send(command + b"n NOOP\r\n")
        assert c.until(b"n").startswith(b"n OK"), c.transcript[-600:]
        c.logout()
        return c.transcript


@pytest.mark.parametrize("name", list(BRACKET_TAG))
async def test_a_tag_with_a_bracket_is_refused_as_dovecot_refuses_it(
    target: Dovecot, tmp_path: Path, name: str
) -> None:
    """Found (attack12): `]` is a tag character in RFC 9051's grammar, and Dovecot refuses it
    (`* BAD`, untagged: the command is never answered). The proxy took such a command and
    waited for its answer: behind its literal ("+" never came: the session stalled until the
    literal timeout, a minute), behind its rewritten ID's first piece (no timeout of its own),
    or for ever (a waiting command: STARTTLS refused as busy, `max_unanswered` of them and the
    client was no longer read). A tag with `]` is now refused by the proxy, as Dovecot does;
    no command waits for an answer at the end."""
    async with veil(target.address, tmp_path) as v:
        transcript = await run(bracket_tag, v.address, BRACKET_TAG[name])
        await v.sessions_ended(1)
    assert b"* BAD [CLIENTBUG]" in transcript, transcript
    assert not [r for r in v.sink.of(CommandCompleted) if r.status is None]


# --- A tag longer than Dovecot's login process takes.

LONG_TAG = b"t" * 127  # imap-login: IMAP_TAG_MAX_LEN is 126


def long_tag_before_login(address: tuple[str, int], command: bytes) -> bytes:
    with Client(address) as c:
        c.greeting()
        c.send(LONG_TAG + command + b"n NOOP\r\n")
        assert c.until(b"n").startswith(b"n OK"), c.transcript[-600:]
        c.login()
        c.logout()
        return c.transcript


LONG_TAGGED = {
    "login-literal": b" LOGIN alice {10+}\r\nwonderland\r\n",
    "noop": b" NOOP\r\n",
}


@pytest.mark.parametrize("name", list(LONG_TAGGED))
async def test_a_tag_too_long_for_dovecots_login_is_refused(
    target: Dovecot, tmp_path: Path, name: str
) -> None:
    """Found (attack12): before login, Dovecot answers a command whose tag is longer than 126
    octets with an untagged `* BAD`, never with its tag; the proxy took it and waited for that
    answer (behind a LOGIN's literal: until the literal timeout, its password held; a NOOP for
    ever). Such a tag is refused by the proxy (after login too: no client needs one)."""
    async with veil(target.address, tmp_path) as v:
        transcript = await run(long_tag_before_login, v.address, LONG_TAGGED[name])
        await v.sessions_ended(1)
    assert b"* BAD [CLIENTBUG]" in transcript, transcript
    assert not [r for r in v.sink.of(CommandCompleted) if r.status is None]
    assert credentials_in(v.records_json()) == [], v.records_json()


# --- DONE in forms Dovecot would take or read otherwise.

ODD_DONE = {
    "trailing-space": b"DONE \r\n",  # Dovecot: "BAD Expected DONE", IDLE over, next command read
    "nul": b"DONE\x00\r\n",  # Dovecot: DONE
    "bare-cr": b"DONE\rX\r\n",
    "empty-line-first": b"\r\nDONE\r\n",
    "a-command": b"n NOOP\r\n",
}


def odd_done(address: tuple[str, int], done: bytes) -> bytes:
    with Client(address) as c:
        c.greeting()
        c.login()
        c.send(b"s SELECT INBOX\r\n")
        assert c.until(b"s").startswith(b"s OK"), c.transcript[-300:]
        c.send(b"i IDLE\r\n")
        assert c.line().startswith(b"+ "), c.transcript[-300:]
        c.send(done + b"z NOOP\r\n")
        return c.rest()


@pytest.mark.parametrize("name", list(ODD_DONE))
async def test_anything_but_done_ends_idle_and_the_session(
    target: Dovecot, tmp_path: Path, name: str
) -> None:
    """Held (attack12): where DONE must be, anything else (DONE with a space, a NUL, a CR in
    it, an empty line before it, a command) ends the session with `* BYE`; Dovecot reads some
    as DONE and some as a BAD and the next line as a command: the proxy does not guess."""
    async with veil(target.address, tmp_path) as v:
        transcript = await run(odd_done, v.address, ODD_DONE[name])
        (end,) = await v.sessions_ended(1)
    assert transcript.endswith(b"* BYE Expected DONE to end IDLE\r\n"), transcript[-300:]
    assert (end.reason, end.detail) == ("protocol_error", None), end
    assert [r.kind for r in v.sink.of(Violation)] == ["idle_not_done"]


# --- TLS records of one octet each.

TINY_RECORDS = 8000
"""Octets of NOOPs the attacker sends after STARTTLS, each in a TLS record of its own."""


def one_octet_records(address: tuple[str, int], context: ssl.SSLContext) -> int:
    """STARTTLS, then NOOPs one octet per TLS record (each a receive of its own for the proxy:
    OpenSSL hands over one record at a time), all sent at once; the answers counted."""
    with socket.create_connection(address, timeout=10) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"* OK")
        s.sendall(b"S STARTTLS\r\n")
        assert f.readline().startswith(b"S OK")
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                s.sendall(outgoing.read())
                incoming.write(s.recv(65536))
        payload = b"n NOOP\r\n" * (TINY_RECORDS // 8)
        for i in range(len(payload)):
            tls.write(payload[i : i + 1])
        s.sendall(outgoing.read())
        answered = 0
        while answered < payload.count(b"\n"):
            data = s.recv(65536)
            assert data, f"closed after {answered} answers"
            incoming.write(data)
            with contextlib.suppress(ssl.SSLWantReadError):
                while chunk := tls.read(65536):
                    answered += chunk.count(b"n OK")
        return answered


def noops_until(address: tuple[str, int], done: threading.Event) -> float:
    """A bystander: NOOPs one after another until `done`; the longest wait (seconds)."""
    worst = 0.0
    with Client(address) as c:
        c.greeting()
        i = 0
        while not done.is_set() or i < 3:
            began = time.monotonic()
            c.send(b"b%d NOOP\r\n" % i)
            assert c.until(b"b%d" % i).startswith(b"b%d OK" % i), c.transcript[-300:]
            worst = max(worst, time.monotonic() - began)
            i += 1
        c.logout()
    return worst


async def test_one_octet_tls_records_cost_their_own_session(
    target: Dovecot, tmp_path: Path, tls_material: TlsMaterial
) -> None:
    """Held (attack12): 8,000 TLS records of one octet each (184 KB on the wire, a pump turn
    each: some 50 us of the proxy's one loop apiece) are all answered, and a bystander's NOOPs
    meanwhile wait no longer than a blink (trio checkpoints at every receive)."""
    offer = {"client_tls": "offer", "cert": str(tls_material.cert), "key": str(tls_material.key)}
    done = threading.Event()
    worst: list[float] = []

    async def bystander() -> None:
        worst.append(await run(noops_until, v.address, done))

    async with veil(target.address, tmp_path, **offer) as v, trio.open_nursery() as nursery:
        nursery.start_soon(bystander)
        try:
            answered = await run(one_octet_records, v.address, tls_material.client_context())
        finally:
            done.set()
    assert answered == TINY_RECORDS // 8
    assert worst and worst[0] < 0.5, worst
