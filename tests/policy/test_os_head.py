"""An `os` value with a device model after it keeps its system's name and version, not the model."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imapveil.policy import Outcome, apply, parse_policy
from imapveil.policy.engine import os_head
from imapveil.policy.shapes import os as os_shape
from imapveil.policy_files import SHIPPED, resolve_policy
from imapveil.protocol.id_params import parse
from tests.helpers.corpus import rows

POLICIES = ("default", "strict", "passthrough")


def run(policy: str, os_value: bytes) -> Outcome:
    fields = ((b"name", b"com.android.email"), (b"os", os_value))
    return apply(resolve_policy(policy), fields, hasher=lambda v: "hmac:x")


@pytest.mark.parametrize(
    ("value", "head"),
    [
        (b"Android 13; SM-S911B", b"Android 13"),
        (b"iOS 17.1 (iPhone15,2)", b"iOS 17.1"),
        (b"iOS 17.1 (iPhone15)", b"iOS 17.1"),  # brackets never fit the os shape
        (b"Windows 10; Surface Pro 7", b"Windows 10"),
        (b"Windows 10;Surface Pro 7; x", b"Windows 10"),
    ],
)
def test_default_forwards_and_records_the_system_only(value: bytes, head: bytes) -> None:
    out = run("default", value)
    assert out.forwarded is not None
    assert dict(out.forwarded)[b"os"] == head
    assert out.recorded["os"] == head.decode()
    assert "os" not in out.dropped
    strict = run("strict", value)
    assert strict.recorded["os"] == head.decode()
    assert strict.forwarded is None  # strict forwards no os at all, as before
    model = value[len(head) :].strip(b" ;(")[:6].decode()
    for outcome in (out, strict):
        assert model not in repr(outcome.forwarded) + repr(outcome.recorded)


@pytest.mark.parametrize(
    "value",
    [
        b"a4c3f0851b2e; x",  # the head is a device id: no os shape
        b"; SM-S911B",  # no head at all
        b"(iPhone15,2)",
        b"iOS 490154203237518; x",  # an IMEI in the head
        b"Android 13; " + b"x" * 1020,  # longer than RFC 2971 allows: dropped unseen
    ],
)
@pytest.mark.parametrize("policy", ["default", "strict"])
def test_a_head_that_still_does_not_fit_is_dropped(policy: str, value: bytes) -> None:
    out = run(policy, value)
    assert "os" in out.dropped
    assert "os" not in out.recorded
    assert b"os" not in dict(out.forwarded or ())


def _without_os_misfit(policy: str) -> bytes:
    """The shipped policy as it was before: no coarsening of a misfit `os` value."""
    text = (SHIPPED / f"{policy}.toml").read_bytes()
    out, in_os = [], False
    for ln in text.split(b"\n"):  # drop the `misfit` line of the `os` rule only
        if ln.startswith(b"fields = "):
            in_os = ln == b'fields = ["os"]'
        if not (in_os and ln.startswith(b"misfit")):
            out.append(ln)
    return b"\n".join(out)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_corpus_row_comes_out_as_before(policy: str) -> None:
    before = parse_policy(_without_os_misfit(policy), f"{policy} before")
    after = resolve_policy(policy)
    assert (
        policy == "passthrough"
        or _without_os_misfit(policy) != (SHIPPED / f"{policy}.toml").read_bytes()
    )
    for row in rows():
        fields = parse(row.args)
        old = apply(before, fields, hasher=lambda v: "hmac:x")
        new = apply(after, fields, hasher=lambda v: "hmac:x")
        assert new == old, row.label


@given(st.binary(max_size=1100))
def test_a_kept_os_value_always_has_the_os_shape(value: bytes) -> None:
    for policy in ("default", "strict"):
        out = run(policy, value)
        kept = [v for k, v in out.forwarded or () if k == b"os"]
        assert all(v is not None and os_shape(v) for v in kept)
        rec = out.recorded.get("os")
        assert rec is None or os_shape(rec.encode())
        head = os_head(value)
        assert len(head) <= len(value)
