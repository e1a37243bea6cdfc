"""The queries behind the report's inventory and trends: platforms per client family, distinct
users per family and ISO week, the families that appeared or disappeared, the proxies.

Every group is k-floored as in every report: a family (or a family's platform) with fewer than
`min_users` distinct users, in the period or in a week, is never shown as itself. `grouped` is
that floor for any grouping of sessions (and of the tables joined to them), `folded_totals` what
the groups under it hold together.

`inferred` is the other half of the inventory: sessions that sent no ID but whose fingerprint an
administrator labelled (see `stats.labels`), counted under the labelled family as inferred users,
apart from the users whose client named itself.
"""

from __future__ import annotations

import datetime
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from imapveil.stats.identify import NO_ID
from imapveil.stats.labels import Label
from imapveil.stats.store import Store


def where(
    since: str | None, until: str | None, column: str = "started_at"
) -> tuple[str, list[str]]:
    """The WHERE clause (with its parameters) of a period; '' for all of the store. `column`:
    the session's start (`s.started_at` where sessions are joined as `s`)."""
    clauses, params = [], []
    if since:
        clauses.append(f"{column} >= ?")
        params.append(since)
    if until:
        clauses.append(f"{column} < ?")
        params.append(until)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def also(where_clause: str) -> str:
    """What joins one more condition to `where_clause`."""
    return " AND" if where_clause else " WHERE"


def platforms(
    store: Store, since: str | None = None, until: str | None = None, min_users: int = 5
) -> dict[str, str]:
    """Per family, its platforms with their distinct users, most first ("Windows (150), Linux
    (50)"); the platforms of fewer than `min_users` users of that family are one "other",
    without a number."""
    clause, params = where(since, until)
    found: dict[str, dict[str, int]] = defaultdict(dict)
    for family, platform, users in store.rows(
        f"SELECT family, platform, COUNT(DISTINCT user_id) FROM sessions{clause}"  # noqa: S608
        " GROUP BY family, platform",
        params,
    ):
        found[str(family)][str(platform or "unknown")] = int(users)
    return {family: platform_text(counts, min_users) for family, counts in found.items()}


def platform_text(users: Mapping[str, int], min_users: int) -> str:
    """Platforms with their distinct users, most first ("Windows (150), Linux (50)"); those of
    fewer than `min_users` users one "other", without a number."""
    shown = sorted(((n, name) for name, n in users.items() if n >= min_users), key=_most_first)
    text = ", ".join(f"{name} ({n})" for n, name in shown)
    if len(shown) < len(users):
        text = f"{text}, other" if text else "other"
    return text


def _most_first(item: tuple[int, str]) -> tuple[int, str]:
    return -item[0], item[1]


@dataclass(frozen=True, slots=True)
class Fold:
    """What the floor hid: groups of fewer than the minimum of users, and the distinct users
    in them (each counted once, however many of those groups they were in)."""

    groups: int = 0
    users: int = 0


def grouped(
    store: Store, source: str, columns: Sequence[str], condition: str, params: Sequence[Any],
    *, min_users: int, user: str = "s.user_id",
) -> tuple[list[tuple[Any, ...]], Fold]:  # fmt: skip
    """The groups of `source` (a FROM clause; sessions as `s`) by `columns` (SQL expressions)
    under `condition` (a WHERE clause, or ''): `(*keys, distinct users, rows)` for each group of
    at least `min_users` users, and the `Fold` of the others."""
    keys = ", ".join(columns)
    rows = store.rows(
        f"SELECT {keys}, COUNT(DISTINCT {user}), COUNT(*) FROM {source}{condition}"  # noqa: S608 (fixed names)
        f" GROUP BY {keys}",
        params,
    )
    shown = [row for row in rows if int(row[-2]) >= min_users]
    if len(shown) == len(rows):
        return shown, Fold()
    (users,) = folded_totals(
        store, source, columns, condition, params, min_users=min_users, user=user,
        select=f"COUNT(DISTINCT {user})",
    )  # fmt: skip
    return shown, Fold(len(rows) - len(shown), int(users))


def folded_totals(
    store: Store, source: str, columns: Sequence[str], condition: str, params: Sequence[Any],
    *, min_users: int, select: str, user: str = "s.user_id",
) -> tuple[Any, ...]:  # fmt: skip
    """`select` (aggregates) over the rows of `source` under `condition` that are in the groups
    by `columns` of fewer than `min_users` distinct users, all those groups together: a user of
    several of them is one user (the "other" row, the floor's note)."""
    key = group_key(columns)
    small = (
        f"{key} IN (SELECT {key} FROM {source}{condition} GROUP BY {', '.join(columns)}"  # noqa: S608
        f" HAVING COUNT(DISTINCT {user}) < ?)"
    )
    ((*found,),) = store.rows(
        f"SELECT {select} FROM {source}{condition}{also(condition)} {small}",  # noqa: S608
        [*params, *params, min_users],
    )
    return tuple(found)


def group_key(columns: Sequence[str]) -> str:
    """One text per group of `columns`, the same on SQLite and PostgreSQL, NULL told apart from
    '' and no two groups alike (each part is its length and itself)."""
    parts = [
        f"(CASE WHEN {c} IS NULL THEN 'n' ELSE 'v' || LENGTH({c}) || ':' || {c} END)"
        for c in columns
    ]
    return " || '/' || ".join(parts)


def proxies(store: Store, since: str | None = None, until: str | None = None) -> list[str]:
    """The names of the proxies that wrote sessions in the period."""
    clause, params = where(since, until)
    rows = store.rows(f"SELECT DISTINCT proxy FROM sessions{clause}", params)  # noqa: S608
    return sorted(str(name) for (name,) in rows)


def _monday(store: Store) -> str:
    """SQL for the Monday (YYYY-MM-DD) of a session's ISO week, on either database."""
    if store.postgres:
        return "TO_CHAR(DATE_TRUNC('week', CAST(day AS DATE)), 'YYYY-MM-DD')"
    return "DATE(day, 'weekday 0', '-6 days')"


def iso_week(monday: str) -> str:
    """`2026-W37` for the Monday 2026-09-07."""
    year, week, _ = datetime.date.fromisoformat(monday).isocalendar()
    return f"{year}-W{week:02d}"


@dataclass(frozen=True, slots=True)
class Trend:
    """Distinct users per family and ISO week; None where a family had fewer than `min_users`
    users that week (or none): those users are counted in `other`, once each."""

    weeks: list[str]
    series: dict[str, list[int | None]]
    other: list[int]

    def shown(self, index: int) -> set[str]:
        return {family for family, values in self.series.items() if values[index] is not None}


def trend(
    store: Store, since: str | None = None, until: str | None = None, min_users: int = 5
) -> Trend:
    clause, params = where(since, until)
    monday = _monday(store)
    counts: dict[tuple[str, str], int] = {
        (str(week), str(family)): int(users)
        for week, family, users in store.rows(
            f"SELECT {monday}, family, COUNT(DISTINCT user_id) FROM sessions{clause}"  # noqa: S608
            f" GROUP BY {monday}, family",
            params,
        )
    }
    if not counts:
        return Trend([], {}, [])
    first = datetime.date.fromisoformat(min(week for week, _ in counts))
    last = datetime.date.fromisoformat(max(week for week, _ in counts))
    mondays = [
        (first + datetime.timedelta(weeks=i)).isoformat()
        for i in range((last - first).days // 7 + 1)
    ]
    families = sorted({family for (_, family), users in counts.items() if users >= min_users})
    series = {
        family: [
            users if (users := counts.get((week, family), 0)) >= min_users else None
            for week in mondays
        ]
        for family in families
    }
    other = dict.fromkeys(mondays, 0)
    if any(users < min_users for users in counts.values()):
        small = (
            f"{monday} || '/' || family IN (SELECT {monday} || '/' || family"  # noqa: S608
            f" FROM sessions{clause} GROUP BY {monday}, family HAVING COUNT(DISTINCT user_id) < ?)"
        )
        for week, users in store.rows(
            f"SELECT {monday}, COUNT(DISTINCT user_id) FROM sessions{clause}{also(clause)}"  # noqa: S608
            f" {small} GROUP BY {monday}",
            [*params, *params, min_users],
        ):
            other[str(week)] = int(users)
    return Trend([iso_week(m) for m in mondays], series, list(other.values()))


@dataclass(frozen=True, slots=True)
class Changes:
    """The families shown as their own group in the last week of a trend and not in the week
    before (appeared), and the other way round (disappeared)."""

    week: str | None
    previous: str | None
    appeared: list[str]
    disappeared: list[str]


def changes(found: Trend) -> Changes:
    if len(found.weeks) < 2:
        return Changes(found.weeks[-1] if found.weeks else None, None, [], [])
    now, before = found.shown(-1), found.shown(-2)
    return Changes(found.weeks[-1], found.weeks[-2], sorted(now - before), sorted(before - now))


@dataclass(frozen=True, slots=True)
class InferredRow:
    """A labelled family's users among the sessions that sent no ID, by their fingerprints."""

    family: str
    users: int
    sessions: int
    first_seen: str
    last_seen: str
    share: float
    """Of all distinct users in the period (as the inventory's shares)."""
    platforms: str
    """The labels' platforms with their users, k-floored ("Windows (40), other")."""


@dataclass(frozen=True, slots=True)
class Inferred:
    rows: tuple[InferredRow, ...] = ()
    folded: Fold = Fold()
    min_users: int = 0


@dataclass
class _Tally:
    users: set[str] = field(default_factory=set)
    sessions: int = 0
    first: str = "~"
    last: str = ""
    platforms: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))


def inferred(
    store: Store, since: str | None = None, until: str | None = None, min_users: int = 5,
    labels: Mapping[str, Label] | None = None,
) -> Inferred:  # fmt: skip
    """The sessions that sent no ID and whose behaviour signature (first) or JA4 fingerprint is
    labelled, per labelled family: distinct users, sessions, first and last seen, platforms;
    families of fewer than `min_users` such users folded."""
    if not labels:
        return Inferred(min_users=min_users)
    clause, params = where(since, until, "s.started_at")
    families: dict[str, _Tally] = defaultdict(_Tally)
    for user, behaviour, ja4, sessions, first, last in store.rows(
        "SELECT s.user_id, t.behaviour, t.ja4, COUNT(*), MIN(s.started_at), MAX(s.ended_at)"  # noqa: S608
        f" FROM session_traits t JOIN sessions s ON s.session = t.session{clause}"
        f"{also(clause)} s.family = ? GROUP BY s.user_id, t.behaviour, t.ja4",
        [*params, NO_ID],
    ):
        label = labels.get(behaviour or "") or labels.get(ja4 or "")
        if label is None:
            continue
        found = families[label.family]
        if user is not None:
            found.users.add(str(user))
            found.platforms[label.platform or "unknown"].add(str(user))
        found.sessions += int(sessions)
        found.first, found.last = min(found.first, str(first)), max(found.last, str(last))
    everyone = _users(store, clause, params)
    rows, small = [], set[str]()
    for family, found in families.items():
        if len(found.users) < min_users:
            small |= found.users
            continue
        counts = {name: len(users) for name, users in found.platforms.items()}
        share = len(found.users) / everyone if everyone else 0.0
        rows.append(InferredRow(family, len(found.users), found.sessions, found.first, found.last,
                                share, platform_text(counts, min_users)))  # fmt: skip
    rows.sort(key=lambda r: (-r.users, r.family))
    return Inferred(tuple(rows), Fold(len(families) - len(rows), len(small)), min_users)


def _users(store: Store, clause: str, params: list[str]) -> int:
    """Distinct users of all sessions (`s`) in the period."""
    rows = store.rows(f"SELECT COUNT(DISTINCT s.user_id) FROM sessions s{clause}", params)  # noqa: S608
    return int(rows[0][0])
