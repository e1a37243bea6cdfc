from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Any

import pytest
import trustme

from imapveil import config_files, docs
from imapveil.cli import build_parser, default_text, legacy_booleans, main
from imapveil.config import (
    DECLARATIONS,
    HELP,
    NAMES,
    ConfigError,
    Endpoint,
    load,
    parse_endpoint,
)
from imapveil.config_files import check_certificate, check_files, statistics_stores
from imapveil.protocol.session import CoreConfig
from imapveil.relay.connection import RelaySettings
from imapveil.service import load_all
from imapveil.stats.store import Store

ROOT = Path(__file__).resolve().parents[1]


def test_endpoints() -> None:
    assert parse_endpoint("127.0.0.1:143") == Endpoint("127.0.0.1", 143)
    assert parse_endpoint("[::1]:993") == Endpoint("::1", 993)
    assert parse_endpoint(":1143") == Endpoint("", 1143)
    assert str(Endpoint("::1", 993)) == "[::1]:993"
    for bad in ("localhost", "::1:143", "host:http", "host:70000", "[::1]143"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)


def test_file_then_flags(tmp_path: Path) -> None:
    conf = tmp_path / "imapveil.toml"
    conf.write_text(
        'listen = "192.0.2.1:1143"\nupstream = "mail.example:143"\nevents = "/var/log/x.jsonl"\n'
        "idle_timeout = 600\nuser_identity = 'none'\n"
    )
    settings = load(conf, {"upstream": "10.0.0.2:143", "events": None})
    assert settings.listen == Endpoint("192.0.2.1", 1143)
    assert settings.upstream == Endpoint("10.0.0.2", 143)  # the flag wins
    assert settings.events == "/var/log/x.jsonl"  # an absent flag does not
    assert settings.idle_timeout == 600.0
    assert settings.user_identity == "none"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('upstream = "a:1"\nlisten_port = 5\n', "unknown setting 'listen_port'"),
        ('upstream = "a:1"\nidle_timeout = -1\n', "idle_timeout: idle_timeout must be positive"),
        ('upstream = "a:1"\nuser_identity = "md5"\n', "user_identity: expected one of"),
        ('upstream = "a:1"\nmax_line_length = 10\n', "max_line_length: expected a whole"),
        ('upstream = "a:1"\nlog_commands = "yes"\n', "log_commands: expected true or false"),
        ("upstream = \n", "not valid TOML"),
        ('listen = "a:1"\n', "no upstream"),
    ],
)
def test_bad_files_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(conf, {})
    assert message.replace("must be positive", "must be a positive number") in str(info.value)
    if "no upstream" not in message:
        assert str(conf) in str(info.value)


def test_every_setting_has_a_flag() -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["serve", "--upstream", "h:1", "--max-line-length", "2048", "--no-log-commands",
         "--compress", "--metrics", "127.0.0.1:9143"]
    )  # fmt: skip
    assert args.max_line_length == "2048"
    settings = load(None, {k: getattr(args, k) for k in vars(args) if k not in ("command",)} | {})
    assert settings.max_line_length == 2048
    assert settings.log_commands is False and settings.compress is True
    # What earlier versions took still works: `--flag true|false`.
    old = legacy_booleans(["serve", "--compress", "true", "--upstream-verify=false", "--x", "true"])
    assert old == ["serve", "--compress", "--no-upstream-verify", "--x", "true"]


def test_flags_have_meaningful_metavars() -> None:
    """No `--metrics METRICS` or `--max-sessions-per-client CLIENT`: a metavar says what to give."""
    commands = build_parser()._subparsers._group_actions[0]  # type: ignore[union-attr]
    serve = commands.choices["serve"]  # type: ignore[index]
    shown = {a.dest: a.metavar for a in serve._actions if a.option_strings}
    assert shown["metrics"] == "HOST:PORT" and shown["max_sessions_per_client"] == "N"
    assert shown["trusted_networks"] == "CIDR[,CIDR...]" and shown["idle_timeout"] == "SECONDS"
    assert shown["events"] == shown["cert"] == "FILE"
    for d in DECLARATIONS:
        assert d.help and default_text(d), d.name
        assert (d.metavar is None) == isinstance(d.value, bool), d.name  # booleans: --no-FLAG


def test_cli_reports_config_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["serve", "--config", str(tmp_path / "missing.toml"), "--upstream", "h:1"]) == 1
    assert "missing.toml: cannot read" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("imapveil ")


@pytest.mark.parametrize(
    "text",
    [
        'upstream = "h:1"\nidle_timout = 5\n',
        'upstream = "h:1"\nevents = "/no/such/dir/events.jsonl"\n',
        'upstream = "h:1"\nstore = "/no/such/dir/stats.sqlite"\n',
        'upstream = "h:1"\nuser_key_file = "/no/such/dir/user-key"\n',
        'upstream = "h:1"\nstore = "mysql://db/stats"\n',
        'upstream = "h:1"\ncert = "/no/cert.pem"\nkey = "/no/key.pem"\nclient_tls = "offer"\n',
    ],
)
def test_serve_and_check_config_fail_alike(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str
) -> None:
    """The same configuration error: the same exit status (1) and one line, from both."""
    conf = tmp_path / "c.toml"
    conf.write_text(text)
    key = ["--user-key-file", str(tmp_path / "key")] if "user_key_file" not in text else []
    assert main(["serve", "--config", str(conf), *key]) == 1
    served = capsys.readouterr().err
    assert main(["check-config", str(conf), *key]) == 1
    checked = capsys.readouterr().err
    assert served.count("\n") == checked.count("\n") == 1
    assert served.removeprefix("imapveil: ") in checked and "test failed" in checked
    if "/no/such/dir" in text:
        assert "directory /no/such/dir does not exist" in served
    assert not (tmp_path / "key").exists() or "user_key_file" not in text


def test_certificate_problems_name_the_file(tmp_path: Path) -> None:
    ca = trustme.CA()
    one, two = ca.issue_cert("one.example"), ca.issue_cert("two.example")
    cert, key, other_key = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "other.pem"
    one.cert_chain_pems[0].write_to_path(cert)
    one.private_key_pem.write_to_path(key)
    two.private_key_pem.write_to_path(other_key)
    check_certificate(str(cert), str(key))  # a good pair passes
    with pytest.raises(ConfigError, match=rf"^key: {other_key}: does not match the certificate"):
        check_certificate(str(cert), str(other_key))
    with pytest.raises(ConfigError, match=rf"^cert: {key}: no PEM certificate in it$"):
        check_certificate(str(key), str(key))
    with pytest.raises(ConfigError, match=rf"^key: {cert}: no PEM private key in it$"):
        check_certificate(str(cert), str(cert))
    truncated = tmp_path / "truncated.pem"
    truncated.write_bytes(cert.read_bytes()[:200])
    with pytest.raises(ConfigError, match=rf"^cert: {truncated}: "):
        check_certificate(str(truncated), str(key))
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/none.pem: No such file"):
        check_certificate(str(tmp_path / "none.pem"), str(key))
    bad_ca = tmp_path / "ca.pem"
    bad_ca.write_text("not a certificate\n")
    settings = load(None, {"upstream": "h:1", "upstream_ca": str(bad_ca)})
    with pytest.raises(ConfigError, match=rf"^upstream_ca: {bad_ca}: no usable PEM"):
        check_files(settings)


def test_check_config_offline_and_online(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "c.toml"
    store = tmp_path / "stats.sqlite"
    conf.write_text(f'upstream = "mail.example:143"\nstore = "{store}"\n')
    looked_up: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host: str, *args: Any, **kw: Any) -> Any:
        looked_up.append(host)
        if host == "mail.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.5", 143))]
        if host.endswith(".example"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    key = ["--user-key-file", str(tmp_path / "key")]
    assert main(["check-config", str(conf), *key]) == 0
    assert "mail.example" not in looked_up  # offline: the upstream is not looked up
    assert "--online does" in capsys.readouterr().out
    assert main(["check-config", "--online", str(conf), *key]) == 0
    out = capsys.readouterr().out
    assert "upstream mail.example:143 resolves to 192.0.2.5" in out
    assert f"statistics store {store}: not there yet" in out and not store.exists()
    made = Store(str(store))
    made.connect()
    made.close()
    assert main(["check-config", "--online", str(conf), *key]) == 0
    assert f"statistics store {store}: SQLite, schema version 3" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml", "key", "stats.sqlite"]
    store.unlink()
    store.write_text("not a database, but a text file of some length " * 100)
    assert main(["check-config", "--online", str(conf), *key]) == 1
    assert "not a usable SQLite database" in capsys.readouterr().err
    store.unlink()
    conf.write_text('upstream = "nowhere.example:143"\nstore = "off"\n')
    assert main(["check-config", "--online", str(conf), *key]) == 1
    err = capsys.readouterr().err
    assert "upstream nowhere.example:143: does not resolve" in err and err.count("\n") == 1


def test_stats_finds_the_services_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As the service derives it: `store`, else beside `user_key_file`, else $STATE_DIRECTORY;
    from a root shell (no $STATE_DIRECTORY) the shipped unit's state directory, not root's home."""
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    own = str(tmp_path / "home" / ".local" / "state" / "imapveil" / "stats.sqlite")
    system = str(config_files.SYSTEM_STATE_DIRECTORY / "stats.sqlite")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert statistics_stores(load(None, {}, need_upstream=False)) == [system, own]
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert statistics_stores(load(None, {}, need_upstream=False)) == [own, system]
    keyed = load(None, {"user_key_file": "/srv/imapveil/user-key"}, need_upstream=False)
    assert statistics_stores(keyed) == ["/srv/imapveil/stats.sqlite"]
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/imapveil")
    assert statistics_stores(load(None, {}, need_upstream=False)) == [system]
    assert statistics_stores(load(None, {"store": "off"}, need_upstream=False)) == []


def test_trusted_networks() -> None:
    settings = load(None, {"upstream": "h:1", "trusted_networks": "10.0.0.0/8, 2001:db8::/32"})
    assert settings.trusted_networks == ("10.0.0.0/8", "2001:db8::/32")
    relay = RelaySettings(
        "h",
        1,
        CoreConfig(),
        trusted_networks=tuple(ipaddress.ip_network(n) for n in settings.trusted_networks),
    )
    assert relay.trusts("10.9.8.7") and relay.trusts("2001:db8::5")
    assert not relay.trusts("192.0.2.1") and not relay.trusts("")
    with pytest.raises(ConfigError, match="trusted_networks"):
        load(None, {"upstream": "h:1", "trusted_networks": "10.0.0.300/8"})


def test_inject_id(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('upstream = "h:1"\ninject_id = { name = "gateway", vendor = "Example Org" }\n')
    assert load(conf, {}).inject_id == (("name", "gateway"), ("vendor", "Example Org"))
    flag = load(None, {"upstream": "h:1", "inject_id": "name=gateway, os=linux"})
    assert flag.inject_id == (("name", "gateway"), ("os", "linux"))
    for bad in ("name", "name=\u00e9", "x" * 31 + "=v"):
        with pytest.raises(ConfigError, match="inject_id"):
            load(None, {"upstream": "h:1", "inject_id": bad})


def test_the_readme_example_and_man_page_are_made_from_the_declarations() -> None:
    """The README's table, systemd/imapveil.toml and man/imapveil.1 are what
    `python3 -m imapveil.docs --write` makes from the declarations (run it after a change)."""
    readme = ROOT.joinpath("README.md").read_text()
    assert docs.readme_table() in readme
    example = ROOT.joinpath("systemd", "imapveil.toml").read_text()
    assert example == docs.example_config()
    assert ROOT.joinpath("man", "imapveil.1").read_text() == docs.man_page()
    for name in NAMES:
        assert name in HELP, name
        assert re.search(rf"^\| `{name}` / `--{name.replace('_', '-')}", readme, re.MULTILINE)
        assert len(re.findall(rf"^(# )?{name} = ", example, re.MULTILINE)) == 1, name


def test_the_example_configuration_is_valid_with_every_line_uncommented(tmp_path: Path) -> None:
    example = ROOT.joinpath("systemd", "imapveil.toml").read_text()
    every = re.sub(r"^# (\w+ = )", r"\1", example, flags=re.MULTILINE)
    assert set(tomllib.loads(every)) == set(NAMES)
    conf = tmp_path / "all.toml"
    conf.write_text(every)
    settings = load(conf, {})
    assert settings.events == "/var/log/imapveil/events.jsonl"  # the unit's LogsDirectory=
    assert settings.store == "/var/lib/imapveil/stats.sqlite"
    assert load(ROOT / "systemd" / "imapveil.toml", {}).upstream == Endpoint(
        "mail.internal.example", 143
    )


def test_a_reload_gets_the_same_file_checks_as_a_start(tmp_path: Path) -> None:
    # service.load_all is what a start and every SIGHUP run.
    conf = tmp_path / "imapveil.toml"
    conf.write_text(
        'upstream = "127.0.0.1:143"\n'
        f'user_key_file = "{tmp_path / "key"}"\n'
        f'events = "{tmp_path / "missing" / "events.jsonl"}"\n'
    )
    with pytest.raises(ConfigError, match="missing does not exist"):
        load_all(str(conf), {})
