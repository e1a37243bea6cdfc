"""Reports from the store: tables for people, CSV/JSON for machines, one self-contained HTML page.

No report singles anyone out: a group with fewer than `min_users` distinct users is folded into
"other" (its sessions added there, its users counted once however many folded groups they were
in), everywhere.
"""

from __future__ import annotations

import csv
import html
import io
import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from imapveil.stats.identify import NO_ID
from imapveil.stats.store import Store

BY = {
    "family": ("family",),
    "version": ("family", "version"),
    "os": ("platform", "os_version"),
    "day": ("day",),
}


_UNSAFE = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)
"""What a terminal or a reader of text must not get raw from a client: C0 and C1 controls and DEL
(escape sequences, BEL, a carriage return or line feed forging a row), the line and paragraph
separators, and the bidirectional marks and overrides that reorder what is shown."""


def _escape_one(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(text: str) -> str:
    """`text` with every character of `_UNSAFE` written as an escape (`\\x1b`, `\\u202e`)."""
    return _UNSAFE.sub(_escape_one, text)


@dataclass(frozen=True, slots=True)
class Row:
    group: str
    sessions: int
    users: int
    first_seen: str
    last_seen: str


@dataclass(frozen=True, slots=True)
class Summary:
    since: str | None
    until: str | None
    sessions: int
    users: int
    no_id_sessions: int
    rows: list[Row]

    @property
    def no_id_share(self) -> float:
        return self.no_id_sessions / self.sessions if self.sessions else 0.0


def _where(since: str | None, until: str | None) -> tuple[str, list[str]]:
    clauses, params = [], []
    if since:
        clauses.append("started_at >= ?")
        params.append(since)
    if until:
        clauses.append("started_at < ?")
        params.append(until)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _group_key(columns: tuple[str, ...]) -> str:
    """One text per group, the same on SQLite and PostgreSQL, NULL told apart from '' and no
    two groups alike (each part is its length and itself)."""
    parts = [
        f"(CASE WHEN {c} IS NULL THEN 'n' ELSE 'v' || LENGTH({c}) || ':' || {c} END)"
        for c in columns
    ]
    return " || '/' || ".join(parts)


def summarize(
    store: Store, by: str = "family", since: str | None = None, until: str | None = None,
    min_users: int = 5,
) -> Summary:  # fmt: skip
    """Sessions, distinct users, first and last seen per group; groups of fewer than
    `min_users` distinct users (not by day) are one row, "other", whose users are counted once
    however many folded groups they were in."""
    columns = BY[by]
    where, params = _where(since, until)
    group = ", ".join(columns)
    result = store.rows(
        f"SELECT {group}, COUNT(*), COUNT(DISTINCT user_id), MIN(started_at), MAX(ended_at)"  # noqa: S608 (fixed column names)
        f" FROM sessions{where} GROUP BY {group}",
        params,
    )
    rows: list[Row] = []
    folding = False
    for *keys, sessions, users, first, last in result:
        label = " ".join(str(k) for k in keys if k) or "unknown"
        row = Row(label, int(sessions), int(users), str(first), str(last))
        if by != "day" and row.users < min_users:
            folding = True
        else:
            rows.append(row)
    rows.sort(key=lambda r: (r.group if by == "day" else "", -r.sessions, r.group))
    if folding:
        key = _group_key(columns)
        small = (
            f"{key} IN (SELECT {key} FROM sessions{where} GROUP BY {group}"  # noqa: S608
            " HAVING COUNT(DISTINCT user_id) < ?)"
        )
        ((sessions, users, first, last),) = store.rows(
            "SELECT COUNT(*), COUNT(DISTINCT user_id), MIN(started_at), MAX(ended_at)"  # noqa: S608
            f" FROM sessions{where}{' AND' if where else ' WHERE'} {small}",
            [*params, *params, min_users],
        )
        rows.append(Row("other", int(sessions), int(users), str(first), str(last)))
    totals = store.rows(f"SELECT COUNT(*), COUNT(DISTINCT user_id) FROM sessions{where}", params)  # noqa: S608
    no_id = store.rows(
        f"SELECT COUNT(*) FROM sessions{where}{' AND' if where else ' WHERE'} family = ?",  # noqa: S608
        [*params, NO_ID],
    )
    return Summary(since, until, int(totals[0][0]), int(totals[0][1]), int(no_id[0][0]), rows)


def plural(count: int, noun: str) -> str:
    """`1 session`, `2 sessions`."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def cut(text: str, width: int) -> str:
    """`text` in at most `width` characters, an ellipsis standing for what was left out."""
    return text if len(text) <= width else text[: width - 1] + "\u2026"


LABEL_WIDTH = 48
"""Characters of a group's name shown in a table or a chart before it is cut (with "…")."""


def as_table(summary: Summary, by: str) -> str:
    w = LABEL_WIDTH
    head = f"{by:<{w}} {'sessions':>9} {'users':>7}  first seen           last seen"
    lines = [head, "-" * len(head)]
    for r in summary.rows:
        seen = f"{safe(r.first_seen)[:19]}  {safe(r.last_seen)[:19]}"
        lines.append(f"{cut(safe(r.group), w):<{w}} {r.sessions:>9} {r.users:>7}  {seen}")
    lines.append("")
    lines.append(
        f"{plural(summary.sessions, 'session')}, {plural(summary.users, 'distinct user')}, "
        f"{summary.no_id_share:.1%} of sessions sent no ID"
    )
    return "\n".join(lines) + "\n"


def as_csv(summary: Summary, by: str) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([by, "sessions", "users", "first_seen", "last_seen"])
    for r in summary.rows:
        writer.writerow([safe(r.group), r.sessions, r.users, safe(r.first_seen), safe(r.last_seen)])
    return out.getvalue()


def as_json(summary: Summary, by: str) -> str:
    data: dict[str, Any] = {
        "by": by,
        "since": summary.since,
        "until": summary.until,
        "sessions": summary.sessions,
        "users": summary.users,
        "no_id_share": round(summary.no_id_share, 4),
        "rows": [asdict(r) for r in summary.rows],
    }
    return json.dumps(data, indent=2) + "\n"


CHAR_WIDTH = 8
"""Pixels a character of the charts' 13 px text may take (generous: digits and capitals)."""


def _bars(title: str, rows: list[tuple[str, int]], unit: str) -> str:
    """A horizontal bar chart as inline SVG: the label (cut with "…", whole in a tooltip), the
    bar, and the number, all inside the chart's width."""
    bar_h, bar_w = 22, 400
    labels = [cut(safe(label), LABEL_WIDTH) for label, _ in rows]
    values = [plural(value, unit) for _, value in rows]
    label_w = CHAR_WIDTH * max((len(t) for t in labels), default=0) + 12
    width = label_w + bar_w + 6 + CHAR_WIDTH * max((len(t) for t in values), default=0) + 6
    width = max(width, CHAR_WIDTH * len(title) + 12)
    height = 34 + bar_h * max(len(rows), 1)
    top = max((v for _, v in rows), default=0) or 1
    parts = [
        f'<svg class="chart" role="img" aria-label="{html.escape(title)}" '
        f'xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">',
        f'<text x="0" y="18" class="title">{html.escape(title)}</text>',
    ]
    for i, ((label, value), shown, number) in enumerate(zip(rows, labels, values, strict=True)):
        y = 30 + i * bar_h
        w = int(bar_w * value / top)
        whole = html.escape(safe(label))
        parts.append(f'<text x="0" y="{y + 15}"><title>{whole}</title>{html.escape(shown)}</text>')
        bar = f'x="{label_w}" y="{y + 3}" width="{max(w, 1)}" height="{bar_h - 6}"'
        parts.append(f'<rect class="bar" {bar}/>')
        parts.append(f'<text x="{label_w + w + 6}" y="{y + 15}">{number}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def html_report(
    store: Store, since: str | None = None, until: str | None = None, min_users: int = 5
) -> str:
    families = summarize(store, "family", since, until, min_users)
    versions = summarize(store, "version", since, until, min_users)
    systems = summarize(store, "os", since, until, min_users)
    days = summarize(store, "day", since, until, min_users)
    share = families.no_id_share
    charts = [
        _bars("Clients (sessions)", [(r.group, r.sessions) for r in families.rows], "session"),
        _bars("Clients (distinct users)", [(r.group, r.users) for r in families.rows], "user"),
        _bars("Versions per client", [(r.group, r.sessions) for r in versions.rows], "session"),
        _bars("Operating systems", [(r.group, r.sessions) for r in systems.rows], "session"),
        _bars("Sessions per day", [(r.group, r.sessions) for r in days.rows], "session"),
        _bars(
            "Sessions without ID",
            [("sent an ID", families.sessions - families.no_id_sessions),
             ("no ID", families.no_id_sessions)],
            "session",
        ),
    ]  # fmt: skip
    period = f"{html.escape(since or 'the beginning')} to {html.escape(until or 'now')}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>imapveil: mail clients in use</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
.chart {{ display: block; margin: 1.5em 0; font-size: 13px; }}
.chart .title {{ font-weight: bold; font-size: 15px; }}
.bar {{ fill: #3b6ea5; }}
</style></head><body>
<h1>Mail clients in use</h1>
<p>From {period}: {plural(families.sessions, "session")},
{plural(families.users, "distinct user")};
{share:.1%} of sessions sent no ID. Groups of fewer than {min_users} users are shown as
"other".</p>
{"".join(charts)}
</body></html>
"""
