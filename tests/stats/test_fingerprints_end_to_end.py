"""Issue 16 end to end: real clients over TLS through a real `imapveil serve` process (an
implicit-TLS listener and STARTTLS on the plain one) to a real Dovecot, into a SQLite store; then
`imapveil stats --by fingerprint` lists the JA4 and behaviour fingerprints with the families named
in an ID beside them, a labels file (`fingerprint_labels`) turns one client's users that sent no
ID into inferred users of a family in `stats --by family` and in the report, and the default
`min_group_users` (5) folds this two-user fleet away.

Two TLS stacks: Python's ssl (imaplib, sending Thunderbird's ID from the corpus) and curl (no ID),
each for both accounts, with implicit TLS and with STARTTLS. curl (Debian: curl) is installed by
scripts/check: the test fails, never skips, without it. And timing: one script pipelined in one
write for one account, a command at a time with pauses for the other, is one behaviour signature.
"""

from __future__ import annotations

import imaplib
import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imapveil.stats.identify import NO_ID
from imapveil.stats.report import INFERRED
from imapveil.stats.tables import Column, shown
from tests.conftest import TlsMaterial
from tests.helpers.corpus import rows
from tests.helpers.dovecot import Dovecot, free_port
from tests.helpers.process import imapveil
from tests.stats.test_end_to_end import imapveil_cli
from tests.stats.test_report_exports import page_tables

pytestmark = pytest.mark.dovecot
THUNDERBIRD = next(r for r in rows() if r.label == "thunderbird-52" and r.direction == "C")
MODES = ("implicit", "starttls")


@dataclass(frozen=True)
class Listening:
    plain: int
    implicit: int
    tls: TlsMaterial


def python_session(at: Listening, mode: str, user: str, password: str) -> None:
    """imaplib over Python's ssl, sending Thunderbird's ID before it logs in."""
    context = at.tls.client_context()
    if mode == "implicit":
        conn: imaplib.IMAP4 = imaplib.IMAP4_SSL("localhost", at.implicit, ssl_context=context,
                                                timeout=10)  # fmt: skip
    else:
        conn = imaplib.IMAP4("localhost", at.plain, timeout=10)
        conn.starttls(ssl_context=context)
    typ, _ = conn.xatom("ID", THUNDERBIRD.args.rstrip(b"\r\n").decode())
    assert typ == "OK"
    conn.login(user, password)
    conn.select("INBOX", readonly=True)
    conn.logout()


def curl_session(at: Listening, mode: str, user: str, password: str) -> None:
    """curl's IMAP (OpenSSL, other cipher suites and extensions than Python's): no ID."""
    curl = shutil.which("curl")
    assert curl, "curl is installed by scripts/check"
    url = f"imaps://localhost:{at.implicit}/" if mode == "implicit" else (
        f"imap://localhost:{at.plain}/")  # fmt: skip
    args = [curl, "-sS", "--max-time", "10", "--cacert", str(at.tls.ca_file)]
    args += ["--user", f"{user}:{password}", url]
    if mode == "starttls":
        args.insert(1, "--ssl-reqd")
    done = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr


@dataclass(frozen=True)
class Fleet:
    store: str
    events: str
    users: int
    tmp: Path


@pytest.fixture(scope="module")
def fleet(
    dovecot: Dovecot, tls_material: TlsMaterial, tmp_path_factory: pytest.TempPathFactory
) -> Fleet:
    """Eight sessions: each stack, each account, implicit TLS and STARTTLS."""
    tmp = tmp_path_factory.mktemp("fingerprints")
    store = str(tmp / "stats.sqlite")
    implicit = free_port()
    args = ["--store", store, "--cert", str(tls_material.cert), "--key", str(tls_material.key),
            "--listen-tls", f"127.0.0.1:{implicit}", "--client-tls", "offer"]  # fmt: skip
    with imapveil(tmp, dovecot.address, *args) as proxy:
        at = Listening(proxy.port, implicit, tls_material)
        for session in (python_session, curl_session):
            for mode in MODES:
                for user, password in dovecot.users.items():
                    session(at, mode, user, password)
        assert proxy.stop() == 0
        events = proxy.events.read_text(encoding="utf-8")
    return Fleet(store, events, len(dovecot.users), tmp)


def stats(*args: str) -> dict[str, Any]:
    done = imapveil_cli("stats", *args, "--format", "json")
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def fingerprints(fleet: Fleet, *more: str) -> dict[str, list[dict[str, Any]]]:
    data = stats("--store", fleet.store, "--by", "fingerprint", "--min-users", "1", *more)
    assert "hmac:" not in json.dumps(data)  # counts of users, never a user
    by_kind: dict[str, list[dict[str, Any]]] = {"ja4": [], "behaviour": []}
    for row in data["rows"]:
        by_kind[row["kind"]].append(row)
    return by_kind


def named(row: dict[str, Any]) -> list[tuple[str, int]]:
    return [(f["family"], f["users"]) for f in row["families"]]


def test_ja4_of_two_stacks_in_the_store_with_the_families_beside(fleet: Fleet) -> None:
    users = fleet.users
    found = fingerprints(fleet)
    # Two stacks, two JA4 values; each the same for both accounts and both ways TLS starts.
    ja4 = found["ja4"]
    assert [(r["users"], r["sessions"]) for r in ja4] == [(users, 2 * users)] * 2
    assert len({r["fingerprint"] for r in ja4}) == 2
    assert all(r["fingerprint"].startswith("t1") and r["fingerprint"][3] == "d" for r in ja4)
    (python,) = [r for r in ja4 if r["families"]]
    (curl,) = [r for r in ja4 if not r["families"]]
    # Beside Python's: the family its ID named; curl's users sent none.
    assert named(python) == [("Thunderbird", users)] and python["no_id_users"] is None
    assert curl["no_id_users"] == users and curl["label"] is None
    # The behaviour signatures: one per program and way TLS starts (STARTTLS is a step).
    behaviour = found["behaviour"]
    assert [(r["users"], r["sessions"]) for r in behaviour] == [(users, users)] * 4
    assert sorted(("STARTTLS" in r["text"], bool(r["families"])) for r in behaviour) == [
        (False, False), (False, True), (True, False), (True, True)]  # fmt: skip
    for row in behaviour:
        assert named(row) == ([("Thunderbird", users)] if " ID;" in row["text"] else [])
    # Fingerprints go to the store only, never to the event log.
    for row in ja4 + behaviour:
        assert row["fingerprint"] not in fleet.events


def labelled(fleet: Fleet) -> tuple[Path, str]:
    """A configuration whose labels file says curl's JA4 is the family "curl" on Linux."""
    (curl,) = [r for r in fingerprints(fleet)["ja4"] if not r["families"]]
    labels = fleet.tmp / "labels.toml"
    labels.write_text(
        f'[[label]]\nfingerprint = "{curl["fingerprint"]}"\nfamily = "curl"\nplatform = "Linux"\n',
        encoding="utf-8",
    )
    conf = fleet.tmp / "imapveil.toml"
    conf.write_text(f'store = "{fleet.store}"\nfingerprint_labels = "{labels}"\n', encoding="utf-8")
    return conf, curl["fingerprint"]


def test_a_labelled_fingerprint_counts_no_id_users_as_inferred(fleet: Fleet) -> None:
    users = fleet.users
    conf, curl = labelled(fleet)
    found = stats("--config", str(conf), "--by", "fingerprint", "--min-users", "1")
    (row,) = [r for r in found["rows"] if r["fingerprint"] == curl]
    assert row["label"] == {"family": "curl", "platform": "Linux"}
    family = stats("--config", str(conf), "--min-users", "1")
    # The families named in an ID are as they were; curl's users are apart, inferred.
    assert {r["group"]: r["users"] for r in family["rows"]} == {
        "Thunderbird": users, NO_ID: users}  # fmt: skip
    inferred = [(r["family"], r["users"], r["sessions"], r["platforms"])
                for r in family["inferred"]["rows"]]  # fmt: skip
    assert inferred == [("curl", users, 2 * users, f"Linux ({users})")]
    # The report's inventory, on the page and exported: curl's rows marked inferred.
    out, page = fleet.tmp / "tables", fleet.tmp / "report.html"
    made = imapveil_cli("report", "--config", str(conf), "--min-users", "1",
                        "--export", str(out), "--html", str(page))  # fmt: skip
    assert made.returncode == 0, made.stderr
    inventory = json.loads((out / "inventory.json").read_text(encoding="utf-8"))
    columns = [Column(c["key"], c["title"], c["kind"]) for c in inventory["columns"]]
    listed = [dict(zip([c.key for c in columns], r, strict=True)) for r in inventory["rows"]]
    assert [(r["client"], r["source"], r["users"], r["sessions"]) for r in listed] == [
        ("Thunderbird", "ID", users, 2 * users), (NO_ID, "ID", users, 2 * users),
        ("curl", INFERRED, users, 2 * users)]  # fmt: skip
    assert any(INFERRED in note and NO_ID in note for note in inventory["notes"])
    text = page.read_text(encoding="utf-8")
    assert page_tables(text)["inventory"][1:] == [
        [shown(c, v) for c, v in zip(columns, row, strict=True)] for row in inventory["rows"]
    ]
    assert ">curl (inferred)</text>" in text  # its bar in the chart says so too
    # Beside the inventory: the fingerprints without a label, with the clients named beside.
    unlabelled = json.loads((out / "fingerprints.json").read_text(encoding="utf-8"))
    rows = [(r[0], r[2], r[4], r[5]) for r in unlabelled["rows"]]
    assert rows[0] == ("ja4", users, None, f"Thunderbird ({users})")  # curl's: labelled
    assert sorted(rows[1:], key=str) == [("behaviour", users, users, "")] * 2 + [
        ("behaviour", users, None, f"Thunderbird ({users})")] * 2  # fmt: skip
    assert curl not in json.dumps(unlabelled["rows"]) and unlabelled["labelled"] == 1


def test_the_default_floor_folds_the_two_user_fleet_away(fleet: Fleet) -> None:
    conf, curl = labelled(fleet)
    found = stats("--config", str(conf), "--by", "fingerprint")  # min_group_users: 5
    assert found["rows"] == []
    assert found["folded"] == {"ja4": {"groups": 2, "users": fleet.users},
                               "behaviour": {"groups": 4, "users": fleet.users}}  # fmt: skip
    family = stats("--config", str(conf))
    assert [r["group"] for r in family["rows"]] == ["other"]
    assert family["inferred"]["rows"] == []
    assert (family["inferred"]["folded_groups"], family["inferred"]["folded_users"]) == (1, 2)
    out = fleet.tmp / "floored"
    made = imapveil_cli("report", "--config", str(conf), "--export", str(out))
    assert made.returncode == 0, made.stderr
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(out.iterdir()))
    assert "curl" not in text and "Thunderbird" not in text and curl not in text
    inventory = json.loads((out / "inventory.json").read_text(encoding="utf-8"))
    assert [r[:3] for r in inventory["rows"]] == [["other", "ID", fleet.users]]


SCRIPT = [b"CAPABILITY", b'ID ("name" "Thunderbird" "version" "128.5.0")', b"LOGIN USER PASS",
          b'LIST "" "*"', b"SELECT INBOX", b"NOOP"]  # fmt: skip


def scripted(port: int, user: str, password: str, *, pause: float) -> None:
    """SCRIPT then LOGOUT: all at once (pause 0: pipelined, one write), or a command at a time,
    each answer awaited, then `pause` seconds."""
    lines = [b"t%d %s\r\n" % (n, line.replace(b"USER PASS", f"{user} {password}".encode()))
             for n, line in enumerate([*SCRIPT, b"LOGOUT"])]  # fmt: skip
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s, s.makefile("rb") as f:
        f.readline()
        if not pause:
            s.sendall(b"".join(lines))
        for line in lines:
            if pause:
                s.sendall(line)
            tag = line.split(b" ", 1)[0] + b" "
            while not (answer := f.readline()).startswith(tag):
                assert answer, line
            assert answer.startswith(tag + b"OK"), answer
            if pause:
                time.sleep(pause)


def test_timing_and_the_account_change_no_fingerprint(dovecot: Dovecot, tmp_path: Path) -> None:
    """One client's script, pipelined in one write for one account and a command at a time with
    pauses for the other: one behaviour signature, two users."""
    store = str(tmp_path / "stats.sqlite")
    (alice, alice_pw), (bob, bob_pw) = list(dovecot.users.items())[:2]
    with imapveil(tmp_path, dovecot.address, "--store", store) as proxy:
        scripted(proxy.port, alice, alice_pw, pause=0)
        scripted(proxy.port, bob, bob_pw, pause=0.3)
        assert proxy.stop() == 0
    data = stats("--store", store, "--by", "fingerprint", "--min-users", "1")
    (row,) = data["rows"]  # no TLS: no JA4
    assert (row["kind"], row["users"], row["sessions"]) == ("behaviour", 2, 2)
    assert row["text"] == 'b1 tag=A9 lit+=n: CAPABILITY; ID; LOGIN; LIST "*"; SELECT'
    assert [(f["family"], f["users"]) for f in row["families"]] == [("Thunderbird", 2)]
