"""A name that reads as another: `Thunderbird` with a Cyrillic capital TE (U+0422) for its T
was a row of `imapveil stats` of its own that reads `Thunderbird`, beside the real one
(attack17o's report; passthrough or custom policies, which keep a client's name as sent). A word
that mixes Latin letters with letters of the scripts that look like them (Cyrillic, Greek,
Armenian, Cherokee, Coptic) or with fullwidth or mathematical Latin letters shows those as
escapes now; a word in one script is shown as it is (`Почта`, `Почта Mail`, `Café`)."""

from __future__ import annotations

import json

import pytest

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
