"""Reports from the store: tables for people, CSV/JSON for machines, one self-contained HTML page.

No report singles anyone out: a group with fewer than `min_users` distinct users is folded into
"other" (its sessions added there, its users counted once however many folded groups they were
in), everywhere.
"""

from __future__ import annotations

import csv
import datetime
import html
import io
import json
from dataclasses import asdict, dataclass
from typing import Any

from imapveil.stats import currency, inventory
from imapveil.stats.charts import CHAR_WIDTH as CHAR_WIDTH  # noqa: PLC0414 (re-exported)
from imapveil.stats.charts import LABEL_WIDTH as LABEL_WIDTH  # noqa: PLC0414 (re-exported)
from imapveil.stats.charts import bar_chart, line_chart
from imapveil.stats.charts import cut as cut  # noqa: PLC0414 (re-exported)
from imapveil.stats.charts import plural as plural  # noqa: PLC0414 (re-exported)
from imapveil.stats.charts import safe as safe  # noqa: PLC0414 (re-exported)
from imapveil.stats.identify import NO_ID
from imapveil.stats.inventory import Trend, also
from imapveil.stats.inventory import where as _where
from imapveil.stats.store import Store

BY = {
    "family": ("family",),
    "version": ("family", "version"),
    "os": ("platform", "os_version"),
    "day": ("day",),
}


@dataclass(frozen=True, slots=True)
class Row:
    group: str
    sessions: int
    users: int
    first_seen: str
    last_seen: str
    share: float = 0.0
    """Of all distinct users in the period (a user of two groups counts in both)."""
    platforms: str | None = None
    """By family: its platforms and their users, k-floored ("Windows (150), other")."""


@dataclass(frozen=True, slots=True)
class Summary:
    since: str | None
    until: str | None
    sessions: int
    users: int
    no_id_sessions: int
    rows: list[Row]
    folded: int = 0
    """How many groups of fewer than `min_users` users are in "other"."""
    min_users: int = 0

    @property
    def hidden(self) -> int:
        """Distinct users of the folded groups (the "other" row's)."""
        return next((r.users for r in self.rows if r.group == "other"), 0) if self.folded else 0

    @property
    def no_id_share(self) -> float:
        return self.no_id_sessions / self.sessions if self.sessions else 0.0


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
    however many folded groups they were in; by family, each family's platforms too."""
    columns = BY[by]
    where, params = _where(since, until)
    totals = store.rows(f"SELECT COUNT(*), COUNT(DISTINCT user_id) FROM sessions{where}", params)  # noqa: S608
    everyone = int(totals[0][1])
    found = inventory.platforms(store, since, until, min_users) if by == "family" else {}
    group = ", ".join(columns)
    result = store.rows(
        f"SELECT {group}, COUNT(*), COUNT(DISTINCT user_id), MIN(started_at), MAX(ended_at)"  # noqa: S608 (fixed column names)
        f" FROM sessions{where} GROUP BY {group}",
        params,
    )
    rows: list[Row] = []
    folded = 0
    for *keys, sessions, users, first, last in result:
        label = " ".join(str(k) for k in keys if k) or "unknown"
        share = int(users) / everyone if everyone else 0.0
        platforms = found.get(label, "") if by == "family" else None
        row = Row(label, int(sessions), int(users), str(first), str(last), share, platforms)
        if by != "day" and row.users < min_users:
            folded += 1
        else:
            rows.append(row)
    rows.sort(key=lambda r: (r.group if by == "day" else "", -r.sessions, r.group))
    if folded:
        key = _group_key(columns)
        small = (
            f"{key} IN (SELECT {key} FROM sessions{where} GROUP BY {group}"  # noqa: S608
            " HAVING COUNT(DISTINCT user_id) < ?)"
        )
        ((sessions, users, first, last),) = store.rows(
            "SELECT COUNT(*), COUNT(DISTINCT user_id), MIN(started_at), MAX(ended_at)"  # noqa: S608
            f" FROM sessions{where}{also(where)} {small}",
            [*params, *params, min_users],
        )
        share = int(users) / everyone if everyone else 0.0
        platforms = "" if by == "family" else None
        rows.append(
            Row("other", int(sessions), int(users), str(first), str(last), share, platforms)
        )
    no_id = store.rows(
        f"SELECT COUNT(*) FROM sessions{where}{also(where)} family = ?",  # noqa: S608
        [*params, NO_ID],
    )
    sessions = int(totals[0][0])
    return Summary(since, until, sessions, everyone, int(no_id[0][0]), rows, folded, min_users)


def as_table(summary: Summary, by: str) -> str:
    w = LABEL_WIDTH
    head = f"{by:<{w}} {'sessions':>9} {'users':>7} {'share':>6}  first seen           last seen"
    lines = [head, "-" * len(head)]
    for r in summary.rows:
        seen = f"{safe(r.first_seen)[:19]}  {safe(r.last_seen)[:19]}"
        counts = f"{r.sessions:>9} {r.users:>7} {r.share:>6.1%}"
        lines.append(f"{cut(safe(r.group), w):<{w}} {counts}  {seen}")
    if summary.folded:
        lines += ["", fold_note(summary, "group")]
    lines.append("")
    lines.append(
        f"{plural(summary.sessions, 'session')}, {plural(summary.users, 'distinct user')}, "
        f"{summary.no_id_share:.1%} of sessions sent no ID"
    )
    return "\n".join(lines) + "\n"


def as_csv(summary: Summary, by: str) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    family = by == "family"
    writer.writerow([by, "sessions", "users", "first_seen", "last_seen", "share",
                     *(["platforms"] if family else [])])  # fmt: skip
    for r in summary.rows:
        seen = [safe(r.first_seen), safe(r.last_seen)]
        platforms = [safe(r.platforms or "")] if family else []
        writer.writerow([safe(r.group), r.sessions, r.users, *seen, round(r.share, 4), *platforms])
    return out.getvalue()


def as_json(summary: Summary, by: str) -> str:
    data: dict[str, Any] = {
        "by": by,
        "since": summary.since,
        "until": summary.until,
        "sessions": summary.sessions,
        "users": summary.users,
        "no_id_share": round(summary.no_id_share, 4),
        "folded_groups": summary.folded,
        "folded_users": summary.hidden,
        "rows": [_json_row(r, by) for r in summary.rows],
    }
    return json.dumps(data, indent=2) + "\n"


def _json_row(row: Row, by: str) -> dict[str, Any]:
    data = asdict(row)
    data["share"] = round(row.share, 4)
    if by != "family":
        del data["platforms"]
    return data


def fold_note(summary: Summary, noun: str) -> str:
    """What folding hid: how many groups, how many distinct users in them."""
    groups = plural(summary.folded, noun)
    verb = "is" if summary.folded == 1 else "are"
    return (
        f"{groups} of fewer than {summary.min_users} users each {verb} shown together as "
        f'"other": {plural(summary.hidden, "user")} not shown by {noun}.'
    )


def trend_csv(trend: Trend) -> str:
    """One row a week: the week, each family's distinct users (empty where the family had
    fewer than the minimum that week), then "other"."""
    out = io.StringIO()
    writer = csv.writer(out)
    families = list(trend.series)
    writer.writerow(["week", *(safe(f) for f in families), "other"])
    for i, week in enumerate(trend.weeks):
        values = ["" if (v := trend.series[f][i]) is None else v for f in families]
        writer.writerow([week, *values, trend.other[i]])
    return out.getvalue()


def trend_json(trend: Trend) -> str:
    shift = inventory.changes(trend)
    data: dict[str, Any] = {
        "weeks": trend.weeks,
        "users": {safe(f): values for f, values in trend.series.items()},
        "other": trend.other,
        "changes": {
            "week": shift.week,
            "previous": shift.previous,
            "appeared": [safe(f) for f in shift.appeared],
            "disappeared": [safe(f) for f in shift.disappeared],
        },
    }
    return json.dumps(data, indent=2) + "\n"


def _changed(trend: Trend) -> str:
    """What changed, in words: the families that appeared and disappeared in the last week."""
    shift = inventory.changes(trend)
    if shift.week is None:
        return "No sessions in the period."
    if shift.previous is None:
        return "One week only: nothing to compare."
    appeared = ", ".join(safe(f) for f in shift.appeared) or "none"
    gone = ", ".join(safe(f) for f in shift.disappeared) or "none"
    return f"{shift.week} against {shift.previous}: appeared {appeared}; disappeared {gone}."


def trend_table(trend: Trend) -> str:
    """A week a line, a column a family ("-" where it had fewer than the minimum), then what
    changed."""
    families = list(trend.series)
    names = [cut(safe(f), 24) for f in families] + ["other"]
    widths = [max(len(n), 5) for n in names]
    head = f"{'week':<8}" + "".join(f" {n:>{w}}" for n, w in zip(names, widths, strict=True))
    lines = [head, "-" * len(head)]
    for i, week in enumerate(trend.weeks):
        values = ["-" if (v := trend.series[f][i]) is None else str(v) for f in families]
        cells = zip([*values, str(trend.other[i])], widths, strict=True)
        lines.append(f"{week:<8}" + "".join(f" {v:>{w}}" for v, w in cells))
    lines += ["", _changed(trend)]
    return "\n".join(lines) + "\n"


def export(
    store: Store, by: str, form: str, *, since: str | None = None, until: str | None = None,
    min_users: int = 5,
) -> str:  # fmt: skip
    """`imapveil stats --by BY --format FORM`: a table, CSV or JSON of the groups `by` (one of
    `BY`), or of the weeks (`week`)."""
    if by == "week":
        trend = inventory.trend(store, since, until, min_users)
        return {"table": trend_table, "csv": trend_csv, "json": trend_json}[form](trend)
    summary = summarize(store, by, since, until, min_users)
    return {"table": as_table, "csv": as_csv, "json": as_json}[form](summary, by)


_bars = bar_chart
"""The bar chart (the name tests and earlier callers use)."""


def _table(head: list[str], rows: list[list[str | int]]) -> str:
    """An HTML table; numbers right-aligned, text escaped and made safe."""

    def cell(tag: str, value: str | int) -> str:
        if isinstance(value, int):
            return f'<{tag} class="n">{value}</{tag}>'
        numeric = value == "\u2013" or (value.endswith("%") and value[:1].isdigit())
        kind = ' class="n"' if numeric else ""
        return f"<{tag}{kind}>{html.escape(safe(value))}</{tag}>"

    header = "".join(cell("th", h) for h in head)
    body = "".join("<tr>" + "".join(cell("td", v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"


def _figure(chart: str, table: str, note: str = "") -> str:
    """A chart with its table beside it (below it where the page is narrow), and a note."""
    notes = f'<p class="note">{html.escape(note)}</p>' if note else ""
    return f'<div class="figure">{chart}<div class="table">{table}</div></div>{notes}'


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "0.0%"


def _groups(summary: Summary, noun: str, unit: str) -> str:
    """A bar chart of `summary`'s groups by `unit` and their table beside it."""
    bars = [(r.group, r.users if unit == "user" else r.sessions) for r in summary.rows]
    chart = _bars(noun, bars, unit)
    rows: list[list[str | int]] = [
        [r.group, r.users, f"{r.share:.1%}", r.sessions] for r in summary.rows
    ]
    kind = BY_TITLE.get(noun, "group")
    table = _table([kind, "users", "share", "sessions"], rows)
    return _figure(chart, table, fold_note(summary, kind) if summary.folded else "")


BY_TITLE = {"Clients (sessions)": "client", "Versions per client": "version",
            "Operating systems": "operating system"}  # fmt: skip
"""The first column's heading of a chart's table."""

STYLE = """
:root { color-scheme: light dark; --fg: #1d1d1f; --bg: #ffffff; --muted: #555555;
  --bar: #3b6ea5; --grid: #cccccc; --rule: #dddddd; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e8e8e8; --bg: #16181c; --muted: #a8a8a8; --bar: #6fa3dc; --grid: #4a4a4a;
    --rule: #33363b; }
}
body { font-family: system-ui, sans-serif; margin: 2em; color: var(--fg); background: var(--bg); }
h2 { margin-top: 1.6em; border-bottom: 1px solid var(--rule); }
.summary { font-size: 1.15em; }
.meta, .note { color: var(--muted); }
.note { border-left: 3px solid var(--bar); padding-left: 0.6em; }
.figure { display: flex; flex-wrap: wrap; gap: 1em 2em; align-items: flex-start; margin: 1em 0; }
.table { max-width: 100%; overflow-x: auto; }
.chart { display: block; max-width: 100%; height: auto; font-size: 13px; fill: currentColor; }
.chart .title { font-weight: bold; font-size: 15px; }
.chart .bar { fill: var(--bar); }
.chart .axis { stroke: var(--grid); }
.chart .line { fill: none; stroke-width: 2; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 0.2em 0.6em; border-bottom: 1px solid var(--rule); text-align: left; }
th.n, td.n { text-align: right; font-variant-numeric: tabular-nums; }
@page { size: A4; margin: 14mm; }
@media print {
  :root { --fg: #000000; --bg: #ffffff; --muted: #444444; --bar: #3b6ea5; --grid: #bbbbbb;
    --rule: #cccccc; }
  body { margin: 0; font-size: 11pt; }
  .figure, table, .summary { break-inside: avoid; }
  .table { overflow: visible; }
  h2 { break-after: avoid; }
}
"""
"""The page's style: light and dark, and A4 when printed."""


def html_report(
    store: Store, since: str | None = None, until: str | None = None, min_users: int = 5,
    *, now: datetime.datetime | None = None,
) -> str:  # fmt: skip
    families = summarize(store, "family", since, until, min_users)
    versions = summarize(store, "version", since, until, min_users)
    systems = summarize(store, "os", since, until, min_users)
    days = summarize(store, "day", since, until, min_users)
    trend = inventory.trend(store, since, until, min_users)
    proxies = inventory.proxies(store, since, until)
    made = (now or datetime.datetime.now(datetime.UTC)).astimezone(datetime.UTC)
    by_users = sorted(families.rows, key=lambda r: (r.group == "other", -r.users, r.group))
    inventory_table = _table(
        ["client", "users", "share", "sessions", "first seen", "last seen", "platforms"],
        [[r.group, r.users, f"{r.share:.1%}", r.sessions, r.first_seen[:10], r.last_seen[:10],
          r.platforms or ""] for r in by_users],
    )  # fmt: skip
    users_chart = _bars("Clients (distinct users)", [(r.group, r.users) for r in by_users], "user")
    sent = families.sessions - families.no_id_sessions
    id_rows: list[list[str | int]] = [
        ["sent an ID", sent, _share(sent, families.sessions)],
        ["no ID", families.no_id_sessions, _share(families.no_id_sessions, families.sessions)],
    ]
    sections = [
        "<h2>Inventory</h2>",
        _figure(
            users_chart, inventory_table, fold_note(families, "client") if families.folded else ""
        ),
        # Who runs an outdated or unsupported version (the security team's question).
        currency.as_html(currency.currency_rows(store, since, until, min_users)),
        "<h2>Trends</h2>",
        _trend_section(trend, min_users),
        "<h2>Clients, versions, systems</h2>",
        _groups(families, "Clients (sessions)", "session"),
        _groups(versions, "Versions per client", "session"),
        _groups(systems, "Operating systems", "session"),
        "<h2>Sessions</h2>",
        _figure(
            _bars("Sessions per day", [(r.group, r.sessions) for r in days.rows], "session"),
            _table(
                ["day", "sessions", "users"], [[r.group, r.sessions, r.users] for r in days.rows]
            ),
        ),
        _figure(
            _bars("Sessions without ID", [(str(r[0]), int(r[1])) for r in id_rows], "session"),
            _table(["", "sessions", "share"], id_rows),
        ),
    ]
    first = min((r.first_seen for r in families.rows), default="")[:10]
    last = max((r.last_seen for r in families.rows), default="")[:10]
    period = f"{since or first or 'the beginning'} to {until or last or 'now'}"
    names = ", ".join(safe(p) for p in proxies) or "none"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>imapveil: mail clients in use</title>
<style>{STYLE}</style></head><body>
<h1>Mail clients in use</h1>
<p class="summary">{html.escape(_headline(families, by_users))}</p>
<p class="meta">Period: {html.escape(period)} (UTC) · generated {made:%Y-%m-%d %H:%M} UTC ·
{plural(len(proxies), "proxy").replace("proxys", "proxies")}: {html.escape(names)} · groups of
fewer than {min_users} users are shown together as "other".</p>
{"".join(sections)}
</body></html>
"""


def _headline(families: Summary, by_users: list[Row]) -> str:
    """The summary line: users, sessions, the largest clients' shares, sessions without ID."""
    top = [r for r in by_users if r.group != "other"][:4]
    shares = ", ".join(f"{safe(r.group)} {r.share:.1%}" for r in top)
    more = ", …" if len(by_users) > len(top) else ""
    return (
        f"{plural(families.users, 'distinct user')} in {plural(families.sessions, 'session')}"
        + (f"; of the users: {shares}{more}" if shares else "")
        + f"; {families.no_id_share:.1%} of sessions sent no ID."
    )


def _trend_section(trend: Trend, min_users: int) -> str:
    if not trend.weeks:
        return '<p class="note">No sessions in the period.</p>'
    families = sorted(trend.series)
    rows: list[list[str | int]] = [
        [week, *("\u2013" if (v := trend.series[f][i]) is None else v for f in families),
         trend.other[i]]
        for i, week in enumerate(trend.weeks)
    ]  # fmt: skip
    chart = line_chart("Distinct users per client and week", trend)
    table = _table(["week", *families, "other"], rows)
    said = _changed(trend)
    note = (f"A client with fewer than {min_users} users in a week is counted in \"other\" that "
            "week (\u2013), its line broken.")  # fmt: skip
    return (
        _figure(chart, table, note)
        + f'<p class="changes"><strong>What changed:</strong> {html.escape(said)}</p>'
    )
