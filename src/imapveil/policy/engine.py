"""Apply a policy to one ID list: what is forwarded, what is recorded, and why.

RFC 2971 binds what we send: never a false value (§3) — a field is kept, shortened, coarsened,
replaced by an obvious marker, or dropped, never invented; at most 30 pairs, field names of at
most 30 octets, values of at most 1024, each field once (§3.3); and a list that policy emptied
goes out as NIL, never `()` (some servers reject it).
"""

from __future__ import annotations

import functools
import re
import unicodedata
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

from imapveil import __version__
from imapveil.policy.detectors import detect
from imapveil.policy.model import Policy, Rule, is_anti_spoof
from imapveil.policy.shapes import Shape, label_words
from imapveil.rfc2971 import MAX_FIELD_LENGTH, MAX_FIELDS, MAX_VALUE_LENGTH, IdFields

RECORD_LIMIT = 256  # octets of a value kept in a record (RFC 2971 §7: logs must not flood)


@dataclass(frozen=True, slots=True)
class Decision:
    field: str
    forward: str  # what was done: keep, drop, truncate, coarsen, redact
    record: str
    rule: str  # which rule decided: "rule[2]", "default", "detected:mac", "anti-spoof", "limit"


@dataclass(frozen=True, slots=True)
class Outcome:
    forwarded: IdFields
    recorded: dict[str, str | None]
    dropped: tuple[str, ...]  # names of fields not forwarded; never their values
    decisions: tuple[Decision, ...]
    changed: bool


def coarsen(value: bytes, components: int) -> bytes:
    """The first `components` dot-separated parts of the leading version token.

    "16.0 (3731.600.7)" → "16.0"; "13.4.1 (22F82)" → "13.4" (components=2).
    """
    head = re.split(rb"[\s(;,]", value.strip(), maxsplit=1)[0]
    return b".".join(head.split(b".")[:components])


def os_head(value: bytes) -> bytes:
    """The leading system name and version: what comes before the first ";" or "(", trimmed.

    "Android 13; SM-S911B" → "Android 13"; "iOS 17.1 (iPhone15,2)" → "iOS 17.1". What follows
    (a device model, a quasi-identifier) is never kept. Linear in the value.
    """
    return value.split(b";", 1)[0].split(b"(", 1)[0].strip()


_PRINTABLE = bytes(range(0x21, 0x7F))


def _is_field_name(raw: bytes) -> bool:
    """Printable ASCII without spaces, as every field RFC 2971 §3.3 defines or a client sends.

    Anything else (NUL, CR, LF, controls, 8-bit, space) only arrives in a literal and is dropped,
    never normalised: a server cuts "x-proxy-ttl\\0junk" at the NUL and reads "x-proxy-ttl".
    """
    return bool(raw) and not raw.translate(None, _PRINTABLE)


def _shown(raw: bytes) -> str:
    """A dropped field's name as records show it: printable, the rest as \\xNN (RFC 2971 §7)."""
    return "".join(
        chr(c) if 0x21 <= c <= 0x7E else f"\\x{c:02x}" for c in raw[:MAX_FIELD_LENGTH]
    ).lower()


def _name(raw: bytes) -> str:
    return raw.decode("ascii").lower() if _is_field_name(raw) else _shown(raw)


_NOT_PRINTABLE = bytes(c for c in range(256) if c not in _PRINTABLE)
_SPACED = bytes.maketrans(_NOT_PRINTABLE, b" " * len(_NOT_PRINTABLE))


def _views(raw: bytes) -> tuple[bytes, ...]:
    """What the detectors look at in a name: the name as sent (not in the records' lower case,
    in which a base64 token mixes no cases: "3kWq1b0Zr9mYb8Jx2n4Vt0cP5sI="); and, for a name
    that is not printable ASCII (shown with \\xNN escapes, which split an identifier or end in
    a hex digit beside it: "\\x20a4:c3:..."), also the name with every other octet a space,
    without them, its NFKC form in ASCII (fullwidth digits and colons, a zero-width space
    inside a MAC address), and that form with other scripts' digits in ASCII's
    (`_ascii_digits`). And a name with a "%", with its percent-escapes decoded. At most 1024
    octets of it, as for a value."""
    raw = raw[:MAX_VALUE_LENGTH]
    # Percent-escapes, as in a URL, hide an identifier from every view: "alice%40example.org".
    unescaped = (urllib.parse.unquote_to_bytes(raw),) if b"%" in raw else ()
    if _is_field_name(raw):
        return (raw, *unescaped)
    text = unicodedata.normalize("NFKC", raw.decode("utf-8", "replace"))
    return (
        _shown(raw).encode(),
        raw.translate(_SPACED),
        raw.translate(None, _NOT_PRINTABLE),
        text.encode("ascii", "ignore"),
        _ascii_digits(text),
        *unescaped,
    )


def _ascii_digits(text: str) -> bytes:
    """`text` with every decimal digit in ASCII's (Arabic-Indic "١٩٨", Devanagari "१९८", which
    NFKC leaves as they are; `int` and a regular expression's `\\d` read them) and every other
    character outside ASCII a space."""
    out = []
    for ch in text:
        digit = ch if ch.isascii() else unicodedata.decimal(ch, None)
        out.append(" " if digit is None else str(digit))
    return "".join(out).encode("ascii")


NAME_BUDGET = MAX_VALUE_LENGTH
"""Octets of field names the detectors read in one ID list, every view of every name counted
(`_name_cost`): as much as one value. A list may hold 120 names (`id_params.parse`), of up to
1024 octets each read in up to six views; read whole, 60 such names cost ~100 ms of the loop
every session shares (round 19). Real clients' names take a few dozen octets in all."""
_VIEW_COST = 16  # a view's share of a look, whatever its length: a detector's fixed steps

VALUE_BUDGET = MAX_VALUE_LENGTH
"""Octets of values the detectors read in one ID list, as `NAME_BUDGET` for names: the kept
fields a misfit coarsens (`os`, `version`, `os-version`) were read whole, three of 1 KB of
near-misses ~6 ms of the loop every session shares (round 19). A value past what is left is
dropped and recorded nowhere, unread (`limit`). Real clients' values take a few dozen octets.
Values no detector reads (a policy without detectors, `passthrough`) cost nothing."""


class _Budget:
    """What the detectors may still read of one list while it is decided: octets of names
    (`NAME_BUDGET`, `_name_cost`) and of values (`VALUE_BUDGET`)."""

    __slots__ = ("names", "values")

    def __init__(self) -> None:
        self.names = NAME_BUDGET
        self.values = VALUE_BUDGET


def _name_cost(raw: bytes) -> int:
    """What `_name_as_recorded` reads of a name, in octets: its first 1024, once as sent, in
    four views more if it is not printable ASCII (`_views`), once more decoded if it has a
    "%"; each view `_VIEW_COST` more. Counted without building the views."""
    raw = raw[:MAX_VALUE_LENGTH]
    views = (1 if _is_field_name(raw) else 5) + (b"%" in raw)
    return views * (len(raw) + _VIEW_COST)


def _shown_name(policy: Policy, raw: bytes, budget: _Budget) -> str:
    """A name as records show it (`_recorded_name`), its reading taken from the list's
    `budget`; a name past what is left is not read, and is recorded by its length alone (as a
    tag that is no tag is): `(name: 1000 octets)`."""
    name = _name(raw)
    if _is_field_name(raw) and any(rule.matches_exactly(name) for rule in policy.rules):
        # A field the policy names ("version"): the policy's own word, read once and
        # remembered whatever case the client writes it in; it costs the budget nothing.
        return _recorded_name(policy, name.encode())
    if not policy.detectors:
        return _recorded_name(policy, raw)
    cost = _name_cost(raw)
    if cost > budget.names:
        return f"(name: {len(raw)} octets)"
    budget.names -= cost
    return _recorded_name(policy, raw)


def _recorded_name(policy: Policy, raw: bytes) -> str:
    """A field's name as records show it (`dropped`, the keys of `recorded`): as sent (bounded),
    unless a detector of the policy finds an identifier in it (`"a4:c3:f0:85:1b:2e" "1"`): then
    `detected:<kind>`; or `detected:shape` if it has a word no name has (a serial number, a
    long number: `label_words`). The client chooses its names: records keep no identifier,
    wherever it is."""
    return _name_as_recorded(policy.detectors, raw)


@functools.lru_cache(maxsize=256)
def _name_as_recorded(detectors: tuple[str, ...], raw: bytes) -> str:
    """`_recorded_name`, remembered: every client sends the same few names ("name", "version"),
    whose look at every detector cost more than the rest of the policy's work."""
    if detectors:
        views = _views(raw)
        for view in views:
            kind = detect(view, detectors)
            if kind is not None:
                return f"detected:{kind}"
        if not all(label_words(view) for view in views):
            return "detected:shape"
    return _name(raw)[:MAX_FIELD_LENGTH]


def apply(
    policy: Policy,
    fields: IdFields,
    *,
    hasher: Callable[[bytes], str],
    trusted_client: bool = False,
    announce_changes: bool = True,
    explain: bool = False,
) -> Outcome:
    """Decide every field. `hasher` is a keyed HMAC for `record = "hash"`. `explain`: examine
    even the values that go nowhere, to name the detector that finds something in them
    (`imapveil policy test`); the outcome is the same."""
    if fields is None:
        return Outcome(None, {}, (), (), False)
    forwarded: list[tuple[bytes, bytes | None]] = []
    recorded: dict[str, str | None] = {}
    dropped: list[str] = []
    decisions: list[Decision] = []
    seen: set[str] = set()
    changed = False
    budget = _Budget()  # what the detectors may still read of the list's names and values
    names: list[str] = []  # the forwarded fields' names as recorded
    for raw_name, value in fields:
        name, readable = _name(raw_name), _is_field_name(raw_name)
        shown = _shown_name(policy, raw_name, budget)
        if not readable or name in seen:  # §3.3: a field once; the first one counts
            dropped.append(shown)
            decisions.append(Decision(name, "drop", "drop", "duplicate" if readable else "name"))
            changed = True
            continue
        seen.add(name)
        out, rec, decision = _decide(
            policy, name, value, hasher, trusted_client, budget=budget, explain=explain
        )
        if len(raw_name) > MAX_FIELD_LENGTH:
            out, decision = _DROP, Decision(name, "drop", decision.record, "limit")
        if isinstance(out, _Dropped):
            dropped.append(shown)
            changed = True
        else:
            forwarded.append((raw_name, out))
            names.append(shown)
            changed = changed or out != value
        if not isinstance(rec, _Dropped):
            recorded[shown] = rec
        decisions.append(decision)
    if len(forwarded) > MAX_FIELDS:
        dropped.extend(names[MAX_FIELDS:])
        forwarded = forwarded[:MAX_FIELDS]
        changed = True
    if changed and announce_changes and policy.announce and forwarded:
        # Only beside what is left: a list emptied by policy goes out as NIL, not as our note.
        note = f"imapveil {__version__} removed or shortened fields".encode()
        field = policy.announce_field.encode()
        forwarded = [p for p in forwarded if _name(p[0]) != policy.announce_field][: MAX_FIELDS - 1]
        forwarded.append((field, note))
    return Outcome(
        tuple(forwarded) if forwarded else None,
        recorded,
        tuple(dropped),
        tuple(decisions),
        changed,
    )


def _decide(
    policy: Policy,
    name: str,
    value: bytes | None,
    hasher: Callable[[bytes], str],
    trusted_client: bool,
    *,
    budget: _Budget,
    explain: bool = False,
) -> tuple[bytes | _Dropped | None, str | _Dropped | None, Decision]:
    """One field: what goes upstream, what is recorded, and which rule said so; what the
    detectors read of its value is taken from the list's `budget`."""
    if not trusted_client and is_anti_spoof(name):
        return _DROP, _DROP, Decision(name, "drop", "drop", "anti-spoof")
    rule = policy.rule_for(name)
    why, done = rule.label, rule.forward
    if value is not None and not explain and _nowhere(rule) and _nowhere(policy.detected):
        # Dropped and not recorded, whatever it holds: not examined. The detectors would only
        # name the reason, at up to a few milliseconds a hostile value of the loop every
        # session shares (the default policy drops every field it does not know).
        return _DROP, _DROP, Decision(name, "drop", "drop", why)
    if value is not None:
        if len(value) > MAX_VALUE_LENGTH:
            # §3.3: not a value anyone may send. Nothing in it is examined (detection and shape
            # checks stay linear on at most 1024 octets) and nothing of it is recorded.
            return _DROP, _DROP, Decision(name, "drop", "drop", "limit")
        if (
            not explain
            and rule.shape is not None
            and rule.misfit == "drop"
            and _nowhere(policy.detected)
            and not rule.shape.fits(value)
        ):
            # Without its shape, and not to be coarsened: dropped and recorded nowhere whether
            # a detector finds something in it or not (the detected rule says the same), so not
            # examined (a `name` of 1 KB, ~2 ms of the shared loop; round 19).
            return _DROP, _DROP, Decision(name, "drop", "drop", f"shape:{rule.shape.name}")
        enabled = tuple(d for d in policy.detectors if d not in rule.allow)
        if enabled:
            if len(value) > budget.values:
                # The list's values have cost the detectors what they may (`VALUE_BUDGET`):
                # not read, and so neither forwarded nor recorded. In `policy test` too: the
                # outcome is the same.
                return _DROP, _DROP, Decision(name, "drop", "drop", "limit")
            budget.values -= len(value)
        kind = detect(value, enabled)
        if kind is not None:
            rule, why, done = policy.detected, f"detected:{kind}", policy.detected.forward
        elif rule.shape is not None and not rule.shape.fits(value):
            why = f"shape:{rule.shape.name}"
            refit = _refit(rule, rule.shape, value, enabled)
            if refit is None:
                return _DROP, _DROP, Decision(name, "drop", "drop", why)
            value, done = refit, "coarsen" if rule.forward == "keep" else rule.forward
    out = _forward(rule, value)
    if (
        rule.shape is not None
        and isinstance(out, bytes)
        and rule.forward != "redact"  # the policy's own marker, nothing of the client's
        and not rule.shape.fits(out)
    ):
        out = _DROP  # truncating can cut a value out of its shape ("16.0 (37")
    rec = _record(rule, value, name, hasher)
    return (
        out,
        rec,
        Decision(
            name,
            "drop" if isinstance(out, _Dropped) else done,
            "drop" if isinstance(rec, _Dropped) else rule.record,
            why,
        ),
    )


def _nowhere(rule: Rule) -> bool:
    """A rule under which a value is neither forwarded nor recorded."""
    return rule.forward == "drop" and rule.record == "drop"


def _refit(rule: Rule, shape: Shape, value: bytes, enabled: tuple[str, ...]) -> bytes | None:
    """A value without its field's shape: coarsened if the rule says so and that fits, else None.

    "16.0 (3731.600.7) 2f1c9a…" → "16.0"; an `os` value is cut to its leading system name and
    version ("Android 13; SM-S911B" → "Android 13"). RFC 2971 §3 allows a shortened value, never
    a false one.
    """
    if rule.misfit != "coarsen":
        return None
    coarse = os_head(value) if shape.name == "os" else coarsen(value, rule.components)
    if shape.fits(coarse) and detect(coarse, enabled) is None:
        return coarse
    return None


class _Dropped:
    def __repr__(self) -> str:
        return "<dropped>"


_DROP = _Dropped()


def _forward(rule: Rule, value: bytes | None) -> bytes | _Dropped | None:
    action = rule.forward
    if action == "drop":
        return _DROP
    if value is None or action == "keep":
        return value
    if action == "truncate":
        return value[: rule.length]
    if action == "coarsen":
        return coarsen(value, rule.components)
    return rule.marker.encode()  # redact


def _record(
    rule: Rule, value: bytes | None, name: str, hasher: Callable[[bytes], str]
) -> str | _Dropped | None:
    action = rule.record
    if action == "drop":
        return _DROP
    if value is None:
        return None
    if action == "hash":
        return hasher(name.encode() + b"\0" + value)
    if action == "coarsen":
        value = coarsen(value, rule.components)
        if rule.shape is not None and not rule.shape.fits(value):
            return _DROP  # "a (1)" has a version's shape; its first word "a" has not
    return value[:RECORD_LIMIT].decode("utf-8", "replace")
