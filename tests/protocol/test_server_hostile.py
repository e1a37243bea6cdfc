"""Attack round 15 in the core: the server's bytes are the attack (a misbehaving or compromised
upstream, or Dovecot echoing the client's bytes). What the proxy cannot read of the server's
stream is never forwarded as it came: the client is told `* BYE [SERVERBUG]` where a line of its
own can go (at a response boundary), both legs close, and a violation record says what kind of
line it was (never its octets). Commands in flight get their records without a status."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import pytest

from imapveil.policy.load import parse_policy
from imapveil.policy_files import resolve_policy
from imapveil.protocol import lexer
from imapveil.records import CommandCompleted, IdExchange, Violation
from tests.helpers import feeding
from tests.helpers.feeding import Conversation, Splitter

GREETING = b"* OK [CAPABILITY IMAP4rev1 LITERAL+ ID IDLE] ready\r\n"
BYE = b"* BYE [SERVERBUG] Response from the mail server not understood\r\n"
DEFAULT = resolve_policy("default")

talk = partial(feeding.talk, greeting=GREETING)


def logged_in(split: Splitter, **config: Any) -> Conversation:
    conv = talk(split, **config)
    conv.client(b"a LOGIN alice secret\r\n").server(b"a OK in\r\n")
    return conv


def kinds(conv: Conversation) -> list[tuple[str, str, str]]:
    return [(v.source, v.kind, v.action) for v in conv.of(Violation)]


def closed_with_bye(conv: Conversation, before: bytes, kind: str) -> None:
    """The client got what came before the unreadable line, then the BYE, and nothing more."""
    assert bytes(conv.to_client) == before + BYE
    assert conv.closed == "protocol_error"
    assert kinds(conv) == [("server", kind, "closed")]
    conv.finish()
    assert conv.ended().reason == "protocol_error"


UNREADABLE = {
    "tagged-preauth": b"b PREAUTH now\r\n",
    "tagged-bye": b"b BYE going\r\n",
    "tagged-other-status": b"b MAYBE\r\n",
    "tag-alone": b"b\r\n",
    "empty-line": b"\r\n",
    "bare-lf": b"\n",
    "paren": b")\r\n",
    "star-no-space": b"*\r\n",
    "nul-in-tag": b"b\x00 OK\r\n",
    "space-first": b" b OK\r\n",
}


@pytest.mark.parametrize("name", list(UNREADABLE))
def test_an_unreadable_server_line_ends_the_session(split: Splitter, name: str) -> None:
    conv = logged_in(split)
    conv.client(b"b NOOP\r\n")
    before = bytes(conv.to_client)
    conv.server(b"* 3 EXISTS\r\n" + UNREADABLE[name] + b"b OK done\r\nc OK more\r\n")
    closed_with_bye(conv, before + b"* 3 EXISTS\r\n", "unparsable_response")
    # The command in flight has its record, without a status: no answer the proxy could read.
    (*_, noop) = conv.of(CommandCompleted)
    assert (noop.tag, noop.status) == ("b", None)


def test_an_answer_to_a_tag_never_sent_ends_the_session(split: Splitter) -> None:
    conv = logged_in(split)
    conv.client(b"b NOOP\r\n")
    before = bytes(conv.to_client)
    conv.server(b"zz OK nobody asked\r\nb OK done\r\n")
    closed_with_bye(conv, before, "unknown_tag")


def test_a_second_answer_to_a_command_ends_the_session(split: Splitter) -> None:
    conv = logged_in(split)
    conv.client(b"b NOOP\r\n")
    conv.server(b"b OK done\r\n")
    before = bytes(conv.to_client)
    conv.server(b"b OK again\r\n")
    closed_with_bye(conv, before, "unknown_tag")


def test_an_answer_to_an_id_the_proxy_has_not_sent_ends_the_session(split: Splitter) -> None:
    """The ID is collected before it goes out: a server that answers it meanwhile answers a
    command it never received (it would otherwise hold the client behind the ID's gate, whose
    command is gone, until the idle timeout)."""
    conv = logged_in(split, policy=lambda: DEFAULT)
    conv.client(b'c ID ("name" {3}\r\n')
    assert conv.to_client.endswith(b"+ Ready for literal data\r\n")
    before = bytes(conv.to_client)
    conv.server(b"c OK ID completed\r\n")
    closed_with_bye(conv, before, "unknown_tag")
    assert conv.to_server == b"a LOGIN alice secret\r\n"


def test_the_injected_id_answered_twice_ends_the_session(split: Splitter) -> None:
    conv = talk(split, inject_id=((b"name", b"gateway"),), policy=lambda: DEFAULT)
    conv.client(b"a LOGIN alice secret\r\n")
    assert conv.to_server.startswith(b"imapveil.1 ID (")
    conv.server(b"* ID NIL\r\nimapveil.1 OK\r\na OK in\r\n")
    before = bytes(conv.to_client)
    assert before == GREETING + b"a OK in\r\n"
    conv.server(b"imapveil.1 OK\r\n")
    closed_with_bye(conv, before, "unknown_tag")


def test_well_formed_answers_still_pass(split: Splitter) -> None:
    """The control: statuses, a reused tag answered twice, untagged kinds the proxy does not
    know, BYE then the answer."""
    conv = logged_in(split)
    conv.client(b"b NOOP\r\nb NOOP\r\nc NOOP\r\n")
    answers = b"* FOO bar\r\nb OK\r\nb NO\r\n* OK [ALERT] x\r\n* BYE later\r\nc BAD\r\n"
    conv.server(answers)
    assert conv.to_client.endswith(answers)
    assert not conv.closed and not conv.of(Violation)


# --- Literals the server announces.


def test_a_server_literal_too_large_ends_the_session_before_its_line(split: Splitter) -> None:
    conv = logged_in(split)
    conv.client(b"b FETCH 1 BODY[]\r\n")
    before = bytes(conv.to_client)
    conv.server(b"* 2 EXISTS\r\n* 1 FETCH (BODY[] {99999999999999999999}\r\n+ OK\r\nb OK\r\n")
    closed_with_bye(conv, before + b"* 2 EXISTS\r\n", "bad_literal")


@pytest.mark.parametrize("first", [b"* 1 FETCH (BODY[] ", b'* LIST () "/" '])
def test_a_server_literal_of_too_many_digits_ends_the_session(
    split: Splitter, first: bytes
) -> None:
    conv = logged_in(split)
    conv.client(b"b FETCH 1 BODY[]\r\n")
    before = bytes(conv.to_client)
    conv.server(first + b"{123456789012345678901}\r\nb OK\r\n")
    closed_with_bye(conv, before, "bad_literal")


@pytest.mark.parametrize("marker", [b"{%d+}", b"~{%d+}"])
def test_a_non_synchronizing_literal_from_the_server_ends_the_session(
    split: Splitter, marker: bytes
) -> None:
    """RFC 9051 §4.3: a server never sends `{N+}`, and a client's parser need not read one as
    a literal (Python's imaplib does not): the octets the proxy counted and passed unread were
    lines to such a client, here an ID past the policy."""
    conv = logged_in(split, policy=lambda: DEFAULT)
    conv.client(b"b FETCH 1 BODY[]\r\n")
    before = bytes(conv.to_client)
    hidden = b'* ID ("name" "Dovecot" "guid" "' + UUID + b'")\r\n'
    conv.server(b"* 1 FETCH (BODY[] " + marker % len(hidden) + b"\r\n" + hidden + b")\r\nb OK\r\n")
    closed_with_bye(conv, before, "bad_literal")
    assert UUID not in conv.to_client


def test_a_bad_literal_inside_a_response_closes_without_a_bye(split: Splitter) -> None:
    """After a literal the client is inside the response: a line of the proxy's own would be
    read as part of it. The connection closes, with the record."""
    conv = logged_in(split)
    conv.client(b"b FETCH 1 BODY[]\r\n")
    start = b"* 1 FETCH (BODY[1] {3}\r\nabc"
    conv.server(start + b" BODY[2] {99999999999999999999}\r\nb OK\r\n")
    assert conv.to_client.endswith(start)
    assert b"BYE" not in conv.to_client
    assert conv.closed == "protocol_error"
    assert kinds(conv) == [("server", "bad_literal", "closed")]


@pytest.mark.parametrize("strict", [False, True])
def test_a_capability_list_announcing_a_literal_ends_the_session(
    split: Splitter, strict: bool
) -> None:
    """Capabilities are atoms (no `{`). The list is rewritten for the client's leg (`{N}` moved
    or dropped), so the client read as lines the octets the proxy counted as a literal and
    passed unread: here an ID past the policy."""
    conv = logged_in(split, policy=lambda: DEFAULT, strict_capabilities=strict)
    conv.client(b"b CAPABILITY\r\n")
    before = bytes(conv.to_client)
    hidden = b'* ID ("name" "Dovecot" "guid" "' + UUID + b'")\r\n'
    conv.server(b"* CAPABILITY IMAP4rev1 X {%d}\r\n" % len(hidden) + hidden + b"b OK\r\n")
    closed_with_bye(conv, before, "unparsable_response")
    assert UUID not in conv.to_client


# --- Lines longer than the proxy holds (`server_hold`): streamed, unless their fate is not
# "as they came".


LONG = b"x" * 500

LONG_REFUSED = {
    "capability-code": b"b OK [CAPABILITY IMAP4rev1 STARTTLS " + LONG + b"] done\r\n",
    "untagged-capability-code": b"* OK [CAPABILITY IMAP4rev1 STARTTLS " + LONG + b"] hi\r\n",
    "capability": b"* CAPABILITY IMAP4rev1 STARTTLS COMPRESS=DEFLATE " + LONG + b"\r\n",
    "id": b'* ID ("name" "Dovecot" "guid" "' + LONG + b'")\r\n',
    "unknown-tag": b"zz OK " + LONG + b"\r\n",
    "bad-status": b"b PREAUTH " + LONG + b"\r\n",
    "continuation": b"+ " + LONG + b"\r\n",
}


@pytest.mark.parametrize("name", list(LONG_REFUSED))
def test_a_long_line_the_proxy_must_read_is_refused(split: Splitter, name: str) -> None:
    conv = logged_in(split, server_hold=100)
    conv.client(b"b NOOP\r\n")
    before = bytes(conv.to_client)
    line = LONG_REFUSED[name]
    # Its first 300 octets come without a line end: more than the proxy holds (whole, a line
    # longer than that is read as any other).
    conv.server(b"* 4 EXISTS\r\n" + line[:300]).server(line[300:] + b"b OK\r\n")
    closed_with_bye(conv, before + b"* 4 EXISTS\r\n", "response_too_long")


def test_a_long_continuation_for_a_hidden_literal_is_refused(split: Splitter) -> None:
    """The client sent {3+}: the server's "+" to the proxy's {3} is never the client's to see."""
    conv = logged_in(split, server_hold=100)
    conv.client(b"b APPEND INBOX {3+}\r\nabc\r\n")
    assert conv.to_server.endswith(b"b APPEND INBOX {3}\r\n")
    before = bytes(conv.to_client)
    conv.server(b"+ " + LONG[:300]).server(LONG[300:] + b"\r\n")
    closed_with_bye(conv, before, "response_too_long")
    assert conv.to_server.endswith(b"b APPEND INBOX {3}\r\n")


def test_long_lines_the_proxy_need_not_rewrite_still_stream(split: Splitter) -> None:
    conv = logged_in(split, server_hold=100)
    conv.client(b"b SEARCH ALL\r\n")
    answers = (
        b"* SEARCH " + b" ".join(b"%d" % i for i in range(1, 300)) + b"\r\n"
        b"* OK [ALERT] " + LONG + b"\r\n"
        b"* 1 FETCH (BODY[] {3}\r\nabc " + LONG + b")\r\n"
        b"b NO " + LONG + b"\r\n"
    )
    conv.server(answers)
    assert conv.to_client.endswith(answers)
    assert not conv.closed and not conv.of(Violation)
    assert conv.of(CommandCompleted)[-1].status == "NO"


# --- The server's ID, on its way to the client and into the records.


def id_session(split: Splitter, policy: object = DEFAULT) -> Conversation:
    conv = logged_in(split, policy=lambda: policy, hash_value=lambda v: "hmac:test")
    conv.client(b'i ID ("name" "Thunderbird")\r\n')
    return conv


def test_a_malformed_server_id_goes_to_the_client_as_nil(split: Splitter) -> None:
    conv = id_session(split)
    before = bytes(conv.to_client)
    conv.server(b'* ID ("name" "Dovecot" "guid" "0123456789abcdef0123456789abcdef"\r\ni OK\r\n')
    assert bytes(conv.to_client) == before + b"* ID NIL\r\ni OK\r\n"
    assert kinds(conv) == [("server", "malformed_id", "replaced")]
    (rec,) = conv.of(IdExchange)
    assert rec.server is None


KEEP_ALL = parse_policy(
    b'name = "keep-all"\ndefault = { forward = "keep", record = "drop" }\n'
    b'detectors = ["uuid"]\ndetected = { forward = "drop", record = "drop" }\n',
    "keep-all.toml",
)


def test_a_rewritten_server_id_that_needs_a_literal_is_sent_with_one(split: Splitter) -> None:
    """The policy drops a field, and a value it keeps has 8-bit octets (a quoted string may
    carry them from the server; the proxy writes them as a literal): the line must not go out
    as it came, with the dropped field."""
    conv = id_session(split, KEEP_ALL)
    uuid = b"0a1b2c3d-1111-2222-3333-444455556666"
    conv.server(b'* ID ("name" "D\xc3\xb6vecot" "guid" "' + uuid + b'")\r\ni OK\r\n')
    assert uuid not in conv.to_client
    assert b'* ID ("name" {8}\r\nD\xc3\xb6vecot "x-imapveil" "imapveil ' in conv.to_client
    assert conv.to_client.endswith(b")\r\ni OK\r\n")
    assert uuid.decode() not in json.dumps([r.to_dict() for r in conv.records])
    assert not conv.closed


UUID = b"0a1b2c3d-1111-2222-3333-444455556666"


def test_a_server_id_with_a_literal_passes_the_policy(split: Splitter) -> None:
    """A `* ID` whose values come as literals (Dovecot writes an 8-bit `imap_id_send` value so)
    is collected whole, nothing of it forwarded meanwhile, then filtered like any other."""
    conv = id_session(split)
    before = bytes(conv.to_client)
    conv.server(b'* ID ("name" "Dovecot" "guid" {36}\r\n' + UUID[:10])
    assert bytes(conv.to_client) == before
    assert conv.core.server_literal_left() == 0  # never spliced past the core
    conv.server(UUID[10:] + b")\r\ni OK\r\n")
    shown = bytes(conv.to_client[len(before) :])
    assert shown.startswith(b'* ID ("name" "Dovecot" "x-imapveil" "imapveil ')
    assert shown.endswith(b")\r\ni OK\r\n")
    assert UUID not in conv.to_client
    assert UUID.decode() not in json.dumps([r.to_dict() for r in conv.records])
    (rec,) = conv.of(IdExchange)
    assert rec.server == {"name": "Dovecot"}
    assert not conv.closed and not conv.of(Violation)


def test_a_server_id_with_a_literal_is_relayed_as_it_came_when_unchanged(split: Splitter) -> None:
    conv = id_session(split, resolve_policy("passthrough"))
    answer = b'* ID ("name" {8}\r\nD\xc3\xb6vecot "os" ~{5}\r\nLinux)\r\n'
    conv.server(answer + b"i OK\r\n")
    assert conv.to_client.endswith(answer + b"i OK\r\n")
    assert not conv.closed and not conv.of(Violation)


def test_a_server_id_too_large_to_collect_ends_the_session(split: Splitter) -> None:
    conv = id_session(split)
    before = bytes(conv.to_client)
    conv.server(b'* ID ("name" {70000}\r\n' + b"v" * 1000)
    closed_with_bye(conv, before, "id_too_large")


def test_a_bad_literal_in_a_server_id_ends_the_session(split: Splitter) -> None:
    conv = id_session(split)
    before = bytes(conv.to_client)
    conv.server(b'* ID ("a" {1}\r\nx "b" {123456789012345678901}\r\nzzz')
    closed_with_bye(conv, before, "bad_literal")


def test_a_non_synchronizing_literal_in_a_server_id_ends_the_session(split: Splitter) -> None:
    conv = id_session(split)
    before = bytes(conv.to_client)
    conv.server(b'* ID ("name" {7+}\r\nDovecot)\r\ni OK\r\n')
    closed_with_bye(conv, before, "bad_literal")


def test_a_long_line_in_a_server_id_ends_the_session(split: Splitter) -> None:
    conv = logged_in(split, policy=lambda: DEFAULT, server_hold=100)
    conv.client(b'i ID ("name" "Thunderbird")\r\n')
    before = bytes(conv.to_client)
    conv.server(b'* ID ("a" {1}\r\nx "b" "' + LONG[:300]).server(LONG[300:] + b'")\r\n')
    closed_with_bye(conv, before, "response_too_long")
    assert b"x" not in conv.to_client[len(before) :]


def test_without_a_policy_a_server_id_with_a_literal_is_relayed(split: Splitter) -> None:
    conv = logged_in(split)
    conv.client(b'i ID ("name" "Thunderbird")\r\n')
    answer = b'* ID ("name" {7}\r\nDovecot)\r\ni OK\r\n'
    conv.server(answer)
    assert conv.to_client.endswith(answer)
    assert not conv.closed and not conv.of(Violation)


class Counting:
    """The default policy, counting the ID lists it is asked to decide."""

    def __init__(self) -> None:
        self.calls = 0
        self.name = DEFAULT.name
        self.digest = DEFAULT.digest

    def apply(self, fields: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return DEFAULT.apply(fields, **kwargs)


HOSTILE_ID = b'* ID ("name" "Dovecot" "guid" "' + UUID + b'")\r\n'


def test_the_server_id_is_examined_once_per_answer(split: Splitter) -> None:
    """Deciding an ID list costs up to milliseconds of the loop every session shares (30 values
    of 1024 octets: ~4 ms). The client's IDs are decided one per server answer (the ID gate);
    a server's `* ID` lines were each decided, as many as it sent: a flood of them stalled
    every session. One is decided per tagged answer now; any other goes out as `* ID NIL`,
    unexamined."""
    counting = Counting()
    conv = logged_in(split, policy=lambda: counting, hash_value=lambda v: "hmac:test")
    conv.client(b'i ID ("name" "Thunderbird")\r\n')
    assert counting.calls == 1  # the client's
    before = bytes(conv.to_client)
    conv.server(HOSTILE_ID * 5 + b"i OK\r\n" + HOSTILE_ID * 3)
    assert counting.calls == 3  # and the server's first before `i OK`, and after it
    shown = bytes(conv.to_client[len(before) :])
    assert shown.startswith(b'* ID ("name" "Dovecot" "x-imapveil" "imapveil ')
    assert shown.endswith(b")\r\n" + b"* ID NIL\r\n" * 2)
    assert shown.count(b"* ID NIL\r\n") == 6 and shown.count(b"x-imapveil") == 2
    assert UUID not in conv.to_client
    assert [(v.kind, v.action) for v in conv.of(Violation)] == [("unexpected_id", "replaced")] * 6
    (rec,) = conv.of(IdExchange)
    assert rec.server == {"name": "Dovecot"}
    assert not conv.closed


def test_the_answer_to_the_proxys_own_id_is_examined_once(split: Splitter) -> None:
    counting = Counting()
    conv = talk(split, inject_id=((b"name", b"gateway"),), policy=lambda: counting)
    conv.client(b"a LOGIN alice secret\r\n")
    conv.server(HOSTILE_ID * 4 + b"imapveil.1 OK\r\na OK in\r\n")
    assert counting.calls == 1
    assert bytes(conv.to_client) == GREETING + b"a OK in\r\n"
    assert [(v.kind, v.action) for v in conv.of(Violation)] == [("unexpected_id", "dropped")] * 3


def test_an_unreadable_line_while_closing_after_owed_words(split: Splitter) -> None:
    """Shutting down mid-response owes the client a BYE at the next boundary; an unreadable
    line there ends the session with that BYE, and nothing after the close."""
    conv = logged_in(split)
    conv.client(b"b FETCH 1 BODY[]\r\n").server(b"* 1 FETCH (BODY[] {5}\r\nab")
    conv.apply(conv.core.shutting_down(conv.clock))
    assert conv.core.closed is False
    conv.server(b"cde)\r\n)\r\nb OK\r\n")
    assert conv.to_client.endswith(b"cde)\r\n* BYE [UNAVAILABLE] Server shutting down\r\n")
    assert conv.core.closed
    # Read in the receive that ended the response, or never (closed at the boundary before).
    assert [(v.kind, v.action) for v in conv.of(Violation)] in (
        [],
        [("unparsable_response", "closed")],
    )


# --- What a server's answer puts in the records.


def test_a_response_code_outside_the_registry_is_recorded_as_other(split: Splitter) -> None:
    """A command record keeps its answer's response code: an atom of the server's choosing, up
    to 64 octets, so a server could write a password or an identifier into the event log
    (`L NO [PW-HUNTER2]`). Codes of the IANA registry (and Dovecot's) are kept, any other is
    `OTHER`."""
    conv = talk(split)
    conv.client(b"L LOGIN alice hunter2\r\n").server(b"L NO [HUNTER2] no\r\n")
    conv.client(b"a SELECT x\r\n").server(b"a NO [TRYCREATE] no\r\n")
    conv.client(b"b SELECT x\r\n").server(b"b NO [" + UUID + b"] no\r\n")
    conv.client(b"c NOOP\r\n").server(b"c OK [uidvalidity 3] fine\r\n")
    codes = [(r.tag, r.code) for r in conv.of(CommandCompleted)]
    assert codes == [("L", "OTHER"), ("a", "TRYCREATE"), ("b", "OTHER"), ("c", "UIDVALIDITY")]
    dump = json.dumps([r.to_dict() for r in conv.records])
    assert "HUNTER2" not in dump.upper() and UUID.decode().upper() not in dump.upper()


def test_what_a_long_capability_list_leaves_kept_is_bounded(split: Splitter) -> None:
    """The server's capabilities are kept for the session (a set of names; the traits record
    reads LITERAL+ and LITERAL- in it). A list of 64 KB of distinct names (Dovecot's has 40)
    left a set of 16,000 names, 1.6 MB, in every session of that server. The first
    `MAX_CAPABILITIES` names are kept; the whole list is still mediated for the client."""
    names = [b"X%04d" % i for i in range(10_000)]
    line = b"* CAPABILITY IMAP4rev1 " + b" ".join(names) + b" STARTTLS LITERAL+\r\n"
    conv = logged_in(split, client_tls="offer")
    conv.client(b"b CAPABILITY\r\n").server(line + b"b OK\r\n")
    assert len(conv.core.capabilities) <= 256
    assert lexer.MAX_CAPABILITIES == 256
    assert "IMAP4REV1" in conv.core.capabilities
    assert b"STARTTLS" not in conv.to_client[-300:]  # mediated: not after login
    assert conv.to_client.endswith(b"X9999 LITERAL+\r\nb OK\r\n")


# --- A CR that ends no line.

BARE_CR = {
    "tagged": b"b OK x\r" + HOSTILE_ID,
    "status": b"* OK x\r" + HOSTILE_ID,
    "data": b"* 1 FETCH (FLAGS ())\r" + HOSTILE_ID,
    "data-after-data": b"* 1 FETCH (FLAGS ())\r\n* 2 FETCH (FLAGS ())\r" + HOSTILE_ID,
    "search": b"* SEARCH 1\r" + HOSTILE_ID,
    "cr-cr-then-more": b"* SEARCH 1\r\r" + HOSTILE_ID,
}


@pytest.mark.parametrize("name", list(BARE_CR))
def test_a_bare_cr_in_a_server_line_ends_the_session(split: Splitter, name: str) -> None:
    """A CR not followed by LF is no line end to the proxy, and is one to a client that ends
    lines at a CR (Java's BufferedReader.readLine does): `b OK x` CR `* ID (...)` was one
    tagged line to the proxy and an ID past the policy to such a client. IMAP allows no bare
    CR outside literals (Dovecot writes one only in a literal)."""
    conv = logged_in(split, policy=lambda: DEFAULT)
    conv.client(b"b FETCH 1 FLAGS\r\n")
    before = bytes(conv.to_client)
    conv.server(b"* 3 EXISTS\r\n" + BARE_CR[name] + b"b OK\r\n")
    shown = bytes(conv.to_client[len(before) :])
    assert UUID not in shown
    shown_first = b"* 3 EXISTS\r\n"
    if name == "data-after-data":
        shown_first += b"* 1 FETCH (FLAGS ())\r\n"
    closed_with_bye(conv, before + shown_first, "unparsable_response")


def test_a_bare_cr_after_a_literal_closes_without_a_bye(split: Splitter) -> None:
    conv = logged_in(split, policy=lambda: DEFAULT)
    conv.client(b"b FETCH 1 BODY[]\r\n")
    conv.server(b"* 1 FETCH (BODY[] {3}\r\nabc\r" + HOSTILE_ID + b"b OK\r\n")
    assert conv.to_client.endswith(b"{3}\r\nabc")
    assert conv.closed == "protocol_error"
    assert [(v.kind, v.action) for v in conv.of(Violation)] == [("unparsable_response", "closed")]


def test_a_cr_inside_a_literal_is_the_literals(split: Splitter) -> None:
    conv = logged_in(split)
    conv.client(b"b FETCH 1 BODY[]\r\n")
    # And CRs just before the LF: empty lines at most to a client that ends lines at a CR.
    answer = b"* 1 FETCH (BODY[] {7}\r\na\rb\rc\r\r)\r\r\n* 2 EXISTS\r\r\r\nb OK\r\n"
    conv.server(answer)
    assert conv.to_client.endswith(answer)
    assert not conv.closed and not conv.of(Violation)


@pytest.mark.parametrize("cut", [150, 300, 301])
def test_a_bare_cr_in_a_long_line_stops_it_there(split: Splitter, cut: int) -> None:
    """A line longer than the proxy holds streams out: a bare CR found before it starts
    streaming refuses it whole (a BYE), one found while it streams stops it there (the client
    has its start: no BYE). Whatever the cuts, nothing after the CR goes out; `cut` 300 puts
    the CR last in the first piece, and the next piece goes on without LF."""
    conv = logged_in(split, policy=lambda: DEFAULT, server_hold=100)
    conv.client(b"b SEARCH ALL\r\n")
    line = b"* SEARCH " + b"1 " * 200
    line = line[:cut] + b"\r" + HOSTILE_ID
    before = bytes(conv.to_client)
    conv.server(line[: cut + 1]).server(line[cut + 1 :] + b"b OK\r\n")
    shown = bytes(conv.to_client[len(before) :])
    assert UUID not in shown and b"* ID" not in shown
    assert conv.closed == "protocol_error"
    assert [(v.kind, v.action) for v in conv.of(Violation)] == [("unparsable_response", "closed")]
    assert shown in (BYE, line[: len(shown)])  # a BYE, or the line's start, up to the CR
