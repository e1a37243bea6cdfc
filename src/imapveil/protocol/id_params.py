"""RFC 2971 `ID` parameters: parse the list a client or server sent, and write one back.

    id_params_list ::= "(" #(string SPACE nstring) ")" / nil        (RFC 2971 §4)

`parse` takes the bytes after `ID ` (for a command) or `* ID ` (for a response), with any
literals inline exactly as they crossed the wire (`{N}` CRLF, then N octets), and the line end.
It accepts quoted strings with `\\"` and `\\\\` escapes, literals `{N}`, `{N+}` and `~{N}`, NIL
values, field names in any case and extra spaces, and raises only `IdSyntaxError`.

`serialize` writes pairs back as quoted strings, or as literals where a value cannot be quoted
(CR, LF, NUL or 8-bit octets); `{N+}` when the server accepts it, `{N}` otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from imapveil.rfc2971 import MAX_FIELD_LENGTH, MAX_FIELDS, MAX_VALUE_LENGTH, IdFields

__all__ = [
    "MAX_FIELDS",
    "MAX_FIELD_LENGTH",
    "MAX_LITERAL",
    "MAX_VALUE_LENGTH",
    "IdFields",
    "IdSyntaxError",
    "needs_literal",
    "parse",
    "quote",
    "serialize",
    "serialize_pieces",
]
_QUOTED_RUN = re.compile(rb'[^"\\\r\n]*')  # one class repeated: each run scanned once
MAX_LITERAL = 64 * 1024  # a literal inside ID is never bigger than this (bounded parse)


class IdSyntaxError(ValueError):
    """The ID arguments do not follow RFC 2971 §4. The message never quotes them."""


@dataclass(slots=True)
class _Reader:
    data: bytes
    pos: int = 0

    def spaces(self) -> None:
        while self.pos < len(self.data) and self.data[self.pos] in (0x20, 0x09):
            self.pos += 1

    def peek(self) -> int:
        return self.data[self.pos] if self.pos < len(self.data) else -1

    def expect(self, char: bytes) -> None:
        if self.data[self.pos : self.pos + 1] != char:
            raise IdSyntaxError(f"expected {char.decode()!r} at offset {self.pos}")
        self.pos += 1

    def nstring(self) -> bytes | None:
        data, pos = self.data, self.pos
        if data[pos : pos + 3].upper() == b"NIL" and not _atom_char(data, pos + 3):
            self.pos = pos + 3
            return None
        return self.string()

    def string(self) -> bytes:
        c = self.peek()
        if c == 0x22:  # '"'
            return self._quoted()
        if c in (0x7B, 0x7E):  # '{' or '~{'
            return self._literal()
        raise IdSyntaxError(f"expected a string at offset {self.pos}")

    def _quoted(self) -> bytes:
        data = self.data
        out = bytearray()
        i = self.pos + 1
        n = len(data)
        while True:
            # Up to the next quote, backslash or line end, in one step (a loop an octet at a
            # time cost ~8 ms of the shared loop for an ID of 62 KB of names).
            run = _QUOTED_RUN.match(data, i)
            assert run is not None  # `*`: matches, if only nothing
            out += run.group()
            i = run.end()
            if i >= n:
                raise IdSyntaxError("unterminated quoted string")
            c = data[i]
            if c == 0x5C:  # backslash: only \" and \\ are escapes (RFC 9051 quoted-specials)
                if i + 1 < n and data[i + 1] in (0x22, 0x5C):
                    out.append(data[i + 1])
                    i += 2
                    continue
                raise IdSyntaxError(f"bad escape at offset {i}")
            if c == 0x22:
                self.pos = i + 1
                return bytes(out)
            raise IdSyntaxError(f"line end inside a quoted string at offset {i}")

    def _literal(self) -> bytes:
        data = self.data
        pos = self.pos + (1 if data[self.pos] == 0x7E else 0)
        if data[pos : pos + 1] != b"{":
            raise IdSyntaxError(f"expected a literal at offset {pos}")
        close = data.find(b"}", pos, pos + 24)
        if close < 0:
            raise IdSyntaxError(f"unterminated literal length at offset {pos}")
        digits = data[pos + 1 : close]
        if digits.endswith((b"+", b"-")):
            digits = digits[:-1]
        if not digits or len(digits) > 20 or not digits.isdigit() or not digits.isascii():
            raise IdSyntaxError(f"bad literal length at offset {pos}")
        size = int(digits)
        if size > MAX_LITERAL:
            raise IdSyntaxError(f"literal of {size} octets is too large")
        start = close + 1
        if data[start : start + 2] == b"\r\n":
            start += 2
        elif data[start : start + 1] == b"\n":
            start += 1
        else:
            raise IdSyntaxError(f"no line end after literal length at offset {start}")
        if start + size > len(data):
            raise IdSyntaxError("literal is cut short")
        self.pos = start + size
        return data[start : start + size]


def _atom_char(data: bytes, pos: int) -> bool:
    return pos < len(data) and data[pos] not in b" \t\r\n()"


def parse(args: bytes) -> IdFields:
    """Parse `(...)` or `NIL`, followed only by spaces and the line end."""
    r = _Reader(args)
    r.spaces()
    if r.data[r.pos : r.pos + 3].upper() == b"NIL" and not _atom_char(r.data, r.pos + 3):
        r.pos += 3
        fields: IdFields = None
    else:
        r.expect(b"(")
        pairs: list[tuple[bytes, bytes | None]] = []
        r.spaces()
        while r.peek() != 0x29:  # ')'
            if pairs:
                if r.peek() not in (0x20, 0x09):
                    raise IdSyntaxError(f"expected a space at offset {r.pos}")
                r.spaces()
                if r.peek() == 0x29:
                    break
            name = r.string()
            if r.peek() not in (0x20, 0x09):
                raise IdSyntaxError(f"expected a space after a field name at offset {r.pos}")
            r.spaces()
            pairs.append((name, r.nstring()))
            if len(pairs) > 4 * MAX_FIELDS:  # far beyond the RFC: not an ID we will follow
                raise IdSyntaxError("too many fields")
        r.expect(b")")
        fields = tuple(pairs)
    r.spaces()
    if r.data[r.pos :] not in (b"", b"\r\n", b"\n"):
        raise IdSyntaxError(f"unexpected data after the list at offset {r.pos}")
    return fields


def needs_literal(value: bytes) -> bool:
    """A value that a quoted string cannot carry (RFC 9051 QUOTED-CHAR is 7-bit, no CR/LF/NUL)."""
    return any(c in (0x00, 0x0A, 0x0D) or c > 0x7F for c in value)


def quote(value: bytes) -> bytes:
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def serialize(fields: IdFields, *, literal_plus: bool) -> bytes:
    """The argument list as bytes (no leading space, no line end).

    A value that needs a literal is written `{N+}` CRLF value when `literal_plus`, else `{N}`
    CRLF value (the caller must then drive the server's continuations).
    """
    if fields is None:
        return b"NIL"
    parts = []
    for name, value in fields:
        parts.append(_string(name, literal_plus))
        parts.append(b"NIL" if value is None else _string(value, literal_plus))
    return b"(" + b" ".join(parts) + b")"


def _string(value: bytes, literal_plus: bool) -> bytes:
    if needs_literal(value):
        return b"{%d%s}\r\n%s" % (len(value), b"+" if literal_plus else b"", value)
    return quote(value)


def serialize_pieces(fields: IdFields) -> list[bytes]:
    """The list for a server without LITERAL+: each piece but the last ends with `{N}` CRLF.

    The caller sends a piece, waits for the server's "+", then sends the next (RFC 9051 §7.5).
    """
    if fields is None:
        return [b"NIL"]
    pieces = [bytearray(b"(")]
    for i, (name, value) in enumerate(fields):
        for j, item in enumerate((name, value)):
            if i or j:
                pieces[-1] += b" "
            if item is None:
                pieces[-1] += b"NIL"
            elif needs_literal(item):
                pieces[-1] += b"{%d}\r\n" % len(item)
                pieces.append(bytearray(item))
            else:
                pieces[-1] += quote(item)
    pieces[-1] += b")"
    return [bytes(p) for p in pieces]
