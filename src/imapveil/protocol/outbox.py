"""What a session says of its own: records, the proxy's own lines to the client, the close.

The parts of the core (commands, the ID flow, the client leg) append here, in order, what they
decided besides the fate of the line they were given (which they return): a record, a line of the
proxy's own for the client (owed until the server's stream is at a response boundary), the end.
One outbox per session; the session hands its `actions` to the shell after each input.
"""

from __future__ import annotations

import re

from imapveil.protocol.actions import Action, Close, Direction, Emit, Forward, Reply
from imapveil.protocol.command import Command
from imapveil.protocol.config import CoreConfig
from imapveil.protocol.framer import ServerFramer
from imapveil.protocol.traits import recorded_verb
from imapveil.records import CommandCompleted, Record, Violation

RESPONSE_CODES = frozenset(
    """ALERT ALREADYEXISTS ANNOTATE ANNOTATIONS APPENDUID AUTHENTICATIONFAILED
    AUTHORIZATIONFAILED BADCHARSET BADCOMPARATOR BADEVENT BADURL CANNOT CAPABILITY CLIENTBUG
    CLOSED COMPARATOR COMPRESSIONACTIVE CONTACTADMIN CONTEXT COPYUID CORRUPTION DOWNGRADED
    EXPIRED EXPUNGEISSUED HASCHILDREN HIGHESTMODSEQ INPROGRESS INUSE LIMIT MAILBOXID METADATA
    MODIFIED NOMODSEQ NONEXISTENT NOPERM NOTIFICATIONOVERFLOW NOTSAVED NOUPDATE OVERQUOTA PARSE
    PERMANENTFLAGS PRIVACYREQUIRED READ-ONLY READ-WRITE REFERRAL SERVERBUG TEMPFAIL TOOBIG
    TRYCREATE UIDNEXT UIDNOTSTICKY UIDREQUIRED UIDVALIDITY UNAVAILABLE UNDEFINED-FILTER
    UNKNOWN-CTE UNSEEN URLMECH USEATTR""".split()  # noqa: SIM905 (one word per code reads best)
)
"""Response codes a record keeps (the IANA registry's, which Dovecot's are among); any other is
recorded `OTHER`: the code is an atom of the server's choosing, which must not write a password
or an identifier into the event log."""


class Outbox:
    __slots__ = (
        "actions",
        "close_pending",
        "closed",
        "config",
        "end_detail",
        "end_reason",
        "now",
        "owed",
        "server",
        "session_id",
        "violations",
    )

    def __init__(self, config: CoreConfig, session_id: str, now: float, server: ServerFramer):
        self.config = config
        self.session_id = session_id
        self.now = now
        self.server = server  # where the server's stream is: our own lines only between responses
        self.actions: list[Action] = []
        self.owed = bytearray()  # our own lines ("+", BAD), sent at a server response boundary
        self.close_pending = False  # close once the owed lines are sent
        self.closed = False
        self.violations = 0  # violation records so far (and refused commands)
        self.end_reason: str | None = None
        self.end_detail: str | None = None

    def __repr__(self) -> str:
        return f"<outbox {len(self.actions)} actions, {len(self.owed)} octets owed>"

    def emit(self, record: Record) -> None:
        self.actions.append(Emit(record))

    def reply(self, data: bytes) -> None:
        self.actions.append(Reply(Direction.TO_CLIENT, data))

    def to_server(self, data: bytes) -> None:
        self.actions.append(Forward(Direction.TO_SERVER, data))

    @property
    def can_speak(self) -> bool:
        """True at a response boundary, where a line of our own does not corrupt the stream."""
        return self.server.at_boundary

    def violation(self, source: str, kind: str, detail: str, action: str = "forwarded") -> None:
        self.violations += 1
        if self.violations <= self.config.max_violation_records:
            self.emit(Violation(self.session_id, source, kind, detail, action))

    def end(self, reason: str, detail: str | None = None) -> None:
        """Why the session ends: the first reason given is the one recorded."""
        if self.end_reason is None:
            self.end_reason = reason
            self.end_detail = detail

    def close(self, reason: str) -> list[Action]:
        if self.closed:
            return []
        self.closed = True
        return [Close(reason)]

    def last_words(self, bye: bytes | None, reason: str) -> list[Action]:
        """The session ends from outside (a timeout, a shutdown): a BYE if any, and the close."""
        said: list[Action] = [] if bye is None else [Reply(Direction.TO_CLIENT, bye)]
        return said + self.close(reason)

    def owe(self, data: bytes) -> None:
        """A line of the proxy's own for the client, sent at the next response boundary."""
        self.owed += data
        self.pay_owed()

    def pay_owed(self) -> None:
        if self.owed and self.can_speak and not self.closed:
            self.reply(bytes(self.owed))
            self.owed.clear()
            if self.close_pending:
                self.actions.extend(self.close("protocol_error"))

    def close_after_owed(self, bye: bytes) -> None:
        """End after what is owed already (and, from the server's side, after the answer
        being read): `feed_server` and the refusal pay it."""
        self.end("protocol_error")
        self.owed += bye
        self.close_pending = True

    def protocol_error(self, bye: bytes) -> None:
        """The client cannot be followed any further: BYE (where it can be said) and close."""
        self.end("protocol_error")
        if self.can_speak:
            self.pay_owed()
            self.reply(bye)
        self.actions.extend(self.close("protocol_error"))

    def command_record(self, cmd: Command, status: str | None, code: str | None) -> Emit:
        tag = cmd.tag
        verb = cmd.verb
        return Emit(
            CommandCompleted(
                self.session_id,
                record_tag(tag),
                recorded_verb(verb),
                cmd.state.value,
                status,
                code if code is None or code in RESPONSE_CODES else "OTHER",
                None if status is None else round((self.now - cmd.started) * 1000.0, 3),
                tuple(cmd.literals) if cmd.literals else (),
                cmd.mechanism,
                cmd.user,
            )
        )

    def suppressed(self) -> list[Action]:
        """One record for the violations beyond the session's share, if any."""
        more = self.violations - self.config.max_violation_records
        if more <= 0:
            return []
        return [
            Emit(
                Violation(
                    self.session_id, "session", "violations_suppressed", f"{more} more", "counted"
                )
            )
        ]


_ORDINARY_TAG = re.compile(rb"[A-Za-z]{0,8}[0-9]{0,6}(?:\.[0-9]{1,6})?")
"""The tags clients use: letters, then digits, perhaps a dot and digits (`1`, `a0001`, `A001`,
imaplib's `JEAE1`, Apple Mail's `1.1`, `t2`, `L`). Recorded as sent; see `record_tag`. At most
six digits before the dot, a million commands in a session: seven to ten were a phone number,
an IPv4 address written as one number or a serial number (`SN12345678`)."""


def record_tag(tag: bytes) -> str:
    """The client's tag as its records show it: as sent when it has a tag's usual shape
    (`_ORDINARY_TAG`); else its length alone, `(tag: 17 octets)`. A tag is the client's to
    choose, and one that is a device's MAC address, an IP address or an e-mail address
    (`a4:c3:f0:85:1b:2e ID (...)`) went into every command record as it came. What the
    commands' order and verbs say is in the records anyway; the tags' shapes are in the
    session's traits (`b1 tag=A9#`)."""
    if _ORDINARY_TAG.fullmatch(tag):
        return tag.decode("ascii")
    return f"(tag: {len(tag)} octets)"


def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)
