"""Round 19 of attacks on the privacy promise, at the policy: identifiers in forms the detectors
and shapes did not know, under the default policy (tests/relay/test_attack_round19_policy.py
sends the same through the proxy to a real Dovecot).

Found:
- an IPv4 address with a part of four digits, a leading zero before it ("198.051.0100.7",
  "0198.51.100.7"), or in octal as inet_aton reads it ("0306.063.0144.07": 198.51.100.7);
- a MAC address whose groups lost their leading zeros, as BSD's and macOS's `arp` and `ifconfig`
  print them ("0:1a:2b:3:4d:5e"), with any one joiner ("0-1a-2b-3-4d-5e", "0.1a.2b.3.4d.5e");
- a field's name with an address in digits other than ASCII's (Arabic-Indic, Devanagari: NFKC
  leaves them as they are), recorded as escapes that spell it;
- a field's name with an e-mail address whose local part ends in a quote, a comment's
  parenthesis or any other character RFC 5322 allows there ('"alice"@example.org',
  "~alice~@example.org");
- an IMEI or IPv4 address in groups joined by punctuation between spaces ("4901, 5420, 3237, 518",
  "198 / 51 / 100 / 7"), or by two spaces;
- a support address with percent-escapes ("https://vendor.example/u/alice%40example.org"), and a
  field's name with them ("alice%40example.org").
"""

from __future__ import annotations

import itertools

import pytest

from imapveil.policy import Outcome, apply, detectors
from imapveil.policy.detectors import DETECTORS, detect
from imapveil.policy.shapes import NAMED
from imapveil.policy_files import resolve_policy

ALL = tuple(DETECTORS)
KEPT = (b"name", b"vendor", b"os", b"version", b"os-version")


def in_digits(zero: int, text: str) -> bytes:
    """`text` with its ASCII digits in another script's, whose zero is `zero`, in UTF-8."""
    return "".join(chr(zero + int(c)) if c.isdigit() else c for c in text).encode()


ARABIC_INDIC, DEVANAGARI, PERSIAN = 0x0660, 0x0966, 0x06F0


def run(fields: tuple[tuple[bytes, bytes | None], ...]) -> Outcome:
    return apply(resolve_policy("default"), fields, hasher=lambda v: "hmac")


IPV4_OTHERWISE = [
    b"198.051.0100.7",
    b"0198.51.100.7",
    b"198.051.0100.007",
    b"0306.063.0144.07",  # octal, as inet_aton reads it
    b"0306.0063.0144.0007",
    b"ip-0198-051-0100-007",
]
MAC_UNPADDED = [
    b"0:1a:2b:3:4d:5e",
    b"0-1a-2b-3-4d-5e",
    b"0.1a.2b.3.4d.5e",
    b"0_1a_2b_3_4d_5e",
    b"0 1a 2b 3 4d 5e",
    b"a4:c3:f0:5:1b:2e",
    b"0:1a:2b:3:4d:5e:6f:7",  # EUI-64
    b"1.2.3.4.5.6.7a.8b.9c",  # six from the fourth group
]


SPACED_OUT = [
    (b"4901  5420  3237  518", "imei"),  # two spaces between groups
    (b"4901, 5420, 3237, 518", "imei"),
    (b"490154 - 203237 - 518", "imei"),
    (b"310 / 150 / 123456789", "imei"),  # an IMSI
    (b"198 / 51 / 100 / 7", "ip"),
    (b"198, 51, 100, 7", "ip"),
    (b"198 - 51 - 100 - 7", "ip"),
]


@pytest.mark.parametrize(("value", "kind"), SPACED_OUT)
def test_groups_joined_by_punctuation_and_spaces(value: bytes, kind: str) -> None:
    assert detect(value, ALL) == kind
    for field, template in ((b"name", b"Mail %s"), (b"version", b"1.0 (%s)")):
        out = run(((field, template % value),))
        assert value not in (dict(out.forwarded or ()).get(field) or b""), out.forwarded


@pytest.mark.parametrize("value", IPV4_OTHERWISE)
def test_an_ipv4_address_with_leading_zeros_or_in_octal_is_an_address(value: bytes) -> None:
    assert detect(value, ALL) is not None
    assert detect(b"Mail " + value, ALL) is not None


@pytest.mark.parametrize("value", MAC_UNPADDED)
def test_a_mac_address_without_its_leading_zeros_is_one(value: bytes) -> None:
    assert detect(value, ALL) == "mac"
    assert detect(b"Acme " + value, ALL) == "mac"


@pytest.mark.parametrize(
    "value",
    [
        # Versions and names with short hex-looking groups stay clean.
        b"1.2.3.4.5.6",
        b"10.11.12.13.14.15",
        b"1.0.a.b.c.d",
        b"2.3.1 b 4 c",
        b"16.0 (3731.600.7)",
        b"3.10.0-1160.el7.x86_64",
        b"1.2.3.4",
        b"1.0.0.0999",  # four digits: above 255, and not octal
        b"1.0.0.0400",  # octal 256
        b"16.0.17425.20000",
        b"10.0.19045.3693",
        b"3826.300.87.2.22",
        b"16.0 (3826.300.87.2.22)",
        b"Outlook 2016 (16.0.17126.20132)",
        b"20230322-18-a8bdba",
        b"6.5.0-14-generic (2023, 11, 3)",
        b"1.0 (20231012-143055)",  # a version and a build: 15 digits, a bracket between
        b"1.0 (20231012 143055)",
    ],
)
def test_what_looks_alike_and_is_no_identifier(value: bytes) -> None:
    assert detect(value, ("mac", "imei", "uuid", "token", "email")) is None
    if value != b"1.2.3.4":
        assert detect(value, ("ip",)) is None


@pytest.mark.parametrize("field", KEPT)
@pytest.mark.parametrize(
    "identifier", [b"198.051.0100.7", b"0306.063.0144.07", b"0-1a-2b-3-4d-5e", b"0.1a.2b.3.4d.5e"]
)
def test_kept_fields_keep_none_of_them(field: bytes, identifier: bytes) -> None:
    value = (b"Acme " if field in (b"name", b"vendor", b"os") else b"16.0 (") + identifier
    value += b")" if value.startswith(b"16.0 (") else b""
    out = run(((field, value),))
    forwarded = dict(out.forwarded or ())
    assert identifier not in (forwarded.get(field) or b""), forwarded
    assert all(identifier.decode() not in (v or "") for v in out.recorded.values()), out.recorded


@pytest.mark.parametrize(
    "name",
    [
        in_digits(ARABIC_INDIC, "198.51.100.7"),
        in_digits(DEVANAGARI, "198.51.100.7"),
        in_digits(ARABIC_INDIC, "0:1a:2b:3c:4d:5e"),
        b"a4:c3:f0:" + in_digits(ARABIC_INDIC, "85") + b":1b:2e",
        in_digits(PERSIAN, "490154203237518"),  # an IMEI
        b"0:1a:2b:3:4d:5e",
        b'"alice"@example.org',
        b"~alice~@example.org",
        b"alice=@example.org",
        b"(bob)alice(x)@example.org",
        b"alice%40example.org",  # percent-escaped, as in a URL
        b"x-mac-a4%3Ac3%3Af0%3A85%3A1b%3A2e",
        "alice%40ex\u00e4mple.org".encode(),
    ],
)
def test_identifiers_as_field_names_are_not_recorded(name: bytes) -> None:
    out = run(((b"name", b"Thunderbird"), (name, b"1")))
    (shown,) = out.dropped
    assert shown.startswith("detected:"), shown


@pytest.mark.parametrize(
    "url",
    [
        b"https://vendor.example/u/alice%40example.org",
        b"https://vendor.example/%61%34%3a%63%33%3a%66%30%3a%38%35%3a%31%62%3a%32%65",
        b"https://vendor.example/help%3Fdevice%3Da4c3f0851b2e",
    ],
)
def test_a_support_address_has_no_percent_escapes(url: bytes) -> None:
    assert not NAMED["url"](url)
    out = run(((b"support-url", url),))
    assert out.forwarded is None


def test_real_clients_values_are_still_kept() -> None:
    sent = (
        (b"name", b"Mac OS X Mail"),
        (b"version", b"16.0 (3731.600.7)"),
        (b"os", b"Mac OS X"),
        (b"os-version", b"13.4.1 (22F82)"),
        (b"vendor", b"Apple Inc."),
        (b"support-url", b"https://github.com/postalsys/imapflow/issues"),
    )
    out = run(sent)
    assert out.forwarded == sent and not out.changed


def test_the_joins_of_digit_groups_are_the_spaced_gaps() -> None:
    """`_DIGIT_JOINS` (a set, looked up per word) says what `_spaced` and the colon and dot rules
    say, for every gap of up to three octets over the octets that matter."""
    alphabet = [bytes([c]) for c in b" ,/-_+;~&.:(x\x00'"]
    for size in (1, 2, 3):
        for octets in itertools.product(alphabet, repeat=size):
            gap = b"".join(octets)
            spaced = detectors._spaced(gap) and b":" not in gap
            assert (gap in detectors._DIGIT_JOINS_DOTS) == (
                spaced and (size == 1 or b"." not in gap)
            )
            assert (gap in detectors._DIGIT_JOINS) == (spaced and b"." not in gap), gap
