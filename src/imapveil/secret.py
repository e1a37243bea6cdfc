"""A wrapper for credential-bearing bytes that never shows them.

Anything that may hold a password, a SASL response or a token is wrapped in `Secret` the
moment it is cut out of the stream. Its repr and str are redacted, it refuses to be pickled or
formatted, and it compares in constant time, so an accidental log call, exception message or
debugger print shows only its length.
"""

from __future__ import annotations

import hmac
from typing import NoReturn


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = bytes(value)

    def reveal(self) -> bytes:
        """The wrapped bytes. Call only where they are used, never to log them."""
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return f"Secret(<redacted {len(self._value)} octets>)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(len(self._value))

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled")
