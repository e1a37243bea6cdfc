"""The two systemd interfaces a service needs, spoken directly (no library).

- sd_notify (systemd.service(5) Type=notify, sd_notify(3)): one datagram per state change to the
  AF_UNIX socket in $NOTIFY_SOCKET ("@" means the abstract namespace).
- Socket activation (sd_listen_fds(3)): inherited listening sockets from fd 3 on, counted by
  $LISTEN_FDS, named by $LISTEN_FDNAMES, and meant for us only if $LISTEN_PID is our pid.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3


class Notifier:
    """Sends sd_notify messages; does nothing when not started by systemd with Type=notify."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        watchdog = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_interval: float | None = None
        if watchdog.isdigit() and int(watchdog) > 0 and (not pid or pid == str(os.getpid())):
            # Ping at half the interval, as sd_watchdog_enabled(3) recommends.
            self.watchdog_interval = int(watchdog) / 2_000_000
        self._socket: socket.socket | None = None
        """Opened at the first message and kept: a socket for each would fail with EMFILE
        once clients hold every descriptor, and the watchdog, unfed, would have systemd kill
        the service and every session with it."""

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> None:
        if not self.address:
            return
        message = "\n".join(fields).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.sendto(message, self.address)
        except OSError as exc:  # systemd gone: nothing to tell, nothing to stop for
            log.warning("sd_notify failed: %s", exc)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def ready(self, status: str = "") -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")


def inherited_sockets(environ: Mapping[str, str] | None = None) -> list[tuple[str, socket.socket]]:
    """Listening sockets handed over by systemd (or a test), with their names.

    Unnamed sockets are called "imap". The variables are cleared so that child processes do not
    take them for their own.
    """
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = env.get("LISTEN_FDS", "")
    if not count.isdigit():
        return []
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    found = []
    for i in range(int(count)):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        name = names[i] if i < len(names) and names[i] else "imap"
        found.append((name, socket.socket(fileno=fd)))
    if environ is None:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
    return found
