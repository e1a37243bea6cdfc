"""What a policy says. Built by `load.parse_policy`, used by `engine.apply`."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from imapveil.policy.shapes import Shape
from imapveil.rfc2971 import IdFields

if TYPE_CHECKING:
    from imapveil.policy.engine import Outcome

FORWARD_ACTIONS = ("keep", "drop", "truncate", "coarsen", "redact")
RECORD_ACTIONS = ("keep", "drop", "coarsen", "hash")
MISFIT_ACTIONS = ("drop", "coarsen")  # what becomes of a value without its rule's shape

# Fields a backend may trust from a proxy (Dovecot's login_trusted_networks): a client must not
# be able to set them through us. Dropped whatever the policy says, unless the client's network
# is explicitly trusted in the configuration.
ANTI_SPOOF = (
    "x-originating-*",
    "x-connected-*",
    "x-session-*",
    "x-forward-*",
    "x-proxy-ttl",
    "x-multiplex",
    "x-client-transport",  # Dovecot: whether the client used TLS, which plaintext login rules read
)


@dataclass(frozen=True, slots=True)
class Rule:
    fields: tuple[str, ...]  # lower-case names and glob patterns
    forward: str = "drop"
    record: str = "drop"
    length: int = 64  # truncate: octets kept
    components: int = 2  # coarsen: dot-separated components kept
    marker: str = "redacted"  # redact: the replacement, an obvious marker (RFC 2971 §3)
    allow: tuple[str, ...] = ()  # detectors that do not apply to these fields
    label: str = ""  # where the rule came from, for `policy test`
    shape: Shape | None = None  # what a value must look like to be kept (shapes.py)
    misfit: str = "drop"  # a value without that shape: drop, or coarsen (then it must fit)

    def matches_exactly(self, name: str) -> bool:
        return name in self.fields

    def matches_pattern(self, name: str) -> bool:
        return any(_is_glob(p) and fnmatch.fnmatchcase(name, p) for p in self.fields)


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def is_anti_spoof(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in ANTI_SPOOF)


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    rules: tuple[Rule, ...] = ()
    default: Rule = field(default_factory=lambda: Rule(fields=(), label="default"))
    detectors: tuple[str, ...] = ("mac", "imei", "uuid", "token", "email", "ip")
    detected: Rule = field(default_factory=lambda: Rule(fields=(), label="detected"))
    announce: bool = True
    announce_field: str = "x-imapveil"
    digest: str = ""  # sha256 of the file's bytes, so records say exactly which policy decided

    def rule_for(self, name: str) -> Rule:
        """Exact names win over patterns; among patterns the first in the file wins."""
        for rule in self.rules:
            if rule.matches_exactly(name):
                return rule
        for rule in self.rules:
            if rule.matches_pattern(name):
                return rule
        return self.default

    def apply(
        self, fields: IdFields, *, hasher: Callable[[bytes], str], trusted_client: bool = False
    ) -> Outcome:
        """`engine.apply` with this policy: how the session core (which knows the policy only
        by its shape, protocol.id_policy.IdPolicy) asks for a decision."""
        from imapveil.policy.engine import apply  # noqa: PLC0415 (engine imports this module)

        return apply(self, fields, hasher=hasher, trusted_client=trusted_client)
