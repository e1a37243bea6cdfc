"""Round 16: reloads (SIGHUP) while sessions hold something — an ID waiting for its decision or
half received, a literal on its way to the server, IDLE — and reloads that find a file broken.

The rule under attack: a reload never loses or corrupts a byte of a running session; an ID
decided after it follows the new policy, one decided before keeps its record honestly; a file
it cannot read is refused, said, and the configuration in force stays."""

from __future__ import annotations

import pytest

from imapveil.policy import Policy
from imapveil.policy_files import resolve_policy
from imapveil.protocol.session import CoreConfig
from imapveil.records import IdExchange
from tests.helpers.feeding import SPLITTERS, Conversation, Splitter

GREETING = b"* OK [CAPABILITY IMAP4rev1 LITERAL+ ID] ready\r\n"


class Holder:
    """What the service hands the core: the policy in force, which a reload replaces."""

    def __init__(self, policy: Policy) -> None:
        self.current = policy

    def __call__(self) -> Policy:
        return self.current


# --- The exchange a reload falls into: client's ID decided, server's `* ID` not come yet.


@pytest.mark.parametrize("split", SPLITTERS.values(), ids=SPLITTERS.keys())
def test_the_server_s_id_is_decided_by_the_policy_the_record_names(split: Splitter) -> None:
    """Found: the client's ID was decided by the policy in force when it was complete (and the
    record names that one), but the server's `* ID` by the one in force when it came: a reload
    in between (a slow server) let a policy the record does not name decide what of the
    server's ID the client saw and the record kept. Here strict decided the client's ID; the
    server's serial number was then shown to the client and recorded, as passthrough would,
    in a record saying strict."""
    strict, passthrough = resolve_policy("strict"), resolve_policy("passthrough")
    holder = Holder(strict)
    conv = Conversation(split, CoreConfig(policy=holder, hash_value=lambda v: "hmac:test"))
    conv.server(GREETING).client(b'a ID ("name" "Thunderbird" "guid" "1234")\r\n')
    holder.current = passthrough  # reloaded while the server takes its time
    conv.server(b'* ID ("name" "Dovecot" "x-serial" "SN-778899")\r\na OK ID completed\r\n')
    assert b"SN-778899" not in conv.to_client  # strict forwards no field
    (record,) = conv.of(IdExchange)
    assert isinstance(record, IdExchange)
    assert (record.policy, record.policy_digest) == (strict.name, strict.digest)
    assert record.server == {"name": "Dovecot"}  # strict records name, not x-serial
    # And after the exchange, the new policy: the next ID is passthrough's.
    conv.client(b'b ID ("name" "Thunderbird" "guid" "1234")\r\n')
    conv.server(b'* ID ("name" "Dovecot" "x-serial" "SN-778899")\r\nb OK ID completed\r\n')
    assert b"SN-778899" in conv.to_client
    assert conv.of(IdExchange)[1].policy == passthrough.name


def test_the_answer_to_the_proxy_s_own_id_is_decided_by_the_policy_it_went_out_under() -> None:
    """The same for the ID the proxy sends itself before LOGIN (`inject_id`): the server's
    answer is recorded as the policy in force when it went out decides, and under its name."""
    strict, passthrough = resolve_policy("strict"), resolve_policy("passthrough")
    holder = Holder(strict)
    config = CoreConfig(
        policy=holder, hash_value=lambda v: "hmac:test", inject_id=((b"name", b"corp"),)
    )
    conv = Conversation(SPLITTERS["whole"], config)
    conv.server(GREETING).client(b"a LOGIN alice wonderland\r\n")
    assert b"imapveil.1 ID" in conv.to_server
    holder.current = passthrough
    conv.server(b'* ID ("name" "Dovecot" "x-serial" "SN-778899")\r\nimapveil.1 OK done\r\n')
    (record,) = conv.of(IdExchange)
    assert isinstance(record, IdExchange) and record.injected
    assert (record.policy, record.policy_digest) == (strict.name, strict.digest)
    assert record.server == {"name": "Dovecot"}
