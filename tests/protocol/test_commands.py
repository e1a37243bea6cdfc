"""The command grammar and the outbox on their own, without the session's scan loops: what a
line's fate is, which gate it sets, what the proxy owes the client and when it pays."""

from __future__ import annotations

from typing import Any

from imapveil.policy_files import resolve_policy
from imapveil.protocol.actions import Close, Direction, Emit, Forward, Reply
from imapveil.protocol.client_leg import ClientLeg
from imapveil.protocol.command import State
from imapveil.protocol.commands import Commands, Gate, Mode, Verdict
from imapveil.protocol.config import CoreConfig
from imapveil.protocol.framer import ClientFramer, ServerFramer, Use
from imapveil.protocol.id_flow import IdFlow
from imapveil.protocol.outbox import Outbox
from imapveil.records import CommandCompleted, Violation


class Parts:
    def __init__(self, **config: Any) -> None:
        self.config = CoreConfig(**config)
        self.server = ServerFramer(self.config.server_hold)
        self.client = ClientFramer(self.config.max_line)
        self.out = Outbox(self.config, "s1", 0.0, self.server)
        self.ids = IdFlow(self.config, self.out, trusted_client=False, endpoints=None)
        self.leg = ClientLeg(self.config, self.out, secure=False)
        self.commands = Commands(self.config, self.out, self.client, self.ids, self.leg)
        self.commands.clear_gate()  # greeted


def test_a_plain_command_is_relayed_and_completed() -> None:
    p = Parts()
    assert p.commands.line(b"a LOGIN alice secret\r\n") is Verdict.RELAY
    assert p.commands.gate is None and b"a" in p.commands.pending
    p.commands.answered(b"a", "OK", None)
    assert p.commands.state is State.AUTHENTICATED
    (done,) = [a.record for a in p.out.actions if isinstance(a, Emit)]
    assert isinstance(done, CommandCompleted) and done.status == "OK"


def test_commands_sharing_a_tag_are_answered_in_the_order_they_were_sent() -> None:
    p = Parts()
    for line in (b"a NOOP\r\n", b"a CHECK\r\n", b"b NOOP\r\n", b"a LOGOUT\r\n"):
        assert p.commands.line(line) is Verdict.RELAY
    for tag, status in ((b"a", "OK"), (b"b", "OK"), (b"a", "NO"), (b"a", "BAD")):
        p.commands.answered(tag, status, None)
    assert not p.commands.pending
    done = [a.record for a in p.out.actions if isinstance(a, Emit)]
    assert [(r.tag, r.verb, r.status) for r in done if isinstance(r, CommandCompleted)] == [
        ("a", "NOOP", "OK"), ("b", "NOOP", "OK"), ("a", "CHECK", "NO"), ("a", "LOGOUT", "BAD"),
    ]  # fmt: skip
    # One answer too many answers no command: the server's stream is not followed past it
    # (`Responses.unreadable`, tests/protocol/test_server_hostile.py).
    assert not p.commands.answers(b"a") and not p.commands.answers(b"b")


def test_a_non_synchronizing_literal_goes_out_synchronizing_and_waits() -> None:
    p = Parts()
    assert p.commands.line(b"a APPEND box {5+}\r\n") == b"a APPEND box {5}\r\n"
    assert p.commands.gate is Gate.LITERAL
    # The server's "+" answers our {5}: the client, which sent {5+}, is not shown it.
    assert p.commands.continuation() == b""
    assert p.commands.gate is None
    assert (p.client.literal_left, p.client.use) == (5, Use.PASS)


def test_a_literal_the_server_did_not_ask_for_is_skipped() -> None:
    p = Parts()
    p.commands.line(b"a APPEND box {5+}\r\n")
    p.commands.answered(b"a", "NO", None)  # instead of "+"
    assert p.commands.gate is None and p.commands.mode is Mode.DISCARD
    assert (p.client.literal_left, p.client.use) == (5, Use.SKIP)


def test_a_synchronizing_literal_waits_for_the_servers_plus_and_the_client_sees_it() -> None:
    p = Parts()
    assert p.commands.line(b"a LOGIN {5}\r\n") is Verdict.RELAY
    assert p.commands.continuation() is None  # the client's own "+"
    assert p.client.literal_left == 5 and p.client.kept is not None  # the user name is kept


def test_an_unreadable_command_is_refused_with_a_bad_owed_to_the_client() -> None:
    p = Parts()
    assert p.commands.line(b"a FETCH (\x00)\r\n") is Verdict.WITHHOLD
    replies = [a.data for a in p.out.actions if isinstance(a, Reply)]
    assert replies == [b"a BAD [CLIENTBUG] Command not understood by the proxy\r\n"]
    assert any(isinstance(a, Emit) and isinstance(a.record, Violation) for a in p.out.actions)
    assert not p.commands.pending


def test_idle_accepts_only_done() -> None:
    p = Parts()
    p.commands.line(b"i IDLE\r\n")
    assert p.commands.gate is Gate.IDLE
    p.commands.continuation()
    assert p.commands.mode is Mode.IDLING
    assert p.commands.line(b"NOOP\r\n") is Verdict.STOP
    assert any(isinstance(a, Close) for a in p.out.actions)


def test_starttls_is_answered_by_the_leg() -> None:
    p = Parts(client_tls="offer")
    assert p.commands.line(b"t STARTTLS\r\n") is Verdict.WITHHOLD
    assert p.leg.secure and p.leg.discard_rest == "starttls"
    assert not p.leg.may_read_on(12)  # what came after our OK, before the handshake


def test_the_outbox_pays_what_is_owed_only_between_responses() -> None:
    p = Parts()
    p.server.literal(10)  # the server is in the middle of a literal
    p.out.owe(b"+ Ready for literal data\r\n")
    assert not p.out.actions
    p.server.literal_left = 0
    p.server.no_literal()
    p.out.pay_owed()
    assert p.out.actions == [Reply(Direction.TO_CLIENT, b"+ Ready for literal data\r\n")]


def test_the_outbox_closes_after_what_is_owed() -> None:
    p = Parts()
    p.out.close_after_owed(b"* BYE enough\r\n")
    p.out.pay_owed()
    assert [type(a) for a in p.out.actions] == [Reply, Close]
    assert p.out.end_reason == "protocol_error" and p.out.closed
    assert p.out.close("again") == []


def test_an_id_is_collected_and_sent_whole() -> None:
    policy = resolve_policy("passthrough")
    p = Parts(policy=lambda: policy)
    assert p.commands.line(b'x ID ("name" {3}\r\n') is Verdict.WITHHOLD
    assert p.ids.collecting is not None and p.client.use is Use.TAKE
    # The proxy said "+" itself: the line is not forwarded until the command is whole.
    assert [a.data for a in p.out.actions if isinstance(a, Reply)] == [
        b"+ Ready for literal data\r\n"
    ]
    p.ids.collecting.add(b"Foo")
    p.client.literal_left = 0
    p.commands.literal_done()
    assert p.commands.line(b")\r\n") is Verdict.WITHHOLD
    sent = b"".join(bytes(a.data) for a in p.out.actions if isinstance(a, Forward))
    assert sent == b'x ID ("name" "Foo")\r\n'
