"""Version currency: per client family, how many users run a current, an outdated (supported,
not current) or an unsupported version, by the `[[currency]]` rows of `clients.toml`.

Each user counts once per family, by their most recent session of that family in the period.
A group, here a family and a class (current, outdated, unsupported, unknown), of fewer than
`min_users` users is folded into "other" under its class, so no number shown is of fewer users,
"other" excepted, as in every report.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import operator
import re
import tomllib
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from imapveil.stats.charts import fit, plural, safe
from imapveil.stats.identify import TABLE
from imapveil.stats.store import Store
from imapveil.stats.tables import disarm
from imapveil.stats.versions import Version, parse

CLASSES = ("current", "outdated", "unsupported", "unknown")
FIELDS = ("version", "os_version")
_COMPARE = re.compile(r"\s*(>=|<=|==|!=|>|<)\s*(.+?)\s*")
_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
    ">": operator.gt, "<": operator.lt,
}  # fmt: skip


class CurrencyError(ValueError):
    """The `[[currency]]` rows of the client table are wrong; the message says where and how."""


@dataclass(frozen=True, slots=True)
class Spec:
    """Release lines or comparisons; a version matching any alternative matches."""

    text: str
    alternatives: tuple[tuple[tuple[str, Version], ...], ...]

    def matches(self, version: Version) -> bool:
        return any(
            all(
                version.in_line(bound) if op == "line" else _OPERATORS[op](version, bound)
                for op, bound in alternative
            )
            for alternative in self.alternatives
        )


@dataclass(frozen=True, slots=True)
class Rule:
    family: str
    platform: str | None
    field: str
    current: Spec
    supported: Spec
    checked: str

    def classify(self, value: str | None) -> str:
        version = parse(value) if value else None
        if version is None:
            return "unknown"
        if self.current.matches(version):
            return "current"
        return "outdated" if self.supported.matches(version) else "unsupported"


def _spec(value: Any, where: str) -> Spec:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        raise CurrencyError(f"{where}: a version, a comparison or a list of them, not {value!r}")
    alternatives = []
    for item in items:
        conditions = []
        for piece in item.split(","):
            compared = _COMPARE.fullmatch(piece)
            op, text = compared.groups() if compared else ("line", piece.strip())
            bound = parse(text)
            if bound is None or (op == "line" and not bound.release):
                raise CurrencyError(f"{where}: {item!r}: {text!r} is no version number")
            conditions.append((op, bound))
        alternatives.append(tuple(conditions))
    return Spec(", ".join(items), tuple(alternatives))


def load(path: Path = TABLE) -> tuple[Rule, ...]:
    """The `[[currency]]` rows of the client table, checked; raises CurrencyError."""
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CurrencyError(f"{path}: {exc}") from None
    families = {row.get("family") for row in table.get("client", [])}
    rows = table.get("currency", [])
    if not isinstance(rows, list):
        raise CurrencyError(f"{path}: `currency` must be [[currency]] rows")
    rules: list[Rule] = []
    for number, row in enumerate(rows, start=1):
        where = f"{path}: [[currency]] row {number}"
        unknown = set(row) - {"family", "platform", "field", "current", "supported", "checked"}
        if unknown:
            raise CurrencyError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        for key in ("family", "current", "supported", "checked"):
            if key not in row:
                raise CurrencyError(f"{where}: `{key}` is missing")
        family, platform = row["family"], row.get("platform")
        if family not in families:
            raise CurrencyError(f"{where}: no [[client]] row has the family {family!r}")
        if platform is not None and not isinstance(platform, str):
            raise CurrencyError(f"{where}: `platform` must be a string")
        field = row.get("field", "version")
        if field not in FIELDS:
            raise CurrencyError(f"{where}: `field` is one of {', '.join(FIELDS)}, not {field!r}")
        checked = row["checked"]
        try:
            checked = datetime.date.fromisoformat(str(checked)).isoformat()
        except ValueError:
            raise CurrencyError(
                f"{where}: `checked` is a date (YYYY-MM-DD), not {checked!r}"
            ) from None
        if any((r.family, r.platform) == (family, platform) for r in rules):
            raise CurrencyError(f"{where}: a second row for {family} {platform or ''}".rstrip())
        current = _spec(row["current"], f"{where}: `current`")
        supported = _spec(row["supported"], f"{where}: `supported`")
        rules.append(Rule(family, platform, field, current, supported, checked))
    return tuple(rules)


def classify(
    rules: Iterable[Rule], family: str, platform: str | None, version: str | None,
    os_version: str | None,
) -> str:  # fmt: skip
    """current, outdated, unsupported or unknown: a session's client by the family's rule (the
    one for its platform, else the one for any platform)."""
    candidates = [r for r in rules if r.family == family and r.platform in (platform, None)]
    if not candidates:
        return "unknown"
    rule = min(candidates, key=lambda r: r.platform is None)
    return rule.classify(version if rule.field == "version" else os_version)


@dataclass(frozen=True, slots=True)
class CurrencyRow:
    group: str
    users: int
    current: int
    outdated: int
    unsupported: int
    unknown: int
    checked: str | None


@dataclass(frozen=True, slots=True)
class Currency:
    since: str | None
    until: str | None
    users: int
    rows: list[CurrencyRow]


def latest_sessions(
    store: Store, since: str | None = None, until: str | None = None
) -> list[tuple[str, str, str | None, str | None, str | None]]:
    """User, family, version, platform and OS version of each user's most recent session of
    each family in the period (sessions without a user are left out)."""
    bounds = [(c, v) for c, v in (("started_at >= ?", since), ("started_at < ?", until)) if v]
    where = " WHERE " + " AND ".join(["user_id IS NOT NULL", *(c for c, _ in bounds)])
    params = [v for _, v in bounds]
    return [
        (str(u), str(f), v, p, o)
        for u, f, v, p, o in store.rows(
            "SELECT user_id, family, version, platform, os_version FROM ("  # noqa: S608
            " SELECT user_id, family, version, platform, os_version, ROW_NUMBER() OVER"
            " (PARTITION BY user_id, family ORDER BY started_at DESC, session DESC) AS n"
            f" FROM sessions{where}) latest WHERE n = 1",
            params,
        )
    ]


def currency_rows(
    store: Store, since: str | None = None, until: str | None = None, min_users: int = 5,
    rules: tuple[Rule, ...] | None = None,
) -> Currency:  # fmt: skip
    """Per family, distinct users by the class of their most recent session's version; groups
    (family and class) of fewer than `min_users` users folded into "other"."""
    rules = load() if rules is None else rules
    users: dict[tuple[str, str], set[str]] = defaultdict(set)
    everyone: set[str] = set()
    for user, family, version, platform, os_version in latest_sessions(store, since, until):
        users[(family, classify(rules, family, platform, version, os_version))].add(user)
        everyone.add(user)
    shown: dict[str, dict[str, int]] = defaultdict(dict)
    other: dict[str, set[str]] = defaultdict(set)
    for (family, kind), group in users.items():
        if len(group) < min_users:
            other[kind] |= group
        else:
            shown[family][kind] = len(group)
    checked = {r.family: r.checked for r in sorted(rules, key=lambda r: r.checked, reverse=True)}
    rows = [_row(family, counts, checked.get(family)) for family, counts in shown.items()]
    rows.sort(key=lambda r: (-r.users, r.group))
    if other:
        folded = set().union(*other.values())
        rows.append(_row("other", {c: len(g) for c, g in other.items()}, None, len(folded)))
    return Currency(since, until, len(everyone), rows)


def _row(
    group: str, counts: dict[str, int], checked: str | None, users: int | None = None
) -> CurrencyRow:
    total = sum(counts.values()) if users is None else users
    current, outdated, unsupported, unknown = (counts.get(c, 0) for c in CLASSES)
    return CurrencyRow(group, total, current, outdated, unsupported, unknown, checked)


def as_table(currency: Currency) -> str:
    w = 40
    head = f"{'family':<{w}} {'users':>7}" + "".join(f" {c:>11}" for c in CLASSES) + "  checked"
    lines = [head, "-" * len(head)]
    for r in currency.rows:
        counts = "".join(f" {getattr(r, c):>11}" for c in CLASSES)
        line = f"{fit(r.group, w)} {r.users:>7}{counts}  {r.checked or ''}"
        lines.append(line.rstrip())
    lines += ["", f"{plural(currency.users, 'distinct user')}, each by their most recent session"]
    return "\n".join(lines) + "\n"


def as_csv(currency: Currency) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["family", "users", *CLASSES, "checked"])
    for r in currency.rows:
        checked = disarm(r.checked) if r.checked else r.checked
        writer.writerow([disarm(r.group), r.users, *(getattr(r, c) for c in CLASSES), checked])
    return out.getvalue()


def as_json(currency: Currency) -> str:
    data = {
        "by": "currency",
        "since": currency.since,
        "until": currency.until,
        "users": currency.users,
        "rows": [{**asdict(r), "group": safe(r.group)} for r in currency.rows],
    }
    return json.dumps(data, indent=2) + "\n"


RENDER: dict[str, Callable[[Currency], str]] = {"table": as_table, "csv": as_csv, "json": as_json}
