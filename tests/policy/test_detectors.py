"""Detectors: what they find (issue 11), and that they cannot be made slow (issue 12).

No test here times anything. Linear time is shown by the work done instead: what the detectors
are given (never more than RFC 2971's 1024 octets) and how their patterns are built (no
repetition inside a repetition; every repetition bounded, or the whole pattern one class
repeated). bench/detectors.py prints the times.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from imapveil.policy import apply, detectors, shapes
from imapveil.policy.detectors import DETECTORS, detect
from imapveil.policy_files import resolve_policy

ALL = tuple(DETECTORS)


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        # Issue 11, item 4: identifiers that used to pass.
        (b"0f8fad5b_d9cb_469f_a165_70867728950e", "uuid"),
        (b"0f8fad5bd9cb469fa16570867728950e", "uuid"),
        (b"a4c3f0851b2e", "mac"),
        (b"build a4c3f0851b2e", "mac"),
        (b"A4-C3-F0-85-1B-2E", "mac"),
        (b"alice@localhost", "email"),
        (b"bob@[10.0.0.1]", "email"),
        (b"mail from alice@example.org today", "email"),
        (b"key=3kWq1b0Zr9mYb8Jx2n4Vt0cP5sI", "token"),  # after "=" too
        (b"abc1.2.3.4", "ip"),  # hex letters before an address do not hide it
        (b"10.0.0.1.", "ip"),  # nor a full stop after it
        (b"fe80::1%eth0", "ip"),
        (b"::ffff:10.0.0.1", "ip"),
        # A four-part number is an address to the detector; the version field's rule allows it.
        (b"7.2.25.230", "ip"),
        # Attack 12: identifiers in groups, each word short enough for a name or a version.
        (b"49-015420-323751-8", "imei"),
        (b"16.0 (49 015420 323751 8)", "imei"),
        (b"35209900-176148-1", "imei"),
        (b"49.015420.323751.8", "imei"),  # dots: only 15 digits that pass Luhn's check
        (b"310-150-123456789", "imei"),  # an IMSI: 15 digits in groups, no check digit
        (b"8901 2601 2345 6789 012", "imei"),  # an ICCID
        (b"a4 c3 f0 85 1b 2e", "mac"),
        (b"1.a4.c3.f0.85.1b.2e", "mac"),
        (b"a4_c3_f0_85_1b_2e", "mac"),
        (b"a4c3f0-851b2e", "mac"),
        (b"a4c-3f0-851-b2e", "mac"),
        (b"a4c3_f085_1b2e", "mac"),
        (b"0f8f-ad5b-d9cb-469f-a165-7086-7728-950e", "uuid"),
        (b"0f8fad5b d9cb 469f a165 7086 7728 950e", "uuid"),
        (b"9774-d56d-682e-549c", "token"),
        # ... whatever joins the groups: mixed, or punctuation a version may hold.
        (b"49+015420+323751+8", "imei"),
        (b"(49)015420-323751-8", "imei"),
        (b"49-015420 323751.8", "imei"),
        (b"a4.c3-f0.85-1b.2e", "mac"),
        (b"a4/c3/f0/85/1b/2e", "mac"),
        (b"a4(c3)f0(85)1b(2e)", "mac"),
        (b"a4  c3  f0  85  1b  2e", "mac"),
        (b"0f8fad5b,d9cb,469f,a165,7086,7728,950e", "uuid"),
        (b"9774+d56d+682e+549c", "token"),
        (b"a4c3f-0851b-2e", "mac"),  # chunks of five, the last shorter
        (b"9774d-56d68-2e549-c", "token"),
        (b"ip-198-51-100-7", "ip"),
        (b"198+51+100+7", "ip"),
        (b"198 51 100 7", "ip"),
        (b"2001-db8--7.ipv6-literal.net", "ip"),
        (b"fe80--1", "ip"),
        (b"2001-db8-85a3-0-0-8a2e-370-7334", "ip"),
        (b"Mail--Deluxe 1.0--beta", None),
        (b"198_51_100_7", "ip"),
        (b"0xc6.0x33.0x64.0x07", "ip"),
        # ... and what such groups are in real versions: not identifiers.
        (b"16.0.17425.20000", None),
        (b"10.0.19045.3693", None),
        (b"3774.300.61.1.2", None),
        (b"10.11.12.13.14.15", None),  # six pairs of digits: a version's numbers, no hex letter
        (b"2.3.21 (47349e2482)", None),
        (b"v1.2.3-14-g47349e2", None),
        (b"1.0.0-beta.1+exp.sha.5114f85", None),
        (b"3.10.0-1160.el7.x86_64", None),
        (b"6.5.0-14-generic", None),
        (b"16.0 (3826.300.87.2.22)", None),  # 15 digits, but not joined by single octets
        (b"10.0.22621.2861-1", None),
        (b"1.2.3-14-g47349e2 (abc1234)", None),
        (b"2.3.21 (47349e2482) (a8bdba 12)", None),
        (b"4.9.1-0+deb11u1", None),
        (b"49.015420.323751.9", None),  # dotted 15 digits failing Luhn's check: a version's
        # Versions, names and dates stay clean.
        (b"3826.300.87.2.22", None),
        (b"16.0 (3696.80.82.1.1)", None),
        (b"16.0.17126.20132", None),
        (b"Microsoft.Exchange.Imap4.Imap4Server", None),
        (b"19-Mar-2020 02:08:12 +0000", None),
        (b"Mail @ home", None),
        (b"mailbox@", None),
    ],
)
def test_detectors_new_cases(value: bytes, kind: str | None) -> None:
    assert detect(value, ALL) == kind


@contextmanager
def spied() -> Iterator[list[int]]:
    """Every detector records the length of what it is given."""
    seen: list[int] = []
    saved = dict(DETECTORS)

    def spy(f: Callable[[bytes], bool]) -> Callable[[bytes], bool]:
        def wrapped(value: bytes) -> bool:
            seen.append(len(value))
            return f(value)

        return wrapped

    try:
        for name, f in saved.items():
            DETECTORS[name] = spy(f)
        yield seen
    finally:
        DETECTORS.update(saved)


ADVERSARIAL_UNITS = [b"a", b"a.", b"0123456789abcdef", b"Ab1+", b":", b"1.", b"1", b"aa:", b"@a"]


@pytest.mark.parametrize("unit", ADVERSARIAL_UNITS)
@pytest.mark.parametrize("size", [1025, 60_000, 1_000_000])
def test_detection_sees_at_most_1024_octets(unit: bytes, size: int) -> None:
    value = (unit * (size // len(unit) + 1))[: size - 1] + b"@"
    with spied() as seen:
        detect(value, ALL)
        assert seen and max(seen) == 1024  # detect() itself looks no further
        seen.clear()
        fields = tuple((f, value) for f in (b"name", b"version", b"os", b"x-other"))
        for policy in ("default", "strict"):
            out = apply(resolve_policy(policy), fields, hasher=lambda v: "h")
            assert out.forwarded is None and out.recorded == {}
        # RFC 2971 §3.3: a longer value is dropped before any detector runs. (The detectors
        # do look at the names of dropped fields, for the records: a few octets here.)
        assert all(n <= len(b"x-other") for n in seen), seen


@settings(max_examples=200)
@given(
    unit=st.sampled_from(ADVERSARIAL_UNITS) | st.binary(min_size=1, max_size=8),
    times=st.integers(min_value=0, max_value=3000),
    tail=st.binary(max_size=4),
)
def test_detectors_never_given_more_than_the_rfc_allows(
    unit: bytes, times: int, tail: bytes
) -> None:
    value = unit * times + tail
    with spied() as seen:
        kind = detect(value, ALL)
        apply(resolve_policy("default"), ((b"version", value),), hasher=lambda v: "h")
    assert all(n <= 1024 for n in seen)
    assert kind is None or kind in DETECTORS


_sre: Any = importlib.import_module("re._parser")  # no stubs; read only, to inspect patterns
_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT}
_ONE_CHARACTER = {_sre.IN, _sre.LITERAL, _sre.NOT_LITERAL, _sre.ANY}


def _repeats(parsed: Any, inside: bool = False) -> Iterator[tuple[int, bool]]:
    """(most, nested) for every repetition in a parsed pattern."""
    for op, av in parsed:
        if op in _REPEATS:
            _, most, body = av
            yield most, inside
            yield from _repeats(body, True)
        elif op is _sre.SUBPATTERN:
            yield from _repeats(av[3], inside)
        elif op is _sre.BRANCH:
            for alternative in av[1]:
                yield from _repeats(alternative, inside)
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            yield from _repeats(av[1], inside)


def _one_class_repeated(parsed: Any) -> bool:
    if len(parsed) != 1 or parsed[0][0] not in _REPEATS:
        return False
    body = parsed[0][1][2]
    return len(body) == 1 and body[0][0] in _ONE_CHARACTER


def _patterns(module: object) -> list[re.Pattern[bytes]]:
    return [v for v in vars(module).values() if isinstance(v, re.Pattern)]


def test_detector_patterns_are_all_listed() -> None:
    assert set(_patterns(detectors)) == set(detectors.PATTERNS)


@pytest.mark.parametrize(
    "pattern",
    _patterns(detectors) + _patterns(shapes),
    ids=lambda p: p.pattern.decode("ascii", "replace")[:40],
)
def test_patterns_cannot_backtrack_badly(pattern: re.Pattern[bytes]) -> None:
    """Bounded patterns cost at most their width per position; `[...]+` alone scans each run once.

    Either way a search is linear in the value. What would not be: a repetition inside a
    repetition, or an unbounded one followed by more pattern (the old e-mail pattern, which
    retried its local part from every position of a 60 KB value: 5 s).
    """
    parsed = _sre.parse(pattern.pattern, pattern.flags)
    found = list(_repeats(parsed))
    assert not any(nested for _, nested in found), "a repetition inside a repetition"
    if not _one_class_repeated(parsed):
        assert all(most <= 64 for most, _ in found), "an unbounded repetition"


def test_the_old_email_pattern_fails_that_test() -> None:
    old = re.compile(rb"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
    parsed = _sre.parse(old.pattern)
    assert not _one_class_repeated(parsed)
    assert any(most > 64 for most, _ in _repeats(parsed))


def _every_detector(value: bytes, enabled: tuple[str, ...]) -> str | None:
    """`detect` without the counts it takes first (`detectors.NEEDS`)."""
    value = value[:1024]
    return next((name for name in enabled if DETECTORS[name](value)), None)


_GROUPED = st.builds(
    lambda words, joins: b"".join(w + j for w, j in zip(words, joins, strict=False)),
    st.lists(st.binary(min_size=1, max_size=6).map(lambda b: b.hex().encode()[:6]), max_size=12)
    | st.lists(st.text("0123456789abcdefABCDEFxz", min_size=1, max_size=7).map(str.encode)),
    st.lists(st.sampled_from([b"", b"-", b":", b".", b" ", b"_", b"--", b"+", b"/", b" - "])),
)


@settings(max_examples=400)
@given(st.one_of(_GROUPED, st.binary(max_size=80)))
# Each at a count's edge: 15 digits, 12 and 32 hex digits, 16 octets, 4 digits, "--".
@example(b"49-015420-323751-8")
@example(b"310150123456789")
@example(b"a4 c3 f0 85 1b 2e")
@example(b"0f8fad5b d9cb 469f a165 7086 7728 950e")
@example(b"3kWq1b0Zr9mYb8Jx")
@example(b"1 2 3 4")
@example(b"fe80--1")
@example(b"ip-1-2-3")
@example(b"ip 1 2 34")
@example(b"::")
@example(b"0:1:2b:3c:4d:5")  # a MAC address without leading zeros, at its least: 9 hex digits
def test_the_counts_taken_first_change_no_verdict(value: bytes) -> None:
    """`detect` skips a detector when the value has too few hex digits, digits or octets for
    anything it finds (12 hex digits for a MAC address, however grouped, ...): a shortcut for the
    usual short value, never a different answer."""
    assert detect(value, ALL) == _every_detector(value, ALL)
    for name in ALL:
        assert detect(value, (name,)) == _every_detector(value, (name,)), name
    assert detectors.written_address(value) == detectors._written_address(value[:1024])
