"""STARTTLS and COMPRESS on the client leg, answered by the proxy; capability mediation."""

from __future__ import annotations

from typing import Any

from imapveil.protocol.actions import Direction, StartCompress, StartTls
from imapveil.protocol.capabilities import LegState, mediate
from imapveil.records import CommandCompleted, Violation
from tests.helpers import feeding
from tests.helpers.feeding import SPLITTERS, Conversation, Splitter

GREETING = (
    b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED AUTH=PLAIN AUTH=SCRAM-SHA-256-PLUS ID]"
    b" hi\r\n"
)


talk = feeding.talk


def actions_of(conv: Conversation, data: bytes) -> list[object]:
    return list(conv.core.feed_client(data, conv.clock))


def test_greeting_is_mediated_for_the_client_leg(split: Splitter) -> None:
    conv = talk(split, client_tls="require", compress=True).server(GREETING)
    assert conv.to_client == (
        b"* OK [CAPABILITY IMAP4rev1 ID STARTTLS LOGINDISABLED] hi\r\n"  # COMPRESS: after login
    )
    # What the server said is still what the core knows of the server.
    assert "STARTTLS" in conv.core.capabilities


def test_starttls_is_answered_by_the_proxy_and_injection_is_dropped() -> None:
    conv = talk(SPLITTERS["whole"], client_tls="offer").server(GREETING)
    actions = conv.core.feed_client(b"a STARTTLS\r\nX CAPABILITY\r\n", conv.clock)
    conv.apply(actions)
    assert conv.to_client.endswith(b"a OK Begin TLS negotiation now\r\n")
    assert conv.to_server == b""  # neither STARTTLS nor the injected command reached the server
    assert any(isinstance(a, StartTls) and a.direction is Direction.TO_CLIENT for a in actions)
    (v,) = conv.of(Violation)
    assert (v.kind, v.detail, v.action) == ("starttls_pipelining", "14 octets", "dropped")
    # After the handshake the client asks again, and now sees no STARTTLS.
    conv.client(b"b CAPABILITY\r\n")
    conv.server(b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN\r\nb OK done\r\n")
    assert conv.to_client.endswith(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nb OK done\r\n")
    conv.client_closes()
    end = conv.ended()
    assert end.client_tls


def test_require_refuses_login_before_tls(split: Splitter) -> None:
    conv = talk(split, client_tls="require").server(GREETING)
    conv.client(b"a LOGIN alice secret\r\nb AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n")
    assert conv.to_server == b""  # the password never left the proxy
    refused = b"NO [PRIVACYREQUIRED] Use STARTTLS first\r\n"
    assert conv.to_client.endswith(b"a " + refused + b"b " + refused)
    conv.client(b"c LOGIN {5}\r\n")
    assert conv.closed == "protocol_error"


def test_starttls_when_not_offered_and_when_commands_are_outstanding(split: Splitter) -> None:
    conv = talk(split).server(GREETING)
    conv.client(b"a STARTTLS\r\n")
    assert conv.to_client.endswith(b"a NO [CANNOT] STARTTLS is not offered here\r\n")
    offered = talk(split, client_tls="offer").server(GREETING)
    offered.client(b"n NOOP\r\na STARTTLS\r\n")
    assert offered.to_client.endswith(
        b"a BAD [CLIENTBUG] Wait for the outstanding commands first\r\n"
    )
    assert offered.to_server == b"n NOOP\r\n"


def _logged_in(split: Splitter, **settings: Any) -> Conversation:
    conv = talk(split, **settings).server(GREETING)
    conv.client(b"l LOGIN alice secret\r\n")
    conv.server(b"l OK Logged in\r\n")
    return conv


def test_compress_on_the_client_leg(split: Splitter) -> None:
    conv = _logged_in(split, compress=True)
    conv.client(b"a COMPRESS DEFLATE\r\n")
    assert conv.to_client.endswith(b"a OK DEFLATE active\r\n")
    assert conv.to_server == b"l LOGIN alice secret\r\n"
    conv.client(b"b COMPRESS DEFLATE\r\n")
    assert conv.to_client.endswith(b"b NO [COMPRESSIONACTIVE] DEFLATE is already active\r\n")
    statuses = [(r.verb, r.status, r.code) for r in conv.of(CommandCompleted)]
    assert statuses == [
        ("LOGIN", "OK", None),
        ("COMPRESS", "OK", None),
        ("COMPRESS", "NO", "COMPRESSIONACTIVE"),
    ]
    off = _logged_in(split)
    off.client(b"a COMPRESS DEFLATE\r\n")
    assert off.to_client.endswith(b"a NO [CANNOT] COMPRESS is not offered here\r\n")


def test_compress_before_login_is_refused(split: Splitter) -> None:
    """RFC 4978 §5 (`command-auth =/ compress`): before login a client gets BAD and no
    decompressor (the proxy's DEFLATE was the one way for a client that had not logged in to
    make it inflate what it sent), and nothing reaches the server."""
    conv = talk(split, compress=True).server(GREETING)
    actions = conv.core.feed_client(b"a COMPRESS DEFLATE\r\n", conv.clock)
    assert not any(isinstance(a, StartCompress) for a in actions)
    conv.client(b"b COMPRESS DEFLATE\r\nc NOOP\r\n")
    assert b"b BAD COMPRESS is only valid after authentication\r\n" in conv.to_client
    assert conv.to_server == b"c NOOP\r\n"  # read on as usual: nothing switched
    assert not conv.core.compressed


def test_compress_action() -> None:
    conv = _logged_in(SPLITTERS["whole"], compress=True)
    actions = conv.core.feed_client(b"a COMPRESS deflate\r\n", conv.clock)
    assert any(isinstance(a, StartCompress) for a in actions)


def test_tls_client_hello_on_a_plain_port(split: Splitter) -> None:
    conv = talk(split).server(GREETING)
    conv.client(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    assert conv.closed == "tls_error"
    assert conv.to_server == b""


def test_mediation_rules() -> None:
    text = b"IMAP4rev1 STARTTLS AUTH=PLAIN AUTH=SCRAM-SHA-1-PLUS CLIENTID COMPRESS=DEFLATE XFOO"
    tokens = text.split()
    plain = LegState("off", False, False, False, False)
    assert mediate(tokens, plain) == [b"IMAP4rev1", b"AUTH=PLAIN", b"XFOO"]
    strict = LegState("off", True, False, False, True)
    assert mediate(tokens, strict) == [b"IMAP4rev1", b"AUTH=PLAIN"]
    require = LegState("require", False, True, False, False)
    assert mediate(tokens, require) == [
        b"IMAP4rev1",
        b"XFOO",
        b"STARTTLS",
        b"LOGINDISABLED",
    ]
    logged_in = LegState("require", True, True, False, False, authenticated=True)
    assert mediate(tokens, logged_in) == [b"IMAP4rev1", b"AUTH=PLAIN", b"XFOO", b"COMPRESS=DEFLATE"]
