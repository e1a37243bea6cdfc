"""Where records go. A sink's `emit` never blocks the relay."""

from __future__ import annotations

from typing import Protocol

from imapveil.records import Record


class Sink(Protocol):
    def emit(self, record: Record) -> None: ...


class MemorySink:
    """Keeps records in a list; for tests and for embedding."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def emit(self, record: Record) -> None:
        self.records.append(record)


class Fanout:
    """Every record to every sink, in order."""

    def __init__(self, *sinks: Sink) -> None:
        self.sinks = sinks

    def emit(self, record: Record) -> None:
        for sink in self.sinks:
            sink.emit(record)
