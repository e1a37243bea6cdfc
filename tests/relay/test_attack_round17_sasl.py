"""Round 17 of attacks from outside: AUTHENTICATE and its SASL exchanges, raw sockets through
the proxy (built as `imapveil serve` builds it) to a real Dovecot, and to a scripted upstream
where Dovecot cannot make the server's side wanted.

- A SASL response sent ahead of a `+` that never comes (a mechanism Dovecot does not offer) is
  the client's next command line. One word is refused with no record (attack12); one word and a
  trailing space was refused as a command without a name, and its record kept the word as the
  command's tag: the base64 credentials in the event log.
- XOAUTH2 and OAUTHBEARER responses whose separators are not `^A` octets (the two characters
  `^A` of the documentation's notation, a space) were read to their end as the user name, the
  bearer token with it, into the command's record.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from imapveil.protocol import sasl
from imapveil.records import CommandCompleted, Violation
from imapveil.secret import Secret
from tests.helpers.attack import Client, own_dovecot, veil
from tests.helpers.dovecot import Dovecot

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


@pytest.fixture(scope="module")
def target() -> Iterator[Dovecot]:
    with own_dovecot() as server:
        yield server


# --- A SASL response sent ahead, with a trailing space.

AHEAD = {
    "plain-space": b"A AUTHENTICATE XFOO\r\n" + PLAIN + b" \r\n",
    "plain-spaces": b"A AUTHENTICATE XFOO\r\n" + PLAIN + b"   \r\n",
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
    followed by nothing but spaces is one word: no command, no record."""
    caplog.set_level(logging.DEBUG)
    async with veil(target.address, tmp_path, user_identity="plain") as v:
        transcript = await run(sent_ahead, v.address, AHEAD[name])
        await v.sessions_ended(1)
    assert b" BAD [CLIENTBUG]" in transcript, transcript
    assert credentials_in(v.records_json()) == [], v.records_json()
    assert credentials_in(caplog.text) == [], caplog.text
    assert "refused_no_command" in [r.kind for r in v.sink.of(Violation)]
    assert [r.verb for r in v.sink.of(CommandCompleted)] == ["AUTHENTICATE", "NOOP", "LOGOUT"]


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
