"""The queries behind the report's inventory and trends: platforms per client family, distinct
users per family and ISO week, the families that appeared or disappeared, the proxies.

Every group is k-floored as in every report: a family (or a family's platform) with fewer than
`min_users` distinct users, in the period or in a week, is never shown as itself.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from imapveil.stats.store import Store


def where(since: str | None, until: str | None) -> tuple[str, list[str]]:
    """The WHERE clause (with its parameters) of a period; '' for all of the store."""
    clauses, params = [], []
    if since:
        clauses.append("started_at >= ?")
        params.append(since)
    if until:
        clauses.append("started_at < ?")
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
    found: dict[str, list[tuple[int, str]]] = {}
    small: set[str] = set()
    for family, platform, users in store.rows(
        f"SELECT family, platform, COUNT(DISTINCT user_id) FROM sessions{clause}"  # noqa: S608
        " GROUP BY family, platform",
        params,
    ):
        if int(users) < min_users:
            small.add(str(family))
        else:
            found.setdefault(str(family), []).append((int(users), str(platform or "unknown")))
    text = {
        family: ", ".join(f"{name} ({users})" for users, name in sorted(items, key=_most_first))
        for family, items in found.items()
    }
    for family in small:
        text[family] = f"{text[family]}, other" if family in text else "other"
    return text


def _most_first(item: tuple[int, str]) -> tuple[int, str]:
    return -item[0], item[1]


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
