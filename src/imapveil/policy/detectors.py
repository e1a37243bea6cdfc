"""Shapes of unique identifiers, recognised in an `ID` value whatever its field is called.

Each detector answers "does this value carry an identifier of my kind?". They are deliberately
conservative about version strings ("16.0 (3731.600.7)", "13; TQ3A.230805.001") and eager about
anything that looks like a device or network identity.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

_MAC = re.compile(
    rb"(?<![0-9a-f])(?:[0-9a-f]{2}([:-])(?:[0-9a-f]{2}\1){4}[0-9a-f]{2}"
    rb"|[0-9a-f]{4}\.[0-9a-f]{4}\.[0-9a-f]{4})(?![0-9a-f])",
    re.IGNORECASE,
)
_UUID = re.compile(
    rb"(?<![0-9a-f])[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}(?![0-9a-f])",
    re.IGNORECASE,
)
_DIGITS15 = re.compile(rb"(?<![0-9])[0-9]{15}(?![0-9])")
_HEX = re.compile(rb"(?<![0-9a-z])[0-9a-f]{16,}(?![0-9a-z])", re.IGNORECASE)
_B64 = re.compile(rb"(?<![A-Za-z0-9+/_=-])[A-Za-z0-9+/_-]{16,}={0,2}(?![A-Za-z0-9+/_=-])")
_EMAIL = re.compile(rb"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_IP_TOKENS = re.compile(rb"[0-9A-Fa-f:.]{2,45}(?:%[A-Za-z0-9]+)?")


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
    return _MAC.search(value) is not None


def imei(value: bytes) -> bool:
    return any(_luhn(m.group()) for m in _DIGITS15.finditer(value))


def uuid(value: bytes) -> bool:
    return _UUID.search(value) is not None


def token(value: bytes) -> bool:
    """Long hex, or base64-like runs mixing letters and digits (device hashes, session ids)."""
    if _HEX.search(value):
        return True
    for m in _B64.finditer(value):
        run = m.group()
        has_digit = any(0x30 <= c <= 0x39 for c in run)
        has_upper = any(0x41 <= c <= 0x5A for c in run)
        has_lower = any(0x61 <= c <= 0x7A for c in run)
        if has_digit and has_upper and has_lower:
            return True
    return False


def email(value: bytes) -> bool:
    return _EMAIL.search(value) is not None


def ip(value: bytes) -> bool:
    for m in _IP_TOKENS.finditer(value):
        text = m.group().decode("ascii")
        if text.count(".") != 3 and text.count(":") < 2:
            continue  # "16.0", "1.983": versions, not addresses
        try:
            ipaddress.ip_address(text)
        except ValueError:
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
    """The first enabled detector that matches, by name."""
    for name in enabled:
        if DETECTORS[name](value):
            return name
    return None
