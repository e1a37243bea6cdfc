"""The ID exchanges in ../shared/corpus/id-exchanges.txt (LABEL TAB DIRECTION TAB BYTES)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# A copy of ../shared/corpus/id-exchanges.txt, so that a clone of this repository is complete.
CORPUS = Path(__file__).resolve().parents[1] / "data" / "id-exchanges.txt"


@dataclass(frozen=True)
class Row:
    label: str
    direction: str  # "C" or "S"
    data: bytes  # the exact line, CRLF included

    @property
    def args(self) -> bytes:
        """What follows `tag ID ` or `* ID `."""
        head, _, rest = self.data.partition(b" ID ")
        assert head
        return rest


def _unescape(text: str) -> bytes:
    out = text.replace("\\r\\n", "\r\n").replace("\\\\", "\\").encode("utf-8")
    return out if out.endswith(b"\r\n") else out + b"\r\n"


def rows() -> list[Row]:
    found = []
    for line in CORPUS.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        label, direction, data = line.split("\t", 2)
        found.append(Row(label, direction, _unescape(data)))
    return found
