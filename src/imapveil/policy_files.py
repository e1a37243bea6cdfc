"""Policy files: read a policy from a path, or find a shipped one by name. The file side of
`imapveil.policy`, which itself stays pure (it parses text and applies policies)."""

from __future__ import annotations

from pathlib import Path

from imapveil.policy.load import PolicyError, parse_policy
from imapveil.policy.model import Policy
from imapveil.settings_file import TooLarge, read_limited
from imapveil.shown import shown

SHIPPED = Path(__file__).resolve().parent / "policies"


def load_policy(path: str | Path) -> Policy:
    path = Path(path)
    try:
        raw = read_limited(path)
    except OSError as exc:
        raise PolicyError(f"{shown(str(path))}: cannot read: {exc.strerror or exc}") from None
    except TooLarge as exc:
        raise PolicyError(f"{shown(str(path))}: {exc}") from None
    return parse_policy(raw, shown(str(path)))


def resolve_policy(spec: str | None) -> Policy:
    """A policy file's path, or the name of a shipped policy (`default`, `strict`, ...)."""
    if spec is None:
        spec = "default"
    path = Path(spec)
    named = "/" not in spec and not spec.endswith(".toml")
    shipped = SHIPPED / f"{spec}.toml"
    try:
        # A shipped policy's name is that policy, whatever the working directory holds (/etc
        # has a directory `default`); a file is named with a `/` or `.toml`, or a name no
        # shipped policy has.
        if named and shipped.exists():
            return load_policy(shipped)
        if path.exists() or not named:
            return load_policy(path)
    except OSError as exc:  # exists() raises for a name too long for a file name
        raise PolicyError(f"{shown(spec)}: {exc.strerror or exc}") from None
    names = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.toml")))
    raise PolicyError(f"{shown(spec)}: no such policy file or shipped policy (shipped: {names})")
