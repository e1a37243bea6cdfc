"""Text for people and inline SVG charts: what a client sent made safe to show, names cut with
an ellipsis after a whole word, bar and line charts whose every label and number lies inside the
chart's box (tests/stats/test_report_layout.py measures them in a real browser)."""

from __future__ import annotations

import html
import json
import re
import unicodedata
from collections.abc import Callable, Sequence

from imapveil.stats.escapes import escaped
from imapveil.stats.inventory import Trend

_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u00ad\u034f\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2"
    "\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u2028-\u202e\u2060-\u206f"
    "\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufffb\U000110bd\U000110cd"
    "\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    "\U000e0000-\U000e0fff"
    "\ud800-\udfff\ue000-\uf8ff\ufdd0-\ufdef\ufffe\uffff\U000f0000-\U0010ffff"
    + "".join(f"{chr(plane << 16 | 0xFFFE)}{chr(plane << 16 | 0xFFFF)}" for plane in range(1, 15))
    + "]"
)
"""What a terminal or a reader of text must not get raw from a client: C0 and C1 controls and DEL
(escape sequences, BEL, a carriage return or line feed forging a row), the line and paragraph
separators, the bidirectional marks and overrides that reorder what is shown, every other
character Unicode says is shown as nothing (Default_Ignorable_Code_Point: zero-width spaces and
joiners, the byte order mark, soft hyphens, variation selectors, tag characters, fillers), and
every other format character (Cf: the interlinear annotation marks, number signs and format
controls that join or reshape what follows them): a family `Thunderbird` followed by a
zero-width space is a group of its own that reads `Thunderbird`, a row beside the real one. And
what a terminal shows as nothing, or as a box or an icon of its font's choosing: noncharacters
(U+FFFE, U+FFFF, U+FDD0 to U+FDEF, the last two of every plane) and private-use characters;
and surrogates, which alone are no character at all (written to a UTF-8 stream, one stops the
output at it)."""


_WORD = re.compile(r"[^\W\d_]+")
"""A run of letters: where a name that reads as another hides (see `_lookalikes`)."""
_LOOKALIKE = ("CYRILLIC ", "GREEK ", "ARMENIAN ", "CHEROKEE ", "COPTIC ", "FULLWIDTH LATIN ",
              "MATHEMATICAL ")  # fmt: skip
"""Letters that look like Latin ones: of the scripts whose letters do (Cyrillic TE and IE, Greek
omicron), and the fullwidth and mathematical forms of Latin letters themselves."""


def _lookalikes(text: str, escape: Callable[[str], str] = escaped) -> set[int]:
    """Where `text` has a word (a run of letters) that mixes Latin letters with `_LOOKALIKE`
    ones, the positions of those: `Thunderbird` with a Cyrillic TE for its T reads as the real
    one, a row of its own beside it (a client chooses its name: passthrough or a custom policy
    keep it). A word in one script is left as it is (`Почта`, `Почта Mail`, `Ελληνικά`).

    Words are read in the text as shown, its `_UNSAFE` characters written as `escape` writes
    them: a control character then a mathematical bold A (U+1D400) shows as `\\x0f` and the
    A, whose `f` and A make a word mixing Latin with a lookalike. Read in the raw text, the A
    was left as it was, and `safe` over its own output (a CSV cell made safe again) escaped
    it: not the same name as the other outputs showed it."""
    found: set[int] = set()
    if text.isascii():
        return found
    shown: str = text
    origin: Sequence[int] = range(len(text))
    unsafe = [match.start() for match in _UNSAFE.finditer(text)]
    if unsafe:
        parts: list[str] = []
        # The position in `text` of each character of `shown`; -1 in an escape.
        where: list[int] = []
        last = 0
        for at in unsafe:
            parts.append(text[last:at])
            where.extend(range(last, at))
            written = escape(text[at])
            parts.append(written)
            where.extend([-1] * len(written))
            last = at + 1
        parts.append(text[last:])
        where.extend(range(last, len(text)))
        shown, origin = "".join(parts), where
    for word in _WORD.finditer(shown):
        if word.group().isascii():
            continue
        latin = False
        odd = []
        for at, char in enumerate(word.group(), word.start()):
            name = unicodedata.name(char, "")
            if name.startswith("LATIN "):
                latin = True
            elif name.startswith(_LOOKALIKE):
                odd.append(origin[at])  # never in an escape: escapes are ASCII
        if latin:
            found.update(odd)
    return found


def _escape_all(text: str, escape: Callable[[str], str]) -> str:
    """`text` with every character of `_UNSAFE`, and the letters of a word that only look Latin
    (`_lookalikes`), written as `escape` writes one character."""
    lookalikes = _lookalikes(text, escape)
    if not lookalikes:
        return _UNSAFE.sub(lambda match: escape(match.group()), text)
    return "".join(
        escape(char) if at in lookalikes or _UNSAFE.match(char) else char
        for at, char in enumerate(text)
    )


def safe(text: str) -> str:
    """`text` with every character of `_UNSAFE` written as an escape (`\\x1b`, `\\u202e`,
    `\\U000e0041`: `escapes.escaped`), and the letters of a word that only look Latin
    (`_lookalikes`)."""
    return _escape_all(text, escaped)


def _json_escaped(char: str) -> str:
    """One character as JSON's own escape: `\\u202e`, a surrogate pair past U+FFFF."""
    code = ord(char)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def safe_json(value: object) -> str:
    """`value` as JSON (`ensure_ascii=False`: letters of any script as they are) with what
    `safe` escapes written as JSON's own escapes: safe on a terminal, and still JSON (`safe`
    over JSON is not, past U+FFFF)."""
    return _escape_all(json.dumps(value, ensure_ascii=False), _json_escaped)


def plural(count: int, noun: str) -> str:
    """`1 session`, `2 sessions`."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def signed_count(value: int) -> str:
    """`+4`, `\u22124` (a minus sign, not a hyphen), `0`."""
    return f"{value:+d}".replace("-", "\u2212") if value else "0"


def signed_share(value: float) -> str:
    """`+4.2%`, `\u22124.2%`, `0.0%`."""
    text = f"{value:+.1%}".replace("-", "\u2212")
    return "0.0%" if text[1:] == "0.0%" else text


def cut(text: str, width: int) -> str:
    """`text` in at most `width` characters, an ellipsis standing for what was left out; cut
    after a whole word where one ends in the second half, inside a word only if none does."""
    if len(text) <= width:
        return text
    head = text[: width - 1]
    space = head.rfind(" ")
    if text[width - 1] != " " and space >= width // 2:
        head = head[:space]
    return head.rstrip(" ,;:/-") + "\u2026"


def _clusters(text: str) -> list[tuple[str, int]]:
    """`text` as a terminal table shows it, in the pieces a cut must not split, each with the
    columns it takes: an escape for a character `safe` escapes (a column an octet of it); a
    character with the combining marks after it (those take none); a wide character (East
    Asian Width W or F: CJK, most emoji) two columns, any other one. A piece's characters are
    joined once, at the end: a letter and n marks added one by one cost n² (round 19)."""
    pieces: list[list[str]] = []
    widths: list[int] = []
    lookalikes = _lookalikes(text)
    for at, char in enumerate(text):
        if at in lookalikes or _UNSAFE.match(char):
            shown = escaped(char)
            pieces.append([shown])
            widths.append(len(shown))
        elif unicodedata.combining(char) and pieces and not pieces[-1][0].startswith("\\"):
            pieces[-1].append(char)
        elif unicodedata.combining(char):
            pieces.append([char])
            widths.append(0)
        else:
            pieces.append([char])
            widths.append(2 if unicodedata.east_asian_width(char) in "WF" else 1)
    return [("".join(piece), n) for piece, n in zip(pieces, widths, strict=True)]


def columns(text: str) -> int:
    """The columns of a terminal a client's `text` takes as `fit` shows it, whole."""
    return sum(n for _, n in _clusters(text))


def fit(text: str, width: int, *, right: bool = False) -> str:
    """A client's `text` in exactly `width` columns of a terminal, as `cut` puts it in `width`
    characters: escaped as `safe` escapes it, cut with an ellipsis after a whole word where one
    ends in the second half, never inside an escape nor between a character and its combining
    marks, and padded with spaces (on the left if `right`). Wide characters take two columns
    and combining marks none, so a table's columns line up whatever the names hold."""
    pieces = _clusters(text)
    used = sum(n for _, n in pieces)
    if used <= width:
        shown = "".join(piece for piece, _ in pieces)
    else:
        kept: list[tuple[str, int]] = []
        used = 0
        for piece, n in pieces:
            if used + n > width - 1:
                break
            kept.append((piece, n))
            used += n
        spaces = [i for i, (piece, _) in enumerate(kept) if piece == " "]
        if pieces[len(kept)][0] != " " and spaces:
            space = spaces[-1]
            if sum(n for _, n in kept[:space]) >= width // 2:
                kept = kept[:space]
        while kept and kept[-1][0] in (" ", ",", ";", ":", "/", "-"):
            kept.pop()
        shown = "".join(piece for piece, _ in kept) + "\u2026"
        used = sum(n for _, n in kept) + 1
    pad = " " * (width - used)
    return pad + shown if right else shown + pad


LABEL_WIDTH = 48
"""Characters of a group's name shown in a table or a chart before it is cut (with "…")."""


CHAR_WIDTH = 8
"""Pixels a character of the charts' 13 px text may take (generous: digits and capitals)."""
PAD = 4
"""Pixels left of a chart's first text: a glyph may reach a little left of where it starts."""


def bar_chart(title: str, rows: list[tuple[str, int]], unit: str) -> str:
    """A horizontal bar chart as inline SVG: the label (cut with "…", whole in a tooltip), the
    bar, and the number, all inside the chart's width."""
    bar_h, bar_w = 22, 400
    labels = [cut(safe(label), LABEL_WIDTH) for label, _ in rows]
    values = [plural(value, unit) for _, value in rows]
    label_w = PAD + CHAR_WIDTH * max((len(t) for t in labels), default=0) + 12
    width = label_w + bar_w + 6 + CHAR_WIDTH * max((len(t) for t in values), default=0) + 6
    width = max(width, PAD + CHAR_WIDTH * len(title) + 12)
    height = 34 + bar_h * max(len(rows), 1)
    top = max((v for _, v in rows), default=0) or 1
    parts = [
        f'<svg class="chart" role="img" aria-label="{html.escape(title)}" '
        f'xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">',
        f'<text x="{PAD}" y="18" class="title">{html.escape(title)}</text>',
    ]
    for i, ((label, value), shown, number) in enumerate(zip(rows, labels, values, strict=True)):
        y = 30 + i * bar_h
        w = int(bar_w * value / top)
        whole = html.escape(safe(label))
        parts.append(
            f'<text x="{PAD}" y="{y + 15}"><title>{whole}</title>{html.escape(shown)}</text>'
        )
        bar = f'x="{label_w}" y="{y + 3}" width="{max(w, 1)}" height="{bar_h - 6}"'
        parts.append(f'<rect class="bar" {bar}/>')
        parts.append(f'<text x="{label_w + w + 6}" y="{y + 15}">{number}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


COLOURS = ("#3b6ea5", "#d9822b", "#3d9a50", "#c23b3b", "#8a5cc2", "#8c6d3f", "#c2569b", "#2a9d9d")
"""Line colours readable on a light and on a dark page."""


def line_chart(title: str, trend: Trend) -> str:
    """Distinct users per family and week as inline SVG: a line a family (a gap where it had
    fewer than the minimum that week), "other" dashed, a legend on the right; every label and
    number inside the chart's width."""
    series = sorted(trend.series.items(), key=lambda item: (-max(v or 0 for v in item[1]), item[0]))
    lines = [*series, ("other", list[int | None](trend.other))]
    top = max((v or 0 for _, values in lines for v in values), default=0) or 1
    left = PAD + CHAR_WIDTH * len(str(top)) + 10
    plot_w, plot_h, step_w = 520, 200, 28
    n = max(len(trend.weeks), 1)
    every = -(-n * step_w // plot_w)  # a week label every this many weeks: they never overlap
    x = [left + 14 + (plot_w - 28) * i // max(n - 1, 1) for i in range(n)]
    names = [cut(safe(name), LABEL_WIDTH) for name, _ in lines]
    legend_x = left + plot_w + 16
    width = max(legend_x + 30 + CHAR_WIDTH * max(len(t) for t in names) + 6,
                PAD + CHAR_WIDTH * len(title) + 12)  # fmt: skip
    height = max(30 + plot_h + 36, 40 + 20 * len(lines))

    def y(value: int) -> int:
        return 30 + plot_h - plot_h * value // top

    parts = [
        f'<svg class="chart trend" role="img" aria-label="{html.escape(title)}" '
        f'xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">',
        f'<text x="{PAD}" y="18" class="title">{html.escape(title)}</text>',
    ]
    for value in sorted({0, top // 2, top}):
        parts.append(f'<line class="axis" x1="{left}" x2="{left + plot_w}" y1="{y(value)}" '
                     f'y2="{y(value)}"/><text x="{left - 6}" y="{y(value) + 4}" '
                     f'text-anchor="end">{value}</text>')  # fmt: skip
    for i, week in enumerate(trend.weeks):
        if i % every == 0:
            parts.append(f'<text x="{x[i]}" y="{30 + plot_h + 20}" text-anchor="middle">'
                         f"<title>{week}</title>{week[-3:]}</text>")  # fmt: skip
    for k, ((name, values), shown) in enumerate(zip(lines, names, strict=True)):
        colour = "#888888" if name == "other" else COLOURS[k % len(COLOURS)]
        dash = ' stroke-dasharray="5 4"' if name == "other" or k >= len(COLOURS) else ""
        path, pen = [], "M"
        for i, users in enumerate(values):
            if users is None:
                pen = "M"
                continue
            path.append(f"{pen}{x[i]} {y(users)}")
            pen = "L"
            parts.append(f'<circle cx="{x[i]}" cy="{y(users)}" r="3" fill="{colour}"><title>'
                         f"{html.escape(safe(name))}, {trend.weeks[i]}: "
                         f"{plural(users, 'user')}</title></circle>")  # fmt: skip
        parts.append(f'<path class="line" d="{" ".join(path)}" stroke="{colour}"{dash}/>')
        row = 40 + 20 * k
        parts.append(f'<line x1="{legend_x}" x2="{legend_x + 22}" y1="{row - 4}" y2="{row - 4}" '
                     f'stroke="{colour}" stroke-width="3"{dash}/>')  # fmt: skip
        parts.append(f'<text x="{legend_x + 30}" y="{row}"><title>{html.escape(safe(name))}'
                     f"</title>{html.escape(shown)}</text>")  # fmt: skip
    parts.append("</svg>")
    return "\n".join(parts)


def wrap(text: str, width: int, lines: int) -> list[str]:
    """`text` in at most `lines` lines of at most `width` characters, broken between words; what
    does not fit is cut (with "…") after a whole word, inside a word only if one alone is
    longer than a line."""
    out: list[str] = []
    words = text.split()
    while words and len(out) < lines - 1:
        line = words.pop(0)
        while words and len(line) + 1 + len(words[0]) <= width:
            line += " " + words.pop(0)
        if len(line) > width:  # one word longer than a line
            words.insert(0, line)
            break
        out.append(line)
    if words:
        out.append(cut(" ".join(words), width))
    return out or [""]


HEAD_WIDTH = 12
"""Characters of a column heading's line in a matrix chart."""


def matrix_chart(
    title: str, columns: list[tuple[str, str]], rows: list[str],
    cells: dict[tuple[str, str], float],
) -> str:  # fmt: skip
    """A matrix as inline SVG: a column for each of `columns` (a name, wrapped over up to three
    lines, and a line under it, e.g. its users), a row for each of `rows`, and in each cell of
    `cells` (row, column name) its share as a percentage over a shade as strong as the share; a
    cell not in `cells` is left empty. Every text inside the chart's box and each number inside
    its cell."""
    cell_w, cell_h = CHAR_WIDTH * HEAD_WIDTH + 12, 22
    heads = [[*wrap(safe(name), HEAD_WIDTH, 3), safe(under)] for name, under in columns]
    names = [cut(safe(r), 32) for r in rows]
    left = PAD + CHAR_WIDTH * max((len(n) for n in names), default=0) + 12
    top = 30 + 16 * max((len(h) for h in heads), default=0)
    width = max(left + cell_w * len(columns) + 4, PAD + CHAR_WIDTH * len(title) + 12)
    height = top + cell_h * max(len(rows), 1) + 6
    parts = [
        f'<svg class="chart matrix" role="img" aria-label="{html.escape(title)}" '
        f'xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">',
        f'<text x="{PAD}" y="18" class="title">{html.escape(title)}</text>',
    ]
    for j, ((name, _), lines) in enumerate(zip(columns, heads, strict=True)):
        x = left + j * cell_w + cell_w // 2
        y0 = top - 8 - 16 * (len(lines) - 1)
        muted = [""] * (len(lines) - 1) + [' class="muted"']
        spans = "".join(
            f'<tspan x="{x}" y="{y0 + 16 * k}"{css}>{html.escape(line)}</tspan>'
            for k, (line, css) in enumerate(zip(lines, muted, strict=True))
        )
        parts.append(f'<text class="head" text-anchor="middle"><title>{html.escape(safe(name))}'
                     f"</title>{spans}</text>")  # fmt: skip
    for i, (row, shown) in enumerate(zip(rows, names, strict=True)):
        y = top + i * cell_h
        parts.append(f'<text x="{PAD}" y="{y + 15}" class="row"><title>{html.escape(safe(row))}'
                     f"</title>{html.escape(shown)}</text>")  # fmt: skip
        for j, (name, _) in enumerate(columns):
            share = cells.get((row, name))
            if share is None:
                continue
            x = left + j * cell_w
            shade = 0.10 + 0.45 * min(max(share, 0.0), 1.0)
            parts.append(
                f'<rect class="cell" x="{x + 2}" y="{y + 1}" width="{cell_w - 4}" '
                f'height="{cell_h - 2}" fill-opacity="{shade:.2f}"/>'
                f'<text x="{x + cell_w // 2}" y="{y + 15}" text-anchor="middle">'
                f"{share:.0%}</text>"
            )
    parts.append("</svg>")
    return "\n".join(parts)
