"""Attack round 17 on outputs (attack17o), pure: what `charts.safe` leaves as it is."""

from __future__ import annotations

import sys
import unicodedata

from imapveil.stats.charts import safe


def test_every_control_format_and_separator_character_is_escaped() -> None:
    """Found: of Unicode's format characters (Cf), the Arabic number signs, the Syriac
    abbreviation mark, the Kaithi number signs and the Egyptian hieroglyph format controls
    (which join and reshape what follows) reached every output as they came; the zero-width
    characters, the byte order mark and the tag characters among them were the first finding
    (tests/test_attack_round17_outputs.py). Now no control (Cc), format character (Cf), line or
    paragraph separator (Zl, Zp) reaches an output raw."""
    raw = [
        f"U+{code:04X}"
        for code in range(sys.maxunicode + 1)
        if unicodedata.category(chr(code)) in ("Cc", "Cf", "Zl", "Zp")
        and safe(chr(code)) == chr(code)
    ]
    assert raw == []


def test_escapes_read_one_way() -> None:
    """A code point past U+FFFF is written with eight digits: `\\ue0041` would read as U+E004
    and a `1`."""
    assert safe("a\U000e0041b") == "a\\U000e0041b"
    assert safe("Grüße, 日本 — ok") == "Grüße, 日本 — ok"
