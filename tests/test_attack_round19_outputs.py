"""Attack round 19 on outputs (attack19): what a client sends, into what an operator's tools
print: `imapveil policy test` run by an administrator on an ID command captured from a client
(an attacker's). Each test failed before the fix named in its docstring, or guards what held."""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import re
import socket
import ssl
import struct
import subprocess
import sys
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from imapveil.protocol.proxy_header import V2_SIGNATURE
from imapveil.stats.charts import safe
from tests.conftest import TlsMaterial
from tests.helpers.dovecot import Dovecot, free_port
from tests.helpers.process import imapveil, read_log
from tests.test_attack_round17_outputs import (
    FORBIDDEN,
    HOSTILE,
    OPENMETRICS,
    cli,
    exchange,
    id_command,
    literal,
    literal_octets,
    scrape,
    session,
    strings,
)


def raw(text: str) -> list[str]:
    """The characters of `text` no terminal may get from a client (line feeds ending the
    output's own lines aside)."""
    return sorted({f"U+{ord(c):04X}" for c in FORBIDDEN.findall(text)})


def policy_test(policy: str, command: bytes) -> subprocess.CompletedProcess[bytes]:
    """`imapveil policy test POLICY COMMAND` as a shell runs it: the command line's octets as
    they were captured (a terminal's paste, `"$(cat captured)"`), not necessarily UTF-8."""
    return subprocess.run(
        [sys.executable.encode(), b"-m", b"imapveil", b"policy", b"test", policy.encode(), command],
        capture_output=True, check=False, timeout=60,
    )  # fmt: skip


CAPTURED = [
    id_command(text).removeprefix(b"I ").removesuffix(b"\r\n")
    for name, text in HOSTILE.items()
    if name != "nul"
]
"""Each hostile text as the five values of a client's ID command, in literals (`{N+}` CRLF),
as it came over the wire (its tag left out). Not the NUL: no command line can hold one."""


@pytest.mark.parametrize("policy", ["passthrough", "default"])
@pytest.mark.parametrize("command", CAPTURED, ids=[n for n in HOSTILE if n != "nul"])
def test_policy_test_prints_nothing_a_client_sent_raw(policy: str, command: bytes) -> None:
    """Found: `imapveil policy test` printed what the policy forwards as the octets themselves
    (only octets that are not UTF-8 escaped) and what it records as `json.dumps(...,
    ensure_ascii=False)`: an ID command captured from a client and tried out by an
    administrator wrote its escape sequences (`ESC [2J` clearing the screen, OSC 52 setting the
    clipboard, OSC 8 links), its bidirectional overrides and its invisible characters to their
    terminal, and the literals' CR LF split the `forwarded:` line in two. Now both lines show
    them escaped (`charts.safe`, as `imapveil stats` does)."""
    done = policy_test(policy, command)
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode("utf-8")
    assert raw(out) == [] and raw(done.stderr.decode("utf-8")) == []
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines[:4]] == [
        "policy", "forwarded", "recorded", "decisions"
    ]  # fmt: skip


def test_policy_test_escapes_the_forwarded_values_it_shows() -> None:
    """What the escaped lines say: the forwarded value with `\\x1b` and `\\u202e` where the
    client sent ESC and U+202E, the literal's CR LF as `\\x0d\\x0a`; the recorded values still
    one JSON object holding the same text."""
    text = "Mail\x1b[31m\u202eevil"
    command = b'ID ("name" {%d+}\r\n%s)' % (len(text.encode()), text.encode())
    done = policy_test("passthrough", command)
    assert done.returncode == 0, done.stderr
    forwarded, recorded = done.stdout.decode().splitlines()[1:3]
    assert forwarded == 'forwarded: ID ("name" {16+}\\x0d\\x0aMail\\x1b[31m\\u202eevil)'
    assert json.loads(recorded.removeprefix("recorded:  ")) == {"name": text}


@pytest.mark.parametrize(
    "text", ["Mail\U000e0041\U000e007f", "Mail\U0010ffff", "Mail\U0001f4e7\u202e", "Почта\x1b[2J"]
)
def test_policy_test_s_recorded_line_stays_json(text: str) -> None:
    """Found (round 19's report): the `recorded:` line was the JSON with `charts.safe` run over
    it, which writes a character past U+FFFF as `\\U000e0041`: not JSON (`jq` stops there). Its
    escapes are JSON's own now (`\\udb40\\udc41`), the same text when read back, and nothing
    of it raw on the terminal."""
    command = b'ID ("name" {%d+}\r\n%s)' % (len(text.encode()), text.encode())
    done = policy_test("passthrough", command)
    assert done.returncode == 0, done.stderr
    recorded = done.stdout.decode().splitlines()[2]
    assert raw(recorded) == []
    assert json.loads(recorded.removeprefix("recorded:  ")) == {"name": text}


def test_policy_test_takes_a_captured_command_that_is_not_utf8() -> None:
    """Found: an ID command whose octets are not UTF-8 (a client may send any octets in a
    literal or a quoted string; Python hands them to the program as lone surrogates) made
    `imapveil policy test` fail with a traceback (UnicodeEncodeError) instead of showing what
    the policy does with the command: the very octets the proxy would get. Now they are
    tried as they came, and shown escaped (`\\xff`)."""
    done = policy_test("passthrough", b'ID ("name" "Mail\xff\xfe\x1b[2J" "version" "1.0")')
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode("utf-8")
    assert raw(out) == []
    forwarded = out.splitlines()[1]
    assert (
        forwarded == 'forwarded: ID ("name" {10+}\\x0d\\x0aMail\\xff\\xfe\\x1b[2J "version" "1.0")'
    )
    recorded = json.loads(out.splitlines()[2].removeprefix("recorded:  "))
    assert recorded == {"name": "Mail\ufffd\ufffd\x1b[2J", "version": "1.0"}


@pytest.mark.parametrize("line", [b"a1 ID", b"a1 id", b"A0001 ID", b"ID", b""])
def test_policy_test_takes_the_command_line_as_the_client_sent_it(line: bytes) -> None:
    """Found: a command captured from a client starts with its tag (`a1 ID (...)`, what the
    proxy reads and rewrites), and `imapveil policy test` answered that it was "not an ID list
    the proxy would rewrite (it would be forwarded unchanged)": wrong, and the administrator
    saw nothing of what the policy does with it. Now a tag before `ID` is taken, and the line
    end the capture kept."""
    command = line + b' ("name" "K-9 Mail" "x-originating-ip" "10.1.2.3")\r\n'
    done = policy_test("default", command)
    assert done.returncode == 0, done.stdout
    out = done.stdout.decode()
    assert 'forwarded: ID ("name" "K-9 Mail" "x-imapveil"' in out and "by anti-spoof" in out


MARK = "zqround19"
"""In every text a client sends below: searched for in the diagnostics, which name none."""

SECRET = "pwround19"  # noqa: S105 (a marker, not a password of anything)
"""The start of every password a client sends below: in no output."""

NOT_UTF8 = b"\xff\xfe\xed\xa0\x80\xc0\xaf\x1b[31m" + MARK.encode()
"""Octets that are not UTF-8: a lone 0xff, an encoded surrogate, an overlong slash."""


def hello_with_sni(name: bytes) -> bytes:
    """A real ClientHello (Python's ssl) whose SNI host name is replaced, octet for octet, by
    `name`: a client may put any octets there."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.set_alpn_protocols(["imap", f"\x1b[31m{MARK}"])
    out = ssl.MemoryBIO()
    placeholder = "s" * len(name)
    tls = context.wrap_bio(ssl.MemoryBIO(), out, server_hostname=placeholder)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = out.read()
    assert hello.count(placeholder.encode()) == 1
    return hello.replace(placeholder.encode(), name)


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


def proxy_v2(tlvs: bytes) -> bytes:
    """A PROXY v2 header (TCP over IPv4) carrying `tlvs`."""
    body = socket.inet_aton("198.51.100.7") + socket.inet_aton("192.0.2.1")
    body += struct.pack("!HH", 40000, 143) + tlvs
    return V2_SIGNATURE + bytes([0x21, 0x11]) + len(body).to_bytes(2, "big") + body


def send_and_close(port: int, data: bytes, source: str = "127.0.0.1") -> None:
    with socket.socket() as s:
        s.bind((source, 0))
        s.settimeout(10)
        s.connect(("127.0.0.1", port))
        s.sendall(data)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass


@pytest.mark.dovecot
def test_diagnostics_at_debug_say_nothing_a_client_sent(
    dovecot: Dovecot, tls_material: TlsMaterial, tmp_path: Path
) -> None:
    """Held: `imapveil serve` at `log_level = "debug"` (every session's ID decisions, rule
    breaks and end) under `passthrough` and `user_identity = "plain"`, with an implicit-TLS
    listener and PROXY headers expected from 127.0.0.2. Clients send every hostile text of
    round 17 and octets that are not UTF-8 as ID values, as failed LOGIN and AUTHENTICATE PLAIN
    user names (then log in), as a SELECT's mailbox, as tags and command names; as a
    ClientHello's SNI host name (escape sequences, a bidi override, a NUL, octets that are not
    UTF-8) and ALPN; as the TLVs of a PROXY v2 header (authority, unique id, an SSL TLV's SNI)
    and inside v1 headers. Stderr names none of it and holds no raw control, bidi or invisible
    character; every event log line is one JSON object in ASCII; the scrape parses; no
    password is in any of them."""
    tls_port, metrics = free_port(), free_port()
    args = [
        "--policy", "passthrough", "--user-identity", "plain", "--log-level", "debug",
        "--listen-tls", f"127.0.0.1:{tls_port}", "--cert", str(tls_material.cert),
        "--key", str(tls_material.key), "--tls-handshake-timeout", "2",
        "--proxy-protocol-from", "127.0.0.2/32", "--metrics", f"127.0.0.1:{metrics}",
    ]  # fmt: skip
    user, password = next(iter(dovecot.users.items()))
    login = b"L LOGIN %s %s\r\n" % (user.encode(), password.encode())
    texts = [f"{text}{MARK}" for text in HOSTILE.values()]
    with imapveil(tmp_path, dovecot.address, *args) as proxy:
        sessions = [
            id_command(text)
            + b"A LOGIN " + literal(user + text) + b" " + literal(SECRET + text) + b"\r\n"
            + b"P AUTHENTICATE PLAIN "
            + base64.b64encode(f"{text}\0{user}{text}\0{SECRET}{text}".encode()) + b"\r\n"
            + login + id_command(text) + b"S SELECT " + literal(text) + b"\r\n"
            + b"Z LOGOUT\r\n"
            for text in texts
        ]  # fmt: skip
        with ThreadPoolExecutor(8) as pool:  # Dovecot delays each failed login
            list(pool.map(functools.partial(exchange, proxy.port), sessions))
        exchange(
            proxy.port,
            b'I ID ("name" ' + literal_octets(NOT_UTF8) + b")\r\n"
            + b"A LOGIN " + literal_octets(NOT_UTF8) + b" x\r\n"
            + b"\x1b[31m" + MARK.encode() + b" NOOP\r\n"
            + f"t\u202e{MARK} NOOP\r\n".encode() + b"t \x1b[2J" + MARK.encode() + b"\r\n"
            + login + b"Z LOGOUT\r\n",
        )  # fmt: skip
        for name in (b"\x1b[31m" + MARK.encode() + b"\x07", f"a\u202e{MARK}.test".encode(),
                     b"x\x00" + MARK.encode(), NOT_UTF8):  # fmt: skip
            send_and_close(tls_port, hello_with_sni(name))
        hostile = b"\x1b]0;" + MARK.encode() + "\u202e\x07".encode()
        headers = [
            proxy_v2(tlv(0x02, hostile) + tlv(0x05, hostile)),
            proxy_v2(tlv(0x20, b"\x01" + bytes(4) + tlv(0x22, hostile))),
            proxy_v2(tlv(0x02, hostile * 100)),
            b"PROXY TCP4 198.51.100.7 192.0.2.1 1 2 " + hostile + b"\r\n",
            b"PROXY UNKNOWN " + hostile + b"\r\n",
        ]
        for header in headers:
            send_and_close(proxy.port, header + login + b"Z LOGOUT\r\n", source="127.0.0.2")
        scraped = {accept: scrape(metrics, accept) for accept in (b"text/plain", OPENMETRICS)}
        assert proxy.stop() == 0
    stderr = proxy.stderr.decode("utf-8", "replace")
    assert "ID under policy passthrough" in stderr and "client TLS failed" in stderr
    assert "proxy_header" in stderr, stderr
    assert raw(stderr) == []
    assert MARK not in stderr.lower() and SECRET not in stderr
    assert SECRET.encode() not in proxy.events.read_bytes()
    records, other = read_log(proxy.events)
    assert other == [] and proxy.events.read_bytes().isascii()
    users = {r.get("user") for r in records if r["event"] == "command"}
    # A line end in a literal ends the session before its LOGIN (`refused_line_end`).
    assert {user + t for t in texts if not set(t) & set("\0\r\n")} <= users
    assert list(text_string_to_metric_families(scraped[b"text/plain"].decode()))
    assert MARK not in b"".join(scraped.values()).decode().lower()


def _noncharacter(code: int) -> bool:
    return 0xFDD0 <= code <= 0xFDEF or code & 0xFFFE == 0xFFFE


def test_surrogates_noncharacters_and_private_use_are_escaped() -> None:
    """Found: `charts.safe`, which every output for people uses for what a client sent, left
    noncharacters (U+FFFE, U+FFFF, U+FDD0…, the last two of every plane) and private-use
    characters (U+E000…, planes 15 and 16) as they came: a terminal shows them as nothing, or
    as a font's own icon, so `Mail` and `Mail` with U+E000 were two rows reading `Mail`; and a
    lone surrogate, which is no character at all, would have stopped the output at it
    (UnicodeEncodeError writing UTF-8). Now they are escaped as the format characters are."""
    raw = [
        f"U+{code:04X}"
        for code in range(sys.maxunicode + 1)
        if (unicodedata.category(chr(code)) in ("Cs", "Co") or _noncharacter(code))
        and safe(chr(code)) == chr(code)
    ]
    assert raw == []
    assert safe("a\ud800b\U0010ffffc") == "a\\ud800b\\U0010ffffc"


INVISIBLE = ("Mail\ue000", "Mail\uffff", "Mail\ufffe", "Mail\ufdd0", "Mail\U0001fffe",
             "Mail\U000f0000", "Mail\U0010ffff")  # fmt: skip
"""Names that read `Mail` on a terminal, or `Mail` and a box or an icon of its font's choosing."""

NOT_SHOWN = re.compile("[\ud800-\udfff\ue000-\uf8ff\ufdd0-\ufdef\ufffe\uffff\U0001fffe"
                       "\U0001ffff\U000f0000-\U0010ffff]")  # fmt: skip


@pytest.mark.dovecot
def test_stats_and_the_report_show_no_private_use_or_noncharacter_raw(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """The finding above, through a real proxy and store: sessions whose ID names, versions
    and systems are `Mail` and one such character, then `imapveil stats` in every form of
    `--by family|version|os` and the report; each shows them escaped."""
    store = tmp_path / "stats.sqlite"
    with imapveil(tmp_path, dovecot.address, "--store", str(store), "--policy", "passthrough") as p:
        users = list(dovecot.users.items())
        for i, name in enumerate(INVISIBLE):
            session(p.port, *users[i % len(users)], name)
        assert p.stop() == 0
    shown = []
    for by in ("family", "version", "os"):
        for form in ("table", "csv", "json"):
            out = cli("stats", "--store", str(store), "--by", by, "--format", form,
                      "--min-users", "0")  # fmt: skip
            texts = strings(json.loads(out)) if form == "json" else [out]
            shown += [f"{by} {form}: U+{ord(c):04X}" for t in texts for c in NOT_SHOWN.findall(t)]
    page = cli("report", "--store", str(store), "--min-users", "0", "--html", "-")
    shown += [f"report: U+{ord(c):04X}" for c in NOT_SHOWN.findall(page)]
    assert shown == []
    assert "Mail\\ue000" in cli("stats", "--store", str(store), "--min-users", "0")


# --- Found (round 19's report): a terminal that is not UTF-8.


def in_encoding(encoding: str, *args: str | bytes) -> subprocess.CompletedProcess[bytes]:
    """The CLI with its standard streams in `encoding` (a terminal in a Latin-1 or ASCII locale;
    PYTHONIOENCODING, as the locale would have it without Python's UTF-8 coercion)."""
    env = {**os.environ, "PYTHONIOENCODING": encoding}
    return subprocess.run(
        [sys.executable, "-m", "imapveil", *args],
        capture_output=True, check=False, timeout=60, env=env,
    )  # fmt: skip


@pytest.mark.parametrize("encoding", ["latin-1", "ascii"])
def test_policy_test_on_a_terminal_that_is_not_utf8(encoding: str) -> None:
    """`imapveil policy test` on a name a Latin-1 or ASCII terminal cannot show (`Почта…`) was a
    traceback (UnicodeEncodeError) at the first line that held it. What the terminal cannot
    show is written as an escape now; the rest of the line, and the lines after, as they are."""
    done = in_encoding(encoding, "policy", "test", "passthrough", 'ID ("name" "Почта…")')
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode(encoding)
    assert "\\u041f\\u043e\\u0447\\u0442\\u0430\\u2026" in out
    assert "decisions:" in out


@pytest.mark.dovecot
def test_stats_and_the_report_on_a_terminal_that_is_not_utf8(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """`imapveil stats` stopped with a traceback on a Latin-1 terminal at its own `…` (a name cut
    short) or a client's `Почта`; so did `report` writing to stdout. Both go on now, what the
    terminal cannot show escaped."""
    store = tmp_path / "stats.sqlite"
    with imapveil(tmp_path, dovecot.address, "--store", str(store), "--policy", "passthrough") as p:
        user, password = next(iter(dovecot.users.items()))
        session(p.port, user, password, "Почта " + "Mail " * 20)
        assert p.stop() == 0
    for encoding in ("latin-1", "ascii"):
        for form in ("table", "csv", "json"):
            done = in_encoding(encoding, "stats", "--store", str(store), "--format", form,
                               "--min-users", "0")  # fmt: skip
            assert done.returncode == 0, (encoding, form, done.stderr)
            assert b"\\u041f" in done.stdout or b"\\\\u041f" in done.stdout
        done = in_encoding(encoding, "report", "--store", str(store), "--min-users", "0",
                           "--html", "-")  # fmt: skip
        assert done.returncode == 0, (encoding, done.stderr)
