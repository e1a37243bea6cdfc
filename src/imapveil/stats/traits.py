"""What clients use and how they behave, from the store's session traits: `imapveil stats --by
extension` and `--by fingerprint`, and the queries the report's "Extensions in use" builds on.

Only sessions whose traits are known count here (those with a `session_traits` row: see
`stats.store`); sessions from before the store kept traits, or that never reached the server,
are left out of every number, denominators included.

Both queries return plain frozen dataclasses:

- `extension_usage(store, since, until, min_users)` -> `ExtensionUsage`: per client family and
  IMAP extension (`ExtensionRow`), the distinct users and the sessions that used it, and the share
  of the family's users (of its sessions with known traits) that did; `families` has each
  shown family's users with known traits. A (family, extension) group of fewer than `min_users`
  distinct users is not shown; `folded` says how many groups and how many distinct users that
  hid.
- `fingerprint_usage(store, since, until, min_users, labels)` -> `FingerprintUsage`: per
  fingerprint (`FingerprintRow`: kind `ja4` or `behaviour`), the distinct users and sessions
  with it, the users of its sessions that sent no ID, and beside it the families that named
  themselves in an ID in sessions with the same fingerprint, each with its users
  (`FamilySeen`), and the administrator's label if there is one. Fingerprint groups, and each
  family beside a fingerprint, of fewer than `min_users` users are not shown; `folded[kind]`
  says how many fingerprints and users were hidden.

The floor is `inventory.grouped`, the one every report uses. Fingerprints describe programs,
never people: no output here has a user id beside a fingerprint, only counts of users.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from imapveil.stats.charts import fit, plural, safe
from imapveil.stats.identify import NO_ID
from imapveil.stats.inventory import Fold, Inferred, InferredRow, also, grouped, where
from imapveil.stats.labels import Label
from imapveil.stats.store import Store
from imapveil.stats.tables import disarm

KINDS = ("ja4", "behaviour")
"""The kinds of fingerprint, each a column of `session_traits`."""
_TRAITS = "session_traits t JOIN sessions s ON s.session = t.session"
_EXTENSIONS = "session_extensions e JOIN sessions s ON s.session = e.session"


@dataclass(frozen=True, slots=True)
class ExtensionRow:
    family: str
    extension: str
    users: int
    sessions: int
    share: float
    """Of the family's users with known traits in the period."""


@dataclass(frozen=True, slots=True)
class ExtensionUsage:
    since: str | None
    until: str | None
    rows: tuple[ExtensionRow, ...]
    """By family (most users first), then by users, most first."""
    families: tuple[tuple[str, int], ...]
    """Each family with a row shown, and its distinct users with known traits."""
    folded: Fold
    min_users: int


def _condition(since: str | None, until: str | None, *more: str) -> tuple[str, list[str]]:
    """A period's WHERE clause on sessions (`s`), with `more` conditions joined to it."""
    clause, params = where(since, until, "s.started_at")
    for condition in more:
        clause += f"{also(clause)} {condition}"
    return clause, params


def extension_usage(
    store: Store, since: str | None = None, until: str | None = None, min_users: int = 5
) -> ExtensionUsage:
    clause, params = _condition(since, until)
    columns = ("s.family", "e.extension")
    shown, folded = grouped(store, _EXTENSIONS, columns, clause, params, min_users=min_users)
    known = {
        str(family): int(users)
        for family, users in store.rows(
            f"SELECT s.family, COUNT(DISTINCT s.user_id) FROM {_TRAITS}{clause}"  # noqa: S608
            " GROUP BY s.family",
            params,
        )
    }
    rows = [
        ExtensionRow(str(family), str(extension), int(users), int(sessions),
                     int(users) / known[str(family)] if known.get(str(family)) else 0.0)
        for family, extension, users, sessions in shown
    ]  # fmt: skip
    families = sorted({r.family for r in rows}, key=lambda f: (-known[f], f))
    order = {family: n for n, family in enumerate(families)}
    rows.sort(key=lambda r: (order[r.family], -r.users, r.extension))
    counts = tuple((family, known[family]) for family in families)
    return ExtensionUsage(since, until, tuple(rows), counts, folded, min_users)


@dataclass(frozen=True, slots=True)
class FamilySeen:
    family: str
    users: int


@dataclass(frozen=True, slots=True)
class FingerprintRow:
    kind: str
    """`ja4` or `behaviour`."""
    fingerprint: str
    users: int
    sessions: int
    no_id_users: int | None
    """Users of its sessions that sent no ID; None if fewer than the minimum (or none)."""
    families: tuple[FamilySeen, ...]
    """Families named in an ID in sessions with this fingerprint, most users first."""
    label: Label | None
    text: str | None = None
    """A behaviour signature's canonical text (what it means); None for JA4."""


@dataclass(frozen=True, slots=True)
class FingerprintUsage:
    since: str | None
    until: str | None
    rows: tuple[FingerprintRow, ...]
    """JA4 first, then behaviour; each by users, most first."""
    folded: Mapping[str, Fold]
    """Per kind, the fingerprints of fewer than the minimum of users, and their users."""
    min_users: int


def fingerprint_usage(
    store: Store, since: str | None = None, until: str | None = None, min_users: int = 5,
    labels: Mapping[str, Label] | None = None,
) -> FingerprintUsage:  # fmt: skip
    labels = labels or {}
    rows: list[FingerprintRow] = []
    folded: dict[str, Fold] = {}
    for kind in KINDS:
        clause, params = _condition(since, until, f"t.{kind} IS NOT NULL")
        floor = partial(grouped, store, _TRAITS, condition=clause, params=params,
                        min_users=min_users)  # fmt: skip
        shown, folded[kind] = floor((f"t.{kind}",))
        if not shown:
            continue
        seen, _ = floor((f"t.{kind}", "s.family"))
        beside: dict[str, list[FamilySeen]] = defaultdict(list)
        for value, family, users, _sessions in seen:
            beside[str(value)].append(FamilySeen(str(family), int(users)))
        texts = _texts(store, clause, params) if kind == "behaviour" else {}
        for value, users, sessions in sorted(shown, key=lambda r: (-int(r[1]), str(r[0]))):
            fingerprint = str(value)
            found = sorted(beside[fingerprint], key=lambda f: (-f.users, f.family))
            no_id = next((f.users for f in found if f.family == NO_ID), None)
            named = tuple(f for f in found if f.family != NO_ID)
            label, text = labels.get(fingerprint), texts.get(fingerprint)
            rows.append(FingerprintRow(kind, fingerprint, int(users), int(sessions), no_id, named,
                                       label, text))  # fmt: skip
    return FingerprintUsage(since, until, tuple(rows), folded, min_users)


def _texts(store: Store, clause: str, params: list[str]) -> dict[str, str]:
    """Each behaviour name's canonical text (one per name: the name is its digest)."""
    return {
        str(name): str(text)
        for name, text in store.rows(
            f"SELECT t.behaviour, MIN(t.behaviour_text) FROM {_TRAITS}{clause}"  # noqa: S608
            " GROUP BY t.behaviour",
            params,
        )
        if text is not None
    }


# --- `imapveil stats --by extension` ------------------------------------------------------------


def _fold_note(fold: Fold, min_users: int, noun: str) -> str:
    """What the floor hid, as the other reports say it."""
    verb = "is" if fold.groups == 1 else "are"
    return (
        f"{plural(fold.groups, noun)} of fewer than {min_users} users each {verb} not shown: "
        f"{plural(fold.users, 'user')} in them."
    )


def extensions_table(usage: ExtensionUsage) -> str:
    head = f"{'family':<32} {'extension':<20} {'users':>7} {'share':>6} {'sessions':>9}"
    lines = [head, "-" * len(head)]
    for r in usage.rows:
        lines.append(
            f"{fit(r.family, 32)} {fit(r.extension, 20)} {r.users:>7} "
            f"{r.share:>6.1%} {r.sessions:>9}"
        )
    if usage.folded.groups:
        lines += ["", _fold_note(usage.folded, usage.min_users, "group")]
    lines += ["", "share: of the family's users whose sessions' extensions are known."]
    return "\n".join(lines) + "\n"


def _csv(rows: Iterable[Sequence[Any]]) -> str:
    """Rows as CSV, every text cell disarmed (never taken for a spreadsheet formula)."""
    out = io.StringIO()
    csv.writer(out).writerows([disarm(c) if isinstance(c, str) else c for c in row] for row in rows)
    return out.getvalue()


def _json(by: str, usage: ExtensionUsage | FingerprintUsage, data: dict[str, Any]) -> str:
    head = {"by": by, "since": usage.since, "until": usage.until}
    return json.dumps({**head, **data}, indent=2) + "\n"


def extensions_csv(usage: ExtensionUsage) -> str:
    return _csv([
        ["family", "extension", "users", "sessions", "share"],
        *([safe(r.family), safe(r.extension), r.users, r.sessions, round(r.share, 4)]
          for r in usage.rows),
    ])  # fmt: skip


def extensions_json(usage: ExtensionUsage) -> str:
    data: dict[str, Any] = {
        "families": [{"family": safe(f), "users": n} for f, n in usage.families],
        "folded_groups": usage.folded.groups,
        "folded_users": usage.folded.users,
        "rows": [
            {**asdict(r), "family": safe(r.family), "extension": safe(r.extension),
             "share": round(r.share, 4)}
            for r in usage.rows
        ],
    }  # fmt: skip
    return _json("extension", usage, data)


# --- `imapveil stats --by fingerprint` ----------------------------------------------------------


def _label_text(label: Label | None) -> str:
    if label is None:
        return ""
    return safe(f"{label.family} ({label.platform})" if label.platform else label.family)


def _families_text(row: FingerprintRow) -> str:
    return ", ".join(f"{safe(f.family)} ({f.users})" for f in row.families)


def fingerprints_table(usage: FingerprintUsage) -> str:
    head = f"{'kind':<9} {'fingerprint':<36} {'users':>7} {'sessions':>9} {'no ID':>6}  label"
    lines = [head, "-" * len(head)]
    for r in usage.rows:
        no_id = "-" if r.no_id_users is None else str(r.no_id_users)
        lines.append(
            f"{r.kind:<9} {safe(r.fingerprint):<36} {r.users:>7} {r.sessions:>9} {no_id:>6}  "
            f"{_label_text(r.label)}".rstrip()
        )
        if r.families:
            lines.append(f"{'':<10}named in an ID: {_families_text(r)}")
    for kind in KINDS:
        fold = usage.folded.get(kind, Fold())
        if fold.groups:
            lines += ["", _fold_note(fold, usage.min_users, f"{kind} fingerprint")]
    return "\n".join(lines) + "\n"


def fingerprints_csv(usage: FingerprintUsage) -> str:
    head = ["kind", "fingerprint", "users", "sessions", "no_id_users", "families",
            "label_family", "label_platform", "text"]  # fmt: skip
    return _csv([head, *(_fingerprint_cells(r) for r in usage.rows)])


def _fingerprint_cells(r: FingerprintRow) -> list[Any]:
    label = r.label or Label("")
    return [r.kind, safe(r.fingerprint), r.users, r.sessions, r.no_id_users, _families_text(r),
            safe(label.family), safe(label.platform or ""), safe(r.text or "")]  # fmt: skip


def fingerprints_json(usage: FingerprintUsage) -> str:
    data: dict[str, Any] = {
        "folded": {kind: asdict(fold) for kind, fold in usage.folded.items()},
        "rows": [
            {"kind": r.kind, "fingerprint": safe(r.fingerprint), "users": r.users,
             "sessions": r.sessions, "no_id_users": r.no_id_users,
             "families": [{"family": safe(f.family), "users": f.users} for f in r.families],
             "label": None if r.label is None else {
                 "family": safe(r.label.family), "platform": r.label.platform},
             "text": None if r.text is None else safe(r.text)}
            for r in usage.rows
        ],
    }  # fmt: skip
    return _json("fingerprint", usage, data)


RENDER_EXTENSIONS: dict[str, Callable[[ExtensionUsage], str]] = {
    "table": extensions_table, "csv": extensions_csv, "json": extensions_json,
}  # fmt: skip
RENDER_FINGERPRINTS: dict[str, Callable[[FingerprintUsage], str]] = {
    "table": fingerprints_table, "csv": fingerprints_csv, "json": fingerprints_json,
}  # fmt: skip


# --- `imapveil stats --by family`: the inferred users beside the named ones ---------------------

INFERRED_NOTE = (
    'Inferred from labelled fingerprints: sessions that sent no ID (in the "no ID" row above),\n'
    "under the family the administrator's labels name."
)


def _inferred_cells(r: InferredRow) -> list[Any]:
    return [disarm(r.family), r.sessions, r.users, disarm(r.first_seen), disarm(r.last_seen),
            round(r.share, 4), disarm(r.platforms)]  # fmt: skip


def with_inferred(text: str, form: str, found: Inferred) -> str:
    """`stats --by family` output (`text` in `form`) with the inferred users: a column
    `inferred` (false for the rows above, true for the inferred ones) in CSV; an `inferred`
    section of their own in JSON and in the table. Never added into the named rows."""
    if form == "csv":
        rows = list(csv.reader(io.StringIO(text)))
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow([*rows[0], "inferred"])
        writer.writerows([*row, "false"] for row in rows[1:])
        writer.writerows([*_inferred_cells(r), "true"] for r in found.rows)
        return out.getvalue()
    if form == "json":
        data = json.loads(text)
        data["inferred"] = {
            "rows": [
                {**asdict(r), "family": safe(r.family), "share": round(r.share, 4)}
                for r in found.rows
            ],
            "folded_groups": found.folded.groups,
            "folded_users": found.folded.users,
        }
        return json.dumps(data, indent=2) + "\n"
    if not found.rows and not found.folded.groups:
        return text
    head = f"{'family (inferred)':<32} {'sessions':>9} {'users':>7} {'share':>6}  platforms"
    lines = ["", INFERRED_NOTE, head, "-" * len(head)]
    for r in found.rows:
        lines.append(
            f"{fit(r.family, 32)} {r.sessions:>9} {r.users:>7} {r.share:>6.1%}  "
            f"{safe(r.platforms)}".rstrip()
        )
    if found.folded.groups:
        lines += ["", _fold_note(found.folded, found.min_users, "inferred family")]
    return text + "\n".join(lines) + "\n"
