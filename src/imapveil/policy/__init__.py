"""ID policies: which `ID` fields go upstream, and what of them is recorded. Pure, no I/O."""

from imapveil.policy.engine import Decision, Outcome, apply
from imapveil.policy.load import PolicyError, load_policy, parse_policy
from imapveil.policy.model import Policy, Rule

__all__ = [
    "Decision",
    "Outcome",
    "Policy",
    "PolicyError",
    "Rule",
    "apply",
    "load_policy",
    "parse_policy",
]
