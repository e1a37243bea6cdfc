"""Attack round 19 on outputs (attack19): what a client sends, into what an operator's tools
print: `imapveil policy test` run by an administrator on an ID command captured from a client
(an attacker's). Each test failed before the fix named in its docstring, or guards what held."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_attack_round17_outputs import FORBIDDEN, HOSTILE, id_command


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
