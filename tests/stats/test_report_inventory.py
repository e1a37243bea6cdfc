"""Issue 15: the inventory, the weekly trends and what changed, on a synthetic fleet of 500 users
over 12 weeks written through the store's own API; exact numbers, k-floored everywhere."""

from __future__ import annotations

import csv
import datetime
import html
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from imapveil.cli import main
from imapveil.stats.identify import NO_ID
from imapveil.stats.inventory import changes, iso_week, platforms, proxies, trend
from imapveil.stats.labels import Label
from imapveil.stats.report import (
    as_csv,
    as_json,
    as_table,
    cut,
    export,
    html_report,
    summarize,
    trend_csv,
    trend_json,
)
from imapveil.stats.store import SESSION_COLUMNS, Batch, Store
from tests.helpers.postgres import Postgres

K9 = "K-9 Mail / Thunderbird for Android"
START = datetime.date(2026, 9, 7)  # a Monday: ISO week 2026-W37
WEEKS = 12
NOW = datetime.datetime(2026, 11, 30, 12, 0, tzinfo=datetime.UTC)

# (family, users, weekdays (0 = Monday), weeks, platform of a user, version, OS version)
FLEET: list[tuple[str, range, tuple[int, ...], range]] = [
    ("Thunderbird", range(200), (1,), range(WEEKS)),
    ("Apple Mail", range(200, 350), (0, 3), range(WEEKS)),
    ("Outlook", range(350, 450), (3,), range(WEEKS - 1)),  # gone in the last week
    ("eM Client", range(450, 480), (4,), range(WEEKS - 1, WEEKS)),  # new in the last week
    ("NeoMutt", range(480, 483), (0,), range(WEEKS)),  # 3 users: folded
    ("FairEmail", range(482, 485), (0,), range(WEEKS)),  # 3 users, one also on NeoMutt
    (NO_ID, range(485, 500), (2,), range(WEEKS)),
    ("Evolution", range(8), (2,), range(6)),  # 8 users for six weeks...
    ("Evolution", range(3), (2,), range(6, WEEKS)),  # ...then 3: under the floor each week
]


def client(family: str, user: int) -> tuple[str | None, str | None, str | None]:
    """Version, platform and OS version of `user` on `family`."""
    if family == "Thunderbird":
        platform = "Windows" if user < 150 else "FreeBSD" if user == 199 else "Linux"
        return ("140.2.0" if user % 2 else "128.5.1esr"), platform, None
    if family == "Apple Mail":
        return None, *(("macOS", "15.1") if user < 300 else ("iOS", "18.1"))
    known = {"Outlook": ("16.0", "Windows"), "eM Client": ("10.1", "Windows"),
             "NeoMutt": ("20241002", "Linux"), "FairEmail": ("1.2250", "Android"),
             "Evolution": ("3.56.1", "Linux"), K9: ("6.800", "Android"),
             "Mailspring": ("1.15.1", "Linux")}  # fmt: skip
    found = known.get(family)
    return (found[0], found[1], None) if found else (None, None, None)


def fleet_rows(
    fleet: list[tuple[str, range, tuple[int, ...], range]] = FLEET,
) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = []
    for family, users, weekdays, weeks in fleet:
        for user in users:
            for week in weeks:
                for weekday in weekdays:
                    day = (START + datetime.timedelta(weeks=week, days=weekday)).isoformat()
                    hour = 8 + user % 8
                    rows.append((
                        f"{family}-{user}-{week}-{weekday}", f"gw-{1 + user % 2}",
                        f"{day}T{hour:02d}:00:00.000+00:00",
                        f"{day}T{hour + 1:02d}:00:00.000+00:00",
                        day, f"hmac:user{user:03d}", "logout", 3_600_000.0, 100, 2000, 12, 1,
                        family, *client(family, user),
                    ))  # fmt: skip
    return rows


def make_fleet(url: str) -> Store:
    store = Store(url)
    store.connect()
    rows = fleet_rows()
    assert len(rows[0]) == len(SESSION_COLUMNS)
    for start in range(0, len(rows), 1000):
        assert store.write(Batch(sessions=rows[start : start + 1000])) == []
    return store


def extensions(family: str, user: int) -> list[str]:
    """The IMAP extensions `user` of `family` uses in every session (before the sink sorts them)."""
    if family == "Thunderbird":
        return ["CONDSTORE", "ENABLE", "IDLE", "SPECIAL-USE",
                *(["QRESYNC"] if user < 150 else []),  # 150 of 200: 75%
                *(["MOVE"] if user % 2 else []),  # 140.x: 50%
                *(["UTF8=ACCEPT"] if user < 3 else [])]  # 3 users: never shown  # fmt: skip
    if family == "Apple Mail":
        macos = user < 300  # 100 of 150
        return ["CONDSTORE", "IDLE", "UIDPLUS",
                *(["COMPRESS=DEFLATE"] if macos else ["ENABLE", "QRESYNC"])]  # fmt: skip
    if family == "Outlook":
        return ["IDLE", "UIDPLUS", *(["MOVE"] if user < 400 else [])]
    if family == "eM Client":
        return ["CONDSTORE", "ENABLE", "IDLE", "LIST-STATUS", "MOVE", "QRESYNC", "SPECIAL-USE"]
    if family == K9:
        return ["IDLE", "UIDPLUS", *(["CONDSTORE", "QRESYNC"] if user < 540 else [])]
    if family == "Mailspring":
        return ["IDLE", "XLIST"]
    if family == NO_ID:
        return ["IDLE", *(["XLIST"] if user < 489 else [])]  # XLIST: 4 users, not shown
    return ["IDLE"]


JA4_SCHANNEL = "t13d1516h2_8daaf6152771_02713d6af862"
"""Outlook's (it names itself) and that of ten users that send no ID: labelled Outlook."""
JA4_NSS = "t13d1715h2_5b57614c22b0_3d5424432f57"
"""Thunderbird's: not labelled."""
JA4_RARE = "t12d0909h1_0123456789ab_0123456789ab"
"""Three users without ID: labelled, but under the floor."""
JA4_ODD = "t13i0304h2_0123456789ab_0123456789ab"
"""Two users without ID: not labelled."""
LABELS = {JA4_SCHANNEL: Label("Outlook", "Windows"), JA4_RARE: Label("Rare Mail", "Linux")}
"""The administrator's fingerprint labels for the fleet."""


def ja4(family: str, user: int) -> str | None:
    """The TLS fingerprint of `user` on `family`."""
    if family == NO_ID:
        return JA4_SCHANNEL if user < 495 else JA4_ODD if user < 497 else JA4_RARE
    return {"Outlook": JA4_SCHANNEL, "Thunderbird": JA4_NSS}.get(family)


def add_traits(
    store: Store, fleet: list[tuple[str, range, tuple[int, ...], range]] = FLEET
) -> None:
    """Each session's traits: its extensions (`extensions`) and JA4 (`ja4`), as the sink
    writes them."""
    traits = []
    for row in fleet_rows(fleet):
        family, user = str(row[12]), int(str(row[5])[-3:])
        traits.append((row[0], None, None, ja4(family, user), sorted(extensions(family, user))))
    assert store.write(Batch(traits=traits)) == []


SINCE, UNTIL = "2026-10-19", "2026-11-30"
"""The second half of the fleet's twelve weeks: a period whose previous period is the first half."""
CHANGING: list[tuple[str, range, tuple[int, ...], range]] = [
    ("Mailspring", range(500, 510), (1,), range(6)),  # 10 users, then 24
    ("Mailspring", range(500, 524), (1,), range(6, WEEKS)),
    (K9, range(530, 570), (2,), range(6)),  # 40 users, then 25
    (K9, range(530, 555), (2,), range(6, WEEKS)),
    ("Geary", range(580, 584), (3,), range(WEEKS)),  # 4 users in both halves: never named
]
"""Clients whose users change between the halves, to add to FLEET."""
EDGES = {
    # A session belongs to the period its start falls in: `since` included, `until` not.
    "Edge": "2026-10-19T00:00:00.000+00:00",  # the first moment of the period
    "Eve": "2026-10-18T23:59:59.999+00:00",  # the last of the previous one
    "Early": "2026-09-07T00:00:00.000+00:00",  # the first of the previous one
    "Earlier": "2026-09-06T23:59:59.999+00:00",  # before both
    "Late": "2026-11-30T00:00:00.000+00:00",  # after both
}
"""Clients of 5 users each with one session at a period's boundary."""


def add_changes(store: Store, *, edges: bool = True) -> None:
    """CHANGING and (unless not `edges`) EDGES, written into a store that holds FLEET."""
    rows = fleet_rows(CHANGING)
    for n, (family, at) in enumerate(EDGES.items() if edges else ()):
        for user in range(600 + 10 * n, 605 + 10 * n):
            rows.append((
                f"{family}-{user}", "gw-1", at, at, at[:10], f"hmac:user{user:03d}", "logout",
                1.0, 100, 2000, 12, 1, family, "1.0", "Linux", None,
            ))  # fmt: skip
    assert store.write(Batch(sessions=rows)) == []


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = make_fleet(str(tmp_path / "stats.sqlite"))
    yield opened
    opened.close()


SESSIONS = 2400 + 3600 + 1100 + 30 + 36 + 36 + 180 + 66


def test_inventory_numbers(store: Store) -> None:
    families = summarize(store, "family")
    assert (families.sessions, families.users, families.no_id_sessions) == (SESSIONS, 500, 180)
    found = {r.group: (r.users, round(r.share * 100, 1), r.sessions) for r in families.rows}
    assert found == {
        "Thunderbird": (200, 40.0, 2400),
        "Apple Mail": (150, 30.0, 3600),
        "Outlook": (100, 20.0, 1100),
        "eM Client": (30, 6.0, 30),
        NO_ID: (15, 3.0, 180),
        "Evolution": (8, 1.6, 66),
        # NeoMutt and FairEmail: 3 users each, one on both: 5 users, counted once.
        "other": (5, 1.0, 72),
    }
    assert (families.folded, families.hidden) == (2, 5)
    seen = {r.group: (r.first_seen, r.last_seen) for r in families.rows}
    assert seen["Thunderbird"] == ("2026-09-08T08:00:00.000+00:00", "2026-11-24T16:00:00.000+00:00")
    assert seen["Outlook"] == ("2026-09-10T08:00:00.000+00:00", "2026-11-19T16:00:00.000+00:00")
    assert seen["eM Client"] == ("2026-11-27T08:00:00.000+00:00", "2026-11-27T16:00:00.000+00:00")
    named = {r.group: r.platforms for r in families.rows}
    # One Thunderbird user on FreeBSD: not named, only "other".
    assert named["Thunderbird"] == "Windows (150), Linux (49), other"
    assert named["Apple Mail"] == "macOS (100), iOS (50)"
    assert named[NO_ID] == "unknown (15)" and named["other"] == ""
    assert platforms(store, min_users=1)["Thunderbird"] == "Windows (150), Linux (49), FreeBSD (1)"
    assert proxies(store) == ["gw-1", "gw-2"]
    # The period limits everything: the last week alone.
    last = summarize(store, "family", since="2026-11-23", until="2026-11-30")
    assert {r.group: r.users for r in last.rows}["eM Client"] == 30
    assert "Outlook" not in {r.group for r in last.rows}
    assert summarize(store, "family", min_users=0).folded == 0


def test_exports_carry_share_and_platforms(store: Store) -> None:
    families = summarize(store, "family")
    table = list(csv.reader(io.StringIO(as_csv(families, "family"))))
    assert table[0] == ["family", "sessions", "users", "first_seen", "last_seen", "share",
                        "platforms"]  # fmt: skip
    assert table[1] == ["Apple Mail", "3600", "150", "2026-09-07T08:00:00.000+00:00",
                        "2026-11-26T16:00:00.000+00:00", "0.3",
                        "macOS (100), iOS (50)"]  # fmt: skip
    data = json.loads(as_json(families, "family"))
    assert (data["users"], data["folded_groups"], data["folded_users"]) == (500, 2, 5)
    assert data["rows"][1] == {
        "group": "Thunderbird", "sessions": 2400, "users": 200,
        "first_seen": "2026-09-08T08:00:00.000+00:00",
        "last_seen": "2026-11-24T16:00:00.000+00:00", "share": 0.4,
        "platforms": "Windows (150), Linux (49), other",
    }  # fmt: skip
    versions = json.loads(as_json(summarize(store, "version"), "version"))
    assert "platforms" not in versions["rows"][0]
    assert as_csv(summarize(store, "os"), "os").splitlines()[0] == (
        "os,sessions,users,first_seen,last_seen,share"
    )
    text = as_table(families, "family")
    assert "40.0%" in text and "2 groups of fewer than 5 users each are shown together" in text
    assert "5 users not shown by group" in text


def test_stats_command_exports_the_inventory(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["stats", "--store", store.url, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rows"][0]["platforms"] == "macOS (100), iOS (50)"
    assert data["rows"][0]["share"] == 0.3


def test_stats_command_exports_the_weeks(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", "--store", store.url, "--by", "week", "--format", "csv"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["week", "Apple Mail", "Evolution", "Outlook", "Thunderbird", "eM Client",
                       NO_ID, "other"]  # fmt: skip
    assert rows[1] == ["2026-W37", "150", "8", "100", "200", "", "15", "5"]
    assert rows[12] == ["2026-W48", "150", "", "", "200", "30", "15", "8"]
    assert main(["stats", "--store", store.url, "--by", "week", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["users"]["Evolution"] == [8] * 6 + [None] * 6 and data["other"][-1] == 8
    assert main(["stats", "--store", store.url, "--by", "week"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2].split() == ["2026-W37", "150", "8", "100", "200", "-", "15", "5"]
    assert table[-1] == "2026-W48 against 2026-W47: appeared eM Client; disappeared Outlook."


def test_weekly_trend_and_changes(store: Store) -> None:
    found = trend(store)
    assert found.weeks == [f"2026-W{n}" for n in range(37, 49)]
    assert sorted(found.series) == sorted(
        ["Thunderbird", "Apple Mail", "Outlook", "eM Client", NO_ID, "Evolution"]
    )  # never NeoMutt nor FairEmail: under the floor every week
    assert found.series["Thunderbird"] == [200] * 12
    assert found.series["Outlook"] == [100] * 11 + [None]
    assert found.series["eM Client"] == [None] * 11 + [30]
    assert found.series["Evolution"] == [8] * 6 + [None] * 6  # 3 users a week: not shown
    # NeoMutt and FairEmail (5 users), then Evolution's 3 as well.
    assert found.other == [5] * 6 + [8] * 6
    shift = changes(found)
    assert (shift.week, shift.previous) == ("2026-W48", "2026-W47")
    assert (shift.appeared, shift.disappeared) == (["eM Client"], ["Outlook"])
    everyone = trend(store, min_users=1)
    assert everyone.series["Evolution"] == [8] * 6 + [3] * 6
    assert everyone.series["NeoMutt"] == [3] * 12 and everyone.other == [0] * 12
    part = trend(store, since="2026-10-05", until="2026-10-19")
    assert part.weeks == ["2026-W41", "2026-W42"] and part.series["Apple Mail"] == [150, 150]
    assert iso_week("2026-12-28") == "2026-W53" and iso_week("2027-01-04") == "2027-W01"
    rows = list(csv.reader(io.StringIO(trend_csv(found))))
    assert rows[0] == ["week", *found.series, "other"]
    outlook = rows[0].index("Outlook")
    assert rows[11][outlook] == "100" and rows[12][outlook] == "" and rows[12][-1] == "8"
    data = json.loads(trend_json(found))
    assert data["users"]["eM Client"][-1] == 30 and data["changes"]["appeared"] == ["eM Client"]
    assert data["changes"]["disappeared"] == ["Outlook"]


def test_the_page_says_it_all_and_no_small_group(store: Store) -> None:
    page = html_report(store, now=NOW)
    text = html.unescape(page)
    assert (
        "500 distinct users in 7448 sessions; of the users: Thunderbird 40.0%, Apple Mail "
        "30.0%, Outlook 20.0%, eM Client 6.0%, …; 2.4% of sessions sent no ID." in text
    )
    assert "Period: 2026-09-07 to 2026-11-27 (UTC) · generated 2026-11-30 12:00 UTC" in text
    assert "2 proxies: gw-1, gw-2" in text
    assert '2 clients of fewer than 5 users each are shown together as "other": 5 users' in text
    # What changed compares whole periods: the store has nothing before this one.
    assert (
        "2026-09-07 00:00 to 2026-11-30 12:00 against 2026-06-14 12:00 to 2026-09-07 00:00: no "
        "sessions in the previous period, nothing to compare" in text
    )
    assert '<table data-table="changes">' not in page
    row = '<tr><td>Thunderbird</td><td>ID</td><td class="n">200</td><td class="n">40.0%</td>'
    assert (
        row + '<td class="n">2400</td><td class="d">2026-09-08</td><td class="d">2026-11-24</td>'
        in page
    )
    for small in ("NeoMutt", "FairEmail", "FreeBSD", "20241002"):
        assert small not in page, small
    assert page.count("<svg") == 7
    assert "@page { size: A4" in page and "@media print" in page
    assert "@media (prefers-color-scheme: dark)" in page
    outside = page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "http" not in outside and "url(" not in outside and "<script" not in outside
    assert "src=" not in outside and "<link" not in outside


def test_labels_are_cut_after_a_word() -> None:
    name = "Microsoft Outlook for Windows via the Exchange Online IMAP gateway"
    assert cut(name, 48) == "Microsoft Outlook for Windows via the Exchange\u2026"
    assert cut("x" * 60, 48) == "x" * 47 + "\u2026"  # no word ends late enough: inside it
    assert cut("short", 48) == "short"


def test_postgresql_gives_the_same_numbers(store: Store, postgres: Postgres) -> None:
    other = make_fleet(postgres.url)
    try:
        assert trend(other) == trend(store)
        assert summarize(other, "family") == summarize(store, "family")
        assert platforms(other) == platforms(store) and proxies(other) == proxies(store)
    finally:
        other.close()


def test_an_empty_store_and_a_lone_user(tmp_path: Path) -> None:
    empty = Store(str(tmp_path / "stats.sqlite"))
    empty.connect()
    try:
        page = html_report(empty, now=NOW)
        assert "No sessions in the period." in page and "0 distinct users in 0 sessions" in page
        assert export(empty, "week", "table").endswith("\nNo sessions in the period.\n")
        assert json.loads(export(empty, "week", "json"))["weeks"] == []
        lone = ("s", "gw", "2026-11-30T10:00:00.000+00:00", "2026-11-30T11:00:00.000+00:00",
                "2026-11-30", "hmac:a", "logout", 1.0, 1, 1, 1, 1, "Thunderbird", "128", "Linux",
                None)  # fmt: skip
        empty.write(Batch(sessions=[lone]))
        page = html_report(empty, now=NOW)
        assert "Thunderbird" not in page and "Linux" not in page and page.count("<svg") == 7
        assert "1 client of fewer than 5 users each is shown together" in html.unescape(page)
        assert "One week only" in export(empty, "week", "table", min_users=1)
    finally:
        empty.close()
