"""Settings: from a TOML file (`--config`), overridden by command-line flags.

Every setting has one name. In TOML it is written with underscores (`max_line_length`), on the
command line with dashes (`--max-line-length`). Unknown keys and bad values are errors that name
the file and the key, at start-up, never at the first connection.
"""

from __future__ import annotations

import ipaddress
import math
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from imapveil.identity import IDENTITIES, default_key_file


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


@dataclass(frozen=True, slots=True)
class Settings:
    listen: Endpoint = Endpoint("127.0.0.1", 1143)
    upstream: Endpoint | None = None
    events: str = "-"
    max_line_length: int = 64 * 1024
    connect_timeout: float = 10.0
    login_timeout: float = 60.0
    login_deadline: float = 180.0
    idle_timeout: float = 31 * 60.0
    user_identity: str = "hash"
    user_key_file: str = ""
    log_commands: bool = True
    shutdown_grace: float = 30.0
    log_level: str = "info"
    policy: str = "default"
    trusted_networks: tuple[str, ...] = ()
    inject_id: tuple[tuple[str, str], ...] = ()
    max_sessions: int = 10_000
    max_sessions_per_client: int = 1_000
    max_connection_rate: float = 100.0
    limits_exempt: tuple[str, ...] = ()
    proxy_protocol_from: tuple[str, ...] = ()
    upstream_proxy_protocol: bool = False
    forward_client_address: bool = False
    listen_tls: tuple[Endpoint, ...] = ()
    client_tls: str = "off"
    cert: str = ""
    key: str = ""
    upstream_tls: str = "plain"
    upstream_ca: str = ""
    upstream_verify: bool = True
    compress: bool = False
    capabilities: str = "pass"
    store: str = ""
    retention_days: int = 400
    proxy_name: str = ""
    min_group_users: int = 5
    metrics: str = ""

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


HELP: dict[str, str] = {
    "listen": "address to accept IMAP clients on, HOST:PORT (default 127.0.0.1:1143)",
    "upstream": "the IMAP server to relay to, HOST:PORT (required)",
    "events": "where to write JSON-lines records: '-' for stdout (default) or a file to append to",
    "max_line_length": "longest client command line in octets, outside literals (default 65536)",
    "connect_timeout": "seconds to wait for the upstream to accept a connection (default 10)",
    "login_timeout": "seconds without traffic before login, then BYE (default 60)",
    "login_deadline": "seconds from the connection until the client must be logged in, however "
    "it trickles, then BYE; 0 for none (default 180)",
    "idle_timeout": "seconds without traffic after login, then BYE (default 1860)",
    "user_identity": "what records say about the user: hash (default), plain or none",
    "user_key_file": "key for user_identity = hash; created (0600) if missing "
    "(default $STATE_DIRECTORY/user-key or ~/.local/state/imapveil/user-key)",
    "log_commands": "write one record per command (default true)",
    "shutdown_grace": "seconds sessions get to finish on SIGTERM before BYE (default 30)",
    "log_level": "diagnostics on stderr: debug, info (default), warning, error",
    "policy": "ID policy: a shipped one by name (default, strict, passthrough) or a TOML file",
    "trusted_networks": "client networks (CIDR, comma-separated) whose ID may carry "
    "x-originating-* and similar fields; default none",
    "inject_id": "send this ID (name=VALUE,...) before LOGIN when the client sent none, for "
    "servers that refuse clients without ID; describe your deployment honestly; default off",
    "max_sessions": "concurrent sessions in all (default 10000)",
    "max_sessions_per_client": "concurrent sessions from one client address (default 1000)",
    "max_connection_rate": "new connections per second from one client address, with a burst "
    "of 30 seconds' worth (default 100)",
    "limits_exempt": "client networks (CIDR, comma-separated) exempt from the per-address limits "
    "(max_sessions_per_client, max_connection_rate); loopback always is; default none",
    "proxy_protocol_from": "networks (CIDR, comma-separated) whose connections must start with "
    "a PROXY protocol v1/v2 header; default none",
    "upstream_proxy_protocol": "send a PROXY v2 header with the real client address upstream "
    "(default false)",
    "forward_client_address": "tell the upstream the real client in an ID before login "
    "(Dovecot's x-originating-ip & co., honoured from login_trusted_networks; default false)",
    "listen_tls": "implicit-TLS listeners (993-style), HOST:PORT, comma-separated; needs cert/key",
    "client_tls": "STARTTLS on plain listeners: off (default), offer, require (LOGINDISABLED "
    "until TLS)",
    "cert": "certificate chain (PEM) for the client leg",
    "key": "private key (PEM) for the client leg",
    "upstream_tls": "TLS to the upstream: plain (default), implicit, starttls",
    "upstream_ca": "CA file to verify the upstream's certificate (default: the system's CAs)",
    "upstream_verify": "verify the upstream's certificate and name (default true; false logs a "
    "warning)",
    "compress": "offer COMPRESS=DEFLATE to clients, done by the proxy (default false)",
    "capabilities": "pass (default): unknown capabilities pass through; strict: only known ones",
    "store": "statistics store: a SQLite file (default stats.sqlite beside the user key, in the "
    "state directory), postgresql://..., or off",
    "retention_days": "days of statistics kept (default 400)",
    "proxy_name": "this instance's name in every statistics row (default: the host name); give "
    "each instance on one host its own",
    "min_group_users": "groups with fewer distinct users are shown as 'other' (default 5)",
    "metrics": "serve Prometheus /metrics and /healthz on HOST:PORT (default off)",
}

LOG_LEVELS = ("debug", "info", "warning", "error")


def _positive(name: str, value: float) -> None:
    if not (value > 0) or math.isinf(value):
        raise ValueError(f"{name} must be a positive number")


def _whole(value: Any, minimum: int, expected: str) -> int:
    number = int(value) if isinstance(value, str) else value
    if type(number) is not int or number < minimum:
        raise ValueError(expected)
    return number


def _number(value: Any, expected: str) -> float:
    number = float(value) if isinstance(value, str) else value
    if type(number) not in (int, float):
        raise ValueError(expected)
    return float(number)


def _positive_number(name: str, value: Any, expected: str) -> float:
    number = _number(value, expected)
    _positive(name, number)
    return number


def _non_negative_number(name: str, value: Any, expected: str) -> float:
    number = _number(value, expected)
    if not (number >= 0) or math.isinf(number):
        raise ValueError(f"{name} must be a number, at least 0")
    return number


def _items(value: Any, expected: str) -> list[str]:
    """A TOML list of strings, or comma-separated text from a flag; blanks dropped."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ValueError(expected)
    return [i.strip() for i in items if i.strip()]


def _string(value: Any, expected: str) -> str:
    if not isinstance(value, str):
        raise ValueError(expected)
    return value


CHOICES: dict[str, tuple[str, ...]] = {
    "client_tls": ("off", "offer", "require"),
    "upstream_tls": ("plain", "implicit", "starttls"),
    "capabilities": ("pass", "strict"),
    "user_identity": IDENTITIES,
}
SECONDS = ("connect_timeout", "login_timeout", "idle_timeout", "shutdown_grace")
FLAGS = (
    "log_commands",
    "upstream_proxy_protocol",
    "forward_client_address",
    "upstream_verify",
    "compress",
)


def _convert(name: str, value: Any) -> Any:
    """Check and convert one setting's value, from TOML or from a flag's text."""
    if name in CHOICES:
        if value not in CHOICES[name]:
            raise ValueError(f"expected one of {', '.join(CHOICES[name])}")
        return value
    if name in ("listen", "upstream"):
        return parse_endpoint(_string(value, "expected a string HOST:PORT"))
    if name == "listen_tls":
        return tuple(parse_endpoint(i) for i in _items(value, "expected a list of HOST:PORT"))
    if name == "metrics":
        if _string(value, "expected HOST:PORT"):
            parse_endpoint(value)
        return value
    if name in ("cert", "key", "upstream_ca", "store"):
        return _string(value, "expected a file name")
    if name in ("events", "user_key_file"):
        return _string(value, "expected a string")
    if name == "proxy_name":
        text = _string(value, "expected a name")
        if len(text) > 64 or not text.isprintable():
            raise ValueError("expected at most 64 printable characters")
        return text
    if name == "max_line_length":
        return _whole(value, 1024, "expected a whole number of octets, at least 1024")
    if name in ("retention_days", "min_group_users", "max_sessions", "max_sessions_per_client"):
        return _whole(value, 1, "expected a whole number, at least 1")
    if name in SECONDS:
        return _positive_number(name, value, "expected a number of seconds")
    if name == "login_deadline":
        return _non_negative_number(name, value, "expected a number of seconds (0: none)")
    if name == "max_connection_rate":
        return _positive_number(name, value, "expected a number per second")
    if name == "log_level":
        if not isinstance(value, str) or value.lower() not in LOG_LEVELS:
            raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")
        return value.lower()
    if name == "policy":
        if not isinstance(value, str) or not value:
            raise ValueError("expected a policy name or file")
        return value
    if name in ("trusted_networks", "proxy_protocol_from", "limits_exempt"):
        networks = tuple(_items(value, "expected a list of networks like 10.0.0.0/8"))
        for network in networks:
            ipaddress.ip_network(network, strict=False)  # ValueError names the bad one
        return networks
    if name == "inject_id":
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
    if name in FLAGS:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    raise KeyError(name)


NAMES = tuple(f.name for f in fields(Settings))


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
        if name not in NAMES:
            raise ConfigError(f"{source}: unknown setting {key!r}")
        try:
            changes[name] = _convert(name, value)
        except ValueError as exc:
            raise ConfigError(f"{source}: {key}: {exc}") from None
    return replace(settings, **changes)
