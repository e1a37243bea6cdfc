from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
import trio

from imapveil.policy import apply
from imapveil.policy_files import resolve_policy
from imapveil.protocol.id_params import parse
from imapveil.records import (
    CommandCompleted,
    IdExchange,
    SessionEnded,
    SessionStarted,
    StoreDropped,
)
from imapveil.service import Service
from imapveil.sinks import MemorySink
from imapveil.stats.identify import NO_ID, identify
from imapveil.stats.report import (
    CHAR_WIDTH,
    Row,
    Summary,
    _bars,
    as_csv,
    as_json,
    as_table,
    html_report,
    summarize,
)
from imapveil.stats.sink import StoreSink
from imapveil.stats.store import MIGRATIONS, Store
from tests.helpers.corpus import rows

EXPECTED = {
    "apple-mail-macos13": ("Apple Mail", "macOS"),
    "ios-mail-17-field-order": ("Apple Mail", "iOS"),
    "ios-maild-18": ("Apple Mail", "iOS"),
    "thunderbird-52": ("Thunderbird", None),
    "k9-android": ("K-9 Mail / Thunderbird for Android", "Android"),
    "aosp-email-identifiers": ("Android Email", "Android"),
    "mailkit": ("MailKit", None),
    "imapsync": ("imapsync", "Linux"),
    "offlineimap": ("OfflineIMAP", None),
    "neomutt": ("NeoMutt", None),
    "imapflow": ("ImapFlow", None),
    "wino-no-name-field": ("unnamed", "Windows"),
    "mailcore2-nil": (NO_ID, None),
}


@pytest.mark.parametrize("label", sorted(EXPECTED))
def test_identify_corpus_clients(label: str) -> None:
    row = next(r for r in rows() if r.label == label)
    recorded = apply(resolve_policy("default"), parse(row.args), hasher=lambda v: "h").recorded
    client = identify(recorded or None)
    assert (client.family, client.platform) == EXPECTED[label]


def session(
    sink: StoreSink, sid: str, user: str | None, client: dict[str, str | None] | None
) -> None:
    sink.emit(SessionStarted(sid, "127.0.0.1:1", "u"))
    if client is not None:
        sink.emit(
            IdExchange(
                sid,
                "a",
                "authenticated",
                "OK",
                False,
                client,
                ("x-device",),
                ("name",),
                None,
                "default",
                "d" * 64,
            )
        )
    sink.emit(CommandCompleted(sid, "b", "FETCH", "selected", "OK", None, 1.0))
    sink.emit(CommandCompleted(sid, "c", "FETCH", "selected", "OK", None, 1.0))
    sink.emit(SessionEnded(sid, "127.0.0.1:1", "u", "logout", None, "logout", user, 5.0, 10, 20, 3))


async def fill(url: str) -> StoreSink:
    sink = StoreSink(url, proxy="test")
    for i in range(6):  # six users on Thunderbird
        session(
            sink,
            f"t{i}",
            f"hmac:user{i}",
            {"name": "Thunderbird", "version": "115.3", "os": "Windows"},
        )
    for i in range(2):  # two on NeoMutt: fewer than five, so "other"
        session(sink, f"n{i}", f"hmac:user{i}", {"name": "NeoMutt", "version": "2023"})
    for i in range(5):  # five sessions without ID, three users
        session(sink, f"x{i}", f"hmac:user{i % 3}", None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        with trio.fail_after(10):
            await sink.flush()
        nursery.cancel_scope.cancel()
    return sink


async def test_store_reports_fold_small_groups(tmp_path: Path) -> None:
    url = str(tmp_path / "stats.sqlite")
    sink = await fill(url)
    assert sink.written == 13 + 13 + 8 and sink.dropped == 0  # sessions, commands, IDs
    store = Store(url)
    store.connect()
    try:
        assert store.version == len(MIGRATIONS) == 3
        by_family = summarize(store, "family")
        assert [(r.group, r.sessions, r.users) for r in by_family.rows] == [
            ("Thunderbird", 6, 6),
            # NeoMutt (users 0 and 1) and "no ID" (users 0, 1, 2) folded: three users, not 2 + 3
            ("other", 7, 3),
        ]
        assert by_family.sessions == 13 and by_family.users == 6
        assert by_family.no_id_sessions == 5
        everyone = summarize(store, "family", min_users=1)
        assert {r.group for r in everyone.rows} == {"Thunderbird", "NeoMutt", NO_ID}
        assert summarize(store, "family", min_users=0).rows == everyone.rows  # 0: no folding
        other = summarize(store, "version", min_users=7).rows
        assert [(r.group, r.sessions, r.users) for r in other] == [("other", 13, 6)]
        assert [r.group for r in summarize(store, "version").rows] == ["Thunderbird 115.3", "other"]
        assert {r.group for r in summarize(store, "os", min_users=1).rows} == {"Windows", "unknown"}
        assert len(summarize(store, "day").rows) == 1
        assert "38.5% of sessions sent no ID" in as_table(by_family, "family")
        assert as_csv(by_family, "family").splitlines()[1].startswith("Thunderbird,6,6,")
        assert json.loads(as_json(by_family, "family"))["no_id_share"] == 0.3846
        page = html_report(store)
        assert page.count("<svg") == 7 and "http" not in page.replace(
            "http://www.w3.org/2000/svg", ""
        )
        counts = store.rows(
            "SELECT verb, status, SUM(count) FROM command_counts GROUP BY verb, status"
        )
        assert counts == [("FETCH", "OK", 26)]
        ids = store.rows("SELECT family, name, dropped FROM id_exchanges WHERE session = 't0'")
        assert ids == [("Thunderbird", "Thunderbird", '["x-device"]')]
        # Retention: everything ended before a future date goes.
        assert store.purge("9999-01-01") == 13
        assert store.rows("SELECT COUNT(*) FROM command_counts") == [(0,)]
    finally:
        store.close()


async def test_a_stalled_store_never_blocks_and_counts_drops(tmp_path: Path) -> None:
    url = str(tmp_path / "stats.sqlite")
    sink = StoreSink(url, capacity=5)
    blocker = Store(url)
    blocker.connect()
    blocker.execute("BEGIN EXCLUSIVE")  # another process holds the database
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sink.run)
            # emit() is synchronous and only touches memory: sessions go on while the
            # database is locked, and what does not fit the queue is counted.
            for i in range(50):
                session(sink, f"s{i}", "hmac:u", {"name": "Thunderbird"})
            assert sink.dropped > 0 and sink.depth <= 5
            blocker.execute("ROLLBACK")
            with trio.fail_after(30):
                await sink.flush()
            nursery.cancel_scope.cancel()
    finally:
        blocker.close()
    store = Store(url)
    store.connect()
    ((written,),) = store.rows("SELECT COUNT(*) FROM sessions")
    store.close()
    # The queue took two sessions' rows (and not all of the second's): the rest is counted.
    assert written == 2 and sink.counts["dropped"].sessions == 48


async def test_store_drops_become_a_record(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    sink = StoreSink(str(tmp_path / "stats.sqlite"), capacity=2)  # never connected: all queue
    for i in range(5):
        session(sink, f"s{i}", "hmac:u", None)
    log = MemorySink()
    holder = SimpleNamespace(fanout=log)
    with trio.move_on_after(61):
        await Service._report_store_drops(cast(Service, holder), sink)
    dropped = sink.counts["dropped"]
    assert dropped.sessions > 0 and dropped.items > dropped.sessions
    assert log.records == [
        StoreDropped(dropped.items, dropped.items, dropped.sessions, dropped.sessions)
    ]
    assert sink.take_drops() is None  # reported once


def test_chart_labels_are_cut_with_an_ellipsis_and_numbers_fit() -> None:
    k9 = "K-9 Mail / Thunderbird for Android 6.710"
    long = "A mail client with a very long name indeed, version 1.2.3.4.5"
    svg = _bars("Versions", [(k9, 12345), (long, 1), ("short", 0)], "session")
    assert f">{k9}</text>" in svg  # whole: not "... Android 6.7"
    assert f"<title>{long}</title>" in svg and f">{long[:42]}\u2026<" in svg  # after a whole word
    assert ">1 session<" in svg and ">12345 sessions<" in svg and ">0 sessions<" in svg
    width = int(re.search(r'width="(\d+)"', svg).group(1))  # type: ignore[union-attr]
    for x, text in re.findall(r'<text x="(\d+)" y="\d+">([^<]*)</text>', svg):
        assert int(x) + CHAR_WIDTH * len(text) <= width, text  # nothing past the right edge


def test_table_says_one_session() -> None:
    one = Summary(None, None, 1, 1, 0, [Row("x" * 60, 1, 1, "2026-01-01", "2026-01-01")])
    table = as_table(one, "family")
    assert "1 session, 1 distinct user, " in table
    assert "x" * 47 + "\u2026" in table and "x" * 48 not in table
