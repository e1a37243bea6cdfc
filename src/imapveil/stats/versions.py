"""Version strings as mail clients send them, made comparable.

Clients write versions every way: `115.5.0`, `6.710`, `16.0 (3731.600.7)`, `21B101` (an Apple
build), `3826.300.87.2.22`, `13; TQ3A.230805.001`, `1.0.0-beta.2`, `20230322-18-a8bdba-dirty`.
`parse` turns any text into a `Version` whose order is a total order, never raises, and takes
time linear in the text, of which it reads at most `MAX_TEXT` characters.

How versions compare:

- the text is cut into runs of ASCII digits and of ASCII letters; everything else separates;
  text before the first digit (`v`, `Version `, `gmail_imap_`) is ignored, and a text without
  a digit is no version (`parse` returns None);
- numbers compare as numbers (`6.710` < `6.800`, `115.10` > `115.9`), and trailing zeros of a
  run of numbers do not count (`1.0` == `1.0.0`);
- a pre-release word (`dev` < `alpha`/`a` < `beta`/`b` < `pre`/`preview` < `rc`/`c`) comes before
  the release it leads to (`1.0.0-beta.2` < `1.0.0`); a one-letter `a`, `b` or `c` is one only
  between digits (`128.0b3`);
- other words (`esr`, `dirty`) come after the release and before any further number
  (`115.5.0` < `115.5.0esr` < `115.5.1`), compared as lowercase text;
- an Apple build, `21B101` (a number, one capital letter, a number), is three numbers: 21, 2, 101;
- what follows `(` or `;` is the build (`16.0 (3731.600.7)`, `13; TQ3A.230805.001`): it only
  breaks a tie between equal versions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_TEXT = 64
"""Characters of a version string that are read (a recorded version is at most this long)."""

_TOKEN = re.compile(r"[0-9]+|[A-Za-z]+", re.ASCII)
_APPLE_BUILD = re.compile(r"([0-9]{1,3})([A-Z])([0-9]{1,6})[a-z]?", re.ASCII)
_PRE = {"dev": 0, "alpha": 1, "a": 1, "beta": 2, "b": 2, "pre": 3, "preview": 3, "rc": 4, "c": 4}

# What one component of a key is: (rank, number, text). The ranks order kinds of component at
# the same position: a pre-release word, the end of the version, another word, a number.
_PRE_RANK, _END_RANK, _WORD_RANK, _NUMBER_RANK = 0, 1, 2, 3
Part = tuple[int, int, str]
_END: Part = (_END_RANK, 0, "")


@dataclass(frozen=True, slots=True, order=True)
class Version:
    """A parsed version: ordered by `key` (the version, then its build), shown as `text`."""

    key: tuple[tuple[Part, ...], tuple[Part, ...]]
    text: str = field(compare=False)
    release: tuple[int, ...] = field(compare=False)
    """The leading numbers (`115.5.0` -> 115, 5, 0): what a release line like `115` matches."""

    def in_line(self, line: Version) -> bool:
        """Whether this version belongs to the release line `line` (`115.5.0` to `115`)."""
        return bool(line.release) and self.release[: len(line.release)] == line.release


def parse(text: str) -> Version | None:
    """`text` as a comparable version, or None when it holds no digit."""
    text = text[:MAX_TEXT]
    main, build = _split(text)
    parts, release = _parts(main)
    if not parts:
        return None
    build_parts = _parts(build)[0] if build else []
    return Version((_canonical(parts), _canonical(build_parts)), text, release)


def _split(text: str) -> tuple[str, str]:
    """The version and its build, which follows the first `(` or `;`."""
    cut = min((i for i in (text.find("("), text.find(";")) if i >= 0), default=-1)
    return (text, "") if cut < 0 else (text[:cut], text[cut + 1 :])


def _parts(text: str) -> tuple[list[Part], tuple[int, ...]]:
    """The components of `text` from its first digit on, and its leading numbers."""
    apple = _APPLE_BUILD.fullmatch(text.strip())
    if apple:
        major, letter, build = apple.groups()
        numbers = (int(major), ord(letter) - ord("A") + 1, int(build))
        return [(_NUMBER_RANK, n, "") for n in numbers], numbers
    parts: list[Part] = []
    release: list[int] = []
    leading = True
    previous_end = -1
    previous_digit = False
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token.isdigit():
            parts.append((_NUMBER_RANK, int(token), ""))
            if leading:
                release.append(int(token))
            previous_digit, previous_end = True, match.end()
            continue
        if not parts:
            continue  # text before the first number
        leading = False
        word = token.lower()
        after = text[match.end() : match.end() + 1]
        between_digits = previous_digit and previous_end == match.start() and after.isdigit()
        if word in _PRE and (len(word) > 1 or between_digits):
            parts.append((_PRE_RANK, _PRE[word], ""))
        else:
            parts.append((_WORD_RANK, 0, word))
        previous_digit, previous_end = False, match.end()
    return parts, tuple(release)


def _canonical(parts: list[Part]) -> tuple[Part, ...]:
    """`parts` without the zeros that end a run of numbers, and with the end marked."""
    out: list[Part] = []
    for part in [*parts, _END]:
        if part[0] != _NUMBER_RANK:
            while out and out[-1] == (_NUMBER_RANK, 0, ""):
                out.pop()
        out.append(part)
    return tuple(out)
