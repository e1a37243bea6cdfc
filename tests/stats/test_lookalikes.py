"""A name that reads as another: `Thunderbird` with a Cyrillic capital TE (U+0422) for its T
was a row of `imapveil stats` of its own that reads `Thunderbird`, beside the real one
(attack17o's report; passthrough or custom policies, which keep a client's name as sent). A word
that mixes Latin letters with letters of the scripts that look like them (Cyrillic, Greek,
Armenian, Cherokee, Coptic) or with fullwidth or mathematical Latin letters shows those as
escapes now; a word in one script is shown as it is (`Почта`, `Почта Mail`, `Café`)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imapveil.stats.charts import fit, safe, safe_json


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("\u0422hunderbird", "\\u0422hunderbird"),
        ("Thund\u0435rbird", "Thund\\u0435rbird"),  # a Cyrillic small IE for the e
        ("Outl\u03bfok", "Outl\\u03bfok"),  # a Greek omicron
        ("\uff34hunderbird", "\\uff34hunderbird"),  # a fullwidth T
        ("\U0001d413hunderbird 115", "\\U0001d413hunderbird 115"),  # a mathematical bold T
        ("K-9 M\u0430il 6.8", "K-9 M\\u0430il 6.8"),
    ],
)
def test_a_word_that_mixes_lookalike_scripts_is_escaped(name: str, shown: str) -> None:
    assert safe(name) == shown
    assert fit(name, 40).rstrip(" ") == shown
    assert json.loads(safe_json({"name": name})) == {"name": name}
    assert [c for c in name if not c.isascii() and c in safe_json({"name": name})] == []


@pytest.mark.parametrize(
    "name",
    ["Почта", "Почта Mail", "Mail.Ru Агент", "Ελληνικά", "Café Mail", "邮件 Mail", "Thunderbird"],
)
def test_a_word_in_one_script_is_shown_as_it_is(name: str) -> None:
    assert safe(name) == name
    assert fit(name, 40).rstrip(" ") == name
    assert safe_json({"name": name}) == json.dumps({"name": name}, ensure_ascii=False)


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("\x0f\U0001d400", "\\x0f\\U0001d400"),  # found by Hypothesis (test_report_exports)
        ("\x1b\u0430", "\\x1b\\u0430"),  # an escape's last letter beside a Cyrillic a
        ("\x1b \u0430", "\\x1b \u0430"),  # a space between: a word of its own, as it is
    ],
)
def test_an_escape_s_letters_count_as_the_word_they_touch(name: str, shown: str) -> None:
    """The lookalikes are decided on the text as shown, its control characters escaped: `\\x0f`
    then a mathematical bold A (U+1D400) reads as `f` and the A, a word mixing Latin with a
    lookalike. Decided on the raw text instead, `safe` left the A as it was, and `safe` over its
    own output escaped it: a CSV cell, made safe again when written, did not read back as the
    same name's other outputs showed it."""
    assert safe(name) == shown
    assert safe(shown) == shown
    assert fit(name, 40).rstrip(" ") == shown


@given(
    st.text(alphabet=st.sampled_from("\x0f\x1b\u202e aT\u0430\U0001d400"), max_size=8)
    | st.text(max_size=40)
)
def test_safe_shows_its_own_output_as_it_is(text: str) -> None:
    once = safe(text)
    assert safe(once) == once
    assert fit(text, 1000).rstrip(" ") == once.rstrip(" ")  # 40 escapes take 400 at most
