"""Round 14 of attacks from outside: more places Dovecot writes what a client sent into its
answer with raw line ends, through the proxy (built as `imapveil serve` builds it) to a real
Dovecot.

- A CATENATE URL whose mailbox is percent-encoded (`URL "/x%0A%2B%20y/;UID=1"`): Dovecot
  decodes it and writes the name into its answer as it is (`NO [BADURL ...] Mailbox doesn't
  exist: x`, LF, `+ y`). No raw line end and no modified UTF-7 run reach the proxy, so round 13's
  checks let it through; the `+` released a pipelined refused command's literal to Dovecot.
- A literal longer than a small `max_line_length` (1024) was not read for line ends; Dovecot
  echoes strings up to its own line limit (64 KiB).
- Two IDs the proxy rewrites piece by piece (a value a quoted string cannot carry), pipelined:
  the first one's last piece opened the gate, the second was decided before the first was
  answered, and that answer threw its pieces away: Dovecot's "+" reached the client, and
  Dovecot and the proxy waited for each other.
- Held (regression guard): with COMPRESS on the client leg and the attack cut into DEFLATE
  flushes of 7 octets, the literal, URL and modified UTF-7 echoes are refused the same way.
"""

from __future__ import annotations

import socket
import zlib
from pathlib import Path

import pytest
import trio

from imapveil.records import CommandCompleted, Violation
from tests.helpers.attack import (
    Client,
    DovecotLog,
    Identifiers,
    compress_after_login,
    veil,
)
from tests.helpers.dovecot import Dovecot

pytestmark = pytest.mark.dovecot
run = trio.to_thread.run_sync


# --- Percent-encoded line ends in a CATENATE URL.

URLS = [b"/x%0A%2B%20y/;UID=1", b"/x%0d%0a%2B%20y/;UID=1", b"/x%0A%2B%20y/;UID=1/;SECTION=1"]


def test_dovecot_echoes_a_decoded_url_line_end(target: Dovecot) -> None:
    """The premise, on a direct connection: the decoded mailbox's LF starts a line."""
    with Client(target.address) as c:
        c.greeting()
        c.login()
        c.send(b'u APPEND INBOX CATENATE (URL "' + URLS[0] + b'")\r\n')
        c.until(b"u")
        c.send(b"z NOOP\r\n")
        c.until(b"z")
        assert b"\n+ y" in c.transcript, c.transcript[-300:]


def url_session(address: tuple[str, int], url: bytes, as_literal: bool, smuggled: bytes) -> bytes:
    with Client(address) as c:
        c.greeting()
        c.login()
        quoted = b"{%d+}\r\n" % len(url) + url if as_literal else b'"' + url + b'"'
        c.send(
            b"u APPEND INBOX CATENATE (URL "
            + quoted
            + b")\r\nb XFOO {%d+}\r\n" % len(smuggled)
            + smuggled
            + b"\r\nd NOOP\r\n"
        )
        c.until(b"d")  # b"" if the proxy ended the session
        return c.logout()


@pytest.mark.parametrize("as_literal", [False, True], ids=["quoted", "literal"])
@pytest.mark.parametrize("url", URLS)
async def test_a_percent_encoded_line_end_in_a_url_is_refused(
    target: Dovecot, tmp_path: Path, url: bytes, as_literal: bool
) -> None:
    ids = Identifiers()
    log = DovecotLog(target)
    async with veil(target.address, tmp_path) as v:
        transcript = await run(url_session, v.address, url, as_literal, ids.id_command(b"c"))
        await v.sessions_ended(1)
    assert ids.in_log(log.settled(1)) == []
    assert b"\n+ y" not in transcript, transcript[-600:]
    answers = {r.tag: r.status for r in v.sink.of(CommandCompleted)}
    assert "c" not in answers and answers.get("u") in (None, "BAD"), answers
    kinds = [r.kind for r in v.sink.of(Violation)]
    assert ("refused_line_end" if as_literal else "refused_escaped_control") in kinds, kinds
    assert ids.in_records(v.records_json()) == []


# --- A literal longer than the proxy's line limit, shorter than Dovecot's.


def long_literal_session(address: tuple[str, int], echoed: bytes, smuggled: bytes) -> bytes:
    with Client(address) as c:
        c.greeting()
        c.login()
        c.send(b"s EXAMINE INBOX\r\n")
        c.until(b"s")
        c.send(
            b"s1 SEARCH {%d+}\r\n" % len(echoed)
            + echoed
            + b"\r\nb XFOO {%d+}\r\n" % len(smuggled)
            + smuggled
            + b"\r\nd NOOP\r\n"
        )
        c.until(b"d")  # b"" if the proxy ended the session
        return c.logout()


async def test_a_line_end_in_a_literal_longer_than_max_line_is_refused(
    target: Dovecot, tmp_path: Path
) -> None:
    """`max_line_length = 1024` (the least it takes): Dovecot still reads and echoes strings up
    to its own line limit (64 KiB), so a 2,000-octet literal with a line end made lines of the
    client's choosing."""
    ids = Identifiers()
    log = DovecotLog(target)
    echoed = b"n" * 2000 + b"X\r\n+ OK"
    async with veil(target.address, tmp_path, max_line_length=1024) as v:
        transcript = await run(long_literal_session, v.address, echoed, ids.id_command(b"c"))
        await v.sessions_ended(1)
    assert ids.in_log(log.settled(1)) == []
    assert b"\n+ OK" not in transcript and b"* BYE" in transcript, transcript[-600:]
    answers = {r.tag: r.status for r in v.sink.of(CommandCompleted)}
    assert "c" not in answers and answers.get("s1") is None, answers
    assert ids.in_records(v.records_json()) == []


# --- The ID gate: rewritten IDs sent piece by piece.

NAME = "Mail caf\u00e9".encode()
"""A value that a quoted string cannot carry (the passthrough policy keeps it): the proxy sends
it as a literal of its own, on the server's "+" (the DRIVE gate)."""


def driven_ids_session(address: tuple[str, int]) -> bytes:
    with Client(address) as c:
        c.greeting()
        c.login()
        c.send(
            b"".join(
                b'%s ID ("name" {%d+}\r\n%s)\r\n' % (tag, len(NAME), NAME) for tag in (b"t1", b"t2")
            )
            + b"d NOOP\r\n"
        )
        assert c.until(b"d").startswith(b"d OK"), c.transcript[-600:]
        return c.logout()


async def test_ids_rewritten_piece_by_piece_are_answered_in_turn(
    target: Dovecot, tmp_path: Path
) -> None:
    """The first ID's last piece cleared the DRIVE gate: the second was read and decided before
    the first was answered, and that answer threw away the second's pieces. Dovecot's "+" for
    them reached the client, Dovecot waited for the literal, the proxy for Dovecot."""
    async with veil(target.address, tmp_path, policy="passthrough") as v:
        transcript = await run(driven_ids_session, v.address)
        await v.sessions_ended(1)
    assert b"\r\n+ " not in transcript, transcript[-600:]
    answers = [(r.tag, r.status) for r in v.sink.of(CommandCompleted)]
    assert answers == [("L", "OK"), ("t1", "OK"), ("t2", "OK"), ("d", "OK"), ("Q", "OK")], answers


# --- Held: the same attacks with COMPRESS on the client leg, cut into many DEFLATE flushes.


def compressed_session(address: tuple[str, int], attack: bytes) -> bytes:
    """LOGIN, COMPRESS DEFLATE, then `attack` a few octets per flush; what came back, inflated."""
    with socket.create_connection(address, timeout=5) as s:
        compress_after_login(s)
        deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        for i in range(0, len(attack), 7):
            s.sendall(deflate.compress(attack[i : i + 7]) + deflate.flush(zlib.Z_SYNC_FLUSH))
        inflate = zlib.decompressobj(-15)
        got = b""
        while b"* BYE" not in got and (data := s.recv(65536)):
            got += inflate.decompress(data)
        return got  # (the proxy's EOF would come after its close grace: no half-close in DEFLATE)


def attacks(smuggled: bytes) -> list[bytes]:
    echoed = b"X\r\n+ OK"
    tail = b"b XFOO {%d+}\r\n" % len(smuggled) + smuggled + b"\r\nd NOOP\r\nQ LOGOUT\r\n"
    return [
        b"s1 SEARCH {%d+}\r\n" % len(echoed) + echoed + b"\r\n" + tail,
        b'u APPEND INBOX CATENATE (URL "/x%0A%2B%20y/;UID=1")\r\n' + tail,
        b'a SELECT "x&AAo-+ y"\r\n' + tail,
    ]


@pytest.mark.parametrize("which", range(3))
async def test_compress_does_not_change_what_is_refused(
    target: Dovecot, tmp_path: Path, which: int
) -> None:
    ids = Identifiers()
    log = DovecotLog(target)
    async with veil(target.address, tmp_path, compress=True) as v:
        got = await run(compressed_session, v.address, attacks(ids.id_command(b"c"))[which])
        await v.sessions_ended(1)
    assert ids.in_log(log.settled(1)) == []
    assert b"\n+ " not in got, got[-600:]
    assert "c" not in {r.tag for r in v.sink.of(CommandCompleted)}
