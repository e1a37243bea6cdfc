"""Round 19 of attacks from outside, on the privacy promise: an ID whose identifiers are written
in forms the default policy's detectors and shapes did not know, sent through the proxy (built
as `imapveil serve` builds it) to a real Dovecot that logs every ID it receives
(`imap_id_log = *`), before login and after it.

Found (tests/policy/test_attack_round19.py has each form alone):
- kept fields (`name`, `vendor`, `os`, `version`, `os-version`) carried an IPv4 address with
  leading zeros before a part of four digits, or in octal, and a MAC address without the leading
  zeros of its groups, to Dovecot's `ID sent:` line and into the `id` record;
- `support-url` carried a percent-escaped e-mail address to Dovecot;
- dropped fields named by an address in Arabic-Indic digits, a MAC address without its leading
  zeros, an e-mail address with a quoted local part or percent-escaped were recorded under
  those names (the `id` record's `dropped`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from imapveil.records import CommandCompleted, IdExchange
from tests.helpers.attack import Client, DovecotLog, veil
from tests.helpers.dovecot import Dovecot

pytestmark = pytest.mark.dovecot
run = trio.to_thread.run_sync


ARABIC_IP = "".join(chr(0x0660 + int(c)) if c.isdigit() else c for c in "198.51.100.7").encode()
"""198.51.100.7 in Arabic-Indic digits."""
KEPT = [
    (b"name", b"Mail 0306.063.0144.07", b"0306.063.0144.07"),
    (b"vendor", b"Acme 0-1a-2b-3-4d-5e", b"0-1a-2b-3-4d-5e"),
    (b"os", b"Linux 198.051.0100.007", b"198.051.0100.007"),
    (b"version", b"16.0 (0198.51.100.7)", b"0198.51.100.7"),
    (b"os-version", b"13.4 (0.1a.2b.3.4d.5e)", b"0.1a.2b.3.4d.5e"),
    (b"support-url", b"https://vendor.example/u/alice%40example.org", b"alice%40example"),
]
NAMES = [b"0:1a:2b:3:4d:5e", b'"alice"@example.org', b"bob%40example.org"]
"""Field names (dropped by the default policy) that are identifiers; and ARABIC_IP."""
SECRETS = [s for _, _, s in KEPT] + [b"0:1a:2b:3:4d:5e", b'"alice"@', b"bob%40", b"\\xd9\\xa1"]


def odd_id(literals: bool = False) -> bytes:
    """The ID command (no tag), its kept fields' values quoted, or as LITERAL+ literals."""
    if literals:
        pairs = [b'"%s" {%d+}\r\n%s' % (name, len(value), value) for name, value, _ in KEPT]
    else:
        pairs = [b'"%s" "%s"' % (name, value) for name, value, _ in KEPT]
    pairs += [b'"%s" "1"' % name.replace(b'"', b'\\"') for name in NAMES]
    pairs.append(b"{%d+}\r\n%s NIL" % (len(ARABIC_IP), ARABIC_IP))
    return b"ID (" + b" ".join(pairs) + b")"


def send_ids(address: tuple[str, int], after_login: bool, literals: bool) -> bytes:
    with Client(address) as c:
        c.greeting()
        if after_login:
            c.login()
        c.command(b"i", odd_id(literals))
        c.command(b"n", b"NOOP")
        c.logout()
        return c.transcript


@pytest.mark.parametrize("literals", [False, True], ids=["quoted", "literals"])
@pytest.mark.parametrize("after_login", [False, True], ids=["before-login", "after-login"])
async def test_identifiers_in_odd_forms_reach_neither_dovecot_nor_a_record(
    target: Dovecot, tmp_path: Path, after_login: bool, literals: bool
) -> None:
    log = DovecotLog(target)
    async with veil(target.address, tmp_path) as v:
        await run(send_ids, v.address, after_login, literals)
        await v.sessions_ended(1)
    text = await run(log.settled, 1)
    sent = [line for line in text.splitlines() if "ID sent" in line]
    assert len(sent) == 1, text
    assert [s for s in SECRETS if s.decode() in sent[0]] == [], sent
    records = v.records_json()
    assert [s for s in SECRETS if s.decode().lower() in records.lower()] == [], records
    (exchange,) = v.sink.of(IdExchange)
    assert set(exchange.dropped) <= {
        "detected:mac",
        "detected:ip",
        "detected:email",
        "support-url",
        *(name.decode() for name, _, _ in KEPT),
    }, exchange.dropped
    assert exchange.client is not None
    assert all(
        secret.decode() not in (value or "")
        for value in exchange.client.values()
        for secret in SECRETS
    ), exchange.client


SPACED = [
    (b"name", b"Mail 4901, 5420, 3237, 518", b"4901, 5420"),
    (b"vendor", b"Acme 198 / 51 / 100 / 7", b"198 / 51"),
    (b"version", b"1.0 (490154 - 203237 - 518)", b"490154 - 203237"),
    (b"os-version", b"13.4 (198, 51, 100, 7)", b"198, 51"),
]
"""Found too: an IMEI or an address in groups joined by punctuation between spaces."""


def send_spaced(address: tuple[str, int]) -> bytes:
    with Client(address) as c:
        c.greeting()
        pairs = b" ".join(b'"%s" "%s"' % (name, value) for name, value, _ in SPACED)
        c.command(b"i", b'ID ("os" "Linux" ' + pairs + b")")
        c.logout()
        return c.transcript


async def test_groups_joined_by_spaced_punctuation_reach_neither_dovecot_nor_a_record(
    target: Dovecot, tmp_path: Path
) -> None:
    log = DovecotLog(target)
    async with veil(target.address, tmp_path) as v:
        await run(send_spaced, v.address)
        await v.sessions_ended(1)
    text = await run(log.settled, 1)
    (sent,) = [line for line in text.splitlines() if "ID sent" in line]
    assert "os=Linux" in sent, sent  # what is no identifier still goes
    assert [s for _, _, s in SPACED if s.decode() in sent] == [], sent
    records = v.records_json()
    assert [s for _, _, s in SPACED if s.decode() in records] == [], records


TAGGED = [b"a4:c3:f0:85:1b:2e", b"a4c3f0851b2e", b"198.51.100.7", b"alice@example.org",
          b"5551234567", b"3232235777", b"SN12345678"]  # fmt: skip
"""Found (round 19's report): identifiers as a client's tags, recorded as sent. And later: a
phone number, an IPv4 address as one number, a serial number of letters then digits."""
ORDINARY = [b"1", b"a0001", b"A001", b"JEAE1", b"1.1", b"t2", b"L", b"y0"]
"""Tags real clients use (Thunderbird, mutt, Outlook, imaplib, Apple Mail, Trojitá…)."""


def send_tagged(address: tuple[str, int]) -> bytes:
    with Client(address) as c:
        c.greeting()
        for tag in TAGGED:
            c.command(tag, b'ID ("name" "Mail")')
        for tag in [*TAGGED, *ORDINARY]:
            c.command(tag, b"NOOP")
        c.logout()
        return c.transcript


async def test_identifiers_as_tags_reach_no_record(target: Dovecot, tmp_path: Path) -> None:
    """A client's tags are its own to choose, and went into every command record (and the ID's)
    as they came: a device's MAC or address as a tag was in the event log and the store. A tag
    is recorded as sent only when it has the shape tags have (letters, then digits, a dot and
    digits: `a0001`, `JEAE1`, `1.1`); any other as its length alone. The commands go as they
    came: tags are the client's and the server's business."""
    async with veil(target.address, tmp_path) as v:
        await run(send_tagged, v.address)
        await v.sessions_ended(1)
    records = v.records_json()
    assert [t for t in TAGGED if t.decode() in records] == [], records
    tags = [r.tag for r in v.sink.of(CommandCompleted)]
    assert [t.decode() for t in ORDINARY] == [t for t in tags if not t.startswith("(")][-9:-1]


VERBS = [b"A4:C3:F0:85:1B:2E", b"a4c3f0851b2e", b"198.51.100.7", b"alice@example.org"]
"""The same as the names of commands nobody knows (Dovecot answers BAD)."""


def send_verbs(address: tuple[str, int]) -> bytes:
    with Client(address) as c:
        c.greeting()
        c.login()  # before it Dovecot's login process takes two bad commands, then says BYE
        for i, verb in enumerate(VERBS):
            c.command(b"v%d" % i, verb, b"BAD")
        c.command(b"x", b"XYZZY", b"BAD")
        c.command(b"n", b"NAMESPACE")
        c.logout()
        return c.transcript


async def test_identifiers_as_command_names_reach_no_record(
    target: Dovecot, tmp_path: Path
) -> None:
    """A command's name went into its record as sent (up to 32 characters): an unknown one that
    is an address was in the event log and the store, and `alice@example.org` was the command
    `ALICE`. A command the proxy knows (IMAP's, its extensions', the vendors' it lists: the
    traits' names) is recorded by its name; any other as `OTHER`."""
    async with veil(target.address, tmp_path) as v:
        await run(send_verbs, v.address)
        await v.sessions_ended(1)
    records = v.records_json()
    assert [t for t in VERBS if t.decode().lower() in records.lower()] == [], records
    verbs = [r.verb for r in v.sink.of(CommandCompleted)]
    assert verbs[0] == "LOGIN" and verbs[-2:] == ["NAMESPACE", "LOGOUT"], verbs
    assert set(verbs[1:-2]) == {"OTHER"} and len(verbs[1:-2]) >= len(VERBS), verbs
