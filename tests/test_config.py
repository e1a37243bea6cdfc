from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest

from imapveil.cli import build_parser, main
from imapveil.config import HELP, NAMES, ConfigError, Endpoint, load, parse_endpoint
from imapveil.protocol.session import CoreConfig
from imapveil.relay.connection import RelaySettings


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
        ["serve", "--upstream", "h:1", "--max-line-length", "2048", "--log-commands", "false"]
    )
    assert args.max_line_length == "2048"
    settings = load(None, {k: getattr(args, k) for k in vars(args) if k not in ("command",)} | {})
    assert settings.max_line_length == 2048
    assert settings.log_commands is False


def test_cli_reports_config_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["serve", "--config", str(tmp_path / "missing.toml"), "--upstream", "h:1"]) == 2
    assert "missing.toml: cannot read" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("imapveil ")


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


def test_every_setting_is_documented_in_the_readme_and_the_example() -> None:
    """A setting has a help text (and so a flag), a row in the README's table, and a line (maybe
    commented out) in systemd/imapveil.toml."""
    root = Path(__file__).resolve().parents[1]
    readme = root.joinpath("README.md").read_text()
    example = root.joinpath("systemd", "imapveil.toml").read_text()
    for name in NAMES:
        assert name in HELP, name
        assert re.search(rf"^\| [^|]*`{name}`", readme, re.MULTILINE), name
        assert re.search(rf"^(# )?{name} = ", example, re.MULTILINE), name
