"""Shapes: what a kept value must look like, and the safe pattern subset policies may write."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from imapveil.policy import PolicyError, parse_policy
from imapveil.policy.shapes import NAMED, Shape, ShapeError, compile_pattern, compile_shape
from imapveil.protocol.id_params import parse
from tests.helpers.corpus import rows

# Every value the open corpus holds for a shaped field, clients' and servers'.
CORPUS_FIELDS = {"name", "vendor", "os", "version", "os-version", "support-url", "date"}
SHAPE_OF = {"os-version": "version", "support-url": "url"}


def corpus_values() -> list[tuple[str, bytes]]:
    found = []
    for row in rows():
        for raw, value in parse(row.args) or ():
            field = raw.decode().lower()
            if field in CORPUS_FIELDS and value is not None:
                found.append((SHAPE_OF.get(field, field), value))
    return found


@pytest.mark.parametrize(("shape", "value"), corpus_values())
def test_corpus_values_have_their_shape(shape: str, value: bytes) -> None:
    assert NAMED[shape](value)


@pytest.mark.parametrize(
    ("shape", "value"),
    [
        ("version", b"7.2.25.230"),  # Foxmail
        ("version", b"116.0b3"),
        ("version", b"6.5.0-14-generic"),
        ("version", b"10.0.22631"),
        ("version", b"2023"),
        ("name", b"Outlook 2016"),
        ("version", b"2.3.16 (7e2e900c1a)"),  # a hash, hex only: no serial number
        ("name", b"imap4server"),
        ("name", b"Microsoft.Exchange.Imap4.Imap4Server"),
        ("name", b"thunderbird115"),
        ("name", b"HUAWEI P30 PRO"),  # capitals and digits in groups, one word mixing them
        ("name", b"IBM Notes 9.0.1 FP10 HF197"),
        ("version", b"14; UP1A.231005.007"),  # dots: an Android build
        ("version", b"SP1A.210812.016.A1"),
        ("name", b"OutlookForWindowsDesktopClient"),
        ("name", b"eM Client"),
        ("os", b"Linux x86_64"),
        ("os", b"Windows 11"),
        ("vendor", b"Tencent, Inc."),
        ("date", b" 9-Mar-2020"),
        ("url", b"http://localhost.localdomain:8080/help"),
    ],
)
def test_other_real_values_have_their_shape(shape: str, value: bytes) -> None:
    assert NAMED[shape](value)


UUID = b"0f8fad5b-d9cb-469f-a165-70867728950e"


@pytest.mark.parametrize(
    ("shape", "value"),
    [
        ("version", b"a4c3f0851b2e"),  # a MAC address without separators: a 12-octet word
        ("version", b"490154203237518"),  # an IMEI
        ("version", UUID),
        ("version", UUID.replace(b"-", b"_")),
        ("version", b"a4:c3:f0:85:1b:2e"),
        ("version", b"2001:db8::1"),
        ("version", b"alice@localhost"),
        ("version", b"beta"),  # no digit: not a version
        ("version", b"16.0 (3731.600.7"),  # unbalanced
        ("version", b"16.0 ((1))"),
        ("version", b"16.0\x1b]0;x\x07"),
        ("version", b"1" * 65),
        ("name", b"3kWq1b0Zr9mYb8Jx2n4Vt0cP5sI="),
        ("name", b"kWqbZrmYbJxnVtcPsIabQxYz"),  # case changing all the time: a token
        ("name", b"a4c3f0851b2e"),
        ("name", b"490154203237518"),
        ("name", b"alice@localhost"),
        ("name", b"1234"),  # no letter
        ("name", b"-dash"),
        ("name", b"Mail\r\nx"),
        ("name", "Почта".encode()),  # not ASCII: the shipped shapes keep ASCII only
        ("os", b"10.1.2.3"),
        # Attack 12: serial numbers in groups, each word short.
        ("version", b"16.0 (C02X-K1ZT-JGH5)"),
        ("version", b"C02XK1 ZTJGH5"),
        ("name", b"Mail C02X K1ZT JGH5"),
        ("vendor", b"Apple R58M_12AB-CDE"),
        ("os", b"iOS C02X-K1ZT JGH5"),
        ("name", b"Mail C02X/K1ZT/JGH5"),
        ("name", b"Mail c02xk1ztjgh5"),  # a serial number in small letters
        ("version", b"16.0 (ip-198-51-100-7)"),  # an address written otherwise: no version
        ("version", b"2001-db8--7"),
        ("vendor", b"h4v9k2p7qx"),
        ("os", b"iOS r58m12abcde"),
        ("name", b"Mail C02xK1ztJGH5"),  # or in mixed case
        ("version", b"16.0 (C02X+K1ZT+JGH5)"),
        ("os", b"iOS 490154203237518"),
        ("vendor", b"Apple Inc.\x00"),
        ("date", b"2020-03-19"),
        ("date", b"19-Mar-2020 02:08:12"),
        ("url", b"https://vendor.example/help?device=a4c3f0851b2e"),
        ("url", b"https://alice:secret@vendor.example/"),
        ("url", b"javascript:alert(1)"),
        ("url", b"mailto:alice@localhost"),
    ],
)
def test_values_without_their_shape(shape: str, value: bytes) -> None:
    assert not NAMED[shape](value)


def test_a_shape_looks_at_no_more_than_1024_octets() -> None:
    seen: list[int] = []

    def check(value: bytes) -> bool:
        seen.append(len(value))
        return True

    shape = Shape("spy", check)
    assert shape.fits(b"a" * 1024)
    assert not shape.fits(b"a" * 1025)
    assert not shape.fits(b"a" * 1_000_000)
    assert seen == [1024]


@pytest.mark.parametrize(
    ("pattern", "fits", "misfits"),
    [
        ("^[a-z]+[0-9]+$", [b"abc123"], [b"123abc", b"abc", b""]),
        (r"^[A-Z][a-z]{1,20}$", [b"Thunderbird"], [b"thunder"]),
        (r"^\d{1,3}\.\d{1,3}$", [b"16.0", b"115.12"], [b"16", b"16.0.1"]),
        (r"^v\x2e[^\x00-\x1f]*$", [b"v.1 beta", b"v."], [b"v.\n", b"x.1"]),
        (r"^[]a]+\$$", [b"]a]$"], [b"]a]"]),
        ("^$", [b""], [b"a"]),
    ],
)
def test_patterns(pattern: str, fits: list[bytes], misfits: list[bytes]) -> None:
    shape = compile_shape(pattern)
    assert shape.name == pattern
    assert all(shape.fits(v) for v in fits)
    assert not any(shape.fits(v) for v in misfits)


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("[a-z]+", "anchored"),
        ("^[a-z]+", "anchored"),
        ("^[a-z]+\\$", "anchored"),
        ("^(a+)+$", "groups and alternation"),
        ("^a|b$", "groups and alternation"),
        ("^a**$", "nested quantifiers"),
        ("^a+?$", "lazy, possessive and nested"),
        ("^a++$", "lazy, possessive and nested"),
        ("^*a$", "repeats nothing"),
        ("^a{2,1}$", "m <= n <= 1024"),
        ("^a{1,5000}$", "m <= n <= 1024"),
        ("^a{x}$", "write {m}"),
        ("^[a-z]*[a-z0-9]$", "make them disjoint"),
        ("^[a-z]+[0-9]?[a-z]$", "make them disjoint"),  # through an optional item
        ("^.*x$", "make them disjoint"),
        (r"^[^a]*\x00$", r"start with (\x00)"),
        (r"^\1$", "not supported"),
        (r"^\bword$", "not supported"),
        (r"^\x4$", r"\x takes two"),
        ("^[z-a]$", "a range goes"),
        ("^[a-z$", "ends too early"),
        ("^a^b$", "only at the ends"),
        ("^é$", "outside ASCII"),
        ("^" + "a" * 300 + "$", "at most 256"),
        ("semver", "unknown shape 'semver'"),
    ],
)
def test_unsafe_or_wrong_patterns(pattern: str, why: str) -> None:
    with pytest.raises(ShapeError, match=re.escape(why)):
        compile_shape(pattern)


# Items of the subset; anything compile_pattern accepts must agree with Python's re.
_ITEMS = ["a", "b", "0", r"\.", "[ab]", "[0-9]", r"\d", "[^a]", ".", r"\w", r"\s", r"\x62"]
_QUANTIFIERS = ["", "?", "*", "+", "{2}", "{1,3}", "{0,2}", "{2,}"]


@given(
    items=st.lists(st.tuples(st.sampled_from(_ITEMS), st.sampled_from(_QUANTIFIERS)), max_size=5),
    values=st.lists(st.binary(max_size=8).map(lambda b: bytes(b"ab0.\n _"[c % 7] for c in b))),
)
def test_the_one_pass_matcher_agrees_with_re(
    items: list[tuple[str, str]], values: list[bytes]
) -> None:
    body = "".join(item + quantifier for item, quantifier in items)
    try:
        shape = compile_pattern("^" + body + "$")
    except ShapeError:
        assume(False)
        return
    compiled = re.compile(body.encode())
    for value in values:
        assert shape.fits(value) == (compiled.fullmatch(value) is not None), value


def policy_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mine.toml"
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        parse_policy(path.read_bytes(), str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    return message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[[rule]]\nfields = ["version"]\nshape = "semver"\n',
            "rule[0].shape: unknown shape 'semver' (known: name, vendor, os, version, date, url",
        ),
        (
            "[[rule]]\nfields = [\"version\"]\nshape = '^(\\d+\\.)+$'\n",
            "rule[0].shape: at character 2: groups and alternation are not supported",
        ),
        (
            "[[rule]]\nfields = [\"x\"]\nshape = '^[a-z]*[a-z0-9]$'\n",
            "rule[0].shape: item 1 repeats a set that what follows can also start with ('a')",
        ),
        ("[[rule]]\nfields = [\"x\"]\nshape = '[a-z]'\n", "rule[0].shape: a pattern must be"),
        ('[[rule]]\nfields = ["x"]\nshape = 3\n', "rule[0].shape: expected a shape's name"),
        ('[[rule]]\nfields = ["x"]\nmisfit = "coarsen"\n', "rule[0].misfit: only with a shape"),
        (
            '[[rule]]\nfields = ["x"]\nshape = "name"\nmisfit = "keep"\n',
            "rule[0].misfit: expected one of drop, coarsen",
        ),
        ('default = { shape = "nope" }\n', "default.shape: unknown shape 'nope'"),
        ('detected = { shape = "name" }\n', "detected.shape: unknown key"),
    ],
)
def test_loader_names_file_key_and_why(tmp_path: Path, text: str, message: str) -> None:
    assert message in policy_error(tmp_path, text)


def test_loader_compiles_shapes(tmp_path: Path) -> None:
    policy = parse_policy(
        b"""
        default = { forward = "keep", record = "keep", shape = "name" }
        [[rule]]
        fields = ["x-build"]
        shape = '^[0-9]{1,8}$'
        forward = "keep"
        """,
        "t.toml",
    )
    assert policy.default.shape is not None and policy.default.shape.name == "name"
    build = policy.rule_for("x-build")
    assert build.shape is not None and build.shape.fits(b"20231130")
    assert not build.shape.fits(b"202311301")
    assert build.misfit == "drop"


# Attack 12: a support address carries no serial number or long number (an IMSI) in its host,
# path or mailbox: a version's words, no longer.
@pytest.mark.parametrize(
    "value",
    [
        b"https://support.example.com/d/310150123456789",
        b"https://C02XK1ZTJGH5.example.com/",
        b"https://support.example.com/C02X_K1ZT_JGH5/help",
        b"mailto:C02XK1ZTJGH5@example.com",
        b"mailto:310150123456789@example.com",
    ],
)
def test_a_support_url_carries_no_device_number(value: bytes) -> None:
    assert not NAMED["url"](value)


@pytest.mark.parametrize(
    "value",
    [
        b"https://support.google.com/mail/answer/7126229",
        b"https://github.com/postalsys/imapflow/issues/1234",
        b"mailto:cyrus-bugs+@andrew.cmu.edu",
        b"https://imapsync.lamiral.info/",
        b"http://localhost.localdomain:8080/help",
    ],
)
def test_support_urls_of_vendors_have_the_shape(value: bytes) -> None:
    assert NAMED["url"](value)
