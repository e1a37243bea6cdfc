"""One client command as the proxy follows it, and the connection states (RFC 9051 §3).

What a command keeps is what its records say: its tag and verb, the state it was sent in, its
literals' sizes (the first `MAX_LITERALS`), and for LOGIN, AUTHENTICATE and SELECT the user name
or mailbox, taken only where the command's shape leaves no doubt which argument it is (never the
password by a misreading).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable

from imapveil.protocol import classify, lexer, sasl
from imapveil.protocol.framer import KEEP_LIMIT
from imapveil.protocol.id_policy import IdOutcome

Identify = Callable[[bytes], str | None]

MAX_LITERALS = 64
"""Literal sizes a command keeps for its record. An ID's literals take no round trip to the
server (the proxy says "+" itself, or the client sends `{0+}`): one command can have millions."""


_VALUES_AFTER_MAILBOX = frozenset((b"APPEND", b"SETMETADATA"))
"""Commands whose literals after the mailbox carry data that may hold line ends (a message, a
CATENATE part, a metadata value): not kept, never read (`Command.wants_literal`), but for a
CATENATE URL (`_URL_BEFORE`), which Dovecot writes back as it came (`NO [BADURL <url>]`)."""
_URL_BEFORE = re.compile(rb"(?:^|[ (])[Uu][Rr][Ll] *$")


class State(enum.Enum):
    """RFC 9051 §3: the IMAP connection states."""

    NOT_AUTHENTICATED = "not_authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"


class Command:
    __slots__ = (
        "argc",
        "bad_args",
        "depth",
        "first_arg",
        "id_outcome",
        "id_server",
        "literals",
        "mailbox",
        "mechanism",
        "policy",
        "sasl_step",
        "started",
        "state",
        "tag",
        "user",
        "verb",
    )

    def __init__(self, tag: bytes, verb: bytes, state: State, started: float) -> None:
        self.tag = tag
        self.verb = verb
        self.state = state
        self.started = started
        self.literals: list[int] = []
        self.mechanism: str | None = None
        self.sasl_step = 0
        self.user: str | None = None
        self.mailbox: bytes | None = None
        self.id_outcome: IdOutcome | bool | None = None  # False: malformed or not followed
        self.id_server: IdOutcome | None = None
        self.depth = 0  # open parentheses so far, across fragments
        self.policy: tuple[str, str] | None = None  # (name, digest) of the policy that decided
        # LOGIN's arguments, counted so that a user name is taken only from a LOGIN whose
        # whole shape is `LOGIN SP astring SP astring` (never the password by a misparse).
        self.argc = 0
        self.first_arg: bytes | None = None
        self.bad_args = False

    def __repr__(self) -> str:
        return f"<command {self.tag!r} {self.verb!r}>"

    def literal(self, size: int) -> None:
        """The command announced a literal of `size` octets (kept for the record, bounded)."""
        if len(self.literals) < MAX_LITERALS:
            self.literals.append(size)

    def wants_literal(self, scan_limit: int, before: bytes) -> int:
        """How much of this literal to keep (0: none): all of one short enough for Dovecot to
        echo (`scan_limit`), read before the command ends (of APPEND and SETMETADATA only a
        literal with nothing before it, the mailbox: not a message, its parts or a value, where
        line ends belong); else the start of a SELECT's mailbox (LOGIN's user name is decided
        where its literal is announced). `before`: the arguments of the fragment that
        announced it."""
        size = self.literals[-1] if self.literals else 0
        if 0 < size <= scan_limit and (
            self.verb not in _VALUES_AFTER_MAILBOX
            or (len(self.literals) == 1 and not before.strip())
            or _URL_BEFORE.search(before) is not None  # CATENATE's URL: Dovecot echoes it
        ):
            return size
        if len(self.literals) == 1 and self.verb in (b"SELECT", b"EXAMINE") and not self.mailbox:
            return KEEP_LIMIT
        return 0

    def literal_kept(self, value: bytes) -> None:
        """The start of a literal this command wanted kept has arrived."""
        if self.verb == b"LOGIN":
            if self.argc == 1 and self.literals[-1] <= KEEP_LIMIT:
                self.first_arg = value
        elif self.verb in (b"SELECT", b"EXAMINE") and len(self.literals) == 1:
            self.mailbox = value[:KEEP_LIMIT]

    def login_args(self, frag: classify.Fragment) -> None:
        """Count LOGIN's arguments in a fragment, keeping the first (the user name)."""
        if self.argc > 2:
            return
        for value in classify.values(frag.content):
            if value is None:
                self.bad_args = True  # a list is no astring
                return
            self.argc += 1
            if self.argc == 1:
                self.first_arg = value

    def login_user(self, identify: Identify) -> None:
        """The whole LOGIN has been read. Its user name counts only if the command had exactly
        the shape `LOGIN SP astring SP astring` (RFC 9051 §6.2.3): no other bytes, and never
        the password by a misreading, can become a record's user."""
        value, self.first_arg = self.first_arg, None
        if not self.bad_args and self.argc == 2 and value is not None:
            self.user = identify(value)

    def select_mailbox(self, args: bytes) -> None:
        """The mailbox of a SELECT or EXAMINE line, its first `KEEP_LIMIT` octets (as from a
        literal): a command waiting for its answer keeps it, and `max_unanswered` of them may
        wait (a line holds up to `max_line` octets)."""
        if args[:1] != b" ":
            return
        parsed = lexer.read_astring(args, 1, KEEP_LIMIT)
        if parsed is not None:
            self.mailbox = parsed[0]

    def authenticate_start(self, args: bytes, identify: Identify) -> None:
        if args[:1] != b" ":
            return
        mechanism, end = lexer.read_atom(args, 1, 40)
        name = mechanism.upper().decode("ascii")
        # A known name, or OTHER: an unknown word here may be a credential (sasl.MECHANISMS).
        self.mechanism = (name if name in sasl.MECHANISMS else sasl.OTHER) if name else None
        if args[end : end + 1] == b" ":  # SASL-IR (RFC 4959)
            self.sasl_identity(args[end + 1 :], identify)
            self.sasl_step = 1

    def sasl_response(self, line: bytes, identify: Identify) -> None:
        self.sasl_identity(line, identify)
        self.sasl_step += 1

    def sasl_identity(self, text: bytes, identify: Identify) -> None:
        if self.user is not None or self.mechanism is None:
            return
        response = sasl.decode_response(text)
        if response is None:
            return
        name = sasl.username(self.mechanism, self.sasl_step, response)
        if name is not None:
            self.user = identify(name)
