"""A real Dovecot on loopback, started from a generated config in a temporary directory.

`Dovecot.start()` runs `dovecot -F` (foreground, so this process owns it) on a free port with
plain-text auth allowed, passwd-file users and Maildirs in the temporary directory, and
`imap_id_log = *` so that the `ID` Dovecot receives shows up in its info log. Readiness is the
`* OK` greeting, polled for, never slept for. `stop()` ends only the process it started.

Dovecot refuses to run mail processes as root, so when the tests run as root (CI does) mail is
owned by `nobody`; otherwise by the current user, with the login and internal users set to the
current user and no chroot.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

USERS = {"alice": "wonderland", "bob": "builder"}


def ensure_dovecot() -> str:
    """The dovecot binary. Fails loudly: CI installs it (`scripts/check`), tests never skip."""
    found = shutil.which("dovecot") or next(
        (p for p in ("/usr/sbin/dovecot", "/usr/local/sbin/dovecot") if os.access(p, os.X_OK)),
        None,
    )
    if found is None:
        raise RuntimeError("dovecot is not installed: run `bash scripts/check`, which installs it")
    return found


def _die_with_parent(command: list[str]) -> list[str]:
    """If the test process is killed (a CI timeout), Dovecot goes with it (util-linux setpriv)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *command] if setpriv else command


def stop_group(process: subprocess.Popen[bytes], signum: int, timeout: float = 20) -> None:
    """End the process group we started (and only it): `signum`, then SIGKILL on timeout."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    for pipe in (process.stdout, process.stderr):
        if pipe is not None:
            pipe.close()


PROBE_SOURCE = "127.0.0.254"
"""Where the readiness probe comes from (`rip=` in Dovecot's log; the PROXY header's source on
a HAProxy listener): its lines are never counted (`Dovecot.logged`). Tests used to wait for the
probe's `Disconnected` line before counting theirs, and now and then Dovecot never logged it
(seen in full runs; a fresh-clone CI lost a module's 31 tests to it: 60 s with nothing but
Dovecot's start in the log)."""
_PROBE_LINE = f"rip={PROBE_SOURCE},"


def _log_out(s: socket.socket) -> None:
    """The readiness probe's end: LOGOUT, and Dovecot's close awaited, so that Dovecot ends the
    connection and logs its `Disconnected` line as for any client. Closed at once after the
    greeting instead, the probe's line was now and then never logged (seen in full runs, 3 of 6
    lately; never in 120 starts alone), and the tests that count those lines wait for it."""
    with contextlib.suppress(OSError):
        s.sendall(b"p LOGOUT\r\n")
        while s.recv(1024):
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Dovecot:
    def __init__(
        self,
        users: dict[str, str] | None = None,
        *,
        haproxy: bool = False,
        trusting: bool = False,
        tls: tuple[Path, Path] | None = None,
        extra_config: str = "",
    ) -> None:
        self.extra_config = extra_config
        """Appended to the generated dovecot.conf (benchmarks raise process limits here)."""
        self.tls = tls
        """(certificate chain, key) PEM files: STARTTLS on the IMAP port and implicit TLS on
        `tls_port`."""
        self.haproxy = haproxy
        self.trusting = trusting
        """Trust 127.0.0.1 (login_trusted_networks): x-originating-ip in ID is believed."""
        """Require a PROXY header (HAProxy protocol) from 127.0.0.1 on the IMAP listener."""
        self.binary = ensure_dovecot()
        self.users = dict(users or USERS)
        # Not under pytest's 0700 tmp_path: the unprivileged mail user must reach the Maildirs.
        self.root = Path(tempfile.mkdtemp(prefix="imapveil-dovecot-"))
        self.root.chmod(0o755)
        self.port = free_port()
        self.tls_port = free_port() if tls else 0
        self.greeting_text = f"Dovecot ready. {secrets.token_hex(4)}"
        """This Dovecot's greeting: a probe that reads another's (a server of another test
        process that bound the port `free_port` found free) knows it is not this one."""
        self.process: subprocess.Popen[bytes] | None = None
        if os.getuid() == 0:
            mail = pwd.getpwnam("nobody")
            self.mail_uid, self.mail_gid = mail.pw_uid, mail.pw_gid
            self.service_user = None
        else:
            self.mail_uid, self.mail_gid = os.getuid(), os.getgid()
            self.service_user = pwd.getpwuid(os.getuid()).pw_name
        self._seq = 0

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def log_path(self) -> Path:
        return self.root / "dovecot.log"

    @property
    def info_log_path(self) -> Path:
        """Where `imap_id_log` lines go: `imap(alice)<...>: ID sent: name=..., version=...`."""
        return self.root / "dovecot-info.log"

    def maildir(self, user: str) -> Path:
        return self.root / "mail" / user

    def _write_config(self) -> None:
        passwd = "".join(
            f"{u}:{{PLAIN}}{p}:{self.mail_uid}:{self.mail_gid}::{self.maildir(u)}\n"
            for u, p in self.users.items()
        )
        (self.root / "passwd").write_text(passwd)
        services = ""
        if self.service_user is not None:
            services = (
                f"default_login_user = {self.service_user}\n"
                f"default_internal_user = {self.service_user}\n"
                # Else Dovecot's default group `dovecot`: chown of its sockets fails unprivileged.
                f"default_internal_group = {grp.getgrgid(os.getgid()).gr_name}\n"
                "service imap-login {\n  chroot =\n}\n"
            )
        first_uid = min(self.mail_uid, 500)
        config = f"""
base_dir = {self.root}/run
state_dir = {self.root}/state
log_path = {self.log_path}
info_log_path = {self.info_log_path}
protocols = imap
listen = 127.0.0.1
{self._ssl_settings()}
disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = {first_uid}
first_valid_gid = {min(self.mail_gid, 500)}
mail_location = maildir:~/Maildir
mail_max_userip_connections = 1000
imap_id_log = *
haproxy_trusted_networks = 127.0.0.1
{"login_trusted_networks = 127.0.0.1" if self.trusting else ""}
imap_id_send = name *
auth_failure_delay = 0
login_greeting = {self.greeting_text}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {self.root}/passwd
}}
userdb {{
  driver = passwd-file
  args = {self.root}/passwd
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
    haproxy = {"yes" if self.haproxy else "no"}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {self.tls_port}
  }}
}}
service anvil {{
  chroot =
  # No auth penalty: after a failed login Dovecot delays every later login from the address
  # (127.0.0.1 for all tests) by up to 15 s; a socket nobody may open turns it off.
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
{services}
{self.extra_config}
"""
        (self.root / "dovecot.conf").write_text(config)

    def _ssl_settings(self) -> str:
        if self.tls is None:
            return "ssl = no"
        cert, key = self.tls
        return f"ssl = yes\nssl_cert = <{cert}\nssl_key = <{key}\nssl_min_protocol = TLSv1.2"

    @property
    def tls_address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.tls_port)

    def start(self, timeout: float = 30.0) -> Dovecot:
        """Started once it greets with its own greeting. Ports found free may be taken before
        Dovecot binds them (by another test process binding port 0: Linux hands a port just
        freed out again): the probe then reads another server's greeting, and this Dovecot
        exits, its port in use; it is started again on new ports, three times at most."""
        for attempt in range(3):
            if attempt:
                self.port = free_port()
                self.tls_port = free_port() if self.tls_port else 0
            if self._start(timeout):
                return self
        raise RuntimeError(f"dovecot found its ports in use three times:\n{self.log_text()}")

    def _start(self, timeout: float) -> bool:
        """False: Dovecot exited because a port was in use."""
        self._write_config()
        for user in self.users:
            self._ensure_maildir(user)
        self.process = subprocess.Popen(
            _die_with_parent([self.binary, "-F", "-c", str(self.root / "dovecot.conf")]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        mine = self.greeting_text.encode()
        while True:
            if self.process.poll() is not None:
                out = ""
                if self.process.stdout is not None:
                    with self.process.stdout:
                        out = self.process.stdout.read().decode()
                if "Address already in use" in out + self.log_text():
                    self.process = None
                    return False
                raise RuntimeError(
                    f"dovecot exited ({self.process.returncode}):\n{out}\n{self.log_text()}"
                )
            try:
                # Behind HAProxy only 127.0.0.1 may send the header, which names the probe.
                source = None if self.haproxy else (PROBE_SOURCE, 0)
                with socket.create_connection(self.address, 2, source) as s:
                    s.settimeout(5)
                    if self.haproxy:
                        s.sendall(f"PROXY TCP4 {PROBE_SOURCE} 127.0.0.1 1024 143\r\n".encode())
                    greeting = s.recv(1024)
                    if greeting.startswith(b"* OK") and mine in greeting:
                        _log_out(s)
                        return True
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dovecot did not greet within {timeout} s:\n{self.log_text()}")
            time.sleep(0.02)  # polling for the port, not waiting a fixed time

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            stop_group(process, signal.SIGTERM)  # dovecot -F and its children, nothing else

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def _ensure_maildir(self, user: str) -> Path:
        box = self.maildir(user) / "Maildir"
        (self.root / "mail").mkdir(exist_ok=True)
        for path in (self.maildir(user), box, box / "cur", box / "new", box / "tmp"):
            path.mkdir(exist_ok=True, mode=0o700)
            os.chown(path, self.mail_uid, self.mail_gid)
        return box

    def seed(self, user: str, messages: list[bytes]) -> None:
        """Put messages into the user's INBOX (as read, in `cur/`)."""
        box = self._ensure_maildir(user)
        for message in messages:
            self._seq += 1
            # Dovecot gives new mail UIDs in name order (time, then strcmp): pad the counter.
            path = box / "cur" / f"{int(time.time())}.{self._seq:06d}.imapveil:2,S"
            path.write_bytes(message)
            os.chown(path, self.mail_uid, self.mail_gid)

    def logged(self, marker: str, text: str | None = None) -> int:
        """Lines of the log (or of `text`) with `marker`, the readiness probe's not counted."""
        if text is None:
            text = self.log_text()
        return sum(marker in line and _PROBE_LINE not in line for line in text.splitlines())

    def wait_for_log(self, marker: str, count: int, timeout: float = 60.0) -> str:
        """The info log once it holds `count` lines with `marker`, the readiness probe's not
        counted (Dovecot writes it a moment after answering, from its log process, so this
        polls the file)."""
        deadline = time.monotonic() + timeout
        while self.logged(marker, text := self.log_text()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{count} x {marker!r} not in Dovecot's log:\n{text}")
            time.sleep(0.02)
        return text

    def log_text(self) -> str:
        parts = []
        for path in (self.log_path, self.info_log_path):
            with contextlib.suppress(OSError):
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)
