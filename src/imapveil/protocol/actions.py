"""What the protocol core asks its shell to do.

Actions are values: made by the core, read once by the shell, never changed. They are not
`frozen` dataclasses only because a frozen one costs five times as much to make (each field is
set through `object.__setattr__`), and the core makes two or three per command.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from imapveil.records import Record


class Direction(enum.Enum):
    """Where bytes travel. Named by destination, so `TO_SERVER` is what the client sent."""

    TO_SERVER = "to_server"
    TO_CLIENT = "to_client"


@dataclass(slots=True)
class Forward:
    """Relay bytes that a peer sent, unchanged, to the other peer."""

    direction: Direction
    data: bytes | memoryview

    def __repr__(self) -> str:  # the bytes may carry credentials: never show them
        return f"Forward({self.direction.name}, <{len(self.data)} octets>)"


@dataclass(slots=True)
class Reply:
    """Bytes the proxy itself says to a peer (a `* BYE`, a continuation)."""

    direction: Direction
    data: bytes


@dataclass(slots=True)
class Emit:
    """Hand a record to the sinks."""

    record: Record


@dataclass(frozen=True, slots=True)
class Close:
    """Close both legs once every earlier action is done."""

    reason: str


@dataclass(frozen=True, slots=True)
class StartTls:
    """Run a TLS handshake on the leg toward `direction`'s peer (after every earlier action);
    the leg carries TLS from then on. Only the client leg today (STARTTLS, RFC 9051 §6.2.1)."""

    direction: Direction


@dataclass(frozen=True, slots=True)
class StartCompress:
    """Switch the leg to raw DEFLATE both ways (COMPRESS=DEFLATE, RFC 4978)."""

    direction: Direction


Action = Forward | Reply | Emit | Close | StartTls | StartCompress
