"""Fingerprint labels: which client family (and platform) a TLS or behaviour fingerprint is.

A TOML file of `[[label]]` rows, each naming one fingerprint exactly (a JA4 value, or a
behaviour signature's name `b1_` + 12 hex digits) and the family and platform it stands for:

    [[label]]
    fingerprint = "b1_0123456789ab"
    family = "Outlook"
    platform = "Windows"        # optional

The shipped table (`fingerprints.toml`) is read first, then the administrator's own file
(`fingerprint_labels`), whose rows replace shipped ones for the same fingerprint. Labels are
the administrator's knowledge, not measurements: sessions counted through them are marked
inferred wherever they are shown (see `stats.inventory.inferred`), never mixed with the
families clients named in an ID. A file with a mistake is refused as a whole, with its name,
the line of the row and what is wrong (`LabelError`).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imapveil.settings_file import TooLarge, read_limited
from imapveil.shown import bounded, shown

SHIPPED = Path(__file__).resolve().parent / "fingerprints.toml"
JA4 = re.compile(r"[0-9A-Za-z]{10}_[0-9a-f]{12}_[0-9a-f]{12}")
"""A JA4 fingerprint: `t13d1516h2_8daaf6152771_02713d6af862`."""
BEHAVIOUR = re.compile(r"b[0-9]{1,2}_[0-9a-f]{12}")
"""A behaviour signature's name: `b1_` and 12 hex digits."""
FAMILY = re.compile(r"[A-Za-z0-9][A-Za-z0-9 .,_+()/'&-]{0,63}")
"""A family or platform: letters, digits, space and `.,_+()/'&-`, at most 64 characters."""
RESERVED = frozenset(("no id", "other", "unknown", "unnamed"))
"""Names the reports give groups of their own: a label may not claim them."""
KEYS = frozenset(("fingerprint", "family", "platform"))


class LabelError(ValueError):
    """A labels file is wrong; the message names the file, the line and the problem (bounded:
    `shown.MAX_MESSAGE`)."""

    def __init__(self, message: str) -> None:
        super().__init__(bounded(message))


@dataclass(frozen=True, slots=True)
class Label:
    family: str
    platform: str | None = None


def kind(fingerprint: str) -> str | None:
    """`ja4` or `behaviour` for a well-formed fingerprint, else None."""
    if JA4.fullmatch(fingerprint):
        return "ja4"
    return "behaviour" if BEHAVIOUR.fullmatch(fingerprint) else None


def parse_labels(text: str, source: str) -> dict[str, Label]:
    """The labels in `text` (a file's content; `source` names it in errors)."""
    try:
        table = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as exc:  # too deeply nested: recursion
        raise LabelError(f"{source}: not valid TOML: {exc}") from None
    unknown = set(table) - {"label"}
    if unknown:
        raise LabelError(
            f"{source}: unknown key(s) {shown(', '.join(sorted(unknown)))} (rows are [[label]])"
        )
    rows = table.get("label", [])
    if not isinstance(rows, list):
        raise LabelError(f"{source}: write labels as [[label]] rows")
    lines = _row_lines(text)
    labels: dict[str, Label] = {}
    for number, row in enumerate(rows):
        line = lines[number] if number < len(lines) else 0
        where = f"{source}: line {line}: [[label]]" if line else f"{source}: [[label]] {number + 1}"
        fingerprint, label = _row(row, where)
        if fingerprint in labels:
            raise LabelError(f"{where}: {fingerprint} is labelled twice")
        labels[fingerprint] = label
    return labels


def _row_lines(text: str) -> list[int]:
    """The line number of each `[[label]]` header, in order."""
    header = re.compile(r"\s*\[\[\s*label\s*\]\]")
    return [n for n, line in enumerate(text.splitlines(), start=1) if header.match(line)]


def _row(row: Any, where: str) -> tuple[str, Label]:
    if not isinstance(row, dict):
        raise LabelError(f"{where}: expected a table")
    unknown = set(row) - KEYS
    if unknown:
        raise LabelError(f"{where}: unknown key(s) {shown(', '.join(sorted(unknown)))}")
    fingerprint = row.get("fingerprint")
    if not isinstance(fingerprint, str) or kind(fingerprint) is None:
        raise LabelError(
            f"{where}: `fingerprint` must be a JA4 value (t13d1516h2_8daaf6152771_02713d6af862) "
            "or a behaviour name (b1_ and 12 hex digits)"
        )
    family = _name(row.get("family"), f"{where}: `family`")
    if family is None:
        raise LabelError(f"{where}: `family` is missing")
    return fingerprint, Label(family, _name(row.get("platform"), f"{where}: `platform`"))


def _name(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not FAMILY.fullmatch(value):
        raise LabelError(
            f"{where}: 1 to 64 letters, digits, spaces and .,_+()/'&- (starting with a letter "
            "or digit)"
        )
    if value.lower() in RESERVED:
        raise LabelError(f"{where}: {value!r} is a name the reports use for a group of their own")
    return value


def read_labels(path: Path) -> dict[str, Label]:
    try:
        text = read_limited(path).decode("utf-8")
    except (OSError, UnicodeDecodeError, TooLarge) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise LabelError(f"{shown(str(path))}: cannot read: {reason}") from None
    return parse_labels(text, shown(str(path)))


def load_labels(own: str | Path | None = None) -> Mapping[str, Label]:
    """The shipped labels, then the administrator's file `own` (if any) over them."""
    labels = read_labels(SHIPPED)
    if own:
        labels.update(read_labels(Path(own)))
    return labels
