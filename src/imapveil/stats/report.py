"""Reports from the store: tables for people, CSV/JSON for machines, one self-contained HTML page.

`summarize` and `export` are `imapveil stats`; `build` computes the page's tables once (see
`stats.tables`: the page, `imapveil report --export`'s CSV and JSON are written from them) and
`render` makes the page. docs/report.md says what each table is.

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
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from imapveil.stats import currency, inventory, periods, tables, traits
from imapveil.stats.charts import CHAR_WIDTH as CHAR_WIDTH  # noqa: PLC0414 (re-exported)
from imapveil.stats.charts import LABEL_WIDTH as LABEL_WIDTH  # noqa: PLC0414 (re-exported)
from imapveil.stats.charts import bar_chart, columns, fit, line_chart, matrix_chart
from imapveil.stats.charts import cut as cut  # noqa: PLC0414 (re-exported)
from imapveil.stats.charts import plural as plural  # noqa: PLC0414 (re-exported)
from imapveil.stats.charts import safe as safe  # noqa: PLC0414 (re-exported)
from imapveil.stats.identify import NO_ID
from imapveil.stats.inventory import Inferred, Trend, also
from imapveil.stats.inventory import where as _where
from imapveil.stats.labels import Label
from imapveil.stats.store import Store
from imapveil.stats.tables import Cell, Table, disarm, table

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
        sessions, users, first, last = inventory.folded_totals(
            store, "sessions", columns, where, params, min_users=min_users, user="user_id",
            select="COUNT(*), COUNT(DISTINCT user_id), MIN(started_at), MAX(ended_at)",
        )  # fmt: skip
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
        lines.append(f"{fit(r.group, w)} {counts}  {seen}")
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
        seen = [disarm(r.first_seen), disarm(r.last_seen)]
        platforms = [disarm(r.platforms or "")] if family else []
        writer.writerow(
            [disarm(r.group), r.sessions, r.users, *seen, round(r.share, 4), *platforms]
        )
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
    """A row for JSON, its text made safe as every other output's (a consumer's `jq -r` must
    not write a client's escape sequences to a terminal)."""
    data = {k: safe(v) if isinstance(v, str) else v for k, v in asdict(row).items()}
    data["share"] = round(row.share, 4)
    if by != "family":
        del data["platforms"]
    return data


def trend_csv(trend: Trend) -> str:
    """One row a week: the week, each family's distinct users (empty where the family had
    fewer than the minimum that week), then "other"."""
    out = io.StringIO()
    writer = csv.writer(out)
    families = list(trend.series)
    writer.writerow(["week", *(disarm(f) for f in families), "other"])
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
    names = [*families, "other"]
    widths = [max(min(columns(n), 24), 5) for n in names]
    head = f"{'week':<8}" + "".join(
        f" {fit(n, w, right=True)}" for n, w in zip(names, widths, strict=True)
    )
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


# The report's tables: the page shows them, `imapveil report --export DIR` writes them.

GROUP_TITLES = {"family": "client", "version": "version", "os": "operating system"}
"""The first column's heading of a group's table."""


def _meta(summary: Summary) -> dict[str, Any]:
    return {"folded_groups": summary.folded, "folded_users": summary.hidden}


NAMED = "ID"
"""The inventory's `source` of a family as its clients' ID named it ("no ID": they sent none)."""
INFERRED = "inferred from a labelled fingerprint"
"""The inventory's `source` of a family inferred from the administrator's fingerprint labels."""


def inventory_table(families: Summary, inferred: Inferred | None = None) -> Table:
    """Per client family, most users first: where it is known from, users, share, sessions,
    first and last seen (days), platforms; then, in rows of their own after "other", the
    families inferred from labelled fingerprints (users that sent no ID), never added to the
    families named in an ID."""
    inferred = inferred or Inferred(min_users=families.min_users)
    by_users = sorted(families.rows, key=lambda r: (r.group == "other", -r.users, r.group))
    fold = inferred.folded
    rows: list[list[Cell]] = [
        [r.group, NAMED, r.users, r.share, r.sessions, r.first_seen[:10], r.last_seen[:10],
         r.platforms or ""] for r in by_users
    ]  # fmt: skip
    rows += [
        [r.family, INFERRED, r.users, r.share, r.sessions, r.first_seen[:10], r.last_seen[:10],
         r.platforms] for r in inferred.rows
    ]  # fmt: skip
    return table(
        "inventory", "Inventory",
        [("client", "client", "text"), ("source", "from", "text"), ("users", "users", "count"),
         ("share", "share", "share"), ("sessions", "sessions", "count"),
         ("first_seen", "first seen", "date"), ("last_seen", "last seen", "date"),
         ("platforms", "platforms", "text")],
        rows,
        [fold_note(families, "client") if families.folded else "",
         _inferred_note(inferred)],
        **_meta(families), inferred_folded_groups=fold.groups, inferred_folded_users=fold.users,
    )  # fmt: skip


def _inferred_note(inferred: Inferred) -> str:
    """What the inferred rows are, and what their floor hid; nothing without any."""
    fold = inferred.folded
    if not inferred.rows and not fold.groups:
        return ""
    hidden = (
        f" {plural(fold.groups, 'inferred client')} of fewer than {inferred.min_users} users "
        f"each {'is' if fold.groups == 1 else 'are'} not shown: {plural(fold.users, 'user')}."
        if fold.groups else ""
    )  # fmt: skip
    return (
        f'Rows "{INFERRED}": users whose sessions sent no ID (so counted in the "{NO_ID}" row '
        "too) and whose TLS or behaviour fingerprint the administrator labelled as that client "
        f"(fingerprint_labels). A label is the administrator's word, not what the client said: "
        f"these users are never added to the rows from an ID.{hidden}"
    )


def groups_table(name: str, title: str, summary: Summary, by: str) -> Table:
    """A group (client, version, operating system) a row, most sessions first."""
    kind = GROUP_TITLES[by]
    return table(
        name, title,
        [(kind.replace(" ", "_"), kind, "text"), ("users", "users", "count"),
         ("share", "share", "share"),
         ("sessions", "sessions", "count")],
        [[r.group, r.users, r.share, r.sessions] for r in summary.rows],
        [fold_note(summary, kind) if summary.folded else ""],
        **_meta(summary),
    )  # fmt: skip


def currency_table(found: currency.Currency, min_users: int) -> Table:
    other = next((r for r in found.rows if r.group == "other"), None)
    note = (
        f"Groups (a client and a class) of fewer than {min_users} users each are shown "
        f'together as "other": {plural(other.users, "user")} not shown by client.'
        if other else ""
    )  # fmt: skip
    return table(
        "currency", "Version currency",
        [("client", "client", "text"), ("users", "users", "count"),
         *((c, c, "count") for c in currency.CLASSES), ("checked", "values checked", "date")],
        [[r.group, r.users, *(getattr(r, c) for c in currency.CLASSES), r.checked or ""]
         for r in found.rows],
        ["Each user is counted once per client, by their most recent session; current, "
         "outdated and unsupported by the release lines of clients.toml, checked on the date "
         "shown.", note],
        folded_users=other.users if other else 0,
    )  # fmt: skip


def weeks_table(trend: Trend, min_users: int) -> Table:
    families = sorted(trend.series)
    return table(
        "weeks", "Distinct users per client and week",
        [("week", "week", "date"), *((f, f, "count") for f in families),
         ("other", "other", "count")],
        [[week, *(trend.series[f][i] for f in families), trend.other[i]]
         for i, week in enumerate(trend.weeks)],
        [f'A client with fewer than {min_users} users in a week is counted in "other" that '
         "week (\u2013, empty in CSV, null in JSON), its line broken."],
    )  # fmt: skip


def changes_table(found: periods.Comparison) -> Table:
    floor = max(found.min_users, 1)
    return table(
        "changes", "What changed since the previous period",
        [("client", "client", "text"), ("change", "change", "text"),
         ("users_before", "users before", "count"), ("users_now", "users now", "count"),
         ("difference", "difference", "change"), ("difference_share", "in %", "change_share")],
        [[r.family, r.change, r.before, r.now, r.difference, r.ratio] for r in found.rows],
        [periods.said(found),
         f"A client's users are shown for a period only if it had at least {floor} in it "
         "(\u2013 where not): it appeared if it reached that many, it disappeared if it fell "
         "under; a client under it in both periods is not named."],
        period=asdict(found.period) if found.period else None,
        previous=asdict(found.previous) if found.previous else None,
        users_now=found.users_now, users_before=found.users_before,
    )  # fmt: skip


def extensions_table(usage: traits.ExtensionUsage) -> Table:
    """Per client family (most users first) and IMAP extension: the distinct users that used
    it, their share of the family's users whose extensions are known, the sessions."""
    known = dict(usage.families)
    fold = usage.folded
    verb = "is" if fold.groups == 1 else "are"
    note = (
        f"{plural(fold.groups, 'group')} (a client and an extension) of fewer than "
        f"{usage.min_users} users each {verb} not shown: {plural(fold.users, 'user')} in them."
        if fold.groups else ""
    )  # fmt: skip
    return table(
        "extensions", "Extensions in use",
        [("client", "client", "text"), ("extension", "extension", "text"),
         ("users", "users", "count"), ("share", "share of the client's users", "share"),
         ("sessions", "sessions", "count"),
         ("client_users", "client's users (extensions known)", "count")],
        [[r.family, r.extension, r.users, r.share, r.sessions, known[r.family]]
         for r in usage.rows],
        ["The IMAP extensions a client used: ENABLEd capabilities, extension commands and "
         "command options. A share is of the client's users whose sessions' extensions are "
         "known (recorded since the store keeps them); an empty cell in the chart: fewer than "
         f"{usage.min_users} of them used it, or none.", note],
        folded_groups=fold.groups, folded_users=fold.users,
    )  # fmt: skip


TOP_FINGERPRINTS = 10
"""How many unlabelled fingerprints of each kind the report lists, most users first."""


def fingerprints_table(usage: traits.FingerprintUsage, top: int = TOP_FINGERPRINTS) -> Table:
    """The fingerprints no label names, JA4 then behaviour, the `top` with most users of each
    kind: users, sessions, users without ID, and the clients that named themselves in an ID in
    sessions with the same fingerprint (what tells an administrator what an unlabelled one is).
    Only fingerprints, and clients beside them, of at least `min_users` users."""
    rows: list[traits.FingerprintRow] = []
    more = 0
    for kind in traits.KINDS:
        unlabelled = [r for r in usage.rows if r.kind == kind and r.label is None]
        rows += unlabelled[:top]
        more += max(len(unlabelled) - top, 0)
    labelled = sum(r.label is not None for r in usage.rows)
    return table(
        "fingerprints", "Fingerprints without a label",
        [("kind", "kind", "text"), ("fingerprint", "fingerprint", "text"),
         ("users", "users", "count"), ("sessions", "sessions", "count"),
         ("no_id_users", "users without ID", "count"),
         ("named", "clients named in an ID beside it", "text")],
        [[r.kind, r.fingerprint, r.users, r.sessions, r.no_id_users,
          ", ".join(f"{f.family} ({f.users})" for f in r.families)] for r in rows],
        ["The TLS (JA4) and behaviour fingerprints that no label names, with the clients that "
         "named themselves in an ID in sessions with the same fingerprint: labelling one "
         "(docs/fingerprints.md) counts its users without ID as inferred users of that client "
         f"in the inventory. Users without ID: \u2013 where fewer than {usage.min_users}.",
         _fingerprints_note(usage, more, labelled)],
        folded={kind: asdict(fold) for kind, fold in usage.folded.items()},
        labelled=labelled, more=more,
    )  # fmt: skip


def _fingerprints_note(usage: traits.FingerprintUsage, more: int, labelled: int) -> str:
    """What the list leaves out: the floor's fingerprints, those past the top, labelled ones."""
    said = [
        f"{plural(fold.groups, f'{kind} fingerprint')} of fewer than {usage.min_users} users "
        f"each ({plural(fold.users, 'user')})"
        for kind, fold in usage.folded.items()
        if fold.groups
    ]
    if more:
        said.append(f"{more} more with fewer users (imapveil stats --by fingerprint lists them)")
    if labelled:
        said.append(f"{labelled} labelled (their users without ID are in the inventory)")
    return f"Not listed: {'; '.join(said)}." if said else ""


def days_table(days: Summary) -> Table:
    return table(
        "days", "Sessions per day",
        [("day", "day", "date"), ("sessions", "sessions", "count"), ("users", "users", "count")],
        [[r.group, r.sessions, r.users] for r in days.rows],
    )  # fmt: skip


def id_table(families: Summary) -> Table:
    sent = families.sessions - families.no_id_sessions
    whole = families.sessions or 1
    return table(
        "id", "Sessions with and without ID",
        [("id", "", "text"), ("sessions", "sessions", "count"), ("share", "share", "share")],
        [["sent an ID", sent, sent / whole],
         ["no ID", families.no_id_sessions, families.no_id_sessions / whole]],
    )  # fmt: skip


TABLES = ("inventory", "changes", "currency", "extensions", "fingerprints", "weeks", "clients",
          "versions", "systems", "days", "id")  # fmt: skip
"""The report's tables, in the page's order: the names of their exported files."""


@dataclass(frozen=True, slots=True)
class Report:
    """Everything the page shows, computed once: its tables (by name, in the page's order) and
    what the page says around them."""

    since: str | None
    until: str | None
    min_users: int
    made: datetime.datetime
    proxies: list[str]
    families: Summary
    trend: Trend
    tables: dict[str, Table]

    @property
    def period(self) -> str:
        first = min((r.first_seen for r in self.families.rows), default="")[:10]
        last = max((r.last_seen for r in self.families.rows), default="")[:10]
        since = self.since[:16].replace("T", " ") if self.since else first or "the beginning"
        until = periods.last_day(self.until) if self.until else last or "now"
        return f"{since} to {until}"


def build(
    store: Store, since: str | None = None, until: str | None = None, min_users: int = 5,
    *, now: datetime.datetime | None = None, labels: Mapping[str, Label] | None = None,
) -> Report:  # fmt: skip
    """The report's numbers, every group k-floored by `min_users`; `labels` (fingerprint
    labels, `stats.labels.load_labels`) add the inventory's inferred rows."""
    made = (now or datetime.datetime.now(datetime.UTC)).astimezone(datetime.UTC)
    families = summarize(store, "family", since, until, min_users)
    trend = inventory.trend(store, since, until, min_users)
    found = [
        inventory_table(families, inventory.inferred(store, since, until, min_users, labels)),
        changes_table(periods.compare(store, since, until, min_users, now=made)),
        currency_table(currency.currency_rows(store, since, until, min_users), min_users),
        extensions_table(traits.extension_usage(store, since, until, min_users)),
        fingerprints_table(traits.fingerprint_usage(store, since, until, min_users, labels)),
        weeks_table(trend, min_users),
        groups_table("clients", "Clients (sessions)", families, "family"),
        groups_table("versions", "Versions per client",
                     summarize(store, "version", since, until, min_users), "version"),
        groups_table("systems", "Operating systems",
                     summarize(store, "os", since, until, min_users), "os"),
        days_table(summarize(store, "day", since, until, min_users)),
        id_table(families),
    ]  # fmt: skip
    common = {"since": since, "until": until, "min_users": min_users,
              "generated": made.isoformat(timespec="seconds")}  # fmt: skip
    named = {t.name: replace(t, meta={**common, **t.meta}) for t in found}
    assert tuple(named) == TABLES, tuple(named)
    proxies = inventory.proxies(store, since, until)
    return Report(since, until, min_users, made, proxies, families, trend, named)


def fold_note(summary: Summary, noun: str) -> str:
    """What folding hid: how many groups, how many distinct users in them."""
    groups = plural(summary.folded, noun)
    verb = "is" if summary.folded == 1 else "are"
    return (
        f"{groups} of fewer than {summary.min_users} users each {verb} shown together as "
        f'"other": {plural(summary.hidden, "user")} not shown by {noun}.'
    )


# The page.

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
.chart .cell { fill: var(--bar); }
.chart .head { font-weight: 600; }
.chart .muted { fill: var(--muted); font-weight: normal; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 0.2em 0.6em; border-bottom: 1px solid var(--rule); text-align: left; }
th.n, td.n { text-align: right; font-variant-numeric: tabular-nums; }
td.n, td.d { white-space: nowrap; }
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


def _figure(chart: str, found: Table) -> str:
    """A chart with its table beside it (below it where the page is narrow), and the notes."""
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in found.notes)
    return (
        f'<div class="figure">{chart}<div class="table">{tables.as_html(found)}</div></div>{notes}'
    )


def _bars_of(found: Table, label: str, value: str, unit: str, title: str | None = None) -> str:
    """A bar chart of a table's column `value` by its column `label`."""
    pairs = zip(found.column(label), found.column(value), strict=True)
    return bar_chart(title or found.title, [(str(k), int(v or 0)) for k, v in pairs], unit)


def _alone(found: Table, css: str = "") -> str:
    """A table without a chart, and its notes."""
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in found.notes)
    return f'<div class="table{css}">{tables.as_html(found)}</div>{notes}'


def _changes(found: Table) -> str:
    """What changed: the sentence, then the table if there is anything in it."""
    said, *rest = found.notes
    text = f'<p class="changes">{html.escape(said)}</p>'
    if not found.rows:
        return text
    return text + _alone(replace(found, notes=tuple(rest)))


def _sections(report: Report) -> list[str]:
    t = report.tables
    return [
        _section("inventory", "Inventory", _figure(_inventory_chart(t["inventory"]),
                                                   t["inventory"])),
        _section("changes", "What changed since the previous period", _changes(t["changes"])),
        # Who runs an outdated or unsupported version (the security team's question).
        _section("currency", "Version currency", _alone(t["currency"])),
        # Which IMAP extensions each client uses (the mail-server operator's question).
        _section("extensions", "Extensions in use", _extensions(t["extensions"])),
        # What the unlabelled fingerprints are (the administrator's question before labelling).
        _section("fingerprints", "Fingerprints without a label", _fingerprints(t["fingerprints"])),
        _section("trends", "Trends", _trend(report.trend, t["weeks"])),
        _section("groups", "Clients, versions, systems",
                 *(_figure(_bars_of(t[n], t[n].columns[0].key, "sessions", "session"), t[n])
                   for n in ("clients", "versions", "systems"))),
        _section("sessions", "Sessions",
                 _figure(_bars_of(t["days"], "day", "sessions", "session"), t["days"]),
                 _figure(_bars_of(t["id"], "id", "sessions", "session", "Sessions without ID"),
                         t["id"])),
    ]  # fmt: skip


def _inventory_chart(found: Table) -> str:
    """Distinct users per client; an inferred row's bar says so ("Outlook (inferred)")."""
    rows = zip(found.column("client"), found.column("source"), found.column("users"), strict=True)
    bars = [(str(c) if s == NAMED else f"{c} (inferred)", int(n or 0)) for c, s, n in rows]
    return bar_chart("Clients (distinct users)", bars, "user")


def _fingerprints(found: Table) -> str:
    """The table, or a note that there is nothing to list; the notes."""
    if found.rows:
        return _alone(found)
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in found.notes[1:])
    return (
        f'<p class="note">No fingerprint without a label was seen by at least '
        f"{found.meta.get('min_users', 0)} users in the period.</p>{notes}"
    )


def _section(css: str, title: str, *parts: str) -> str:
    return f'<section class="{css}"><h2>{html.escape(title)}</h2>{"".join(parts)}</section>'


def _trend(trend: Trend, weeks: Table) -> str:
    if not trend.weeks:
        return '<p class="note">No sessions in the period.</p>'
    return _figure(line_chart(weeks.title, trend), weeks)


def _extensions(found: Table) -> str:
    """A matrix of clients and extensions (each cell the share of the client's users), and the
    table of the same rows."""
    if not found.rows:
        return (
            '<p class="note">No session in the period has its extensions recorded (the store '
            "keeps them for sessions since this version of imapveil).</p>"
        )
    rows = list(zip(found.column("client"), found.column("extension"), found.column("users"),
                    found.column("share"), found.column("client_users"), strict=True))  # fmt: skip
    clients = list(dict.fromkeys((str(c), str(n)) for c, _, _, _, n in rows))
    total: dict[str, int] = defaultdict(int)
    for _, extension, users, _, _ in rows:
        total[str(extension)] += int(users or 0)
    order = sorted(total, key=lambda e: (-total[e], e))
    chart = matrix_chart(
        "Extensions in use (share of each client's users)",
        [(c, f"{plural(int(n), 'user')}") for c, n in clients],
        order,
        {(str(e), str(c)): float(share or 0.0) for c, e, _, share, _ in rows},
    )
    return _figure(chart, found)


def html_report(
    store: Store, since: str | None = None, until: str | None = None, min_users: int = 5,
    *, now: datetime.datetime | None = None, labels: Mapping[str, Label] | None = None,
) -> str:  # fmt: skip
    return render(build(store, since, until, min_users, now=now, labels=labels))


def render(report: Report) -> str:
    """The report as one self-contained HTML page (no scripts, no external resources)."""
    names = ", ".join(safe(p) for p in report.proxies) or "none"
    proxies = plural(len(report.proxies), "proxy").replace("proxys", "proxies")
    made = f"{report.made:%Y-%m-%d %H:%M}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>imapveil: mail clients in use</title>
<style>{STYLE}</style></head><body>
<h1>Mail clients in use</h1>
<p class="summary">{html.escape(_headline(report.families, report.tables["inventory"]))}</p>
<p class="meta">Period: {html.escape(report.period)} (UTC) · generated {made} UTC ·
{proxies}: {html.escape(names)} · groups of fewer than {report.min_users} users are shown together
as "other".</p>
{"".join(_sections(report))}
</body></html>
"""


def _headline(families: Summary, found: Table) -> str:
    """The summary line: users, sessions, the largest clients' shares (as the inventory's
    table shows them), sessions without ID."""
    by_users = [(client, share) for client, source, share in zip(
        found.column("client"), found.column("source"), found.column("share"), strict=True)
        if source == NAMED]  # fmt: skip
    top = [(client, share) for client, share in by_users if client != "other"][:4]
    shares = ", ".join(f"{safe(str(c))} {float(s or 0):.1%}" for c, s in top)
    more = ", …" if len(by_users) > len(top) else ""
    return (
        f"{plural(families.users, 'distinct user')} in {plural(families.sessions, 'session')}"
        + (f"; of the users: {shares}{more}" if shares else "")
        + f"; {families.no_id_share:.1%} of sessions sent no ID."
    )
