"""A session row's digest made with one JSON encoder for all calls (49d540d), attacked
(attack6): any row a session or a spool read back can hold (text with any code point, lone
surrogates, separators, NaN and infinities, big integers, None) gives the digest the
per-call `json.dumps` gave, also from many threads at once (rows are written from worker
threads; two stores in one process share the encoder)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from imapveil.stats.store import digest

VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(),
    st.text(alphabet=st.sampled_from(["\u2028", "\u2029", "\x00", '"', "\\", "\ud800", "é"])),
)
ROWS = st.lists(VALUES, min_size=0, max_size=20).map(tuple)


def comparable(row: Sequence[Any]) -> str | type[BaseException]:
    try:
        return digest(row)
    except BaseException as exc:  # a lone surrogate cannot be encoded: the same error as before
        return type(exc)


def before(row: Sequence[Any]) -> str | type[BaseException]:
    """What every version before 49d540d computed (or the error it raised)."""
    try:
        text = json.dumps(list(row), separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()[:32]
    except BaseException as exc:
        return type(exc)


@settings(max_examples=400, deadline=None)
@given(ROWS)
def test_any_row_has_the_digest_it_always_had(row: tuple[Any, ...]) -> None:
    assert comparable(row) == before(row)


def test_rows_digested_in_many_threads_at_once_have_their_own_digests() -> None:
    rows = [(f"s{i}", "p", "x" * (i % 300), i, float(i) / 7, None, "é\u2028" * (i % 5))
            for i in range(2000)]  # fmt: skip
    expected = [before(r) for r in rows]
    results: dict[int, list[str]] = {}

    def work(k: int) -> None:
        results[k] = [digest(r) for r in rows]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[k] == expected for k in range(8))
