"""The version parser: real clients' versions in order, a total order, never an exception."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imapveil.stats.versions import MAX_TEXT, Version, parse


def v(text: str) -> Version:
    version = parse(text)
    assert version is not None, text
    return version


@pytest.mark.parametrize(
    ("older", "newer"),
    [
        ("6.710", "6.800"),
        ("115.5.0", "115.10"),
        ("52.4.0", "115.5.0"),
        ("1.0.0-beta.2", "1.0.0"),
        ("1.0.0-alpha", "1.0.0-beta"),
        ("1.0.0-rc.1", "1.0.0"),
        ("128.0b3", "128.0"),
        ("115.5.0", "115.5.0esr"),
        ("115.5.0esr", "115.5.1"),
        ("21B101", "21C52"),
        ("21C52", "22A3354"),
        ("16.0 (3731.600.7)", "16.0 (3731.600.8)"),
        ("11.5 (3445.9.1)", "16.0 (3696.80.82.1.1)"),
        ("3826.300.87.2.22", "3826.300.87.3"),
        ("13; TQ3A.230805.001", "14; AP1A.240305.019"),
        ("12.3 (21E230)", "13.4.1 (22F82)"),
        ("v1.9", "Version 1.10"),
    ],
)
def test_order_of_real_versions(older: str, newer: str) -> None:
    assert v(older) < v(newer)
    assert not v(newer) < v(older)


@pytest.mark.parametrize(
    ("one", "other"), [("1.0", "1.0.0"), ("115", "115.0.0"), ("1.0-beta.2", "1.0.0-beta.2")]
)
def test_trailing_zeros_do_not_count(one: str, other: str) -> None:
    assert v(one) == v(other)


def test_builds_only_break_ties() -> None:
    assert v("16.0 (3731.600.7)") > v("16.0")
    assert v("15.0 (9999)") < v("16.0 (1)")
    assert v("13; TQ3A.230805.001").release == (13,)


def test_release_lines() -> None:
    assert v("115.5.0").in_line(v("115")) and v("115").in_line(v("115"))
    assert not v("1150.1").in_line(v("115")) and not v("116.0").in_line(v("115"))


@pytest.mark.parametrize("text", ["", "nothing", "beta", "(", ";", "\x00\u202e", "()"])
def test_no_digit_no_version(text: str) -> None:
    assert parse(text) is None


def test_bounded_input() -> None:
    long = "1." * 10_000_000
    started = time.perf_counter()
    version = v(long)
    assert time.perf_counter() - started < 5.0  # linear: ~10 ms; quadratic: hours
    assert version.text == long[:MAX_TEXT]


VERSIONS = st.one_of(
    st.text(max_size=80),
    st.from_regex(
        r"\A[v ]?[0-9]{1,4}([.\-_]?([0-9]{1,4}|[a-zA-Z]{1,6})){0,6}"
        r"( \([0-9A-Z.]{1,12}\)|; [A-Z0-9.]{1,12})?\Z"
    ),
)


@given(VERSIONS)
def test_never_raises(text: str) -> None:
    version = parse(text)
    assert version is None or version.text == text[:MAX_TEXT]


@given(VERSIONS, VERSIONS, VERSIONS)
def test_a_total_order(a: str, b: str, c: str) -> None:
    x, y, z = parse(a), parse(b), parse(c)
    if x is None or y is None or z is None:
        return
    assert (x < y) + (y < x) + (x == y) == 1  # exactly one: trichotomy
    if x <= y <= x:
        assert x == y  # antisymmetry
    if x <= y <= z:
        assert x <= z  # transitivity
    assert sorted([x, y, z]) == sorted([z, y, x])
