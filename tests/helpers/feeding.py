"""Drive a `SessionCore` the three ways every core test uses: whole, byte by byte, random chunks.

A `Conversation` feeds one side's bytes at a time, split as the chosen `Splitter` says, and
collects what the core asks for: the bytes forwarded and replied in each direction, the records,
and whether (and why) it closed. Tests then assert which input produced which output, in the
spirit of mitmproxy's Playbook tests.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from imapveil.protocol.actions import Action, Close, Direction, Emit, Forward, Reply
from imapveil.protocol.session import CoreConfig, SessionCore
from imapveil.records import Record, SessionEnded

Splitter = Callable[[bytes], Iterator[bytes]]
R = TypeVar("R", bound=Record)


def whole(data: bytes) -> Iterator[bytes]:
    if data:
        yield data


def byte_by_byte(data: bytes) -> Iterator[bytes]:
    for i in range(len(data)):
        yield data[i : i + 1]


def random_chunks(seed: int) -> Splitter:
    """Cut at random points; the same seed gives the same cuts, so failures reproduce."""
    rng = random.Random(seed)

    def split(data: bytes) -> Iterator[bytes]:
        pos = 0
        while pos < len(data):
            size = rng.randint(1, rng.choice((2, 5, 17, 300, 5000)))
            yield data[pos : pos + size]
            pos += size

    return split


def splitting_at(cuts: list[int]) -> Splitter:
    """Split at the given offsets (as Hypothesis draws them), modulo the data's length."""

    def split(data: bytes) -> Iterator[bytes]:
        if not data:
            return
        points = sorted({c % len(data) for c in cuts} - {0})
        last = 0
        for cut in [*points, len(data)]:
            yield data[last:cut]
            last = cut

    return split


SPLITTERS: dict[str, Splitter] = {
    "whole": whole,
    "bytes": byte_by_byte,
    "random": random_chunks(20261124),
}


@dataclass
class Conversation:
    split: Splitter
    config: CoreConfig = field(default_factory=CoreConfig)
    clock: float = 1000.0
    to_server: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)
    from_client: bytearray = field(default_factory=bytearray)  # everything each peer sent
    from_server: bytearray = field(default_factory=bytearray)
    forwarded_to_server: bytearray = field(default_factory=bytearray)
    forwarded_to_client: bytearray = field(default_factory=bytearray)
    replies: list[Reply] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    closed: str | None = None
    core: SessionCore = field(init=False)

    def __post_init__(self) -> None:
        self.core = SessionCore(
            self.config,
            session_id="s1",
            client="127.0.0.1:50000",
            upstream="127.0.0.1:143",
            now=self.clock,
        )
        self._apply(self.core.start())

    def tick(self, seconds: float) -> None:
        self.clock += seconds

    def client(self, data: bytes) -> Conversation:
        self.from_client += data
        for chunk in self.split(data):
            self._apply(self.core.feed_client(chunk, self.clock))
            self._backlog()
        return self

    def server(self, data: bytes) -> Conversation:
        self.from_server += data
        for chunk in self.split(data):
            self._apply(self.core.feed_server(chunk, self.clock))
            self._backlog()
        return self

    def _backlog(self) -> None:
        """What the peers sent that waits to be read (a turn was over), read on as the shell
        does once the other sessions have run."""
        core = self.core
        while core.server_backlog or core.client_backlog:
            if core.server_backlog:
                self._apply(core.resume_server(self.clock))
            else:
                self._apply(core.resume_client(self.clock))

    def play(self, steps: Iterable[tuple[str, bytes]]) -> Iterator[None]:
        """Feed ("c" | "s", bytes) steps in order, pausing after each for the caller's checks."""
        for side, data in steps:
            if side == "c":
                self.client(data)
            else:
                self.server(data)
            yield

    def client_closes(self) -> Conversation:
        self._apply(self.core.client_closed(self.clock))
        self._apply(self.core.finish(self.clock))
        return self

    def server_closes(self) -> Conversation:
        self._apply(self.core.server_closed(self.clock))
        self._apply(self.core.finish(self.clock))
        return self

    def finish(self) -> Conversation:
        self._apply(self.core.finish(self.clock))
        return self

    def apply(self, actions: list[Action]) -> Conversation:
        self._apply(actions)
        return self

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case Forward(direction=Direction.TO_SERVER, data=data):
                    assert self.closed is None, "forwarded after Close"
                    self.to_server += data
                    self.forwarded_to_server += data
                case Forward(direction=Direction.TO_CLIENT, data=data):
                    assert self.closed is None, "forwarded after Close"
                    self.to_client += data
                    self.forwarded_to_client += data
                case Reply(direction=direction, data=data):
                    assert self.closed is None, "replied after Close"
                    self.replies.append(action)
                    if direction is Direction.TO_CLIENT:
                        self.to_client += data
                    else:
                        self.to_server += data
                case Emit(record=record):
                    self.records.append(record)
                case Close(reason=reason):
                    assert self.closed is None, "closed twice"
                    self.closed = reason

    def of(self, kind: type[R]) -> list[R]:
        """The records of one kind, in order."""
        return [r for r in self.records if isinstance(r, kind)]

    def ended(self) -> SessionEnded:
        """The session's end record (there is exactly one once it has finished)."""
        (end,) = self.of(SessionEnded)
        return end


def talk(split: Splitter, greeting: bytes | None = None, **config: Any) -> Conversation:
    """A conversation with a core configured so, after the server's greeting if one is given.

    Test modules bind their greeting and defaults with functools.partial."""
    conversation = Conversation(split, CoreConfig(**config))
    return conversation.server(greeting) if greeting is not None else conversation
