"""The checks behind each setting's value (`config.Settings` names one per setting): parsing
endpoints, numbers, networks, choices, and the error that names the key and the problem."""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imapveil.shown import bounded, quoted


class ConfigError(ValueError):
    """A configuration refused; its message is bounded (`shown.MAX_MESSAGE`)."""

    def __init__(self, message: str) -> None:
        super().__init__(bounded(message))


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


MAX_HOST = 253
"""Characters of a host name at most (RFC 1035: 253 in text)."""


def parse_endpoint(text: str) -> Endpoint:
    """`HOST:PORT`, `[V6]:PORT`, or `:PORT` (all addresses)."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{quoted(text)} is not [HOST]:PORT")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"{quoted(text)} is not HOST:PORT")
        if ":" in host:
            raise ValueError(f"{quoted(text)}: write IPv6 addresses as [ADDRESS]:PORT")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{quoted(text)}: the port must be a number from 0 to 65535")
    if len(host) > MAX_HOST:
        raise ValueError(f"{quoted(text)}: a host name is at most {MAX_HOST} characters")
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
    lowered = text.lower()
    if not sep and (lowered.startswith(("postgresql:", "postgres:")) or "password=" in lowered):
        # A URL written wrong, or libpq's key=value form: not a SQLite file name to create (and
        # show); the value is not repeated, it may hold a password.
        raise ValueError("not a store imapveil can read: write postgresql://USER@HOST/DB")
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


def _whole(minimum: int, expected: str, maximum: int | None = None) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        try:
            number = int(value) if isinstance(value, str) else value
        except ValueError:
            raise ValueError(expected) from None
        if type(number) is not int or number < minimum:
            raise ValueError(expected)
        if maximum is not None and number > maximum:
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
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ValueError(
                f"{quoted(network)} does not appear to be an IPv4 or IPv6 network"
            ) from None
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
            raise ValueError(f"field {quoted(k)}: 1 to 30 printable ASCII characters")
        if len(v.encode()) > 1024 or not v.isascii() or not v.isprintable():
            raise ValueError(f"field {k!r}: value of at most 1024 printable ASCII characters")
    return tuple(value.items())


def _boolean(value: Any) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value
