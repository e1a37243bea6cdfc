"""Settings: from a TOML file (`--config`), overridden by command-line flags.

Every setting is declared once, in `Settings` below: its name, type and default as a dataclass
field, and with `setting(...)` its check, help text, metavar and example. The TOML loader, the
flags of `serve` and `check-config`, their validation, the README's table, the example
configuration (`systemd/imapveil.toml`) and the man page are all made from these declarations
(`python3 -m imapveil.docs --write` regenerates the files; a test compares them).

In TOML a setting is written with underscores (`max_line_length`), on the command line with
dashes (`--max-line-length`); booleans are `true`/`false` in TOML and `--compress` /
`--no-compress` on the command line. Unknown keys and bad values are errors that name the file and
the key, at start-up, never at the first connection.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
import ssl
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from imapveil.identity import IDENTITIES, default_key_file

T = TypeVar("T")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """`HOST:PORT`, `[V6]:PORT`, or `:PORT` (all addresses)."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r} is not [HOST]:PORT")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r} is not HOST:PORT")
        if ":" in host:
            raise ValueError(f"{text!r}: write IPv6 addresses as [ADDRESS]:PORT")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 0 to 65535")
    return Endpoint(host, int(port))


# Checks and conversions, one per kind of value: each takes a value from TOML or a flag's text
# and returns the setting's value, or raises ValueError saying what was expected.


def _string(value: Any, expected: str) -> str:
    if not isinstance(value, str):
        raise ValueError(expected)
    return value


def _items(value: Any, expected: str) -> list[str]:
    """A TOML list of strings, or comma-separated text from a flag; blanks dropped."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ValueError(expected)
    return [i.strip() for i in items if i.strip()]


def _endpoint(value: Any) -> Endpoint:
    return parse_endpoint(_string(value, "expected a string HOST:PORT"))


def _endpoints(value: Any) -> tuple[Endpoint, ...]:
    return tuple(parse_endpoint(i) for i in _items(value, "expected a list of HOST:PORT"))


def _optional_endpoint(value: Any) -> str:
    if _string(value, "expected HOST:PORT"):
        parse_endpoint(value)
    return str(value)


def _file(value: Any) -> str:
    return _string(value, "expected a file name")


def _store(value: Any) -> str:
    text = _string(value, "expected a file name, postgresql://... or off")
    scheme, sep, _ = text.partition("://")
    if sep and scheme not in ("sqlite", "postgresql", "postgres"):
        raise ValueError(
            f"{scheme}:// is not a store imapveil knows: a SQLite file, sqlite://PATH, "
            "postgresql://... or off"
        )
    return text


def _proxy_name(value: Any) -> str:
    text = _string(value, "expected a name")
    if len(text) > 64 or not text.isprintable():
        raise ValueError("expected at most 64 printable characters")
    return text


def _whole(minimum: int, expected: str) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        try:
            number = int(value) if isinstance(value, str) else value
        except ValueError:
            raise ValueError(expected) from None
        if type(number) is not int or number < minimum:
            raise ValueError(expected)
        return number

    return convert


def _number(value: Any, expected: str) -> float:
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        raise ValueError(expected) from None
    if type(number) not in (int, float):
        raise ValueError(expected)
    return float(number)


def _positive(expected: str, what: str) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        number = _number(value, expected)
        if not (number > 0) or math.isinf(number):
            raise ValueError(f"{what} must be a positive number")
        return number

    return convert


def _non_negative(expected: str, what: str) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        number = _number(value, expected)
        if not (number >= 0) or math.isinf(number):
            raise ValueError(f"{what} must be a number, at least 0")
        return number

    return convert


def _choice(*choices: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return str(value)

    return convert


LOG_LEVELS = ("debug", "info", "warning", "error")


def _log_level(value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")
    return value.lower()


def _policy(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a policy name or file")
    return value


def _networks(value: Any) -> tuple[str, ...]:
    networks = tuple(_items(value, "expected a list of networks like 10.0.0.0/8"))
    for network in networks:
        ipaddress.ip_network(network, strict=False)  # ValueError names the bad one
    return networks


def _inject_id(value: Any) -> tuple[tuple[str, str], ...]:
    if isinstance(value, str):
        pairs = [item.partition("=") for item in value.split(",") if item.strip()]
        if any(not sep for _, sep, _ in pairs):
            raise ValueError("expected name=value pairs separated by commas")
        value = {k.strip(): v.strip() for k, _, v in pairs}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError("expected a table of field names to string values")
    if len(value) > 29:
        raise ValueError("at most 29 fields (RFC 2971 allows 30)")
    for k, v in value.items():
        if not 0 < len(k.encode()) <= 30 or not k.isascii() or not k.isprintable():
            raise ValueError(f"field {k!r}: 1 to 30 printable ASCII characters")
        if len(v.encode()) > 1024 or not v.isascii() or not v.isprintable():
            raise ValueError(f"field {k!r}: value of at most 1024 printable ASCII characters")
    return tuple(value.items())


def _boolean(value: Any) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


@dataclass(frozen=True, slots=True)
class Declaration:
    """All that is said about one setting besides its name, type and default."""

    convert: Callable[[Any], Any]
    help: str
    """What it does, for the README, `--help`, the example file and the man page (`code` in
    backticks, shown without them on a terminal)."""
    metavar: str | None
    """The flag's argument (None for a boolean: `--flag` / `--no-flag`)."""
    default: str = ""
    """The default as the README shows it, when the value itself does not say it well."""
    example: str | None = None
    """A TOML value for the example file (else the default)."""
    enabled: bool = False
    """Whether the example file sets it (else the line is commented out: the default is fine)."""
    note: str = ""
    """More for the example file only: advice, not what the setting is."""
    section: str = ""
    """A heading in the example file before this setting."""
    path: str = ""
    """`out` for a file imapveil writes (its directory must exist), `in` for one it reads."""

    name: str = ""
    value: Any = None


def setting(value: T, convert: Callable[[Any], Any], help: str, **more: Any) -> T:
    """A field of `Settings`: `value` is its default; the rest is its `Declaration`."""
    more.setdefault("metavar", None)
    declaration = Declaration(convert, help, **more)
    return field(default=value, metadata={"declaration": declaration})


SECONDS = "SECONDS"
CIDRS = "CIDR[,CIDR...]"


@dataclass(frozen=True, slots=True)
class Settings:
    listen: Endpoint = setting(  # noqa: RUF009 (a field specifier; Endpoint is frozen)
        Endpoint("127.0.0.1", 1143), _endpoint,
        "address to accept clients on: `HOST:PORT`, `[IPV6]:PORT`, `:PORT`; ignored when "
        "systemd hands over the sockets (imapveil.socket)",
        metavar="HOST:PORT", example='"0.0.0.0:143"', enabled=True, section="Where",
    )  # fmt: skip
    upstream: Endpoint | None = setting(  # noqa: RUF009
        None, _endpoint,
        "the IMAP server to relay to, `HOST:PORT`; a name is resolved at start and on reload",
        metavar="HOST:PORT", default="none: required", example='"mail.internal.example:143"',
        enabled=True,
    )  # fmt: skip
    events: str = setting(
        "-", _file,
        "JSON-lines records: `-` for stdout, or a file to append to (reopened on reload, for "
        "log rotation)",
        metavar="FILE", example='"/var/log/imapveil/events.jsonl"', path="out",
        note="Under the shipped unit, stdout is the journal; /var/log/imapveil is the unit's "
        "LogsDirectory=, so the example path works there.",
        section="Records",
    )  # fmt: skip
    log_commands: bool = setting(
        True, _boolean, "one record per command (`false`: only session and ID records)",
    )  # fmt: skip
    log_level: str = setting(
        "info", _log_level, "diagnostics on stderr: `debug`, `info`, `warning`, `error`",
        metavar="LEVEL",
    )  # fmt: skip
    user_identity: str = setting(
        "hash", _choice(*IDENTITIES),
        "what records say about the user: `hash` (a keyed HMAC: counted, not named), `plain` or "
        "`none`",
        metavar="MODE",
    )  # fmt: skip
    user_key_file: str = setting(
        "", _file,
        "the key for `user_identity = \"hash\"`; created with 32 random octets and mode 0600 "
        "if missing; keep it to keep counts stable",
        metavar="FILE", default="`$STATE_DIRECTORY/user-key`, else "
        "`~/.local/state/imapveil/user-key`", example='"/var/lib/imapveil/user-key"', path="out",
        note="Under the shipped unit the default is /var/lib/imapveil/user-key (StateDirectory=).",
    )  # fmt: skip
    policy: str = setting(
        "default", _policy,
        "ID policy: a shipped one by name (`default`, `strict`, `passthrough`) or a TOML file",
        metavar="NAME|FILE", section="ID policy",
    )  # fmt: skip
    trusted_networks: tuple[str, ...] = setting(
        (), _networks,
        "client networks (CIDR list; comma-separated on the command line) whose ID may carry "
        "`x-originating-*` and the like",
        metavar=CIDRS, default="none", example='["10.0.0.0/8"]',
    )  # fmt: skip
    inject_id: tuple[tuple[str, str], ...] = setting(
        (), _inject_id,
        "an ID the proxy sends before LOGIN/AUTHENTICATE when the client sent none (TOML table, "
        "or `name=V,vendor=W`), for servers that refuse clients without ID",
        metavar="NAME=VALUE[,...]", default="off",
        example='{ name = "imapveil", vendor = "Example Org IT" }',
        note="Describe your deployment honestly; leave it unset otherwise.",
    )  # fmt: skip
    forward_client_address: bool = setting(
        False, _boolean,
        "send Dovecot's `x-originating-ip`, `x-originating-port`, `x-connected-ip`, "
        "`x-connected-port`, `x-session-id` in an ID before login (for a Dovecot with the proxy "
        "in `login_trusted_networks`)",
    )  # fmt: skip
    max_line_length: int = setting(
        64 * 1024, _whole(1024, "expected a whole number of octets, at least 1024"),
        "longest client line outside literals, in octets; longer gets `* BYE [TOOBIG]`",
        metavar="OCTETS", section="Time and size limits",
    )  # fmt: skip
    connect_timeout: float = setting(
        10.0, _positive("expected a number of seconds", "connect_timeout"),
        "seconds for the upstream to accept a connection, and again for its IMAP greeting",
        metavar=SECONDS,
    )  # fmt: skip
    login_timeout: float = setting(
        60.0, _positive("expected a number of seconds", "login_timeout"),
        "seconds without traffic before login, then `* BYE`",
        metavar=SECONDS,
    )  # fmt: skip
    login_deadline: float = setting(
        180.0, _non_negative("expected a number of seconds (0: none)", "login_deadline"),
        "seconds from the connection until the client must be logged in, however slowly it "
        "trickles, then `* BYE Login time limit reached` (Dovecot allows three minutes too); "
        "`0` for none",
        metavar=SECONDS,
    )  # fmt: skip
    idle_timeout: float = setting(
        31 * 60.0, _positive("expected a number of seconds", "idle_timeout"),
        "seconds without traffic after login (RFC 2177 clients re-IDLE every 29 min)",
        metavar=SECONDS, note="Keep it above 1740 seconds, or IDLE clients are cut off.",
    )  # fmt: skip
    shutdown_grace: float = setting(
        30.0, _positive("expected a number of seconds", "shutdown_grace"),
        "seconds sessions get to end after SIGTERM/SIGINT before `* BYE [UNAVAILABLE]` (a second "
        "signal skips the wait)",
        metavar=SECONDS,
    )  # fmt: skip
    max_sessions: int = setting(
        10_000, _whole(1, "expected a whole number, at least 1"),
        "concurrent sessions in all",
        metavar="N", section="Connection limits",
        note="Over a limit the client gets `* BYE [UNAVAILABLE]`; refusals are logged once per "
        "address and minute, with their count.",
    )  # fmt: skip
    max_sessions_per_client: int = setting(
        1_000, _whole(1, "expected a whole number, at least 1"),
        "concurrent sessions from one client address",
        metavar="N",
    )  # fmt: skip
    max_connection_rate: float = setting(
        100.0, _positive("expected a number per second", "max_connection_rate"),
        "new connections per second from one client address; up to 30 seconds' worth (3000 by "
        "default) at once",
        metavar="PER_SECOND",
        note="A reconnect storm of a few hundred people behind one NAT address fits the burst.",
    )  # fmt: skip
    limits_exempt: tuple[str, ...] = setting(
        (), _networks,
        "client networks (CIDR list; comma-separated on the command line) without per-address "
        "limits: they count toward `max_sessions` only",
        metavar=CIDRS, default="none (loopback is always exempt)",
        example='["203.0.113.10/32"]',
        note="An office's NAT address, a balancer without the PROXY protocol.",
    )  # fmt: skip
    proxy_protocol_from: tuple[str, ...] = setting(
        (), _networks,
        "networks (CIDR) whose connections must start with a PROXY v1/v2 header (HAProxy, "
        "cloud balancers); a header from anywhere else is refused",
        metavar=CIDRS, default="none", example='["10.0.0.0/24"]', section="Load balancers",
    )  # fmt: skip
    upstream_proxy_protocol: bool = setting(
        False, _boolean,
        "start upstream connections with a PROXY v2 header naming the real client",
        note="Dovecot: `haproxy = yes` on the listener and the proxy in haproxy_trusted_networks.",
    )  # fmt: skip
    listen_tls: tuple[Endpoint, ...] = setting(
        (), _endpoints,
        "implicit-TLS listeners (993-style), `HOST:PORT`, a list (comma-separated on the command "
        "line); needs `cert` and `key`",
        metavar="HOST:PORT[,...]", default="none", example='["0.0.0.0:993"]', section="TLS",
    )  # fmt: skip
    client_tls: str = setting(
        "off", _choice("off", "offer", "require"),
        "STARTTLS on plain listeners: `off`, `offer`, `require` (LOGINDISABLED and "
        "`NO [PRIVACYREQUIRED]` to LOGIN/AUTHENTICATE until TLS)",
        metavar="MODE",
    )  # fmt: skip
    cert: str = setting(
        "", _file,
        "certificate chain (PEM) for the client leg; re-read on reload",
        metavar="FILE", default="none", example='"/etc/imapveil/tls/fullchain.pem"', path="in",
    )  # fmt: skip
    key: str = setting(
        "", _file,
        "private key (PEM, unencrypted) for the client leg; re-read on reload",
        metavar="FILE", default="none", example='"/etc/imapveil/tls/privkey.pem"', path="in",
    )  # fmt: skip
    upstream_tls: str = setting(
        "plain", _choice("plain", "implicit", "starttls"),
        "TLS to the server: `plain`, `implicit`, `starttls`",
        metavar="MODE",
    )  # fmt: skip
    upstream_ca: str = setting(
        "", _file,
        "CA file to verify the server's certificate",
        metavar="FILE", default="system CAs", example='"/etc/imapveil/tls/internal-ca.pem"',
        path="in",
    )  # fmt: skip
    upstream_verify: bool = setting(
        True, _boolean,
        "verify the server's certificate and name (SNI sent); `false` logs a warning at start",
    )  # fmt: skip
    compress: bool = setting(
        False, _boolean,
        "offer COMPRESS=DEFLATE to clients; the proxy compresses the client leg only",
        section="Capabilities",
    )  # fmt: skip
    capabilities: str = setting(
        "pass", _choice("pass", "strict"),
        "capabilities shown to clients: `pass` lets unknown ones through; `strict` shows only "
        "the ones imapveil knows it relays",
        metavar="MODE",
    )  # fmt: skip
    store: str = setting(
        "", _store,
        "statistics store: a SQLite file, `postgresql://user@host/db` (install "
        "`imapveil[postgresql]`), or `off`",
        metavar="FILE|URL", default="`stats.sqlite` beside the user key",
        example='"/var/lib/imapveil/stats.sqlite"', path="out", section="Usage statistics",
        note="Under the shipped unit the default is /var/lib/imapveil/stats.sqlite; "
        "`imapveil stats --config FILE` and `imapveil report --config FILE` read the same store.",
    )  # fmt: skip
    retention_days: int = setting(
        400, _whole(1, "expected a whole number, at least 1"),
        "statistics older than this are purged (at start and daily)",
        metavar="DAYS",
    )  # fmt: skip
    proxy_name: str = setting(
        "", _proxy_name,
        "this instance's name in every statistics row (`proxy`), and its spool's directory; "
        "give each instance on one host its own",
        metavar="NAME", default="the host name", example='"imap-gw-1"',
    )  # fmt: skip
    min_group_users: int = setting(
        5, _whole(0, "expected a whole number, at least 0"),
        "report groups with fewer distinct users are shown as \"other\" (`0`: none are)",
        metavar="N",
    )  # fmt: skip
    metrics: str = setting(
        "", _optional_endpoint,
        "serve Prometheus `/metrics` and `/healthz` on `HOST:PORT`",
        metavar="HOST:PORT", default="off", example='"127.0.0.1:9143"',
    )  # fmt: skip

    def store_url(self) -> str | None:
        """Where statistics go: a path, sqlite://PATH, postgresql://...; None when "off"."""
        if self.store == "off":
            return None
        return self.store or str(self.key_file().with_name("stats.sqlite"))

    def key_file(self) -> Path:
        return Path(self.user_key_file) if self.user_key_file else default_key_file()

    def proxy(self) -> str:
        """This instance's name in statistics rows: `proxy_name`, or the host name."""
        return self.proxy_name or socket.gethostname()


DECLARATIONS: tuple[Declaration, ...] = tuple(
    replace(f.metadata["declaration"], name=f.name, value=f.default) for f in fields(Settings)
)
"""Every setting, in the order of the example file."""
BY_NAME = {d.name: d for d in DECLARATIONS}
NAMES = tuple(BY_NAME)
HELP: dict[str, str] = {d.name: d.help for d in DECLARATIONS}


def load(
    path: str | Path | None,
    overrides: Mapping[str, Any],
    read: Callable[[Path], bytes] | None = None,
    *,
    need_upstream: bool = True,
) -> Settings:
    """Settings from the file at `path` (if any), then `overrides` (flag values, not None)."""
    settings = Settings()
    if path is not None:
        path = Path(path)
        try:
            raw = (read or Path.read_bytes)(path)
            table = tomllib.loads(raw.decode("utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        settings = _apply(settings, table, str(path))
    given = {k: v for k, v in overrides.items() if v is not None}
    settings = _apply(settings, given, "command line")
    if settings.upstream is None and need_upstream:
        raise ConfigError("no upstream: give --upstream HOST:PORT or `upstream` in the config")
    if (settings.listen_tls or settings.client_tls != "off") and not (
        settings.cert and settings.key
    ):
        raise ConfigError("listen_tls and client_tls need `cert` and `key`")
    return settings


def _apply(settings: Settings, table: Mapping[str, Any], source: str) -> Settings:
    changes: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_") if source == "command line" else key
        if name not in BY_NAME:
            raise ConfigError(f"{source}: unknown setting {key!r}")
        try:
            changes[name] = BY_NAME[name].convert(value)
        except ValueError as exc:
            raise ConfigError(f"{source}: {key}: {exc}") from None
    return replace(settings, **changes)


# Checks of the files a configuration names, done before anything is created: `serve` and
# `check-config` both run them.


def check_files(settings: Settings) -> None:
    """Files imapveil writes must be in existing directories (the default state directory is
    created, an explicitly configured one is not); files it reads must be readable, and the
    certificate and key usable. Raises ConfigError naming the setting, the file and the problem."""
    for d in DECLARATIONS:
        value = getattr(settings, d.name)
        if d.path == "out" and value and value not in ("-", "off"):
            if d.name == "store" and value.startswith(("postgresql://", "postgres://")):
                continue
            parent = Path(value.removeprefix("sqlite://")).parent
            if not parent.is_dir():
                raise ConfigError(f"{d.name}: {value}: directory {parent} does not exist")
        if d.path == "in" and value:
            try:
                with open(value, "rb") as f:
                    f.read(1)
            except OSError as exc:
                raise ConfigError(f"{d.name}: {value}: {exc.strerror or exc}") from None
    if settings.cert and settings.key:
        check_certificate(settings.cert, settings.key)
    if settings.upstream_ca:
        try:
            ssl.create_default_context(cafile=settings.upstream_ca)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"upstream_ca: {settings.upstream_ca}: no usable PEM certificate ({_reason(exc)})"
            ) from None


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----")
_PEM_KEY = re.compile(rb"-----BEGIN ((RSA|EC|ENCRYPTED) )?PRIVATE KEY-----")


def check_certificate(cert: str, key: str) -> None:
    """`cert` and `key` as the client leg loads them; errors say FILE: problem."""
    try:
        cert_text, key_text = Path(cert).read_bytes(), Path(key).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{exc.filename}: {exc.strerror or exc}") from None
    if not _PEM_CERT.search(cert_text):
        raise ConfigError(f"cert: {cert}: no PEM certificate in it")
    found = _PEM_KEY.search(key_text)
    if not found:
        raise ConfigError(f"key: {key}: no PEM private key in it")
    if found.group(2) == b"ENCRYPTED" or b"Proc-Type: 4,ENCRYPTED" in key_text:
        raise ConfigError(f"key: {key}: the key is encrypted; imapveil needs it unencrypted")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"key: {key}: does not match the certificate in {cert}") from None
        if "PEM" in str(exc) and (b"-----END CERTIFICATE-----" not in cert_text):
            raise ConfigError(f"cert: {cert}: a truncated PEM certificate") from None
        raise ConfigError(f"cert: {cert}, key: {key}: not usable ({_reason(exc)})") from None
    except OSError as exc:
        raise ConfigError(f"{exc.filename or cert}: {exc.strerror or exc}") from None


def _reason(exc: ssl.SSLError) -> str:
    return (exc.reason or str(exc)).lower().replace("_", " ")


SYSTEM_STATE_DIRECTORY = Path("/var/lib/imapveil")
"""The shipped unit's StateDirectory=."""


def statistics_stores(settings: Settings) -> list[str]:
    """Where `imapveil stats` and `report` look for the service's store, best first.

    As the service derives it: `store`, else stats.sqlite beside `user_key_file`, else in
    $STATE_DIRECTORY. An administrator's shell has no $STATE_DIRECTORY, so without those the
    shipped unit's state directory (/var/lib/imapveil) and the user's own state directory are
    both candidates: the system's first for root, the user's first for anyone else."""
    if settings.store or settings.user_key_file or os.environ.get("STATE_DIRECTORY"):
        url = settings.store_url()
        return [url] if url else []
    system = str(SYSTEM_STATE_DIRECTORY / "stats.sqlite")
    own = str(default_key_file().with_name("stats.sqlite"))
    return [system, own] if os.geteuid() == 0 else [own, system]
