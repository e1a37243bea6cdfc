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

import os
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from imapveil.config_values import (
    LOG_LEVELS,
    ConfigError,
    Endpoint,
    _boolean,
    _choice,
    _endpoint,
    _endpoints,
    _file,
    _inject_id,
    _log_level,
    _networks,
    _non_negative,
    _optional_endpoint,
    _policy,
    _positive,
    _proxy_name,
    _store,
    _whole,
    parse_endpoint,
)
from imapveil.identity import IDENTITIES, default_key_file
from imapveil.settings_file import TooLarge, read_limited
from imapveil.shown import quoted

# Re-exported: the rest of imapveil imports these from here.
__all__ = [
    "DECLARATIONS",
    "LOG_LEVELS",
    "ConfigError",
    "Declaration",
    "Endpoint",
    "Settings",
    "load",
    "parse_endpoint",
]

T = TypeVar("T")


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


_AT_LEAST_ONE = _whole(1, "expected a whole number, at least 1")
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
        "what records say about the user: `hash` (a keyed HMAC: counted, not named), `plain` "
        "(the login name; its first 256 octets and its length when longer) or `none`",
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
        "longest client line outside literals, in octets; longer gets `* BYE [TOOBIG]`; "
        "literals up to this or 64 KiB, whichever is more, are read whole for line ends: "
        "keep it at least Dovecot's `imap_max_line_length`",
        metavar="OCTETS", section="Time and size limits",
    )  # fmt: skip
    connect_timeout: float = setting(
        10.0, _positive("expected a number of seconds", "connect_timeout"),
        "seconds for the upstream to accept a connection, and again for its IMAP greeting",
        metavar=SECONDS,
    )  # fmt: skip
    tls_handshake_timeout: float = setting(
        30.0, _positive("expected a number of seconds", "tls_handshake_timeout"),
        "seconds a client gets for its whole TLS handshake (implicit TLS, or after STARTTLS), "
        "however slowly its octets come; then the connection is closed",
        metavar=SECONDS,
    )  # fmt: skip
    login_timeout: float = setting(
        60.0, _positive("expected a number of seconds", "login_timeout"),
        "seconds without traffic before login (and after a BYE or LOGOUT, while the server "
        "closes), then `* BYE`",
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
        10_000, _AT_LEAST_ONE,
        "concurrent sessions in all",
        metavar="N", section="Connection limits",
        note="Over a limit the client gets `* BYE [UNAVAILABLE]`; refusals are logged once per "
        "address and minute, with their count.",
    )  # fmt: skip
    max_sessions_per_client: int = setting(
        1_000, _AT_LEAST_ONE,
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
    ipv6_prefix: int = setting(
        64, _whole(32, "expected a whole number from 32 to 128", 128),
        "IPv6 clients count toward the per-address limits per network of this prefix length "
        "(a customer holds a /64, and a client may pick any address in it); `128` counts each "
        "address alone. IPv4 addresses count one by one",
        metavar="BITS",
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
        400, _AT_LEAST_ONE,
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
    fingerprint_labels: str = setting(
        "", _file,
        "your own labels for TLS (JA4) and behaviour fingerprints: a TOML file of `[[label]]` "
        "rows (`fingerprint`, `family`, `platform`) over the shipped, empty `fingerprints.toml`; "
        "sessions that sent no ID with a labelled fingerprint count as inferred users of that "
        "family in `imapveil stats`",
        metavar="FILE", default="none", example='"/etc/imapveil/fingerprints.toml"', path="in",
        note="Copy fingerprints from `imapveil stats --by fingerprint`; a label is your word, "
        "not a measurement, so such users are always shown apart, as inferred.",
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
            raw = (read or read_limited)(path)
            table = tomllib.loads(raw.decode("utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
        except TooLarge as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
            # RecursionError: nested too deeply for Python's TOML reader
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


MAX_PATH = 4096
"""Octets of a file name at most (Linux's PATH_MAX, with its NUL)."""
MAX_NAME = 255
"""Octets of one component of a file name at most (NAME_MAX)."""


def _fits(name: str, value: str) -> None:
    """Refuse a file name no system call would take (ENAMETOOLONG, later and less clearly).
    A PostgreSQL store's URL is no file name, and is never shown: it may hold a password."""
    if name == "store" and value.partition("://")[0] in ("postgresql", "postgres"):
        return
    raw = os.fsencode(value)
    if len(raw) >= MAX_PATH or any(len(part) > MAX_NAME for part in raw.split(b"/")):
        raise ValueError(
            f"{quoted(value)}: a file name too long for the system ({MAX_PATH - 1} octets, "
            f"{MAX_NAME} between two slashes)"
        )


def _apply(settings: Settings, table: Mapping[str, Any], source: str) -> Settings:
    changes: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_") if source == "command line" else key
        if name not in BY_NAME:
            raise ConfigError(f"{source}: unknown setting {quoted(key)}")
        try:
            changes[name] = converted = BY_NAME[name].convert(value)
            if (BY_NAME[name].path or name == "policy") and "\0" in converted:
                # TOML writes one as \u0000; open(2) cannot take it (ValueError, not OSError)
                raise ValueError("a file name cannot hold a NUL")
            if BY_NAME[name].path or name == "policy":
                _fits(name, converted)
        except ValueError as exc:
            raise ConfigError(f"{source}: {key}: {exc}") from None
    return replace(settings, **changes)
