"""The ID flow on its own terms: the policy that decides is the policy the record names."""

from __future__ import annotations

from imapveil.policy import Policy
from imapveil.policy_files import resolve_policy
from imapveil.protocol.id_params import parse, serialize
from imapveil.protocol.session import CoreConfig
from imapveil.records import IdExchange
from tests.helpers.feeding import Conversation, Splitter

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
