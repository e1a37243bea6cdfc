"""The session core, fed whole, byte by byte and in random chunks (the `split` fixture)."""

from __future__ import annotations

import json
from functools import partial

from imapveil.protocol.session import TURN, State
from imapveil.records import CommandCompleted, SessionEnded, Violation
from tests.helpers import feeding
from tests.helpers.feeding import Conversation, Splitter

GREETING = b"* OK [CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID IDLE AUTH=PLAIN] ready\r\n"


def named(user: bytes) -> str:
    return "user:" + user.decode()


talk = partial(feeding.talk, greeting=GREETING, identify_user=named)


def commands(conv: Conversation) -> list[CommandCompleted]:
    return conv.of(CommandCompleted)


def violations(conv: Conversation) -> list[Violation]:
    return conv.of(Violation)


def ended(conv: Conversation) -> SessionEnded:
    return conv.ended()


def test_greeting_capabilities_are_learned(split: Splitter) -> None:
    conv = talk(split)
    assert conv.to_client == GREETING
    assert {"IMAP4REV1", "LITERAL+", "SASL-IR", "IDLE"} <= conv.core.capabilities
    assert conv.core.state is State.NOT_AUTHENTICATED


def test_login_quoted_records_user_and_state(split: Splitter) -> None:
    conv = talk(split)
    conv.client(b'a1 LOGIN "alice" "pa\\"ss"\r\n')
    conv.tick(0.25)
    conv.server(b"a1 OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n")
    assert conv.to_server == b'a1 LOGIN "alice" "pa\\"ss"\r\n'
    (rec,) = commands(conv)
    assert (rec.tag, rec.verb, rec.status, rec.state) == ("a1", "LOGIN", "OK", "not_authenticated")
    assert rec.code == "CAPABILITY"
    assert rec.user == "user:alice"
    assert rec.duration_ms == 250.0
    assert conv.core.state is State.AUTHENTICATED
    assert "MOVE" in conv.core.capabilities
    assert "pa" not in json.dumps([r.to_dict() for r in conv.records])


def test_login_with_literals_waits_for_continuations(split: Splitter) -> None:
    conv = talk(split)
    conv.client(b"a LOGIN {5}\r\n")
    assert conv.to_server == b"a LOGIN {5}\r\n"
    # Anything the client sends before "+" is held: the server has not agreed to it yet.
    conv.client(b"alice {9}\r\n")
    assert conv.to_server == b"a LOGIN {5}\r\n"
    conv.server(b"+ Ready for literal\r\n")
    assert conv.to_server == b"a LOGIN {5}\r\nalice {9}\r\n"
    conv.client(b"s3cr3t!!!\r\n")
    assert conv.to_server.endswith(b"alice {9}\r\n")  # still waiting for the second "+"
    conv.server(b"+ go\r\n")
    conv.server(b"a OK Logged in\r\n")
    assert conv.to_server == b"a LOGIN {5}\r\nalice {9}\r\ns3cr3t!!!\r\n"
    (rec,) = commands(conv)
    assert rec.user == "user:alice"
    assert rec.literals == (5, 9)
    assert conv.core.state is State.AUTHENTICATED
    everything = json.dumps([r.to_dict() for r in conv.records]) + repr(conv.core)
    assert "s3cr3t" not in everything


def test_refused_synchronizing_literal_is_not_expected(split: Splitter) -> None:
    conv = talk(split)
    conv.client(b"a LOGIN alice x\r\n").server(b"a OK done\r\n")
    conv.client(b"b APPEND NoSuch {10}\r\n")
    conv.server(b"b NO [TRYCREATE] No such mailbox\r\n")
    # The client does not send the 10 octets; its next line is a command again.
    conv.client(b"c NOOP\r\n").server(b"c OK NOOP done\r\n")
    recs = commands(conv)
    assert [(r.tag, r.verb, r.status, r.code) for r in recs] == [
        ("a", "LOGIN", "OK", None),
        ("b", "APPEND", "NO", "TRYCREATE"),
        ("c", "NOOP", "OK", None),
    ]
    assert conv.to_server == b"a LOGIN alice x\r\nb APPEND NoSuch {10}\r\nc NOOP\r\n"


def test_non_synchronizing_literal_body_is_not_parsed(split: Splitter) -> None:
    conv = talk(split)
    conv.client(b"a LOGIN alice x\r\n").server(b"a OK done\r\n")
    body = b"Subject: x\r\n\r\nz LOGOUT\r\nb NOOP {3}\r\n"
    msg = b"b APPEND INBOX (\\Seen) {%d+}\r\n%s\r\n" % (len(body), body)
    conv.client(msg)
    # Toward the server the literal is synchronizing: nothing of it goes before the "+".
    announced = b"b APPEND INBOX (\\Seen) {%d}\r\n" % len(body)
    assert conv.to_server.endswith(announced)
    assert not conv.core.wants_client_data  # the shell stops reading the client meanwhile
    conv.server(b"+ OK\r\n")
    assert b"+ OK" not in conv.to_client  # a LITERAL+ client waits for no "+"
    conv.server(b"b OK [APPENDUID 1 7] Append completed\r\n")
    assert conv.to_server.endswith(announced + body + b"\r\n")
    recs = commands(conv)
    assert [(r.verb, r.literals) for r in recs] == [("LOGIN", ()), ("APPEND", (len(body),))]
    assert not violations(conv)


def test_server_literal_bodies_are_not_parsed(split: Splitter) -> None:
    conv = talk(split)
    conv.client(b"a LOGIN alice x\r\n").server(b"a OK done\r\n")
    conv.client(b"b SELECT INBOX\r\n").server(b"* 1 EXISTS\r\nb OK [READ-WRITE] Selected\r\n")
    conv.client(b"c FETCH 1 (BODY[] BINARY[1])\r\n")
    body = b"c OK fake completion inside a message\r\n* BYE not really\r\n"
    server = (
        b"* 1 FETCH (UID 4 BODY[] {%d}\r\n%s BINARY[1] ~{3}\r\n\x00\x01\x02)\r\n"
        b"* 2 EXISTS\r\nc OK Fetch completed\r\n" % (len(body), body)
    )
    conv.server(server)
    assert conv.to_client.endswith(server)
    recs = commands(conv)
    assert [(r.tag, r.status) for r in recs] == [("a", "OK"), ("b", "OK"), ("c", "OK")]
    assert conv.core.state is State.SELECTED
    assert conv.core.mailbox == b"INBOX"
    assert not violations(conv)


def test_authenticate_plain_multi_step(split: Splitter) -> None:
    conv = talk(split)
    conv.client(b"a AUTHENTICATE PLAIN\r\n")
    conv.server(b"+ \r\n")
    # base64("\0alice\0hunter2")
    conv.client(b"AGFsaWNlAGh1bnRlcjI=\r\n")
    conv.server(b"a OK [CAPABILITY IMAP4rev1] Logged in\r\n")
    (rec,) = commands(conv)
    assert (rec.verb, rec.mechanism, rec.user, rec.status) == (
        "AUTHENTICATE",
        "PLAIN",
        "user:alice",
        "OK",
    )
    assert conv.core.state is State.AUTHENTICATED
    dump = json.dumps([r.to_dict() for r in conv.records]) + repr(conv.core)
    assert "hunter2" not in dump
    assert "AGFsaWNl" not in dump


def test_authenticate_sasl_ir_and_a_command_after_it(split: Splitter) -> None:
    conv = talk(split)
    conv.client(b"a AUTHENTICATE PLAIN AGFsaWNlAGh1bnRlcjI=\r\n")
    conv.server(b"a OK Logged in\r\n")
    conv.client(b"b SELECT {5}\r\n").server(b"+ OK\r\n").client(b"INBOX\r\n")
    conv.server(b"b OK [READ-WRITE] Selected\r\n")
    recs = commands(conv)
    assert recs[0].user == "user:alice"
    assert recs[1].verb == "SELECT"
    assert conv.core.mailbox == b"INBOX"
    assert conv.core.state is State.SELECTED


def test_authenticate_login_mechanism_two_steps(split: Splitter) -> None:
    conv = talk(split)
    conv.client(b"a AUTHENTICATE LOGIN\r\n").server(b"+ VXNlcm5hbWU6\r\n")
    conv.client(b"Ym9i\r\n").server(b"+ UGFzc3dvcmQ6\r\n")
    conv.client(b"c2VjcmV0cGFzcw==\r\n").server(b"a OK Logged in\r\n")
    (rec,) = commands(conv)
    assert rec.user == "user:bob"
    assert conv.to_server == b"a AUTHENTICATE LOGIN\r\nYm9i\r\nc2VjcmV0cGFzcw==\r\n"


def test_authenticate_cancelled_with_star(split: Splitter) -> None:
    conv = talk(split)
    conv.client(b"a AUTHENTICATE PLAIN\r\n").server(b"+ \r\n")
    conv.client(b"*\r\n").server(b"a BAD Authentication aborted by client\r\n")
    conv.client(b"b NOOP\r\n").server(b"b OK\r\n")
    assert [(r.verb, r.status) for r in commands(conv)] == [
        ("AUTHENTICATE", "BAD"),
        ("NOOP", "OK"),
    ]
    assert conv.core.state is State.NOT_AUTHENTICATED


def test_idle_done(split: Splitter) -> None:
    conv = talk(split)
    conv.client(b"a LOGIN alice x\r\n").server(b"a OK\r\n")
    conv.client(b"b IDLE\r\n").server(b"+ idling\r\n* 3 EXISTS\r\n* 1 RECENT\r\n")
    conv.client(b"DONE\r\n").server(b"b OK Idle completed (0.001 + 3.1 secs).\r\n")
    conv.client(b"c LOGOUT\r\n").server(b"* BYE Logging out\r\nc OK Logout completed.\r\n")
    conv.server_closes()
    assert [(r.verb, r.status) for r in commands(conv)] == [
        ("LOGIN", "OK"),
        ("IDLE", "OK"),
        ("LOGOUT", "OK"),
    ]
    assert not violations(conv)
    end = ended(conv)
    assert (end.reason, end.state, end.commands) == ("logout", "logout", 3)
    assert end.user == "user:alice"


def test_idle_refused_leaves_command_mode(split: Splitter) -> None:
    conv = talk(split)
    conv.client(b"b IDLE\r\n").server(b"b BAD Not authenticated\r\n")
    conv.client(b"c NOOP\r\n").server(b"c OK\r\n")
    assert [(r.verb, r.status) for r in commands(conv)] == [("IDLE", "BAD"), ("NOOP", "OK")]


def test_pipelined_commands_complete_out_of_order(split: Splitter) -> None:
    conv = talk(split)
    conv.client(b"a LOGIN alice x\r\n").server(b"a OK\r\n")
    conv.client(b"1 NOOP\r\n2 STATUS INBOX (MESSAGES)\r\n3 UID FETCH 1:* FLAGS\r\n")
    conv.server(b"* STATUS INBOX (MESSAGES 2)\r\n2 OK\r\n3 NO [SERVERBUG] x\r\n1 OK\r\n")
    recs = commands(conv)[1:]
    assert [(r.tag, r.verb, r.status) for r in recs] == [
        ("2", "STATUS", "OK"),
        ("3", "UID FETCH", "NO"),
        ("1", "NOOP", "OK"),
    ]
    assert recs[1].code == "SERVERBUG"


def test_select_failure_and_close(split: Splitter) -> None:
    conv = talk(split)
    conv.client(b"a LOGIN alice x\r\n").server(b"a OK\r\n")
    conv.client(b'b SELECT "Sent Items"\r\n').server(b"b OK [READ-WRITE] ok\r\n")
    assert (conv.core.state, conv.core.mailbox) == (State.SELECTED, b"Sent Items")
    conv.client(b"c SELECT Nope\r\n").server(b"c NO [NONEXISTENT] Unknown\r\n")
    assert (conv.core.state, conv.core.mailbox) == (State.AUTHENTICATED, None)
    conv.client(b"d EXAMINE INBOX\r\n").server(b"d OK [READ-ONLY] ok\r\n")
    conv.client(b"e CLOSE\r\n").server(b"e OK\r\n")
    assert (conv.core.state, conv.core.mailbox) == (State.AUTHENTICATED, None)
    assert [r.state for r in commands(conv)] == [
        "not_authenticated",
        "authenticated",
        "selected",
        "authenticated",
        "selected",
    ]


def test_preauth_greeting(split: Splitter) -> None:
    conv = Conversation(split).server(b"* PREAUTH [CAPABILITY IMAP4rev1] hi\r\n")
    assert conv.core.state is State.AUTHENTICATED
    assert "IMAP4REV1" in conv.core.capabilities


def test_bye_greeting_then_close(split: Splitter) -> None:
    conv = Conversation(split).server(b"* BYE [UNAVAILABLE] Too many connections\r\n")
    conv.server_closes()
    assert ended(conv).reason == "server_bye"
    assert conv.closed == "server_closed"


def test_capability_response_updates(split: Splitter) -> None:
    conv = talk(split)
    conv.client(b"a CAPABILITY\r\n")
    conv.server(b"* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\na OK\r\n")
    assert conv.core.capabilities == frozenset({"IMAP4REV1", "STARTTLS", "LOGINDISABLED"})


def test_line_too_long_gets_bye_after_forwarded_bytes(split: Splitter) -> None:
    conv = talk(split, max_line=1024)
    conv.client(b"a NOOP\r\n")
    conv.client(b"b SEARCH " + b"X" * 2000 + b"\r\n")
    assert conv.to_server == b"a NOOP\r\n"
    assert conv.to_client.endswith(b"* BYE [TOOBIG] Command line too long (limit 1024 octets)\r\n")
    assert conv.closed == "protocol_error"
    assert [v.kind for v in violations(conv)] == ["line_too_long"]
    conv.finish()
    assert ended(conv).reason == "line_too_long"
    # Nothing is buffered beyond the limit.
    assert len(conv.core._client.buf) <= 1024


def test_literal_length_with_too_many_digits(split: Splitter) -> None:
    conv = talk(split)
    conv.client(b"a APPEND INBOX {123456789012345678901}\r\n")
    assert conv.to_server == b""
    assert conv.closed == "protocol_error"
    assert b"* BYE" in conv.to_client
    assert [v.kind for v in violations(conv)] == ["bad_literal"]


def test_client_talking_while_it_must_wait_is_bounded(split: Splitter) -> None:
    conv = talk(split, max_held=100)
    conv.client(b"a APPEND INBOX {500}\r\n")
    conv.client(b"x" * 500 + b"\r\n")
    assert conv.to_server == b"a APPEND INBOX {500}\r\n"
    assert conv.closed == "protocol_error"
    assert [v.kind for v in violations(conv)] == ["sent_while_waiting"]


def test_long_server_lines_stream_through(split: Splitter) -> None:
    conv = talk(split, server_hold=1000)
    conv.client(b"a LOGIN alice x\r\n").server(b"a OK\r\n")
    conv.client(b"b SELECT INBOX\r\n").server(b"b OK\r\n")
    conv.client(b"c SEARCH ALL\r\n")
    search = b"* SEARCH " + b" ".join(b"%d" % i for i in range(1, 20000)) + b"\r\n"
    conv.server(search + b"c OK Search done\r\n")
    assert conv.to_client.endswith(search + b"c OK Search done\r\n")
    assert commands(conv)[-1].status == "OK"
    assert len(conv.core._server.buf) <= 1000
    assert not conv.closed


def test_long_tagged_line_still_completes(split: Splitter) -> None:
    conv = talk(split, server_hold=100)
    conv.client(b"a NOOP\r\n").server(b"a OK " + b"t" * 500 + b"\r\n")
    assert [(r.tag, r.status) for r in commands(conv)] == [("a", "OK")]


def test_literal_announced_at_end_of_long_server_line(split: Splitter) -> None:
    conv = talk(split, server_hold=100)
    conv.client(b"a LOGIN alice x\r\n").server(b"a OK\r\n")
    conv.client(b"b FETCH 1 BODY[]\r\n")
    data = b"* 1 FETCH (X-GM-LABELS (" + b"l " * 200 + b") BODY[] {13}\r\nb OK inside\r\n)\r\n"
    conv.server(data + b"b OK done\r\n")
    assert [(r.tag, r.status) for r in commands(conv)][-1] == ("b", "OK")
    assert not violations(conv)


def test_unknown_server_tag_ends_the_session(split: Splitter) -> None:
    conv = talk(split)
    conv.server(b"zz OK nobody asked\r\n")
    assert [(v.kind, v.action) for v in violations(conv)] == [("unknown_tag", "closed")]
    assert (
        conv.to_client
        == GREETING + b"* BYE [SERVERBUG] Response from the mail server not understood\r\n"
    )
    assert conv.closed == "protocol_error"


def test_unreadable_client_lines_are_refused_not_forwarded(split: Splitter) -> None:
    conv = talk(split)
    conv.client(b"\r\n(((\r\nb NOOP (\r\na NOOP\r\n").server(b"a OK\r\n")
    assert conv.to_server == b"a NOOP\r\n"
    assert conv.to_client[len(GREETING) :] == (
        b"* BAD [CLIENTBUG] Command not understood by the proxy\r\n" * 2
        + b"b BAD [CLIENTBUG] Command not understood by the proxy\r\n"
        + b"a OK\r\n"
    )
    assert [v.kind for v in violations(conv)] == [
        "refused_tag",
        "refused_tag",
        "refused_unbalanced_list",
    ]
    assert [(r.verb, r.status) for r in commands(conv)] == [("NOOP", "BAD"), ("NOOP", "OK")]


def test_client_closes_mid_literal(split: Splitter) -> None:
    conv = talk(split)
    conv.client(b"a APPEND INBOX {100+}\r\nhalf")
    conv.client_closes()
    end = ended(conv)
    assert (end.reason, end.detail) == ("client_closed", "mid_literal")
    # The unanswered command is still recorded, with no status.
    (rec,) = commands(conv)
    assert (rec.verb, rec.status, rec.duration_ms) == ("APPEND", None, None)


def test_upstream_unavailable(split: Splitter) -> None:
    conv = Conversation(split)
    conv.apply(conv.core.upstream_unavailable("connection refused", conv.clock)).finish()
    assert conv.to_client == b"* BYE [UNAVAILABLE] Mail server is not reachable\r\n"
    assert conv.closed == "upstream_unavailable"
    end = ended(conv)
    assert (end.reason, end.detail) == ("upstream_unavailable", "connection refused")


def test_timeout_mid_server_literal_does_not_inject_bye(split: Splitter) -> None:
    conv = talk(split)
    conv.client(b"a LOGIN alice x\r\n").server(b"a OK\r\n")
    conv.client(b"b FETCH 1 BODY[]\r\n").server(b"* 1 FETCH (BODY[] {100}\r\npartial")
    conv.apply(conv.core.timed_out(conv.clock))
    assert b"BYE" not in conv.to_client
    assert conv.closed == "idle_timeout"


def test_timeout_at_boundary_says_bye(split: Splitter) -> None:
    conv = talk(split)
    assert conv.core.idle_timeout == 60.0
    conv.client(b"a LOGIN alice x\r\n").server(b"a OK\r\n")
    assert conv.core.idle_timeout == 31 * 60.0
    conv.apply(conv.core.timed_out(conv.clock)).finish()
    assert conv.to_client.endswith(b"* BYE Disconnected for inactivity\r\n")
    assert ended(conv).reason == "idle_timeout"


def test_session_end_counts_bytes(split: Splitter) -> None:
    conv = talk(split)
    conv.client(b"a NOOP\r\n").server(b"a OK\r\n").tick(2.0)
    conv.client_closes()
    end = ended(conv)
    assert end.bytes_from_client == 8
    assert end.bytes_from_server == len(GREETING) + 6
    assert end.duration_ms == 2000.0
    assert conv.core.finish(conv.clock) == []  # the end record is written once


def test_login_deadline_counts_from_the_connection(split: Splitter) -> None:
    conv = talk(split, login_deadline=180.0, idle_timeout_login=60.0)
    start = conv.core.started
    # A client trickling one octet every 20 s keeps pushing the idle deadline back, but not the
    # login deadline.
    for _ in range(8):
        conv.tick(20)
        conv.client(b"a")
        assert conv.core.deadline(conv.clock) == min(conv.clock + 60.0, start + 180.0)
    conv.tick(30)
    conv.apply(conv.core.timed_out(conv.clock)).finish()
    assert conv.to_client.endswith(b"* BYE Login time limit reached\r\n")
    end = ended(conv)
    assert (end.reason, end.detail) == ("login_timeout", "not logged in within 180 s")


def test_no_login_deadline_after_login(split: Splitter) -> None:
    conv = talk(split, login_deadline=180.0, idle_timeout=1800.0)
    conv.client(b"a LOGIN alice x\r\n").server(b"a OK\r\n")
    conv.tick(500)
    assert conv.core.deadline(conv.clock) == conv.clock + 1800.0


def test_after_a_bye_the_session_waits_no_longer_than_before_login(split: Splitter) -> None:
    """A BYE moves the state to logout: the server is about to close. If it does not, the
    session waits no longer than before login (`idle_timeout_login`), not the half hour of a
    logged-in session: whether the BYE came before login (in place of a LOGIN's answer) or
    after (a LOGOUT answered). Found attacking the one-match BYE (attack8)."""
    before = talk(split, idle_timeout_login=60.0, idle_timeout=1800.0)
    before.server(b"* BYE going away\r\n")
    assert before.core.deadline(before.clock) == before.clock + 60.0
    after = talk(split, idle_timeout_login=60.0, idle_timeout=1800.0)
    after.client(b"a LOGIN alice x\r\n").server(b"a OK\r\n")
    assert after.core.deadline(after.clock) == after.clock + 1800.0
    after.client(b"b LOGOUT\r\n").server(b"* BYE bye\r\nb OK\r\n")
    assert after.core.deadline(after.clock) == after.clock + 60.0


def test_a_password_sent_after_a_refused_login_is_never_read(split: Splitter) -> None:
    # The LOGIN is refused (an 8-bit atom) before its synchronizing literal: a client that sends
    # the password anyway must not have it read as a command (its first word a record's tag).
    conv = talk(split)
    conv.client(b"a LOGIN \x85alice {11}\r\nPW-1 secret\r\nb NOOP\r\n")
    assert conv.to_server == b""
    assert conv.to_client[len(GREETING) :] == (
        b"a BAD [CLIENTBUG] Command not understood by the proxy\r\n"
        b"* BYE Command not understood by the proxy\r\n"
    )
    assert conv.closed == "protocol_error"
    assert b"PW-1" not in json.dumps([r.to_dict() for r in conv.records]).encode()


def test_a_tag_reused_before_its_answer_pairs_answers_with_commands_in_order(
    split: Splitter,
) -> None:
    """A client may (wrongly, but Dovecot answers it) reuse a tag before the answer: each
    tagged answer completes the oldest command with that tag, and what is still waiting when
    the session ends is recorded unanswered, in order."""
    conv = talk(split)
    conv.client(b"a LOGIN alice pw\r\n")
    conv.server(b"a OK Logged in\r\n")
    conv.client(b't NOOP\r\nt CHECK\r\nu NOOP\r\nt STATUS INBOX (MESSAGES)\r\nt LSUB "" *\r\n')
    conv.server(b"t OK first\r\nu OK other\r\nt NO second\r\n")
    done = [(r.tag, r.verb, r.status) for r in commands(conv)]
    assert done == [
        ("a", "LOGIN", "OK"),
        ("t", "NOOP", "OK"),
        ("u", "NOOP", "OK"),
        ("t", "CHECK", "NO"),
    ]
    conv.server(b"t BAD third\r\n")
    third = commands(conv)[-1]
    assert (third.tag, third.verb, third.status) == ("t", "STATUS", "BAD")
    conv.client_closes()
    last = commands(conv)[-1]
    assert (last.tag, last.verb, last.status, last.duration_ms) == ("t", "LSUB", None, None)
    assert not violations(conv)


def test_message_octets_do_not_end_a_servers_turn() -> None:
    """A session's turn (`session.TURN`) bounds what its lines cost the event loop; literal
    octets are counted, never read, and cost nothing per octet. A receive of a FETCH of ordinary
    messages (20 KiB each, a line and a literal a message) is read in one turn: were their octets
    counted, a turn would end every three messages, each a checkpoint and no splice meanwhile."""
    conv = talk(feeding.whole)
    conv.client(b"a LOGIN alice x\r\n").server(b"a OK\r\n")
    conv.client(b"b FETCH 1:12 BODY[]\r\n")
    body = b"x" * (20 * 1024)
    messages = b"".join(
        b"* %d FETCH (BODY[] {%d}\r\n%s)\r\n" % (i, len(body), body) for i in range(1, 13)
    )
    assert len(messages) > 3 * TURN
    actions = conv.core.feed_server(messages + b"b OK\r\n", conv.clock)
    assert not conv.core.server_backlog
    conv._apply(actions)
    assert conv.to_client.endswith(b")\r\nb OK\r\n")
