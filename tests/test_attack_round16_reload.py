"""Round 16: reloads (SIGHUP) while sessions hold something — an ID waiting for its decision or
half received, a literal on its way to the server, IDLE — and reloads that find a file broken.

The rule under attack: a reload never loses or corrupts a byte of a running session; an ID
decided after it follows the new policy, one decided before keeps its record honestly; a file
it cannot read is refused, said, and the configuration in force stays."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio

from imapveil.policy import Policy
from imapveil.policy_files import load_policy, resolve_policy
from imapveil.protocol.session import CoreConfig
from imapveil.records import IdExchange
from imapveil.service import Service, load_all
from tests.conftest import TlsMaterial
from tests.helpers.dovecot import Dovecot, free_port
from tests.helpers.feeding import SPLITTERS, Conversation, Splitter
from tests.helpers.process import (
    Running,
    ask,
    connect_until_listening,
    imapveil,
    read_log,
    service_overrides,
    signal_handlers_restored,
)
from tests.helpers.scripted import Peer, serve

REPO = Path(__file__).resolve().parents[1]
DEFAULT = (REPO / "policies" / "default.toml").read_text()
FORWARDING = (
    DEFAULT
    + '\n[[rule]]\nfields = ["x-device"]\nforward = "keep"\nrecord = "keep"\n'
    + 'allow = ["mac", "imei", "uuid", "token", "email", "ip"]\n'
)
"""The default policy, but `x-device` forwarded and recorded: Dovecot's `ID sent:` line shows
which of the two decided."""

GREETING = b"* OK [CAPABILITY IMAP4rev1 LITERAL+ ID] ready\r\n"


class Holder:
    """What the service hands the core: the policy in force, which a reload replaces."""

    def __init__(self, policy: Policy) -> None:
        self.current = policy

    def __call__(self) -> Policy:
        return self.current


# --- The exchange a reload falls into: client's ID decided, server's `* ID` not come yet.


@pytest.mark.parametrize("split", SPLITTERS.values(), ids=SPLITTERS.keys())
def test_the_server_s_id_is_decided_by_the_policy_the_record_names(split: Splitter) -> None:
    """Found: the client's ID was decided by the policy in force when it was complete (and the
    record names that one), but the server's `* ID` by the one in force when it came: a reload
    in between (a slow server) let a policy the record does not name decide what of the
    server's ID the client saw and the record kept. Here strict decided the client's ID; the
    server's serial number was then shown to the client and recorded, as passthrough would,
    in a record saying strict."""
    strict, passthrough = resolve_policy("strict"), resolve_policy("passthrough")
    holder = Holder(strict)
    conv = Conversation(split, CoreConfig(policy=holder, hash_value=lambda v: "hmac:test"))
    conv.server(GREETING).client(b'a ID ("name" "Thunderbird" "guid" "1234")\r\n')
    holder.current = passthrough  # reloaded while the server takes its time
    conv.server(b'* ID ("name" "Dovecot" "x-serial" "SN-778899")\r\na OK ID completed\r\n')
    assert b"SN-778899" not in conv.to_client  # strict forwards no field
    (record,) = conv.of(IdExchange)
    assert isinstance(record, IdExchange)
    assert (record.policy, record.policy_digest) == (strict.name, strict.digest)
    assert record.server == {"name": "Dovecot"}  # strict records name, not x-serial
    # And after the exchange, the new policy: the next ID is passthrough's.
    conv.client(b'b ID ("name" "Thunderbird" "guid" "1234")\r\n')
    conv.server(b'* ID ("name" "Dovecot" "x-serial" "SN-778899")\r\nb OK ID completed\r\n')
    assert b"SN-778899" in conv.to_client
    assert conv.of(IdExchange)[1].policy == passthrough.name


def test_the_answer_to_the_proxy_s_own_id_is_decided_by_the_policy_it_went_out_under() -> None:
    """The same for the ID the proxy sends itself before LOGIN (`inject_id`): the server's
    answer is recorded as the policy in force when it went out decides, and under its name."""
    strict, passthrough = resolve_policy("strict"), resolve_policy("passthrough")
    holder = Holder(strict)
    config = CoreConfig(
        policy=holder, hash_value=lambda v: "hmac:test", inject_id=((b"name", b"corp"),)
    )
    conv = Conversation(SPLITTERS["whole"], config)
    conv.server(GREETING).client(b"a LOGIN alice wonderland\r\n")
    assert b"imapveil.1 ID" in conv.to_server
    holder.current = passthrough
    conv.server(b'* ID ("name" "Dovecot" "x-serial" "SN-778899")\r\nimapveil.1 OK done\r\n')
    (record,) = conv.of(IdExchange)
    assert isinstance(record, IdExchange) and record.injected
    assert (record.policy, record.policy_digest) == (strict.name, strict.digest)
    assert record.server == {"name": "Dovecot"}


# --- Helpers for the real process.


def said(proxy: Running, marker: bytes, within: float = 5.0) -> bytes:
    """stderr up to the first line with `marker`, failing (not hanging) after `within` s. (Read
    in a thread: the lines may be in the pipe's buffered reader already, where select(2) does
    not see them.)"""
    found: list[bytes] = []
    reader = threading.Thread(target=lambda: found.append(proxy.stderr_until(marker)))
    reader.start()
    reader.join(within)
    assert found, f"{marker!r} not said within {within} s"
    return found[0]


class Session:
    """A logged-in session through the proxy, line by line."""

    opened: ClassVar[list[Session]] = []

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.file = self.sock.makefile("rb")
        Session.opened.append(self)
        assert self.file.readline().startswith(b"* OK")
        self.ask(b"l", b"LOGIN alice wonderland")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def until(self, tag: bytes) -> list[bytes]:
        lines: list[bytes] = []
        while True:
            line = self.file.readline()
            assert line, lines
            lines.append(line)
            if line.startswith(tag + b" "):
                assert line.startswith(tag + b" OK"), lines
                return lines

    def ask(self, tag: bytes, command: bytes) -> list[bytes]:
        self.send(tag + b" " + command + b"\r\n")
        return self.until(tag)

    def close(self) -> None:
        self.ask(b"z", b"LOGOUT")
        self.drop()

    def drop(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture(autouse=True)
def _sessions_dropped() -> Iterator[None]:
    """Every session's socket closed, whatever the test's outcome (-W error: a leaked socket
    would fail a later test)."""
    yield
    while Session.opened:
        Session.opened.pop().drop()


def _device_sent(dovecot: Dovecot, value: str) -> str:
    """Dovecot's `ID sent:` line naming x-device=`value`, once it is in its log."""
    text = dovecot.wait_for_log(f"x-device={value}", 1, timeout=2.5)
    (line,) = [x for x in text.splitlines() if f"x-device={value}" in x]
    return line


# --- A reload that finds a file broken: refused, said, and the policy in force stays.


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _loop(path: Path) -> None:
    path.unlink()
    path.symlink_to(path)


def _truncated(path: Path) -> None:
    path.write_text(FORWARDING[: FORWARDING.rindex("[[rule]]") + 20])  # `fields = [` cut off


def _not_utf8(path: Path) -> None:
    path.write_bytes(b'name = "\xff\xfe"\n')


BREAKS = {
    "fifo": _fifo,
    "directory": _directory,
    "symlink loop": _loop,
    "truncated": _truncated,
    "not utf-8": _not_utf8,
}


@pytest.mark.dovecot
@pytest.mark.parametrize("break_it", BREAKS.values(), ids=BREAKS.keys())
def test_a_reload_finding_the_policy_broken_keeps_the_one_in_force(
    dovecot: Dovecot, tmp_path: Path, break_it: object
) -> None:
    """Found (the FIFO): a policy file replaced by a named pipe nobody writes held the reload's
    worker thread in open(2) for good, and with it every reload after it (a SIGHUP during a
    reload only asks for one more after it): no answer, no log line, no record, and the
    configuration frozen until a restart. `check-config` and a start hung the same way. Now a
    settings file that is not a regular file is refused at once. The other breaks held: each
    reload is refused, said, recorded, and an ID after it is decided by the policy in force
    before (Dovecot's `ID sent:` line shows `x-device`, which only that one forwards)."""
    policy = tmp_path / "p.toml"
    policy.write_text(FORWARDING)
    assert callable(break_it)
    with imapveil(tmp_path, dovecot.address, "--policy", str(policy)) as proxy:
        session = Session(proxy.port)
        break_it(policy)
        proxy.signal(signal.SIGHUP)
        assert b"reload refused" in said(proxy, b" imapveil: reload")
        value = f"kept-{os.getpid()}-{time.monotonic_ns()}"
        session.ask(b"i", b'ID ("name" "Mail" "x-device" "%s")' % value.encode())
        assert "name=Mail" in _device_sent(dovecot, value)
        # Mended, the next reload takes it: the reloads are not stuck behind the broken one.
        if policy.is_dir():
            policy.rmdir()
        else:
            policy.unlink()
        policy.write_text(DEFAULT)
        proxy.signal(signal.SIGHUP)
        assert b"reloaded" in said(proxy, b" imapveil: reload")
        session.close()
        assert proxy.stop() == 0
    records = proxy.records()
    loaded = [r["ok"] for r in records if r["event"] == "policy"]
    assert loaded == [True, False, True], loaded
    (refused,) = [r for r in records if r["event"] == "policy" and not r["ok"]]
    assert str(policy) in refused["error"]
    (decided,) = [r for r in records if r["event"] == "id"]
    assert decided["forwarded"] == ["name", "x-device"]


@pytest.mark.parametrize(
    "setting", ["config", "policy", "cert", "key", "upstream_ca", "user_key_file"]
)
def test_check_config_refuses_a_named_pipe_at_once(
    tmp_path: Path, setting: str, tls_material: TlsMaterial
) -> None:
    """`check-config` (and `serve` and a reload, which read the same way) on a FIFO: refused,
    not hung."""
    config, pipe = tmp_path / "imapveil.toml", tmp_path / "pipe"
    os.mkfifo(pipe)
    files = {
        "cert": tls_material.cert,
        "key": tls_material.key,
        "upstream_ca": tls_material.ca_file,
        "user_key_file": tmp_path / "user-key",
        "policy": REPO / "policies" / "default.toml",
    }
    if setting in files:
        files[setting] = pipe
    text = 'upstream = "127.0.0.1:143"\nupstream_tls = "implicit"\n'
    config.write_text(text + "".join(f'{name} = "{path}"\n' for name, path in files.items()))
    if setting == "config":
        config = pipe
    done = subprocess.run(
        [sys.executable, "-m", "imapveil", "check-config", str(config)],
        capture_output=True,
        timeout=5,
        check=False,
    )
    assert done.returncode == 1, done
    assert b"not a regular file" in done.stderr, done.stderr


# --- An ID half received when the reload comes: the policy in force when it is complete decides.


@pytest.mark.dovecot
@pytest.mark.parametrize("plus", [b"", b"+"], ids=["synchronizing", "literal+"])
def test_an_id_half_received_at_the_reload_is_decided_by_the_new_policy(
    dovecot: Dovecot, tmp_path: Path, plus: bytes
) -> None:
    """Held: `ID ("name" "Mail" "x-device" {N}` (the proxy's own `+` for a synchronizing one),
    then a reload to a policy that forwards x-device, then the literal and the rest: the ID is
    complete after the reload, so the new policy decides (Dovecot's `ID sent:` shows the
    field), and its record names the new policy's digest. An ID decided before the reload keeps
    the record of the one that decided it."""
    policy = tmp_path / "p.toml"
    policy.write_text(DEFAULT)
    value = f"half-{os.getpid()}-{time.monotonic_ns()}".encode()
    with imapveil(tmp_path, dovecot.address, "--policy", str(policy)) as proxy:
        earlier, session = Session(proxy.port), Session(proxy.port)
        earlier.send(b'a ID ("name" "Mail" "x-device" "before")\r\n')  # default: dropped
        session.send(b'b ID ("name" "Mail" "x-device" {%d%s}\r\n' % (len(value), plus))
        if not plus:  # the proxy's own `+`: the ID is being collected
            assert session.file.readline().startswith(b"+ ")
        earlier.until(b"a")  # decided before the reload (the server may answer after it)
        policy.write_text(FORWARDING)
        proxy.signal(signal.SIGHUP)
        assert b"reloaded" in said(proxy, b" imapveil: reload")
        session.send(value + b")\r\n")
        session.until(b"b")
        assert "name=Mail" in _device_sent(dovecot, value.decode())
        session.close()
        earlier.close()
        assert proxy.stop() == 0
    ids = {r["tag"]: r for r in proxy.records() if r["event"] == "id"}
    digests = [r["policy_digest"] for r in proxy.records() if r["event"] == "policy"]
    assert ids["a"]["forwarded"] == ["name", "x-imapveil"] and ids["a"]["dropped"] == ["x-device"]
    assert ids["a"]["policy_digest"] == digests[0]
    assert ids["b"]["forwarded"] == ["name", "x-device"]
    assert ids["b"]["client"]["x-device"] == value.decode()
    assert ids["b"]["policy_digest"] == digests[1] != digests[0]


# --- Sessions holding something while reloads come by the hundred.


def _mailbox(session: Session, name: bytes) -> None:
    session.send(b"c CREATE " + name + b"\r\n")
    while not (line := session.file.readline()).startswith(b"c "):
        assert line
    session.ask(b"s", b"SELECT " + name)


@pytest.mark.dovecot
def test_an_append_and_an_idle_go_through_a_storm_of_reloads_that_change_the_limits(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """Held: an APPEND of 3 MB (spliced between the plain legs) half sent, an IDLE on the box it
    goes to, and a line half sent; then 300 SIGHUPs while the configuration lowers
    `max_line_length` to 1024 and the policy changes: the message arrives whole (its digest as
    the server has it), the IDLE sees it and ends with DONE, and the half line of 4,000 octets
    ends under the limit its session started with; a new session gets the new one."""
    config, policy = tmp_path / "imapveil.toml", tmp_path / "p.toml"
    config.write_text(f'policy = "{policy}"\n')
    policy.write_text(DEFAULT)
    box = b"storm%d" % time.monotonic_ns()
    message = b"Subject: storm\r\n\r\n" + b"".join(
        b"%07d %s\r\n" % (i, b"x" * 70) for i in range(3 * 1024 * 1024 // 80)
    )
    digest = hashlib.sha256(message).hexdigest()
    with imapveil(tmp_path, dovecot.address, "--config", str(config)) as proxy:
        idler, appender, talker = (Session(proxy.port) for _ in range(3))
        _mailbox(idler, box)
        talker.ask(b"e", b"EXAMINE INBOX")
        idler.send(b"i IDLE\r\n")
        assert idler.file.readline().startswith(b"+ ")
        appender.send(b"p APPEND %s {%d}\r\n" % (box, len(message)))
        assert appender.file.readline().startswith(b"+ ")
        half = len(message) // 2
        appender.send(message[:half])
        talker.send(b"t SEARCH TEXT " + b"y" * 4000)  # a line, its end not sent yet
        config.write_text(f'policy = "{policy}"\nmax_line_length = 1024\n')
        policy.write_text(FORWARDING)
        for _ in range(300):
            os.kill(proxy.process.pid, signal.SIGHUP)
        appender.send(message[half:] + b"\r\n")
        appender.until(b"p")
        talker.send(b"\r\n")
        talker.until(b"t")
        assert b"EXISTS" in idler.file.readline()
        idler.send(b"DONE\r\n")
        idler.until(b"i")
        assert b"reloaded" in said(proxy, b"reloaded")
        fetched = b"".join(idler.ask(b"f", b"FETCH 1 BODY.PEEK[]"))
        body = fetched[fetched.index(b"}\r\n") + 3 : fetched.rindex(b")\r\nf OK")]
        assert hashlib.sha256(body).hexdigest() == digest
        late = Session(proxy.port)
        late.send(b"t SEARCH TEXT " + b"y" * 2000 + b"\r\n")
        assert late.file.readline().startswith(b"* BYE [TOOBIG]")
        late.drop()
        for session in (idler, appender, talker):
            session.close()
        assert proxy.stop() == 0
    ends = [r for r in proxy.records() if r["event"] == "session_end"]
    assert sorted(e["reason"] for e in ends) == ["line_too_long", "logout", "logout", "logout"]


@pytest.mark.dovecot
def test_a_reload_lowering_max_sessions_below_the_count_keeps_the_open_ones(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """Held: three sessions open, a reload to `max_sessions = 2`: the three go on, a fourth is
    refused (`* BYE [UNAVAILABLE]`), and once two have ended one more is admitted (the count
    the reload found was kept, not started again)."""
    config = tmp_path / "imapveil.toml"
    config.write_text("max_sessions = 10\n")
    with imapveil(tmp_path, dovecot.address, "--config", str(config)) as proxy:
        sessions = [Session(proxy.port) for _ in range(3)]
        config.write_text("max_sessions = 2\n")
        proxy.signal(signal.SIGHUP)
        assert b"reloaded" in said(proxy, b" imapveil: reload")
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as refused:
            assert refused.makefile("rb").readline().startswith(b"* BYE [UNAVAILABLE]")
        for session in sessions:
            session.ask(b"n", b"NOOP")
        sessions[0].close()
        sessions[1].close()
        deadline = time.monotonic() + 2.5
        while True:  # the two ends are counted once their legs are closed
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as probe:
                greeting = probe.makefile("rb").readline()
            if greeting.startswith(b"* OK") or time.monotonic() > deadline:
                break
        assert greeting.startswith(b"* OK"), greeting
        sessions[2].close()
        assert proxy.stop() == 0


# --- The client leg's certificate, replaced while a handshake is in progress.


def _handshake(sock: socket.socket, context: ssl.SSLContext, between: Callable[[], None]) -> bytes:
    """A TLS handshake over `sock` with the ClientHello sent in two halves and `between()`
    called between them; the server certificate (DER) it ends with."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    sock.sendall(hello[: len(hello) // 2])
    between()
    sock.sendall(hello[len(hello) // 2 :])
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            if data := outgoing.read():
                sock.sendall(data)
            received = sock.recv(65536)
            assert received, "closed during the handshake"
            incoming.write(received)
    if data := outgoing.read():
        sock.sendall(data)
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


@pytest.mark.dovecot
def test_a_handshake_in_progress_ends_with_the_certificate_it_began_with(
    dovecot: Dovecot, tmp_path: Path, tls_material: TlsMaterial
) -> None:
    """Held: half a ClientHello received on the implicit-TLS port, then the certificate and key
    replaced and reloaded: that handshake completes with the certificate it began with; the next
    connection gets the new one. Then a certificate cut short in the middle of a rotation: the
    reload is refused and new connections keep the last good one."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(tls_material.cert, cert)
    shutil.copy(tls_material.key, key)
    renewed = tls_material.ca.issue_cert("127.0.0.1", "localhost")
    tls_port = free_port()
    args = ["--listen-tls", f"127.0.0.1:{tls_port}", "--cert", str(cert), "--key", str(key)]
    context = tls_material.client_context()
    first = Path(tls_material.cert).read_text()
    old_der = ssl.PEM_cert_to_DER_cert(first[: first.index("-----END CERTIFICATE-----") + 25])
    new_der = ssl.PEM_cert_to_DER_cert(renewed.cert_chain_pems[0].bytes().decode())

    with imapveil(tmp_path, dovecot.address, *args) as proxy:

        def rotate() -> None:
            renewed.private_key_pem.write_to_path(str(key))
            renewed.cert_chain_pems[0].write_to_path(str(cert))
            proxy.signal(signal.SIGHUP)
            assert b"reloaded" in said(proxy, b" imapveil: reload")

        with socket.create_connection(("127.0.0.1", tls_port), timeout=5) as sock:
            assert _handshake(sock, context, rotate) == old_der
        with socket.create_connection(("127.0.0.1", tls_port), timeout=5) as sock:
            assert _handshake(sock, context, lambda: None) == new_der
        text = cert.read_text()
        cert.write_text(text[: len(text) // 2])  # a rotation caught half written
        proxy.signal(signal.SIGHUP)
        assert b"truncated PEM certificate" in said(proxy, b" imapveil: reload")
        with socket.create_connection(("127.0.0.1", tls_port), timeout=5) as sock:
            assert _handshake(sock, context, lambda: None) == new_der
        assert proxy.stop() == 0


# --- Log rotation by the dozen while sessions make records.


def _noops(port: int, stop: threading.Event, answered: list[int], errors: list[object]) -> None:
    try:
        session = Session(port)
        count = 0
        while not stop.is_set():
            count += 1
            session.ask(b"n%d" % count, b"NOOP")
        answered.append(count)
        session.close()
    except Exception as exc:  # the test reports it
        errors.append(exc)


@pytest.mark.dovecot
def test_rotations_during_a_storm_of_reloads_lose_and_repeat_no_record(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """Held: three sessions doing NOOPs (a record each) while the event log is renamed and
    SIGHUP sent 40 times, 10 ms apart, among 400 more SIGHUPs: across all the files every line
    is one whole record, every NOOP answered has its record once, every session its end."""
    with imapveil(tmp_path, dovecot.address) as proxy:
        stop, answered, errors = threading.Event(), list[int](), list[object]()
        workers = [
            threading.Thread(target=_noops, args=(proxy.port, stop, answered, errors))
            for _ in range(3)
        ]
        for worker in workers:
            worker.start()
        for i in range(40):
            if proxy.events.exists():  # reopened since the last rotation (logrotate's missingok)
                proxy.events.rename(proxy.events.with_name(f"rotated-{i:02d}.jsonl"))
            for _ in range(10):
                os.kill(proxy.process.pid, signal.SIGHUP)
            time.sleep(0.01)  # the rotations' pace, not a wait for an outcome
        stop.set()
        for worker in workers:
            worker.join(10)
        assert proxy.stop() == 0
    assert not errors, errors
    records: list[dict[str, object]] = []
    # The last rename may come after the last reopen (the stop came first): then there is no
    # new file, and every record is in a renamed one.
    reopened = [proxy.events] if proxy.events.exists() else []
    for path in [*sorted(tmp_path.glob("rotated-*.jsonl")), *reopened]:
        found, other = read_log(path)
        assert not other, (path, other[:3])
        records += found
    noops = [r for r in records if r["event"] == "command" and r["verb"] == "NOOP"]
    assert len(noops) == sum(answered) == len({(r["session"], r["tag"]) for r in noops})
    ends = [r["session"] for r in records if r["event"] == "session_end"]
    assert len(ends) == len(set(ends)) == 3


@pytest.mark.dovecot
def test_sighups_during_the_shutdown_grace_cut_no_append_short(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """Held: an APPEND of 2 MB half sent, then SIGTERM (a grace of 20 s) and 200 SIGHUPs with
    the policy file gone: the APPEND completes whole, the session logs out, and the proxy exits
    0 as soon as it has, not at the grace's end."""
    policy = tmp_path / "p.toml"
    policy.write_text(DEFAULT)
    box = b"grace%d" % time.monotonic_ns()
    message = b"Subject: grace\r\n\r\n" + b"z" * 78 * 26_000
    digest = hashlib.sha256(message).hexdigest()
    args = ["--policy", str(policy), "--shutdown-grace", "20"]
    with imapveil(tmp_path, dovecot.address, *args) as proxy:
        session = Session(proxy.port)
        session.send(b"c CREATE " + box + b"\r\n")
        session.until(b"c")
        session.send(b"p APPEND %s {%d}\r\n" % (box, len(message)))
        assert session.file.readline().startswith(b"+ ")
        session.send(message[: len(message) // 2])
        proxy.signal(signal.SIGTERM)
        policy.unlink()
        for _ in range(200):
            os.kill(proxy.process.pid, signal.SIGHUP)
        session.send(message[len(message) // 2 :] + b"\r\n")
        session.until(b"p")
        session.ask(b"s", b"SELECT " + box)
        fetched = b"".join(session.ask(b"f", b"FETCH 1 BODY.PEEK[]"))
        body = fetched[fetched.index(b"}\r\n") + 3 : fetched.rindex(b")\r\nf OK")]
        assert hashlib.sha256(body).hexdigest() == digest
        began = time.monotonic()
        session.close()
        assert proxy.process.wait(5) == 0
        assert time.monotonic() - began < 3
        assert proxy.stop() == 0
    assert b"Traceback" not in proxy.stderr
    (end,) = [r for r in proxy.records() if r["event"] == "session_end"]
    assert end["reason"] == "logout"


# --- The event log's reopening at a reload, on a file system that answers late.

SLOW = 1.5
"""Seconds the event log's directory takes to answer during the reload."""


@pytest.mark.dovecot
async def test_reopening_the_event_log_on_a_slow_mount_holds_up_no_session(
    dovecot: Dovecot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found: a reload read the files in a worker thread (a hung mount must not hold up the
    sessions), but reopened the event log on the event loop: its directory's mkdir, open(2)
    and the read of its last octet. With the log's file system answering in 1.5 s (NFS
    recovering, a disk failing), every session waited 1.5 s at each reload, log rotation's
    included. Now the file is opened in a worker thread too."""
    port = free_port()
    overrides = service_overrides(dovecot.address, port, tmp_path)
    service = Service(None, overrides, load_all(None, overrides))
    logs = Path(overrides["events"]).parent
    mkdir = Path.mkdir
    slow, reloaded = threading.Event(), trio.Event()

    def late(self: Path, *args: Any, **kwargs: Any) -> None:
        if slow.is_set() and self == logs:
            time.sleep(SLOW)  # blocks the thread that asks, as a hung mount does
        mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", late)
    during: list[float] = []

    async def noops(stream: trio.SocketStream) -> None:
        i = 0
        while not reloaded.is_set():
            i += 1
            waited = await ask(stream, b"n%d" % i, b"NOOP")
            if slow.is_set():
                during.append(waited)

    async def client() -> None:
        async with await connect_until_listening(port) as stream:
            await ask(stream, b"l", b"LOGIN alice wonderland")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(noops, stream)
                await trio.sleep(0.1)  # NOOPs going on before the reload
                slow.set()
                await service.reload()
                reloaded.set()
            await stream.send_all(b"q LOGOUT\r\n")
        service.proxy.stop()

    with signal_handlers_restored(), trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client)
            await service.run()
    assert max(during, default=0.0) < SLOW / 3, f"a NOOP waited {max(during):.2f} s"
    assert len(during) >= 5, f"{len(during)} NOOPs answered while the reload ran"


# --- A shipped policy's name, and what the working directory holds.


@pytest.mark.parametrize("spec", [None, "default", "strict"])
@pytest.mark.parametrize("what", ["directory", "file"])
def test_a_shipped_policy_s_name_is_never_a_file_of_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str | None, what: str
) -> None:
    """Found: `policy = "default"` (the default) or `"strict"` was first looked up as a file
    in the working directory: started (or reloaded) from /etc, which holds a directory named
    `default`, the proxy refused to start ("policy: default: cannot read"); from a directory
    with a file of that name, that file was the policy, under the shipped one's name (here one
    forwarding everything, named "default"). A bare shipped name is the shipped policy now; a
    file is named with a `/` or `.toml`."""
    monkeypatch.chdir(tmp_path)
    name = spec or "default"
    if what == "directory":
        (tmp_path / name).mkdir()
    else:
        (tmp_path / name).write_text(
            f'name = "{name}"\ndefault = {{ forward = "keep", record = "keep" }}\ndetectors = []\n'
        )
    shipped = load_policy(REPO / "policies" / f"{name}.toml")
    assert resolve_policy(spec).digest == shipped.digest
    # A file is still a file when named as one.
    if what == "file":
        assert resolve_policy(f"./{name}").digest != shipped.digest


async def test_a_reload_while_the_server_takes_its_time_over_an_id_changes_nothing_of_it(
    tmp_path: Path,
) -> None:
    """The first fix above through the service: a scripted server holds its answer to the
    client's ID until the policy file has become passthrough and been reloaded; the client is
    shown the server's ID as strict (the policy its ID went out under) has it, and the record
    names strict and keeps only what strict records of the server's fields."""
    policy = tmp_path / "p.toml"
    policy.write_text((REPO / "policies" / "strict.toml").read_text())
    got_id, reloaded = trio.Event(), trio.Event()

    async def script(peer: Peer) -> None:
        await peer.say(b"* OK [CAPABILITY IMAP4rev1 ID LITERAL+] ready\r\n")
        while line := await peer.line():
            tag = line.split(b" ", 1)[0]
            if b" ID " in line:
                got_id.set()
                await reloaded.wait()
                await peer.say(b'* ID ("name" "Srv" "x-serial" "SN-778899")\r\n')
            await peer.say(tag + b" OK done\r\n")

    port = free_port()
    async with serve(script, bytearray()) as upstream:
        overrides = {**service_overrides(upstream, port, tmp_path), "policy": str(policy)}
        overrides["store"] = "off"
        service = Service(None, overrides, load_all(None, overrides))
        shown = b""

        async def client() -> None:
            nonlocal shown
            async with await connect_until_listening(port) as stream:
                await stream.send_all(b'a ID ("name" "Mail" "guid" "1234")\r\n')
                await got_id.wait()
                policy.write_text((REPO / "policies" / "passthrough.toml").read_text())
                await service.reload()
                reloaded.set()
                while b"a OK" not in shown:
                    shown += await stream.receive_some(4096)
            service.proxy.stop()

        with signal_handlers_restored(), trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client)
                await service.run()
    assert b"SN-778899" not in shown and b"* ID NIL" in shown, shown
    records, _ = read_log(Path(overrides["events"]))
    (record,) = [r for r in records if r["event"] == "id"]
    assert record["policy"] == "strict" and record["server"] == {"name": "Srv"}
