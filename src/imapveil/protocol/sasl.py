"""Who is authenticating, from SASL responses, without keeping anything else of them.

Only the identity is taken out; the decoded response is a local value wrapped in `Secret`
and dropped when the function returns.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable

from imapveil.secret import Secret

MECHANISMS = frozenset(
    (
        *("PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER", "CRAM-MD5", "DIGEST-MD5", "EXTERNAL"),
        *("SCRAM-SHA-1", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"),
        *("SCRAM-SHA-512", "SCRAM-SHA-512-PLUS", "SCRAM-SHA3-512", "SCRAM-SHA3-512-PLUS"),
        *("GSSAPI", "GSS-SPNEGO", "GS2-KRB5", "NTLM", "ANONYMOUS", "OTP", "XOAUTH"),
    )
)
"""SASL mechanisms named in records as sent; any other word where the mechanism goes is
recorded as `OTHER`: it is the client's to choose, and a client that left its mechanism out
put its initial response there (`AUTHENTICATE AGFsaWNl...`): credentials, whatever the case."""
OTHER = "OTHER"
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


def decode_response(line: bytes) -> Secret | None:
    """A client's base64 SASL response line (or SASL-IR), decoded; None for `*` or junk."""
    text = line.strip()
    if text in (b"", b"*"):
        return None
    if text == b"=":  # RFC 4959: an empty initial response
        return Secret(b"")
    try:
        return Secret(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        return None


def username(mechanism: str, step: int, response: Secret) -> bytes | None:
    """The user a SASL response names, for the mechanisms that say it in clear.

    step counts the client's responses from 0 (SASL-IR counts as step 0); every mechanism here
    names the user in its first response.
    """
    extract = _scram if mechanism.startswith("SCRAM-") else _EXTRACT.get(mechanism)
    if extract is None or step != 0:
        return None
    name = extract(response.reveal())
    if name is None or _CONTROL.search(name):
        # No user name has a control octet in it: it is another mechanism's response (PLAIN's
        # `authzid NUL user NUL password`, XOAUTH2's `user=... ^A auth=Bearer token ^A ^A`,
        # sent for LOGIN's user name), credentials and all.
        return None
    return name


def _plain(data: bytes) -> bytes | None:
    # authzid NUL authcid NUL passwd (RFC 4616): the mailbox is authzid, else authcid.
    parts = data.split(b"\x00")
    if len(parts) == 3:
        return parts[0] or parts[1] or None
    return None


def _login(data: bytes) -> bytes | None:
    return data or None


def _xoauth2(data: bytes) -> bytes | None:
    # "user=" user ^A "auth=Bearer " token ^A ^A, ^A the octet 0x01. The user only if the
    # token is an item of its own: a client that wrote ^A as the two characters of the
    # documentation's notation, or a space, has its token in what follows "user=".
    items = data.split(b"\x01")
    if not any(item.startswith(b"auth=") for item in items):
        return None
    for item in items:
        if item.startswith(b"user="):
            return item[5:] or None
    return None


def _oauthbearer(data: bytes) -> bytes | None:
    # gs2-header: "n,a=user," (RFC 7628 §3.1); "=2C" and "=3D" escape "," and "=". Then ^A
    # "auth=Bearer " token ^A ^A: the user only if the token is an item after the header's
    # end (as for XOAUTH2).
    header, _, pairs = data.partition(b"\x01")
    if not any(item.startswith(b"auth=") for item in pairs.split(b"\x01")):
        return None
    for item in header.split(b","):
        if item.startswith(b"a="):
            return _unescape(item[2:]) or None
    return None


def _scram(data: bytes) -> bytes | None:
    # gs2-header, then "n=user,r=nonce" (RFC 5802 §7), escaped as in OAUTHBEARER.
    for item in data.split(b",")[2:]:
        if item.startswith(b"n="):
            return _unescape(item[2:]) or None
    return None


def _cram_md5(data: bytes) -> bytes | None:
    user, _, _ = data.rpartition(b" ")  # "user digest" (RFC 2195)
    return user or None


def _unescape(name: bytes) -> bytes:
    return name.replace(b"=2C", b",").replace(b"=3D", b"=")


_EXTRACT: dict[str, Callable[[bytes], bytes | None]] = {
    "PLAIN": _plain,
    "LOGIN": _login,
    "XOAUTH2": _xoauth2,
    "OAUTHBEARER": _oauthbearer,
    "CRAM-MD5": _cram_md5,
}
