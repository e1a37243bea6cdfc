"""Extensions in use and behaviour signatures of real clients (imaplib, imapclient) through the
proxy to a real Dovecot: the names the statistics store receives, the same signature for the
same client code whatever the account, and different signatures for different client programs.
"""

from __future__ import annotations

import imaplib
import json
import zlib
from collections.abc import Callable, Iterator

import pytest
import trio
from imapclient import IMAPClient

from imapveil.records import SessionEnded, SessionTraits
from tests.conftest import RunningProxy, start_proxy
from tests.helpers.dovecot import Dovecot

pytestmark = pytest.mark.dovecot

run = trio.to_thread.run_sync

# Two accounts of different shapes: user names, passwords, folder names and counts, messages.
ACCOUNTS = {
    "carolqx7": ("pw-Carol-Kf83", ["ProjectsKq1", "TravelKq2"], 2),
    "davezr5": ("pw-Dave-Lm55", [f"ArchiveZr{i}" for i in range(9)], 6),
}
MESSAGE = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: hello\r\n\r\nhello\r\n"


@pytest.fixture(scope="module")
def accounts() -> Iterator[Dovecot]:
    """A Dovecot of its own, whose accounts have different folders and messages, made by IMAP."""
    server = Dovecot(users={u: p for u, (p, _f, _n) in ACCOUNTS.items()}).start()
    try:
        for user, (password, folders, messages) in ACCOUNTS.items():
            m = imaplib.IMAP4(*server.address)
            m.login(user, password)
            for folder in [*folders, "Archive"]:
                assert m.create(folder)[0] == "OK"
            for _ in range(messages):
                assert m.append("INBOX", None, None, MESSAGE)[0] == "OK"
            m.logout()
        yield server
    finally:
        server.cleanup()


class DeflatingIMAP4(imaplib.IMAP4):
    """imaplib with COMPRESS=DEFLATE (RFC 4978), which it lacks: after the OK, what it sends is
    deflated and what it reads inflated."""

    def compress(self) -> None:
        typ, _data = self.xatom("COMPRESS", "DEFLATE")
        assert typ == "OK"
        self._deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        self._inflate = zlib.decompressobj(-15)
        self._inflated = b""

    def send(self, data: bytes) -> None:  # type: ignore[override]  # imaplib sends bytes
        if hasattr(self, "_deflate"):
            data = self._deflate.compress(data) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
        super().send(data)

    def _fill(self, enough: Callable[[bytes], bool]) -> None:
        while not enough(self._inflated):
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self._inflated += self._inflate.decompress(chunk)

    def readline(self) -> bytes:
        if not hasattr(self, "_inflate"):
            return super().readline()
        self._fill(lambda b: b"\n" in b)
        at = self._inflated.find(b"\n") + 1 or len(self._inflated)
        line, self._inflated = self._inflated[:at], self._inflated[at:]
        return line

    def read(self, size: int) -> bytes:
        if not hasattr(self, "_inflate"):
            return super().read(size)
        self._fill(lambda b: len(b) >= size)
        data, self._inflated = self._inflated[:size], self._inflated[size:]
        return data


def idle_briefly(m: imaplib.IMAP4) -> None:
    """IDLE and DONE (imaplib of Python 3.11 has no IDLE)."""
    tag = m._new_tag()  # imaplib's own tag sequence
    m.send(tag + b" IDLE\r\n")
    assert m.readline().startswith(b"+")
    m.send(b"DONE\r\n")
    while not (line := m.readline()).startswith(tag):
        assert line
    assert line.startswith(tag + b" OK")


def imaplib_client(address: tuple[str, int], user: str, password: str) -> None:
    """One program's session: the same code whatever the account."""
    m = DeflatingIMAP4(*address)
    m.login(user, password)
    m.compress()
    assert m.enable("QRESYNC")[0] == "OK"
    assert m.list('""', "* RETURN (STATUS (MESSAGES))")[0] == "OK"
    assert m.response("STATUS")[1] != [None]  # Dovecot answered with LIST-STATUS
    assert m.select("INBOX (CONDSTORE)")[0] == "OK"
    assert m.uid("FETCH", "1:*", "(FLAGS) (CHANGEDSINCE 1)")[0] == "OK"
    assert m.uid("MOVE", "1", "Archive")[0] == "OK"
    assert m.append("INBOX", None, None, MESSAGE)[0] == "OK"  # keeps the count for a rerun
    idle_briefly(m)
    m.logout()


def imapclient_client(address: tuple[str, int], user: str, password: str) -> None:
    with IMAPClient(address[0], port=address[1], ssl=False) as c:
        c.login(user, password)
        c.enable("CONDSTORE")
        for _flags, _delimiter, name in c.list_folders():
            c.folder_status(name, ["MESSAGES", "UNSEEN"])
        c.select_folder("INBOX")
        c.fetch(c.search("ALL"), ["FLAGS"], modifiers=["CHANGEDSINCE 1"])
        c.idle()
        c.idle_done()
        c.logout()


async def session_traits(
    dovecot: Dovecot, client: Callable[[tuple[str, int], str, str], None], user: str
) -> tuple[SessionTraits, RunningProxy]:
    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(nursery, dovecot.address, compress=True)
        password = ACCOUNTS[user][0]
        await run(client, proxy.address, user, password)
        await proxy.sink.wait_for(SessionEnded)
        proxy.proxy.stop()
    (traits,) = proxy.sink.of(SessionTraits)
    (end,) = proxy.sink.of(SessionEnded)
    assert end.reason == "logout"
    return traits, proxy


def private_words() -> Iterator[str]:
    for user, (password, folders, _n) in ACCOUNTS.items():
        yield from (user, password, *folders)


def assert_nothing_private(traits: SessionTraits) -> None:
    text = json.dumps(traits.to_dict()).lower()
    for word in private_words():
        assert word.lower() not in text


async def test_imaplib_extensions_and_the_same_signature_for_both_accounts(
    accounts: Dovecot,
) -> None:
    carol, _p = await session_traits(accounts, imaplib_client, "carolqx7")
    dave, _p = await session_traits(accounts, imaplib_client, "davezr5")
    expected = {
        "COMPRESS=DEFLATE",
        "CONDSTORE",
        "ENABLE",
        "IDLE",
        "LIST-EXTENDED",
        "LIST-STATUS",
        "MOVE",
        "QRESYNC",
    }
    assert set(carol.extensions) == expected
    assert carol.extensions == tuple(sorted(expected))
    assert dave.extensions == carol.extensions
    assert carol.behaviour is not None and carol.behaviour.startswith("b1_")
    assert dave.behaviour == carol.behaviour
    assert carol.behaviour_text == (
        "b1 tag=A9 lit+=n: CAPABILITY; LOGIN; COMPRESS DEFLATE; ENABLE QRESYNC;"
        " LIST * RETURN (STATUS (MESSAGES)); SELECT (CONDSTORE)"
    )
    assert carol.ja4 is None  # no TLS on the client leg
    assert_nothing_private(carol)
    assert_nothing_private(dave)


async def test_imapclient_same_signature_for_both_accounts_and_not_imaplibs(
    accounts: Dovecot,
) -> None:
    carol, _p = await session_traits(accounts, imapclient_client, "carolqx7")
    dave, _p = await session_traits(accounts, imapclient_client, "davezr5")
    assert set(carol.extensions) == {"CONDSTORE", "ENABLE", "IDLE"}
    assert dave.extensions == carol.extensions
    assert dave.behaviour == carol.behaviour
    assert dave.behaviour_text == carol.behaviour_text
    assert_nothing_private(carol)
    assert_nothing_private(dave)
    assert carol.behaviour_text == (
        'b1 tag=A9 lit+=n: CAPABILITY; LOGIN; ENABLE CONDSTORE; LIST "*"; STATUS (MESSAGES UNSEEN);'
        " SELECT"
    )
    lib, _p = await session_traits(accounts, imaplib_client, "carolqx7")
    assert lib.behaviour != carol.behaviour


def imaplib_plain(address: tuple[str, int], user: str, password: str) -> None:
    """LOGIN, LIST, SELECT, LOGOUT in imaplib's way (and below, in imapclient's)."""
    m = imaplib.IMAP4(*address)
    m.login(user, password)
    m.list()
    m.select("INBOX")
    m.logout()


def imapclient_plain(address: tuple[str, int], user: str, password: str) -> None:
    with IMAPClient(address[0], port=address[1], ssl=False) as c:
        c.login(user, password)
        c.list_folders()
        c.select_folder("INBOX")
        c.logout()


async def test_the_same_task_in_two_libraries_gives_two_signatures(accounts: Dovecot) -> None:
    lib, _p = await session_traits(accounts, imaplib_plain, "carolqx7")
    client, _p = await session_traits(accounts, imapclient_plain, "carolqx7")
    lib_dave, _p = await session_traits(accounts, imaplib_plain, "davezr5")
    client_dave, _p = await session_traits(accounts, imapclient_plain, "davezr5")
    assert lib.behaviour == lib_dave.behaviour
    assert client.behaviour == client_dave.behaviour
    assert lib.behaviour != client.behaviour
    # imaplib writes LIST's pattern as an atom, imapclient quotes it.
    assert lib.behaviour_text == "b1 tag=A9 lit+=n: CAPABILITY; LOGIN; LIST *; SELECT"
    assert client.behaviour_text == 'b1 tag=A9 lit+=n: CAPABILITY; LOGIN; LIST "*"; SELECT'
    assert lib.extensions == client.extensions == ()
