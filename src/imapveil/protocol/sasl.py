"""Who is authenticating, from SASL responses, without keeping anything else of them.

Only the identity is taken out; the decoded response is a local value wrapped in `Secret`
and dropped when the function returns.
"""

from __future__ import annotations

import base64
import binascii

from imapveil.secret import Secret


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

    step counts the client's responses from 0 (SASL-IR counts as step 0).
    """
    data = response.reveal()
    if mechanism == "PLAIN" and step == 0:
        # authzid NUL authcid NUL passwd (RFC 4616): the mailbox is authzid, else authcid.
        parts = data.split(b"\x00")
        if len(parts) == 3:
            return parts[0] or parts[1] or None
        return None
    if mechanism == "LOGIN" and step == 0:
        return data or None
    if mechanism == "XOAUTH2" and step == 0:
        for item in data.split(b"\x01"):
            if item.startswith(b"user="):
                return item[5:] or None
        return None
    if mechanism == "OAUTHBEARER" and step == 0:
        # gs2-header: "n,a=user," (RFC 7628 §3.1); "=2C" and "=3D" escape "," and "=".
        header = data.split(b"\x01", 1)[0]
        for item in header.split(b","):
            if item.startswith(b"a="):
                return item[2:].replace(b"=2C", b",").replace(b"=3D", b"=") or None
        return None
    if mechanism.startswith("SCRAM-") and step == 0:
        for item in data.split(b",")[2:]:
            if item.startswith(b"n="):
                return item[2:].replace(b"=2C", b",").replace(b"=3D", b"=") or None
        return None
    if mechanism == "CRAM-MD5" and step == 0:
        user, _, _ = data.rpartition(b" ")
        return user or None
    return None
