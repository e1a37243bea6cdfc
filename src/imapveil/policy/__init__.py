"""ID policies: which `ID` fields go upstream, and what of them is recorded. Pure, no I/O:
policies are parsed from text here and read from files by `imapveil.policy_files`."""

from imapveil.policy.engine import Decision, Outcome, apply
from imapveil.policy.load import PolicyError, parse_policy
from imapveil.policy.model import Policy, Rule

__all__ = [
    "Decision",
    "Outcome",
    "Policy",
    "PolicyError",
    "Rule",
    "apply",
    "parse_policy",
]
