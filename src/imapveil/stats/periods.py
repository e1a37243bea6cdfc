"""What changed: the report's whole period against the whole period of equal length just before
it. Per client family, distinct users in each; the families that appeared or disappeared, and
the largest changes, in users and per cent.

k-floored like every report: a family's number is shown for a period only if it had at least
`min_users` distinct users in it. A family that rose to the floor "appeared" (whether it had none
before or a few: which of the two is not said), one that fell under it "disappeared", and no
difference is given for either, as it would tell the small number. A family under the floor in
both periods is not named at all.

The two periods meet exactly: a session belongs to the period its start falls in, `since`
included and `until` not, and the previous period ends where this one begins.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from imapveil.stats.charts import plural, safe, signed_count, signed_share
from imapveil.stats.inventory import where
from imapveil.stats.store import Store

APPEARED, DISAPPEARED = "appeared", "disappeared"
MORE, FEWER, SAME = "more users", "fewer users", "no change"
_ORDER = {APPEARED: 0, DISAPPEARED: 1, MORE: 2, FEWER: 2, SAME: 3}


@dataclass(frozen=True, slots=True)
class Period:
    since: str
    """The first moment in it, as the store's times (or a date) compare."""
    until: str
    """The first moment after it."""

    @property
    def label(self) -> str:
        """`2026-10-19 to 2026-11-29` (dates where the ends are midnights, the last included)."""
        start, end = moment(self.since), moment(self.until)
        if start.time() == end.time() == datetime.time(0):
            return f"{start:%Y-%m-%d} to {last_day(self.until)}"
        return f"{start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M}"


def last_day(until: str) -> str:
    """The last day before `until` where it is a midnight (`2026-11-29` for `2026-11-30`),
    else `until`'s day and time."""
    end = moment(until)
    if end.time() == datetime.time(0):
        return f"{end - datetime.timedelta(days=1):%Y-%m-%d}"
    return f"{end:%Y-%m-%d %H:%M}"


@dataclass(frozen=True, slots=True)
class Change:
    family: str
    change: str
    before: int | None
    """Distinct users in the previous period; None: fewer than the floor (or none)."""
    now: int | None
    difference: int | None
    ratio: float | None
    """The difference as a fraction of `before`."""


@dataclass(frozen=True, slots=True)
class Comparison:
    period: Period | None
    """None: no sessions in the store (in the period asked for), nothing to compare."""
    previous: Period | None
    users_before: int
    users_now: int
    rows: list[Change]
    min_users: int

    @property
    def ratio(self) -> float | None:
        if not self.users_before:
            return None
        return (self.users_now - self.users_before) / self.users_before


def moment(text: str) -> datetime.datetime:
    """A date or an ISO 8601 time (UTC where it says no zone)."""
    found = datetime.datetime.fromisoformat(text)
    return found if found.tzinfo else found.replace(tzinfo=datetime.UTC)


def _text(when: datetime.datetime) -> str:
    """A moment written as the store writes times (so that they compare as text)."""
    return when.astimezone(datetime.UTC).isoformat(timespec="milliseconds")


def periods(
    store: Store, since: str | None, until: str | None, now: datetime.datetime
) -> tuple[Period, Period] | None:
    """The report's period (from the first session's day where `since` is not given, to `now`
    where `until` is not) and the one of equal length before it; None without sessions (or a
    period that would end before it begins: `since` after `now`)."""
    if since is None:
        clause, params = where(None, until)
        (first,) = store.rows(f"SELECT MIN(started_at) FROM sessions{clause}", params)[0]  # noqa: S608
        if first is None:
            return None
        since = _text(moment(str(first)[:10]))
    end = until or _text(now)
    start = moment(since)
    length = moment(end) - start
    if length <= datetime.timedelta(0):  # a period that ends before it begins: no sessions
        return None
    return Period(since, end), Period(_text(start - length), since)


def _users(store: Store, period: Period) -> tuple[int, dict[str, int]]:
    clause, params = where(period.since, period.until)
    ((everyone,),) = store.rows(f"SELECT COUNT(DISTINCT user_id) FROM sessions{clause}", params)  # noqa: S608
    found = store.rows(
        f"SELECT family, COUNT(DISTINCT user_id) FROM sessions{clause} GROUP BY family",  # noqa: S608
        params,
    )
    return int(everyone), {str(family): int(users) for family, users in found}


def _change(family: str, before: int | None, now: int | None) -> Change:
    if before is None:
        return Change(family, APPEARED, None, now, None, None)
    if now is None:
        return Change(family, DISAPPEARED, before, None, None, None)
    difference = now - before
    kind = MORE if difference > 0 else FEWER if difference < 0 else SAME
    return Change(family, kind, before, now, difference, difference / before)


def _order(row: Change) -> tuple[int, int, str]:
    size = abs(row.difference) if row.difference is not None else (row.now or row.before or 0)
    return _ORDER[row.change], -size, row.family


def compare(
    store: Store, since: str | None = None, until: str | None = None, min_users: int = 5,
    *, now: datetime.datetime | None = None,
) -> Comparison:  # fmt: skip
    """Distinct users per family in the period and in the one before; see the module."""
    found = periods(store, since, until, now or datetime.datetime.now(datetime.UTC))
    if found is None:
        return Comparison(None, None, 0, 0, [], min_users)
    period, previous = found
    users_now, now_by = _users(store, period)
    users_before, before_by = _users(store, previous)
    floor = max(min_users, 1)
    rows = []
    for family in (set(now_by) | set(before_by)) if before_by else ():  # none before: no rows
        before, after = before_by.get(family, 0), now_by.get(family, 0)
        if max(before, after) >= floor:
            rows.append(_change(family, before if before >= floor else None,
                                after if after >= floor else None))  # fmt: skip
    rows.sort(key=_order)
    return Comparison(period, previous, users_before, users_now, rows, min_users)


def said(found: Comparison) -> str:
    """What changed, in a sentence or two."""
    if found.period is None or found.previous is None:
        return "No sessions in the period: nothing to compare."
    head = f"{found.period.label} against {found.previous.label}"
    if not found.rows and not found.users_before:
        return (
            f"{head}: no sessions in the previous period, nothing to compare (a report with "
            "--since, e.g. of the last 30 days, compares them with the 30 days before)."
        )
    ratio = found.ratio
    users = f"{plural(found.users_now, 'user')} against {found.users_before}" + (
        f" ({signed_share(ratio)})" if ratio is not None else ""
    )
    appeared = ", ".join(safe(r.family) for r in found.rows if r.change == APPEARED) or "none"
    gone = ", ".join(safe(r.family) for r in found.rows if r.change == DISAPPEARED) or "none"
    largest = [r for r in found.rows if r.change in (MORE, FEWER)][:3]
    moved = ", ".join(
        f"{safe(r.family)} {signed_count(r.difference)} ({signed_share(r.ratio or 0.0)})"
        for r in largest
        if r.difference is not None
    )
    return (
        f"{head}: {users}; appeared: {appeared}; disappeared: {gone}"
        + (f"; largest changes: {moved}" if moved else "; no other changes")
        + "."
    )
