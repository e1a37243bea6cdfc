"""What the protocol core asks its shell to do."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from imapveil.records import Record


class Direction(enum.Enum):
    """Where bytes travel. Named by destination, so `TO_SERVER` is what the client sent."""

    TO_SERVER = "to_server"
    TO_CLIENT = "to_client"


@dataclass(frozen=True, slots=True)
class Forward:
    """Relay bytes that a peer sent, unchanged, to the other peer."""

    direction: Direction
    data: bytes | memoryview

    def __repr__(self) -> str:  # the bytes may carry credentials: never show them
        return f"Forward({self.direction.name}, <{len(self.data)} octets>)"


@dataclass(frozen=True, slots=True)
class Reply:
    """Bytes the proxy itself says to a peer (a `* BYE`, a continuation)."""

    direction: Direction
    data: bytes


@dataclass(frozen=True, slots=True)
class Emit:
    """Hand a record to the sinks."""

    record: Record


@dataclass(frozen=True, slots=True)
class Close:
    """Close both legs once every earlier action is done."""

    reason: str


Action = Forward | Reply | Emit | Close
