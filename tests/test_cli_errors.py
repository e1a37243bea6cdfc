"""Every subcommand given bad arguments, bad values or missing files: one line on stderr, no
traceback, and the documented exit status (1: the configuration, a policy or the work failed;
2: the command line is wrong)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from imapveil.cli import main
from imapveil.stats.store import Store

CASES: list[tuple[list[str], int, str]] = [
    (["frobnicate"], 2, "invalid choice"),
    (["serve", "--nope"], 2, "unrecognized arguments: --nope"),
    (["serve", "--upstream", "h:1", "--idle-timeout", "soon"], 2, "--idle-timeout"),
    (["serve", "--upstream", "h:1", "--login-deadline", "-1"], 2, "at least 0"),
    (["serve", "--upstream", "h:1", "--compress=maybe"], 2, "--compress"),
    (["serve", "--upstream", "h:1", "--listen", "nowhere"], 2, "--listen"),
    (["serve", "--upstream", "h:1", "--trusted-networks", "10.0.0.300/8"], 2, "10.0.0.300"),
    (["serve", "--upstream", "h:1", "--metrics", "9143"], 2, "--metrics"),
    (["serve"], 1, "no upstream"),
    (["serve", "--config", "{tmp}/missing.toml"], 1, "missing.toml: cannot read"),
    (["serve", "--config", "{tmp}/bad.toml"], 1, "bad.toml: not valid TOML"),
    (["serve", "--upstream", "h:1", "--events", "{tmp}/no/e.jsonl"], 1, "does not exist"),
    (["serve", "--upstream", "h:1", "--store", "{tmp}/no/s.sqlite"], 1, "does not exist"),
    (["serve", "--upstream", "h:1", "--user-key-file", "{tmp}/no/key"], 1, "does not exist"),
    (["serve", "--upstream", "h:1", "--listen-tls", ":9993", "--cert", "{tmp}/text",
      "--key", "{tmp}/text"], 1, "cert: {tmp}/text: no PEM certificate"),
    (["serve", "--upstream", "h:1", "--client-tls", "offer", "--cert", "{tmp}/none.pem",
      "--key", "{tmp}/none.pem"], 1, "cert: {tmp}/none.pem: No such file"),
    (["serve", "--upstream", "h:1", "--policy", "{tmp}/no-policy.toml"], 1, "policy"),
    (["check-config"], 2, "FILE"),
    (["check-config", "{tmp}/missing.toml"], 1, "test failed"),
    (["check-config", "{tmp}/bad.toml"], 1, "not valid TOML"),
    (["check-config", "{tmp}/good.toml", "--max-sessions", "0"], 2, "at least 1"),
    (["check-config", "{tmp}/good.toml", "--events", "{tmp}/no/e.jsonl"], 1, "does not exist"),
    (["check-config", "--online", "{tmp}/good.toml", "--upstream", "127.0.0.1:143",
      "--store", "{tmp}/text"], 1,
     "not a usable SQLite database"),
    (["stats", "--since", "2026-13-01"], 2, "month must be in 1..12"),
    (["stats", "--since", "yesterday"], 2, "'yesterday' is not a date"),
    (["stats", "--until", "2026-02-30"], 2, "--until"),
    (["stats", "--since", "2026-02-01", "--until", "2026-01-01", "--store", "{tmp}/s.sqlite"], 2,
     "not before"),
    (["stats", "--min-users", "-1"], 2, "at least 0"),
    (["stats", "--min-users", "many"], 2, "--min-users"),
    (["stats", "--by", "colour"], 2, "--by"),
    (["stats", "--format", "xml"], 2, "--format"),
    (["stats", "--store", "mysql://db/stats"], 2, "not a store imapveil knows"),
    (["stats", "--store", "{tmp}/text"], 1, "file is not a database"),
    (["stats", "--store", "{tmp}/missing.sqlite"], 1, "no statistics store at"),
    (["stats", "--store", "off"], 1, "off"),
    (["stats", "--config", "{tmp}/bad.toml"], 1, "not valid TOML"),
    (["stats", "--config", "{tmp}/missing.toml"], 1, "cannot read"),
    (["stats", "--store", "postgresql://nobody@127.0.0.1:1/stats"], 1, "statistics store"),
    (["report"], 2, "--html"),
    (["report", "--html", "{tmp}/no/r.html", "--store", "{tmp}/s.sqlite"], 1,
     "cannot write the report to {tmp}/no/r.html"),
    (["report", "--html", "-", "--store", "{tmp}/text"], 1, "file is not a database"),
    (["report", "--html", "-", "--since", "soon"], 2, "--since"),
    (["policy"], 2, "ACTION"),
    (["policy", "frobnicate"], 2, "invalid choice"),
    (["policy", "check"], 2, "FILE"),
    (["policy", "check", "{tmp}/no-policy.toml"], 1, "no-policy.toml"),
    (["policy", "check", "{tmp}/bad.toml"], 1, "bad.toml"),
    (["policy", "test", "default"], 2, "ID (...)"),
    (["policy", "test", "{tmp}/no-policy.toml", "ID NIL"], 1, "no-policy.toml"),
    (["policy", "test", "default", "ID NIL", "--frob"], 2, "--frob"),
]  # fmt: skip


@pytest.fixture
def place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    (tmp_path / "bad.toml").write_text("upstream = = 'h:1'\n")
    (tmp_path / "good.toml").write_text(f'upstream = "h:1"\nuser_key_file = "{tmp_path}/key"\n')
    (tmp_path / "text").write_text("this is neither a certificate nor a database\n" * 100)
    store = Store(str(tmp_path / "s.sqlite"))
    store.connect()
    store.close()
    return tmp_path


def _fill(args: list[str], tmp_path: Path) -> list[str]:
    return [a.replace("{tmp}", str(tmp_path)) for a in args]


@pytest.mark.parametrize(("args", "status", "says"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_arguments_give_one_line_and_the_documented_status(
    place: Path, capsys: pytest.CaptureFixture[str], args: list[str], status: int, says: str
) -> None:
    try:
        code = main(_fill(args, place))
    except SystemExit as exc:  # argparse's way out
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert code == status, err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.endswith("\n"), err  # one line
    assert says.replace("{tmp}", str(place)) in err


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--upstream", "h:1", "--idle-timeout", "soon"],
        ["check-config", "{tmp}/bad.toml"],
        ["stats", "--store", "{tmp}/text"],
        ["report", "--html", "{tmp}/no/r.html", "--store", "{tmp}/s.sqlite"],
        ["policy", "test", "{tmp}/no-policy.toml", "ID NIL"],
    ],
    ids=lambda args: args[0],
)
def test_as_a_process(place: Path, args: list[str]) -> None:
    """The same from a real process: nothing but the one line reaches stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "imapveil", *_fill(args, place)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode in (1, 2)
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_report_to_stdout_and_min_users_zero(
    place: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(place)
    assert main(["report", "--html", "-", "--store", str(place / "s.sqlite")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("<!DOCTYPE html>") and not (place / "-").exists()
    assert main(["stats", "--store", str(place / "s.sqlite"), "--min-users", "0"]) == 0
    assert "0 sessions, 0 distinct users" in capsys.readouterr().out


def test_stats_reads_the_store_of_the_configuration(
    place: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`imapveil stats --config FILE` uses that file's `store`, or the one beside its
    `user_key_file`, as the service does; not the invoking user's home."""
    state = place / "state"
    state.mkdir()
    store = Store(str(state / "stats.sqlite"))
    store.connect()
    store.execute(
        "INSERT INTO sessions (session, proxy, started_at, ended_at, day, user_id, reason,"
        " bytes_from_client, bytes_from_server, commands, client_tls, family)"
        " VALUES ('s', 'p', '2026-11-01T10:00:00.000+00:00', '2026-11-01T10:01:00.000+00:00',"
        " '2026-11-01', 'hmac:u', 'logout', 1, 2, 3, 0, 'NeoMutt')"
    )
    store._conn.commit()
    store.close()
    for line in (f'store = "{state}/stats.sqlite"', f'user_key_file = "{state}/user-key"'):
        conf = place / "imapveil.toml"
        conf.write_text(f'upstream = "h:1"\n{line}\nmin_group_users = 0\n')
        assert main(["stats", "--config", str(conf)]) == 0
        assert "NeoMutt" in capsys.readouterr().out
    since = ["--since", "2026-11-01T10:00:01Z", "--format", "json"]
    assert main(["stats", "--config", str(conf), *since]) == 0
    assert '"sessions": 0' in capsys.readouterr().out


def test_the_statistics_tools_do_not_load_the_relay(tmp_path: Path) -> None:
    """`stats` and `report` are run by hand and from cron, often many at once (and 25 times by
    the traits attack): they read the store only. The relay (trio, the core, the metrics) took
    two thirds of their start-up (0.8 s of 1.1 s); it is imported by `serve` and `check-config`."""
    store = tmp_path / "s.sqlite"
    Store(str(store)).connect()
    probe = (
        "import sys\n"
        "from imapveil.cli import main\n"
        f"status = main(['stats', '--store', {str(store)!r}, '--min-users', '0'])\n"
        "loaded = sorted(m for m in sys.modules if m == 'trio' or m.startswith('imapveil.relay'))\n"
        "print(status, loaded)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "0 []"
