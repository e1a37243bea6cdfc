"""Terminal tables line up whatever a client's name holds: a wide character (CJK, most emoji)
takes two columns of a terminal, a combining mark none, and a name was cut and padded by its
characters, so a row with `邮件` or `📧` pushed its numbers right of the others', one with
`é` written as e and U+0301 pulled them left (round 17's and 19's reports). And a name cut after
it was escaped could end inside an escape (`…\\x1b]8;;\\…`), which reads as something the
client did not send.

`columns` here is the test's own reckoning of what a terminal does (East Asian Width W and F:
two; a combining mark: none), not the code's.
"""

from __future__ import annotations

import re
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imapveil.stats import report
from imapveil.stats.charts import fit, safe


def columns(text: str) -> int:
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
        for c in text
    )


NAMES = [
    "Thunderbird",
    "邮件客户端",  # five wide characters: ten columns
    "📧 Mail 📧",
    "Cafe\u0301 Mail",  # é as e and a combining acute: nine columns
    "한국어 메일 프로그램 " * 8,  # wide, and longer than the column
    "Mail\x1b]8;;http://x\x1b\\link" * 4,  # escapes past the cut
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("width", [8, 24, 48])
def test_fit_takes_exactly_its_columns(name: str, width: int) -> None:
    shown = fit(name, width)
    assert columns(shown) == width, (name, shown)
    assert columns(fit(name, width, right=True)) == width


def test_a_cut_never_ends_inside_an_escape() -> None:
    name = "Mail\x1b]8;;http://example.com\x1b\\"
    whole = safe(name)
    for width in range(2, len(whole) + 2):
        shown = fit(name, width).rstrip(" ")
        if shown.endswith("\u2026"):
            kept = shown.removesuffix("\u2026")
            assert whole.startswith(kept)
            # What is kept is whole escapes: the next thing shown after it is one too.
            rest = whole[len(kept) :]
            assert re.match(r"\\x[0-9a-f]{2}|[^\\]", rest), (width, shown)
        else:
            assert shown == whole


@given(st.text(min_size=0, max_size=60), st.integers(2, 50))
def test_fit_is_safe_and_exact_for_any_text(name: str, width: int) -> None:
    shown = fit(name, width)
    assert columns(shown) == width
    assert safe(shown) == shown  # nothing raw a terminal must not get


def test_the_summary_table_lines_up() -> None:
    rows = [
        report.Row(name, 10 + i, 5, "2026-12-01T00:00:00", "2026-12-02T00:00:00", 0.25)
        for i, name in enumerate(NAMES)
    ]
    summary = report.Summary(None, None, 100, 20, 0, rows)
    lines = report.as_table(summary, "family").splitlines()
    head = lines[0]
    field = columns(head[: head.index("sessions") - 1])  # where "sessions" (9 wide) starts
    for row, line in zip(rows, lines[2:], strict=False):
        counts = f"{row.sessions:>9} {row.users:>7} {row.share:>6.1%}"
        # The counts start at the same terminal column in every row, under their heading.
        assert columns(line[: line.rindex(counts)]) == field, line
