"""Reports from the store: tables for people, CSV/JSON for machines, one self-contained HTML page.

No report singles anyone out: a group with fewer than `min_users` distinct users is folded into
"other" (its sessions and users added there), everywhere.
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


def summarize(
    store: Store, by: str = "family", since: str | None = None, until: str | None = None,
    min_users: int = 5,
) -> Summary:  # fmt: skip
    columns = BY[by]
    where, params = _where(since, until)
    group = ", ".join(columns)
    result = store.rows(
        f"SELECT {group}, COUNT(*), COUNT(DISTINCT user_id), MIN(started_at), MAX(ended_at)"  # noqa: S608 (fixed column names)
        f" FROM sessions{where} GROUP BY {group}",
        params,
    )
    rows: list[Row] = []
    folded: list[Row] = []
    for *keys, sessions, users, first, last in result:
        label = " ".join(str(k) for k in keys if k) or "unknown"
        row = Row(label, int(sessions), int(users), str(first), str(last))
        (folded if by != "day" and row.users < min_users else rows).append(row)
    rows.sort(key=lambda r: (r.group if by == "day" else "", -r.sessions, r.group))
    if folded:
        rows.append(
            Row(
                "other",
                sum(r.sessions for r in folded),
                sum(r.users for r in folded),  # at most: a user may be in several groups
                min(r.first_seen for r in folded),
                max(r.last_seen for r in folded),
            )
        )
    totals = store.rows(f"SELECT COUNT(*), COUNT(DISTINCT user_id) FROM sessions{where}", params)  # noqa: S608
    no_id = store.rows(
        f"SELECT COUNT(*) FROM sessions{where}{' AND' if where else ' WHERE'} family = ?",  # noqa: S608
        [*params, NO_ID],
    )
    return Summary(since, until, int(totals[0][0]), int(totals[0][1]), int(no_id[0][0]), rows)


def as_table(summary: Summary, by: str) -> str:
    head = f"{by:<40} {'sessions':>9} {'users':>7}  first seen           last seen"
    lines = [head, "-" * len(head)]
    for r in summary.rows:
        seen = f"{safe(r.first_seen)[:19]}  {safe(r.last_seen)[:19]}"
        lines.append(f"{safe(r.group)[:40]:<40} {r.sessions:>9} {r.users:>7}  {seen}")
    lines.append("")
    lines.append(
        f"{summary.sessions} sessions, {summary.users} distinct users, "
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


def _bars(title: str, rows: list[tuple[str, int]], unit: str) -> str:
    """A horizontal bar chart as inline SVG."""
    width, bar_h, label_w = 720, 22, 260
    height = 34 + bar_h * max(len(rows), 1)
    top = max((v for _, v in rows), default=0) or 1
    parts = [
        f'<svg class="chart" role="img" aria-label="{html.escape(title)}" '
        f'xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">',
        f'<text x="0" y="18" class="title">{html.escape(title)}</text>',
    ]
    for i, (label, value) in enumerate(rows):
        y = 30 + i * bar_h
        w = int((width - label_w - 80) * value / top)
        parts.append(f'<text x="0" y="{y + 15}">{html.escape(safe(label)[:38])}</text>')
        bar = f'x="{label_w}" y="{y + 3}" width="{max(w, 1)}" height="{bar_h - 6}"'
        parts.append(f'<rect class="bar" {bar}/>')
        parts.append(f'<text x="{label_w + w + 6}" y="{y + 15}">{value} {unit}</text>')
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
        _bars("Clients (sessions)", [(r.group, r.sessions) for r in families.rows], "sessions"),
        _bars("Clients (distinct users)", [(r.group, r.users) for r in families.rows], "users"),
        _bars("Versions per client", [(r.group, r.sessions) for r in versions.rows], "sessions"),
        _bars("Operating systems", [(r.group, r.sessions) for r in systems.rows], "sessions"),
        _bars("Sessions per day", [(r.group, r.sessions) for r in days.rows], "sessions"),
        _bars(
            "Sessions without ID",
            [("sent an ID", families.sessions - families.no_id_sessions),
             ("no ID", families.no_id_sessions)],
            "sessions",
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
<p>From {period}: {families.sessions} sessions, {families.users} distinct users;
{share:.1%} of sessions sent no ID. Groups of fewer than {min_users} users are shown as
"other".</p>
{"".join(charts)}
</body></html>
"""
