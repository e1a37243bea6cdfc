"""Attack round 16 in the core: text that ends like a literal announcement where no literal can
be. A status response's text (resp-text) and a continuation's are text, never a literal: the
proxy shows them as they came and reads the octets after them as the lines they are (here a
`* ID` the policy must see). Dovecot echoes a client's mailbox names into such texts
(`NO Mailbox doesn't exist: x {5}`); a hostile server writes what it likes.

A status word run into what follows (`* OK[ALERT] x {54}`) was read as a response of another
kind, `OK[ALERT`, whose literal the proxy counted and passed unread; a client reads `OK` and then
text (Python's imaplib, and parsers that end an atom at `[`), so the octets were lines to it: an
ID past the policy. A response kind is followed by a space or the line's end; one that is not
cannot be read: the session ends (`* BYE [SERVERBUG]`)."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imapveil.policy_files import resolve_policy
from imapveil.protocol.framer import ESCAPED, INSIDE, OUTSIDE, quote_state
from imapveil.records import CommandCompleted, Violation
from tests.helpers import feeding
from tests.helpers.feeding import Conversation, Splitter

GREETING = b"* OK [CAPABILITY IMAP4rev1 LITERAL+ ID IDLE] ready\r\n"
BYE = b"* BYE [SERVERBUG] Response from the mail server not understood\r\n"
DEFAULT = resolve_policy("default")
UUID = b"0a1b2c3d-1111-2222-3333-444455556666"
HIDDEN = b'* ID ("name" "Dovecot" "guid" "' + UUID + b'")\r\n'
"""What the octets after a `{N}` are: an ID whose guid the default policy drops."""
N = len(HIDDEN)

talk = partial(feeding.talk, greeting=GREETING, policy=lambda: DEFAULT)


def filtered() -> bytes:
    """What the client is shown of HIDDEN read as a line: the policy's ID (no guid)."""
    conv = logged_in(feeding.whole)
    conv.client(b"b NOOP\r\n")
    before = len(conv.to_client)
    conv.server(HIDDEN)
    shown = bytes(conv.to_client[before:])
    assert shown.startswith(b'* ID ("name" "Dovecot"') and UUID not in shown
    return shown


def logged_in(split: Splitter, **config: Any) -> Conversation:
    conv = talk(split, **config)
    conv.client(b"a LOGIN alice secret\r\n").server(b"a OK in\r\n")
    return conv


def kinds(conv: Conversation) -> list[tuple[str, str, str]]:
    return [(v.source, v.kind, v.action) for v in conv.of(Violation)]


# Lines whose text ends like a literal announcement; none announces one.
TEXTS = {
    "ok": b"* OK x {%d}" % N,
    "no": b"* NO Mailbox doesn't exist: x {%d}" % N,
    "bad": b"* BAD x {%d}" % N,
    "code": b"* OK [ALERT] {%d}" % N,
    "lower": b"* ok x {%d}" % N,
    "plus": b"* OK x {%d+}" % N,
    "binary": b"* NO x ~{%d}" % N,
    "zero": b"* OK x {0}",
    "tagged-no": b"b NO Mailbox doesn't exist: x {%d}" % N,
    "tagged-bad": b"b BAD x {%d}" % N,
    "tagged-code": b"b OK [READ-WRITE] {%d}" % N,
    "continuation": b"+ x {%d}" % N,
}


@pytest.mark.parametrize("name", list(TEXTS))
def test_a_status_text_ending_like_a_literal_announces_none(split: Splitter, name: str) -> None:
    conv = logged_in(split)
    conv.client(b"b NOOP\r\nc NOOP\r\n")
    before = bytes(conv.to_client)
    text = TEXTS[name] + b"\r\n"
    tagged = text.startswith(b"b ")
    conv.server(text + HIDDEN + (b"c OK\r\n" if tagged else b"b OK\r\nc OK\r\n"))
    # The text as it came; the next line read as the line it is (the ID filtered), the
    # answers after it too: the proxy's framing is the server's.
    shown = bytes(conv.to_client[len(before) :])
    assert shown == text + filtered() + (b"c OK\r\n" if tagged else b"b OK\r\nc OK\r\n")
    assert UUID not in conv.to_client
    assert not conv.closed and not conv.of(Violation)
    answers = [(r.tag, r.status) for r in conv.of(CommandCompleted)][1:]
    status = {"tagged-no": "NO", "tagged-bad": "BAD"}.get(name, "OK")
    assert answers == [("b", status), ("c", "OK")]
    # The next command goes as it came, and its answer too.
    conv.client(b"d NOOP\r\n").server(b"d OK\r\n")
    assert conv.to_server.endswith(b"d NOOP\r\n")
    assert conv.to_client.endswith(b"d OK\r\n")


@pytest.mark.parametrize("greeting", [b"* OK hello {%d}\r\n" % N, b"* PREAUTH hi {%d}\r\n" % N])
def test_a_greeting_ending_like_a_literal_announces_none(split: Splitter, greeting: bytes) -> None:
    conv = talk(split, greeting=None)
    conv.server(greeting + HIDDEN)
    assert bytes(conv.to_client) == greeting + filtered()
    assert not conv.closed and not conv.of(Violation)


# A status word (or another kind) run into what follows it: no response the proxy can read.
RUN_ON = {
    "ok-code": b"* OK[ALERT] x {%d}" % N,  # was: kind `OK[ALERT`, literal counted
    "bye-code": b"* BYE[x] {%d}" % N,  # was: the same
    "no-brace": b"* NO{%d}" % N,  # was: a status, its text `{N}`: a client may differ
    "ok-paren": b"* OK(x {%d}" % N,
    "capability": b"* CAPABILITY[x] {%d}" % N,  # was: kind `CAPABILITY[x`, literal counted
    "id": b"* ID[ {%d}" % N,  # was: the same
    "other": b"* FOO[1] {%d}" % N,
    # Python's imaplib reads a kind as `[A-Z-]+`: `X` here, and no text, so no literal.
    "digit-in-kind": b"* X1 {%d}" % N,
    "underscore-in-kind": b"* X_Y {%d}" % N,
    "message-data-kind": b"* 1 FETCH1 {%d}" % N,
    "message-data-bracket": b"* 1[ {%d}" % N,
}


@pytest.mark.parametrize("name", list(RUN_ON))
def test_a_response_kind_run_into_its_text_ends_the_session(split: Splitter, name: str) -> None:
    conv = logged_in(split)
    conv.client(b"b NOOP\r\n")
    before = bytes(conv.to_client)
    conv.server(b"* 3 EXISTS\r\n" + RUN_ON[name] + b"\r\n" + HIDDEN + b"b OK\r\n")
    assert bytes(conv.to_client) == before + b"* 3 EXISTS\r\n" + BYE
    assert UUID not in conv.to_client
    assert conv.closed == "protocol_error"
    assert kinds(conv) == [("server", "unparsable_response", "closed")]
    conv.finish()
    (*_, noop) = conv.of(CommandCompleted)
    assert (noop.tag, noop.status) == ("b", None)


@pytest.mark.parametrize("kind", [b"OK[ALERT]", b"ID[", b"X1", b"1 FETCH1"])
def test_a_long_response_kind_run_into_its_text_ends_the_session(
    split: Splitter, kind: bytes
) -> None:
    """Longer than the proxy holds: it was streamed, and its literal counted at its end."""
    conv = logged_in(split, server_hold=100)
    conv.client(b"b NOOP\r\n")
    before = bytes(conv.to_client)
    line = b"* " + kind + b" " + b"x" * 500 + b" {%d}\r\n" % N
    conv.server(line[:300]).server(line[300:] + HIDDEN + b"b OK\r\n")
    assert bytes(conv.to_client) == before + BYE
    assert UUID not in conv.to_client
    assert kinds(conv) == [("server", "response_too_long", "closed")]


@pytest.mark.parametrize(
    "greeting",
    [b"* OK[x] hi {%d}\r\n" % N, b"* OKAY hi\r\n", b"* PREAUTHORIZED\r\n", b"* BYEBYE\r\n"],
)
def test_a_greeting_that_only_starts_like_one_lets_nothing_of_the_clients_through(
    split: Splitter, greeting: bytes
) -> None:
    """The greeting's word was read as its first octets: `* OKAY` was a greeting, the client's
    LOGIN (sent before it, held) released to a server that never greeted like IMAP."""
    conv = talk(split, greeting=None)
    conv.client(b"a LOGIN alice secret\r\n")
    conv.server(greeting + HIDDEN)
    assert bytes(conv.to_client) == b"* BYE [UNAVAILABLE] Mail server is not reachable\r\n"
    assert conv.to_server == b""
    assert conv.closed == "upstream_unavailable"


# Kinds that are well formed pass as before: a client reads them as the proxy does.
WELL_FORMED = {
    "unknown-kind": b"* OKAY x {%d}\r\n" % N,
    "data": b"* SEARCH {%d}\r\n" % N,
    "extension": b"* X-GM-THING {%d}\r\n" % N,
    "message-data": b"* 12 FETCH (BODY[] {%d}\r\n" % N,
    "message-data-lower": b"* 12 fetch (BODY[] {%d}\r\n" % N,
}


@pytest.mark.parametrize("name", list(WELL_FORMED))
def test_well_formed_kinds_with_a_literal_still_pass(split: Splitter, name: str) -> None:
    """A literal where the kind's grammar has one: a client reads it as one, and so the octets
    in it are no ID line to it (the proxy passes them unread)."""
    conv = logged_in(split)
    conv.client(b"b NOOP\r\n")
    before = bytes(conv.to_client)
    answers = WELL_FORMED[name] + HIDDEN + b"\r\nb OK\r\n"
    conv.server(answers)
    assert bytes(conv.to_client) == before + answers
    assert not conv.closed and not conv.of(Violation)


# --- A literal announced inside a quoted string.

SMUGGLED = b'")\r\n' + HIDDEN + b"* 2 FETCH (Y "
"""The octets after `{N}`: to a client that reads the quoted string on across the line's end
(K-9 Mail's parser reads a quoted string until its closing quote, CRLF or not), the string
ends at their first octet and HIDDEN is a line; to the proxy they were a literal."""

OPEN_QUOTE = {
    "open": b'* 1 FETCH (X "a {%d}\r\n',
    "escaped-quote": b'* 1 FETCH (X "a\\" {%d}\r\n',
    "second-string": b'* 1 FETCH (X "a" Y "b {%d}\r\n',
}


@pytest.mark.parametrize("name", list(OPEN_QUOTE))
def test_a_literal_announced_inside_a_quoted_string_ends_the_session(
    split: Splitter, name: str
) -> None:
    """Before round 16 the proxy counted the literal and passed its octets unread: HIDDEN
    reached such a client as an ID response, past the policy."""
    conv = logged_in(split)
    conv.client(b"b FETCH 1 X\r\n")
    before = bytes(conv.to_client)
    first = OPEN_QUOTE[name] % len(SMUGGLED)
    conv.server(b"* 3 EXISTS\r\n" + first + SMUGGLED + b"NIL)\r\nb OK\r\n")
    assert bytes(conv.to_client) == before + b"* 3 EXISTS\r\n" + BYE
    assert UUID not in conv.to_client
    assert kinds(conv) == [("server", "bad_literal", "closed")]


CLOSED_QUOTE = {
    "closed": b'* 1 FETCH (X "a {5}" BODY[] {%d}\r\n',
    "escaped-backslash": b'* 1 FETCH (X "a\\\\" BODY[] {%d}\r\n',
    "escaped-quote-closed": b'* 1 FETCH (X "a\\" {5}" BODY[] {%d}\r\n',
    "flag": b"* 1 FETCH (FLAGS (\\Seen) BODY[] {%d}\r\n",
}


@pytest.mark.parametrize("name", list(CLOSED_QUOTE))
def test_a_literal_after_closed_quoted_strings_still_passes(split: Splitter, name: str) -> None:
    conv = logged_in(split)
    conv.client(b"b FETCH 1 X\r\n")
    before = bytes(conv.to_client)
    answers = CLOSED_QUOTE[name] % len(HIDDEN) + HIDDEN + b")\r\nb OK\r\n"
    conv.server(answers)
    assert bytes(conv.to_client) == before + answers  # the literal passed unread
    assert not conv.closed and not conv.of(Violation)


def test_a_server_id_with_a_literal_inside_a_quoted_string_goes_out_as_nil(
    split: Splitter,
) -> None:
    """Collected whole and never shown as it came (the policy cannot parse it): nothing of
    it reaches the client to be read either way."""
    conv = logged_in(split)
    conv.client(b'i ID ("name" "Thunderbird")\r\n')
    before = bytes(conv.to_client)
    conv.server(b'* ID ("name" "a {%d}\r\n' % len(SMUGGLED) + SMUGGLED + b"NIL)\r\ni OK\r\n")
    assert bytes(conv.to_client) == before + b"* ID NIL\r\ni OK\r\n"
    assert kinds(conv) == [("server", "malformed_id", "replaced")]


LONG_QUOTED = b'x\\"y\\\\' * 100  # escapes: a quote and a backslash, never the string's end


@pytest.mark.parametrize("close", [False, True])
def test_a_long_line_with_a_literal_inside_a_quoted_string_ends_the_session(
    split: Splitter, close: bool
) -> None:
    """Longer than the proxy holds: it streams, and only its tail was read for the literal.
    The client has the line (so no BYE): the session closes before the literal's octets."""
    conv = logged_in(split, server_hold=100)
    conv.client(b"b FETCH 1 X\r\n")
    before = bytes(conv.to_client)
    line = b'* 1 FETCH (X "' + LONG_QUOTED + (b'" BODY[] {%d}\r\n' if close else b" {%d}\r\n")
    # Its first 300 octets come without a line end: more than the proxy holds.
    if close:
        answers = line % len(HIDDEN) + HIDDEN + b")\r\nb OK\r\n"
        conv.server(answers[:300]).server(answers[300:])
        assert bytes(conv.to_client) == before + answers  # the control: the literal passed
        assert not conv.closed and not conv.of(Violation)
        return
    answers = line % len(SMUGGLED) + SMUGGLED + b"NIL)\r\nb OK\r\n"
    conv.server(answers[:300]).server(answers[300:])
    assert bytes(conv.to_client) == before + line % len(SMUGGLED)
    assert UUID not in conv.to_client
    assert conv.closed == "protocol_error"
    assert kinds(conv) == [("server", "bad_literal", "closed")]


QUOTING = b'ab{ "\\'
"""Octets that matter to quoted strings, and two that do not."""


def reference_quote_state(data: bytes) -> int:
    """An octet at a time: what `quote_state` computes with patterns."""
    state = OUTSIDE
    for c in data:
        if state == ESCAPED:
            state = INSIDE
        elif state == INSIDE:
            state = ESCAPED if c == 0x5C else OUTSIDE if c == 0x22 else INSIDE
        elif c == 0x22:
            state = INSIDE
    return state


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40).map(lambda b: bytes(QUOTING[x % 6] for x in b)), st.data())
def test_the_quote_state_of_a_streaming_line_is_the_same_however_it_comes(
    data: bytes, draw: st.DataObject
) -> None:
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(data)), max_size=4)))
    state, pos = OUTSIDE, 0
    for cut in [*cuts, len(data)]:
        state = quote_state(state, data, pos, cut)
        pos = cut
    assert state == reference_quote_state(data) == quote_state(OUTSIDE, data, 0, len(data))
