"""Round 17 of attacks from outside: AUTHENTICATE and its SASL exchanges, raw sockets through
the proxy (built as `imapveil serve` builds it) to a real Dovecot, and to a scripted upstream
where Dovecot cannot make the server's side wanted.

- A SASL response sent ahead of a `+` that never comes (a mechanism Dovecot does not offer) is
  the client's next command line. One word is refused with no record (attack12); one word and a
  trailing space (or a space and a tab, a CR) was refused as a command without a name, and its
  record kept the word as the command's tag: the base64 credentials in the event log.
- XOAUTH2 and OAUTHBEARER responses whose separators are not `^A` octets (the two characters
  `^A` of the documentation's notation, a space) were read to their end as the user name, the
  bearer token with it, into the command's record.
- AUTHENTICATE pipelined behind STARTTLS (the injection class): dropped, never sent, but its
  `starttls_pipelining` violation was lost when no TLS handshake followed (the relay ended the
  core's actions at the failed handshake, the violation's record after it).
- Held (pinned where nothing else pins it at the wire): AUTHENTICATE in clear text after
  STARTTLS's OK (no ClientHello: the session ends, the response goes nowhere); a scripted
  server that checks that no octet reaches it before its `+` (LOGIN's two responses
  and a NOOP sent in one segment); a `+` and the tagged NO in one segment, the response sent
  ahead then read as a command (refused, never sent); CRAM-MD5 and SCRAM-SHA-256 through a
  Dovecot that offers them (several steps, an empty last response); LOGIN's empty initial
  response (`=`) counted as its user name's step, so a server that then asks for the password
  never has it taken for the user.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
from pathlib import Path

import pytest
import trio

from imapveil.protocol import sasl
from imapveil.records import CommandCompleted, SessionEnded, Violation
from imapveil.secret import Secret
from tests.conftest import TlsMaterial
from tests.helpers.attack import Client, DovecotLog, veil
from tests.helpers.dovecot import Dovecot
from tests.helpers.scripted import Peer, serve

run = trio.to_thread.run_sync

PASSWORD = b"wonderland"
PLAIN = base64.b64encode(b"\x00alice\x00" + PASSWORD)  # no "+" in it: a tag's characters
LOGIN_USER = base64.b64encode(b"alice")
LOGIN_PASSWORD = base64.b64encode(PASSWORD)
TOKEN = b"ya29.TOKEN-" + PASSWORD


def credentials_in(text: str) -> list[str]:
    """Any form of the password or token in `text`, case-blind (upper-cased base64 is
    recoverable)."""
    low = text.lower()
    forms = [PASSWORD, PLAIN, LOGIN_PASSWORD, PLAIN[:12], b"TOKEN-"]
    return [f.decode() for f in forms if f.decode().lower() in low]


# --- A SASL response sent ahead, with a trailing space.

AHEAD = {
    "plain-space": b"A AUTHENTICATE XFOO\r\n" + PLAIN + b" \r\n",
    "plain-spaces": b"A AUTHENTICATE XFOO\r\n" + PLAIN + b"   \r\n",
    "plain-space-tab": b"A AUTHENTICATE XFOO\r\n" + PLAIN + b" \t\r\n",
    "plain-space-cr": b"A AUTHENTICATE XFOO\r\n" + PLAIN + b" \r\r\n",
    "login-password-space": b"A AUTHENTICATE XLOGIN " + LOGIN_USER + b"\r\n"
    + LOGIN_PASSWORD + b" \n",
}  # fmt: skip


def sent_ahead(address: tuple[str, int], data: bytes) -> bytes:
    with Client(address) as c:
        c.greeting()
        c.send(data)
        assert c.until(b"A").startswith(b"A NO"), c.transcript[-300:]
        c.send(b"z NOOP\r\n")
        assert c.until(b"z").startswith(b"z OK"), c.transcript[-600:]
        c.logout()
        return c.transcript


@pytest.mark.dovecot
@pytest.mark.parametrize("name", list(AHEAD))
async def test_a_response_sent_ahead_with_a_trailing_space_is_no_tag(
    target: Dovecot, tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    """Found (attack17s): `<base64> ` was refused as a command with a tag and no name, and
    its record (and the debug log's copy) had `"tag": "AGFsaWNlAHdvbmRlcmxhbmQ="`. A tag
    followed by nothing but spaces is one word: no command, no record. Then the same with a
    space and a tab, or a CR, after the word: still a command without a name, recorded with
    the word as its tag; a refused line without a command name now has no record."""
    caplog.set_level(logging.DEBUG)
    log = DovecotLog(target)
    async with veil(target.address, tmp_path, user_identity="plain") as v:
        transcript = await run(sent_ahead, v.address, AHEAD[name])
        await v.sessions_ended(1)
    assert b" BAD [CLIENTBUG]" in transcript, transcript
    assert credentials_in(await run(log.settled, 1)) == []
    assert credentials_in(v.records_json()) == [], v.records_json()
    assert credentials_in(caplog.text) == [], caplog.text
    kinds = [r.kind for r in v.sink.of(Violation)]
    assert kinds in (["refused_no_command"], ["refused_command_name"]), kinds
    assert [r.verb for r in v.sink.of(CommandCompleted)] == ["AUTHENTICATE", "NOOP", "LOGOUT"]


# --- AUTHENTICATE sent in the clear behind STARTTLS.


def authenticate_behind_starttls(address: tuple[str, int], together: bool) -> bytes:
    """STARTTLS, then AUTHENTICATE with SASL-IR in clear text: in the same segment, or once
    the OK came, where the proxy's TLS handshake reads the client's ClientHello."""
    with Client(address) as c:
        c.greeting()
        auth = b"A AUTHENTICATE PLAIN " + PLAIN + b"\r\n"
        if together:
            c.sock.sendall(b"S STARTTLS\r\n" + auth)
        else:
            c.send(b"S STARTTLS\r\n")
            assert c.line().startswith(b"S OK"), c.transcript
            c.send(auth)
        return c.rest()


@pytest.mark.dovecot
@pytest.mark.parametrize("together", [True, False], ids=["same-segment", "after-ok"])
async def test_authenticate_in_clear_text_behind_starttls_goes_nowhere(
    target: Dovecot,
    tmp_path: Path,
    tls_material: TlsMaterial,
    caplog: pytest.LogCaptureFixture,
    together: bool,
) -> None:
    """Pipelined behind STARTTLS it is dropped and no ClientHello comes; after the OK it is no
    ClientHello. Either way the session ends without TLS and the response reaches neither
    Dovecot (no auth attempt in its log) nor a record, nor the proxy's log (the JA4 recorder
    had it after the OK, and keeps only a fingerprint: none). Found (attack17s): the dropped
    octets' `starttls_pipelining` violation was never written when the handshake then failed
    (`Connection._carry_out` returned at the failed switch, before the records after it)."""
    caplog.set_level(logging.DEBUG)
    settings = {
        "client_tls": "offer",
        "cert": str(tls_material.cert),
        "key": str(tls_material.key),
        "tls_handshake_timeout": 0.5,
    }
    log = DovecotLog(target)
    async with veil(target.address, tmp_path, user_identity="plain", **settings) as v:
        transcript = await run(authenticate_behind_starttls, v.address, together)
        (end,) = await v.sessions_ended(1)
    assert transcript.endswith(b"S OK Begin TLS negotiation now\r\n"), transcript
    assert (end.reason, end.user) == ("tls_error", None), end
    assert "no auth attempts" in (text := await run(log.settled, 1)), text
    assert credentials_in(text + v.records_json() + caplog.text) == []
    assert [r.verb for r in v.sink.of(CommandCompleted)] == ["STARTTLS"]
    dropped = [r.kind for r in v.sink.of(Violation)] == ["starttls_pipelining"]
    assert dropped == together, v.sink.of(Violation)


# --- OAuth responses with their separators spelled wrong.

OAUTH = {
    "xoauth2-caret": ("XOAUTH2", b"user=alice^Aauth=Bearer " + TOKEN + b"^A^A"),
    "xoauth2-space": ("XOAUTH2", b"user=alice auth=Bearer " + TOKEN + b"\x01\x01"),
    "xoauth2-no-end": ("XOAUTH2", b"user=alice auth=Bearer " + TOKEN),
    "oauthbearer-caret": ("OAUTHBEARER", b"n,a=alice^Aauth=Bearer " + TOKEN + b"^A^A"),
    "oauthbearer-space": ("OAUTHBEARER", b"n,a=alice auth=Bearer " + TOKEN),
}


def oauth(address: tuple[str, int], mechanism: bytes, response: bytes) -> bytes:
    """As SASL-IR: Dovecot here offers neither mechanism (`NO`), the record is made all the
    same."""
    with Client(address) as c:
        c.greeting()
        c.send(b"A AUTHENTICATE " + mechanism + b" " + base64.b64encode(response) + b"\r\n")
        assert c.until(b"A").startswith(b"A NO"), c.transcript[-300:]
        c.logout()
        return c.transcript


@pytest.mark.dovecot
@pytest.mark.parametrize("name", list(OAUTH))
async def test_an_oauth_response_with_odd_separators_names_no_user(
    target: Dovecot, tmp_path: Path, name: str
) -> None:
    """Found (attack17s): XOAUTH2's user was read from `user=` to the next ^A octet or the
    end, and OAUTHBEARER's from `a=` to the next comma or the end of what comes before the
    first ^A octet: with `^A` written as two characters (the notation of Google's and
    Microsoft's documentation), a space, or a comma left out, the bearer token was part of the
    "user" (`"user": "alice^Aauth=Bearer ya29.TOKEN-..."`, `user_identity = plain`; with the
    default `hash`, a user nobody is). The user is now taken only when the `auth=` pair is
    an item of its own."""
    mechanism, response = OAUTH[name]
    async with veil(target.address, tmp_path, user_identity="plain") as v:
        await run(oauth, v.address, mechanism.encode(), response)
        await v.sessions_ended(1)
    (auth,) = [r for r in v.sink.of(CommandCompleted) if r.verb == "AUTHENTICATE"]
    assert (auth.mechanism, auth.user) == (mechanism, None), auth
    assert credentials_in(v.records_json()) == [], v.records_json()


@pytest.mark.parametrize(
    ("mechanism", "response", "user"),
    [
        ("XOAUTH2", b"user=alice^Aauth=Bearer t^A^A", None),
        ("XOAUTH2", b"user=alice auth=Bearer t\x01\x01", None),
        ("XOAUTH2", b"user=alice\x01\x01", None),  # no token: no XOAUTH2 response
        ("XOAUTH2", b"auth=Bearer t\x01user=alice\x01\x01", b"alice"),  # any order
        ("OAUTHBEARER", b"n,a=alice auth=Bearer t", None),
        ("OAUTHBEARER", b"n,a=alice,auth=Bearer t\x01\x01", None),
        ("OAUTHBEARER", b"n,a=alice,\x01host=x\x01auth=Bearer t\x01\x01", b"alice"),
    ],
)
def test_an_oauth_user_only_beside_its_token(
    mechanism: str, response: bytes, user: bytes | None
) -> None:
    """The same, on `sasl.username` (tests/protocol/test_sasl.py has the well-formed ones)."""
    assert sasl.username(mechanism, 0, Secret(response)) == user


# --- Mechanisms of several steps, as Dovecot runs them.

MECHANISMS = "auth_mechanisms = plain login cram-md5 scram-sha-256\n"


def cram_md5(c: Client) -> bytes:
    c.send(b"A AUTHENTICATE CRAM-MD5\r\n")
    line = c.line()
    assert line.startswith(b"+ "), c.transcript
    digest = hmac.new(PASSWORD, base64.b64decode(line[2:].strip()), hashlib.md5).hexdigest()
    c.send(base64.b64encode(b"alice " + digest.encode()) + b"\r\n")
    return c.until(b"A")


def scram_sha_256(c: Client) -> bytes:
    """RFC 5802 with SASL-IR: client-first, client-final with the proof, then the empty
    response to the server-final "+" (RFC 4959 has no success data in OK)."""
    bare = b"n=alice,r=" + base64.b64encode(os.urandom(12))
    c.send(b"A AUTHENTICATE SCRAM-SHA-256 " + base64.b64encode(b"n,," + bare) + b"\r\n")
    line = c.line()
    assert line.startswith(b"+ "), c.transcript
    first = base64.b64decode(line[2:].strip())
    fields = dict(item.split(b"=", 1) for item in first.split(b","))
    salt, rounds = base64.b64decode(fields[b"s"]), int(fields[b"i"])
    salted = hashlib.pbkdf2_hmac("sha256", PASSWORD, salt, rounds)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    final = b"c=biws,r=" + fields[b"r"]
    message = bare + b"," + first + b"," + final
    signature = hmac.new(hashlib.sha256(client_key).digest(), message, hashlib.sha256).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    c.send(base64.b64encode(final + b",p=" + base64.b64encode(proof)) + b"\r\n")
    line = c.line()
    if line.startswith(b"+ "):  # server-final (v=...)
        c.send(b"\r\n")
        line = c.until(b"A")
    return line


STEPS = {"cram-md5": cram_md5, "scram-sha-256": scram_sha_256}


def several_steps(address: tuple[str, int], name: str) -> bytes:
    with Client(address) as c:
        c.greeting()
        assert STEPS[name](c).startswith(b"A OK"), c.transcript[-600:]
        c.send(b"z NOOP\r\n")
        assert c.until(b"z").startswith(b"z OK"), c.transcript[-600:]
        c.logout()
        return c.transcript


@pytest.mark.dovecot
@pytest.mark.parametrize("name", list(STEPS))
async def test_mechanisms_of_several_steps_stay_in_step(tmp_path: Path, name: str) -> None:
    """Held: CRAM-MD5 (a challenge first) and SCRAM-SHA-256 (SASL-IR, a proof, an empty last
    response) through Dovecot: logged in, the NOOP after answered, the user taken from the
    first response and nothing of the rest in a record."""
    server = Dovecot(extra_config=MECHANISMS).start()
    try:
        async with veil(server.address, tmp_path, user_identity="plain") as v:
            await run(several_steps, v.address, name)
            await v.sessions_ended(1)
    finally:
        server.cleanup()
    (auth, *_) = v.sink.of(CommandCompleted)
    assert (auth.mechanism, auth.user, auth.status) == (name.upper(), "alice", "OK"), auth
    assert credentials_in(v.records_json()) == [], v.records_json()


# --- Only what the server asked for: a scripted server that checks.

QUIET = 0.25
"""Seconds the scripted server listens for octets it did not ask for, before each "+"."""


class Strict:
    """Offers PLAIN and LOGIN; before each "+" it sends, notes anything that reached it since
    the line it answers (`early`): the proxy must have held it. `plus_and_no`: the first "+"
    of PLAIN and a tagged NO in one segment (a server that ends the exchange at once)."""

    def __init__(self, *, plus_and_no: bool = False) -> None:
        self.plus_and_no = plus_and_no
        self.received = bytearray()
        self.early: list[bytes] = []

    async def _plus(self, peer: Peer, challenge: bytes, then: bytes = b"") -> None:
        with trio.move_on_after(QUIET):
            data = await peer.stream.receive_some(4096)
            self.early.append(bytes(data))
            peer._buffer.extend(data)  # read on as lines (the test fails anyway)
        await peer.say(b"+ " + challenge + b"\r\n" + then)  # one send: one segment

    async def _response(self, peer: Peer) -> bytes:
        line = await peer.line()
        self.received += line
        return line

    async def script(self, peer: Peer) -> None:
        await peer.say(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN AUTH=LOGIN] hi\r\n")
        while line := await peer.line():
            self.received += line
            tag, _, rest = line.partition(b" ")
            if rest.startswith(b"AUTHENTICATE LOGIN"):
                await self._plus(peer, b"VXNlcm5hbWU6")
                await self._response(peer)
                await self._plus(peer, b"UGFzc3dvcmQ6")
                ok = await self._response(peer) == LOGIN_PASSWORD + b"\r\n"
                await peer.say(tag + (b" OK in\r\n" if ok else b" NO no\r\n"))
            elif rest.startswith(b"AUTHENTICATE PLAIN") and self.plus_and_no:
                await self._plus(peer, b"", tag + b" NO [UNAVAILABLE] not now\r\n")
            elif rest.startswith(b"LOGOUT"):
                await peer.say(b"* BYE bye\r\n" + tag + b" OK bye\r\n")
                return
            else:
                await peer.say(tag + b" OK done\r\n")


def in_one_segment(address: tuple[str, int], data: bytes, answers: list[bytes]) -> bytes:
    """`data` in one send before any answer, then the tagged answers `answers` awaited."""
    with Client(address) as c:
        c.greeting()
        c.sock.sendall(data)
        for tag in answers:
            assert c.until(tag), c.transcript[-600:]
        c.logout()
        return c.transcript


async def test_login_sent_whole_ahead_reaches_the_server_one_response_per_plus(
    tmp_path: Path,
) -> None:
    """Held: AUTHENTICATE LOGIN, its user, its password and a NOOP in one segment. The server
    gets each response only after its "+" for it, and the NOOP only after the exchange ended
    (Dovecot cannot tell: it reads a response that came early as if it came in time)."""
    server = Strict()
    data = b"A AUTHENTICATE LOGIN\r\n" + LOGIN_USER + b"\r\n" + LOGIN_PASSWORD + b"\r\nz1 NOOP\r\n"
    async with (
        serve(server.script, bytearray()) as address,
        veil(address, tmp_path, user_identity="plain") as v,
    ):
        transcript = await run(in_one_segment, v.address, data, [b"A", b"z1"])
        await v.sessions_ended(1)
    assert server.early == []
    assert bytes(server.received) == data + b"Q LOGOUT\r\n"
    assert b"A OK in\r\n" in transcript
    (auth, *_) = v.sink.of(CommandCompleted)
    assert (auth.mechanism, auth.user, auth.status) == ("LOGIN", "alice", "OK"), auth
    assert credentials_in(v.records_json()) == [], v.records_json()


async def test_a_response_held_when_the_exchange_ends_at_its_plus_is_never_sent(
    tmp_path: Path,
) -> None:
    """Held: the response sent ahead waits for the "+"; the server's "+" and its tagged NO come
    in one segment, so the server reads the response as its next command: the proxy reads it
    so too (one word: BAD, no record) and never sends it."""
    server = Strict(plus_and_no=True)
    data = b"A AUTHENTICATE PLAIN\r\n" + PLAIN + b"\r\nz1 NOOP\r\n"
    async with (
        serve(server.script, bytearray()) as address,
        veil(address, tmp_path, user_identity="plain") as v,
    ):
        transcript = await run(in_one_segment, v.address, data, [b"A", b"z1"])
        await v.sessions_ended(1)
    assert server.early == []
    assert bytes(server.received) == b"A AUTHENTICATE PLAIN\r\nz1 NOOP\r\nQ LOGOUT\r\n"
    assert PLAIN + b" BAD [CLIENTBUG]" in transcript, transcript
    assert credentials_in(v.records_json()) == [], v.records_json()
    assert [r.verb for r in v.sink.of(CommandCompleted)] == ["AUTHENTICATE", "NOOP", "LOGOUT"]


async def empty_user_server(peer: Peer) -> None:
    """Reads LOGIN's empty initial response (`=`) as an empty user name: asks for the password
    next, and lets anyone in."""
    await peer.say(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=LOGIN] hi\r\n")
    while line := await peer.line():
        tag, _, rest = line.partition(b" ")
        if rest.startswith(b"AUTHENTICATE"):
            await peer.say(b"+ UGFzc3dvcmQ6\r\n")
            await peer.line()
            await peer.say(tag + b" OK in\r\n")
        elif rest.startswith(b"LOGOUT"):
            await peer.say(b"* BYE bye\r\n" + tag + b" OK bye\r\n")
            return


def login_with_empty_ir(address: tuple[str, int]) -> bytes:
    with Client(address) as c:
        c.greeting()
        c.send(b"A AUTHENTICATE LOGIN =\r\n")
        assert c.line().startswith(b"+ "), c.transcript
        c.send(LOGIN_PASSWORD + b"\r\n")
        assert c.until(b"A").startswith(b"A OK"), c.transcript
        c.logout()
        return c.transcript


async def test_an_empty_initial_response_is_a_step_the_password_never_a_user(
    tmp_path: Path,
) -> None:
    """Held: `AUTHENTICATE LOGIN =` counts as LOGIN's first response (its user name, empty), so
    the next response is not taken for the user. Dovecot asks for the user name again after
    `=` (the proxy then records no user: it cannot know which reading the server has); a server
    that reads `=` as the user name asks for the password, which a user taken from the first
    response after `=` would have been."""
    async with (
        serve(empty_user_server, bytearray()) as address,
        veil(address, tmp_path, user_identity="plain") as v,
    ):
        await run(login_with_empty_ir, v.address)
        (end,) = await v.sessions_ended(1)
    (auth, *_) = v.sink.of(CommandCompleted)
    assert (auth.mechanism, auth.user, auth.status) == ("LOGIN", None, "OK"), auth
    assert end.user is None, end
    assert credentials_in(v.records_json()) == [], v.records_json()


async def unauthenticating_server(peer: Peer) -> None:
    """Offers UNAUTHENTICATE (RFC 8437) and carries it out: after its OK the connection is not
    authenticated, and the next LOGIN (anyone's) is a new user's."""
    await peer.say(b"* OK [CAPABILITY IMAP4rev1 UNAUTHENTICATE AUTH=PLAIN] hi\r\n")
    while line := await peer.line():
        tag, _, rest = line.partition(b" ")
        verb = rest.split(b" ", 1)[0].rstrip(b"\r\n").upper()
        if verb == b"LOGIN":
            await peer.say(tag + b" OK [CAPABILITY IMAP4rev1 UNAUTHENTICATE IDLE] in\r\n")
        elif verb == b"UNAUTHENTICATE":
            await peer.say(tag + b" OK [CAPABILITY IMAP4rev1 UNAUTHENTICATE AUTH=PLAIN] out\r\n")
        elif verb == b"LOGOUT":
            await peer.say(b"* BYE bye\r\n" + tag + b" OK bye\r\n")
            return
        else:
            await peer.say(tag + b" OK done\r\n")


def unauthenticate_then_login_again(address: tuple[str, int]) -> bytes:
    with Client(address) as c:
        c.greeting()
        c.send(b"L LOGIN alice wonderland\r\n")
        assert c.until(b"L").startswith(b"L OK"), c.transcript
        c.send(b"U UNAUTHENTICATE\r\n")
        c.until(b"U")
        c.send(b"M LOGIN mallory secret\r\n")
        c.until(b"M")
        c.logout()
        return c.transcript


async def test_unauthenticate_is_not_offered_and_not_sent(tmp_path: Path) -> None:
    """UNAUTHENTICATE (RFC 8437) takes the server back to the not authenticated state, where
    the proxy's state (the session's user, the login deadline, STARTTLS and COMPRESS offered
    by state) would not follow: it is taken out of the capabilities the client sees and
    answered BAD by the proxy, never sent. A second LOGIN in the authenticated state was sent,
    and a server that took it (this one does) put the session in mallory's name: the proxy
    answers it BAD itself now (RFC 9051: LOGIN is for the not authenticated state), and the
    session stays alice's."""
    sent = bytearray()
    received: list[bytes] = []

    async def server(peer: Peer) -> None:
        original = peer.line

        async def line() -> bytes:
            got = await original()
            received.append(got)
            return got

        peer.line = line  # type: ignore[method-assign]
        await unauthenticating_server(peer)

    async with (
        serve(server, sent) as address,
        veil(address, tmp_path, user_identity="plain") as v,
    ):
        transcript = await run(unauthenticate_then_login_again, v.address)
        await v.sessions_ended(1)
    assert b"UNAUTHENTICATE" not in transcript.split(b"U ")[0], transcript
    assert b"\r\nU BAD " in transcript, transcript
    assert not any(b"UNAUTHENTICATE" in line for line in received), received
    assert b"\r\nM BAD [CLIENTBUG] Already authenticated" in transcript, transcript
    assert not any(b"mallory" in line for line in received), received
    (end,) = v.sink.of(SessionEnded)
    assert end.user == "alice", end
