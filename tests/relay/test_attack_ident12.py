"""Round 12 of attacks from outside: identifiers written so that the policy does not know them.

Raw sockets through the proxy (built as `imapveil serve` builds it) to a real Dovecot that logs
every ID it receives (`imap_id_log = *`): what reaches its `ID sent:` line reached the server, and
the records (event log, statistics store, debug log) are read from the proxy's sink.

Each value is carried in a field the shipped policies keep (name, vendor, os, version,
os-version), beside a real client's name and version, which must still arrive as they were sent.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trio

from imapveil.records import IdExchange
from tests.helpers.attack import Client, DovecotLog, veil
from tests.helpers.dovecot import Dovecot

pytestmark = pytest.mark.dovecot
run = trio.to_thread.run_sync


def id_sent(text: str) -> list[str]:
    return [line for line in text.splitlines() if "ID sent" in line]


def send_id(address: tuple[str, int], pairs: list[tuple[bytes, bytes]]) -> bytes:
    """LOGIN, one ID of `pairs` (quoted), LOGOUT; the transcript."""
    with Client(address) as c:
        c.greeting()
        c.login()
        c.send(b"i ID (" + b" ".join(b'"%s" "%s"' % p for p in pairs) + b")\r\n")
        assert c.until(b"i").startswith(b"i OK"), c.transcript[-300:]
        c.logout()
        return c.transcript


# The fields a value is carried in: the identifier alone, after a version, in a comment.
CARRIERS = (
    (b"name", b"Mail %s"),
    (b"vendor", b"Apple %s"),
    (b"os", b"iOS %s"),
    (b"version", b"16.0 (%s)"),
    (b"os-version", b"%s"),
)

# Phone identities in groups, as phones' settings and labels print them. Each word has few digits,
# so each fitted a version's shape; the detector knew only 15 digits in one run.
PHONE = {
    "imei, dashes (AA-BBBBBB-CCCCCC-D)": b"49-015420-323751-8",
    "imei, spaces": b"35 209900 176148 1",
    "imei, TAC and serial": b"35209900-176148-1",
    "imei, dots": b"49.015420.323751.8",
    "imsi, dashes": b"310-150-123456789",
    "iccid, spaces": b"8901 2601 2345 6789 012",
    "imei, plus signs": b"49+015420+323751+8",
    "imei, mixed": b"(49)015420-323751.8",
}
# MAC addresses and device ids in groups the detectors did not know.
GROUPED = {
    "mac, pairs and spaces": b"a4 c3 f0 85 1b 2e",
    "mac, pairs and dots": b"a4.c3.f0.85.1b.2e",
    "mac, pairs and underscores": b"a4_c3_f0_85_1b_2e",
    "mac, two halves": b"a4c3f0-851b2e",
    "mac, four triples": b"a4c-3f0-851-b2e",
    "mac, quads and underscores": b"a4c3_f085_1b2e",
    "uuid, groups of four": b"0f8f-ad5b-d9cb-469f-a165-7086-7728-950e",
    "uuid, its last group split": b"0f8fad5b d9cb 469f a165 7086 7728 950e",
    "android id, groups of four": b"9774-d56d-682e-549c",
    "mac, slashes": b"a4/c3/f0/85/1b/2e",
    "mac, mixed": b"a4.c3-f0.85-1b.2e",
    "mac, two spaces": b"a4  c3  f0  85  1b  2e",
    "android id, plus signs": b"9774+d56d+682e+549c",
    "mac, in fives": b"a4c3f-0851b-2e",
    "android id, in fives": b"9774d-56d68-2e549-c",
}
# Serial numbers in groups (one word of ten capitals and digits is no name's or version's).
SERIAL = {
    "serial, hyphens": b"C02X-K1ZT-JGH5",
    "serial, spaces": b"C02X K1ZT JGH5",
    "serial, in halves": b"C02XK1 ZTJGH5",
    "serial, mixed separators": b"R58M_12AB-CDE",
    "serial, plus signs": b"C02X+K1ZT+JGH5",
    "serial, slashes": b"C02X/K1ZT/JGH5",
    "serial, small letters": b"c02xk1ztjgh5",
    "serial of ten, small letters": b"h4v9k2p7qx",
    "serial, mixed case": b"C02xK1ztJGH5",
}
# IPv4 addresses as host names and inet_aton write them, IPv6 as Windows' UNC names do. In
# `version` too, where the default policy keeps a dotted four-part number (a version there).
ADDRESS = {
    "ipv4, hyphens": b"ip-198-51-100-7",
    "ipv4, underscores": b"198_51_100_7",
    "ipv4, hex parts": b"0xc6.0x33.0x64.0x07",
    "ipv4, plus signs": b"198+51+100+7",
    "ipv4, spaces": b"198 51 100 7",
    "ipv6, hyphens": b"2001-db8--7",
}
CLASSES = {"phone": PHONE, "grouped": GROUPED, "serial": SERIAL, "address": ADDRESS}


@pytest.mark.parametrize("policy", ["default", "strict"])
@pytest.mark.parametrize("kind", list(CLASSES))
async def test_identifiers_in_groups_reach_neither_dovecot_nor_a_record(
    target: Dovecot, tmp_path: Path, policy: str, kind: str
) -> None:
    """Found (attack12i): an IMEI written as a phone prints it, `49-015420-323751-8`, has words
    of at most six digits: it fitted the `version` shape, and the `imei` detector looked only for
    15 digits in one run. So it reached Dovecot's `ID sent:` line in `version` and `os-version`
    and was recorded as the client's version. The same for IMSIs and ICCIDs in groups, MAC
    addresses grouped by spaces, dots or underscores or in halves or triples, and UUIDs and
    device ids in groups of four, serial numbers in groups (`C02X-K1ZT-JGH5`), IPv4 addresses
    joined by hyphens, underscores or spaces or with hex parts (`ip-198-51-100-7`), and IPv6
    with hyphens for colons (`2001-db8--7`): every word short enough for a name or a version."""
    forms = CLASSES[kind]
    log = DovecotLog(target)
    async with veil(target.address, tmp_path, policy=policy) as v:
        for secret in forms.values():
            pairs = [(f, shape % secret) for f, shape in CARRIERS]
            await run(send_id, v.address, [(b"name", b"Thunderbird"), *pairs[1:]])
            await run(send_id, v.address, [pairs[0], (b"version", b"115.5.0")])
        await v.sessions_ended(2 * len(forms))
    text = await run(log.settled, 2 * len(forms))
    leaked = [k for k, s in forms.items() if s.decode() in text]
    assert leaked == [], id_sent(text)
    records = v.records_json()
    assert [k for k, s in forms.items() if s.decode() in records] == [], records
    if policy == "default":  # the client's identity still arrives
        assert sum("name=Thunderbird" in line for line in id_sent(text)) == len(forms)
        assert sum("version=115.5.0" in line for line in id_sent(text)) == len(forms)


# --- Identifiers as field names the records show escaped.

HIDDEN_NAMES = {
    "space before a mac": b"x a4:c3:f0:85:1b:2e",
    "tab before an address": b"ip\t198.51.100.7",
    "zero-width space in a mac": "a4:c3:f0\u200b:85:1b:2e".encode(),
    "nbsp between a mac's pairs": b"a4\xa0c3\xa0f0\xa085\xa01b\xa02e",
    "fullwidth imei": "".join(chr(0xFF10 + int(d)) for d in "490154203237518").encode(),
    "base64 token, printable": b"3kWq1b0Zr9mYb8Jx2n4Vt0cP5sI=",
    "serial": b"C02XK1ZTJGH5",
    "serial in small letters": b"sn-h4v9k2p7qx",
    "imsi": b"310150123456789",
}
HIDDEN_CORES = (
    "a4c3f0851b2e",
    "198511007",
    "490154203237518",
    "3kwq1b0zr9myb8jx2n4vt0cp5si",
    "c02xk1ztjgh5",
    "h4v9k2p7qx",
    "310150123456789",
)
"""What each name holds, in letters and digits only: what a reader of the records recovers."""


def names_as_literals(address: tuple[str, int]) -> bytes:
    with Client(address) as c:
        c.greeting()
        c.login()
        pairs = b" ".join(b'{%d+}\r\n%s "1"' % (len(n), n) for n in HIDDEN_NAMES.values())
        c.send(b'i ID ("name" "Thunderbird" ' + pairs + b")\r\n")
        assert c.until(b"i").startswith(b"i OK"), c.transcript[-300:]
        c.logout()
        return c.transcript


def _letters_and_digits(text: str) -> str:
    """The records' text without \\xNN escapes, then only its letters and digits, lower case."""
    text = re.sub(r"\\\\x[0-9a-f]{2}", "", text.lower())
    return "".join(ch for ch in text if ch.isascii() and ch.isalnum())


@pytest.mark.parametrize("policy", ["default", "strict"])
async def test_identifiers_hidden_in_field_names_reach_no_record(
    target: Dovecot, tmp_path: Path, policy: str
) -> None:
    """Found (attack12i): a field name that is not printable ASCII is dropped and recorded with
    its other octets as \\xNN (the `id` record's `dropped`, the statistics store, the debug log).
    The detectors read that escaped form, in which an escape ending in a hex digit stands beside
    the identifier (`x\\x20a4:c3:f0:85:1b:2e`: no MAC standing alone; `ip\\x09198.51.100.7`: no
    address) and a zero-width space or a no-break space splits it; fullwidth digits were not
    ASCII at all. And printable names were looked at in lower case, in which a base64 token
    mixes no cases. All were recorded readable. Now the detectors also read the name as sent,
    with those octets as spaces, without them, and in NFKC. And what no detector knows but no
    name's word is (a serial number, an IMSI) is recorded as `detected:shape`."""
    async with veil(target.address, tmp_path, policy=policy) as v:
        await run(names_as_literals, v.address)
        await v.sessions_ended(1)
    records = _letters_and_digits(v.records_json())
    assert [c for c in HIDDEN_CORES if c in records] == [], v.records_json()
    (exchange,) = v.sink.of(IdExchange)
    hidden = [d for d in exchange.dropped if d != "name"]  # strict forwards no name either
    assert len(hidden) == len(HIDDEN_NAMES), exchange.dropped
    # What a list's names may cost the loop is bounded (`engine.NAME_BUDGET`, round 19):
    # these nine take a little more, and the last three are recorded by their lengths, unread.
    assert all(d.startswith("detected:") for d in hidden[:6]), exchange.dropped
    assert hidden[6:] == ["(name: 12 octets)", "(name: 13 octets)", "(name: 15 octets)"]


# --- An address beside a version, where the default policy lets a four-part number be one.

BESIDE = {
    "in the comment": (b"16.0 (198.51.100.7)", "version=16.0"),
    "after the version": (b"7.2.25.230 198.51.100.7", "version=7.2.25.230"),
    "after a build": (b"16.0 build 10.0.0.7", "version=16.0"),
}


def versions(address: tuple[str, int], values: list[bytes]) -> None:
    for value in values:
        send_id(address, [(b"name", b"Foxmail"), (b"version", value)])


@pytest.mark.parametrize("policy", ["default", "strict"])
async def test_an_address_beside_a_version_is_not_kept(
    target: Dovecot, tmp_path: Path, policy: str
) -> None:
    """Found (attack12i): in `version` the `ip` detector does not apply (Foxmail's version,
    `7.2.25.230`, is a four-part number), and that let an address anywhere in the value through:
    `16.0 (198.51.100.7)` reached Dovecot's `ID sent:` line and the records as the client's
    version. Now a four-part number is a version only at the value's head; elsewhere the value
    does not have a version's shape and is coarsened to its leading version (`16.0`). Foxmail's
    version itself is kept as it came."""
    log = DovecotLog(target)
    values = [v for v, _ in BESIDE.values()] + [b"7.2.25.230"]
    async with veil(target.address, tmp_path, policy=policy) as v:
        await run(versions, v.address, values)
        await v.sessions_ended(len(values))
    text = await run(log.settled, len(values))
    addresses = ("198.51.100.7", "10.0.0.7")
    assert [a for a in addresses if a in text] == [], id_sent(text)
    assert [a for a in addresses if a in v.records_json()] == [], v.records_json()
    if policy == "default":
        sent = id_sent(text)
        for expected in [e for _, e in BESIDE.values()] + ["version=7.2.25.230"]:
            assert any(line.endswith(expected) or expected + "," in line for line in sent), sent


# --- Held (regression guards): forms the policy already knew, in every carrier.

HELD = {
    "mac, cisco": b"0011.2233.4455",
    "mac, bare": b"A4C3F0851B2E",
    "mac, mixed case": b"a4:C3:f0:85:1B:2e",
    "ipv6, compressed": b"2001:db8::7",
    "ipv6, zone": b"fe80::1%eth0",
    "ipv6, v4-mapped": b"::ffff:198.51.100.7",
    "ipv6, bracketed with port": b"[2001:db8::7]:993",
    "ipv4, port": b"198.51.100.7:993",
    "ipv4, octal": b"0306.0063.0144.0007",
    "imei": b"490154203237518",
    "android id": b"9774d56d682e549c",
    "udid": b"2b6f0cc904d137be2e1730235f5664094b831186",
    "uuid, braces": b"{0f8fad5b-d9cb-469f-a165-70867728950e}",
    "uuid, upper case": b"0F8FAD5B-D9CB-469F-A165-70867728950E",
    "uuid, urn": b"urn:uuid:0f8fad5b-d9cb-469f-a165-70867728950e",
    "uuid, no dashes": b"0f8fad5bd9cb469fa16570867728950e",
    "device id in a user agent": b"Mozilla/5.0 (Linux; Android 13; 9774d56d682e549c)",
}


def held_forms(address: tuple[str, int]) -> None:
    """Each form in every carrier, quoted; then as literals; then as a second `version`."""
    for secret in HELD.values():
        pairs = [(f, shape % secret) for f, shape in CARRIERS]
        send_id(address, [(b"name", b"Thunderbird"), *pairs[1:]])
        with Client(address) as c:
            c.greeting()
            c.login()
            c.send(
                b'i ID ("name" {%d+}\r\n%s "version" "115.5.0" "VERSION" {%d+}\r\n%s)\r\n'
                % (len(b"Mail " + secret), b"Mail " + secret, len(secret), secret)
            )
            assert c.until(b"i").startswith(b"i OK"), c.transcript[-300:]
            c.logout()


@pytest.mark.parametrize("policy", ["default", "strict"])
async def test_known_forms_still_reach_neither_dovecot_nor_a_record(
    target: Dovecot, tmp_path: Path, policy: str
) -> None:
    """Held (attack12i): MAC addresses in Cisco's form, bare or in mixed case; IPv6 compressed,
    with a zone, IPv4-mapped, bracketed with a port; IPv4 with a port or in octal; an IMEI, an
    Android id, a UDID; UUIDs in braces, upper case, as a URN or without dashes; a device id in
    a user agent: in every carrier, as literals, and as a second `version` (RFC 2971: a field
    once; the first counts)."""
    log = DovecotLog(target)
    async with veil(target.address, tmp_path, policy=policy) as v:
        await run(held_forms, v.address)
        await v.sessions_ended(2 * len(HELD))
    text = await run(log.settled, 2 * len(HELD))
    assert [k for k, s in HELD.items() if s.decode() in text] == [], id_sent(text)
    records = v.records_json()
    assert [k for k, s in HELD.items() if s.decode() in records] == [], records
    if policy == "default":
        assert sum("version=115.5.0" in line for line in id_sent(text)) == len(HELD)


# --- A device's number in the support address, which the default policy forwards.

SUPPORT_URLS = {
    "imsi in the path": b"https://support.example.com/d/310150123456789",
    "serial as the host": b"https://C02XK1ZTJGH5.example.com/",
    "serial in groups in the path": b"https://support.example.com/C02X_K1ZT_JGH5/help",
    "serial as the mailbox": b"mailto:C02XK1ZTJGH5@example.com",
}


def support_urls(address: tuple[str, int]) -> None:
    for value in SUPPORT_URLS.values():
        send_id(address, [(b"name", b"Thunderbird"), (b"support-url", value)])


async def test_a_device_number_in_the_support_url_does_not_reach_dovecot(
    target: Dovecot, tmp_path: Path
) -> None:
    """Found (attack12i): the `url` shape checked the scheme, host, port and the path's octets,
    not what the words were, so an IMSI, a serial number as the host, in the path or as the
    mailbox reached Dovecot's `ID sent:` line in `support-url` (the default policy forwards it;
    it records none). Now its words are a version's: digits in words of at most 10 octets, no
    serial number. A vendor's address (`https://github.com/postalsys/imapflow/issues`) passes."""
    log = DovecotLog(target)
    async with veil(target.address, tmp_path) as v:
        await run(support_urls, v.address)
        await v.sessions_ended(len(SUPPORT_URLS))
    text = await run(log.settled, len(SUPPORT_URLS))
    leaked = [k for k, s in SUPPORT_URLS.items() if s.decode() in text]
    assert leaked == [], id_sent(text)
    assert sum("name=Thunderbird" in line for line in id_sent(text)) == len(SUPPORT_URLS)
