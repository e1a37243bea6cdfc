"""A real PostgreSQL on loopback for the statistics store's tests (Debian's `postgresql`).

A throw-away cluster in a temporary directory, on a free port, trust authentication for one
superuser; readiness is a successful connection, polled for. PostgreSQL refuses to run as root,
so as root the cluster belongs to the `postgres` account the package creates.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.helpers.dovecot import free_port, stop_group


def ensure_postgres() -> Path:
    """The server binaries. Fails loudly: scripts/check installs them, tests never skip."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: run `bash scripts/check`")
    return Path(found[-1]).parent


_templates: dict[Path, Postgres] = {}


def _template(binaries: Path, timeout: float) -> Path:
    """The directory of this run's stopped template cluster, made on first use."""
    if binaries not in _templates:
        template = Postgres()
        template._init(timeout)
        _templates[binaries] = template
        atexit.register(template.cleanup)
    return _templates[binaries].root


class Postgres:
    def __init__(self) -> None:
        self.bin = ensure_postgres()
        self.root = Path(tempfile.mkdtemp(prefix="imapveil-pg-"))
        self.root.chmod(0o755)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.as_user: list[str] = []
        if os.getuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]

    @property
    def log_path(self) -> Path:
        """The server's log (its stderr)."""
        return self.root / "postgres.log"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def url(self) -> str:
        return f"postgresql://imapveil@127.0.0.1:{self.port}/stats"

    def _run(self, *command: str) -> None:
        subprocess.run([*self.as_user, *command], check=True, capture_output=True, timeout=120)

    def start(self, timeout: float = 30.0) -> Postgres:
        """A fresh cluster: a copy of one made once a run (initdb and CREATE DATABASE took 2 of
        the 2.5 s a start cost; a copy of the stopped cluster takes 0.5)."""
        # cp -a keeps the owner (the postgres account, as root) and the data directory's 0700.
        self._run("cp", "-a", str(_template(self.bin, timeout) / "data"), str(self.root / "data"))
        self._serve(timeout, create=False)
        return self

    def _init(self, timeout: float) -> None:
        """initdb, and the statistics database, in a cluster left stopped."""
        data = self.root / "data"
        self._run(str(self.bin / "initdb"), "-D", str(data), "-A", "trust", "-U", "imapveil",
                  "--no-sync")  # fmt: skip
        self._serve(timeout, create=True)
        self.stop()

    def restart(self, timeout: float = 30.0) -> None:
        """Start the same cluster again after `stop()` (the store "comes back")."""
        self._serve(timeout, create=False)

    def _serve(self, timeout: float, *, create: bool) -> None:
        import psycopg  # noqa: PLC0415 (the store's optional driver)

        data = self.root / "data"
        setpriv = shutil.which("setpriv")
        prefix = [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []
        # The server's log to a file: a pipe nobody reads fills with some 64 KiB of it (an
        # ERROR line per refused statement), and the server stalls in its write.
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*prefix, *self.as_user, str(self.bin / "postgres"), "-D", str(data),
                 "-p", str(self.port), "-k", str(self.root), "-c", "listen_addresses=127.0.0.1",
                 "-c", "fsync=off"],
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        admin = f"postgresql://imapveil@127.0.0.1:{self.port}/postgres"
        while True:
            try:
                with psycopg.connect(admin, connect_timeout=2, autocommit=True) as conn:
                    if create:
                        conn.execute("CREATE DATABASE stats")
                return
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"PostgreSQL did not start:\n{self.log_text()}") from None
                time.sleep(0.05)  # polling for the server, not waiting a fixed time

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            stop_group(process, signal.SIGINT)  # PostgreSQL's "fast shutdown"

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
