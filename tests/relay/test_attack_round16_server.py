"""Round 16 of attacks on the server's side of the stream: text where no literal can be, ending
like a literal announcement, used to make the proxy's reading of the server's stream differ from
the client's. Dovecot echoes a client's strings (mailbox names in `NO` texts, LIST and STATUS
names, METADATA values, ESEARCH tags, keywords); a hostile server writes any text it likes.

- Dovecot, directly and through the proxy, answers the same: every echo (`x {5}`, `{5}}`,
  `q"x {0}`, a message `{5}` CRLF, a keyword `x}`) comes back as Dovecot sent it and the next
  command's answer with it (tests/protocol/test_server_status_text.py has the same in the core).
- A scripted server's status and continuation texts ending `{N}`, `{N+}`, `~{N}`, `{0}`, with N
  octets after them that look like responses (a `* ID` with an identifier): the texts go out as
  they came, the octets after them are read as the lines they are (the ID filtered).
- A kind run into what follows it (`* OK[ALERT] x {N}`) was read as a kind of its own whose
  literal the proxy passed unread, an ID in it past the policy for a client that reads `OK` and
  text. Now the session ends with `* BYE [SERVERBUG]`.
- A literal announced inside a quoted string that never closed (`* 1 FETCH (X "a {N}`): the
  proxy counted it and passed its octets unread, which a client that reads a quoted string on
  across the line's end (K-9 Mail) reads as lines. Now `* BYE [SERVERBUG]` too.
- Upstream STARTTLS refused, bytes after its OK (in the OK's segment, or in the clear where the
  handshake should be: CVE-2011-0411's shape), a handshake cut off, another CA's certificate:
  the client gets `* BYE [UNAVAILABLE]`, its LOGIN (sent before any greeting) never reaches the
  server, and nothing the server said in the clear is shown as a response (no change needed).
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trustme

from imapveil.records import CommandCompleted, Violation
from tests.conftest import TlsMaterial
from tests.helpers.attack import Client, veil
from tests.helpers.dovecot import Dovecot
from tests.helpers.scripted import Peer, serve
from tests.relay.test_attack_round15_server import BYE, Hostile, hostile_client
from tests.relay.test_attack_simple import Fed, Scripted, Typist, comparable, normal

run = trio.to_thread.run_sync

GREETING = b"* OK [CAPABILITY IMAP4rev1 LITERAL+ ID IDLE] fake ready\r\n"
UUID = b"0a1b2c3d-1111-2222-3333-444455556666"
HIDDEN = b'* ID ("name" "Dovecot" "guid" "' + UUID + b'")\r\n'
N = len(HIDDEN)

METADATA = """mail_attribute_dict = file:%h/Maildir/dovecot-attributes
protocol imap {
  imap_metadata = yes
}
"""


@contextlib.contextmanager
def dovecot_with_metadata() -> Iterator[Dovecot]:
    server = Dovecot(extra_config=METADATA).start()
    try:
        yield server
    finally:
        server.cleanup()


MESSAGE = (
    b'From: "x {5}" <a@example.org>\r\n'
    b"Subject: end {5}\r\n"
    b"X-End: v {0}\r\n"
    b"To: =?utf-8?q?=C3=BC_{5}?= <b@example.org>\r\n"
    b'Content-Type: text/plain; name="q \\"{5}\\""\r\n'
    b"\r\n"
    b"body {5}\r\n"
    b"{5}\r\n"
)
"""A message whose headers and text end like literal announcements (Dovecot shows them in
ENVELOPE, BODYSTRUCTURE, PREVIEW and header fetches)."""

# Commands whose answers echo the client's strings; `None` between pieces: wait for the `+`.
ECHOES: list[tuple[bytes | None, ...]] = [
    (b'p1 ID ("name" "v {5}")\r\n',),
    (b"LOGIN",),
    (b'a1 SELECT "x {5}"\r\n',),  # NO Mailbox doesn't exist: x {5}
    (b'a2 SELECT "x {0}"\r\n',),
    (b'a3 EXAMINE "y {5+}"\r\n',),
    (b'a4 CREATE "x {5}"\r\n',),
    (b'a5 LIST "" "*"\r\n',),  # * LIST (\HasNoChildren) "." "x {5}"
    (b'a6 STATUS "x {5}" (MESSAGES)\r\n',),
    (b"a7 SELECT {4}\r\n", None, b"{5}}\r\n"),
    (b"a8 CREATE {7}\r\n", None, b'q"x {0}\r\n'),
    (b'a9 LIST "" "q*"\r\n',),  # "q\"x {0}"
    (b'a10 LIST "" "*" RETURN (STATUS (MESSAGES))\r\n',),
    (b'a11 SETMETADATA "" (/private/comment "end {5}")\r\n',),
    (b'a12 GETMETADATA "" /private/comment\r\n',),  # (/private/comment {7} CRLF end {5})
    (b'a13 APPEND "x {5}" {5}\r\n', None, b"{5}\r\n\r\n"),
    (b'a14 SELECT "x {5}"\r\n',),
    (b"a15 FETCH 1 (BODY[])\r\n",),  # BODY[] {5} CRLF {5} CRLF )
    (b"a16 STORE 1 +FLAGS (x})\r\n",),  # * FLAGS (... x}), PERMANENTFLAGS (... x} \*)
    (b"a17 FETCH 1 (BODY.PEEK[HEADER.FIELDS (X-A})])\r\n",),
    (b"a18 SEARCH RETURN (MIN) ALL\r\n",),  # * ESEARCH (TAG "a18") MIN 1
    (b'a19 SEARCH HEADER "x {5}" "y {5}"\r\n',),
    (b'a20 RENAME "nope {5}" "y {5}"\r\n',),
    (b'a21 DELETE "nope {0}"\r\n',),
    (b'a22 FOO "x {5}"\r\n',),  # BAD Error in IMAP command FOO: Unknown command
    (b'a23 GETMETADATA "nope {5}" /private/comment\r\n',),
    (b'a24 APPEND "x {5}" {%d}\r\n' % len(MESSAGE), None, MESSAGE + b"\r\n"),
    (b"a25 NOOP\r\n",),  # * 2 EXISTS
    # The message's headers come back quoted or as literals, inside lists that end in ")".
    (b"a26 FETCH 2 (ENVELOPE BODYSTRUCTURE PREVIEW)\r\n",),
    (b"a27 FETCH 2 (BODY.PEEK[HEADER.FIELDS (SUBJECT X-END)])\r\n",),
    (b'a28 SEARCH RETURN (ALL) SUBJECT "end {5}"\r\n',),
    (b"a29 NOOP\r\n",),
]


def echoes(address: tuple[str, int], user: bytes, password: bytes) -> dict[bytes, bytes]:
    """Each command's answers, as received, by tag."""
    answers = {}
    with Client(address) as c:
        c.greeting()
        for pieces in ECHOES:
            start = len(c.transcript)
            if pieces == (b"LOGIN",):
                c.login(user, password)
                continue
            for piece in pieces:
                if piece is None:
                    assert c.line().startswith(b"+ "), c.transcript
                else:
                    c.send(piece)
            first = pieces[0]
            assert first is not None
            tag = first.split(b" ")[0]
            assert c.until(tag), c.transcript
            answers[tag] = normal(c.transcript[start:])
        c.logout()
    return answers


@pytest.mark.dovecot
async def test_dovecots_echoes_come_back_as_dovecot_sent_them(tmp_path: Path) -> None:
    """alice directly, bob through the proxy (both new): the same answers, command by command,
    and the next command's answer follows each (the proxy's framing is Dovecot's)."""
    with dovecot_with_metadata() as target:
        direct = await run(echoes, target.address, b"alice", b"wonderland")
        assert b"a1 NO Mailbox doesn't exist: x {5}" in direct[b"a1"], direct
        assert b"(/private/comment {7}\r\nend {5})\r\n" in direct[b"a12"]
        assert b"BODY[] {5}\r\n{5}\r\n)\r\na15 OK" in direct[b"a15"]
        assert b"a7 NO Mailbox doesn't exist: {5}}" in direct[b"a7"]
        async with veil(target.address, tmp_path) as v:
            proxied = await run(echoes, v.address, b"bob", b"builder")
            (end,) = await v.sessions_ended(1)
    assert proxied == direct
    assert end.reason == "logout"
    assert not v.sink.of(Violation)
    assert all(r.status is not None for r in v.sink.of(CommandCompleted))


# --- A scripted server's texts.


class Texts(Scripted):
    """Greets, answers LOGIN, reads `b NOOP` and `c NOOP`, says `answers` (one receive), then
    answers `d NOOP` and LOGOUT."""

    def __init__(self, fed: Fed, answers: bytes) -> None:
        super().__init__(fed)
        self.answers = answers

    async def script(self, peer: Peer) -> None:
        await self._say(peer, GREETING)
        await self._line(peer, b"L LOGIN")
        await self._say(peer, b"L OK in\r\n")
        await self._line(peer, b"b NOOP")
        await self._line(peer, b"c NOOP")
        await self._say(peer, self.answers)
        await self._line(peer, b"d NOOP")
        await self._say(peer, b"d OK\r\n")
        await self._line(peer, b"Q LOGOUT")
        await self._say(peer, b"* BYE bye\r\nQ OK\r\n")
        await trio.aclose_forcefully(peer.stream)


def texts_client(address: tuple[str, int], fed: Fed) -> bytes:
    with Typist(address, fed) as c:
        c.greeting()
        c.alone(b"L LOGIN x pw\r\n")
        c.through(b"L OK in\r\n")
        c.alone(b"b NOOP\r\nc NOOP\r\n")
        assert c.until(b"c"), c.transcript
        c.alone(b"d NOOP\r\n")
        assert c.until(b"d") == b"d OK\r\n", c.transcript
        c.alone(b"Q LOGOUT\r\n")
        return c.rest()


TEXTS = {
    "ok": b"* OK x {%d}\r\n" % N,
    "no": b"* NO Mailbox doesn't exist: x {%d}\r\n" % N,
    "alert": b"* OK [ALERT] {%d}\r\n" % N,
    "plus": b"* BAD x {%d+}\r\n" % N,
    "binary": b"* NO x ~{%d}\r\n" % N,
    "zero": b"* OK x {0}\r\n",
    "continuation": b"+ x {%d}\r\n" % N,
    "tagged": b"b NO Mailbox doesn't exist: x {%d}\r\n" % N,
}


@pytest.mark.parametrize("name", list(TEXTS))
async def test_a_status_text_ending_like_a_literal_announces_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    text = TEXTS[name]
    answers = text + HIDDEN + (b"" if text.startswith(b"b ") else b"b OK\r\n") + b"c OK\r\n"
    fed = Fed(monkeypatch)
    outcomes = []
    for _ in fed.each_way():
        server = Texts(fed, answers)
        async with serve(server.script, server.sent) as address, veil(address, tmp_path) as v:
            transcript = await run(texts_client, v.address, fed)
            (end,) = await v.sessions_ended(1)
        # The text as it came, then the ID read as a line: filtered, the guid gone.
        assert text + b'* ID ("name" "Dovecot" "x-imapveil" ' in transcript
        assert UUID not in transcript
        assert transcript.endswith(b"c OK\r\nd OK\r\n* BYE bye\r\nQ OK\r\n")
        assert end.reason == "logout"
        assert not v.sink.of(Violation)
        outcomes.append((transcript, comparable(v.sink.records)))
    fast, general = outcomes
    assert fast == general


SMUGGLED = b'")\r\n' + HIDDEN + b"* 2 FETCH (Y "
"""After a `{N}` inside a quoted string: to a client that reads the string on across the line's
end (K-9 Mail), the string ends at their first octet and HIDDEN is a line."""

# (the line, announcing a literal of the octets after it; the violation's kind)
RUN_ON = {
    "ok-code": (b"* OK[ALERT] x {%d}\r\n" % N + HIDDEN, "unparsable_response"),
    "bye-code": (b"* BYE[x] {%d}\r\n" % N + HIDDEN, "unparsable_response"),
    "id": (b"* ID[ {%d}\r\n" % N + HIDDEN, "unparsable_response"),
    "capability": (b"* CAPABILITY[x] {%d}\r\n" % N + HIDDEN, "unparsable_response"),
    "digit-in-kind": (b"* X1 {%d}\r\n" % N + HIDDEN, "unparsable_response"),
    "message-data-kind": (b"* 1 FETCH1 {%d}\r\n" % N + HIDDEN, "unparsable_response"),
    "in-quotes": (
        b'* 1 FETCH (X "a {%d}\r\n' % len(SMUGGLED) + SMUGGLED + b"NIL)\r\n",
        "bad_literal",
    ),
}


@pytest.mark.parametrize("name", list(RUN_ON))
async def test_a_response_kind_run_into_its_text_ends_the_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Before round 16 the line went out, its `{N}` counted, and the ID after it unread: a
    client that reads `OK` and text (imaplib), or a quoted string across a line's end (K-9),
    read the guid."""
    line, kind = RUN_ON[name]
    fed = Fed(monkeypatch)
    outcomes = []
    for _ in fed.each_way():
        server = Hostile(fed, [b"* 3 EXISTS\r\n" + line + b"b OK\r\nc OK\r\n"])
        async with serve(server.script, server.sent) as address, veil(address, tmp_path) as v:
            transcript = await run(hostile_client, v.address, fed)
            (end,) = await v.sessions_ended(1)
            with trio.fail_after(5):
                await server.eof.wait()
        assert transcript == GREETING + b"L OK in\r\n* 3 EXISTS\r\n" + BYE
        assert UUID not in transcript
        assert [(r.source, r.kind, r.action) for r in v.sink.of(Violation)] == [
            ("server", kind, "closed")
        ]
        assert (end.reason, end.detail) == ("protocol_error", f"server: {kind}")
        outcomes.append((transcript, comparable(v.sink.records)))
    fast, general = outcomes
    assert fast == general


# --- STARTTLS toward an upstream that misbehaves (`upstream_tls = "starttls"`).

PLAIN_GREETING = b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] fake ready\r\n"
UNAVAILABLE = b"* BYE [UNAVAILABLE] Mail server is not reachable\r\n"
SECRET = b"pw-5d1e0c9b77"


class StartTls:
    """Greets in the clear and answers STARTTLS as `how` says; under TLS (if it gets there)
    answers CAPABILITY, a LOGIN and LOGOUT. Keeps what it received in the clear (`clear`) and
    under TLS (`secure`)."""

    def __init__(self, how: str, context: ssl.SSLContext) -> None:
        self.how = how
        self.context = context
        self.sent = bytearray()
        self.clear = bytearray()
        self.secure = bytearray()
        self._buffer = bytearray()
        self.done = trio.Event()

    async def script(self, peer: Peer) -> None:
        try:
            await self._script(peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self.done.set()

    async def _line(self, stream: trio.abc.Stream, kept: bytearray) -> bytes:
        while b"\n" not in self._buffer:
            data = await stream.receive_some(65536)
            if not data:
                return b""
            kept += data
            self._buffer += data
        end = self._buffer.index(b"\n") + 1
        line = bytes(self._buffer[:end])
        del self._buffer[:end]
        return line

    async def _script(self, peer: Peer) -> None:
        raw = peer.stream
        await peer.say(PLAIN_GREETING)
        assert await self._line(raw, self.clear) == b"imapveil.0 STARTTLS\r\n"
        how = self.how
        if how == "refused":
            await peer.say(b"imapveil.0 NO [UNAVAILABLE] not now\r\n")
        elif how == "injected":
            # One segment: the OK and what a man in the middle adds after it.
            await peer.say(b"imapveil.0 OK Begin TLS\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n")
        elif how == "cleartext":
            # The OK, then (once the proxy's ClientHello came) responses in the clear.
            await peer.say(b"imapveil.0 OK Begin TLS\r\n")
            self.clear += await raw.receive_some(65536)
            await peer.say(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nimapveil.1 OK\r\n" + HIDDEN)
        elif how == "cut":
            # The handshake starts and is cut off midway (after the ClientHello).
            await peer.say(b"imapveil.0 OK Begin TLS\r\n")
            self.clear += await raw.receive_some(65536)
            await peer.say(b"\x16\x03\x03\x00\x40" + b"\x02" * 8)  # half a ServerHello record
            await trio.aclose_forcefully(raw)
            return
        else:  # "tls" (with a trusted certificate) or "untrusted" (another CA's)
            await peer.say(b"imapveil.0 OK Begin TLS\r\n")
            tls = trio.SSLStream(raw, self.context, server_side=True)
            await tls.do_handshake()
            assert await self._line(tls, self.secure) == b"imapveil.1 CAPABILITY\r\n"
            await tls.send_all(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN ID\r\nimapveil.1 OK\r\n")
            assert (await self._line(tls, self.secure)).startswith(b"a LOGIN ")
            await tls.send_all(b"a OK in\r\n")
            assert await self._line(tls, self.secure) == b"Q LOGOUT\r\n"
            await tls.send_all(b"* BYE bye\r\nQ OK\r\n")
            await tls.aclose()
            return
        # Keep what comes in the clear until the proxy closes.
        while data := await raw.receive_some(65536):
            self.clear += data


def early_login(address: tuple[str, int]) -> bytes:
    """LOGIN before any greeting (a client that does not wait), then LOGOUT once answered."""
    with Client(address) as c:
        c.send(b"a LOGIN bob " + SECRET + b"\r\n")
        if c.line() != UNAVAILABLE and c.until(b"a"):
            c.send(b"Q LOGOUT\r\n")
        return c.rest()


STARTTLS_CASES = {
    # How the upstream misbehaves: what the session's end says (OpenSSL's reason).
    "refused": ("tls: STARTTLS refused",),
    # One segment, as sent (were it split, the handshake would read the line: not TLS).
    "injected": ("tls: data after the STARTTLS OK", "tls: wrong_version_number"),
    "cleartext": ("tls: wrong_version_number",),
    "cut": ("tls: unexpected_eof_while_reading",),
    "untrusted": ("tls: certificate_verify_failed",),
}


@pytest.mark.parametrize("how", list(STARTTLS_CASES))
async def test_an_upstream_starttls_that_misbehaves_gets_nothing_in_the_clear(
    tmp_path: Path, tls_material: TlsMaterial, how: str
) -> None:
    """Refused, bytes after the OK (in its segment, or in the clear where the handshake should
    be), a handshake cut off, a certificate of another CA: the client is told the server is
    unreachable, and its LOGIN, sent at once, never reaches the server, in the clear or at
    all; nothing the server sent in the clear is shown to it."""
    if how == "untrusted":
        other = trustme.CA().issue_cert("127.0.0.1")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        other.configure_cert(context)
    else:
        context = tls_server_context(tls_material)
    server = StartTls(how, context)
    async with (
        serve(server.script, server.sent) as address,
        veil(
            address,
            tmp_path,
            upstream_tls="starttls",
            upstream_ca=str(tls_material.ca_file),
            connect_timeout=2,
        ) as v,
    ):
        transcript = await run(early_login, v.address)
        (end,) = await v.sessions_ended(1)
        with trio.fail_after(5):
            await server.done.wait()
    assert transcript == UNAVAILABLE
    assert end.reason == "upstream_unavailable"
    assert end.detail in STARTTLS_CASES[how], end.detail
    assert b"LOGIN" not in server.clear and not server.secure
    assert SECRET.decode() not in v.records_json()


def tls_server_context(tls_material: TlsMaterial) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_material.cert, tls_material.key)
    return context


async def test_an_upstream_starttls_that_works_carries_the_login_under_tls(
    tmp_path: Path, tls_material: TlsMaterial
) -> None:
    """The control: the same script, TLS done; the LOGIN reaches the server under TLS only,
    and the client sees the capabilities announced under it."""
    server = StartTls("tls", tls_server_context(tls_material))
    async with (
        serve(server.script, server.sent) as address,
        veil(
            address, tmp_path, upstream_tls="starttls", upstream_ca=str(tls_material.ca_file)
        ) as v,
    ):
        transcript = await run(early_login, v.address)
        (end,) = await v.sessions_ended(1)
        with trio.fail_after(5):
            await server.done.wait()
    assert transcript.startswith(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN ID")
    assert transcript.endswith(b"] fake ready\r\na OK in\r\n* BYE bye\r\nQ OK\r\n")
    assert end.reason == "logout"
    assert server.clear == b"imapveil.0 STARTTLS\r\n"  # the only line in the clear
    assert b"a LOGIN bob " + SECRET + b"\r\n" in server.secure


async def test_a_long_line_with_a_literal_inside_a_quoted_string_ends_the_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Longer than the proxy holds (64 KiB): it streams to the client as it comes, and only
    its tail was read for the literal. Now the quoted strings are followed as it streams: the
    session closes before the literal's octets (no BYE: the client is inside the line)."""
    line = b'* 1 FETCH (X "' + b"x" * 70_000 + b" {%d}\r\n" % len(SMUGGLED)
    fed = Fed(monkeypatch)
    server = Hostile(fed, [line[:66_000], line[66_000:] + SMUGGLED + b"NIL)\r\nb OK\r\nc OK\r\n"])
    async with serve(server.script, server.sent) as address, veil(address, tmp_path) as v:
        transcript = await run(hostile_client, v.address, fed)
        (end,) = await v.sessions_ended(1)
        with trio.fail_after(5):
            await server.eof.wait()
    assert transcript == GREETING + b"L OK in\r\n" + line
    assert UUID not in transcript
    assert [(r.kind, r.action) for r in v.sink.of(Violation)] == [("bad_literal", "closed")]
    assert (end.reason, end.detail) == ("protocol_error", "server: bad_literal")
