from __future__ import annotations

import json
from pathlib import Path

import pytest

from imapveil.policy import Outcome, PolicyError, apply, parse_policy
from imapveil.policy.detectors import detect
from imapveil.policy.engine import coarsen
from imapveil.policy_files import SHIPPED, resolve_policy
from imapveil.protocol.id_params import parse
from tests.helpers.corpus import rows

ALL = ("mac", "imei", "uuid", "token", "email", "ip")
AOSP = next(r for r in rows() if r.label == "aosp-email-identifiers")
AOSP_SECRETS = ("Pixel 7", "T-Mobile", "3kWq1b0Zr9mYb8Jx2n4Vt0cP5sI=")


def run(policy_name: str, id_args: bytes, **kw: bool) -> Outcome:
    return apply(resolve_policy(policy_name), parse(id_args), hasher=lambda v: "hmac:x", **kw)


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (b"00:1A:2b:3c:4D:5e", "mac"),
        (b"001a.2b3c.4d5e", "mac"),
        (b"490154203237518", "imei"),
        (b"123e4567-e89b-12d3-a456-426614174000", "uuid"),
        (b"{123E4567-E89B-12D3-A456-426614174000}", "uuid"),
        (b"3kWq1b0Zr9mYb8Jx2n4Vt0cP5sI=", "token"),
        (b"a3f9c0d2e1b4a5968778", "token"),
        (b"alice@example.org", "email"),
        (b"24.212.235.245", "ip"),
        (b"[2001:db8::1]", "ip"),
        (b"16.0 (3731.600.7)", None),
        (b"13; TQ3A.230805.001", None),
        (b"com.android.email", None),
        (b"1.983", None),
        (b"490154203237519", None),  # 15 digits, Luhn fails: not an IMEI
        (b"Microsoft.Exchange.Imap4.Imap4Server", None),
        (b"20230322-18-a8bdba-dirty", None),
        (b"gmail_imap_200428.12_p0", None),
        (b"OutlookForWindowsDesktopClient", None),
        (b"21B101", None),
    ],
)
def test_detectors(value: bytes, kind: str | None) -> None:
    assert detect(value, ALL) == kind


def test_shipped_policies_load() -> None:
    names = sorted(p.stem for p in SHIPPED.glob("*.toml"))
    assert names == ["default", "passthrough", "strict"]
    for name in names:
        policy = resolve_policy(name)
        assert policy.name == name
        assert len(policy.digest) == 64
    repo = Path(__file__).resolve().parents[2] / "policies"
    assert sorted(p.name for p in repo.glob("*.toml")) == [f"{n}.toml" for n in names]


def test_aosp_identifiers_under_default() -> None:
    out = run("default", AOSP.args)
    sent = dict(out.forwarded or ())
    assert sent[b"name"] == b"com.android.email"
    assert (sent[b"x-imapveil"] or b"").startswith(
        b"imapveil "
    )  # RFC 2971 §5: we say we changed it
    everything = repr(out.forwarded) + json.dumps(out.recorded) + json.dumps(out.dropped)
    for secret in AOSP_SECRETS:
        assert secret not in everything
    assert set(out.dropped) == {"x-android-device-model", "x-android-mobile-net-operator", "aguid"}
    assert out.recorded == {
        "name": "com.android.email",
        "os": "android",
        "os-version": "13; TQ3A.230805.001",
        "vendor": "Google",
    }
    rules = {d.field: d.rule for d in out.decisions}
    # Dropped and not recorded: not examined, decided by the default rule; explained, the
    # detector that finds the identifier is named.
    assert rules["aguid"] == rules["x-android-device-model"] == "default"
    explained = apply(resolve_policy("default"), parse(AOSP.args), hasher=str, explain=True)
    assert {d.field: d.rule for d in explained.decisions}["aguid"] == "detected:token"


def test_unchanged_list_is_not_announced() -> None:
    out = run("default", b'("name" "Thunderbird" "version" "52.4.0")')
    assert not out.changed
    assert out.forwarded == ((b"name", b"Thunderbird"), (b"version", b"52.4.0"))


def test_strict_forwards_nil_and_records_coarsely() -> None:
    out = run("strict", b'("name" "Mac OS X Mail" "version" "16.0 (3731.600.7)" "os" "Mac OS X")')
    assert out.forwarded is None
    assert out.recorded == {"name": "Mac OS X Mail", "version": "16.0", "os": "Mac OS X"}


def test_anti_spoof_fields_whatever_the_policy() -> None:
    args = b'("name" "Roundcube" "x-originating-ip" "24.212.235.245" "X-Session-Ext-ID" "abc")'
    out = run("passthrough", args)
    assert [n for n, _ in out.forwarded or ()] == [b"name", b"x-imapveil"]
    assert "x-originating-ip" not in out.recorded
    trusted = run("passthrough", args, trusted_client=True)
    assert dict(trusted.forwarded or ())[b"x-originating-ip"] == b"24.212.235.245"


def test_rfc_limits_on_what_we_send() -> None:
    many = b"(" + b" ".join(b'"f%d" "v"' % i for i in range(40)) + b")"
    out = run("passthrough", many)
    assert out.forwarded is not None and len(out.forwarded) == 30
    long_name = b'("' + b"n" * 31 + b'" "v" "name" "x" "name" "dup" "big" "' + b"v" * 1025 + b'")'
    out = run("passthrough", long_name)
    assert [n for n, _ in out.forwarded or ()] == [b"name", b"x-imapveil"]
    assert dict(out.forwarded or ())[b"name"] == b"x"


def test_everything_dropped_goes_out_as_nil() -> None:
    out = run("default", b'("x-device" "abc")')
    assert out.forwarded is None  # not () and not an announcement alone


def test_actions(tmp_path: Path) -> None:
    policy = parse_policy(
        b"""
        name = "t"
        detectors = []
        announce = false
        [[rule]]
        fields = ["version"]
        forward = "coarsen"
        record = "hash"
        components = 1
        [[rule]]
        fields = ["x-*"]
        forward = "redact"
        record = "keep"
        [[rule]]
        fields = ["x-long"]
        forward = "truncate"
        length = 4
        """,
        "t.toml",
    )
    fields = parse(b'("version" "16.2.1 (x)" "x-a" "secret" "X-Long" "abcdefgh")')
    out = apply(policy, fields, hasher=lambda v: "hmac:" + str(len(v)))
    assert out.forwarded == ((b"version", b"16"), (b"x-a", b"redacted"), (b"X-Long", b"abcd"))
    assert out.recorded == {"version": "hmac:18", "x-a": "secret"}
    assert coarsen(b"13.4.1 (22F82)", 2) == b"13.4"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[rule]]\nfields = ["name"]\nforward = "hash"\n', "rule[0].forward: expected one of"),
        ("[[rule]]\nfields = []\n", "rule[0].fields: a rule needs at least one"),
        ('[[rule]]\nfields = ["name"]\nlenght = 3\n', "rule[0].lenght: unknown key"),
        ('detectors = ["mac", "dna"]\n', "detectors: unknown detector 'dna'"),
        ('default = { forward = "keep", record = "sideways" }\n', "default.record: expected"),
        ('announce_field = "' + "x" * 31 + '"\n', "announce_field: must be 1 to 30"),
        ("surprise = 1\n", "surprise: unknown key"),
        ("name = \n", "not valid TOML"),
    ],
)
def test_invalid_policies_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        resolve_policy(str(path))
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_unknown_policy_name() -> None:
    with pytest.raises(PolicyError, match="shipped: default, passthrough, strict"):
        resolve_policy("lenient")


def test_a_value_that_goes_nowhere_is_not_examined(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found: a field the policy drops and does not record had its value run through every
    detector anyway, only to name the reason; an ID of 30 hostile values of 1024 octets cost
    some 50 ms of the loop every session shares. Now such a value is not examined by the
    proxy (its outcome cannot change); `imapveil policy test` (`explain=True`) still names the
    detector that would find what."""
    looked: list[bytes] = []

    def counting(value: bytes, enabled: tuple[str, ...]) -> str | None:
        looked.append(value)
        return detect(value, enabled)

    monkeypatch.setattr("imapveil.policy.engine.detect", counting)
    policy = resolve_policy("default")
    fields = ((b"name", b"Thunderbird"), (b"x-device-id", b"a4:c3:f0:85:1b:2e"))
    outcome = apply(policy, fields, hasher=lambda v: "h")
    assert outcome.forwarded is not None and dict(outcome.forwarded)[b"name"] == b"Thunderbird"
    assert b"x-device-id" not in dict(outcome.forwarded)
    assert b"a4:c3:f0:85:1b:2e" not in looked and b"Thunderbird" in looked
    (_, dropped) = outcome.decisions
    assert (dropped.forward, dropped.record, dropped.rule) == ("drop", "drop", "default")
    explained = apply(policy, fields, hasher=lambda v: "h", explain=True)
    assert explained.forwarded == outcome.forwarded and explained.recorded == outcome.recorded
    assert explained.decisions[1].rule == "detected:mac"
