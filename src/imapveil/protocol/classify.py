"""The strict line classifier: can the proxy read this client line fragment?

A client command is one or more line fragments (a fragment ends in LF; a literal announced at
its end splits the command). The proxy forwards a fragment only if it can read it the way any
IMAP server must (RFC 9051 §9, RFC 3501 §9): a tag of tag characters, a command name, then
arguments made of atoms, quoted strings (only `\\"` and `\\\\` escapes), parenthesised lists, and
at most one literal announcement (`{N}`, `{N+}`, `~{N}`) at the very end. Anything else — a NUL,
a CR that does not end the line, another control character, 8-bit octets outside a quoted string,
an unterminated quoted string, a brace that is not a literal announcement, a `)` without its `(`
— is refused: a server might read such a line differently from the proxy (Dovecot, for one,
accepts `\\q` inside quotes and keeps reading after a stray brace), and a line read differently
is a line whose identifiers the policy never saw.

Its results are values, never changed once made (not frozen dataclasses only because those cost
five times as much to make, and every command makes two).

Well-formed commands the proxy does not know pass: transparency for extensions needs only the
generic grammar. Everything here is linear in the fragment's length (possessive regular
expressions, no backtracking), and nothing quotes the fragment's bytes: they may be a password.
"""

from __future__ import annotations

import binascii
import itertools
import re
from dataclasses import dataclass

from imapveil.protocol.lexer import LiteralAnnouncement, LiteralError, is_tag, literal_at_end

# ATOM-CHAR without the list wildcards and resp-specials excluded: everything printable but
# SP, DQUOTE, "(", ")", "{". Backslash is allowed outside quotes for flags (`\Seen`), "%"/"*" for
# LIST patterns, "]" for fetch attributes (`BODY[HEADER.FIELDS (FROM)]`), "}" for nothing harmful.
ATOMISH = rb"\x21\x23-\x27\x2a-\x7a\x7c-\x7e"
# One token per alternative, each starting with a different octet, all possessive: the match
# never backtracks, so a hostile 64 KiB line costs one pass.
_TOKENS = re.compile(
    rb'(?:[ ]++|"(?:[^"\\\x00-\x1f\x7f]++|\\["\\])*+"|[()]|[' + ATOMISH + rb"]++)*+"
)
# Quoted strings (dropped) and what is not a parenthesis, to follow list depth across fragments
# in C: a loop over 32,000 parentheses cost 17 ms of the event loop.
_QUOTED = re.compile(rb'"(?:[^"\\]++|\\.)*+"')
_NOT_PARENS = bytes(c for c in range(256) if c not in b"()")
_STEP = tuple(1 if c == ord("(") else -1 if c == ord(")") else 0 for c in range(256))
# Arguments as values: quoted (group 1, escaped), a parenthesis (2), or an atom (3).
_VALUES = re.compile(rb'"((?:[^"\\]++|\\.)*+)"|([()])|([' + ATOMISH + rb"]++)")
_UNESCAPE = re.compile(rb"\\(.)")
_VERB = re.compile(rb"[A-Za-z][A-Za-z0-9.\-_]*+")
# Commands whose own answer is a continuation ("+ idling", a SASL challenge) and whose grammar
# has no literal: a "+" after such a command could not tell the proxy whether the server asked
# for the literal, so a literal there is refused (Dovecot answers `a IDLE {5}` with "+ idling"
# and then runs the octets as commands).
_NO_LITERAL = frozenset((b"IDLE", b"AUTHENTICATE"))
# A modified UTF-7 run (RFC 9051 §5.1.3: `&`, modified base64, `-`), as mailbox names carry
# non-ASCII characters. Dovecot decodes a mailbox argument and puts the name in its answer's
# text as decoded (`NO Mailbox doesn't exist: <name>`), control octets and all: a name whose
# run decodes to CR or LF makes the server send lines of the client's choosing (a `+` that
# releases a literal the server never asked for, a tagged answer to another command).
_SHIFTED = re.compile(rb"&([A-Za-z0-9+,]++)-")
_ESCAPED_CONTROL = re.compile(rb"%(?:[01][0-9A-Fa-f]|7[Ff])")
_CONTROL = re.compile("[\x00-\x1f\x7f]")


@dataclass(slots=True)
class Fragment:
    """What the classifier made of one client line fragment."""

    problem: str | None
    """Why it cannot be read (None: it can): a short name, never the fragment's bytes."""
    depth: int
    """Open parentheses after this fragment (across the command's fragments)."""
    literal: LiteralAnnouncement | None
    """The literal announced at its end, even when the fragment is refused: the client will
    send its octets anyway if it is non-synchronizing, and the proxy must skip them to find the
    next command."""
    content: bytes = b""
    """The arguments part (without the tag, verb, literal announcement and line end)."""


@dataclass(slots=True)
class CommandLine:
    """The first fragment of a command."""

    tag: bytes | None
    verb: bytes
    """Upper-cased command name (`UID FETCH` for UID commands); empty when unreadable."""
    args_at: int
    """Offset in the fragment's body where the arguments start."""
    fragment: Fragment


def first_fragment(body: bytes) -> CommandLine:
    """Classify the first fragment of a command (`body` without its line end)."""
    sp = body.find(b" ")
    tag = body[:sp] if sp > 0 else body
    if not is_tag(body, 0, len(tag)):
        return CommandLine(None, b"", 0, _fail("tag", body))
    if sp < 0 or (body[-1] == 0x20 and len(body.rstrip(b" ")) == sp):
        # One word, spaces after it at most: no command. What a client sends where no "+"
        # asked for it (a SASL response, base64 credentials) is one word, with a trailing
        # space from some clients: it must not become a refused command's recorded tag.
        return CommandLine(tag, b"", len(body), _fail("no_command", body))
    m = _VERB.match(body, sp + 1)
    if m is None:
        return CommandLine(tag, b"", sp + 1, _fail("command_name", body))
    verb = m.group().upper()
    end = m.end()
    if verb == b"UID" and body[end : end + 1] == b" ":
        sub = _VERB.match(body, end + 1)
        if sub is None:
            return CommandLine(tag, verb, end, _fail("command_name", body))
        verb = b"UID " + sub.group().upper()
        end = sub.end()
    frag = fragment(body, end, 0)
    if frag.problem is None and frag.literal is not None and verb in _NO_LITERAL:
        frag = Fragment("literal_not_allowed", frag.depth, frag.literal)
    return CommandLine(tag, verb, end, frag)


def fragment(body: bytes, start: int, depth: int) -> Fragment:
    """Classify body[start:] (a fragment without its line end) at list depth `depth`."""
    try:
        literal = literal_at_end(body)
    except LiteralError:
        return Fragment("literal_length", depth, None)
    end = len(body)
    if literal is not None:
        end = body.rfind(b"{")
        if literal.binary:
            end -= 1
    content = body[start:end]
    m = _TOKENS.match(content)
    matched = m.end() if m is not None else 0  # the pattern matches the empty string
    if matched != len(content):
        return Fragment(_diagnose(content, matched), depth, literal)
    if b"&" in content and shifted_control(content):
        return Fragment("shifted_control", depth, literal)
    if b"(" in content or b")" in content:
        outside = _QUOTED.sub(b"", content) if b'"' in content else content
        parens = outside.translate(None, _NOT_PARENS)
        if min(itertools.accumulate(map(_STEP.__getitem__, parens), initial=depth)) < 0:
            return Fragment("unbalanced_list", 0, literal)  # a ")" without its "("
        depth += 2 * parens.count(b"(") - len(parens)
    return Fragment(None, depth, literal, content)


def values(content: bytes, limit: int = 4) -> list[bytes | None]:
    """The first `limit` argument values of a classified fragment's content: atoms and quoted
    strings (unescaped) as bytes; a parenthesis as None (not a value)."""
    out: list[bytes | None] = []
    for m in _VALUES.finditer(content):
        if len(out) >= limit:
            break
        quoted, paren, atom = m.groups()
        if paren is not None:
            out.append(None)
        elif quoted is not None:
            out.append(_UNESCAPE.sub(rb"\1", quoted) if b"\\" in quoted else quoted)
        else:
            out.append(atom)
    return out


def shifted_control(content: bytes) -> bool:
    """Whether a modified UTF-7 run in `content` decodes to a control character (C0 or DEL):
    no mailbox name has one, and Dovecot would write it into its answer as it is. A run that
    is no valid modified base64 is the server's to refuse (Dovecot does, without echoing)."""
    # All runs decoded at once (a decoding and a loop per run cost 14 ms of the event loop for
    # 64 KiB of `&AGE-`): each run made a multiple of 8 base64 characters (48 bits, three
    # UTF-16 units), so that every run's units start where its own would. What a run has
    # beyond its last multiple of 8 holds one unit (3 to 5 characters: its first 3; a lone
    # last sextet says nothing) or two (6 or 7: its first 6), padded with "/" (one bits), which
    # makes no control character of the bits left over.
    parts: list[bytes] = []
    for run in _SHIFTED.findall(content):
        whole = len(run) & ~7
        rest = len(run) - whole
        parts.append(run[:whole])
        if rest >= 6:
            parts.append(run[whole : whole + 6] + b"//")
        elif rest >= 3:
            parts.append(run[whole : whole + 3] + b"/////")
    if not parts:
        return False
    raw = binascii.a2b_base64(b"".join(parts).replace(b",", b"/"))
    return _CONTROL.search(raw.decode("utf-16-be", "surrogatepass")) is not None


def escaped_control(content: bytes) -> bool:
    """Whether `content` has a URL's percent-escape of a control character (C0 or DEL):
    Dovecot decodes an IMAP URL's mailbox and writes it into its answer as it is
    (`NO [BADURL ...] Mailbox doesn't exist: <name>`), as it does a modified UTF-7 run."""
    return b"%" in content and _ESCAPED_CONTROL.search(content) is not None


def _fail(problem: str, body: bytes) -> Fragment:
    try:
        literal = literal_at_end(body)
    except LiteralError:
        literal = None
    return Fragment(problem, 0, literal)


def _diagnose(content: bytes, at: int) -> str:
    """Why the token match stopped at `at`."""
    c = content[at]
    if c == 0x22:  # an opening quote whose string did not parse
        i = at + 1
        while i < len(content):
            q = content[i]
            if q == 0x5C:
                if content[i + 1 : i + 2] not in (b'"', b"\\"):
                    return "quoted_escape"
                i += 2
                continue
            if q == 0x22:
                break
            if q < 0x20 or q == 0x7F:
                return "quoted_control"
            i += 1
        return "unterminated_quoted"
    if c == 0x7B:
        return "brace"
    if c == 0x00:
        return "nul"
    if c == 0x0D:
        return "bare_cr"
    if c >= 0x80:
        return "eight_bit"
    return "control"
