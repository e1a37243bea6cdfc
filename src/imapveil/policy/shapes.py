"""What a kept value must look like to be kept: named shapes and safe patterns.

Detectors recognise identifiers they know; a shape works the other way round and says what a
field's value looks like in real clients, so that what the detectors do not know is not kept
either: a `version` is "16.0 (3731.600.7)" or "21B101", not "a4c3f0851b2e" nor "alice@localhost".

Every check here runs in time linear in the value and looks at no more than RFC 2971 §3.3 lets
a value be (1024 octets): values come from the network and are checked on the event loop.

A policy names a shape (`shape = "version"`) or writes a pattern (`shape = '^[a-z]{1,20}$'`) in a
small regular-expression subset that cannot backtrack (see `compile_pattern`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from imapveil.policy.detectors import dotted_quads, groups, written_address
from imapveil.rfc2971 import MAX_VALUE_LENGTH
from imapveil.shown import quoted

_DIGITS = b"0123456789"
_LETTERS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ALNUM = _LETTERS + _DIGITS
_WORD = re.compile(rb"[A-Za-z0-9]+")  # one class, repeated: each run is scanned once
_HUMP = re.compile(rb"[a-z][A-Z]")  # fixed width


class ShapeError(ValueError):
    """A policy's shape is unknown or not a safe pattern; the message says why."""


@dataclass(frozen=True, slots=True)
class Shape:
    name: str  # a named shape, or the pattern as written
    check: Callable[[bytes], bool]

    def fits(self, value: bytes) -> bool:
        # The length test comes first: nothing longer than the RFC allows is examined.
        return len(value) <= MAX_VALUE_LENGTH and self.check(value)


def _only(value: bytes, allowed: bytes) -> bool:
    return not value.translate(None, allowed)


def _count(value: bytes, octets: bytes) -> int:
    return len(value) - len(value.translate(None, octets))


def _label_word(word: bytes) -> bool:
    """A word of a program's, vendor's or system's name: "Thunderbird", "Imap4Server", "2016".

    Device ids, hashes and tokens are long runs of digits mixed with letters, or of letters whose
    case keeps changing; names are words, at most a year's worth of digits in one.
    """
    return (
        len(word) <= 32
        and _count(word, _DIGITS) <= 4
        and len(_HUMP.findall(word)) <= 4
        and not _serial(word)
    )


_HEX = _DIGITS + b"abcdef"
_KIND = bytes.maketrans(_DIGITS + _LETTERS, b"1" * 10 + b"0" * 52)  # digit 1, letter 0


def _serial(word: bytes) -> bool:
    """A device's serial number: "C02XK1ZTJGH5", "H4V9K2P7QX", "R58M12ABCDE". Ten or more
    capitals and digits, at least one digit and two capitals, no small letter: random ones of
    ten have three digits on average, which a name's or a version's word may have.

    Or one in small or mixed letters ("c02xk1ztjgh5", "C02xK1ztJGH5"): ten or more letters and
    digits, two digits or more, and letters and digits taking turns four times or more, which
    "Imap4Server" or "thunderbird115" do not; not hex digits alone (a hash: "7e2e900c1a")."""
    if len(word) < 10:
        return False
    digits = _count(word, _DIGITS)
    if word.isupper():  # isupper: a capital, and no small letter
        return digits >= 1 and len(word) - digits >= 2
    if _only(word.lower(), _HEX) or digits < 2:
        return False
    kinds = word.translate(_KIND)
    return kinds.count(b"01") + kinds.count(b"10") >= 4


def _mixed(word: bytes) -> bool:
    return 0 < _count(word, _DIGITS) < len(word)


def _grouped_serial(value: bytes) -> bool:
    """A serial number in groups: "C02X-K1ZT-JGH5", "C02X K1ZT JGH5", "R58M_12AB+CDE". Words of
    capitals and digits, each with a capital, joined by up to three octets other than a dot,
    which together are a `_serial` and of which two or more mix letters and digits ("HUAWEI P30
    PRO" has one). Not dots: "TQ3A.230805.001" is an Android build, a version. One pass."""
    for words, gaps in groups(value, 3):
        run: list[bytes] = []
        for i, word in enumerate((*words, b"")):
            if run and not (word.isupper() and b"." not in gaps[i - 1]):
                if len(run) > 1 and sum(map(_mixed, run)) > 1 and _serial(b"".join(run)):
                    return True
                run = []
            if word.isupper():  # a capital, no small letter: "C02X", not "9" ("9.0.1 FP10")
                run.append(word)
    return False


def label_words(value: bytes) -> bool:
    """Every word of `value` could be a word of a name (`_label_word`), and no serial number is
    there in groups: what the records may show of a field's name, whatever its punctuation."""
    return all(_label_word(w) for w in _WORD.findall(value)) and not _grouped_serial(value)


def _label(value: bytes, longest: int, punctuation: bytes) -> bool:
    return (
        0 < len(value) <= longest
        and _only(value, _ALNUM + punctuation)
        and value[:1].isalnum()
        and _count(value, _LETTERS) > 0
        and all(_label_word(w) for w in _WORD.findall(value))
        and not _grouped_serial(value)
    )


_NAME_PUNCTUATION = b" .-_+()/&',"


def name(value: bytes) -> bool:
    """A program's or vendor's name: "Mac OS X Mail", "com.apple.email.maild", "Apple Inc."."""
    return _label(value, 64, _NAME_PUNCTUATION)


def os(value: bytes) -> bool:
    """A system: "Mac OS X", "iOS", "android"; it starts with a letter, so it is no address. No
    brackets: what clients put in them is a device model ("iOS 17.1 (iPhone15)"), which the
    `os` rule's coarsening cuts off."""
    return value[:1].isalpha() and _label(value, 32, b" .-_/")


def version(value: bytes) -> bool:
    """A version: "16.0 (3731.600.7)", "21B101", "13; TQ3A.230805.001", "20230322-18-a8bdba".

    Words with digits are at most 10 octets (builds and dates: "3731", "230805", "20230322"); a MAC
    address without separators is 12, an IMEI 15. No colon or at sign, so no IPv6 address, MAC
    with colons or e-mail address fits. A four-part number fits at the head ("7.2.25.230", a
    version), nowhere else: "16.0 (198.51.100.7)" holds an address beside its version. Nor does
    an address written otherwise ("ip-198-51-100-7", "2001-db8--7": `written_address`).
    """
    if not (
        0 < len(value) <= 64
        and _only(value, _ALNUM + b" .-_+~();,/")
        and value[:1].isalnum()
        and _count(value, _DIGITS) > 0
    ):
        return False
    depth = 0
    for c in value.translate(None, _ALNUM + b" .-_+~;,/"):  # parentheses only
        depth += 1 if c == 0x28 else -1
        if depth not in (0, 1):
            return False
    if depth:
        return False
    return (
        all(
            len(w) <= (10 if _count(w, _DIGITS) else 16) and not _serial(w)
            for w in _WORD.findall(value)
        )
        and not _grouped_serial(value)
        and all(start == 0 for start in dotted_quads(value))
        and not written_address(value)
    )


_DAY_MONTH_YEAR = re.compile(
    rb"(?: [1-9]|[0-9]{1,2})-(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)-[0-9]{4}"
)
_TIME_ZONE = re.compile(rb" [0-9]{2}:[0-9]{2}:[0-9]{2} [+-][0-9]{4}")


def date(value: bytes) -> bool:
    """RFC 2971 §3.3's release date, an IMAP4rev1 date-time: "19-Mar-2020 02:08:12 +0000"."""
    day = _DAY_MONTH_YEAR.match(value) if len(value) <= 26 else None
    if day is None:
        return False
    return day.end() == len(value) or _TIME_ZONE.fullmatch(value, day.end()) is not None


_HOST = _ALNUM + b".-"
_PATH = _ALNUM + b"/._~+-"  # no %-escapes: "alice%40example.org" is an address


def _host(value: bytes) -> bool:
    labels = value.split(b".")
    return (
        0 < len(value) <= 253
        and len(labels) >= 2
        and _only(value, _HOST)
        and all(0 < len(lb) <= 63 for lb in labels)
    )


def _vendor_words(value: bytes) -> bool:
    """A support address's host, path or mailbox: words with digits of at most 10 octets (an
    IMSI has 15), no serial number, alone or in groups ("C02XK1ZTJGH5.example.com")."""
    return (
        all(len(w) <= 10 or not _count(w, _DIGITS) for w in _WORD.findall(value))
        and not any(_serial(w) for w in _WORD.findall(value))
        and not _grouped_serial(value)
    )


def url(value: bytes) -> bool:
    """A vendor's support address: "https://github.com/postalsys/imapflow/issues", "mailto:a@b.org".

    No query, fragment or user part: those are where a URL would carry something about the user;
    nor a long number or serial number in the rest (`_vendor_words`), nor a %-escape, behind
    which the detectors see nothing ("/u/alice%40example.org").
    """
    if len(value) > 128:
        return False
    low = value.lower()
    if low.startswith(b"mailto:"):
        local, at, domain = value[7:].partition(b"@")
        return (
            bool(local and at)
            and _only(local, _ALNUM + b"._+-")
            and _host(domain)
            and _vendor_words(value[7:])
        )
    for scheme in (b"https://", b"http://"):
        if low.startswith(scheme):
            authority, _, path = value[len(scheme) :].partition(b"/")
            host, colon, port = authority.partition(b":")
            port_ok = not colon or (port.isdigit() and len(port) <= 5)
            return (
                _host(host) and port_ok and _only(path, _PATH) and _vendor_words(host + b"/" + path)
            )
    return False


NAMED: dict[str, Callable[[bytes], bool]] = {
    "name": name,
    "vendor": name,  # "Apple Inc.", "Google, Inc.", "Gilles LAMIRAL": named as programs are
    "os": os,
    "version": version,
    "date": date,
    "url": url,
}


MAX_PATTERN = 256  # characters of a pattern, so that checking one stays cheap


def compile_shape(spec: str) -> Shape:
    """A named shape (a word), or else a pattern."""
    if spec.startswith("^") or not spec.replace("-", "").replace("_", "").isalnum():
        return compile_pattern(spec)
    check = NAMED.get(spec)
    if check is None:
        known = ", ".join(NAMED)
        raise ShapeError(f"unknown shape {quoted(spec)} (known: {known}; or a pattern from ^ to $)")
    return Shape(spec, check)


# A pattern is a sequence of items; an item is a set of octets (a 256-bit mask) with how many
# times it may repeat.
_Item = tuple[int, int, int]  # mask, least, most

_ANY = (1 << 256) - 1


def _mask(octets: bytes) -> int:
    m = 0
    for c in octets:
        m |= 1 << c
    return m


_CLASSES = {
    "d": _mask(_DIGITS),
    "w": _mask(_ALNUM + b"_"),
    "s": _mask(b" \t\n\r\f\v"),
}


def compile_pattern(text: str) -> Shape:
    """Compile a pattern of the safe subset, or say why it is not one.

    The subset: `^`, then literal characters, `\\`-escaped punctuation, `\\xNN`, `.`, `\\d`, `\\w`,
    `\\s` and classes `[...]` (ranges, `^` to negate), each optionally followed by `?`, `*`, `+`,
    `{m}`, `{m,}` or `{m,n}` (n at most 1024), then `$`. No groups, alternation, back references,
    look-arounds, flags, lazy or possessive quantifiers. And a repeated item must not be able to
    match a character that what follows it could start with: `^[a-z]+[0-9]+$` is fine,
    `^[a-z]*[a-z0-9]$` is not. Under that rule taking as many as possible is always right, so
    the value is matched in one pass with no backtracking (Python's `re` would agree on every
    value, but on ambiguous patterns it may take time polynomial or exponential in the value).
    """
    if len(text) > MAX_PATTERN:
        raise ShapeError(f"a pattern is at most {MAX_PATTERN} characters")
    if not text.isascii():
        raise ShapeError(r"write octets outside ASCII as \xNN")
    escaped_end = (len(text) - len(text[:-1].rstrip("\\")) - 1) % 2  # odd backslashes escape the $
    if not (text.startswith("^") and text.endswith("$")) or escaped_end:
        raise ShapeError("a pattern must be anchored: start with ^ and end with $")
    items = _Parser(text[1:-1]).items()
    _check_unambiguous(items)

    def check(value: bytes) -> bool:
        return _match(items, value)

    return Shape(text, check)


class _Parser:
    def __init__(self, body: str) -> None:
        self.body = body
        self.pos = 0

    def fail(self, why: str) -> ShapeError:
        # The character just read, counted from 1 in the pattern as written (after its ^).
        return ShapeError(f"at character {self.pos + 1}: {why}")

    def items(self) -> list[_Item]:
        found: list[_Item] = []
        while self.pos < len(self.body):
            mask = self.atom()
            least, most = self.quantifier()
            found.append((mask, least, most))
        return found

    def next(self) -> str:
        if self.pos >= len(self.body):
            raise self.fail("the pattern ends too early")
        c = self.body[self.pos]
        self.pos += 1
        return c

    def atom(self) -> int:
        c = self.next()
        if c == "\\":
            return self.escape(in_class=False)
        if c == "[":
            return self.char_class()
        if c == ".":
            return _ANY & ~_mask(b"\n")  # as in Python's re
        if c in "()|":
            raise self.fail("groups and alternation are not supported")
        if c in "*+?{":
            raise self.fail(f"{c!r} repeats nothing (nested or leading quantifier)")
        if c in "^$":
            raise self.fail(f"{c!r} only at the ends of the pattern")
        return 1 << ord(c)

    def escape(self, *, in_class: bool) -> int:
        c = self.next()
        if c in _CLASSES:
            return _CLASSES[c]
        if c == "x":
            digits = self.body[self.pos : self.pos + 2]
            if len(digits) != 2 or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise self.fail(r"\x takes two hexadecimal digits")
            self.pos += 2
            return 1 << int(digits, 16)
        if c.isalnum():
            raise self.fail(f"\\{c} is not supported (only \\d \\w \\s \\xNN)")
        return 1 << ord(c)

    def char_class(self) -> int:
        negate = self.body.startswith("^", self.pos)
        self.pos += negate
        mask = 0
        first = True
        while True:
            c = self.next()
            if c == "]" and not first:
                break
            first = False
            low = self.escape(in_class=True) if c == "\\" else 1 << ord(c)
            if self.body.startswith("-", self.pos) and not self.body.startswith("-]", self.pos):
                self.pos += 1
                end = self.next()
                high = self.escape(in_class=True) if end == "\\" else 1 << ord(end)
                if low.bit_count() != 1 or high.bit_count() != 1 or high < low:
                    raise self.fail("a range goes from one character to a later one")
                mask |= (high << 1) - low
            else:
                mask |= low
        return _ANY & ~mask if negate else mask

    def quantifier(self) -> tuple[int, int]:
        if self.pos >= len(self.body):
            return 1, 1
        c = self.body[self.pos]
        if c not in "?*+{":
            return 1, 1
        self.pos += 1
        bounds = {"?": (0, 1), "*": (0, MAX_VALUE_LENGTH), "+": (1, MAX_VALUE_LENGTH)}.get(c)
        if bounds is None:
            close = self.body.find("}", self.pos)
            inside = self.body[self.pos : close] if close >= 0 else ""
            low, comma, high = inside.partition(",")
            if not low.isdigit() or (high and not high.isdigit()):
                raise self.fail("write {m}, {m,} or {m,n}")
            self.pos = close + 1
            least = int(low)
            most = int(high) if high else (MAX_VALUE_LENGTH if comma else least)
            if most > MAX_VALUE_LENGTH or least > most:
                raise self.fail(f"a repeat is {{m,n}} with m <= n <= {MAX_VALUE_LENGTH}")
            bounds = (least, most)
        if self.pos < len(self.body) and self.body[self.pos] in "?*+{":
            raise self.fail("lazy, possessive and nested quantifiers are not supported")
        return bounds


def _check_unambiguous(items: list[_Item]) -> None:
    """Reject a repeated item that could give characters to what follows it.

    Then, in any match, an item takes as many characters as it can: had it stopped short, the
    next character (in its set) would have to start what follows, whose sets it does not meet.
    So greedy matching without backtracking is exact.
    """
    for i, (mask, least, most) in enumerate(items):
        if least == most:
            continue
        follow = 0
        for later, later_least, _ in items[i + 1 :]:
            follow |= later
            if later_least:
                break
        common = mask & follow
        if common:
            c = (common & -common).bit_length() - 1
            shown = repr(chr(c)) if 0x20 < c < 0x7F else f"\\x{c:02x}"
            raise ShapeError(
                f"item {i + 1} repeats a set that what follows can also start with ({shown}):"
                " make them disjoint, so that matching never has to backtrack"
            )


def _match(items: list[_Item], value: bytes) -> bool:
    pos, end = 0, len(value)
    for mask, least, most in items:
        count = 0
        while count < most and pos < end and mask >> value[pos] & 1:
            pos += 1
            count += 1
        if count < least:
            return False
    return pos == end
