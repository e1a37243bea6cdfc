"""Issue 11's attacks on the pure core, fed whole, byte by byte and in random chunks (the `split`
fixture): the same promises as tests/relay/test_fail_closed.py against the real Dovecot, without
the server. An identifier or a password never reaches the forwarded bytes nor a record."""

from __future__ import annotations

import json
from functools import partial

from imapveil.protocol.session import CoreConfig
from imapveil.records import CommandCompleted, SessionEnded
from tests.helpers import feeding
from tests.helpers.feeding import Conversation, Splitter

GREETING = b"* OK [CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID IDLE AUTH=PLAIN STARTTLS] ready\r\n"
SECRET = b"PW-9d2e secret"
MARKER = b"MARKER-51c0"


def plain_user(user: bytes) -> str:
    return user.decode("latin-1")  # `user_identity = plain`: the worst case for a leak


talk = partial(feeding.talk, greeting=GREETING, identify_user=plain_user)


def recorded(conv: Conversation) -> bytes:
    return json.dumps([r.to_dict() for r in conv.records]).encode()


def test_unparsable_login_users_never_record_the_password(split: Splitter) -> None:
    for user in (b'"x', b"(x", b"\xe9x"):
        conv = talk(split)
        conv.client(b"a LOGIN %s {%d+}\r\n%s\r\n" % (user, len(SECRET), SECRET))
        conv.client(b"b NOOP\r\n").server(b"b OK\r\n").finish()
        assert SECRET not in conv.to_server
        assert SECRET not in recorded(conv)
        assert SECRET.split()[0] not in recorded(conv)


def test_a_login_whose_shape_is_wrong_names_no_user(split: Splitter) -> None:
    conv = talk(split)
    # Three arguments: not `LOGIN SP astring SP astring`, so nobody is named.
    conv.client(b"a LOGIN alice extra {%d+}\r\n%s\r\n" % (len(SECRET), SECRET))
    conv.server(b"+ go\r\na BAD wrong arguments\r\n").finish()
    (cmd,) = conv.of(CommandCompleted)
    assert cmd.user is None
    assert SECRET not in recorded(conv)


def test_a_long_tag_with_a_synchronizing_password_records_only_the_tag(split: Splitter) -> None:
    tag = b"T" * 126  # the longest taken (lexer.MAX_TAG), not a tag's usual shape
    conv = talk(split)
    conv.client(b"%s LOGIN carol {%d}\r\n" % (tag, len(SECRET)))
    conv.server(b"+ go\r\n")
    conv.client(SECRET + b"\r\n")
    conv.server(tag + b" OK logged in\r\n").finish()
    (cmd,) = conv.of(CommandCompleted)
    assert cmd.tag == "(tag: 126 octets)"  # outbox.record_tag
    assert cmd.user == "carol"
    assert SECRET.split()[0] not in recorded(conv)


def test_a_split_proxy_header_is_refused(split: Splitter) -> None:
    for parts in ([b"P", b"ROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"], [b"\r\n\r\n", b"\x00\r\nQUIT\n!!"]):
        conv = talk(split)
        for part in parts:
            conv.client(part)
        assert conv.to_server == b""
        assert conv.closed == "proxy_header"


def test_a_client_starting_with_p_is_not_mistaken_for_proxy(split: Splitter) -> None:
    conv = talk(split)
    conv.client(b"P")
    conv.client(b"1 NOOP\r\n")
    assert conv.to_server == b"P1 NOOP\r\n"


def test_starttls_only_before_login(split: Splitter) -> None:
    conv = talk(split, client_tls="offer")
    assert conv.to_client.endswith(b"STARTTLS] ready\r\n")
    conv.client(b"a LOGIN alice x\r\n").server(b"a OK [CAPABILITY IMAP4rev1 STARTTLS] in\r\n")
    assert conv.to_client.endswith(b"a OK [CAPABILITY IMAP4rev1] in\r\n")
    conv.client(b"b STARTTLS\r\n")
    assert conv.to_client.endswith(b"b BAD STARTTLS is only valid before authentication\r\n")
    assert b"STARTTLS" not in conv.to_server


def test_nothing_reaches_a_server_that_does_not_greet_like_imap(split: Splitter) -> None:
    conv = Conversation(split, CoreConfig(identify_user=plain_user))
    conv.client(b"a LOGIN alice %s\r\n" % SECRET)  # sent before any greeting: held
    conv.server(b"220 smtp.example ESMTP ready\r\n").finish()
    assert conv.to_server == b""
    assert conv.to_client == b"* BYE [UNAVAILABLE] Mail server is not reachable\r\n"
    end = conv.of(SessionEnded)[0]
    assert (end.reason, end.detail) == (
        "upstream_unavailable",
        "not an IMAP greeting: '220 smtp.example ESMTP r'",
    )


def test_an_id_hidden_in_a_literal_never_reaches_the_server(split: Splitter) -> None:
    hidden = b'h ID ("x-device-id" "%s")\r\n' % MARKER
    cases = [
        # Well-formed: sent as `~{N}`, and the server answers without asking for the literal.
        (b"a NOOP ~{%d+}", b"a OK NOOP completed\r\n", b"a NOOP ~{%d}\r\n" % len(hidden)),
        # Refused by the proxy: never sent.
        (b'a SELECT "x {%d+}', b"", b""),
        (b"a IDLE {%d+}", b"", b""),
    ]
    for line, answer, sent in cases:
        conv = talk(split)
        conv.client((line % len(hidden)) + b"\r\n" + hidden + b"\r\nz NOOP\r\n")
        # `z NOOP` goes out once the server has answered `a`: a server answers it after that.
        conv.server(answer).server(b"z OK\r\n")
        assert conv.to_server == sent + b"z NOOP\r\n"
        assert MARKER not in recorded(conv)


def test_a_skipped_command_whose_framing_is_lost_ends_the_session(split: Splitter) -> None:
    # Found by bench/fuzz_dovecot.py: a refused command's LITERAL+ literal is skipped, then its
    # next fragment announces a literal of 2^64 octets (or a synchronizing one): in the
    # client's framing what follows is that literal (here a password), never commands.
    for follow in (b"{18446744073709551616+}", b"{16}"):
        conv = talk(split)
        conv.client(b'it LOGIN alice "x ~{5+}\r\nhello ' + follow + b"\r\n" + SECRET + b"\r\n")
        conv.finish()
        assert conv.to_server == b""
        assert conv.closed == "protocol_error"
        assert conv.to_client.endswith(b"* BYE Command not understood by the proxy\r\n")
        assert SECRET.split()[0] not in recorded(conv)


def test_a_refused_literal_the_client_sent_before_its_plus_is_no_command(split: Splitter) -> None:
    """The client sends `{N}` and the literal at once (it should wait for "+"); the server
    answers the command instead of asking for the literal. What the client sent after the
    announcement is that literal, never commands: BYE, and nothing of it goes anywhere. A
    client that waited is followed as usual."""
    conv = talk(split)
    conv.client(b"b LOGIN %s {%d}\r\n%s\r\n" % (MARKER, len(SECRET), SECRET))
    conv.server(b"b NO [AUTHENTICATIONFAILED] no literals here\r\n")
    assert conv.closed == "protocol_error"
    assert conv.to_server == b"b LOGIN %s {%d}\r\n" % (MARKER, len(SECRET))
    assert conv.to_client.endswith(
        b"b NO [AUTHENTICATIONFAILED] no literals here\r\n"
        b"* BYE Literal sent before the server asked for it\r\n"
    )
    assert SECRET.split()[0] not in recorded(conv) and SECRET.split()[1] not in recorded(conv)
    (violation,) = [r for r in conv.records if r.to_dict()["event"] == "violation"]
    assert violation.to_dict()["kind"] == "literal_before_continuation"

    waited = talk(split)
    waited.client(b"a LOGIN alice wonderland\r\n").server(b"a OK in\r\n")
    waited.client(b"b APPEND nosuch {5}\r\n").server(b"b NO [TRYCREATE] no such mailbox\r\n")
    waited.client(b"c NOOP\r\n").server(b"c OK\r\n").finish()
    assert waited.closed is None or waited.closed != "protocol_error"
    assert waited.to_server.endswith(b"b APPEND nosuch {5}\r\nc NOOP\r\n")
