"""Shapes of unique identifiers, recognised in an `ID` value whatever its field is called.

Each detector answers "does this value carry an identifier of my kind?". They are deliberately
conservative about version strings ("16.0 (3731.600.7)", "13; TQ3A.230805.001") and eager about
anything that looks like a device or network identity. They are the second line: a kept field's
value must first have its field's shape (`shapes.py`).

Values come from the network and are examined on the event loop, so every detector runs in time
linear in the value, and on no more than RFC 2971 §3.3 lets a value be (1024 octets; `detect`
looks no further). Each pattern below is either bounded (a match attempt costs at most its width,
so a search costs width times length) or a single class repeated (`[...]+`, each run scanned once);
none nests a repetition, and the words they find are then checked with plain code.
tests/policy/test_detectors.py holds them to that.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import operator
import re
from collections.abc import Callable

from imapveil.rfc2971 import MAX_VALUE_LENGTH

# Six pairs written out, not (?:..){4}: no repetition inside a repetition.
_MAC = re.compile(
    rb"(?<![0-9a-f])"
    rb"(?:[0-9a-f]{2}([:-])[0-9a-f]{2}\1[0-9a-f]{2}\1[0-9a-f]{2}\1[0-9a-f]{2}\1[0-9a-f]{2}"
    rb"|[0-9a-f]{4}\.[0-9a-f]{4}\.[0-9a-f]{4})(?![0-9a-f])",
    re.IGNORECASE,
)
# Separators optional, any of - _ . : or space: "0f8fad5b_d9cb_469f_a165_70867728950e" counts.
_UUID = re.compile(
    rb"(?<![0-9a-f])[0-9a-f]{8}[-_.: ]?[0-9a-f]{4}[-_.: ]?[0-9a-f]{4}[-_.: ]?[0-9a-f]{4}"
    rb"[-_.: ]?[0-9a-f]{12}(?![0-9a-f])",
    re.IGNORECASE,
)
# Not after a digit or "digit.", not before a digit or ".digit": "3826.300.87.2.22" holds none.
# Four digits a part: a leading zero before three ("0198", or octal "0306"; `_quad_part`).
_IPV4 = re.compile(
    rb"(?<![0-9])(?<![0-9]\.)[0-9]{1,4}\.[0-9]{1,4}\.[0-9]{1,4}\.[0-9]{1,4}(?![0-9])(?!\.[0-9])"
)
# Six groups of one or two hex digits standing alone, one joiner between them (`_unpadded_mac`),
# in a look-ahead: every group begins a six, "1.2.3.4.5.6.7a.8b.9c" is read from its "4" too.
_SHORT_GROUPS = re.compile(
    rb"(?<![0-9a-z])(?=([0-9a-f]{1,2}([^0-9a-z])[0-9a-f]{1,2}\2[0-9a-f]{1,2}\2[0-9a-f]{1,2}\2"
    rb"[0-9a-f]{1,2}\2[0-9a-f]{1,2})(?![0-9a-z]))",
    re.IGNORECASE,
)
_WORD = re.compile(rb"[0-9A-Za-z]+")
_DIGIT_RUN = re.compile(rb"[0-9]+")
_B64_RUN = re.compile(rb"[A-Za-z0-9+/_-]+")
_IP6_RUN = re.compile(rb"[0-9A-Fa-f:.]+")
_IP6_DASHED = re.compile(rb"[0-9A-Fa-f-]+")

# For the tests.
PATTERNS = (
    _MAC,
    _UUID,
    _IPV4,
    _SHORT_GROUPS,
    _WORD,
    _DIGIT_RUN,
    _B64_RUN,
    _IP6_RUN,
    _IP6_DASHED,
)

_HEX = b"0123456789abcdefABCDEF"
# What may end a local part (RFC 5322 atext and dots), a quoted one ('"alice"@') or a comment
# ("alice(home)@").
_LOCAL_PART = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-'!#$&*/=?^`{|}~\")"
)
_DOMAIN_START = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789[")


def _is_hex(word: bytes) -> bool:
    return not word.translate(None, _HEX)


_VALUE = bytes.maketrans(b"0123456789", bytes(range(10)))
_DOUBLED = bytes.maketrans(b"0123456789", bytes((0, 2, 4, 6, 8, 1, 3, 5, 7, 9)))


def _luhn(digits: bytes) -> bool:
    """Luhn's check digit holds (ISO/IEC 7812): every second digit from the right doubled, the
    digits of each product summed."""
    return (
        sum(digits[-1::-2].translate(_VALUE)) + sum(digits[-2::-2].translate(_DOUBLED))
    ) % 10 == 0


@functools.lru_cache(maxsize=16)
def groups(value: bytes, widest: int) -> tuple[tuple[tuple[bytes, ...], tuple[bytes, ...]], ...]:
    """Runs of two or more words (`[0-9A-Za-z]+`), each joined to the next by at most `widest`
    other octets: (the words, the gaps between them). With `widest` 1, "49-015420-323751-8" is
    one run of four words and "16.0 (3731.600.7)" two ("16.0", "3731.600.7"); with 3, one. One
    pass; kept for the detectors that ask about the same value in turn."""
    found: list[tuple[tuple[bytes, ...], tuple[bytes, ...]]] = []
    words: list[bytes] = []
    gaps: list[bytes] = []
    end = 0
    for m in _WORD.finditer(value):
        gap = value[end : m.start()]
        end = m.end()
        if words and len(gap) <= widest:
            words.append(m.group())
            gaps.append(gap)
            continue
        if len(words) > 1:
            found.append((tuple(words), tuple(gaps)))
        words, gaps = [m.group()], []
    if len(words) > 1:
        found.append((tuple(words), tuple(gaps)))
    return tuple(found)


def _count_in(value: bytes, octets: bytes) -> int:
    return len(value) - len(value.translate(None, octets))


_HEX_LETTERS = b"abcdefABCDEF"
# (words, octets each) of a MAC address in groups: six pairs, four triples, three quads, two
# halves: "a4 c3 f0 85 1b 2e", "a4c-3f0-851-b2e", "a4c3_f085_1b2e", "a4c3f0-851b2e".
_MAC_GROUPS = ((6, 2), (4, 3), (3, 4), (2, 6))


def _grouped_mac(words: tuple[bytes, ...]) -> bool:
    """Equal groups of hex digits, twelve in all, one of them a letter (a version's numbers,
    "10.11.12.13.14.15", are no address; colons and hyphens between pairs are `_MAC`'s). Six
    pairs or more (EUI-64 has eight); exactly so many longer groups (more are the uuid's or the
    token's: "0f8f-ad5b-d9cb-469f-...")."""
    for count, size in _MAC_GROUPS:
        run = letters = 0  # equal hex words in a row; for pairs, letters in the last six
        for i, w in enumerate((*words, b"")):
            if len(w) == size and _is_hex(w):
                run += 1
                if size == 2:
                    letters = _count_in(b"".join(words[max(0, i - 5) : i + 1]), _HEX_LETTERS)
                    if run >= count and letters:
                        return True
                else:
                    letters += _count_in(w, _HEX_LETTERS)
                continue
            if size > 2 and run == count and letters:
                return True
            run = letters = 0
    return False


def _unpadded_mac(value: bytes) -> bool:
    """Six groups of one or two hex digits, each joined to the next by the same octet: a MAC
    address whose groups lost their leading zeros, as BSD's and macOS's `arp` and `ifconfig`
    print them ("0:1a:2b:3:4d:5e"), whatever the joiner. Three of the six have two digits and
    one a letter (a version's "1.0.a.b.c.d" or "10.11.12.13.14.15" is none)."""
    if not _count_in(value, _HEX_LETTERS):
        return False
    # Three groups of two digits of six: nine digits and five joiners, fourteen octets at least.
    # Lengths first, without a Python step per six: most values have none so long.
    sixes = list(map(_FIRST, _SHORT_GROUPS.findall(value)))
    if max(map(len, sixes), default=0) < 14:
        return False
    return any(len(six) >= 14 and _count_in(six, _HEX_LETTERS) for six in sixes)


_FIRST = operator.itemgetter(0)


def mac(value: bytes) -> bool:
    """With colons or hyphens, Cisco's dotted form, or 12 hex digits standing alone; or grouped
    otherwise, whatever joins the groups (up to three octets: `_grouped_mac`); or without the
    leading zeros of its groups (`_unpadded_mac`). All but the last need twelve hex digits: a
    value with fewer ("16.0 (3731.600.7)") is looked at by the last alone."""
    if len(value) - len(value.translate(None, _HEX)) >= 12 and _padded_mac(value):
        return True
    return _unpadded_mac(value)


def _padded_mac(value: bytes) -> bool:
    if _MAC.search(value):
        return True
    rest = _UUID.sub(b" ", value)  # a UUID ends in 12 hex digits: that one is the uuid detector's
    if any(len(w) == 12 and _is_hex(w) for w in _WORD.findall(rest)):
        return True
    return any(_grouped_mac(words) or _chunked(words, 12, 2) for words, _ in groups(rest, 3))


def _spaced(gap: bytes) -> bool:
    """A gap of one octet, or of spaces around one joiner at most ("4901, 5420", "198 / 51");
    not a bracket: "1.0 (20231012-143055)" is a version and a build."""
    return len(gap) == 1 or gap.strip(b" ") in _SPACED_JOINERS


_SPACED_JOINERS = frozenset((b"", b",", b"/", b"-", b"_", b"+", b";", b"~", b"&"))
# What joins the digit groups of a phone identity (`_digit_groups`), as a set to look gaps up
# in: any one octet but a colon (and a dot, unless dots count), or a `_spaced` gap of up to
# three octets (a pair of spaces, one joiner between spaces).
_DIGIT_JOINS_DOTS = frozenset(bytes([c]) for c in range(256) if c != 0x3A) | frozenset(
    gap
    for j in _SPACED_JOINERS
    for gap in (b" " * left + j + b" " * right for left in range(4) for right in range(4))
    if 1 < len(gap) <= 3
)
_DIGIT_JOINS = _DIGIT_JOINS_DOTS - {b"."}


def _digit_groups(words: tuple[bytes, ...], gaps: tuple[bytes, ...], dots: bool) -> bool:
    """Words of digits joined by single octets (or by one between spaces: `_spaced`), not colons
    (times), nor dots unless `dots`: with dots, 15 of their digits in a row that pass Luhn's
    check (an IMEI, "49.015420.323751.8", but "16.0.17425.20000" has 13); without, 15 or more
    (an IMEI, IMSI, IMEISV or ICCID: "49-015420-323751-8", "8901 2601 2345 6789 012",
    "4901, 5420, 3237, 518")."""
    joins = _DIGIT_JOINS_DOTS if dots else _DIGIT_JOINS
    start = total = 0  # the words counted: words[start:i + 1], their digits
    for i, w in enumerate(words):
        if not w.isdigit():
            start, total = i + 1, 0
            continue
        if not i or gaps[i - 1] not in joins:
            start, total = i, 0
        total += len(w)
        if not dots and total >= 15 and i > start:
            return True
        while dots and total > 15:
            total -= len(words[start])
            start += 1
        if dots and total == 15 and i > start and _luhn(b"".join(words[start : i + 1])):
            return True
    return False


def imei(value: bytes) -> bool:
    """15 digits passing Luhn's check; and phone identities written in groups (`_digit_groups`)."""
    if any(len(m) == 15 and _luhn(m) for m in _DIGIT_RUN.findall(value)):
        return True
    return any(_digit_groups(words, gaps, False) for words, gaps in groups(value, 3)) or any(
        _digit_groups(words, gaps, True) for words, gaps in groups(value, 1)
    )


def _hex_groups(words: tuple[bytes, ...], total: int) -> bool:
    """Consecutive hex words, two or more, of `total` digits in all: a UUID grouped otherwise
    ("0f8f-ad5b-d9cb-469f-a165-7086-7728-950e")."""
    lengths = [len(w) if _is_hex(w) else 0 for w in words]
    first = digits = 0
    for i, n in enumerate(lengths):
        if not n:
            first, digits = i + 1, 0
            continue
        digits += n
        while digits > total:
            digits -= lengths[first]
            first += 1
        if digits == total and i > first:
            return True
    return False


def uuid(value: bytes) -> bool:
    """8-4-4-4-12 with or without separators, or its 32 hex digits grouped otherwise."""
    if _UUID.search(value) is not None:
        return True
    return any(_hex_groups(words, 32) for words, _ in groups(value, 3))


def _chunks(words: tuple[bytes, ...]) -> list[tuple[bytes, ...]]:
    """Runs of hex words of one length, two or more, and then possibly a shorter one: a hex string
    cut into chunks ("9774-d56d-682e-549c", "a4c3f-0851b-2e"; not "47349e2482 a8bdba"). Each
    word is looked at once or twice."""
    found: list[tuple[bytes, ...]] = []
    i = 0
    while i < len(words):
        if not _is_hex(words[i]):
            i += 1
            continue
        size, j = len(words[i]), i + 1
        while j < len(words) and len(words[j]) == size and _is_hex(words[j]):
            j += 1
        rest = j - i > 1 and j < len(words) and len(words[j]) < size and _is_hex(words[j])
        found.append(words[i : j + rest])
        i = j  # a shorter last chunk may begin the next run too
    return found


def _chunked(words: tuple[bytes, ...], total: int, least: int) -> bool:
    """A hex string in chunks of `least` digits or more: `total` digits in all, or at least
    -`total` if `total` is negative; letters among them, and digits unless it is a MAC
    address's twelve."""
    for run in _chunks(words):
        joined = b"".join(run)
        letters = _count_in(joined, _HEX_LETTERS)
        if len(run) < 2 or len(run[0]) < least or not letters:
            continue
        if total > 0 and len(joined) == total:
            return True
        if total < 0 and len(joined) >= -total and letters < len(joined):
            return True
    return False


def token(value: bytes) -> bool:
    """Long hex, or base64-like runs mixing letters and digits (device hashes, session ids)."""
    if any(len(w) >= 16 and _is_hex(w) for w in _WORD.findall(value)):
        return True
    if any(_chunked(words, -16, 3) for words, _ in groups(value, 3)):
        return True
    for run in _B64_RUN.findall(value):
        if len(run) < 16:
            continue
        has_digit = any(0x30 <= c <= 0x39 for c in run)
        has_upper = any(0x41 <= c <= 0x5A for c in run)
        has_lower = any(0x61 <= c <= 0x7A for c in run)
        if has_digit and has_upper and has_lower:
            return True
    return False


def email(value: bytes) -> bool:
    """A local-part character, `@`, then a domain: "alice@localhost" and "bob@[10.0.0.1]" too.

    A scan from one `@` to the next (the pattern this replaces retried the local part from every
    position: 5 s for a 60 KB value).
    """
    at = value.find(b"@")
    while at >= 0:
        after = value[at + 1 : at + 2]
        if at and value[at - 1] in _LOCAL_PART and after and after[0] in _DOMAIN_START:
            return True
        at = value.find(b"@", at + 1)
    return False


def _quad_part(word: bytes) -> bool:
    """Digits of a part of an IPv4 address, as inet_aton or a reader takes them: at most 255, or
    after a leading zero at most 0377 in octal ("0306", 198). Four digits at most."""
    if len(word) > 4 or not word.isdigit():
        return False
    if int(word) <= 255:
        return True
    return word[:1] == b"0" and not word.translate(None, b"01234567") and int(word, 8) <= 255


def _octet(word: bytes) -> bool:
    """A part of an IPv4 address: digits (`_quad_part`), or 0x and two hex digits."""
    if word[:2].lower() == b"0x":
        return 2 < len(word) <= 4 and _is_hex(word[2:])
    return _quad_part(word)


_IP_JOINERS = frozenset(b"-_+,/;~&' ")


def _grouped_ipv4(words: tuple[bytes, ...], gaps: tuple[bytes, ...]) -> bool:
    """Four parts of an address joined by single octets such as hyphens, underscores or spaces
    ("ip-198-51-100-7", as cloud host names write them), or one between spaces ("198 / 51 / 100
    / 7"), or by dots with a part in hex ("0xc6.0x33.0x64.0x07", which inet_aton reads); dotted
    decimal is `_IPV4`'s."""
    run = 0
    for i, w in enumerate(words):
        run = run + 1 if _octet(w) else 0
        if run < 4:
            continue
        joins = gaps[i - 3 : i]
        if all(_spaced(g) and all(c in _IP_JOINERS for c in g) for g in joins):
            return True
        hexed = any(p[:2].lower() == b"0x" for p in words[i - 3 : i + 1])
        if hexed and all(g == b"." for g in joins):
            return True
    return False


def dotted_quads(value: bytes) -> list[int]:
    """Where an IPv4 address in dotted decimal begins, each one (leading zeros too:
    "010.000.000.001" and "198.051.0100.7" are still meant as addresses; and octal, which
    inet_aton reads: "0306.063.0144.07")."""
    return [
        m.start()
        for m in _IPV4.finditer(value)
        if all(_quad_part(part) for part in m.group().split(b"."))
    ]


def written_address(value: bytes) -> bool:
    """An address written otherwise than dotted or with colons: an IPv4 address in groups
    (`_grouped_ipv4`) or an IPv6 address with hyphens for colons. No version is written so, so
    the `version` shape refuses them too, where the policy lets `ip` pass for "7.2.25.230".
    Four parts have four digits at least ("0x" too), hyphens for colons two hyphens at least:
    a value with neither is looked at no further (`_written_address`)."""
    if value.count(b"-") < 2 and len(value) - len(value.translate(None, _DIGITS)) < 4:
        return False
    return _written_address(value)


def _written_address(value: bytes) -> bool:
    if any(_grouped_ipv4(words, gaps) for words, gaps in groups(value, 3)):
        return True
    # Hyphens for colons, as in Windows' "2001-db8--7.ipv6-literal.net": a run standing alone,
    # with "--" (a "::") or in eight groups, one of three hex digits or more, that reads as an
    # address ("1-2-3-4-5-6-7-8" and "Mail--Deluxe" do not).
    for m in _IP6_DASHED.finditer(value):
        run = m.group().strip(b"-")
        if (
            (b"--" in run or run.count(b"-") == 7)
            and not value[m.start() - 1 : m.start()].isalnum()
            and not value[m.end() : m.end() + 1].isalnum()
            and any(len(group) >= 3 for group in run.split(b"-"))
        ):
            with contextlib.suppress(ValueError):
                ipaddress.IPv6Address(run.replace(b"-", b":").decode("ascii"))
                return True
    return False


def ip(value: bytes) -> bool:
    if dotted_quads(value) or written_address(value):
        return True
    for run in _IP6_RUN.findall(value):
        if run.count(b":") < 2:
            continue  # "16.0", "1.983": versions, not addresses
        try:
            ipaddress.IPv6Address(run.strip(b".").decode("ascii"))
        except ValueError:
            # An address can hide in a longer run ("ab" + "2001:db8::1"); such runs are not
            # versions or names, so be eager.
            if len(run) > 45 or b"::" in run:
                return True
            continue
        return True
    return False


DETECTORS: dict[str, Callable[[bytes], bool]] = {
    "mac": mac,
    "imei": imei,
    "uuid": uuid,
    "token": token,
    "email": email,
    "ip": ip,
}


_DIGITS = b"0123456789"

NEEDS: dict[str, tuple[int, int, int]] = {
    "mac": (9, 0, 12),
    "imei": (0, 15, 15),
    "uuid": (32, 0, 32),
    "token": (0, 0, 16),
}
"""What a value must have for a detector to find anything in it, in every form it knows:
(hex digits, decimal digits, octets). Twelve hex digits make a MAC address, however grouped
(nine without its leading zeros: `_unpadded_mac`);
fifteen digits an IMEI; 32 hex digits a UUID; sixteen octets a token. Counted once a value, so
that the usual short value ("Thunderbird", "115.3.1") costs the grouping detectors nothing
(tests/policy/test_detectors.py checks that no value lacking these is found by them)."""


def detect(value: bytes, enabled: tuple[str, ...]) -> str | None:
    """The first enabled detector that matches, by name.

    Only the first 1024 octets are examined (RFC 2971 §3.3): the engine drops a longer value
    before it gets here, and no caller can make a detector spend more than that.
    """
    value = value[:MAX_VALUE_LENGTH]
    size = len(value)
    hexes = size - len(value.translate(None, _HEX))
    digits = size - len(value.translate(None, _DIGITS))
    for name in enabled:
        need = NEEDS.get(name)
        if need is not None and (hexes < need[0] or digits < need[1] or size < need[2]):
            continue
        if DETECTORS[name](value):
            return name
    return None
