"""Every client row of the ID corpus through the proxy to a real Dovecot, under each shipped
policy: what Dovecot logged (`imap_id_log = *`) is what the policy says should reach it, and the
records hold only what the policy says to keep."""

from __future__ import annotations

import imaplib
import json
import re

import pytest
import trio

from imapveil.policy import apply
from imapveil.policy_files import resolve_policy
from imapveil.protocol.id_params import parse
from imapveil.records import IdExchange, SessionEnded, Violation
from tests.conftest import start_proxy
from tests.helpers.corpus import Row, rows
from tests.helpers.dovecot import Dovecot
from tests.relay.test_through_dovecot import connect

pytestmark = pytest.mark.dovecot

CLIENT_ROWS = [r for r in rows() if r.direction == "C"]
AOSP_SECRETS = ("Pixel 7", "T-Mobile", "3kWq1b0Zr9mYb8Jx2n4Vt0cP5sI=")


def hasher(value: bytes) -> str:
    return "hmac:test"


def send_row(address: tuple[str, int], row: Row, after_login: bool) -> bytes:
    tag = row.data.split(b" ", 1)[0]
    with connect(address) as (s, f):
        f.readline()
        if after_login:
            s.sendall(b"L1 LOGIN alice wonderland\r\n")
            assert f.readline().startswith(b"L1 OK")
        s.sendall(row.data)
        while not (transcript := f.readline()).startswith(tag + b" "):
            assert transcript, row.label
        s.sendall(b"Z LOGOUT\r\n")
        f.read()
    return transcript


def dovecot_line(fields: tuple[tuple[bytes, bytes | None], ...]) -> str:
    return "ID sent: " + ", ".join(
        f"{n.decode()}={'NIL' if v is None else v.decode()}" for n, v in fields
    )


def id_lines(text: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"Info: (ID sent: .*?)(?:: user=<>.*)?$", text, re.M)]


@pytest.mark.parametrize("policy_name", ["default", "strict", "passthrough"])
async def test_corpus_through_the_proxy(dovecot: Dovecot, policy_name: str) -> None:
    policy = resolve_policy(policy_name)
    before = dovecot.log_text().count("ID sent: ")
    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(
            nursery, dovecot.address, policy=lambda: policy, hash_value=hasher
        )
        for i, row in enumerate(CLIENT_ROWS):
            answer = await trio.to_thread.run_sync(send_row, proxy.address, row, i % 2 == 1)
            assert answer.split(b" ")[1] == b"OK", (row.label, answer)
        await proxy.sink.wait_for(SessionEnded, len(CLIENT_ROWS))
        proxy.proxy.stop()

    expected = []
    for row in CLIENT_ROWS:
        outcome = apply(policy, parse(row.args), hasher=hasher)
        if outcome.forwarded is not None:
            expected.append(dovecot_line(outcome.forwarded))
    # Dovecot's log process writes a moment after the OK.
    text = await trio.to_thread.run_sync(dovecot.wait_for_log, "ID sent: ", before + len(expected))
    logged = id_lines(text)[before:]
    assert sorted(logged) == sorted(expected)

    records = proxy.sink.of(IdExchange)
    assert len(records) == len(CLIENT_ROWS)
    assert all(r.policy == policy_name and r.status == "OK" for r in records)
    assert all(r.server == {"name": "Dovecot"} for r in records)
    dump = json.dumps([r.to_dict() for r in proxy.sink.records])
    text = "\n".join(logged)
    if policy_name != "passthrough":
        for secret in AOSP_SECRETS:
            assert secret not in text
            assert secret not in dump
    # Client-supplied addresses never reach the server unless the client network is trusted.
    assert "24.212.235.245" not in text
    assert "24.212.235.245" not in dump


def login_with_imaplib(address: tuple[str, int]) -> list[bytes]:

    m = imaplib.IMAP4(*address)
    m.login("alice", "wonderland")
    typ, data = m.noop()
    m.logout()
    assert typ == "OK"
    return [d for d in data if isinstance(d, bytes)]


async def test_injected_id_reaches_dovecot_and_not_the_client(dovecot: Dovecot) -> None:
    before = dovecot.log_text().count("ID sent: ")
    fields = ((b"name", b"imapveil gateway"), (b"vendor", b"Example Org"))
    policy = resolve_policy("default")
    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(
            nursery, dovecot.address, policy=lambda: policy, hash_value=hasher, inject_id=fields
        )
        await trio.to_thread.run_sync(login_with_imaplib, proxy.address)
        await proxy.sink.wait_for(SessionEnded)
        proxy.proxy.stop()
    text = await trio.to_thread.run_sync(dovecot.wait_for_log, "ID sent: ", before + 1)
    assert id_lines(text)[before:] == ["ID sent: name=imapveil gateway, vendor=Example Org"]
    (rec,) = proxy.sink.of(IdExchange)
    assert rec.injected and rec.status == "OK" and rec.server == {"name": "Dovecot"}
    assert not proxy.sink.of(Violation)
