"""What records say about who logged in (`user_identity`).

- `hash` (the default): a keyed HMAC-SHA256 of the login name, so the same user counts once
  across sessions and days without the log naming anyone. The key lives in a file that is
  created with 32 random bytes and mode 0600 the first time the proxy starts; keep it to keep
  counts stable, delete it to unlink all past records from future ones.
- `plain`: the login name as the client sent it; past PLAIN_MAX octets, its first PLAIN_MAX and
  its length.
- `none`: nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from imapveil.settings_file import open_regular

IDENTITIES = ("hash", "plain", "none")
KEY_SIZE = 32
PLAIN_MAX = 256
"""Octets of a login name `plain` records: more than an address may be (RFC 5321: 64 for the
local part, 255 for the domain, in practice far less); a client could otherwise put a name as
long as a command line (64 KiB) into every record and statistics row of its session."""


def default_key_file() -> Path:
    """$STATE_DIRECTORY (set by systemd's StateDirectory=) or ~/.local/state/imapveil."""
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0]) / "user-key"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "imapveil" / "user-key"


def load_or_create_key(path: Path) -> bytes:
    """Read the key, or create it (0600, never overwriting) when the file does not exist."""
    try:
        with open_regular(path) as f:  # a named pipe is refused, not waited for
            key = f.read()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = secrets.token_bytes(KEY_SIZE)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first: use theirs
            return load_or_create_key(path)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return key
    if len(key) < 16:
        raise ValueError(f"{path}: the user key is too short ({len(key)} octets, need 16)")
    return key


def identifier(mode: str, key: bytes | None = None) -> Callable[[bytes], str | None]:
    if mode == "none":
        return _nobody
    if mode == "plain":
        return _plain
    if mode == "hash":
        if key is None:
            raise ValueError("user_identity = 'hash' needs a key")
        return _Hasher(key)
    raise ValueError(f"user_identity must be one of {', '.join(IDENTITIES)}, not {mode!r}")


def _nobody(_user: bytes) -> str | None:
    return None


def _plain(user: bytes) -> str | None:
    if len(user) <= PLAIN_MAX:
        return user.decode("utf-8", "backslashreplace")
    return f"{user[:PLAIN_MAX].decode('utf-8', 'backslashreplace')}…[{len(user)} octets]"


class _Hasher:
    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        self._key = key

    def __call__(self, user: bytes) -> str | None:
        # Login names are case-insensitive on practically every server: count "Alice" once.
        digest = hmac.new(self._key, user.lower(), hashlib.sha256).hexdigest()
        return "hmac:" + digest[:32]

    def __repr__(self) -> str:
        return "<user hasher>"
