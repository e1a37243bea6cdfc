"""What an error message shows of the input it is about: bounded, and said to be cut.

A configuration, policy or label file may hold a key or value of megabytes (a file filled by
mistake, or by whoever may write it); its error goes to stderr at start, and at a reload to the
log and into the event log's `config` and `policy` records. Each quotes at most `MAX_SHOWN`
characters of what it is about, and no message is longer than `MAX_MESSAGE`.
"""

from __future__ import annotations

MAX_SHOWN = 200
"""Characters of one key, value or file name an error message quotes."""
MAX_MESSAGE = 2000
"""Characters of an error message at most (a second line of defence: what it quotes is cut
first)."""


def shown(text: str, limit: int = MAX_SHOWN) -> str:
    """`text`, or its first `limit` characters and how many more there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…[{len(text) - limit} more characters]"


def quoted(text: str, limit: int = MAX_SHOWN) -> str:
    """`repr(text)`, of its first `limit` characters only when it is longer."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}…[{len(text) - limit} more characters]"


def bounded(message: str, limit: int = MAX_MESSAGE) -> str:
    """`message` with its middle cut out if it is longer than `limit`: its start says what
    and where, its end why."""
    if len(message) <= limit:
        return message
    head, tail = limit * 3 // 4, limit // 4
    return f"{message[:head]}…[{len(message) - head - tail} characters left out]…{message[-tail:]}"
