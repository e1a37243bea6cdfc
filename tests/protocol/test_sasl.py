"""Who authenticates, from each SASL mechanism's responses (sasl.py), and nothing else kept."""

from __future__ import annotations

import base64

import pytest

from imapveil.protocol.sasl import decode_response, username
from imapveil.secret import Secret


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


@pytest.mark.parametrize(
    ("mechanism", "step", "response", "user"),
    [
        ("PLAIN", 0, b"\x00alice\x00secret", b"alice"),
        ("PLAIN", 0, b"shared@example.org\x00admin\x00secret", b"shared@example.org"),
        ("PLAIN", 0, b"\x00\x00secret", None),
        ("PLAIN", 0, b"no separators", None),
        ("PLAIN", 1, b"\x00alice\x00secret", None),
        ("LOGIN", 0, b"alice", b"alice"),
        ("LOGIN", 0, b"", None),
        ("LOGIN", 1, b"the password", None),
        (
            "XOAUTH2",
            0,
            b"user=alice@example.org\x01auth=Bearer ya29.t\x01\x01",
            b"alice@example.org",
        ),
        ("XOAUTH2", 0, b"auth=Bearer ya29.t\x01\x01", None),
        ("XOAUTH2", 0, b"user=\x01auth=Bearer t\x01\x01", None),
        (
            "OAUTHBEARER",
            0,
            b"n,a=alice@example.org,\x01auth=Bearer t\x01\x01",
            b"alice@example.org",
        ),
        ("OAUTHBEARER", 0, b"n,a=odd=2Cname=3Dx,\x01auth=Bearer t\x01\x01", b"odd,name=x"),
        ("OAUTHBEARER", 0, b"n,,\x01auth=Bearer t\x01\x01", None),
        ("SCRAM-SHA-256", 0, b"n,,n=alice,r=rOprNGfwEbeRWgbNEkqO", b"alice"),
        ("SCRAM-SHA-1", 0, b"n,,n=a=2Cb=3Dc,r=abc", b"a,b=c"),
        ("SCRAM-SHA-256", 0, b"n,,r=abc", None),
        ("SCRAM-SHA-256", 1, b"c=biws,r=abc,p=proof", None),
        ("CRAM-MD5", 0, b"alice 0123456789abcdef0123456789abcdef", b"alice"),
        ("CRAM-MD5", 0, b"0123456789abcdef", None),
        ("GSSAPI", 0, b"opaque", None),
    ],
)
def test_user_extraction(mechanism: str, step: int, response: bytes, user: bytes | None) -> None:
    assert username(mechanism, step, Secret(response)) == user


def test_responses_are_decoded_into_a_secret() -> None:
    decoded = decode_response(b64(b"\x00alice\x00secret") + b"\r\n")
    assert isinstance(decoded, Secret)
    assert decoded.reveal() == b"\x00alice\x00secret"
    assert "secret" not in repr(decoded)


@pytest.mark.parametrize("line", [b"", b"*", b"*\r\n", b"not base64!", b"YWJ"])
def test_cancel_and_junk_decode_to_none(line: bytes) -> None:
    assert decode_response(line) is None


def test_an_empty_initial_response() -> None:
    decoded = decode_response(b"=")
    assert decoded is not None and decoded.reveal() == b""
