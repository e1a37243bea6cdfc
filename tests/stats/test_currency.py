"""Version currency: the shipped table, the corpus classified, a synthetic fleet counted by the
real `imapveil stats --by currency`, the k-floor, and real sessions through the proxy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from imapveil.policy import apply
from imapveil.policy_files import resolve_policy
from imapveil.protocol.id_params import parse
from imapveil.stats.currency import CLASSES, CurrencyError, classify, currency_rows, load
from imapveil.stats.identify import TABLE, identify, load_table
from imapveil.stats.report import currency_table, html_report
from imapveil.stats.store import SESSION_COLUMNS, Batch, Store
from imapveil.stats.tables import as_html
from tests.helpers.corpus import rows
from tests.helpers.dovecot import Dovecot
from tests.helpers.process import imapveil
from tests.stats.test_end_to_end import imapveil_cli, session_with_id

RULES = load()

# By the values shipped in clients.toml (checked 2026-11-30).
CORPUS = {
    "apple-mail-macos13": "unsupported",  # macOS 13
    "apple-mail-macos12": "unsupported",
    "apple-mail-macos10": "unsupported",
    "ios-mail-17-field-order": "unsupported",  # iOS 17.1.2
    "ios-maild-18": "outdated",  # iOS 18.2.1
    "thunderbird-52": "unsupported",
    "k9-android": "unsupported",  # K-9 6.800
    "aosp-email-identifiers": "unknown",  # no currency row for the family
    "mailkit": "unknown",
    "imapsync": "unknown",
    "neomutt": "unknown",
    "wino-no-name-field": "unknown",
    "mailcore2-nil": "unknown",  # no ID
}


@pytest.mark.parametrize("label", sorted(CORPUS))
def test_corpus_classified(label: str) -> None:
    row = next(r for r in rows() if r.label == label)
    recorded = apply(resolve_policy("default"), parse(row.args), hasher=lambda v: "h").recorded
    client = identify(recorded or None)
    os_version = (recorded or {}).get("os-version")
    kind = classify(RULES, client.family, client.platform, client.version, os_version)
    assert kind == CORPUS[label]


def test_shipped_table() -> None:
    families = {r.family for r in RULES}
    assert {"Thunderbird", "Apple Mail", "K-9 Mail / Thunderbird for Android"} <= families
    assert families <= {r.family for r in load_table()}
    assert {r.checked for r in RULES} == {"2026-11-30"}
    assert classify(RULES, "Thunderbird", None, "153.2.0", None) == "current"
    assert classify(RULES, "Thunderbird", "Windows", "140.5.1esr", None) == "outdated"
    assert classify(RULES, "Thunderbird", None, "115.18.0", None) == "unsupported"
    assert classify(RULES, "Thunderbird", None, "nightly", None) == "unknown"
    assert classify(RULES, "Thunderbird", None, None, None) == "unknown"
    assert classify(RULES, "Apple Mail", "macOS", "16.0 (3826.300)", "26.1 (25B78)") == "current"
    assert classify(RULES, "Apple Mail", "macOS", "16.0 (3826.300)", None) == "unknown"
    assert classify(RULES, "Apple Mail", "visionOS", "1", "2.0") == "unknown"
    assert classify(RULES, "Outlook", "Windows", "16.0", None) == "unknown"


GOOD = """
[[client]]
name = "Thunderbird"
family = "Thunderbird"
"""


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('family = "Thunderbird"\ncurrent = ">=1"\nsupported = ">=1"', "`checked` is missing"),
        ('family = "Thunderbid"\ncurrent = "1"\nsupported = "1"\nchecked = 2026-11-30',
         "no [[client]] row has the family 'Thunderbid'"),
        ('family = "Thunderbird"\ncurrent = ">=x"\nsupported = "1"\nchecked = 2026-11-30',
         "`current`: '>=x': 'x' is no version number"),
        ('family = "Thunderbird"\ncurrent = []\nsupported = "1"\nchecked = 2026-11-30',
         "`current`: a version, a comparison or a list of them"),
        ('family = "Thunderbird"\ncurrent = "1"\nsupported = 1\nchecked = 2026-11-30',
         "`supported`: a version"),
        ('family = "Thunderbird"\ncurrent = "1"\nsupported = "1"\nchecked = "last week"',
         "`checked` is a date (YYYY-MM-DD), not 'last week'"),
        ('family = "Thunderbird"\nfield = "os"\ncurrent = "1"\nsupported = "1"\n'
         'checked = 2026-11-30',
         "`field` is one of version, os_version, not 'os'"),
        ('family = "Thunderbird"\ncurent = "1"\nsupported = "1"\nchecked = 2026-11-30',
         "unknown key(s) curent"),
    ],
)  # fmt: skip
def test_table_checked_at_load(tmp_path: Path, row: str, message: str) -> None:
    path = tmp_path / "clients.toml"
    path.write_text(f"{GOOD}\n[[currency]]\n{row}\n", encoding="utf-8")
    with pytest.raises(CurrencyError) as caught:
        load(path)
    assert message in str(caught.value) and "row 1" in str(caught.value)


def test_table_refuses_two_rows_for_one_family(tmp_path: Path) -> None:
    one = 'family = "Thunderbird"\ncurrent = "128"\nsupported = ">=115"\nchecked = 2026-11-30\n'
    path = tmp_path / "clients.toml"
    path.write_text(f"{GOOD}\n[[currency]]\n{one}\n[[currency]]\n{one}", encoding="utf-8")
    with pytest.raises(CurrencyError, match="row 2: a second row for Thunderbird"):
        load(path)
    path.write_text(f"{GOOD}\n[[currency]]\n{one}", encoding="utf-8")
    (rule,) = load(path)
    assert [rule.classify(v) for v in ("128.1", "127", "115.0", "102")] == [
        "current", "outdated", "outdated", "unsupported",
    ]  # fmt: skip
    assert TABLE.name == "clients.toml"


def fleet() -> list[tuple[str, str, str, str | None, str | None, str | None]]:
    """60 users: (user, started_at, family, version, platform, os_version), oldest first."""
    sessions = []

    def add(user: str, family: str, version: str | None, *, platform: str | None = None,
            os_version: str | None = None, day: int = 20) -> None:  # fmt: skip
        at = f"2026-11-{day:02d}T10:00:00Z"
        sessions.append((user, at, family, version, platform, os_version))

    for i in range(20):  # Thunderbird: 8 current, 6 outdated, 6 unsupported by the latest session
        if i < 3:
            add(f"tb{i}", "Thunderbird", "115.3", day=5)  # older: only the latest counts
        if i in (14, 15):
            add(f"tb{i}", "Thunderbird", "153.1", day=5)
        version = "153.2.0" if i < 8 else "140.5.1esr" if i < 14 else "115.18.0"
        add(f"tb{i}", "Thunderbird", version)
    for i in range(12):  # Apple Mail on macOS: 5 on 26, 7 on 15
        add(f"mac{i}", "Apple Mail", "16.0 (3826.3)", platform="macOS",
            os_version="26.1" if i < 5 else "15.7.2")  # fmt: skip
    for i in range(10):  # and on iOS: 6 on 26, 4 on 18
        add(f"ios{i}", "Apple Mail", "3826.300", platform="iOS",
            os_version="26.1 (23B85)" if i < 6 else "18.7")  # fmt: skip
    for i in range(8):  # K-9: 5 current, 3 unsupported (a group of 3: folded)
        add(f"k9-{i}", "K-9 Mail / Thunderbird for Android", "12.1" if i < 5 else "6.800")
    for i in range(6):  # NeoMutt: no currency row
        add(f"mutt{i}", "NeoMutt", "20230322")
    for i in range(4):  # no ID (4 users: folded)
        add(f"none{i}", "no ID", None)
    return sessions


def write_fleet(url: Path | str) -> None:
    store = Store(str(url))
    store.connect()
    try:
        batch = []
        for n, (user, at, family, version, platform, os_version) in enumerate(fleet()):
            row: dict[str, Any] = {
                "session": f"s{n}", "proxy": "test", "started_at": at, "ended_at": at,
                "day": at[:10], "user_id": f"hmac:{user}", "reason": "logout",
                "duration_ms": 5.0, "bytes_from_client": 10, "bytes_from_server": 20,
                "commands": 3, "client_tls": 0, "family": family, "version": version,
                "platform": platform, "os_version": os_version,
            }  # fmt: skip
            batch.append(tuple(row[c] for c in SESSION_COLUMNS))
        assert store.write(Batch(sessions=batch)) == []
    finally:
        store.close()


def counts(data: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {r["group"]: (r["users"], *(r[c] for c in CLASSES)) for r in data["rows"]}


def stats(store: Path | str, *args: str) -> dict[str, Any]:
    done = imapveil_cli("stats", "--store", str(store), "--by", "currency", *args)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout) if "json" in args else {"text": done.stdout}
    return result


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_fleet_counted_by_the_cli(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    store: Path | str = tmp_path / "stats.sqlite"
    if backend == "postgresql":
        store = request.getfixturevalue("postgres").url
    write_fleet(store)
    data = stats(store, "--format", "json")
    assert data["by"] == "currency" and data["users"] == 60
    #                         users current outdated unsupported unknown
    assert counts(data) == {
        "Apple Mail": (22, 11, 11, 0, 0),
        "Thunderbird": (20, 8, 6, 6, 0),
        "NeoMutt": (6, 0, 0, 0, 6),
        "K-9 Mail / Thunderbird for Android": (5, 5, 0, 0, 0),
        "other": (7, 0, 0, 3, 4),  # K-9's 3 unsupported, 4 without ID
    }
    assert [r["group"] for r in data["rows"]][-1] == "other"
    checked = {r["group"]: r["checked"] for r in data["rows"]}
    assert checked["Thunderbird"] == "2026-11-30" and checked["NeoMutt"] is None
    everyone = counts(stats(store, "--format", "json", "--min-users", "1"))
    assert everyone["K-9 Mail / Thunderbird for Android"] == (8, 5, 0, 3, 0)
    assert everyone["no ID"] == (4, 0, 0, 0, 4) and "other" not in everyone
    # Before the 20th only the older sessions count: tb0-2 on 115.3, tb14-15 on 153.1.
    early = counts(stats(store, "--format", "json", "--until", "2026-11-10", "--min-users", "1"))
    assert early == {"Thunderbird": (5, 2, 0, 3, 0)}
    csv_lines = stats(store, "--format", "csv")["text"].splitlines()
    assert csv_lines[0] == "family,users,current,outdated,unsupported,unknown,checked"
    assert csv_lines[2] == "Thunderbird,20,8,6,6,0,2026-11-30"
    table = stats(store)["text"]
    assert "Apple Mail" in table and "60 distinct users" in table


@pytest.mark.parametrize("k", [2, 5, 7, 12, 30])
def test_no_group_of_fewer_than_k_users(tmp_path: Path, k: int) -> None:
    store = tmp_path / "stats.sqlite"
    write_fleet(store)
    data = stats(store, "--format", "json", "--min-users", str(k))
    for row in data["rows"]:
        if row["group"] != "other":
            assert all(row[c] == 0 or row[c] >= k for c in CLASSES), row
            assert row["users"] >= k
    assert sum(r["users"] for r in data["rows"]) >= 60  # nobody lost; "other" once each
    s = Store(str(store))
    s.connect()
    try:
        assert currency_rows(s, min_users=k).rows == [
            type(currency_rows(s).rows[0])(**r) for r in data["rows"]
        ]
        # The report's table shows the very rows `stats --by currency` gives, no more.
        shown = as_html(currency_table(currency_rows(s, min_users=k), k))
        assert shown.count("<tr>") == len(data["rows"]) + 1  # and the header
        for row in data["rows"]:
            cells = "".join(f'<td class="n">{row[c]}</td>' for c in ("users", *CLASSES))
            assert f"<tr><td>{row['group']}</td>{cells}" in shown, row
    finally:
        s.close()


@pytest.mark.dovecot
def test_real_sessions_through_the_proxy(dovecot: Dovecot, tmp_path: Path) -> None:
    store = tmp_path / "stats.sqlite"
    (alice, alice_pw), (bob, bob_pw) = list(dovecot.users.items())[:2]
    with imapveil(tmp_path, dovecot.address, "--store", str(store)) as proxy:
        old = b'a ID ("name" "Thunderbird" "version" "140.5.0" "os" "Windows")\r\n'
        new = b'a ID ("name" "Thunderbird" "version" "153.2.1" "os" "Linux")\r\n'
        session_with_id(proxy.port, alice, alice_pw, new)  # alice moves from current ...
        session_with_id(proxy.port, alice, alice_pw, old)  # ... to an outdated one (latest)
        session_with_id(proxy.port, bob, bob_pw, new)
        assert proxy.stop() == 0
    data = stats(store, "--format", "json", "--min-users", "1")
    assert counts(data) == {"Thunderbird": (2, 1, 1, 0, 0)}
    folded = stats(store, "--format", "json")  # two users: under the default k of 5
    assert counts(folded) == {"other": (2, 1, 1, 0, 0)}


def test_no_control_character_reaches_the_output(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "stats.sqlite"))
    store.connect()
    try:
        row = {c: 0 for c in SESSION_COLUMNS} | {
            "session": "s", "proxy": "p", "started_at": "2026-11-20T10:00:00Z",
            "ended_at": "2026-11-20T10:00:00Z", "day": "2026-11-20", "user_id": "hmac:u",
            "reason": "logout", "family": "Mail\x1b[2J\u202e", "version": "1\x07",
            "platform": None, "os_version": None,
        }  # fmt: skip
        store.write(Batch(sessions=[tuple(row[c] for c in SESSION_COLUMNS)]))
    finally:
        store.close()
    for fmt in ("table", "csv", "json"):
        done = imapveil_cli(
            "stats", "--store", str(tmp_path / "stats.sqlite"), "--by", "currency",
            "--format", fmt, "--min-users", "1",
        )  # fmt: skip
        assert done.returncode == 0 and done.stdout.isascii(), done.stdout
        assert "\x1b" not in done.stdout and "\x07" not in done.stdout
        # JSON too has the text made safe, as every other output (a `jq -r` writes it out).
        assert ("Mail\\\\x1b[2J" if fmt == "json" else "Mail\\x1b[2J\\u202e") in done.stdout


def test_the_html_report_answers_who_is_outdated(tmp_path: Path) -> None:
    store = tmp_path / "stats.sqlite"
    write_fleet(store)
    opened = Store(str(store))
    opened.connect()
    try:
        page = html_report(opened)
    finally:
        opened.close()
    section = page[page.index('<section class="currency">') :]
    section = section[: section.index("</section>")]
    # family, users, current, outdated, unsupported, unknown, values checked
    cells = [f'<td class="n">{n}</td>' for n in (20, 8, 6, 6, 0)]
    assert "<tr><td>Thunderbird</td>" + "".join(cells) in section
    assert "2026-11-30" in section
