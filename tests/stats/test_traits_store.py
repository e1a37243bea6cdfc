"""Issues 15 and 16 in the store: each session's traits (the extensions its client used, its
behaviour signature and JA4 fingerprint) stored with the session, replay-safe, purged with it;
`imapveil stats --by extension` and `--by fingerprint`, k-floored; labelled fingerprints fold into
the inventory as inferred users. SQLite and PostgreSQL; a synthetic fleet written through the
store's own API (the one of test_report_inventory, with traits added)."""

from __future__ import annotations

import csv
import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from imapveil.cli import main
from imapveil.config import ConfigError, load
from imapveil.config_files import check_files
from imapveil.records import IdExchange, SessionEnded, SessionStarted, SessionTraits
from imapveil.stats import sink as sink_module
from imapveil.stats import store as store_module
from imapveil.stats.identify import NO_ID
from imapveil.stats.inventory import Fold, inferred
from imapveil.stats.labels import SHIPPED, Label, LabelError, load_labels, parse_labels
from imapveil.stats.report import summarize
from imapveil.stats.sink import StoreSink
from imapveil.stats.spool import Item, Spool, Tally
from imapveil.stats.store import MIGRATIONS, Batch, Store
from imapveil.stats.traits import (
    ExtensionRow,
    FamilySeen,
    extension_usage,
    fingerprint_usage,
)
from tests.helpers.dovecot import Dovecot
from tests.helpers.postgres import Postgres
from tests.helpers.process import imapveil
from tests.stats.test_durability import WAIT, nowhere, query, replay, spooled
from tests.stats.test_durability import url as url  # noqa: PLC0414 (the fixture, shared)
from tests.stats.test_end_to_end import imapveil_cli
from tests.stats.test_report_inventory import client, fleet_rows, make_fleet

JA4_WIN = "t13d1516h2_8daaf6152771_02713d6af862"
JA4_NSS = "t13d1715h2_5b57614c22b0_3d5424432f57"
JA4_APPLE = "t13d2014h2_a09f3c656075_14788d8d241b"
JA4_RARE = "t12d0909h1_0123456789ab_0123456789ab"


def behaviour(n: int) -> str:
    return f"b1_{n:012x}"


def traits_of(family: str, user: int) -> tuple[str | None, str | None, list[str]] | None:
    """The fleet's clients: (behaviour, JA4, extensions) of `user` on `family`; None: unknown
    (eM Client's sessions are as if stored before the store kept traits)."""
    platform = client(family, user)[1]
    if family == "Thunderbird":
        ja4 = JA4_WIN if platform == "Windows" else JA4_NSS
        extensions = ["CONDSTORE", "ENABLE", "IDLE"] + (["QRESYNC"] if user < 100 else [])
        return behaviour(1), ja4, extensions + (["NOTIFY"] if user == 199 else [])
    fixed: dict[str, tuple[str | None, str | None, list[str]]] = {
        "Apple Mail": (behaviour(2), JA4_APPLE, ["IDLE", "MOVE"]),
        "Outlook": (behaviour(3), JA4_WIN, ["IDLE"]),
        "NeoMutt": (behaviour(5), JA4_RARE, ["COMPRESS=DEFLATE"]),
        "FairEmail": (behaviour(5), None, ["COMPRESS=DEFLATE"]),
        "Evolution": (None, None, ["IDLE"]),
    }
    if family == NO_ID:  # ten of them behave as Outlook does, five otherwise
        return (behaviour(3) if user < 495 else behaviour(4)), JA4_WIN, ["IDLE"]
    return fixed.get(family)


def fleet_traits() -> list[tuple[Any, ...]]:
    found = []
    for row in fleet_rows():
        family, user = str(row[12]), int(str(row[5]).removeprefix("hmac:user"))
        traits = traits_of(family, user)
        if traits is not None:
            name, ja4, extensions = traits
            found.append((row[0], name, f"text of {name}" if name else None, ja4, extensions))
    return found


def make_traits_fleet(url: str) -> Store:
    store = make_fleet(url)
    rows = fleet_traits()
    for start in range(0, len(rows), 1000):
        assert store.write(Batch(traits=rows[start : start + 1000])) == []
    return store


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Store]:
    opened = make_traits_fleet(str(tmp_path / "stats.sqlite"))
    yield opened
    opened.close()


LABELS = {behaviour(3): Label("Outlook", "Windows"), JA4_WIN: Label("Windows Mail", "Windows")}


# --- the queries, on the fleet ------------------------------------------------------------------


def test_extensions_per_family_k_floored(fleet: Store) -> None:
    usage = extension_usage(fleet)
    found = {(r.family, r.extension): (r.users, r.sessions, round(r.share, 3)) for r in usage.rows}
    assert found == {
        ("Thunderbird", "CONDSTORE"): (200, 2400, 1.0),
        ("Thunderbird", "ENABLE"): (200, 2400, 1.0),
        ("Thunderbird", "IDLE"): (200, 2400, 1.0),
        ("Thunderbird", "QRESYNC"): (100, 1200, 0.5),
        ("Apple Mail", "IDLE"): (150, 3600, 1.0),
        ("Apple Mail", "MOVE"): (150, 3600, 1.0),
        ("Outlook", "IDLE"): (100, 1100, 1.0),
        (NO_ID, "IDLE"): (15, 180, 1.0),
        ("Evolution", "IDLE"): (8, 66, 1.0),
    }
    # Thunderbird's one NOTIFY user, NeoMutt's and FairEmail's COMPRESS (3 users each, one on
    # both): three groups, six distinct users, none of them shown.
    assert usage.folded == Fold(3, 6)
    assert usage.families == (("Thunderbird", 200), ("Apple Mail", 150), ("Outlook", 100),
                              (NO_ID, 15), ("Evolution", 8))  # fmt: skip
    assert usage.rows[0] == ExtensionRow("Thunderbird", "CONDSTORE", 200, 2400, 1.0)
    assert "eM Client" not in {r.family for r in usage.rows}  # its traits are unknown
    assert extension_usage(fleet, min_users=0).folded == Fold()
    everyone = {(r.family, r.extension): r.users for r in extension_usage(fleet, min_users=1).rows}
    assert (
        everyone[("Thunderbird", "NOTIFY")] == 1 and everyone[("NeoMutt", "COMPRESS=DEFLATE")] == 3
    )
    last = extension_usage(fleet, since="2026-11-23", until="2026-11-30")
    assert {r.family for r in last.rows} == {"Thunderbird", "Apple Mail", NO_ID}


def test_fingerprints_with_the_families_beside_them(fleet: Store) -> None:
    usage = fingerprint_usage(fleet, labels=LABELS)
    rows = {(r.kind, r.fingerprint): r for r in usage.rows}
    assert [(r.kind, r.fingerprint, r.users) for r in usage.rows] == [
        ("ja4", JA4_WIN, 265), ("ja4", JA4_APPLE, 150), ("ja4", JA4_NSS, 50),
        ("behaviour", behaviour(1), 200), ("behaviour", behaviour(2), 150),
        ("behaviour", behaviour(3), 110), ("behaviour", behaviour(4), 5),
        ("behaviour", behaviour(5), 5),
    ]  # fmt: skip
    win = rows[("ja4", JA4_WIN)]
    assert win.families == (FamilySeen("Thunderbird", 150), FamilySeen("Outlook", 100))
    assert (win.no_id_users, win.sessions, win.label) == (15, 1800 + 1100 + 180, LABELS[JA4_WIN])
    outlookish = rows[("behaviour", behaviour(3))]
    assert outlookish.families == (FamilySeen("Outlook", 100),) and outlookish.no_id_users == 10
    assert outlookish.label == Label("Outlook", "Windows")
    assert outlookish.text == f"text of {behaviour(3)}" and win.text is None
    # NeoMutt and FairEmail share a behaviour: 5 users, shown; 3 each beside it: not shown.
    shared = rows[("behaviour", behaviour(5))]
    assert (shared.families, shared.no_id_users, shared.label) == ((), None, None)
    assert rows[("behaviour", behaviour(4))].no_id_users == 5
    assert rows[("ja4", JA4_NSS)].families == (FamilySeen("Thunderbird", 50),)
    assert usage.folded == {"ja4": Fold(1, 3), "behaviour": Fold()}  # NeoMutt's rare JA4
    assert ("ja4", JA4_RARE) not in rows
    assert fingerprint_usage(fleet, min_users=0).folded["ja4"] == Fold()


def test_labelled_fingerprints_fold_into_the_inventory_as_inferred(fleet: Store) -> None:
    found = inferred(fleet, labels=LABELS)
    # The behaviour label first: ten users without ID behave as Outlook; the five others only
    # have the labelled JA4.
    assert [(r.family, r.users, r.sessions, r.platforms) for r in found.rows] == [
        ("Outlook", 10, 120, "Windows (10)"),
        ("Windows Mail", 5, 60, "Windows (5)"),
    ]
    assert found.rows[0].share == 10 / 500 and found.folded == Fold()
    assert found.rows[0].first_seen == "2026-09-09T08:00:00.000+00:00"
    floored = inferred(fleet, labels=LABELS, min_users=6)
    assert [r.family for r in floored.rows] == ["Outlook"] and floored.folded == Fold(1, 5)
    # The last week only: 400 users in all that week.
    week = inferred(fleet, since="2026-11-23", until="2026-11-30", labels=LABELS)
    assert [(r.family, r.users, r.sessions, r.share) for r in week.rows] == [
        ("Outlook", 10, 10, 10 / 400), ("Windows Mail", 5, 5, 5 / 400)
    ]  # fmt: skip
    assert inferred(fleet, labels={}) == inferred(fleet, labels=None)
    assert inferred(fleet, labels={}).rows == ()
    # The named inventory is as it was: inferred users are never added into it.
    named = {r.group: r.users for r in summarize(fleet, "family").rows}
    assert named["Outlook"] == 100 and named[NO_ID] == 15


def test_postgresql_gives_the_same_numbers(fleet: Store, postgres: Postgres) -> None:
    other = make_traits_fleet(postgres.url)
    try:
        assert extension_usage(other) == extension_usage(fleet)
        assert fingerprint_usage(other, labels=LABELS) == fingerprint_usage(fleet, labels=LABELS)
        assert inferred(other, labels=LABELS) == inferred(fleet, labels=LABELS)
        assert extension_usage(other, since="2026-11-23") == extension_usage(
            fleet, since="2026-11-23"
        )
    finally:
        other.close()


# --- the command line ---------------------------------------------------------------------------


def test_stats_by_extension(fleet: Store, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", "--store", fleet.url, "--by", "extension"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[2].split() == ["Thunderbird", "CONDSTORE", "200", "100.0%", "2400"]
    assert "3 groups of fewer than 5 users each are not shown: 6 users in them." in table
    assert "NOTIFY" not in table and "COMPRESS" not in table and "NeoMutt" not in table
    assert main(["stats", "--store", fleet.url, "--by", "extension", "--format", "csv"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["family", "extension", "users", "sessions", "share"]
    assert ["Thunderbird", "QRESYNC", "100", "1200", "0.5"] in rows and len(rows) == 10
    assert main(["stats", "--store", fleet.url, "--by", "extension", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["by"], data["folded_groups"], data["folded_users"]) == ("extension", 3, 6)
    assert data["rows"][3] == {"family": "Thunderbird", "extension": "QRESYNC", "users": 100,
                               "sessions": 1200, "share": 0.5}  # fmt: skip
    assert data["families"][0] == {"family": "Thunderbird", "users": 200}
    assert main(["stats", "--store", fleet.url, "--by", "extension", "--min-users", "1"]) == 0
    assert "NOTIFY" in capsys.readouterr().out


def labels_file(tmp_path: Path) -> Path:
    path = tmp_path / "labels.toml"
    path.write_text(
        f'[[label]]\nfingerprint = "{behaviour(3)}"\nfamily = "Outlook"\nplatform = "Windows"\n\n'
        f'[[label]]\nfingerprint = "{JA4_WIN}"\nfamily = "Windows Mail"\nplatform = "Windows"\n',
        encoding="utf-8",
    )
    return path


def config_with_labels(tmp_path: Path, store: Store) -> Path:
    conf = tmp_path / "imapveil.toml"
    labels = labels_file(tmp_path)
    conf.write_text(f'store = "{store.url}"\nfingerprint_labels = "{labels}"\n', encoding="utf-8")
    return conf


def test_stats_by_fingerprint(
    fleet: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = config_with_labels(tmp_path, fleet)
    assert main(["stats", "--config", str(conf), "--by", "fingerprint"]) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[2].split() == ["ja4", JA4_WIN, "265", "3080", "15", "Windows", "Mail",
                                "(Windows)"]  # fmt: skip
    assert lines[3].strip() == "named in an ID: Thunderbird (150), Outlook (100)"
    assert "1 ja4 fingerprint of fewer than 5 users each is not shown: 3 users in them." in table
    assert JA4_RARE not in table and "hmac:" not in table
    for form in ("csv", "json"):
        assert main(["stats", "--config", str(conf), "--by", "fingerprint", "--format", form]) == 0
        text = capsys.readouterr().out
        assert "hmac:" not in text and JA4_RARE not in text
        if form == "csv":
            rows = list(csv.DictReader(io.StringIO(text)))
            assert len(rows) == 8
            assert rows[5] == {
                "kind": "behaviour", "fingerprint": behaviour(3), "users": "110",
                "sessions": "1220", "no_id_users": "10", "families": "Outlook (100)",
                "label_family": "Outlook", "label_platform": "Windows",
                "text": f"text of {behaviour(3)}",
            }  # fmt: skip
            assert rows[7]["no_id_users"] == "" and rows[7]["families"] == ""
        else:
            data = json.loads(text)
            assert data["folded"] == {"ja4": {"groups": 1, "users": 3},
                                      "behaviour": {"groups": 0, "users": 0}}  # fmt: skip
            assert data["rows"][0]["families"] == [{"family": "Thunderbird", "users": 150},
                                                   {"family": "Outlook", "users": 100}]  # fmt: skip
            assert data["rows"][0]["label"] == {"family": "Windows Mail", "platform": "Windows"}
    # Without the administrator's labels: the shipped table is empty, nothing is labelled.
    assert main(["stats", "--store", fleet.url, "--by", "fingerprint", "--format", "json"]) == 0
    assert {r["label"] for r in json.loads(capsys.readouterr().out)["rows"]} == {None}


def test_stats_by_family_shows_inferred_users_apart(
    fleet: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = config_with_labels(tmp_path, fleet)
    assert main(["stats", "--config", str(conf), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    named = {r["family"]: r for r in rows if r["inferred"] == "false"}
    guessed = {r["family"]: r for r in rows if r["inferred"] == "true"}
    assert named["Outlook"]["users"] == "100" and named[NO_ID]["users"] == "15"
    assert {f: (r["users"], r["sessions"]) for f, r in guessed.items()} == {
        "Outlook": ("10", "120"), "Windows Mail": ("5", "60")
    }  # fmt: skip
    assert (
        guessed["Outlook"]["share"] == "0.02" and guessed["Outlook"]["platforms"] == "Windows (10)"
    )
    assert main(["stats", "--config", str(conf), "--format", "json", "--min-users", "6"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["family"] for r in data["inferred"]["rows"]] == ["Outlook"]
    assert (data["inferred"]["folded_groups"], data["inferred"]["folded_users"]) == (1, 5)
    assert {r["group"]: r["users"] for r in data["rows"]}["Outlook"] == 100
    assert main(["stats", "--config", str(conf)]) == 0
    table = capsys.readouterr().out
    assert "Inferred from labelled fingerprints: sessions that sent no ID" in table
    assert table.splitlines()[-1].split() == [
        "Windows",
        "Mail",
        "60",
        "5",
        "1.0%",
        "Windows",
        "(5)",
    ]
    # Without labels the table is as before, and CSV says no row is inferred.
    assert main(["stats", "--store", fleet.url]) == 0
    assert "Inferred" not in capsys.readouterr().out
    assert main(["stats", "--store", fleet.url, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["inferred"] for r in rows} == {"false"}


# --- labels -------------------------------------------------------------------------------------


def test_the_shipped_labels_are_an_honest_empty_table() -> None:
    assert load_labels() == {}
    text = SHIPPED.read_text(encoding="utf-8")
    assert "[[label]]" in text and "empty on purpose" in text
    # Its commented examples, uncommented, are valid rows.
    example = "\n".join(line.removeprefix("# ") for line in text.splitlines() if "= " in line)
    example = example.replace('fingerprint = "t13', '[[label]]\nfingerprint = "t13')
    assert len(parse_labels("[[label]]\n" + example, "example")) == 2


HOSTILE = [
    ("[[label]]\nfingerprint = \n", "not valid TOML", "line 2"),
    ("[label]\nfingerprint = 'b1_0123456789ab'\n", "write labels as [[label]] rows", ""),
    ("[[label]]\nfamily = 'Outlook'\n", "line 1: [[label]]: `fingerprint` must be", ""),
    ("\n\n[[label]]\nfingerprint = 'b1_0123456789ab'\nfamily = 'Outlook'\n\n[[label]]\n"
     "fingerprint = 'hmac:user001'\nfamily = 'Outlook'\n", "line 7: [[label]]", "JA4 value"),
    ("[[label]]\nfingerprint = 'b1_0123456789ab'\n", "`family` is missing", ""),
    ("[[label]]\nfingerprint = 'b1_0123456789ab'\nfamily = 'Out\\u001b[31mlook'\n",
     "`family`: 1 to 64", ""),
    ("[[label]]\nfingerprint = 'b1_0123456789ab'\nfamily = '" + "x" * 65 + "'\n", "1 to 64", ""),
    ("[[label]]\nfingerprint = 'b1_0123456789ab'\nfamily = 'Outlook'\nplatform = 'Win\\ndows'\n",
     "`platform`: 1 to 64", ""),
    ("[[label]]\nfingerprint = 'b1_0123456789ab'\nfamily = 'other'\n", "a group of their own", ""),
    ("[[label]]\nfingerprint = 'b1_0123456789ab'\nfamily = 'Outlook'\nuser = 'alice'\n",
     "unknown key(s) user", ""),
    ("[[label]]\nfingerprint = 'b1_0123456789ab'\nfamily = 'A'\n[[label]]\n"
     "fingerprint = 'b1_0123456789ab'\nfamily = 'B'\n", "line 4: [[label]]: b1_0123456789ab is "
     "labelled twice", ""),
    ("[[label]]\nfingerprint = 'b1_0123456789ab'\nfamily = 7\n", "`family`: 1 to 64", ""),
    ("name = 'x'\n", "unknown key(s) name", ""),
]  # fmt: skip


@pytest.mark.parametrize(("text", "said", "also_said"), HOSTILE)
def test_a_hostile_labels_file_is_a_clear_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, said: str, also_said: str
) -> None:
    path = tmp_path / "labels.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(LabelError) as caught:
        parse_labels(text, str(path))
    assert str(caught.value).startswith(f"{path}: ") and said in str(caught.value)
    assert also_said in str(caught.value)
    settings = load(None, {"upstream": "127.0.0.1:143", "fingerprint_labels": str(path)})
    with pytest.raises(ConfigError, match=f"^fingerprint_labels: {path}: "):
        check_files(settings)
    store = Store(str(tmp_path / "stats.sqlite"))
    store.connect()
    store.close()
    conf = tmp_path / "c.toml"
    conf.write_text(f'store = "{store.url}"\nfingerprint_labels = "{path}"\n', encoding="utf-8")
    assert main(["stats", "--config", str(conf), "--by", "fingerprint"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"imapveil: {path}: ") and said in err and err.count("\n") == 1


def test_labels_of_the_administrator_replace_shipped_ones(tmp_path: Path) -> None:
    own = labels_file(tmp_path)
    assert load_labels(own) == LABELS
    with pytest.raises(LabelError, match="cannot read"):
        load_labels(tmp_path / "missing.toml")


# --- migration 3 --------------------------------------------------------------------------------

OLD_ROW = ("old", "p", "2026-01-01T00:00:00.000+00:00", "2026-01-01T00:01:00.000+00:00",
           "2026-01-01", "hmac:u", "logout", 5.0, 1, 2, 3, 0, "Thunderbird", "1", None,
           None)  # fmt: skip


def test_migration_3_from_a_version_2_database_with_rows(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(store_module, "MIGRATIONS", MIGRATIONS[:2])
        old = Store(url)
        old.connect()
        assert old.version == 2
        assert old.write(Batch(sessions=[OLD_ROW], commands=[("old", "IDLE", "OK", 2)])) == []
        old.close()
    store = Store(url)
    store.connect()
    try:
        assert store.version == 3 == len(MIGRATIONS)
        assert store.rows("SELECT session, family FROM sessions") == [("old", "Thunderbird")]
        assert summarize(store, "family", min_users=1).rows[0].group == "Thunderbird"
        # Its traits are unknown: it counts nowhere here, denominators included.
        assert extension_usage(store, min_users=0).rows == ()
        assert fingerprint_usage(store, min_users=0).rows == ()
        new = ("new", *OLD_ROW[1:])
        assert store.write(Batch(sessions=[OLD_ROW, new], traits=[
            ("new", behaviour(1), "text", JA4_WIN, ["IDLE"])])) == []  # fmt: skip
        usage = extension_usage(store, min_users=0)
        assert usage.rows == (ExtensionRow("Thunderbird", "IDLE", 1, 1, 1.0),)
        # Retention purges traits with their sessions, and nothing newer.
        assert store.purge("2026-06-01") == 2
        for table in ("sessions", "session_traits", "session_extensions", "command_counts"):
            assert store.rows(f"SELECT COUNT(*) FROM {table}") == [(0,)], table  # noqa: S608
    finally:
        store.close()


def test_a_batch_written_twice_is_stored_once(url: str) -> None:
    store = Store(url)
    store.connect()
    try:
        batch = Batch(sessions=[OLD_ROW], traits=[("old", behaviour(1), "t", JA4_WIN,
                                                   ["IDLE", "MOVE"])])  # fmt: skip
        assert store.write(batch) == [] and store.write(batch) == []
        assert store.rows("SELECT COUNT(*) FROM session_traits") == [(1,)]
        assert store.rows("SELECT extension FROM session_extensions ORDER BY extension") == [
            ("IDLE",), ("MOVE",)
        ]  # fmt: skip
        # A different session under the same id: reported, and its traits not stored.
        other = ("old", *OLD_ROW[1:5], "hmac:someone-else", *OLD_ROW[6:])
        collided = store.write(Batch(sessions=[other], traits=[("old", behaviour(9), "x", None,
                                                                ["NOTIFY"])]))  # fmt: skip
        assert [c.session for c in collided] == ["old"]
        assert store.rows("SELECT behaviour FROM session_traits") == [(behaviour(1),)]
        assert store.rows("SELECT COUNT(*) FROM session_extensions") == [(2,)]
    finally:
        store.close()


# --- the sink -----------------------------------------------------------------------------------


def emit_traced(
    sink: StoreSink, sid: str, traits: SessionTraits | None, user: str = "hmac:u"
) -> None:
    """A session as the core emits it: start, ID, its traits (or none), end."""
    sink.emit(SessionStarted(sid, "127.0.0.1:1", "u"))
    fields: dict[str, str | None] = {"name": "Thunderbird", "version": "128"}
    sink.emit(IdExchange(sid, "a", "authenticated", "OK", False, fields, (), ("name",), None))
    if traits is not None:
        sink.emit(traits)
    sink.emit(SessionEnded(sid, "127.0.0.1:1", "u", "logout", None, "logout", user, 5.0, 1, 2, 3))


async def run_sink(sink: StoreSink) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        with trio.fail_after(WAIT):
            await sink.flush()
        nursery.cancel_scope.cancel()


async def test_traits_then_end_are_stored_with_the_session(url: str, tmp_path: Path) -> None:
    sink = StoreSink(url, spool=tmp_path / "spool")
    emit_traced(sink, "full", SessionTraits("full", ("CONDSTORE", "IDLE"), behaviour(1),
                                            "CAPABILITY ID LOGIN", JA4_WIN))  # fmt: skip
    emit_traced(sink, "none", None)  # a session whose traits never came
    emit_traced(sink, "empty", SessionTraits("empty"))  # known, and nothing used
    hostile = SessionTraits(
        "hostile", ("IDLE", "X" * 33, "BAD\x1bNAME", "caf\u00e9", ""), "b1_" + "0" * 40,
        "x" * 401, "t13d\n1516h2",
    )  # fmt: skip
    emit_traced(sink, "hostile", hostile)
    sink.emit(SessionTraits("late", ("IDLE",), behaviour(2)))  # after no session: ignored
    await run_sink(sink)
    assert query(url, "SELECT session FROM sessions ORDER BY session") == [
        ("empty",), ("full",), ("hostile",), ("none",)
    ]  # fmt: skip
    assert query(url, "SELECT * FROM session_traits ORDER BY session") == [
        ("empty", None, None, None),
        ("full", behaviour(1), "CAPABILITY ID LOGIN", JA4_WIN),
        ("hostile", None, None, None),
    ]
    assert query(url, "SELECT session, extension FROM session_extensions ORDER BY 1, 2") == [
        ("full", "CONDSTORE"), ("full", "IDLE"), ("hostile", "IDLE")
    ]  # fmt: skip
    assert sink.counts["written"] == Tally(4, 4 + 4 + 3)  # sessions, ID rows, traits


async def test_a_batch_never_parts_a_session_and_its_traits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sink_module, "BATCH", 1)
    url = str(tmp_path / "stats.sqlite")
    sink = StoreSink(url, spool=tmp_path / "spool")
    batches: list[Batch] = []
    write = sink.store.write

    def traced(batch: Batch) -> list[Any]:
        batches.append(batch)
        return write(batch)

    monkeypatch.setattr(sink.store, "write", traced)
    for n in range(3):
        emit_traced(sink, f"s{n}", SessionTraits(f"s{n}", ("IDLE",), behaviour(n)))
    await run_sink(sink)
    with_traits = [b for b in batches if b.traits]
    assert len(with_traits) == 3
    assert all([t[0] for t in b.traits] == [s[0] for s in b.sessions] for b in with_traits)
    assert query(url, "SELECT COUNT(*) FROM session_traits") == [(3,)]


# --- the spool, before and after migration 3 ----------------------------------------------------


async def test_replay_of_a_spool_written_before_and_after_migration_3(
    url: str, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    await spooled(spool, 30, "before")  # as the proxy wrote it before traits existed
    assert b'"traits"' not in b"".join(p.read_bytes() for p in spool.glob("*.jsonl"))
    sink = StoreSink(nowhere(), spool=spool)
    async with trio.open_nursery() as nursery:  # the store away: all to the spool
        nursery.start_soon(sink.run)
        for n in range(20):
            emit_traced(sink, f"after-{n}", SessionTraits(f"after-{n}", ("IDLE",), behaviour(n)))
        nursery.cancel_scope.cancel()
    assert sink.counts["spooled"] == Tally(20, 60)
    replayed = await replay(url, spool)
    assert replayed.counts["replayed"] == Tally(50, 30 * 4 + 20 * 3)
    assert replayed.counts["dropped"] == Tally()
    assert query(url, "SELECT COUNT(*) FROM sessions") == [(50,)]
    assert query(url, "SELECT COUNT(*) FROM session_traits") == [(20,)]
    assert query(url, "SELECT COUNT(*) FROM session_extensions") == [(20,)]


def test_the_spool_reads_a_session_and_its_traits_together(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    items: list[Item] = [
        ("session", ["a"]), ("traits", ["a", None, None, None, []]), ("command", ["a"]),
        ("session", ["b"]), ("traits", ["b", None, None, None, ["IDLE"]]),
    ]  # fmt: skip
    assert spool.append(items) == 5
    read = []
    while spool.pending:
        got, position = spool.read(1)
        read.append([kind for kind, _ in got])
        spool.consume(position)
    assert read == [["session", "traits"], ["command"], ["session", "traits"]]
    spool.close()
    # An old spool file (no traits) reads as it always did.
    old = tmp_path / "old"
    old.mkdir()
    (old / "000000000001.jsonl").write_bytes(b'["session",["x"]]\n["command",["x"]]\n')
    again = Spool(old)
    again.open()
    assert again.read(1)[0] == [("session", ["x"])]
    again.close()


# --- end to end: real sessions through `imapveil serve` to Dovecot, a SQLite store ---------------


def scripted_session(port: int, user: str, password: str, lines: list[bytes]) -> None:
    """One client session, a command at a time, each awaited (IDLE ended by DONE)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s, s.makefile("rb") as f:
        f.readline()
        for n, line in enumerate([*lines, b"LOGOUT"]):
            tag = b"t%d" % n
            command = line.replace(b"USER PASS", f"{user} {password}".encode())
            s.sendall(tag + b" " + command + b"\r\n")
            while not (answer := f.readline()).startswith(tag + b" "):
                assert answer, line
                if line == b"IDLE" and answer.startswith(b"+"):
                    s.sendall(b"DONE\r\n")


NAMED = [b"CAPABILITY", b'ID ("name" "Thunderbird" "version" "128.5.0")', b"LOGIN USER PASS",
         b"ENABLE CONDSTORE", b"SELECT INBOX (CONDSTORE)", b"IDLE"]  # fmt: skip
NAMELESS = [b"CAPABILITY", b"LOGIN USER PASS", b'LIST "" "*" RETURN (SPECIAL-USE)',
            b"SELECT INBOX", b"UID SEARCH ALL"]  # fmt: skip


@pytest.mark.dovecot
def test_end_to_end_traits_reach_the_store_and_stats(dovecot: Dovecot, tmp_path: Path) -> None:
    store = str(tmp_path / "stats.sqlite")
    with imapveil(tmp_path, dovecot.address, "--store", store) as proxy:
        for user, password in dovecot.users.items():
            scripted_session(proxy.port, user, password, NAMED)
            scripted_session(proxy.port, user, password, NAMELESS)
        assert proxy.stop() == 0
        events = proxy.events.read_text()
    # The event log never has them: no traits record, no fingerprint.
    assert '"traits"' not in events and "b1_" not in events and "CONDSTORE" not in events
    users = len(dovecot.users)
    done = imapveil_cli("stats", "--store", store, "--by", "extension", "--format", "json",
                        "--min-users", "1")  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = {(r["family"], r["extension"]): r["users"] for r in json.loads(done.stdout)["rows"]}
    for extension in ("CONDSTORE", "ENABLE", "ID", "IDLE"):
        assert found[("Thunderbird", extension)] == users, extension
    assert found[(NO_ID, "SPECIAL-USE")] == users and ("Thunderbird", "SPECIAL-USE") not in found
    done = imapveil_cli("stats", "--store", store, "--by", "fingerprint", "--format", "json",
                        "--min-users", "1")  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["rows"]
    # One behaviour per client program, the same for every account.
    assert [(r["kind"], r["users"], r["sessions"]) for r in rows] == [
        ("behaviour", users, users)
    ] * 2
    named = next(r for r in rows if r["families"])
    nameless = next(r for r in rows if not r["families"])
    assert named["families"] == [{"family": "Thunderbird", "users": users}]
    assert (nameless["no_id_users"], named["no_id_users"]) == (users, None)
    assert "ENABLE" in named["text"] and "hmac:" not in done.stdout
    # Labelled, the nameless client's users count as inferred, apart from the named ones.
    labels = tmp_path / "labels.toml"
    labels.write_text(f'[[label]]\nfingerprint = "{nameless["fingerprint"]}"\nfamily = "Outlook"'
                      '\nplatform = "Windows"\n', encoding="utf-8")  # fmt: skip
    conf = tmp_path / "imapveil.toml"
    conf.write_text(f'store = "{store}"\nfingerprint_labels = "{labels}"\n', encoding="utf-8")
    done = imapveil_cli("stats", "--config", str(conf), "--format", "json", "--min-users", "1")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert {r["group"]: r["users"] for r in data["rows"]} == {"Thunderbird": users, NO_ID: users}
    assert [(r["family"], r["users"], r["platforms"]) for r in data["inferred"]["rows"]] == [
        ("Outlook", users, f"Windows ({users})")
    ]
    folded = imapveil_cli("stats", "--config", str(conf), "--by", "fingerprint")
    assert folded.returncode == 0 and "Outlook (Windows)" not in folded.stdout  # k-floored
