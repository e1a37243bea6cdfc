"""The one-match answer's CLOSED and BYE (a73b495, 196d1ce) attacked at every split (attack8):
a server chunk with them, cut in two or three receives at every position, read by a core with
the one-match paths and one without, gives the same actions, state, records and end."""

from __future__ import annotations

from typing import Any

import pytest

from imapveil.protocol.responses import Responses
from imapveil.protocol.session import CoreConfig, SessionCore
from tests.protocol.test_simple import GREETING, GeneralCore, _seen, _state

CHUNKS = [
    b"* OK [CLOSED] Previous mailbox closed.\r\n* 0 EXISTS\r\nn OK [READ-WRITE] done\r\n",
    b"* OK [CLOSED] a\r\n* BYE b\r\nn OK done\r\n",
    b"* BYE b\r\n* OK [CLOSED] a\r\nn OK done\r\n",
    b"* BYE [ALERT] going\r\n* 2 EXISTS\r\nn NO done\r\n",
    b"* BYE Logging out\r\nq OK Logout completed.\r\n",
    b'* 1 FETCH (X "* BYE ")\r\n* OK [CLOSED]\nn OK done\n',
]
"""What the server says after `n NOOP` and `q LOGOUT` (pipelined; `q` is answered later if
not here), with a mailbox selected."""

AFTER = b"a NOOP\r\nb FETCH 1 (FLAGS)\r\n"
"""What the client says after the chunk: recorded in the state the chunk left."""


def _run(kind: type[SessionCore], pieces: list[bytes]) -> list[Any]:
    core = kind(CoreConfig(), session_id="s", client="c", upstream="u", now=0.0)
    seen: list[Any] = []
    for side, chunk in [
        ("s", GREETING),
        ("c", b"l LOGIN u p\r\n"),
        ("s", b"l OK done\r\n"),
        ("c", b"s SELECT INBOX\r\n"),
        ("s", b"* 1 EXISTS\r\ns OK [READ-WRITE] done\r\n"),
        ("c", b"n NOOP\r\n"),
        ("c", b"q LOGOUT\r\n"),
        *(("s", piece) for piece in pieces),
        ("c", AFTER),
        ("s", b"q OK late\r\n"),
    ]:
        feed = core.feed_client if side == "c" else core.feed_server
        seen.append(_seen(feed(chunk, 1.0)))
        seen.append(_state(core))
    seen.append(_seen(core.server_closed(2.0)))
    return seen


def _splits(chunk: bytes) -> list[list[bytes]]:
    n = len(chunk)
    two = [[chunk[:i], chunk[i:]] for i in range(1, n)]
    three = [[chunk[:i], chunk[i:j], chunk[j:]] for i in range(1, n, 3) for j in range(i + 1, n, 3)]
    return [[chunk], *two, *three]


@pytest.mark.parametrize("chunk", CHUNKS)
def test_closed_and_bye_at_every_split(chunk: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cut anywhere, a line boundary leaves the rest a one-match candidate (a BYE after a CLOSED
    read by the general path, say): both cores act, end and record alike."""
    taken: list[bytes] = []
    simple = Responses.simple

    def took(responses: Responses, line: bytes) -> bool:
        if simple(responses, line):
            taken.append(line)
            return True
        return False

    monkeypatch.setattr(Responses, "simple", took)
    for pieces in _splits(chunk):
        assert _run(SessionCore, pieces) == _run(GeneralCore, pieces), pieces
    # The comparison compares something: pieces with CLOSED or BYE went the one-match way.
    assert [t for t in taken if b"[CLOSED]" in t or b"* BYE" in t]
