"""The few pieces of IMAP grammar the core needs (RFC 9051 §9, RFC 3501 §9).

These functions look at one line fragment at a time (bytes ending in LF, CR optional) and never
at literal bodies. They are deliberately forgiving: the server is the authority on syntax, the
proxy only needs to know enough to follow the conversation.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

# RFC 9051: atom-specials are "(" / ")" / "{" / SP / CTL / list-wildcards / quoted-specials /
# resp-specials. An ASTRING-CHAR is an ATOM-CHAR or "]"; a tag is ASTRING-CHARs except "+".
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]') | frozenset(range(0x20)) | {0x7F}
ATOM_CHARS = frozenset(range(0x21, 0x7F)) - _ATOM_SPECIALS
ASTRING_CHARS = ATOM_CHARS | {ord("]")}
# Not "]" either, though the grammar allows it: Dovecot refuses such a tag with an untagged BAD,
# so a command the proxy took with it would wait for an answer that never comes (behind its
# literal's "+", or an ID's). The proxy refuses it as Dovecot does.
TAG_CHARS = ATOM_CHARS - {ord("+")}


def _char_class(chars: frozenset[int]) -> bytes:
    """A regular-expression character class of exactly these octets."""
    return b"[" + b"".join(re.escape(bytes([c])) for c in sorted(chars)) + b"]"


# The same sets as patterns: a match runs in C, where a per-octet test in Python costs about a
# microsecond per line on the relay's hot path.
ATOM_CLASS = _char_class(ATOM_CHARS)
"""An atom character, as a pattern."""
_ATOM = re.compile(ATOM_CLASS + b"*+")
_ASTRING_ATOM = re.compile(_char_class(ASTRING_CHARS) + b"++")
_QUOTED = re.compile(rb'"((?:[^"\\\r\n]++|\\[\s\S])*+)"')
"""A quoted string: any octet but a quote, a backslash and a line end, or a backslash and any
octet (undone by `_ESCAPED`)."""
_ESCAPED = re.compile(rb"\\([\s\S])")
MAX_TAG = 126
"""The longest tag taken: Dovecot's login process answers a longer one (its IMAP_TAG_MAX_LEN)
with an untagged BAD, never with the tag, so a command the proxy took with it would wait for an
answer that never comes (behind its literal's "+", an ID's). No client needs more."""
TAG_PATTERN = b"(" + _char_class(TAG_CHARS) + b"{1,%d}+)" % MAX_TAG
"""A tag as a group of a pattern."""
_TAG = re.compile(TAG_PATTERN)

# A literal's length has at most 20 digits: 2**64 - 1 has 20 (RFC 9051 number64 is 63 bits).
MAX_LITERAL_DIGITS = 20
MAX_LITERAL_SIZE = 2**63 - 1


class LiteralError(ValueError):
    """A literal announcement that cannot be honoured (too many digits, too large)."""


@dataclass(frozen=True, slots=True)
class LiteralAnnouncement:
    """`{N}` (synchronizing), `{N+}` (non-synchronizing, LITERAL+/-) or `~{N}` (literal8)."""

    size: int
    synchronizing: bool
    binary: bool


def strip_eol(line: bytes) -> bytes:
    if line.endswith(b"\r\n"):
        return line[:-2]
    if line.endswith(b"\n"):
        return line[:-1]
    return line


def literal_at_end(line: bytes) -> LiteralAnnouncement | None:
    """The literal announced at the end of a line fragment, if any.

    Raises LiteralError when the line ends with something that is shaped like a literal but has
    more than 20 digits: the octet count cannot be trusted, so the stream cannot be followed.
    """
    body = strip_eol(line)
    if not body.endswith(b"}"):
        return None
    open_at = body.rfind(b"{")
    if open_at < 0:
        return None
    inner = body[open_at + 1 : -1]
    synchronizing = True
    if inner.endswith(b"+"):
        synchronizing = False
        inner = inner[:-1]
    if not inner or not inner.isdigit() or not inner.isascii():
        return None
    if len(inner) > MAX_LITERAL_DIGITS:
        raise LiteralError("literal length has too many digits")
    size = int(inner)
    if size > MAX_LITERAL_SIZE:
        raise LiteralError("literal length is too large")
    binary = open_at > 0 and body[open_at - 1 : open_at] == b"~"
    return LiteralAnnouncement(size, synchronizing, binary)


def split_tag(line: bytes) -> tuple[bytes, bytes] | None:
    """(tag, rest) of a command or tagged response line, or None if it does not start so."""
    sp = line.find(b" ")
    if sp <= 0 or not is_tag(line, 0, sp):
        return None
    return line[:sp], line[sp + 1 :]


def is_tag(data: bytes, start: int, end: int) -> bool:
    """Whether data[start:end] is a tag: one to MAX_TAG tag characters."""
    m = _TAG.match(data, start, end)
    return m is not None and m.end() == end  # at most MAX_TAG octets: the pattern's bound


def read_atom(data: bytes, pos: int, limit: int = 64) -> tuple[bytes, int]:
    """The atom starting at pos (maybe empty) and the position after it."""
    if pos >= len(data):
        return b"", pos
    m = _ATOM.match(data, pos, pos + limit)
    assert m is not None  # the pattern matches the empty string
    return m.group(), m.end()


def read_astring(data: bytes, pos: int, limit: int | None = None) -> tuple[bytes, int] | None:
    """An atom, or a quoted string with its escapes undone, starting at pos: its first `limit`
    octets (all if None), and where it ends.

    Returns None for anything else (a literal, a syntax error): the caller decides.
    """
    if pos >= len(data):
        return None
    # Patterns, not a loop over octets: a 64 KiB quoted mailbox cost 11 ms of the event loop.
    if data[pos] == ord('"'):
        m = _QUOTED.match(data, pos)
        if m is None:
            return None
        value = m.group(1)
        if b"\\" in value:
            # An escape is two octets: the first 2 * limit hold the first `limit` undone.
            # (Split, each escaped octet a piece of its own, and joined: a substitution costs
            # a template's expansion per escape, ten times as much.)
            value = b"".join(_ESCAPED.split(value if limit is None else value[: 2 * limit]))
        return value[:limit], m.end()
    m = _ASTRING_ATOM.match(data, pos)
    return None if m is None else (m.group()[:limit], m.end())


STATUS_NAMES = {s: s.decode() for s in (b"OK", b"NO", b"BAD", b"BYE", b"PREAUTH")}
"""One string for each status, shared (the records and the statistics keep it)."""


def status_and_code(rest: bytes) -> tuple[str | None, str | None, bytes]:
    """For `OK [CODE ...] text` (after the tag or `* `): status, code atom, and the code's args."""
    status, pos = read_atom(rest, 0, 8)
    st = STATUS_NAMES.get(status.upper())
    if st is None:
        return None, None, b""
    if rest[pos : pos + 2] != b" [":
        return st, None, b""
    code, cpos = read_atom(rest, pos + 2, 64)
    if not code:
        return st, None, b""
    close = rest.find(b"]", cpos)
    args = rest[cpos + 1 : close] if close > cpos else b""
    return st, code.upper().decode("ascii"), args


CAPABILITY_CACHE_SIZE = 32
"""Distinct capability lists remembered (a server sends a few: before and after login, TLS)."""
MAX_CAPABILITIES = 256
"""Names of a capability list kept, at most (Dovecot lists about 40): a server's list of 64 KB
of distinct names would otherwise leave a set of 16,000 in each of its sessions."""
CAPABILITY_CACHE_TEXT = 2048
"""Longer lists are parsed every time and not kept: what the cache holds stays small (about
CAPABILITY_CACHE_SIZE times a few tens of KiB at most) whatever a server sends."""


def capabilities(args: bytes) -> frozenset[str]:
    """Capability names from the text after `CAPABILITY`, upper-cased.

    The same server sends the same list to every session: the parsed set (immutable) is shared
    by them instead of each session keeping its own copy (about 4 KiB for Dovecot's list).
    """
    if len(args) > CAPABILITY_CACHE_TEXT:
        return _capabilities(args)
    return _cached_capabilities(args)


def _capabilities(args: bytes) -> frozenset[str]:
    names = strip_eol(args).split(None, MAX_CAPABILITIES)[:MAX_CAPABILITIES]
    return frozenset(a.upper().decode("ascii", "replace") for a in names if len(a) <= 128)


_cached_capabilities = functools.lru_cache(maxsize=CAPABILITY_CACHE_SIZE)(_capabilities)
