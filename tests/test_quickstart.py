"""The README's quick start, run as a new administrator runs it on a fresh Debian or Ubuntu.

The commands come from README.md itself (the first ```sh block under "## Quick start"), so the
README and `scripts/install` cannot drift apart unnoticed: the install command runs with the
system Python in a clean environment (no pyenv or virtualenv on PATH, a fresh HOME), into a
prefix and bin directory under tmp_path instead of /opt and /usr/local/bin, and then the README's
own `imapveil serve` command, with its listen and upstream addresses pointed at loopback, must
relay a real Dovecot's greeting and a login.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tomllib
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.helpers.dovecot import Dovecot, free_port
from tests.helpers.process import wait_until_listening

pytestmark = pytest.mark.dovecot

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = Path("/usr/bin/python3")


def quick_start() -> list[list[str]]:
    """The commands of the quick start's first line, split at `&&`."""
    readme = (ROOT / "README.md").read_text()
    _, found, rest = readme.partition("\n## Quick start\n")
    assert found, 'README.md has no "## Quick start" section'
    section = rest.split("\n## ", 1)[0]
    block = re.search(r"^```sh\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    assert block, "the quick start has no ```sh block"
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    assert len(lines) == 1, f"the quick start should be one command line: {lines}"
    return [shlex.split(part) for part in lines[0].split("&&")]


def with_values(command: list[str], **values: str) -> list[str]:
    """`command` with the value after each `--flag` replaced; every flag must be there."""
    result = list(command)
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        assert flag in result, f"the quick start's serve command has no {flag}: {command}"
        result[result.index(flag) + 1] = value
    return result


def run(command: Sequence[Path | str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`command` from the checkout in `env` alone; the caller checks the outcome."""
    return subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True)


def python_identity(python: Path | str) -> str:
    code = "import sys; print(sys.version, sys.base_prefix)"
    return subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout


@pytest.mark.timeout(300)  # pip fetches trio and setuptools from PyPI into a fresh virtualenv
def test_readme_quick_start_installs_and_relays(dovecot: Dovecot, tmp_path: Path) -> None:
    assert SYSTEM_PYTHON.exists(), "/usr/bin/python3 is missing: the quick start needs it"
    install, serve = quick_start()
    assert install in (["sudo", "bash", "scripts/install"], ["bash", "scripts/install"]), install
    assert serve[:2] == ["imapveil", "serve"], serve

    prefix = tmp_path / "opt" / "imapveil"
    bin_dir = tmp_path / "bin"
    home = tmp_path / "home"
    home.mkdir()
    # What `env -i` leaves, plus where to install: no pyenv shims, no developer's virtualenv.
    clean = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(home),
        "IMAPVEIL_PREFIX": str(prefix),
        "IMAPVEIL_BIN_DIR": str(bin_dir),
        "IMAPVEIL_MAN_DIR": str(tmp_path / "man1"),
    }
    # We run as root (CI does) or into tmp_path, so the README's `sudo` is not needed here.
    installer = install[-2:]
    done = run(installer, clean)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"installed in {prefix}" in done.stdout, done.stdout

    assert (tmp_path / "man1" / "imapveil.1").read_bytes() == (
        ROOT / "man" / "imapveil.1"
    ).read_bytes()
    imapveil = bin_dir / "imapveil"
    assert imapveil.is_symlink()
    assert imapveil.resolve() == (prefix / "bin" / "imapveil").resolve()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    shown = run([imapveil, "--version"], clean)
    assert shown.stdout.strip() == f"imapveil {version}", shown.stdout + shown.stderr

    # The virtualenv is the system Python's, and imapveil runs from it, not from the checkout.
    assert python_identity(prefix / "bin" / "python") == python_identity(SYSTEM_PYTHON)
    assert python_identity(prefix / "bin" / "python").split()[-1] == "/usr"
    where = subprocess.run(
        [prefix / "bin" / "python", "-c", "import imapveil; print(imapveil.__file__)"],
        cwd=tmp_path,
        env=clean,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.startswith(str(prefix)), where.stdout

    # Running it again upgrades in place: the same virtualenv, still working.
    marker = prefix / "kept"
    marker.touch()
    again = run(installer, clean)
    assert again.returncode == 0, again.stdout + again.stderr
    assert marker.exists(), "a second run should keep the virtualenv, not create it again"

    # The README's serve command, on a free loopback port in front of the test Dovecot.
    port = free_port()
    command = with_values(serve, listen=f"127.0.0.1:{port}", upstream=f"127.0.0.1:{dovecot.port}")
    # bin_dir stands for /usr/local/bin, which is on Debian's and Ubuntu's default PATH.
    path = f"{bin_dir}:{clean['PATH']}"
    assert shutil.which(command[0], path=path) == str(imapveil)
    process = subprocess.Popen(
        command,
        cwd=tmp_path,
        env={"PATH": path, "HOME": str(home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        early = wait_until_listening(process)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s, s.makefile("rb") as f:
            greeting = f.readline()
            assert greeting.startswith(b"* OK"), greeting
            assert b"Dovecot ready." in greeting, greeting
            s.sendall(b"a LOGIN alice wonderland\r\n")
            assert f.readline().startswith(b"a OK"), "login through the proxy failed"
            s.sendall(b"b LOGOUT\r\n")
            assert f.readline().startswith(b"* BYE")
            assert f.readline().startswith(b"b OK")
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, (early + stderr).decode()
    assert b"Traceback" not in early + stderr
    events = [json.loads(line)["event"] for line in stdout.decode().splitlines()]
    assert "session_start" in events and "session_end" in events, events
