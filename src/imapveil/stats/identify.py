"""From what an ID record kept to a client family, version and platform."""

from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass
from pathlib import Path

TABLE = Path(__file__).resolve().parent / "clients.toml"
NO_ID = "no ID"
MAX_NAME = 64  # unknown names are kept as given, this long at most


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    family: str
    platform: str | None
    os: str | None


@dataclass(frozen=True, slots=True)
class Client:
    family: str
    version: str | None
    platform: str | None


def load_table(path: Path = TABLE) -> tuple[Rule, ...]:
    table = tomllib.loads(path.read_text(encoding="utf-8"))
    return tuple(
        Rule(row["name"].lower(), row["family"], row.get("platform"), row.get("os"))
        for row in table.get("client", [])
    )


_RULES = load_table()


def identify(fields: dict[str, str | None] | None, rules: tuple[Rule, ...] = _RULES) -> Client:
    if not fields:
        return Client(NO_ID, None, None)
    name = (fields.get("name") or "").strip()
    version = (fields.get("version") or None) and str(fields.get("version"))[:MAX_NAME]
    os_name = fields.get("os")
    platform = _platform(os_name)
    for rule in rules:
        if fnmatch.fnmatchcase(name.lower(), rule.name) and (
            rule.os is None or fnmatch.fnmatchcase((os_name or "").lower(), rule.os.lower())
        ):
            return Client(rule.family, version, platform or rule.platform)
    return Client(name[:MAX_NAME] or "unnamed", version, platform)


def _platform(os_name: str | None) -> str | None:
    if not os_name:
        return None
    known = {"mac os x": "macOS", "macos": "macOS", "ios": "iOS", "android": "Android",
             "windows": "Windows", "linux": "Linux"}  # fmt: skip
    # A system's name and version, never a device model after it ("Android 13; SM-S911B"): a
    # record made under a policy without the `os` shape may still hold one.
    head = os_name.split(";", 1)[0].split("(", 1)[0].strip()
    if not head:
        return None
    low = head.lower()
    for key, platform in known.items():
        if low == key or low.startswith(key + " "):  # "Android 13" is Android
            return platform
    return head[:MAX_NAME]
