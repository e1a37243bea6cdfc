"""What a session's client program uses and how it behaves: the IMAP extensions in use, and a
behaviour signature of the session's start (docs/extensions.md, docs/fingerprints.md).

Pure and sans-IO. The command side feeds each client command the proxy accepted, fragment by
fragment, as it already classified it (the verb, the arguments without the literal announcement,
the literal announced at the end); this module never sees literal octets, and never keeps or
returns a byte of what the client sent: every name it returns comes from the fixed lists below
(`EXTENSIONS`, the verbs, options, STATUS items and SASL mechanisms it knows), and an unknown
verb or option counts as `OTHER`. What it keeps is bounded by construction: a set of names from
the vocabulary, at most `WINDOW_STEPS` steps and `MAX_TEXT` characters of behaviour text, and
the tokens of the one command being read (at most `MAX_TOKENS`).

Per command it costs a dictionary look-up on the verb; the arguments are read only for the verbs
whose arguments can name extensions: FETCH and STORE by one pass of a regular expression over the
upper-cased arguments, SEARCH, SORT, LIST, STATUS, SELECT, ENABLE, APPEND by one linear
tokenisation — which, once the behaviour window has closed, a one-pass check skips when none of
the words that verb's reader reacts to occurs. Steps are built only while the window is open.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from imapveil.protocol import lexer
from imapveil.protocol.lexer import LiteralAnnouncement
from imapveil.records import SessionTraits

OTHER = "OTHER"
WINDOW_COMMANDS = 48
"""Commands the behaviour window reads at most (it usually closes earlier, at SELECT), not
counting a per-folder command that repeats a step: how many folders there are depends on the
account, not the program."""
WINDOW_STEPS = 24
"""Distinct steps the behaviour text holds at most."""
MAX_TEXT = 400
"""Longest behaviour text, in characters."""
_HEAD_MAX = len("b1 tag=AAAAAA+ lit+=n: ")
MAX_TOKENS = 256
"""Argument tokens of one command read at most (a longer command is read that far)."""
MAX_JA4 = 64

# ------------------------------------------------------------------------------------------
# The vocabulary: IANA IMAP capability names (https://www.iana.org/assignments/imap-capabilities,
# upper-cased as the registry lists them) and three vendor extensions clients use widely.

EXTENSIONS = frozenset(
    (
        "ACL",
        "APPENDLIMIT",
        "BINARY",
        "CATENATE",
        "CHILDREN",
        "COMPRESS=DEFLATE",
        "CONDSTORE",
        "CONTEXT=SEARCH",
        "CONTEXT=SORT",
        "CONVERT",
        "CREATE-SPECIAL-USE",
        "ENABLE",
        "ESEARCH",
        "ESORT",
        "I18NLEVEL=2",
        "ID",
        "IDLE",
        "IMAP4REV2",
        "LANGUAGE",
        "LIST-EXTENDED",
        "LIST-METADATA",
        "LIST-MYRIGHTS",
        "LIST-STATUS",
        "LITERAL+",
        "LITERAL-",
        "METADATA",
        "METADATA-SERVER",
        "MOVE",
        "MULTIAPPEND",
        "MULTISEARCH",
        "NAMESPACE",
        "NOTIFY",
        "OBJECTID",
        "PARTIAL",
        "PREVIEW",
        "QRESYNC",
        "QUOTA",
        "REPLACE",
        "SASL-IR",
        "SAVEDATE",
        "SEARCH=FUZZY",
        "SEARCHRES",
        "SORT",
        "SORT=DISPLAY",
        "SPECIAL-USE",
        "STARTTLS",
        "STATUS=SIZE",
        "THREAD=ORDEREDSUBJECT",
        "THREAD=REFERENCES",
        "THREAD=REFS",
        "UIDONLY",
        "UIDPLUS",
        "UNAUTHENTICATE",
        "UNSELECT",
        "URLAUTH",
        "UTF8=ACCEPT",
        "UTF8=ONLY",
        "WITHIN",
        # Vendor extensions, not in the IANA registry.
        "X-GM-EXT-1",  # Gmail's X-GM-* items, search keys and labels
        "XAPPLEPUSHSERVICE",  # Apple Mail's push registration
        "XLIST",  # the pre-SPECIAL-USE folder listing of Gmail and old Apple/Outlook clients
        OTHER,
    )
)

# The verbs of IMAP4rev1/IMAP4rev2 themselves: no extension.
_BASE_VERBS = frozenset(
    (
        *b"CAPABILITY NOOP LOGOUT LOGIN AUTHENTICATE SELECT EXAMINE CREATE DELETE RENAME".split(),
        *b"SUBSCRIBE UNSUBSCRIBE LIST LSUB STATUS APPEND CHECK CLOSE EXPUNGE SEARCH".split(),
        *b"FETCH STORE COPY".split(),
        b"UID SEARCH",
        b"UID FETCH",
        b"UID STORE",
        b"UID COPY",
    )
)

# Extension commands: the verb alone names the extension.
_VERB_EXTENSIONS: dict[bytes, str] = {
    b"IDLE": "IDLE",
    b"MOVE": "MOVE",
    b"UID MOVE": "MOVE",
    b"NOTIFY": "NOTIFY",
    b"ENABLE": "ENABLE",
    b"ID": "ID",
    b"NAMESPACE": "NAMESPACE",
    b"UNSELECT": "UNSELECT",
    b"UID EXPUNGE": "UIDPLUS",
    b"SORT": "SORT",
    b"UID SORT": "SORT",
    b"GETQUOTA": "QUOTA",
    b"GETQUOTAROOT": "QUOTA",
    b"SETQUOTA": "QUOTA",
    b"SETACL": "ACL",
    b"DELETEACL": "ACL",
    b"GETACL": "ACL",
    b"LISTRIGHTS": "ACL",
    b"MYRIGHTS": "ACL",
    b"GETMETADATA": "METADATA",
    b"SETMETADATA": "METADATA",
    b"STARTTLS": "STARTTLS",
    b"UNAUTHENTICATE": "UNAUTHENTICATE",
    b"REPLACE": "REPLACE",
    b"UID REPLACE": "REPLACE",
    b"ESEARCH": "MULTISEARCH",
    b"GENURLAUTH": "URLAUTH",
    b"RESETKEY": "URLAUTH",
    b"URLFETCH": "URLAUTH",
    b"LANGUAGE": "LANGUAGE",
    b"COMPARATOR": "I18NLEVEL=2",
    b"CONVERT": "CONVERT",
    b"UID CONVERT": "CONVERT",
    b"XLIST": "XLIST",
    b"XAPPLEPUSHSERVICE": "XAPPLEPUSHSERVICE",
}

# Words an argument may hold, and the extension each names, per kind of command. Matched as
# whole tokens (outside quoted strings) on the upper-cased arguments.
_SEARCH_WORDS: dict[bytes, str] = {
    b"RETURN": "ESEARCH",
    b"MODSEQ": "CONDSTORE",
    b"OLDER": "WITHIN",
    b"YOUNGER": "WITHIN",
    b"X-GM-RAW": "X-GM-EXT-1",
    b"X-GM-MSGID": "X-GM-EXT-1",
    b"X-GM-THRID": "X-GM-EXT-1",
    b"X-GM-LABELS": "X-GM-EXT-1",
    b"SAVEDBEFORE": "SAVEDATE",
    b"SAVEDON": "SAVEDATE",
    b"SAVEDSINCE": "SAVEDATE",
    b"SAVEDATESUPPORTED": "SAVEDATE",
    b"EMAILID": "OBJECTID",
    b"THREADID": "OBJECTID",
    b"FUZZY": "SEARCH=FUZZY",
    b"SAVE": "SEARCHRES",
    b"PARTIAL": "PARTIAL",
    b"CONTEXT": "CONTEXT=SEARCH",
    b"UPDATE": "CONTEXT=SEARCH",
    b"$": "SEARCHRES",
}
_SORT_WORDS: dict[bytes, str] = {
    **_SEARCH_WORDS,
    b"RETURN": "ESORT",
    b"CONTEXT": "CONTEXT=SORT",
    b"UPDATE": "CONTEXT=SORT",
    b"DISPLAYFROM": "SORT=DISPLAY",
    b"DISPLAYTO": "SORT=DISPLAY",
}
# FETCH and STORE arguments hold no text of the user's (sections name header fields, which the
# client program chooses): substrings, found by one case-insensitive pass, are enough.
_FETCH_MARKS: dict[bytes, str] = {
    b"BINARY": "BINARY",
    b"CHANGEDSINCE": "CONDSTORE",
    b"MODSEQ": "CONDSTORE",
    b"VANISHED": "QRESYNC",
    b"X-GM-": "X-GM-EXT-1",
    b"PREVIEW": "PREVIEW",
    b"EMAILID": "OBJECTID",
    b"THREADID": "OBJECTID",
    b"SAVEDATE": "SAVEDATE",
}
_STORE_MARKS: dict[bytes, str] = {
    b"UNCHANGEDSINCE": "CONDSTORE",
    b"X-GM-LABELS": "X-GM-EXT-1",
}
_LIST_RETURN: dict[bytes, str] = {
    b"STATUS": "LIST-STATUS",
    b"SPECIAL-USE": "SPECIAL-USE",
    b"CHILDREN": "CHILDREN",
    b"MYRIGHTS": "LIST-MYRIGHTS",
    b"METADATA": "LIST-METADATA",
    b"SUBSCRIBED": "LIST-EXTENDED",
}
_STATUS_ITEMS: dict[bytes, str | None] = {
    b"MESSAGES": None,
    b"RECENT": None,
    b"UIDNEXT": None,
    b"UIDVALIDITY": None,
    b"UNSEEN": None,
    b"DELETED": "IMAP4REV2",
    b"SIZE": "STATUS=SIZE",
    b"HIGHESTMODSEQ": "CONDSTORE",
    b"APPENDLIMIT": "APPENDLIMIT",
    b"MAILBOXID": "OBJECTID",
}
_THREAD = {
    b"ORDEREDSUBJECT": "THREAD=ORDEREDSUBJECT",
    b"REFERENCES": "THREAD=REFERENCES",
    b"REFS": "THREAD=REFS",
}
_LIST_OPTIONS = frozenset((b"SUBSCRIBED", b"REMOTE", b"RECURSIVEMATCH"))
_MAX_WORDS = 12  # words of one option list in a step
_SELECT_PARAMS = {b"CONDSTORE": "CONDSTORE", b"QRESYNC": "QRESYNC"}
_MECHANISMS = frozenset(
    (
        "PLAIN",
        "LOGIN",
        "XOAUTH2",
        "OAUTHBEARER",
        "CRAM-MD5",
        "DIGEST-MD5",
        "SCRAM-SHA-1",
        "SCRAM-SHA-1-PLUS",
        "SCRAM-SHA-256",
        "SCRAM-SHA-256-PLUS",
        "GSSAPI",
        "GSS-SPNEGO",
        "NTLM",
        "EXTERNAL",
        "ANONYMOUS",
    )
)
# Verbs whose arguments are read, as tokens, until the command ends (across its fragments).
_TOKENISED = frozenset(
    (
        b"SEARCH",
        b"UID SEARCH",
        b"SORT",
        b"UID SORT",
        b"THREAD",
        b"UID THREAD",
        b"LIST",
        b"LSUB",
        b"STATUS",
        b"SELECT",
        b"EXAMINE",
        b"ENABLE",
        b"APPEND",
        b"CREATE",
        b"COMPRESS",
    )
)
# A known verb's step, one string shared by every session that takes the step.
_STEP_NAMES = {v: v.decode() for v in (*_BASE_VERBS, *_VERB_EXTENSIONS, *_TOKENISED)}


def recorded_verb(verb: bytes) -> str:
    """A command's name (upper-cased) as its record shows it: a command this module knows
    (IMAP's, its extensions' and the vendors' it lists) by its name, any other as `OTHER`, as
    the traits count it. An unknown command's name is the client's to choose: a device's MAC
    address, or a person's name (`alice@…` reads as the command `ALICE`)."""
    return _STEP_NAMES.get(verb, OTHER)


_FETCHES = frozenset((b"FETCH", b"UID FETCH"))
_STORES = frozenset((b"STORE", b"UID STORE"))
# Commands whose first argument is a sequence set, where `$` is a saved search (RFC 5182).
_SEQUENCED = _FETCHES | _STORES | frozenset((b"COPY", b"UID COPY", b"MOVE", b"UID MOVE"))
# The behaviour window closes after these: what follows depends on the mailbox's contents.
_WINDOW_ENDS = frozenset((b"SELECT", b"EXAMINE", b"IDLE", b"LOGOUT"))
_LOGINS = frozenset((b"LOGIN", b"AUTHENTICATE"))
# Commands a client may send once per folder before it selects one.
_PER_FOLDER = frozenset(
    (
        *b"STATUS LIST LSUB XLIST CREATE SUBSCRIBE UNSUBSCRIBE GETQUOTAROOT GETQUOTA".split(),
        *b"MYRIGHTS GETACL LISTRIGHTS GETMETADATA".split(),
    )
)


def _any_of(words: Iterable[bytes]) -> re.Pattern[bytes]:
    """One pass that finds any of the words (longest first), in upper-cased text (re's
    IGNORECASE would lose its first-character prefilter: several times slower)."""
    ordered = sorted(words, key=len, reverse=True)
    return re.compile(b"|".join(re.escape(w) for w in ordered))


_FETCH_SCAN = _any_of(_FETCH_MARKS)
_STORE_SCAN = _any_of(_STORE_MARKS)
# After the behaviour window, a one-fragment command of these kinds in which none of these
# words occurs has nothing to teach (its reader would note no extension): it is not tokenised.
_NOTHING_WITHOUT = {
    b"SEARCH": _any_of(_SEARCH_WORDS),
    b"UID SEARCH": _any_of(_SEARCH_WORDS),
    b"SORT": _any_of(_SORT_WORDS),
    b"UID SORT": _any_of(_SORT_WORDS),
    b"LIST": _any_of([b"("]),
    b"LSUB": _any_of([b"("]),
    b"STATUS": _any_of(k for k, v in _STATUS_ITEMS.items() if v is not None),
    b"SELECT": _any_of(_SELECT_PARAMS),
    b"EXAMINE": _any_of(_SELECT_PARAMS),
}

# Quoted strings (dropped: a user's search text, a mailbox name), parentheses, other tokens.
_TOKEN = re.compile(rb'"(?:[^"\\]++|\\.)*+"|[()]|[^ ()"]++')
_LITERAL_TOKEN = b"{}"  # where a literal's octets went (never read)
_QUOTED = b'"'
_KEPT_QUOTED = frozenset((b'"*"', b'"%"', b'""'))  # LIST wildcards and the empty string


def _tokens(content: bytes, room: int) -> list[bytes]:
    """At most `room` tokens of a fragment's arguments, upper-cased; a quoted string becomes a
    lone `"` (except `"*"`, `"%"` and `""`, kept: LIST patterns every account has)."""
    out: list[bytes] = []
    for m in _TOKEN.finditer(content.upper()):
        if len(out) >= room:
            break
        t = m.group()
        if t[:1] == b'"' and t not in _KEPT_QUOTED:
            t = _QUOTED
        out.append(t)
    return out


def _word(token: bytes) -> str:
    """A token as an extension name: from the vocabulary, or OTHER."""
    word = token.decode("ascii", "replace")
    return word if word in EXTENSIONS else OTHER


def tag_style(tag: bytes) -> str:
    """The tag's shape: letters `A`, digits `9`, `.` `-` `_` as themselves, anything else `#`,
    runs collapsed, at most six classes (then `+`)."""
    out: list[str] = []
    for c in tag:
        if 0x41 <= c <= 0x5A or 0x61 <= c <= 0x7A:
            k = "A"
        elif 0x30 <= c <= 0x39:
            k = "9"
        elif c in b".-_":
            k = chr(c)
        else:
            k = "#"
        if not out or out[-1] != k:
            if len(out) == 6:
                return "".join(out) + "+"
            out.append(k)
    return "".join(out)


def bounded_ja4(value: object) -> str | None:
    """A JA4 fingerprint as the shell computed it, if it is one: at most 64 printable ASCII
    characters (no space); anything else is None."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_JA4:
        return None
    if not value.isascii() or not all(0x20 < ord(c) < 0x7F for c in value):
        return None
    return value


MAX_SHARED_SETS = 4096
"""Sets of extension names `Traits._use` shares at most (then each session has its own)."""
_GROWN: dict[tuple[frozenset[str], str], frozenset[str]] = {}
"""A set of extension names and a name not in it -> the shared set with that name added."""


class Traits:
    """One session's extensions in use and behaviour signature, command by command."""

    __slots__ = (
        "_after_login",
        "_append_literals",
        "_current",
        "_folder_repeats",
        "_seen",
        "_steps",
        "_tokens",
        "_verb",
        "_window",
        "extensions",
        "ja4",
        "literal_plus",
        "read",
        "tag",
    )

    def __init__(self) -> None:
        self.extensions: frozenset[str] = frozenset()
        """Shared between sessions that use the same names (see `_use`): most idle sessions
        hold one of a few sets, and none holds a set of its own (about 200 octets)."""
        self.ja4: str | None = None
        self.read = 0  # client commands read (accepted or refused)
        self.tag: str | None = None  # the first command's tag style
        self.literal_plus = False  # {N+} seen in the window (outside LOGIN)
        self._window = True
        self._after_login = False
        self._steps: list[str] = []
        # (after login, step): each once per phase; only while the window is open (then None:
        # a session outlives its window by hours, an idle one holding nothing it no longer needs).
        self._seen: set[tuple[bool, str]] | None = set()
        self._folder_repeats = 0  # per-folder commands that repeated a step (not counted)
        self._current = b""  # the verb of the command whose fragments are arriving
        self._verb: bytes | None = None  # the same, while its arguments are being tokenised
        self._tokens: list[bytes] = []
        self._append_literals = 0

    def __repr__(self) -> str:
        return f"<traits {len(self.extensions)} extensions, {len(self._steps)} steps>"

    def _use(self, name: str) -> None:
        """`name` is in use: `extensions` becomes the shared set with it added."""
        names = self.extensions
        if name in names:
            return
        key = (names, name)
        grown = _GROWN.get(key)
        if grown is None:
            grown = names | {name}
            if len(_GROWN) < MAX_SHARED_SETS:
                _GROWN[key] = grown
        self.extensions = grown

    # ----------------------------------------------------------------------------------------
    # Fed by the command side.

    def refused(self) -> None:
        """A command the proxy could not read (answered BAD, never forwarded): it is counted as
        read, and nothing else (its verb and arguments are not trusted)."""
        self._end_command()
        self.read += 1
        self._current = b""

    def command(
        self, tag: bytes, verb: bytes, content: bytes, literal: LiteralAnnouncement | None
    ) -> None:
        """The first fragment of a command the proxy accepted: its tag, upper-cased verb,
        arguments (the fragment's content: no literal announcement, no line end) and the literal
        announced at its end."""
        if self._verb is not None:
            self._end_command()
        self.read += 1
        self._current = verb
        if self.tag is None:
            self.tag = tag_style(tag)
        name = _VERB_EXTENSIONS.get(verb)
        if name is not None:
            self._use(name)
        elif verb not in _BASE_VERBS and verb not in _TOKENISED:
            self._use(OTHER)
        if verb in _TOKENISED:
            if not self._window and literal is None:
                quick = _NOTHING_WITHOUT.get(verb)
                if quick is not None and quick.search(content.upper()) is None:
                    return
            self._verb = verb
            self._tokens = []
            self._append_literals = 0
            self._more(content, literal)
            return
        if literal is not None:
            self._literal(verb, literal)
        if verb in _SEQUENCED:
            self._sequenced(verb, content)
        if verb == b"AUTHENTICATE":
            step = self._authenticate(content)
        else:
            step = _simple_step(verb) if self._window else ""
        if self._window:
            self._step(verb, step)

    def fragment(self, content: bytes, literal: LiteralAnnouncement | None) -> None:
        """A further fragment of the current command, after a literal."""
        if self._verb is not None:
            self._more(content, literal)
        elif literal is not None:
            self._literal(self._current, literal)

    def record(self, session: str, capabilities: frozenset[str]) -> SessionTraits | None:
        """The session's record, or None when no client command was read. `capabilities`: the
        server's, to tell LITERAL- from LITERAL+ (both are `{N+}` on the wire)."""
        self._end_command()
        if not self.read:
            return None
        names = self.extensions
        if "LITERAL+" in names and "LITERAL+" not in capabilities and "LITERAL-" in capabilities:
            names = (names - {"LITERAL+"}) | {"LITERAL-"}
        text = self.behaviour_text()
        return SessionTraits(
            session=session,
            extensions=tuple(sorted(names)),
            behaviour=behaviour_name(text) if text is not None else None,
            behaviour_text=text,
            ja4=self.ja4,
        )

    def behaviour_text(self) -> str | None:
        if not self._steps:
            return None
        head = f"b1 tag={self.tag or '-'} lit+={'y' if self.literal_plus else 'n'}"
        return head + ": " + "; ".join(self._steps)

    # ----------------------------------------------------------------------------------------

    def _literal(self, verb: bytes, literal: LiteralAnnouncement) -> None:
        if literal.binary:
            self._use("BINARY")
        if not literal.synchronizing and verb != b"LOGIN":
            # LOGIN's literals are left out: whether a client needs one depends on the password.
            self._use("LITERAL+")
            if self._window:
                self.literal_plus = True

    def _authenticate(self, content: bytes) -> str:
        """AUTHENTICATE's mechanism (from a fixed list) and whether an initial response follows
        it (SASL-IR); the response itself is never read."""
        mechanism, end = lexer.read_atom(content, 1, 24)
        name = mechanism.upper().decode("ascii")
        if name not in _MECHANISMS:
            name = OTHER
        if content[end : end + 1] == b" ":
            self._use("SASL-IR")
            return f"AUTHENTICATE {name} IR"
        return f"AUTHENTICATE {name}"

    def _sequenced(self, verb: bytes, content: bytes) -> None:
        """FETCH, STORE, COPY, MOVE: a saved search as the set, FETCH and STORE modifiers."""
        if content == b" $" or content[:3] == b" $ ":
            self._use("SEARCHRES")
        if verb in _FETCHES:
            self._marks(content.upper(), _FETCH_SCAN, _FETCH_MARKS)
        elif verb in _STORES:
            self._marks(content.upper(), _STORE_SCAN, _STORE_MARKS)

    def _marks(self, up: bytes, scan: re.Pattern[bytes], marks: dict[bytes, str]) -> None:
        m = scan.search(up)  # usually None: one pass
        while m is not None:
            self._use(marks[m.group()])
            m = scan.search(up, m.end())

    def _more(self, content: bytes, literal: LiteralAnnouncement | None) -> None:
        verb = self._verb
        assert verb is not None
        room = MAX_TOKENS - len(self._tokens)
        if room > 0:
            self._tokens += _tokens(content, room)
        if literal is None:
            self._end_command()
            return
        self._literal(verb, literal)
        if len(self._tokens) < MAX_TOKENS:
            self._tokens.append(_LITERAL_TOKEN)
        if verb == b"APPEND":
            self._append_literal()

    def _append_literal(self) -> None:
        """APPEND announced a literal: a second message is MULTIAPPEND (not within CATENATE)."""
        self._append_literals += 1
        if b"CATENATE" in self._tokens:
            self._use("CATENATE")
        elif self._append_literals > 1:
            self._use("MULTIAPPEND")

    def _end_command(self) -> None:
        """The tokenised command is complete (or the next one started): read its tokens."""
        verb = self._verb
        if verb is None:
            return
        self._verb = None
        tokens, self._tokens = self._tokens, []
        step = _READERS[verb](self, verb, tokens)
        if self._window:
            self._step(verb, step)

    def _step(self, verb: bytes, step: str) -> None:
        steps, seen = self._steps, self._seen
        if seen is None:  # the window is closed (the callers look first)
            return
        key = (self._after_login, step)
        if verb in _LOGINS:
            self._after_login = True
        if key not in seen:
            # The text is the head, then each step and "; ", less the last "; ". A step that
            # would leave no room for a closing "…" closes the window with it instead.
            used = _HEAD_MAX + sum(len(s) + 2 for s in steps)
            if len(steps) >= WINDOW_STEPS or used + len(step) + 2 + len("…") > MAX_TEXT:
                steps.append("…")
                self._close_window()
                return
            seen.add(key)
            steps.append(step)
        elif verb in _PER_FOLDER:
            self._folder_repeats += 1
        if verb in _WINDOW_ENDS or self.read - self._folder_repeats >= WINDOW_COMMANDS:
            self._close_window()

    def _close_window(self) -> None:
        self._window = False
        self._seen = None

    # The readers of tokenised commands: each notes extensions and returns the step.

    def _words(self, tokens: list[bytes], words: dict[bytes, str]) -> None:
        for t in tokens:
            name = words.get(t)
            if name is not None:
                self._use(name)

    def _read_search(self, verb: bytes, tokens: list[bytes]) -> str:
        self._words(tokens, _SEARCH_WORDS)
        return _STEP_NAMES.get(verb) or verb.decode()

    def _read_sort(self, verb: bytes, tokens: list[bytes]) -> str:
        self._words(tokens, _SORT_WORDS)
        return _STEP_NAMES.get(verb) or verb.decode()

    def _read_thread(self, verb: bytes, tokens: list[bytes]) -> str:
        self._use(_THREAD.get(tokens[0], OTHER) if tokens else OTHER)
        self._words(tokens[1:], _SEARCH_WORDS)
        return _STEP_NAMES.get(verb) or verb.decode()

    def _read_enable(self, verb: bytes, tokens: list[bytes]) -> str:
        names: list[str] = []
        for t in tokens:
            name = _word(t)
            self._use(name)
            if name not in names:
                names.append(name)
        return " ".join([verb.decode(), *names[:_MAX_WORDS]]) + (
            " +" if len(names) > _MAX_WORDS else ""
        )

    def _read_select(self, verb: bytes, tokens: list[bytes]) -> str:
        params = [_SELECT_PARAMS[t] for t in dict.fromkeys(tokens[1:]) if t in _SELECT_PARAMS]
        for param in params:
            self._use(param)
        return f"{verb.decode()} ({' '.join(params)})" if params else verb.decode()

    def _read_status(self, verb: bytes, tokens: list[bytes]) -> str:
        items: list[str] = []
        for t in tokens[1:]:
            if t in (b"(", b")"):
                continue
            name = _STATUS_ITEMS.get(t)
            if name is not None:
                self._use(name)
            word = t.decode() if t in _STATUS_ITEMS else OTHER
            if word not in items and len(items) < _MAX_WORDS:
                items.append(word)
        return f"{verb.decode()} ({' '.join(items)})"

    def _read_list(self, verb: bytes, tokens: list[bytes]) -> str:
        """LIST [(selection options)] reference pattern(s) [RETURN (options)] (RFC 5258)."""
        parts = [verb.decode()]
        i = 0
        if tokens[:1] == [b"("]:
            self._use("LIST-EXTENDED")
            i, text = self._options(tokens, 0)
            parts.append(text)
        i += 1  # the reference: never shown
        if tokens[i : i + 1] == [b"("]:  # several patterns
            self._use("LIST-EXTENDED")
            i = _after_list(tokens, i)
            parts.append("name")
        else:
            parts.append(_pattern(tokens, i))
            i += 1
        if tokens[i : i + 2] == [b"RETURN", b"("]:
            self._use("LIST-EXTENDED")
            _end, text = self._options(tokens, i + 1)
            parts.append("RETURN " + text)
        return " ".join(parts)

    def _options(self, tokens: list[bytes], at: int) -> tuple[int, str]:
        """The LIST options in the parenthesised list at tokens[at] (nested lists: a STATUS
        option's items): the index after it, and its text from the vocabulary."""
        words: list[str] = []
        depth = 0
        for i in range(at, len(tokens)):
            t = tokens[i]
            if t == b"(":
                depth += 1
                words.append("(")
            elif t == b")":
                depth -= 1
                words.append(")")
                if not depth:
                    return i + 1, _joined(words)
            elif len(words) < 2 * _MAX_WORDS:
                words.append(self._list_word(t))
        return len(tokens), _joined(words)

    def _list_word(self, t: bytes) -> str:
        name = _LIST_RETURN.get(t)
        if name is not None:
            self._use(name)
            return t.decode()
        if t in _STATUS_ITEMS:
            status = _STATUS_ITEMS[t]
            if status is not None:
                self._use(status)
            return t.decode()
        return t.decode() if t in _LIST_OPTIONS else OTHER

    def _read_append(self, verb: bytes, tokens: list[bytes]) -> str:
        if b"UTF8" in tokens:
            self._use("UTF8=ACCEPT")
        if b"CATENATE" in tokens:
            self._use("CATENATE")
        return _STEP_NAMES.get(verb) or verb.decode()

    def _read_create(self, verb: bytes, tokens: list[bytes]) -> str:
        if b"USE" in tokens[1:]:
            self._use("CREATE-SPECIAL-USE")
        return _STEP_NAMES.get(verb) or verb.decode()

    def _read_compress(self, verb: bytes, tokens: list[bytes]) -> str:
        if tokens == [b"DEFLATE"]:
            self._use("COMPRESS=DEFLATE")
            return "COMPRESS DEFLATE"
        self._use(OTHER)
        return "COMPRESS OTHER"


def _after_list(tokens: list[bytes], at: int) -> int:
    """The index after the parenthesised list that starts at tokens[at]."""
    depth = 0
    for i in range(at, len(tokens)):
        t = tokens[i]
        depth += 1 if t == b"(" else -1 if t == b")" else 0
        if not depth:
            return i + 1
    return len(tokens)


def _joined(words: list[str]) -> str:
    return " ".join(words).replace("( ", "(").replace(" )", ")")


_PATTERNS = frozenset((b"*", b"%", *_KEPT_QUOTED))


def _pattern(tokens: list[bytes], at: int) -> str:
    """LIST's mailbox pattern as a class: `*` or `%` (as an atom or quoted), `""`, or `name`
    (any other: a mailbox's own name never)."""
    t = tokens[at] if at < len(tokens) else b""
    return t.decode() if t in _PATTERNS else "name"


def _simple_step(verb: bytes) -> str:
    """The step of a command whose arguments the signature ignores: its verb, if known."""
    return _STEP_NAMES.get(verb, OTHER)


def known_verb(verb: str) -> str:
    """A command's verb as the statistics may keep it: one this module knows, else `OTHER` (an
    unknown verb is the client's own text)."""
    return _simple_step(verb.encode("ascii", "replace"))


def behaviour_name(text: str) -> str:
    return "b1_" + hashlib.sha256(text.encode()).hexdigest()[:12]


_READERS = {
    b"SEARCH": Traits._read_search,
    b"UID SEARCH": Traits._read_search,
    b"SORT": Traits._read_sort,
    b"UID SORT": Traits._read_sort,
    b"THREAD": Traits._read_thread,
    b"UID THREAD": Traits._read_thread,
    b"LIST": Traits._read_list,
    b"LSUB": Traits._read_list,
    b"STATUS": Traits._read_status,
    b"SELECT": Traits._read_select,
    b"EXAMINE": Traits._read_select,
    b"ENABLE": Traits._read_enable,
    b"APPEND": Traits._read_append,
    b"CREATE": Traits._read_create,
    b"COMPRESS": Traits._read_compress,
}
