"""Shapes of unique identifiers, recognised in an `ID` value whatever its field is called.

Each detector answers "does this value carry an identifier of my kind?". They are deliberately
conservative about version strings ("16.0 (3731.600.7)", "13; TQ3A.230805.001") and eager about
anything that looks like a device or network identity. They are the second line: a kept field's
value must first have its field's shape (`shapes.py`).

Values come from the network and are examined on the event loop, so every detector runs in time
linear in the value, and on no more than RFC 2971 §3.3 lets a value be (1024 octets; `detect`
looks no further). Each pattern below is either bounded (a match attempt costs at most its width,
so a search costs width times length) or a single class repeated (`[...]+`, each run scanned once);
none nests a repetition, and the words they find are then checked with plain code.
tests/policy/test_detectors.py holds them to that.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

from imapveil.rfc2971 import MAX_VALUE_LENGTH

# Six pairs written out, not (?:..){4}: no repetition inside a repetition.
_MAC = re.compile(
    rb"(?<![0-9a-f])"
    rb"(?:[0-9a-f]{2}([:-])[0-9a-f]{2}\1[0-9a-f]{2}\1[0-9a-f]{2}\1[0-9a-f]{2}\1[0-9a-f]{2}"
    rb"|[0-9a-f]{4}\.[0-9a-f]{4}\.[0-9a-f]{4})(?![0-9a-f])",
    re.IGNORECASE,
)
# Separators optional, any of - _ . : or space: "0f8fad5b_d9cb_469f_a165_70867728950e" counts.
_UUID = re.compile(
    rb"(?<![0-9a-f])[0-9a-f]{8}[-_.: ]?[0-9a-f]{4}[-_.: ]?[0-9a-f]{4}[-_.: ]?[0-9a-f]{4}"
    rb"[-_.: ]?[0-9a-f]{12}(?![0-9a-f])",
    re.IGNORECASE,
)
# Not after a digit or "digit.", not before a digit or ".digit": "3826.300.87.2.22" holds none.
_IPV4 = re.compile(
    rb"(?<![0-9])(?<![0-9]\.)[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}(?![0-9])(?!\.[0-9])"
)
_WORD = re.compile(rb"[0-9A-Za-z]+")
_DIGIT_RUN = re.compile(rb"[0-9]+")
_B64_RUN = re.compile(rb"[A-Za-z0-9+/_-]+")
_IP6_RUN = re.compile(rb"[0-9A-Fa-f:.]+")

PATTERNS = (_MAC, _UUID, _IPV4, _WORD, _DIGIT_RUN, _B64_RUN, _IP6_RUN)  # for the tests

_HEX = b"0123456789abcdefABCDEF"
_LOCAL_PART = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-'")
_DOMAIN_START = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789[")


def _is_hex(word: bytes) -> bool:
    return not word.translate(None, _HEX)


def _luhn(digits: bytes) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = c - 0x30
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def mac(value: bytes) -> bool:
    """With colons or hyphens, Cisco's dotted form, or 12 hex digits standing alone."""
    if _MAC.search(value):
        return True
    rest = _UUID.sub(b" ", value)  # a UUID ends in 12 hex digits: that one is the uuid detector's
    return any(len(w) == 12 and _is_hex(w) for w in _WORD.findall(rest))


def imei(value: bytes) -> bool:
    return any(len(m) == 15 and _luhn(m) for m in _DIGIT_RUN.findall(value))


def uuid(value: bytes) -> bool:
    return _UUID.search(value) is not None


def token(value: bytes) -> bool:
    """Long hex, or base64-like runs mixing letters and digits (device hashes, session ids)."""
    if any(len(w) >= 16 and _is_hex(w) for w in _WORD.findall(value)):
        return True
    for run in _B64_RUN.findall(value):
        if len(run) < 16:
            continue
        has_digit = any(0x30 <= c <= 0x39 for c in run)
        has_upper = any(0x41 <= c <= 0x5A for c in run)
        has_lower = any(0x61 <= c <= 0x7A for c in run)
        if has_digit and has_upper and has_lower:
            return True
    return False


def email(value: bytes) -> bool:
    """A local-part character, `@`, then a domain: "alice@localhost" and "bob@[10.0.0.1]" too.

    A scan from one `@` to the next (the pattern this replaces retried the local part from every
    position: 5 s for a 60 KB value).
    """
    at = value.find(b"@")
    while at >= 0:
        after = value[at + 1 : at + 2]
        if at and value[at - 1] in _LOCAL_PART and after and after[0] in _DOMAIN_START:
            return True
        at = value.find(b"@", at + 1)
    return False


def ip(value: bytes) -> bool:
    for m in _IPV4.finditer(value):
        if all(int(part) <= 255 for part in m.group().split(b".")):
            return True  # leading zeros too: "010.000.000.001" is still meant as an address
    for run in _IP6_RUN.findall(value):
        if run.count(b":") < 2:
            continue  # "16.0", "1.983": versions, not addresses
        try:
            ipaddress.IPv6Address(run.strip(b".").decode("ascii"))
        except ValueError:
            # An address can hide in a longer run ("ab" + "2001:db8::1"); such runs are not
            # versions or names, so be eager.
            if len(run) > 45 or b"::" in run:
                return True
            continue
        return True
    return False


DETECTORS: dict[str, Callable[[bytes], bool]] = {
    "mac": mac,
    "imei": imei,
    "uuid": uuid,
    "token": token,
    "email": email,
    "ip": ip,
}


def detect(value: bytes, enabled: tuple[str, ...]) -> str | None:
    """The first enabled detector that matches, by name.

    Only the first 1024 octets are examined (RFC 2971 §3.3): the engine drops a longer value
    before it gets here, and no caller can make a detector spend more than that.
    """
    value = value[:MAX_VALUE_LENGTH]
    for name in enabled:
        if DETECTORS[name](value):
            return name
    return None
