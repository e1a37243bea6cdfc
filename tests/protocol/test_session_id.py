"""ID in the session core: collected, rewritten by policy, recorded; everything else untouched."""

from __future__ import annotations

import json
from typing import Any

import pytest

from imapveil.policy import Outcome, apply
from imapveil.policy_files import resolve_policy
from imapveil.protocol.id_params import parse, serialize
from imapveil.protocol.session import CoreConfig
from imapveil.records import CommandCompleted, IdExchange, Violation
from tests.helpers import feeding
from tests.helpers.corpus import Row, rows
from tests.helpers.feeding import Conversation, Splitter, whole

GREETING = b"* OK [CAPABILITY IMAP4rev1 LITERAL+ ID IDLE] ready\r\n"
GREETING_NO_LITERAL_PLUS = b"* OK [CAPABILITY IMAP4rev1 ID] ready\r\n"
AOSP = next(r for r in rows() if r.label == "aosp-email-identifiers")


def talk(split: Splitter, policy: str = "default", greeting: bytes = GREETING) -> Conversation:
    chosen = resolve_policy(policy)
    return feeding.talk(split, greeting, policy=lambda: chosen, hash_value=lambda v: "hmac:test")


def ids(conv: Conversation) -> list[IdExchange]:
    return conv.of(IdExchange)


def test_aosp_identifiers_never_reach_the_server_or_the_records(split: Splitter) -> None:
    conv = talk(split)
    conv.client(b"a NOOP\r\n" + AOSP.data + b"b NOOP\r\n")
    # The command after an ID is read once the ID is answered (one ID's work per answer).
    assert conv.to_server.startswith(b"a NOOP\r\n7 ID (") and b"b NOOP" not in conv.to_server
    conv.server(b'a OK\r\n* ID ("name" "Dovecot")\r\n7 OK ID completed\r\n')
    conv.server(b"b OK\r\n")
    sent = bytes(conv.to_server)
    assert sent.startswith(b"a NOOP\r\n7 ID (")
    assert sent.endswith(b")\r\nb NOOP\r\n")
    assert b'"name" "com.android.email"' in sent
    assert b'"x-imapveil" "imapveil ' in sent
    dump = json.dumps([r.to_dict() for r in conv.records])
    for secret in ("Pixel 7", "T-Mobile", "3kWq1b0Zr9mYb8Jx2n4Vt0cP5sI="):
        assert secret.encode() not in sent
        assert secret not in dump
    (rec,) = ids(conv)
    assert rec.tag == "7" and rec.status == "OK" and not rec.malformed
    assert rec.client == {
        "name": "com.android.email",
        "os": "android",
        "os-version": "13; TQ3A.230805.001",
        "vendor": "Google",
    }
    assert rec.server == {"name": "Dovecot"}
    assert rec.policy == "default" and len(rec.policy_digest) == 64
    assert set(rec.dropped) == {"x-android-device-model", "x-android-mobile-net-operator", "aguid"}
    assert rec.forwarded == ("name", "os", "os-version", "vendor", "x-imapveil")
    assert [r.verb for r in conv.of(CommandCompleted)] == [
        "NOOP",
        "ID",
        "NOOP",
    ]


def test_unchanged_id_is_relayed_byte_for_byte(split: Splitter) -> None:
    conv = talk(split)
    line = b'x1 id ( "name"  "Thunderbird" "version" "52.4.0" )\r\n'
    conv.client(line).server(b"* ID NIL\r\nx1 OK\r\n")
    assert conv.to_server == line
    assert conv.to_client.endswith(b"* ID NIL\r\nx1 OK\r\n")
    (rec,) = ids(conv)
    assert rec.server is None and rec.client == {"name": "Thunderbird", "version": "52.4.0"}


def test_malformed_id_goes_out_as_id_nil(split: Splitter) -> None:
    conv = talk(split)
    # Forms a server may accept although the proxy's parser does not: none goes as it came.
    conv.client(b'm ID\r\nn ID ("name")\r\no ID ("name" "x" "mac" "a4c3f0851b2e") junk\r\n')
    assert conv.to_server == b"m ID NIL\r\n"  # the next ID is read once this one is answered
    conv.server(b"* ID NIL\r\nm OK\r\n")
    assert conv.to_server == b"m ID NIL\r\nn ID NIL\r\n"
    conv.server(b"* ID NIL\r\nn OK\r\n").server(b"* ID NIL\r\no OK\r\n")
    assert conv.to_server == b"m ID NIL\r\nn ID NIL\r\no ID NIL\r\n"
    assert [(r.tag, r.malformed, r.status, r.client) for r in ids(conv)] == [
        ("m", True, "OK", None),
        ("n", True, "OK", None),
        ("o", True, "OK", None),
    ]
    assert [v.kind for v in conv.records if isinstance(v, Violation)] == ["malformed_id"] * 3
    assert b"a4c3f0851b2e" not in json.dumps([r.to_dict() for r in conv.records]).encode()


def test_synchronizing_literal_in_id_is_answered_by_the_proxy(split: Splitter) -> None:
    conv = talk(split)
    conv.client(b'L ID ("name" "K-9" "x-device-id" {12}\r\n')
    assert conv.to_client.endswith(b"+ Ready for literal data\r\n")
    assert conv.to_server == b""
    conv.client(b"abcdef012345)\r\n")
    assert (
        conv.to_server
        == b'L ID ("name" "K-9" "x-imapveil" "imapveil 0.1.0 removed or shortened fields")\r\n'
    )
    conv.server(b"L OK ID completed\r\n")
    assert ids(conv)[0].dropped == ("x-device-id",)


def test_id_with_literals_is_written_anew(split: Splitter) -> None:
    conv = talk(split, "passthrough")
    command = b"L ID ({4}\r\nname {3+}\r\nK-9)\r\n"
    conv.client(command[:12])
    conv.client(command[12:])
    # Never relayed with its literals as they came: a value that needs none is quoted.
    assert conv.to_server == b'L ID ("name" "K-9")\r\n'
    assert conv.to_client.count(b"+ Ready") == 1  # ours, for the synchronizing literal
    conv.server(b"L OK ID completed\r\n")
    assert conv.to_client.endswith(b"L OK ID completed\r\n")
    assert ids(conv)[0].client == {"name": "K-9"}


def test_our_continuation_waits_for_a_response_boundary(split: Splitter) -> None:
    conv = talk(split)
    conv.client(b"a FETCH 1 BODY[]\r\n")
    conv.server(b"* 1 FETCH (BODY[] {10}\r\n01234")
    conv.client(b'L ID ("name" {3}\r\n')
    assert b"+ Ready" not in conv.to_client  # not in the middle of the server's literal
    conv.server(b"56789)\r\n")
    assert conv.to_client.endswith(b"56789)\r\n+ Ready for literal data\r\n")
    conv.client(b"K-9)\r\n").server(b"a OK\r\nL OK\r\n")
    assert conv.to_server.endswith(b'L ID ("name" "K-9")\r\n')


def test_value_needing_a_literal_without_literal_plus_is_sent_piece_by_piece(
    split: Splitter,
) -> None:
    conv = talk(split, "passthrough", GREETING_NO_LITERAL_PLUS)
    conv.client(b'a ID ("name" "Mail" "x-weird" {2+}\r\n\r\n "x-originating-ip" "1.2.3.4")\r\n')
    conv.client(b"b NOOP\r\n")  # pipelined: must not land inside our ID
    assert conv.to_server == b'a ID ("name" "Mail" "x-weird" {2}\r\n'
    conv.server(b"+ go ahead\r\n")
    assert b"go ahead" not in conv.to_client  # the client never asked for it
    assert conv.to_server == (
        b'a ID ("name" "Mail" "x-weird" {2}\r\n'
        b'\r\n "x-imapveil" "imapveil 0.1.0 removed or shortened fields")\r\n'
    )
    conv.server(b"a OK\r\n")
    assert conv.to_server.endswith(b")\r\nb NOOP\r\n")  # once the ID is answered
    conv.server(b"b OK\r\n")
    assert set(ids(conv)[0].dropped) == {"x-originating-ip"}
    assert [r.status for r in conv.of(CommandCompleted)] == ["OK", "OK"]


def test_refused_piece_by_piece_id_releases_the_client(split: Splitter) -> None:
    conv = talk(split, "passthrough", GREETING_NO_LITERAL_PLUS)
    conv.client(b'a ID ("x-weird" {1+}\r\n\xff "x-originating-ip" "1.2.3.4")\r\nb NOOP\r\n')
    conv.server(b"a BAD no literals here\r\n")
    assert conv.to_server.endswith(b"{1}\r\nb NOOP\r\n")
    conv.server(b"b OK\r\n")
    assert [r.status for r in conv.of(CommandCompleted)] == ["BAD", "OK"]


def test_injected_id_for_servers_that_insist(split: Splitter) -> None:
    chosen = resolve_policy("default")
    config = CoreConfig(
        policy=lambda: chosen,
        hash_value=lambda v: "hmac:test",
        inject_id=((b"name", b"imapveil gateway"), (b"vendor", b"Example Org")),
    )
    conv = Conversation(split, config).server(GREETING)
    conv.client(b"a CAPABILITY\r\nb LOGIN alice secret\r\n")
    assert conv.to_server == (
        b"a CAPABILITY\r\n"
        b'imapveil.2 ID ("name" "imapveil gateway" "vendor" "Example Org")\r\n'
        b"b LOGIN alice secret\r\n"
    )
    conv.server(b"* CAPABILITY IMAP4rev1\r\na OK\r\n")
    coremail = b'* ID ("name" "Coremail Imap" "TransID" "cFAZvADXroRR1q9e")\r\n'
    conv.server(coremail + b"imapveil.2 OK ID completed\r\n")
    conv.server(b"b OK Logged in\r\n")
    assert conv.to_client.endswith(b"* CAPABILITY IMAP4rev1\r\na OK\r\nb OK Logged in\r\n")
    (rec,) = ids(conv)
    assert rec.injected and rec.tag == "imapveil.2" and rec.status == "OK"
    assert rec.client == {"name": "imapveil gateway", "vendor": "Example Org"}
    assert rec.server == {"name": "Coremail Imap"}
    assert not [v for v in conv.records if isinstance(v, Violation)]
    # Once per session (a second LOGIN is the proxy's to refuse: no ID before it), and never
    # when the client sent its own ID.
    conv.client(b"c LOGIN alice secret\r\n")
    assert conv.to_client.endswith(b"c BAD [CLIENTBUG] Already authenticated\r\n")
    assert conv.to_server.endswith(b"\r\nb LOGIN alice secret\r\n")
    assert conv.to_server.count(b" ID ") == 1

    other = Conversation(split, config).server(GREETING)
    other.client(b'1 ID ("name" "Thunderbird")\r\n2 LOGIN bob x\r\n')
    other.server(b"* ID NIL\r\n1 OK\r\n")
    assert other.to_server == b'1 ID ("name" "Thunderbird")\r\n2 LOGIN bob x\r\n'


def test_server_id_is_filtered_on_the_way_to_the_client(split: Splitter) -> None:
    gmail = next(r for r in rows() if r.label == "gmail-2020")
    conv = talk(split)
    conv.client(b'g ID ("name" "Thunderbird")\r\n')
    conv.server(gmail.data + b"g OK Success\r\n")
    assert b"51.154.214.166" not in conv.to_client
    assert b'"name" "GImap"' in conv.to_client
    assert conv.to_client.endswith(b"g OK Success\r\n")
    (rec,) = ids(conv)
    assert rec.server is not None and "remote-host" not in rec.server
    assert rec.server["name"] == "GImap"


def test_nil_is_relayed_and_recorded(split: Splitter) -> None:
    conv = talk(split)
    conv.client(b"n ID NIL\r\n").server(b"* ID NIL\r\nn OK\r\n")
    assert conv.to_server == b"n ID NIL\r\n"
    (rec,) = ids(conv)
    assert (rec.client, rec.forwarded, rec.server) == (None, None, None)


def test_log_flooding_is_bounded(split: Splitter) -> None:
    conv = talk(split)
    for i in range(15):
        conv.client(b'i%d ID ("name" "x")\r\n' % i).server(b"i%d OK\r\n" % i)
    assert len(ids(conv)) == 10
    assert len(conv.of(CommandCompleted)) == 15


def test_oversized_id_is_never_forwarded(split: Splitter) -> None:
    conv = talk(split)
    big = b"v" * 40000
    command = b'o ID ("a" {%d}\r\n%s "b" {%d+}\r\n%s)\r\n' % (len(big), big, len(big), big)
    conv.client(command + b"p NOOP\r\n")
    # Followed to its end, not kept, and replaced by `ID NIL`; the next command is found.
    assert conv.to_server == b"o ID NIL\r\n"
    assert conv.to_client.count(b"+ Ready") == 1  # ours, for the synchronizing literal
    conv.server(b"* ID NIL\r\no OK\r\n")
    assert conv.to_server == b"o ID NIL\r\np NOOP\r\n"
    conv.server(b"p OK\r\n")
    assert [v.kind for v in conv.records if isinstance(v, Violation)] == ["id_too_large"]
    assert ids(conv)[0].malformed
    assert not conv.closed


def test_id_beyond_what_can_be_skipped_ends_the_session(split: Splitter) -> None:
    conv = talk(split)
    conv.client(b'o ID ("a" {9223372036854775807+}\r\nvvvv')
    assert conv.to_server == b""
    assert conv.to_client.endswith(b"* BYE [TOOBIG] ID command too large\r\n")
    assert conv.closed == "protocol_error"


SERVER_ROWS = [r for r in rows() if r.direction == "S"]


@pytest.mark.parametrize("row", SERVER_ROWS, ids=[r.label for r in SERVER_ROWS])
@pytest.mark.parametrize("policy", ["default", "strict", "passthrough"])
def test_every_server_row_under_every_policy(row: Row, policy: str) -> None:
    chosen = resolve_policy(policy)
    outcome = apply(chosen, parse(row.args), hasher=lambda v: "hmac:test", trusted_client=True)
    conv = talk(whole, policy)
    conv.client(b'q ID ("name" "Thunderbird")\r\n').server(row.data + b"q OK\r\n")
    shown = bytes(conv.to_client[len(GREETING) :])
    if outcome.changed:
        assert (
            shown == b"* ID " + serialize(outcome.forwarded, literal_plus=False) + b"\r\nq OK\r\n"
        )
    else:
        assert shown == row.data + b"q OK\r\n"
    for secret in (b"51.154.214.166", b"cFAZvADXroRR1q9e"):
        if policy != "passthrough":
            assert secret not in shown
    (rec,) = ids(conv)
    assert rec.server == _recorded_or_none(outcome)


def _recorded_or_none(outcome: Outcome) -> dict[str, str | None] | None:
    return None if outcome.forwarded is None and not outcome.decisions else outcome.recorded


def test_client_address_fields_merge_with_inject_id(split: Splitter) -> None:
    chosen = resolve_policy("default")
    config = CoreConfig(
        policy=lambda: chosen,
        inject_id=((b"name", b"gateway"),),
        forward_client_address=True,
    )
    conv = Conversation(split, config)
    conv.core.client_endpoints = (("203.0.113.5", 40001), ("198.51.100.1", 143))
    conv.server(GREETING).client(b"a LOGIN alice x\r\n")
    assert conv.to_server == (
        b'imapveil.1 ID ("name" "gateway" "x-originating-ip" "203.0.113.5" '
        b'"x-originating-port" "40001" "x-connected-ip" "198.51.100.1" '
        b'"x-connected-port" "143" "x-session-id" "s1")\r\n'
        b"a LOGIN alice x\r\n"
    )
    conv.server(b"imapveil.1 OK\r\na NO [AUTHENTICATIONFAILED] no\r\n")
    conv.client(b"b LOGIN alice y\r\n")  # once per session
    assert conv.to_server.endswith(b"\r\na LOGIN alice x\r\nb LOGIN alice y\r\n")
    (rec,) = ids(conv)
    assert rec.client == {"name": "gateway"}  # the address is not repeated in the record
    assert conv.to_client.endswith(b"a NO [AUTHENTICATIONFAILED] no\r\n")
    assert b"imapveil.1" not in conv.to_client


def test_pipelined_ids_are_decided_one_per_answer(split: Splitter) -> None:
    """Found: deciding an ID of 30 hostile values of 1024 octets costs some 50 ms of the loop
    every session shares, and a client's IDs pipelined in one receive (256 KiB holds eight)
    were all decided in one go: half a second in which no other session was served. The
    command after an ID is now read once the server has answered the ID."""
    chosen = resolve_policy("default")
    decided: list[int] = []

    class Counting:
        name, digest = chosen.name, chosen.digest

        def apply(self, fields: Any, **kwargs: Any) -> Outcome:
            if not kwargs["trusted_client"]:  # the client's ID (the server's is trusted)
                decided.append(len(conv.to_server))
            return chosen.apply(fields, **kwargs)

    counting = Counting()
    conv = feeding.talk(split, GREETING, policy=lambda: counting, hash_value=lambda v: "h")
    conv.client(b"".join(b'i%d ID ("name" "x")\r\n' % i for i in range(3)) + b"n NOOP\r\n")
    assert len(decided) == 1 and conv.to_server == b'i0 ID ("name" "x")\r\n'
    for i in range(3):
        conv.server(b"* ID NIL\r\ni%d OK\r\n" % i)
        assert len(decided) == min(i + 2, 3)
    assert conv.to_server.endswith(b'i2 ID ("name" "x")\r\nn NOOP\r\n')
    assert not [v for v in conv.records if isinstance(v, Violation)]


def test_ids_sent_piece_by_piece_are_answered_in_turn(split: Splitter) -> None:
    """attack14: the first ID's last piece cleared the DRIVE gate, so the second was read and
    decided before the first was answered; that answer threw away the second's pieces, the
    server's "+" for them went to the client, and the server waited for a literal that never
    came (the proxy for the server). The next command is read once the ID is answered."""
    conv = talk(split, "passthrough", GREETING_NO_LITERAL_PLUS)
    conv.client(b'a ID ("x-weird" {2+}\r\n\r\n)\r\nb ID ("x-weird" {2+}\r\n\r\n)\r\nc NOOP\r\n')
    assert conv.to_server == b'a ID ("x-weird" {2}\r\n'
    conv.server(b"+ go ahead\r\n")
    assert conv.to_server == b'a ID ("x-weird" {2}\r\n\r\n)\r\n'
    conv.server(b"* ID NIL\r\na OK\r\n")
    assert conv.to_server.endswith(b'a ID ("x-weird" {2}\r\n\r\n)\r\nb ID ("x-weird" {2}\r\n')
    conv.server(b"+ go ahead\r\n")
    assert conv.to_server.endswith(b'b ID ("x-weird" {2}\r\n\r\n)\r\n')
    assert b"go ahead" not in conv.to_client
    conv.server(b"* ID NIL\r\nb OK\r\n")
    assert conv.to_server.endswith(b")\r\nc NOOP\r\n")
    conv.server(b"c OK\r\n")
    assert [r.status for r in conv.of(CommandCompleted)] == ["OK", "OK", "OK"]


def test_a_server_that_never_asks_for_a_rewritten_ids_piece_ends_the_session(
    split: Splitter,
) -> None:
    """The proxy sends a rewritten ID piece by piece, each on the server's "+": while it waits
    for one, it waits as for any literal of the client's (`literal_timeout`), not for the idle
    timeout after login (31 minutes, the client held all the while)."""
    conv = talk(split, "passthrough", GREETING_NO_LITERAL_PLUS)
    conv.client(b"L LOGIN alice x\r\n").server(b"L OK\r\n")
    conv.client(b'a ID ("name" "Mail" "x-weird" {2+}\r\n\r\n)\r\nb NOOP\r\n')
    assert conv.to_server.endswith(b'a ID ("name" "Mail" "x-weird" {2}\r\n')
    assert conv.core.idle_timeout == conv.core.config.literal_timeout
    conv.apply(conv.core.timed_out(conv.clock)).finish()
    assert b"b NOOP" not in conv.to_server
    assert (conv.ended().reason, conv.ended().detail) == (
        "literal_timeout",
        "no answer to a literal",
    )
