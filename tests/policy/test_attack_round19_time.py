"""Round 19's policy changes attacked for time: near-misses of every detector's patterns (almost
a MAC address, an IPv4 address with leading zeros, an IMEI in spaced groups; runs of `- - -`,
`1 , 1 , …`, `%%%%`, other scripts' digits), in values and in field names, at growing sizes.

Held: every detector, `apply`, `charts.fit` and the store's escaper take time linear in what
they are given (doubling it doubles the time), and a value is read to 1024 octets at most.

Found: a list's field names were each read in full (1024 octets) in up to six views
(`engine._views`: round 19 added two), whatever their number: 60 names of 1,000 octets, one
ID of 62 KB, cost ~100 ms of the loop every session shares, and another session's NOOP waited
114 ms at the median, 315 ms at the 99th percentile, while one client sent such IDs through
`imapveil serve` (1 ms before). The detectors now read at most `NAME_BUDGET` octets of names a
list, all views counted (`_name_cost`); a name past that is recorded by its length alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from imapveil.policy import Outcome, apply, detectors, engine
from imapveil.policy_files import resolve_policy
from imapveil.protocol import id_params
from imapveil.stats import charts

MAC = b"a4:c3:f0:85:1b:2e"


def fill(unit: bytes, size: int) -> bytes:
    return (unit * (size // len(unit) + 1))[:size]


def run(fields: tuple[tuple[bytes, bytes | None], ...]) -> Outcome:
    return apply(resolve_policy("default"), fields, hasher=lambda v: "hmac")


@pytest.fixture
def octets_read(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The length of everything the policy gives the detectors, one entry a look."""
    seen: list[int] = []
    real: Callable[[bytes, tuple[str, ...]], str | None] = detectors.detect

    def counted(value: bytes, enabled: tuple[str, ...]) -> str | None:
        seen.append(len(value))
        return real(value, enabled)

    monkeypatch.setattr(engine, "detect", counted)
    engine._name_as_recorded.cache_clear()
    yield seen
    engine._name_as_recorded.cache_clear()


def hostile_names(count: int, unit: bytes = b"1.1 ") -> tuple[tuple[bytes, None], ...]:
    """`count` distinct names of 1,000 octets with spaces (so not printable ASCII: every view
    of `_views`), near-misses of a MAC address, an IPv4 address and an IMEI, NIL values."""
    return tuple((b"%03d " % i + fill(unit, 996), None) for i in range(count))


@pytest.mark.parametrize(
    "unit", [b"1.1 ", b"1a.b.c.", b"4901 , ", b"%41\x01", "\u0661.".encode()], ids=repr
)
def test_a_list_s_names_are_read_as_much_as_one_value_whatever_their_number(
    octets_read: list[int], unit: bytes
) -> None:
    """60 names of 1,000 octets were read 300 KB (~100 ms); two of them as much as 60 now."""
    run(hostile_names(2, unit))
    two = sum(octets_read)
    octets_read.clear()
    run(hostile_names(60, unit))
    assert sum(octets_read) <= 2 * 1024, sum(octets_read)
    assert sum(octets_read) <= max(two, 1), (two, sum(octets_read))


def test_names_past_what_a_list_may_cost_are_recorded_by_length() -> None:
    """Read or not, no name's identifier reaches the records: one past the budget is recorded
    by its length; the names of a real client's list all as before."""
    first = fill(b"1.1.", 1000)  # printable ASCII: read once, 1,016 octets of the budget
    fields = (*hostile_names(2), (first, None), (MAC, b"1"), (b"x-" + MAC, b"1"), (b"name", b"M"))
    out = run(fields)
    assert out.recorded == {"name": "M"}
    assert out.dropped[2].startswith("detected:"), out.dropped  # read: the budget's last
    assert out.dropped[3:] == ("(name: 17 octets)", "(name: 19 octets)")
    assert out.dropped[:2] == ("(name: 1000 octets)",) * 2  # five views of 1,000: never read
    assert not any(MAC.decode() in d for d in out.dropped), out.dropped
    alone = run(((MAC, b"1"), (b"x-device", b"1"), (b"name", b"Mail")))
    assert alone.dropped == ("detected:mac", "x-device")


def test_the_policy_s_own_fields_are_recorded_by_name_whatever_came_before() -> None:
    """A field the policy names costs nothing: a list that spent the budget first still has
    its `name` and `version` recorded under those names, in whatever case it sent them."""
    first = fill(b"1.1.", 1000)
    out = run(((first, None), (b"x-device", b"1"), (b"Name", b"Mail"), (b"VERSION", b"16.0")))
    assert out.recorded == {"name": "Mail", "version": "16.0"}
    assert out.dropped[1] == "(name: 8 octets)"


def test_a_real_client_s_names_fit_many_times_over() -> None:
    names = [b"name", b"version", b"os", b"os-version", b"vendor", b"support-url", b"date"]
    names += [b"command", b"arguments", b"environment", b"x-android-mobile-net-operator"]
    assert sum(map(engine._name_cost, names)) * 3 <= engine.NAME_BUDGET


@pytest.mark.parametrize(
    "raw",
    [
        b"\x01" * 1024,
        b"\xd9\xa1" * 512,
        b"%" * 1024,
        b"\x01%" * 15,
        "\uff10".encode() * 10,
        b"name",
        b"x" * 2000,
        b"%\x00" * 600,
    ],
    ids=lambda raw: f"{raw[:4]!r}x{len(raw)}",
)
def test_a_name_s_cost_counts_every_view_it_reads(raw: bytes) -> None:
    assert sum(map(len, engine._views(raw))) <= engine._name_cost(raw)


# --- `charts.fit`, which puts a client's names in a terminal's columns (round 19).


LINEAR_BOUND = 5.0
"""Seconds a linear pass over the large inputs below may take: under a second alone, more under
coverage's tracer on a loaded machine; the quadratic passes found took a minute."""


def _best(work: Callable[[], object], times: int = 3) -> float:
    took = []
    for _ in range(times):
        began = time.perf_counter()
        work()
        took.append(time.perf_counter() - began)
    return min(took)


@pytest.mark.parametrize("lead", ["a", "", "\x1b"], ids=["letter", "none", "escape"])
def test_fitting_a_name_of_combining_marks_takes_time_linear_in_it(lead: str) -> None:
    """Found: each combining mark was added to its letter's piece by making the piece anew, so
    a letter and n marks cost n² (64 K marks: 0.3 s; 256 K: 3 s; a million: about 50 s); a
    million take about 0.4 s now. (What the store holds of a client is bounded, but `fit` is not
    told so.) A bound on the time, not a ratio of two times: the ratio of 8 K and 64 K marks
    (linear: 8, quadratic: 64) measured 17 and 20 on a loaded machine."""
    marks = lead + "\u0301" * 1_000_000
    took = _best(lambda: charts.fit(marks, 48), 1)
    assert took < LINEAR_BOUND, f"a million marks took {took:.1f} s (linear: about 0.4 s)"


# --- The ID's parse, which every such list goes through first.


def test_a_quoted_list_parses_about_as_fast_as_the_same_in_literals() -> None:
    """Found with the names: a quoted string was read an octet at a time in Python, ~8 ms of
    the loop every session shares for the 62 KB list of names above, 60 times its form in
    literals (sliced whole); each run between quotes, backslashes and line ends is one step
    now (~2 times)."""
    names = [name for name, _ in hostile_names(60)]
    quoted = b"(" + b" ".join(b'"%s" NIL' % n for n in names) + b")\r\n"
    literal = b"(" + b" ".join(b"{%d+}\r\n%s NIL" % (len(n), n) for n in names) + b")\r\n"
    assert id_params.parse(quoted) == id_params.parse(literal)
    ratio = _best(lambda: id_params.parse(quoted), 5) / _best(lambda: id_params.parse(literal), 5)
    assert ratio < 15, f"quoted took {ratio:.0f} times as long as literals"


# --- The values: what the detectors read of a list's kept fields.

KNOWN = (b"name", b"vendor", b"os", b"version", b"os-version", b"support-url")


def test_a_value_dropped_for_its_shape_whatever_it_holds_is_not_read(
    octets_read: list[int],
) -> None:
    """Found: the default policy's six kept fields, each 1 KB of near-misses ("a.a.a…"), cost
    ~12 ms of the loop every session shares, the worst list found. Half of that was spent on
    values the policy drops and records nowhere whether a detector finds something in them
    or not: `name`, `vendor` and `support-url` longer than their shapes allow (64 and 128
    octets), which are dropped, not coarsened. Those are not read now; `os`, `version` and
    `os-version`, which a misfit coarsens, still are (a value's identifier anywhere drops it
    whole)."""
    fields = tuple((k, fill(b"a.", 1024)) for k in KNOWN)
    out = run(fields)
    assert out.forwarded is None and out.recorded == {}
    assert sum(octets_read) <= 3 * 1024 + 3 * 64, octets_read
    explained = apply(resolve_policy("default"), fields, hasher=lambda v: "h", explain=True)
    assert (explained.forwarded, explained.recorded) == (out.forwarded, out.recorded)


def test_a_list_s_values_are_read_as_much_as_one_value_whatever_their_number(
    octets_read: list[int],
) -> None:
    """Left by the test above: `os`, `version` and `os-version`, which a misfit coarsens, were
    read whole whatever came before them: three values of 1 KB of near-misses, ~6 ms of the
    shared loop a list. The detectors now read 1024 octets of values a list in all
    (`engine.VALUE_BUDGET`, as `NAME_BUDGET` for names); a value past what is left is dropped
    and recorded nowhere, unread (`limit`), in `imapveil policy test` too (the outcome is the
    same). A real client's values take a few dozen octets in all."""
    fields = tuple((k, fill(b"a.", 1000)) for k in (b"os", b"version", b"os-version"))
    out = run(fields)
    assert out.forwarded is None and out.recorded == {}
    assert sum(octets_read) <= 1024 + 64, octets_read
    explained = apply(resolve_policy("default"), fields, hasher=lambda v: "h", explain=True)
    assert (explained.forwarded, explained.recorded) == (out.forwarded, out.recorded)
    assert [d.rule for d in explained.decisions][1:] == ["limit", "limit"]
    # Thunderbird's list, after a value that took most of the budget: still decided in full.
    octets_read.clear()
    late = run(((b"x-junk", fill(b"a.", 900)), (b"name", b"Thunderbird"), (b"version", b"115.3.1")))
    assert late.recorded == {"name": "Thunderbird", "version": "115.3.1"}, late
