"""Extensions in use and the behaviour signature (protocol/traits.py), through the session core
fed whole, byte by byte and in random chunks (the `split` fixture), and in Hypothesis chunks.

Every expectation is the vocabulary docs/extensions.md and docs/fingerprints.md define: what the
client sent, and the name recorded. Nothing of what a client chose (user names, passwords,
mailbox names, tags, search text, unknown verbs and options) may reach the record.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sys
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imapveil.protocol import classify, lexer
from imapveil.protocol.traits import EXTENSIONS, MAX_TEXT, Traits, tag_style
from imapveil.records import SessionEnded, SessionTraits
from tests.helpers import feeding
from tests.helpers.feeding import Conversation, Splitter, splitting_at

CAPS = b"IMAP4rev1 LITERAL+ SASL-IR ID IDLE ENABLE CONDSTORE QRESYNC MOVE AUTH=PLAIN"
GREETING = b"* OK [CAPABILITY " + CAPS + b"] ready\r\n"

talk = partial(feeding.talk, greeting=GREETING)

Script = list[tuple[str, bytes]]


def answered(*lines: bytes) -> Script:
    """Each client line, then the server's tagged OK to it."""
    script: Script = []
    for line in lines:
        tag = line.split(b" ", 1)[0]
        script += [("c", line + b"\r\n"), ("s", tag + b" OK done\r\n")]
    return script


def traits_of(split: Splitter, script: Iterable[tuple[str, bytes]]) -> SessionTraits:
    conv = play(split, script)
    (traits,) = conv.of(SessionTraits)
    return traits


def play(split: Splitter, script: Iterable[tuple[str, bytes]], **config: Any) -> Conversation:
    conv = talk(split, **config)
    for side, data in script:
        if side == "c":
            conv.client(data)
        else:
            conv.server(data)
    return conv.client_closes()


LOGIN = answered(b"a0 LOGIN user pass")

# What the client sent -> the extension names recorded (beside what LOGIN adds: nothing).
VOCABULARY: list[tuple[Script, set[str]]] = [
    (answered(b"a1 CAPABILITY", b"a2 NOOP", b'a3 LIST "" *', b"a4 LOGOUT"), set()),
    (answered(b"a1 MOVE 1:3 Trash"), {"MOVE"}),
    (answered(b"a1 UID MOVE 1:3 Trash"), {"MOVE"}),
    (answered(b"a1 NOTIFY SET (selected MessageNew)"), {"NOTIFY"}),
    (answered(b"a1 ENABLE CONDSTORE"), {"ENABLE", "CONDSTORE"}),
    (
        answered(b"a1 ENABLE QRESYNC UTF8=ACCEPT IMAP4rev2 X-UNKNOWN"),
        {"ENABLE", "QRESYNC", "UTF8=ACCEPT", "IMAP4REV2", "OTHER"},
    ),
    (answered(b'a1 ID ("name" "x")'), {"ID"}),
    (answered(b"a1 ID NIL"), {"ID"}),
    (answered(b"a1 NAMESPACE"), {"NAMESPACE"}),
    (answered(b"a1 UNSELECT"), {"UNSELECT"}),
    (answered(b"a1 UID EXPUNGE 4:7"), {"UIDPLUS"}),
    (answered(b"a1 SORT (DATE) UTF-8 ALL"), {"SORT"}),
    (answered(b"a1 UID SORT (DISPLAYFROM) UTF-8 ALL"), {"SORT", "SORT=DISPLAY"}),
    (answered(b"a1 SORT RETURN (MIN) (DATE) UTF-8 ALL"), {"SORT", "ESORT"}),
    (answered(b"a1 THREAD REFERENCES UTF-8 ALL"), {"THREAD=REFERENCES"}),
    (answered(b"a1 UID THREAD ORDEREDSUBJECT UTF-8 ALL"), {"THREAD=ORDEREDSUBJECT"}),
    (answered(b"a1 THREAD MYALGORITHM UTF-8 ALL"), {"OTHER"}),
    (answered(b'a1 GETQUOTAROOT "INBOX"', b'a2 GETQUOTA ""'), {"QUOTA"}),
    (answered(b'a1 SETQUOTA "" (STORAGE 512)'), {"QUOTA"}),
    (answered(b"a1 GETACL INBOX", b"a2 MYRIGHTS INBOX", b"a3 SETACL INBOX bob lr"), {"ACL"}),
    (answered(b'a1 GETMETADATA "" /shared/comment'), {"METADATA"}),
    (answered(b'a1 SETMETADATA INBOX (/private/comment "x")'), {"METADATA"}),
    (answered(b"a1 UID SEARCH RETURN (MIN MAX COUNT) UNSEEN"), {"ESEARCH"}),
    (
        answered(b"a1 SEARCH RETURN (SAVE) UNSEEN", b"a2 UID FETCH $ (FLAGS)"),
        {"ESEARCH", "SEARCHRES"},
    ),
    (answered(b"a1 UID COPY $ Archive"), {"SEARCHRES"}),
    (answered(b"a1 SEARCH YOUNGER 3600"), {"WITHIN"}),
    (answered(b"a1 UID SEARCH OLDER 60 UNSEEN"), {"WITHIN"}),
    (answered(b"a1 SEARCH MODSEQ 620162338"), {"CONDSTORE"}),
    (answered(b'a1 SEARCH X-GM-RAW "has:attachment"'), {"X-GM-EXT-1"}),
    (answered(b"a1 UID SEARCH SAVEDSINCE 1-Feb-2024"), {"SAVEDATE"}),
    (answered(b"a1 SEARCH EMAILID M6d99ac3275bb4e"), {"OBJECTID"}),
    (answered(b"a1 UID FETCH 1:* (FLAGS) (CHANGEDSINCE 12345)"), {"CONDSTORE"}),
    (answered(b"a1 UID FETCH 1:* (FLAGS) (CHANGEDSINCE 12345 VANISHED)"), {"CONDSTORE", "QRESYNC"}),
    (answered(b"a1 FETCH 1 (MODSEQ)"), {"CONDSTORE"}),
    (answered(b"a1 FETCH 1 (BINARY.PEEK[1])"), {"BINARY"}),
    (answered(b"a1 FETCH 1 (BINARY.SIZE[1])"), {"BINARY"}),
    (answered(b"a1 FETCH 1 (X-GM-MSGID X-GM-LABELS)"), {"X-GM-EXT-1"}),
    (answered(b"a1 FETCH 1 (PREVIEW)"), {"PREVIEW"}),
    (answered(b"a1 FETCH 1 (EMAILID THREADID)"), {"OBJECTID"}),
    (answered(b"a1 FETCH 1 (SAVEDATE)"), {"SAVEDATE"}),
    (answered(b"a1 UID STORE 1 (UNCHANGEDSINCE 5) +FLAGS (\\Seen)"), {"CONDSTORE"}),
    (answered(b"a1 STORE 1 +X-GM-LABELS (foo)"), {"X-GM-EXT-1"}),
    (answered(b"a1 SELECT INBOX (CONDSTORE)"), {"CONDSTORE"}),
    (answered(b'a1 EXAMINE "INBOX" (QRESYNC (67890007 20050715194045000))'), {"QRESYNC"}),
    (answered(b'a1 LIST (SUBSCRIBED) "" "*"'), {"LIST-EXTENDED"}),
    (answered(b'a1 LIST "" ("INBOX" "Drafts")'), {"LIST-EXTENDED"}),
    (answered(b'a1 LIST "" "*" RETURN (CHILDREN)'), {"LIST-EXTENDED", "CHILDREN"}),
    (
        answered(b'a1 LIST "" "%" RETURN (STATUS (MESSAGES UNSEEN SIZE))'),
        {"LIST-EXTENDED", "LIST-STATUS", "STATUS=SIZE"},
    ),
    (answered(b'a1 LIST "" "*" RETURN (SPECIAL-USE)'), {"LIST-EXTENDED", "SPECIAL-USE"}),
    (answered(b'a1 LIST (SPECIAL-USE) "" "*"'), {"LIST-EXTENDED", "SPECIAL-USE"}),
    (answered(b'a1 CREATE "Junk" (USE (\\Junk))'), {"CREATE-SPECIAL-USE"}),
    (answered(b"a1 STATUS INBOX (MESSAGES SIZE)"), {"STATUS=SIZE"}),
    (
        answered(b"a1 STATUS INBOX (HIGHESTMODSEQ APPENDLIMIT MAILBOXID)"),
        {"CONDSTORE", "APPENDLIMIT", "OBJECTID"},
    ),
    (answered(b'a1 XLIST "" *'), {"XLIST"}),
    (answered(b"a1 UNAUTHENTICATE"), {"UNAUTHENTICATE"}),
    (answered(b"a1 ESEARCH IN (personal) UNSEEN"), {"MULTISEARCH"}),
    (answered(b"a1 X-UNKNOWN-VERB 1 2"), {"OTHER"}),
    (answered(b"a1 SEARCH RETURN (PARTIAL 1:10) UNSEEN"), {"ESEARCH", "PARTIAL"}),
    (
        answered(b"a1 SEARCH RETURN (UPDATE) FUZZY SUBJECT x"),
        {"ESEARCH", "CONTEXT=SEARCH", "SEARCH=FUZZY"},
    ),
    (answered(b"a1 UID SORT RETURN (CONTEXT) (DATE) UTF-8 ALL"), {"SORT", "ESORT", "CONTEXT=SORT"}),
    (answered(b"a1 THREAD REFS UTF-8 ALL"), {"THREAD=REFS"}),
    (
        answered(b'a1 LIST "" "*" RETURN (MYRIGHTS METADATA (/shared/comment))'),
        {"LIST-EXTENDED", "LIST-MYRIGHTS", "LIST-METADATA"},
    ),
    (answered(b"a1 STATUS INBOX (DELETED)"), {"IMAP4REV2"}),
    (answered(b"a1 UID REPLACE 4 Drafts {3+}\r\nabc"), {"REPLACE", "LITERAL+"}),
    (answered(b"a1 GENURLAUTH x INTERNAL", b"a2 URLFETCH x"), {"URLAUTH"}),
    (answered(b"a1 LANGUAGE DE", b"a2 COMPARATOR i;basic"), {"LANGUAGE", "I18NLEVEL=2"}),
    (answered(b"a1 UID CONVERT 1 (BINARY[1])"), {"CONVERT"}),
    (answered(b'a1 XAPPLEPUSHSERVICE aps-version "2"'), {"XAPPLEPUSHSERVICE"}),
    (
        answered(b"a1 ENABLE UIDONLY UTF8=ONLY METADATA METADATA-SERVER X-GM-EXT-1 enable"),
        {"ENABLE", "UIDONLY", "UTF8=ONLY", "METADATA", "METADATA-SERVER", "X-GM-EXT-1"},
    ),
    # LITERAL+: the client sent {N+} (the server's "+" answers the proxy's {N}).
    (
        [("c", b"a1 CREATE {4+}\r\nJunk\r\n"), ("s", b"+ go\r\n"), ("s", b"a1 OK done\r\n")],
        {"LITERAL+"},
    ),
    # APPEND of two messages, a literal8 (BINARY), CATENATE.
    (
        [
            ("c", b"a1 APPEND Sent (\\Seen) {3}\r\n"),
            ("s", b"+ go\r\n"),
            ("c", b"abc {2}\r\n"),
            ("s", b"+ go\r\n"),
            ("c", b"de\r\n"),
            ("s", b"a1 OK done\r\n"),
        ],
        {"MULTIAPPEND"},
    ),
    (
        [
            ("c", b"a1 APPEND Sent ~{3}\r\n"),
            ("s", b"+ go\r\n"),
            ("c", b"abc\r\n"),
            ("s", b"a1 OK done\r\n"),
        ],
        {"BINARY"},
    ),
    (
        [
            ("c", b'a1 APPEND Drafts CATENATE (URL "/Drafts;UID=1" TEXT {3}\r\n'),
            ("s", b"+ go\r\n"),
            ("c", b"abc TEXT {2}\r\n"),
            ("s", b"+ go\r\n"),
            ("c", b"de)\r\n"),
            ("s", b"a1 OK done\r\n"),
        ],
        {"CATENATE"},
    ),
    (
        [
            ("c", b"a1 APPEND Sent UTF8 (~{3}\r\n"),
            ("s", b"+ go\r\n"),
            ("c", b"abc)\r\n"),
            ("s", b"a1 OK done\r\n"),
        ],
        {"UTF8=ACCEPT", "BINARY"},
    ),
]


@pytest.mark.parametrize(("script", "names"), VOCABULARY)
def test_each_vocabulary_entry_is_recognised(
    split: Splitter, script: Script, names: set[str]
) -> None:
    traits = traits_of(split, LOGIN + script)
    assert set(traits.extensions) == names
    assert list(traits.extensions) == sorted(set(traits.extensions))


@pytest.mark.parametrize(("script", "names"), VOCABULARY)
def test_each_vocabulary_entry_is_recognised_after_the_window(
    split: Splitter, script: Script, names: set[str]
) -> None:
    # SELECT closes the behaviour window; later commands take the quick path, same names.
    start = [*LOGIN, *answered(b"a0 SELECT INBOX")]
    traits = traits_of(split, start + script)
    assert set(traits.extensions) == names
    assert traits.behaviour_text == "b1 tag=A9 lit+=n: LOGIN; SELECT"


def test_the_vocabulary_tests_cover_every_name() -> None:
    named = set().union(*(names for _script, names in VOCABULARY))
    elsewhere = {"IDLE", "SASL-IR", "STARTTLS", "COMPRESS=DEFLATE", "LITERAL-"}  # tests below
    assert named | elsewhere == EXTENSIONS


def test_idle_sasl_ir_starttls_and_compress(split: Splitter) -> None:
    ir = base64.b64encode(b"\0bob\0builder")
    script = [
        ("c", b"a1 STARTTLS\r\n"),
        ("c", b"a2 AUTHENTICATE PLAIN " + ir + b"\r\n"),
        ("s", b"a2 OK [CAPABILITY IMAP4rev1 IDLE] in\r\n"),
        ("c", b"a3 COMPRESS DEFLATE\r\n"),
        ("c", b"a4 IDLE\r\n"),
        ("s", b"+ idling\r\n"),
        ("c", b"DONE\r\n"),
        ("s", b"a4 OK done\r\n"),
    ]
    conv = play(split, script, client_tls="offer", compress=True)
    (traits,) = conv.of(SessionTraits)
    assert set(traits.extensions) == {"STARTTLS", "SASL-IR", "COMPRESS=DEFLATE", "IDLE"}
    assert traits.behaviour_text is not None
    assert "AUTHENTICATE PLAIN IR" in traits.behaviour_text


def test_authenticate_without_initial_response_is_not_sasl_ir(split: Splitter) -> None:
    script = [
        ("c", b"a1 AUTHENTICATE PLAIN\r\n"),
        ("s", b"+ \r\n"),
        ("c", base64.b64encode(b"\0bob\0builder") + b"\r\n"),
        ("s", b"a1 OK in\r\n"),
    ]
    traits = traits_of(split, script)
    assert traits.extensions == ()
    assert traits.behaviour_text is not None
    assert traits.behaviour_text.endswith(": AUTHENTICATE PLAIN")


def test_literal_minus_when_the_server_offers_only_that(split: Splitter) -> None:
    conv = feeding.talk(split, greeting=b"* OK [CAPABILITY IMAP4rev1 LITERAL-] hi\r\n")
    for side, data in [*LOGIN, ("c", b"a1 CREATE {4+}\r\nJunk\r\n"), ("s", b"+ go\r\n")]:
        conv.client(data) if side == "c" else conv.server(data)
    conv.server(b"a1 OK done\r\n").client_closes()
    (traits,) = conv.of(SessionTraits)
    assert traits.extensions == ("LITERAL-",)


def test_login_literal_is_not_literal_plus(split: Splitter) -> None:
    # Whether LOGIN needs a literal depends on the password: it is not the client's trait.
    script = [("c", b"a0 LOGIN {4+}\r\nuser {6+}\r\nsecret\r\n")]
    script += [("s", b"+ go\r\n"), ("s", b"+ go\r\n"), ("s", b"a0 OK in\r\n")]
    traits = traits_of(split, script)
    assert traits.extensions == ()
    assert traits.behaviour_text is not None
    assert "lit+=n" in traits.behaviour_text


def test_the_record_comes_just_before_the_end_record(split: Splitter) -> None:
    conv = play(split, LOGIN + answered(b"a1 IDLE"))
    kinds = [type(r) for r in conv.records]
    assert kinds[-2:] == [SessionTraits, SessionEnded]
    (traits,) = conv.of(SessionTraits)
    assert traits.session == conv.ended().session
    assert "traits" not in json.dumps(conv.ended().to_dict())


def test_no_record_without_a_command(split: Splitter) -> None:
    conv = talk(split).client_closes()
    assert conv.of(SessionTraits) == []


def test_refused_commands_count_as_read_and_nothing_else(split: Splitter) -> None:
    # Unreadable to the proxy (answered BAD, never forwarded): the verb is not trusted.
    conv = talk(split)
    conv.client(b'a1 MOVE "unterminated\r\n').client(b"a2 IDLE \x01\r\n")
    assert conv.forwarded_to_server == b""
    conv.client_closes()
    (traits,) = conv.of(SessionTraits)
    assert traits == SessionTraits(session="s1")


def test_commands_the_server_refuses_still_count(split: Splitter) -> None:
    # What the client used is what it sent; the server's NO does not undo that.
    script = [*LOGIN, ("c", b"a1 UID MOVE 1 x\r\n"), ("s", b"a1 NO [TRYCREATE] no\r\n")]
    assert traits_of(split, script).extensions == ("MOVE",)


def test_tls_fingerprint_is_bounded(split: Splitter) -> None:
    ja4 = "t13d1516h2_8daaf6152771_e5627efa2ab1"
    cases: list[tuple[object, str | None]] = [
        (ja4, ja4),
        (None, None),
        ("x" * 64, "x" * 64),
        ("x" * 65, None),
        ("", None),
        ("t13d 1516", None),
        ("t13d\x00", None),
        ("t13dé", None),
        ("t13d\n", None),
        (b"t13d", None),
        (13, None),
    ]
    for given_value, kept in cases:
        conv = talk(split)
        conv.core.tls_fingerprint(given_value)  # type: ignore[arg-type]  # a hostile shell
        conv.client(b"a1 NOOP\r\n").client_closes()
        (traits,) = conv.of(SessionTraits)
        assert traits.ja4 == kept, given_value


def test_tls_fingerprint_is_the_latest_one(split: Splitter) -> None:
    conv = talk(split)
    conv.core.tls_fingerprint("t13d1516h2_8daaf6152771_e5627efa2ab1")
    conv.core.tls_fingerprint("t12d1516h2_8daaf6152771_e5627efa2ab1")
    conv.client(b"a1 NOOP\r\n").client_closes()
    assert conv.of(SessionTraits)[0].ja4 == "t12d1516h2_8daaf6152771_e5627efa2ab1"


# ------------------------------------------------------------------------------------------
# The behaviour signature.


def mail_client(
    user: bytes, password: bytes, folders: list[bytes], messages: int, tag: bytes = b"A"
) -> Script:
    """One client program's session start, for an account with these folders and messages."""
    n = iter(range(1, 1000))

    def t() -> bytes:
        return tag + str(next(n)).encode()

    script = [("c", t() + b" CAPABILITY\r\n"), ("s", b"* CAPABILITY " + CAPS + b"\r\n")]
    script += [("s", tag + b"1 OK done\r\n")]
    lines = [
        b'ID ("name" "Mail" "version" "1.0")',
        b'LOGIN "' + user + b'" "' + password + b'"',
        b"ENABLE QRESYNC CONDSTORE",
        b"NAMESPACE",
        b'LIST (SUBSCRIBED) "" "*" RETURN (CHILDREN SPECIAL-USE)',
        *(b'STATUS "' + f + b'" (MESSAGES UIDNEXT UNSEEN)' for f in folders),
        b'SELECT "INBOX" (CONDSTORE)',
        b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE 1)",
        *(b"UID FETCH " + str(i).encode() + b" (BODY.PEEK[])" for i in range(1, messages + 1)),
        b"IDLE",
    ]
    for line in lines:
        tagged = t()
        script.append(("c", tagged + b" " + line + b"\r\n"))
        if line == b"IDLE":
            script += [("s", b"+ idling\r\n"), ("c", b"DONE\r\n")]
        script.append(("s", tagged + b" OK done\r\n"))
    return script


def test_same_client_same_signature_whatever_the_account(split: Splitter) -> None:
    one = traits_of(split, mail_client(b"alice", b"wonderland", [b"Sent", b"Drafts"], 2))
    folders = [b"Folder%d" % i for i in range(30)]
    two = traits_of(split, mail_client(b"bob", b"builder!", folders, 17, tag=b"Z"))
    assert one.behaviour == two.behaviour
    assert one.behaviour_text == two.behaviour_text
    assert one.extensions == two.extensions
    assert one.behaviour_text == (
        "b1 tag=A9 lit+=n: CAPABILITY; ID; LOGIN; ENABLE QRESYNC CONDSTORE; NAMESPACE;"
        ' LIST (SUBSCRIBED) "*" RETURN (CHILDREN SPECIAL-USE); STATUS (MESSAGES UIDNEXT UNSEEN);'
        " SELECT (CONDSTORE)"
    )
    assert one.behaviour == "b1_" + hashlib.sha256(one.behaviour_text.encode()).hexdigest()[:12]


def test_same_signature_for_an_account_with_more_folders_than_fit_a_window(
    split: Splitter,
) -> None:
    """Found by attack: the window closed after 48 commands read, so a client that asks each
    folder's STATUS before SELECT gave another signature (no SELECT step) for an account with
    more than about 40 folders. Repeated steps no longer count toward closing it."""
    one = traits_of(split, mail_client(b"alice", b"wonderland", [b"Sent", b"Drafts"], 2))
    for count in (60, 500):
        folders = [b"Folder%d" % i for i in range(count)]
        many = traits_of(split, mail_client(b"bob", b"builder!", folders, 3))
        assert many.behaviour_text == one.behaviour_text, count


def test_a_different_client_has_a_different_signature(split: Splitter) -> None:
    base = mail_client(b"alice", b"wonderland", [b"Sent"], 1)
    other = [(s, d.replace(b"ENABLE QRESYNC CONDSTORE", b"ENABLE CONDSTORE")) for s, d in base]
    numbers = mail_client(b"alice", b"wonderland", [b"Sent"], 1, tag=b"")
    signatures = {traits_of(split, s).behaviour for s in (base, other, numbers)}
    assert len(signatures) == 3


def test_commands_after_the_window_change_only_the_extensions(split: Splitter) -> None:
    start = mail_client(b"alice", b"wonderland", [b"Sent"], 1)
    before = traits_of(split, start)
    after = traits_of(split, start + answered(b"Q1 NAMESPACE", b"Q2 UID MOVE 1 Trash"))
    assert after.behaviour == before.behaviour
    assert set(after.extensions) == set(before.extensions) | {"MOVE"}


def test_before_and_after_login_are_distinct_steps(split: Splitter) -> None:
    script = answered(b"a1 CAPABILITY", b"a2 LOGIN u p", b"a3 CAPABILITY", b"a4 CAPABILITY")
    traits = traits_of(split, script)
    assert traits.behaviour_text == "b1 tag=A9 lit+=n: CAPABILITY; LOGIN; CAPABILITY"


def test_list_pattern_and_tag_shapes() -> None:
    assert [tag_style(t) for t in (b"a001", b"1", b"1.2", b"A-1_b", b"x!y", b"a1b2c3d4")] == [
        "A9",
        "9",
        "9.9",
        "A-9_A",
        "A#A",
        "A9A9A9+",
    ]
    steps = []
    for line in (b'a LIST "" *', b'a LIST "" "*"', b'a LIST "" %', b'a LIST "" ""', b"a LSUB x y"):
        t = Traits()
        p = classify.first_fragment(line)
        t.command(p.tag or b"", p.verb, p.fragment.content, p.fragment.literal)
        text = t.behaviour_text()
        assert text is not None
        steps.append(text.split(": ", 1)[1])
    assert steps == ["LIST *", 'LIST "*"', "LIST %", 'LIST ""', "LSUB name"]


# ------------------------------------------------------------------------------------------
# Hostile input: nothing the client chose reaches the record, and the record stays bounded.

MARKER = b"Zq7Marker"


def test_nothing_the_client_chose_reaches_the_record(split: Splitter) -> None:
    m = MARKER
    script = [
        ("c", m + b"1 CAPABILITY\r\n"),
        ("s", m + b"1 OK done\r\n"),
        (
            "c",
            m + b"2 AUTHENTICATE " + m + b" " + base64.b64encode(b"\0" + m + b"\0" + m) + b"\r\n",
        ),
        ("s", m + b"2 NO no\r\n"),
        ("c", m + b'3 LOGIN "' + m + b'" "' + m + b'"\r\n'),
        ("s", m + b"3 OK in\r\n"),
        *answered(
            m + b"4 ENABLE " + m + b" X-" + m,
            m + b"5 " + m + b" " + m,
            m + b"6 LIST (" + m + b') "' + m + b'" "' + m + b'*" RETURN (' + m + b")",
            m + b"7 STATUS " + m + b" (MESSAGES " + m + b")",
            m + b'8 SEARCH FROM "' + m + b'" SUBJECT ' + m,
            m + b"9 COMPRESS " + m,
            m + b"10 SELECT " + m + b" (" + m + b")",
        ),
    ]
    traits = traits_of(split, script)
    text = json.dumps(traits.to_dict()).lower()
    assert MARKER.decode().lower() not in text
    assert "OTHER" in traits.extensions
    assert traits.behaviour_text is not None
    assert "AUTHENTICATE OTHER IR" in traits.behaviour_text


def hostile_traits(verbs: int, split: Splitter) -> tuple[SessionTraits, Traits]:
    # Unanswered, all of them: the core reads a client that has `max_unanswered` commands
    # waiting no further.
    conv = talk(split, max_unanswered=verbs + 100)
    lines = b"".join(b"t%d X%dVERB%d\r\n" % (i, i, i * 7919) for i in range(verbs))
    for n in range(0, 100_000, 5000):  # 100,000 distinct ENABLE arguments
        lines += b"e ENABLE " + b" ".join(b"E%d" % i for i in range(n, n + 5000)) + b"\r\n"
    conv.client(lines)
    traits = conv.core._traits  # its bounded state, inspected
    conv.client_closes()
    (record,) = conv.of(SessionTraits)
    return record, traits


@pytest.mark.parametrize("how", ["whole", "random"])
def test_a_hundred_thousand_unknown_verbs_give_a_bounded_record(how: str) -> None:
    record, state = hostile_traits(100_000, feeding.SPLITTERS[how])
    assert record.extensions == ("ENABLE", "OTHER")
    assert record.behaviour_text == "b1 tag=A9 lit+=n: OTHER"
    assert "VERB" not in json.dumps(record.to_dict())
    assert len(state.extensions) == 2 and len(state._steps) == 1
    assert state.read == 100_000 + 20  # the verbs and the ENABLE lines


def test_hostile_verbs_byte_by_byte() -> None:
    record, _state = hostile_traits(300, feeding.byte_by_byte)
    assert record.extensions == ("ENABLE", "OTHER")


def test_the_behaviour_text_is_bounded(split: Splitter) -> None:
    # Many different steps from the vocabulary: the text stops at MAX_TEXT, marked.
    items = [b"MESSAGES", b"RECENT", b"UIDNEXT", b"UIDVALIDITY", b"UNSEEN", b"SIZE", b"DELETED"]
    lines = [b"a CAPABILITY"]
    for i in range(1, len(items) + 1):
        for j in range(len(items)):
            lines.append(b"a STATUS x (" + b" ".join(items[j : j + i]) + b")")
    traits = traits_of(split, answered(*lines))
    assert traits.behaviour_text is not None
    assert len(traits.behaviour_text) <= MAX_TEXT
    assert traits.behaviour_text.endswith("; …")


STEP_POOL = [
    b"a CAPABILITY",
    b"a LOGIN u p",
    b"a X-WHAT",
    b'a LIST (SUBSCRIBED REMOTE) "" "*" RETURN (CHILDREN STATUS (MESSAGES UNSEEN SIZE))',
    b'a LIST "" % RETURN (' + b"(" * 200 + b")" * 200 + b")",
    b"a STATUS x (MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN DELETED SIZE HIGHESTMODSEQ)",
    b"a STATUS x (APPENDLIMIT MAILBOXID A B C D E F G H I J K L)",
    b"a ENABLE " + b" ".join(b"X%d" % i for i in range(40)),
    b"a ENABLE CONDSTORE QRESYNC UTF8=ACCEPT IMAP4REV2 METADATA METADATA-SERVER NOTIFY",
    b"a AUTHENTICATE SCRAM-SHA-256-PLUS",
    b"a COMPRESS DEFLATE",
    b"a NAMESPACE",
]


@settings(max_examples=60, deadline=None)
@given(
    picks=st.lists(st.tuples(st.integers(0, len(STEP_POOL) - 1), st.integers(0, 30)), max_size=60)
)
def test_any_command_mix_gives_a_bounded_text_from_the_vocabulary(
    picks: list[tuple[int, int]],
) -> None:
    t = Traits()
    for pick, variant in picks:
        line = STEP_POOL[pick] + (b" (%d)" % variant if pick in (5, 6) else b"")
        p = classify.first_fragment(line)
        t.command(b"a", p.verb, p.fragment.content, p.fragment.literal)
    record = t.record("s", frozenset())
    assert (record is None) == (not picks)
    if record is None:
        return
    assert set(record.extensions) <= EXTENSIONS
    text = record.behaviour_text
    assert text is not None and len(text) <= MAX_TEXT
    assert not re.search(r"X\d|[a-z]", text.split(": ", 1)[1])  # no client words


def test_the_documented_vocabulary_is_the_code_s() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "extensions.md").read_text()
    listed = doc.split("Names:", 1)[1].split("The commands of", 1)[0]
    assert set(re.findall(r"`([^`]+)`", listed)) == EXTENSIONS
    table = doc.split("## What the client sent", 1)[1].split("## Which commands count", 1)[0]
    rows = [r for r in table.splitlines() if r.startswith("| ") and "Recorded" not in r]
    assert len(rows) > 50
    for row in rows:
        recorded = row.rsplit("|", 2)[1]
        for name in re.findall(r"`([A-Z0-9=+\-]+)`", recorded):
            assert name in EXTENSIONS, row


def count_calls(work: Any) -> int:
    """Python and C function calls made while `work()` runs: an operation count."""
    calls = 0

    def profile(_frame: FrameType, event: str, _arg: object) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(profile)
    try:
        work()
    finally:
        sys.setprofile(None)
    return calls


def fed_commands(n: int) -> Any:
    lines = [
        b'a SEARCH RETURN (MIN) OLDER 5 FROM "x"',
        b'a LIST "" * RETURN (STATUS (MESSAGES))',
        b"a UID FETCH 1:* (FLAGS) (CHANGEDSINCE 1)",
        b"a NOOP",
        b"a X-UNKNOWN",
    ]
    parsed = [classify.first_fragment(lexer.strip_eol(line)) for line in lines]

    def work() -> None:
        t = Traits()
        for i in range(n):
            p = parsed[i % len(parsed)]
            t.command(p.tag or b"", p.verb, p.fragment.content, p.fragment.literal)
        t.record("s", frozenset())

    return work


def test_work_is_linear_in_the_commands() -> None:
    small, large = count_calls(fed_commands(1000)), count_calls(fed_commands(4000))
    assert large <= 4 * small + 100


def test_work_is_linear_in_a_long_argument_list() -> None:
    def one(items: int) -> Any:
        line = b"a ENABLE " + b" ".join(b"X%d" % i for i in range(items))
        p = classify.first_fragment(line)

        def work() -> None:
            t = Traits()
            t.command(b"a", p.verb, p.fragment.content, p.fragment.literal)
            t.record("s", frozenset())

        return work

    # Tokens past MAX_TOKENS are not read: a 10x longer line costs no more Python calls.
    assert count_calls(one(20_000)) <= count_calls(one(2_000)) + 10


@settings(max_examples=30, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
def test_any_chunking_gives_the_same_record(cuts: list[int]) -> None:
    script = mail_client(b"alice", b"wonderland", [b"Sent", b"Drafts"], 2)
    script += [("c", b"z1 APPEND Sent (\\Seen) {3+}\r\nabc ~{2+}\r\nde\r\n")]
    script += [("s", b"+ go\r\n"), ("s", b"+ go\r\n"), ("s", b"z1 OK done\r\n")]
    whole = traits_of(feeding.whole, script)
    assert traits_of(splitting_at(cuts), script) == whole
    assert {"MULTIAPPEND", "BINARY", "LITERAL+"} <= set(whole.extensions)
