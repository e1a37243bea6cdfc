"""The client leg's parts on their own: upstream STARTTLS (sans-IO) and capability mediation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imapveil.protocol import lexer
from imapveil.protocol.capabilities import KNOWN, LegState, mediate, rewrite
from imapveil.protocol.client_leg import Step, UpstreamStartTls, UpstreamTlsError
from tests.helpers.feeding import Splitter

GREETING = b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] Dovecot ready.\r\n"
CAPS = b"* CAPABILITY IMAP4rev1 AUTH=PLAIN ID\r\n"


def drive(split: Splitter, plain: bytes, secure: bytes) -> tuple[list[bytes], UpstreamStartTls]:
    """Play the server's side: `plain` before the handshake, `secure` after it."""
    starttls = UpstreamStartTls()
    sent: list[bytes] = []
    incoming = list(split(plain))
    handshaken = False
    while (step := starttls.next_step()) is not Step.DONE:
        if isinstance(step, bytes):
            sent.append(step)
        elif step is Step.HANDSHAKE:
            assert not incoming, "read past the OK before the handshake"
            handshaken = True
            incoming = list(split(secure))
            starttls.secured()
        else:
            starttls.receive(incoming.pop(0) if incoming else b"")
    assert handshaken
    return sent, starttls


def test_starttls_then_the_capabilities_under_tls(split: Splitter) -> None:
    sent, starttls = drive(
        split,
        GREETING + b"* OK still plain\r\nimapveil.0 OK Begin TLS\r\n",
        CAPS + b"imapveil.1 OK done\r\n* OK unsolicited\r\n",
    )
    assert sent == [b"imapveil.0 STARTTLS\r\n", b"imapveil.1 CAPABILITY\r\n"]
    shown = b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN ID] Dovecot ready.\r\n"
    # What came with the tagged answer is passed on too (the rest the relay reads as usual).
    assert starttls.greeting.startswith(shown)
    assert (shown + b"* OK unsolicited\r\n").startswith(starttls.greeting)


def test_a_greeting_without_a_code_keeps_its_text(split: Splitter) -> None:
    _sent, starttls = drive(
        split, b"* OK hello there\r\nimapveil.0 OK go\r\n", CAPS + b"imapveil.1 OK\r\n"
    )
    assert starttls.greeting == b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN ID] hello there\r\n"


@pytest.mark.parametrize(
    ("plain", "error"),
    [
        (b"* BYE go away\r\n", "no OK greeting"),
        (GREETING + b"imapveil.0 NO not here\r\n", "STARTTLS refused"),
        (GREETING + b"imapveil.0 OK go\r\n* OK injected\r\n", "data after the STARTTLS OK"),
        (GREETING + b"* OK", "closed before TLS"),
        (b"* OK " + b"x" * 70_000, "line too long before TLS"),
    ],
)
def test_upstream_that_will_not_do_tls(plain: bytes, error: str) -> None:
    starttls = UpstreamStartTls()
    with pytest.raises(UpstreamTlsError, match=error):
        while (step := starttls.next_step()) is not Step.HANDSHAKE:
            if step is Step.RECEIVE:
                starttls.receive(plain)
                plain = b""


LEG = LegState(
    client_tls="off", client_secure=False, compress=False, compressed=False, strict=False
)


def test_mediation_removes_what_the_client_leg_cannot_have() -> None:
    tokens = b"IMAP4rev1 STARTTLS LOGINDISABLED CLIENTID COMPRESS=DEFLATE AUTH=SCRAM-SHA-1-PLUS"
    assert mediate(tokens.split(), LEG) == [b"IMAP4rev1"]


def test_mediation_offers_what_the_proxy_does() -> None:
    leg = LegState("require", False, True, False, False)
    assert mediate([b"IMAP4rev1", b"AUTH=PLAIN"], leg) == [
        b"IMAP4rev1",
        b"STARTTLS",
        b"LOGINDISABLED",
    ]
    secure = LegState("require", True, True, True, False)
    assert mediate([b"IMAP4rev1", b"AUTH=PLAIN"], secure) == [b"IMAP4rev1", b"AUTH=PLAIN"]
    after_login = LegState("offer", False, False, False, False, authenticated=True)
    assert mediate([b"IMAP4rev1"], after_login) == [b"IMAP4rev1"]


def test_compress_is_offered_after_login_only() -> None:
    """RFC 4978 §5: `command-auth =/ compress`. Before login the proxy neither offers COMPRESS
    nor takes it (`test_session_tls`): no decompressor for a client that has not logged in."""
    before = LegState("off", True, True, False, False)
    after = LegState("off", True, True, False, False, authenticated=True)
    active = LegState("off", True, True, True, False, authenticated=True)
    assert mediate([b"IMAP4rev1"], before) == [b"IMAP4rev1"]
    assert mediate([b"IMAP4rev1"], after) == [b"IMAP4rev1", b"COMPRESS=DEFLATE"]
    assert mediate([b"IMAP4rev1"], active) == [b"IMAP4rev1"]


def test_strict_mediation_keeps_only_known_capabilities() -> None:
    strict = LegState("off", False, False, False, True)
    assert mediate([b"IMAP4rev1", b"XUNKNOWN", b"idle", b"AUTH=PLAIN"], strict) == [
        b"IMAP4rev1",
        b"idle",
        b"AUTH=PLAIN",
    ]
    assert "IDLE" in KNOWN


def test_rewrite_says_none_when_nothing_changes() -> None:
    assert rewrite(b"IMAP4rev1 IDLE", LEG) is None
    assert rewrite(b"IMAP4rev1 STARTTLS IDLE", LEG) == b"IMAP4rev1 IDLE"


@given(
    st.lists(
        st.sampled_from([b"IMAP4rev1", b"STARTTLS", b"AUTH=PLAIN", b"AUTH=SCRAM-SHA-1-PLUS",
                         b"COMPRESS=DEFLATE", b"X-ODD", b"LOGINDISABLED", b"IDLE", b"CLIENTID"]),
        max_size=12,
    ),
    st.builds(
        LegState,
        st.sampled_from(["off", "offer", "require"]),
        st.booleans(), st.booleans(), st.booleans(), st.booleans(), st.booleans(),
    ),
    st.integers(0, 5000),
)  # fmt: skip
def test_capability_lists_mediated_once_per_text_are_mediated_alike(
    tokens: list[bytes], leg: LegState, padding: int
) -> None:
    """Lists up to 4 KiB are mediated once per text and leg state and shared by the sessions;
    longer ones every time: either way the answer is the one `mediate` gives."""
    args = b" ".join([*tokens, b"X" * padding])
    first, again = rewrite(args, leg), rewrite(args, leg)
    expected = mediate(args.split(), leg)
    assert first == again == (None if expected == args.split() else b" ".join(expected))
    short = lexer.capabilities(args)
    assert (
        short
        == lexer.capabilities(bytes(args))
        == {t.upper().decode() for t in args.split() if len(t) <= 128}
    )
