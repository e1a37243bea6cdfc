"""One written form for a character of a client's text that cannot go somewhere as it is.

The statistics' outputs write an invisible or control character so (`charts.safe`), and the
store a character its PostgreSQL database's encoding lacks (`store.escaper`): `\\x1b` below
U+0100, `\\u20ac` in the Basic Multilingual Plane, `\\U0001f4e7` beyond it, hexadecimal digits in
lower case (the form of Python's `backslashreplace`). One form for a reader to learn.
"""

from __future__ import annotations


def escaped(text: str) -> str:
    """Each character of `text` as an escape (`\\x1b`, `\\u202e`, `\\U000e0041`)."""
    return "".join(_escape(ord(char)) for char in text)


def _escape(code: int) -> str:
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
