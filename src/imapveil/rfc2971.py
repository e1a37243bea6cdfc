"""RFC 2971 `ID` fields and the limits the RFC sets, shared by `protocol/` (which parses and
writes them) and `policy/` (which decides what of them goes on). Below both packages, so that
neither imports the other."""

from __future__ import annotations

IdFields = tuple[tuple[bytes, bytes | None], ...] | None
"""Field/value pairs in the order sent, or None for `NIL`."""

MAX_FIELDS = 30  # RFC 2971 §3.3: at most 30 field-value pairs
MAX_FIELD_LENGTH = 30  # field strings at most 30 octets
MAX_VALUE_LENGTH = 1024  # value strings at most 1024 octets
