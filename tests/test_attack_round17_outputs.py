"""Attack round 17 on outputs (attack17o): what a client sends, through a real `imapveil serve`
and a real Dovecot, into what an operator or a scraper reads: `imapveil stats` in every form,
the HTML report and its exports, the event log, the metrics. Each test failed before the fix
named in its docstring, or guards what held."""

from __future__ import annotations

import csv
import io
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import trio
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from imapveil.records import CommandCompleted, IdExchange, SessionEnded, SessionStarted
from imapveil.sinks import jsonl
from imapveil.stats.sink import StoreSink
from imapveil.stats.spool import ARITY, Tally
from tests.helpers.dovecot import Dovecot, free_port
from tests.helpers.postgres import Postgres
from tests.helpers.process import imapveil, read_log
from tests.stats.test_durability import query

HOSTILE = {
    "zero width": "Thunderbird\u200b",
    "word joiner": "Thunderbird\u2060",
    "byte order mark": "\ufeffThunderbird",
    "soft hyphen": "Thunder\u00adbird",
    "tag characters": "Thunderbird\U000e0041\U000e007f",
    "variation selector": "Thunderbird\ufe0f",
    "hangul filler": "Thunderbird\u3164",
    "combining grapheme joiner": "Thunderbird\u034f",
    "escape": "\x1b[2J\x1b[31mred",
    "osc 8 hyperlink": "\x1b]8;;https://evil.example/\x07click\x1b]8;;\x07",
    "osc 52 clipboard": "\x1b]52;c;cm0gLXJmIH4=\x07",
    "c1 csi": "\u009b31mcsi",
    "bidi override": "abc\u202edef",
    "bidi isolate": "x\u2066y\u2069z",
    "line break": "one\r\ntwo",
    "line separator": "one\u2028two",
    "nul": "nul\x00here",
    "bell": "bell\x07",
    "markup": "<img src=x onerror=alert(1)>\"'&amp;",
    "formula": '=HYPERLINK("https://evil.example/","x")',
}

FORBIDDEN = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f"
    "\u200b-\u200f\u2028-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff]"
)
"""What no output for people may carry raw: controls but tab and line feed (a line feed within
a value is caught by the rows' count), the line and paragraph separators, bidirectional marks
and every default-ignorable (invisible) code point: a family written `Thunderbird` and a
zero-width space is a second row reading `Thunderbird`."""


def literal_octets(data: bytes) -> bytes:
    return b"{%d+}\r\n%s" % (len(data), data)


def literal(text: str) -> bytes:
    return literal_octets(text.encode("utf-8"))


def id_command(name: str) -> bytes:
    pairs = [
        ("name", name),
        ("version", name),
        ("os", name),
        ("os-version", name),
        ("vendor", name),
    ]
    body = b" ".join(b'"%s" %s' % (k.encode(), literal(v)) for k, v in pairs)
    return b"I ID (" + body + b")\r\n"


def exchange(port: int, sent: bytes) -> None:
    """After the greeting, `sent` at once, then everything until the proxy closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s, s.makefile("rb") as f:
        f.readline()
        s.sendall(sent)
        f.read()


def session(port: int, user: str, password: str, name: str) -> None:
    login = b"L LOGIN %s %s\r\n" % (user.encode(), password.encode())
    exchange(port, login + id_command(name) + b"Z LOGOUT\r\n")


def cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "imapveil", *args],
        capture_output=True, text=True, check=False, timeout=60, encoding="utf-8",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def strings(value: object) -> list[str]:
    """Every string in parsed JSON, keys included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*strings(k), *strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


def raw(text: str) -> list[str]:
    return sorted({f"U+{ord(c):04X}" for c in FORBIDDEN.findall(text)})


OPENMETRICS = b"application/openmetrics-text; version=1.0.0; charset=utf-8"


def scrape(port: int, accept: bytes) -> bytes:
    """The body of a GET /metrics asking for `accept`."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: " + accept + b"\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer.partition(b"\r\n\r\n")[2]


@pytest.fixture(scope="module")
def hostile_store(tmp_path_factory: pytest.TempPathFactory, dovecot: Dovecot) -> Path:
    """Sessions, each with an ID whose name, version, os, os-version and vendor are one hostile
    text, under `passthrough` (which records every value as sent), into a SQLite store."""
    tmp_path = tmp_path_factory.mktemp("hostile")
    store = tmp_path / "stats.sqlite"
    metrics = free_port()
    args = ("--store", str(store), "--policy", "passthrough", "--metrics", f"127.0.0.1:{metrics}")
    with imapveil(tmp_path, dovecot.address, *args) as proxy:
        users = list(dovecot.users.items())
        for i, text in enumerate(HOSTILE.values()):
            session(proxy.port, *users[i % len(users)], text)
        for name, accept in (("metrics.txt", b"text/plain"), ("openmetrics.txt", OPENMETRICS)):
            (tmp_path / name).write_bytes(scrape(metrics, accept))
        assert proxy.stop() == 0
        events = proxy.events
        stderr = proxy.stderr
    (tmp_path / "stderr.txt").write_bytes(stderr)
    (tmp_path / "events.jsonl").write_bytes(events.read_bytes())
    return store


@pytest.mark.dovecot
@pytest.mark.parametrize(
    "by", ["family", "version", "os", "day", "week", "currency", "extension", "fingerprint"]
)
@pytest.mark.parametrize("form", ["table", "csv", "json"])
def test_stats_shows_nothing_a_client_sent_raw(hostile_store: Path, by: str, form: str) -> None:
    """Found: `stats --by family|version|os` showed a family, version or system written with a
    zero-width space, a word joiner, a byte order mark, a soft hyphen, tag characters or a
    variation selector as it came: `Thunderbird` and an invisible character is a row of its own
    that reads `Thunderbird`, beside the real one (`charts.safe` escaped controls and bidi marks
    only); and `--format json` of those three gave the values unescaped where every other JSON
    output gives them made safe (`jq -r` wrote ESC and OSC sequences to the terminal)."""
    out = cli("stats", "--store", str(hostile_store), "--by", by, "--format", form,
              "--min-users", "0")  # fmt: skip
    assert raw(out) == []
    if form == "json":
        assert raw("\n".join(strings(json.loads(out)))) == []


@pytest.mark.dovecot
def test_the_report_and_its_exports_show_nothing_a_client_sent_raw(
    hostile_store: Path, tmp_path: Path
) -> None:
    """The HTML page (charts' labels and their hover text included) and every exported table."""
    page = cli("report", "--store", str(hostile_store), "--min-users", "0", "--html", "-")
    assert raw(page) == []
    assert "<img" not in page and "&amp;amp;" in page
    cli("report", "--store", str(hostile_store), "--min-users", "0", "--export", str(tmp_path))
    for path in sorted(tmp_path.iterdir()):
        text = path.read_text(encoding="utf-8")
        assert raw(text) == [], path.name
        if path.suffix == ".json":
            assert raw("\n".join(strings(json.loads(text)))) == [], path.name
        else:
            cells = [c for row in csv.reader(io.StringIO(text)) for c in row]
            assert not [c for c in cells if c.startswith(("=", "+", "-", "@"))], path.name


@pytest.mark.dovecot
def test_the_event_log_metrics_and_stderr_stay_whole(hostile_store: Path) -> None:
    """Held: every event log line is one JSON object in ASCII (the values escaped), the scrape
    (text and OpenMetrics) parses with prometheus_client's own parsers and names no client's
    text, and stderr says
    nothing a client sent."""
    folder = hostile_store.parent
    records, other = read_log(folder / "events.jsonl")
    assert other == []
    assert (folder / "events.jsonl").read_bytes().isascii()
    ids = [r for r in records if r["event"] == "id"]
    assert {r["client"]["name"] for r in ids} >= {v for v in HOSTILE.values() if "\0" not in v}
    scraped = (folder / "metrics.txt").read_text()
    families = list(text_string_to_metric_families(scraped))
    assert any(f.name == "imapveil_id_exchanges" for f in families)
    labels = {v for f in families for s in f.samples for v in s.labels.values()}
    assert not labels & set(HOSTILE.values())
    assert raw(scraped) == []
    opened = (folder / "openmetrics.txt").read_text()
    assert opened.endswith("# EOF\n")
    families = list(openmetrics_families(opened))  # type: ignore[no-untyped-call]
    assert any(f.name == "imapveil_id_exchanges" for f in families)
    assert not {v for f in families for s in f.samples for v in s.labels.values()} & set(
        HOSTILE.values()
    )
    stderr = (folder / "stderr.txt").read_bytes().decode("utf-8", "replace")
    assert raw(stderr) == []
    assert "Thunderbird" not in stderr


NONCHARACTERS = ("Mail\uffff", "Mail\ufffe", "Mail\U0010ffff", "Mail\ue000", "\ufffd")
"""Valid UTF-8 a store might still refuse: noncharacters, private use, the replacement
character."""


@pytest.mark.dovecot
def test_hostile_ids_and_login_names_cost_postgresql_no_other_row(
    dovecot: Dovecot, postgres: Postgres, tmp_path: Path
) -> None:
    """Held: through a real proxy into PostgreSQL, sessions whose ID values carry every hostile
    text above (NUL included) or a noncharacter, and whose failed LOGIN before the real one
    named a user with NUL, ESC and a bidi override in it (a line end in a literal
    ends the session: `refused_line_end`) (`user_identity = "plain"`), are each stored,
    and so is every plain session between them."""
    texts = [*HOSTILE.values(), *NONCHARACTERS]
    args = ("--store", postgres.url, "--policy", "passthrough", "--user-identity", "plain")
    with imapveil(tmp_path, dovecot.address, *args) as proxy:
        users = list(dovecot.users.items())
        for i, text in enumerate(texts):
            user, password = users[i % len(users)]
            exchange(
                proxy.port,
                b"A LOGIN " + literal(f"{user}\x00\x1b[2J\u202ex") + b" x\r\n"
                + b"L LOGIN %s %s\r\n" % (user.encode(), password.encode())
                + id_command(text) + b"Z LOGOUT\r\n",
            )  # fmt: skip
            session(proxy.port, *users[i % len(users)], "Thunderbird")
        assert proxy.stop() == 0
    assert b"refused" not in proxy.stderr, proxy.stderr.decode()
    assert query(postgres.url, "SELECT COUNT(*) FROM sessions") == [(2 * len(texts),)]
    names = {n for (n,) in query(postgres.url, "SELECT name FROM id_exchanges")}
    assert names >= {t.replace("\0", "\ufffd") for t in texts}
    stored = {u for (u,) in query(postgres.url, "SELECT DISTINCT user_id FROM sessions")}
    assert stored == {u for u, _ in users}


JOURNAL_LINE_MAX = 48 * 1024
"""journald's default `LineMax=`: a stdout line longer than this is cut into several journal
entries, none of them a JSON record."""


@pytest.mark.dovecot
def test_an_id_of_control_characters_is_one_journal_entry(dovecot: Dovecot, tmp_path: Path) -> None:
    """Found: the event log (stdout, into the journal, by default) wrote an `id` record of
    50,437 octets for an ID command of 35 KB under `passthrough`: 30 values of 1024 control
    octets, each recorded as 256 and written as `\\u0001` (six octets an octet), and 89 more
    fields with names of control octets, each dropped and named `\\x01...` in `dropped`.
    journald cuts a line past `LineMax=` (48 KiB) into two entries, neither one JSON. Now a
    record is written in at most `jsonl.MAX_LINE` octets: past it, its longest texts are cut
    (ending `…[N more characters]`) and long lists end with `…[N more]`."""
    pairs = []
    for i in range(119):
        name = b"f%02d" % i if i < 30 else b"x%02d" % i + b"\x01" * 27
        value = b"\x01" * (1024 if i < 30 else 1)
        pairs.append(literal_octets(name) + b" " + literal_octets(value))
    command = b"I ID (" + b" ".join(pairs) + b")\r\n"
    with imapveil(tmp_path, dovecot.address, "--policy", "passthrough") as proxy:
        exchange(proxy.port, b"L LOGIN alice wonderland\r\n" + command + b"Z LOGOUT\r\n")
        assert proxy.stop() == 0
    records, other = read_log(proxy.events)
    assert other == []
    longest = max(len(line) for line in proxy.events.read_bytes().split(b"\n"))
    assert longest < JOURNAL_LINE_MAX
    (found,) = [r for r in records if r["event"] == "id"]
    assert found["status"] == "OK" and len(found["client"]) == 30
    assert found["client"]["f00"].startswith("\x01") and found["client"]["f00"].endswith(
        "more characters]"
    )
    assert found["dropped"][-1].startswith("…[") and found["dropped"][-1].endswith(" more]")


def test_a_record_no_cut_fits_is_written_without_its_objects() -> None:
    """The last step: a record whose objects hold too many keys for any cut (none of ours can)
    is still one line within the bound, its kind and session kept."""
    record = {"event": "id", "session": "s", "client": {f"k{i:05}": "v" for i in range(9000)}}
    line = jsonl.encode(record, 0.0)
    assert len(line) <= jsonl.MAX_LINE
    assert json.loads(line) == {"ts": "1970-01-01T00:00:00.000Z", "event": "id", "session": "s",
                                "client": None}  # fmt: skip


def refuse(url: str, prefix: str) -> None:
    """Have the database refuse, for their content, the ID and session rows of a client whose
    name starts with `prefix` (the session's family is that name): a CHECK constraint."""
    with psycopg.connect(url, autocommit=True) as conn:
        for table, column in (("id_exchanges", "name"), ("sessions", "family")):
            conn.execute(
                f"ALTER TABLE {table} ADD CONSTRAINT refused CHECK ({column} NOT LIKE '{prefix}%')"
            )


@pytest.mark.parametrize("encoding", ["LATIN1", "SQL_ASCII"])
async def test_a_row_the_database_refuses_costs_only_its_own_session(
    postgres: Postgres, encoding: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Found: on a PostgreSQL database in LATIN1 (or another single-octet encoding), one ID
    value outside it (a Cyrillic letter) failed the batch in the driver itself (psycopg encodes
    to the server's encoding: UnicodeEncodeError, no database error), so the writer took the
    store for away: every session of the batch lost without a spool, and with one, spooled and
    the same batch tried again for ever, every later session behind it. On SQL_ASCII (what
    initdb gives in the C locale) the driver returned text columns as bytes. The store then
    talked UTF-8 whatever the database's encoding, and the server refused that one row
    (dropped, counted and logged), every other session stored. Since, such a value is stored
    escaped on LATIN1 and kept as sent on SQL_ASCII (tests/stats/test_store_encodings.py);
    what this guards is the rest: a row the database refuses for any other reason (here a
    CHECK constraint) costs only its own session (its row and its ID's)."""
    admin = postgres.url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            f"CREATE DATABASE enc ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' "
            "TEMPLATE template0"
        )
    url = postgres.url.rsplit("/", 1)[0] + "/enc"
    outside = "\u0422hunderbird \u65e5\u672c"
    sink = StoreSink(url, spool=None, spool_cap=0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        with trio.fail_after(15):
            await sink.ready.wait()
            refuse(url, "Refused")
            for i in range(20):
                sid = f"enc-{i}"
                name = "Refused" if i == 3 else outside if i == 5 else "Thunderbird"
                sink.emit(SessionStarted(sid, "127.0.0.1:1", "u"))
                client: dict[str, str | None] = {"name": name}
                sink.emit(IdExchange(sid, "a", "authenticated", "OK", False, client, (), (), None))
                sink.emit(
                    SessionEnded(sid, "127.0.0.1:1", "u", "logout", None, "logout", "bob",
                                 5.0, 10, 20, 3)
                )  # fmt: skip
            await sink.flush()
        nursery.cancel_scope.cancel()
    assert "store write failed" not in caplog.text
    assert "refused" in caplog.text
    names = query(url, "SELECT DISTINCT name FROM id_exchanges")
    stored = query(url, "SELECT session FROM sessions")
    assert sink.counts["dropped"] == Tally(sessions=1, items=2), sink.counts
    # Counted as dropped only, not as written too (imapveil_store_sessions_total).
    assert sink.counts["written"] == Tally(sessions=19, items=38), sink.counts
    assert sorted(s for (s,) in stored) == sorted(f"enc-{i}" for i in range(20) if i != 3)
    kept = outside if encoding == "SQL_ASCII" else "\\u0422hunderbird \\u65e5\\u672c"
    assert sorted(names) == sorted([("Thunderbird",), (kept,)])


COUNT = 60


async def test_rows_refused_by_the_hundred_are_one_warning(
    postgres: Postgres, caplog: pytest.LogCaptureFixture
) -> None:
    """Found: each row the store refused was a warning of its own, so on a LATIN1 database
    every client sending a name outside Latin-1 wrote two lines to stderr (its session's row
    and its ID's): clients could write the log. Now said once, then at most once a minute with
    how many more (as a client's failed TLS handshake); each one is counted as dropped. (Such a
    name is stored escaped since; the rows refused here are a CHECK constraint's.)"""
    admin = postgres.url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            "CREATE DATABASE enc ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        )
        # The test cluster's stderr is a pipe nobody reads: a log line per refused row would
        # fill it and stall the server.
        conn.execute("ALTER DATABASE enc SET log_min_messages TO fatal")
        conn.execute("ALTER DATABASE enc SET log_min_error_statement TO panic")
    url = postgres.url.rsplit("/", 1)[0] + "/enc"
    sink = StoreSink(url, spool=None, spool_cap=0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        with trio.fail_after(30):
            await sink.ready.wait()
            refuse(url, "Refused")
            for i in range(COUNT):
                sid = f"many-{i}"
                client: dict[str, str | None] = {"name": f"Refused {i}"}
                sink.emit(SessionStarted(sid, "127.0.0.1:1", "u"))
                sink.emit(IdExchange(sid, "a", "authenticated", "OK", False, client, (), (), None))
                sink.emit(
                    SessionEnded(sid, "127.0.0.1:1", "u", "logout", None, "logout", "bob",
                                 5.0, 10, 20, 3)
                )  # fmt: skip
            await sink.flush()
        nursery.cancel_scope.cancel()
    assert sink.counts["dropped"] == Tally(sessions=COUNT, items=2 * COUNT), sink.counts
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) <= 2, [r.getMessage() for r in refused[:3]]


@pytest.mark.parametrize(
    "value", ["\ud800", 10**30, float("nan")], ids=["surrogate", "huge", "nan"]
)
async def test_a_spooled_value_sqlite_cannot_bind_does_not_stop_the_statistics(
    tmp_path: Path, value: object
) -> None:
    """Found: a spool line that is well-formed JSON of the right shape but holds a lone
    surrogate (`"\\ud800"`, which JSON may spell) or an integer past 64 bits made SQLite's
    driver raise (UnicodeEncodeError, OverflowError), not a database error: the writer took
    the store for away and replayed the same line at every probe, every later session spooled
    behind it, for good. Now such a line is skipped and counted, as a malformed one is."""
    from tests.stats.test_durability import replay  # noqa: PLC0415

    spool = tmp_path / "spool"
    spool.mkdir()
    row: list[object] = [f"v{i}" for i in range(ARITY["session"])]
    good = json.dumps(["session", ["good", *row[1:]]])
    row[0], row[3] = "bad", value
    (spool / "000000000001.jsonl").write_text(json.dumps(["session", row]) + "\n" + good + "\n")
    sink = await replay(str(tmp_path / "stats.sqlite"), spool)
    assert sink.counts["dropped"].items == 1 and sink.counts["replayed"].items == 1, sink.counts
    assert sink.spool is not None and not sink.spool.pending
    assert query(str(tmp_path / "stats.sqlite"), "SELECT session FROM sessions") == [("good",)]


def test_the_records_written_field_by_field_keep_the_bound_too() -> None:
    """The bound was the general encoder's alone: the session's end and the command's record,
    written field by field, are not `id` records, and were written whole. With
    `user_identity = "plain"`, a LOGIN's user name is as long as a line may be (64 KiB): a
    60 KB line, two journal entries. Now `encode` holds every record to `MAX_LINE`, a long
    text of the record itself cut as the texts inside its objects are."""
    user = "u" * 40_000
    end = SessionEnded("s", "127.0.0.1:1", "127.0.0.1:143", "logout", None, "logout", user, 1.0,
                       10, 20, 3)  # fmt: skip
    command = CommandCompleted("s", "a1", "LOGIN", "not_authenticated", "OK", None, 1.0,
                               user=user)  # fmt: skip
    for record in (end, command):
        line = jsonl.encode(record, 0.0)
        assert len(line) <= jsonl.MAX_LINE, (record.event, len(line))
        written = json.loads(line)
        assert written["event"] == record.event and written["session"] == "s"
        assert written["user"].startswith("uuu") and written["user"].endswith("more characters]")
