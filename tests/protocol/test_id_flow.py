"""The ID flow on its own terms: the policy that decides is the policy the record names."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imapveil.policy import Policy
from imapveil.policy_files import resolve_policy
from imapveil.protocol.id_params import parse, serialize
from imapveil.protocol.session import CoreConfig
from imapveil.records import IdExchange, Violation
from tests.helpers.feeding import Conversation, Splitter, splitting_at, whole

GREETING = b"* OK [CAPABILITY IMAP4rev1 LITERAL+ ID] ready\r\n"
CLIENT_ID = b'a ID ("name" "Thunderbird" "version" "115.3" "os" "Linux" "guid" "1234")\r\n'


class Holder:
    """What the service hands the core: the policy in force, which a reload replaces."""

    def __init__(self, policy: Policy) -> None:
        self.current = policy

    def __call__(self) -> Policy:
        return self.current


def test_the_record_names_the_policy_that_decided_not_the_one_in_force_at_the_answer(
    split: Splitter,
) -> None:
    strict, passthrough = resolve_policy("strict"), resolve_policy("passthrough")
    holder = Holder(strict)
    conv = Conversation(split, CoreConfig(policy=holder, hash_value=lambda v: "hmac:test"))
    conv.server(GREETING).client(CLIENT_ID)
    # Reloaded between the client's ID and the server's answer.
    holder.current = passthrough
    conv.server(b"* ID NIL\r\na OK ID completed\r\n")

    decided = strict.apply(parse(CLIENT_ID[5:]), hasher=lambda v: "hmac:test")
    expected = b"a ID " + serialize(decided.forwarded, literal_plus=False) + b"\r\n"
    assert bytes(conv.to_server) == expected  # as strict decided
    assert expected != CLIENT_ID  # (which is not what passthrough would have sent)
    (record,) = conv.of(IdExchange)
    assert isinstance(record, IdExchange)
    assert (record.policy, record.policy_digest) == (strict.name, strict.digest)
    assert record.policy != passthrough.name


# Field names a policy treats differently, and values that need quoting or a literal.
_NAMES = [
    b"name",
    b"version",
    b"os",
    b"os-version",
    b"vendor",
    b"guid",
    b"imei",
    b"x-originating-ip",
]
_VALUES = [b"Thunderbird", b"16.0 (3731.600.7)", b"35-209900-176148-1", b'say "hi"', b"back\\slash"]
values = st.sampled_from(_VALUES) | st.binary(max_size=40)


def _string(value: bytes, form: int) -> bytes:
    """A value the way a client may send it: quoted, or a literal of any kind."""
    quotable = all(0x20 <= c < 0x7F and c not in b'"\\' for c in value)
    if form == 0 and quotable:
        return b'"' + value + b'"'
    marker = (b"{%d}", b"{%d+}", b"~{%d}")[form % 3] % len(value)
    return marker + b"\r\n" + value


@st.composite
def id_commands(draw: st.DrawFn) -> bytes:
    pairs = draw(st.lists(st.tuples(st.sampled_from(_NAMES), values), max_size=6))
    if not pairs:
        return b"i1 ID NIL\r\n"
    parts = [
        _string(name, 0) + b" " + _string(value, draw(st.integers(0, 3))) for name, value in pairs
    ]
    return b"i1 ID (" + b" ".join(parts) + b")\r\n"


def _play(split: Splitter, command: bytes) -> Conversation:
    policy = resolve_policy("default")
    conv = Conversation(split, CoreConfig(policy=lambda: policy, hash_value=lambda v: "hmac:t"))
    conv.server(b"* OK [CAPABILITY IMAP4rev1 ID] ready\r\n")
    conv.client(b"a NOOP\r\n" + command + b"b NOOP\r\n")
    conv.server(b"a OK\r\n")
    while conv.to_server.endswith(b"}\r\n"):  # a rewritten ID, sent one piece per "+"
        conv.server(b"+ go on\r\n")
    conv.server(b'* ID ("name" "Dovecot")\r\ni1 OK ID completed\r\n')
    # Only now is `b NOOP` read (the ID gate) and sent: a server answers it after that.
    conv.server(b"b OK\r\n")
    return conv.finish()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command=id_commands(), cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_id_rewriting_forwards_the_same_bytes_whatever_the_chunking(
    command: bytes, cuts: list[int]
) -> None:
    reference = _play(whole, command)
    chunked = _play(splitting_at(cuts), command)
    assert chunked.to_server == reference.to_server
    assert chunked.to_client == reference.to_client
    assert [r.to_dict() for r in chunked.of(IdExchange)] == [
        r.to_dict() for r in reference.of(IdExchange)
    ]
    # The commands around the ID pass as they came, in order.
    assert reference.to_server.startswith(b"a NOOP\r\ni1 ID ")
    assert reference.to_server.endswith(b"b NOOP\r\n")


def test_an_over_long_answer_to_our_own_id_does_not_swallow_the_next_line(
    split: Splitter,
) -> None:
    # Longer than server_hold, it cannot be held back whole once it streams: what the grammar
    # would have shown instead of it (nothing) cannot apply, and must not apply to the next
    # line. (Before the core was split, it did: the client never saw its LOGIN's OK.) Since
    # round 15 such a line is refused before any of it goes out (`Responses.may_stream`):
    # the client never sees an answer to a command it did not send.
    conv = Conversation(split, CoreConfig(inject_id=((b"name", b"gateway"),)))
    conv.server(GREETING).client(b"a LOGIN alice pw\r\n")
    assert conv.to_server == b'imapveil.1 ID ("name" "gateway")\r\na LOGIN alice pw\r\n'
    conv.server(b"* ID NIL\r\nimapveil.1 OK " + b"x" * 70_000 + b"\r\n")
    conv.server(b"a OK LOGIN done\r\n")
    if conv.closed is None:  # whole, the line is no longer than what arrived: read as any
        assert conv.to_client.endswith(GREETING + b"a OK LOGIN done\r\n")
        (record,) = conv.of(IdExchange)
        assert record.injected and record.status == "OK"
    else:
        assert b"imapveil.1" not in conv.to_client
        assert conv.to_client.endswith(
            GREETING + b"* BYE [SERVERBUG] Response from the mail server not understood\r\n"
        )
        assert [v.kind for v in conv.of(Violation)] == ["response_too_long"]
