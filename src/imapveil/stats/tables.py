"""The report's tables, one shape for every output: the HTML page shows a table's rows, and
`imapveil report --export DIR` writes the very same rows as `DIR/<name>.csv` and
`DIR/<name>.json`. A cell is a number, a text or None (a number not shown: a group under the
`min_group_users` floor); only how it is written differs between the outputs.

Text came from clients (client names, versions, operating systems): every output makes it safe
to show (`charts.safe`), and CSV also disarms what a spreadsheet would run as a formula (a cell
starting with `=`, `+`, `-` or `@`, or a tab or carriage return, gets a `'` in front, as OWASP
advises for CSV injection; so does one starting with `'`, so that one leading `'` is always
what was added).
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from imapveil.stats.charts import safe, signed_count, signed_share

Kind = Literal["text", "date", "count", "share", "change", "change_share"]
"""How a column's cells are shown: text; text never broken over lines (a day, a week); a whole
number; a fraction shown as a percentage; a signed whole number; a signed fraction shown as a
signed percentage."""
TEXT = ("text", "date")
Cell = str | int | float | None
NOT_SHOWN = "\u2013"
"""What the page shows for a number it does not show (None): an en dash."""
FORMULA = ("=", "+", "-", "@", "\t", "\r")
"""What a CSV cell must not start with: a spreadsheet would take it for a formula."""


@dataclass(frozen=True, slots=True)
class Column:
    key: str
    """Its name in CSV's header and JSON (for the weeks' table, a client family's name)."""
    title: str
    """Its heading on the page."""
    kind: Kind = "text"


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    """The exported files' name: `<name>.csv`, `<name>.json`."""
    title: str
    columns: tuple[Column, ...]
    rows: tuple[tuple[Cell, ...], ...]
    notes: tuple[str, ...] = ()
    """What a reader must know to read it right (what folding hid, how users are counted)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """More for machines, in the JSON: the period, the folded groups and users, ..."""

    def column(self, key: str) -> list[Cell]:
        index = [c.key for c in self.columns].index(key)
        return [row[index] for row in self.rows]


def _exported(column: Column, value: Cell) -> Cell:
    """A cell as a table keeps it and JSON has it: text made safe, fractions to four digits."""
    if value is None:
        return None
    if column.kind in ("share", "change_share"):
        return round(float(value), 4)
    if column.kind in TEXT:
        return safe(str(value))
    return int(value)


def table(
    name: str, title: str, columns: Sequence[tuple[str, str, Kind]],
    rows: Sequence[Sequence[Cell]], notes: Sequence[str] = (), **meta: Any,
) -> Table:  # fmt: skip
    """A Table from (key, title, kind) column triples; every row as long as the columns (else
    ValueError). Shares are kept to four digits, so that the page shows the very number the
    exports hold."""
    made = tuple(Column(*c) for c in columns)
    cells = tuple(tuple(_exported(c, v) for c, v in zip(made, row, strict=True)) for row in rows)
    return Table(name, title, made, cells, tuple(n for n in notes if n), meta)


def shown(column: Column, value: Cell) -> str:
    """A cell as the page shows it."""
    if value is None:
        return NOT_SHOWN
    if column.kind == "share":
        return f"{float(value):.1%}"
    if column.kind == "change_share":
        return signed_share(float(value))
    if column.kind == "change":
        return signed_count(int(value))
    return safe(str(value))


def _css(column: Column) -> str:
    """Numbers right-aligned, days and weeks never broken at their hyphens."""
    if column.kind == "text":
        return ""
    return ' class="d"' if column.kind == "date" else ' class="n"'


def as_html(found: Table) -> str:
    """The table as HTML: numbers right-aligned, text escaped and made safe."""

    def cell(tag: str, text: str, column: Column) -> str:
        return f"<{tag}{_css(column)}>{html.escape(text)}</{tag}>"

    header = "".join(cell("th", safe(c.title), c) for c in found.columns)
    body = "".join(
        "<tr>"
        + "".join(cell("td", shown(c, v), c) for c, v in zip(found.columns, row, strict=True))
        + "</tr>"
        for row in found.rows
    )
    return (
        f'<table data-table="{found.name}"><thead><tr>{header}</tr></thead>'
        f"<tbody>{body}</tbody></table>"
    )


def disarm(text: str) -> str:
    """`text` safe to show, and never taken for a formula by a spreadsheet: a `'` in front of
    what starts as a formula, and of what starts with `'` itself, so that a reader knows to
    take one leading `'` away, always."""
    text = safe(text)
    return "'" + text if text.startswith((*FORMULA, "'")) else text


def as_csv(found: Table) -> str:
    """A header of the columns' keys, then a line a row; a number not shown is empty."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([disarm(c.key) for c in found.columns])
    for row in found.rows:
        cells = [_exported(c, v) for c, v in zip(found.columns, row, strict=True)]
        writer.writerow(
            ["" if v is None else disarm(v) if isinstance(v, str) else v for v in cells]
        )
    return out.getvalue()


def as_json(found: Table) -> str:
    """The table, its columns (key, title, kind) and rows (lists, in the columns' order; null
    for a number not shown), its notes and what `meta` says."""
    data: dict[str, Any] = {
        "table": found.name,
        "title": found.title,
        **found.meta,
        "columns": [
            {"key": safe(c.key), "title": safe(c.title), "kind": c.kind} for c in found.columns
        ],
        "rows": [
            [_exported(c, v) for c, v in zip(found.columns, row, strict=True)] for row in found.rows
        ],
        "notes": list(found.notes),
    }
    return json.dumps(data, indent=2) + "\n"


def export(tables: Sequence[Table], directory: Path) -> list[Path]:
    """Every table as `<name>.csv` and `<name>.json` in `directory` (made if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for found in tables:
        for suffix, render in ((".csv", as_csv), (".json", as_json)):
            path = directory / f"{found.name}{suffix}"
            path.write_text(render(found), encoding="utf-8")
            written.append(path)
    return written
