"""Parse a policy (TOML text) into a `Policy`, or say exactly what is wrong with it. No I/O:
reading files is `imapveil.policy_files`.

name = "default"
description = "free text for people"
default = { forward = "drop", record = "drop" }      # fields no rule names
detectors = ["mac", "imei", "uuid", "token", "email", "ip"]
detected = { forward = "drop", record = "drop" }     # values that look like identifiers
announce = true                                      # say so (RFC 2971 §5) when we changed it
announce_field = "x-imapveil"

[[rule]]
fields = ["name", "version"]       # exact names and glob patterns, case-insensitive
forward = "keep"                   # keep | drop | truncate | coarsen | redact
record = "keep"                    # keep | drop | coarsen | hash
length = 64                        # for truncate
components = 2                     # for coarsen
marker = "redacted"                # for redact
allow = ["email"]                  # detectors that do not apply to these fields
shape = "version"                  # what a kept value must look like: a named shape
                                   # (name, vendor, os, version, date, url) or a pattern "^...$"
misfit = "coarsen"                 # a value without that shape: drop | coarsen
"""

from __future__ import annotations

import hashlib
import tomllib
from typing import TYPE_CHECKING, Any

from imapveil.policy.detectors import DETECTORS
from imapveil.policy.model import FORWARD_ACTIONS, MISFIT_ACTIONS, RECORD_ACTIONS, Policy, Rule
from imapveil.policy.shapes import Shape, ShapeError, compile_shape
from imapveil.shown import bounded, quoted, shown


class PolicyError(ValueError):
    """A policy refused; its message is bounded (`shown.MAX_MESSAGE`)."""

    def __init__(self, message: str) -> None:
        super().__init__(bounded(message))


_TOP = {
    "name",
    "description",
    "default",
    "detectors",
    "detected",
    "announce",
    "announce_field",
    "rule",
}
_RULE = {
    "fields",
    "forward",
    "record",
    "length",
    "components",
    "marker",
    "allow",
    "shape",
    "misfit",
}


def parse_policy(raw: bytes, source: str) -> Policy:
    try:
        table = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
        # RecursionError: nested too deeply for Python's TOML reader
        raise PolicyError(f"{source}: not valid TOML: {exc}") from None
    where = _Where(source)
    where.no_unknown(table, _TOP, "")
    name = where.string(table, "name", default=_stem(source))
    detectors = tuple(where.strings(table, "detectors", default=list(DETECTORS)))
    for d in detectors:
        if d not in DETECTORS:
            raise PolicyError(
                f"{source}: detectors: unknown detector {quoted(d)} (known: {', '.join(DETECTORS)})"
            )
    default = where.rule(table.get("default", {}), "default", need_fields=False)
    # What becomes of an identifier is not a question of its shape.
    detected = where.rule(table.get("detected", {}), "detected", need_fields=False, shaped=False)
    rules_raw = table.get("rule", [])
    if not isinstance(rules_raw, list):
        raise PolicyError(f"{source}: rule: write rules as [[rule]] tables")
    rules = tuple(where.rule(r, f"rule[{i}]", need_fields=True) for i, r in enumerate(rules_raw))
    announce = table.get("announce", True)
    if not isinstance(announce, bool):
        raise PolicyError(f"{source}: announce: expected true or false")
    announce_field = where.string(table, "announce_field", default="x-imapveil")
    if not 0 < len(announce_field.encode()) <= 30 or not announce_field.isascii():
        raise PolicyError(
            f"{source}: announce_field: must be 1 to 30 ASCII characters (RFC 2971 §3.3)"
        )
    return Policy(
        name=name,
        rules=rules,
        default=default,
        detectors=detectors,
        detected=detected,
        announce=announce,
        announce_field=announce_field.lower(),
        digest=hashlib.sha256(raw).hexdigest(),
    )


class _Where:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, why: str) -> PolicyError:
        return PolicyError(f"{self.source}: {shown(key)}: {why}")

    def no_unknown(self, table: dict[str, Any], known: set[str], prefix: str) -> None:
        for key in table:
            if key not in known:
                raise self.fail(prefix + key, f"unknown key (known: {', '.join(sorted(known))})")

    def string(self, table: dict[str, Any], key: str, default: str) -> str:
        value = table.get(key, default)
        if not isinstance(value, str):
            raise self.fail(key, "expected a string")
        return value

    def strings(self, table: dict[str, Any], key: str, default: list[str]) -> list[str]:
        value = table.get(key, default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, "expected a list of strings")
        return value

    def field_names(self, table: dict[str, Any], key: str) -> tuple[str, ...]:
        names = self.strings(table, "fields", default=[])
        if not names:
            raise self.fail(key + ".fields", "a rule needs at least one field name or pattern")
        for n in names:
            if not 0 < len(n.encode()) <= 30 or not n.isascii():
                raise self.fail(key + ".fields", f"{quoted(n)} is not 1 to 30 ASCII characters")
        return tuple(n.lower() for n in names)

    def shape(self, table: dict[str, Any], key: str) -> Shape | None:
        if "shape" not in table:
            return None
        spec = table["shape"]
        if not isinstance(spec, str):
            raise self.fail(key + ".shape", "expected a shape's name or a pattern")
        try:
            return compile_shape(spec)
        except ShapeError as exc:
            raise self.fail(key + ".shape", str(exc)) from None

    def rule(self, table: Any, key: str, *, need_fields: bool, shaped: bool = True) -> Rule:
        if not isinstance(table, dict):
            raise self.fail(key, "expected a table")
        known = _RULE if need_fields else _RULE - {"fields", "allow"}
        known = known if shaped else known - {"shape", "misfit"}
        self.no_unknown(table, known, key + ".")
        fields = self.field_names(table, key) if need_fields else ()
        forward = table.get("forward", "drop")
        if forward not in FORWARD_ACTIONS:
            raise self.fail(key + ".forward", f"expected one of {', '.join(FORWARD_ACTIONS)}")
        record = table.get("record", "drop")
        if record not in RECORD_ACTIONS:
            raise self.fail(key + ".record", f"expected one of {', '.join(RECORD_ACTIONS)}")
        length = table.get("length", 64)
        if type(length) is not int or not 1 <= length <= 1024:
            raise self.fail(key + ".length", "expected a whole number from 1 to 1024")
        components = table.get("components", 2)
        if type(components) is not int or not 1 <= components <= 10:
            raise self.fail(key + ".components", "expected a whole number from 1 to 10")
        marker = table.get("marker", "redacted")
        if not isinstance(marker, str) or not 0 < len(marker) <= 64 or not marker.isascii():
            raise self.fail(key + ".marker", "expected 1 to 64 ASCII characters")
        allow = tuple(self.strings(table, "allow", default=[]))
        for d in allow:
            if d not in DETECTORS:
                raise self.fail(key + ".allow", f"unknown detector {quoted(d)}")
        shape = self.shape(table, key)
        misfit = table.get("misfit", "drop")
        if misfit not in MISFIT_ACTIONS:
            raise self.fail(key + ".misfit", f"expected one of {', '.join(MISFIT_ACTIONS)}")
        if "misfit" in table and shape is None:
            raise self.fail(key + ".misfit", "only with a shape")
        return Rule(
            fields,
            forward,
            record,
            length,
            components,
            marker,
            allow,
            label=key,
            shape=shape,
            misfit=misfit,
        )


def _stem(source: str) -> str:
    """The file name without its suffix, as `pathlib.Path(source).stem` (no path I/O here)."""
    name = source.rsplit("/", 1)[-1]
    dot = name.rfind(".")
    return name[:dot] if dot > 0 else name


# `load_policy`, `resolve_policy` and `SHIPPED` read files and live in imapveil.policy_files.
# Owed: service.py and cli.py still import them from here; until they import policy_files,
# this module forwards them lazily, so that importing the pure policy package reads nothing.
if TYPE_CHECKING:
    from imapveil.policy_files import SHIPPED, load_policy, resolve_policy

__all__ = ["SHIPPED", "PolicyError", "load_policy", "parse_policy", "resolve_policy"]

_MOVED = frozenset(("SHIPPED", "load_policy", "resolve_policy"))


def __getattr__(name: str) -> object:
    if name in _MOVED:
        import imapveil.policy_files  # noqa: PLC0415 (lazy: see above)

        return getattr(imapveil.policy_files, name)
    raise AttributeError(name)
