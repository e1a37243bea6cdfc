"""The two systemd interfaces a service needs, spoken directly (no library).

- sd_notify (systemd.service(5) Type=notify, sd_notify(3)): one datagram per state change to the
  AF_UNIX socket in $NOTIFY_SOCKET ("@" means the abstract namespace). Never blocking: a
  datagram the socket cannot take now (PID 1 wedged or slow, its receive queue full) waits in
  the notifier and is sent, in order, when there is room (`Notifier.run`).
- Socket activation (sd_listen_fds(3)): inherited listening sockets from fd 3 on, counted by
  $LISTEN_FDS, named by $LISTEN_FDNAMES, and meant for us only if $LISTEN_PID is our pid.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from collections.abc import Mapping

import trio

from imapveil.relay.limits import Occurrences

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
MAX_PENDING = 16
"""Datagrams kept while the notify socket takes none; beyond, the oldest is dropped (the last
ones say the state systemd must end up knowing)."""
RETRY = 0.5
"""Seconds between attempts to send what waits."""
WARN_EVERY = 60.0
"""Seconds between two warnings about datagrams that wait or were lost."""
_WATCHDOG = b"WATCHDOG=1"


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
        self.pending: deque[bytes] = deque()
        """Datagrams said but not yet sent, oldest first."""
        self.dropped = 0
        """Datagrams given up: more than `MAX_PENDING` waited, or the socket refused them."""
        self._socket: socket.socket | None = None
        """Opened at the first message and kept: a socket for each would fail with EMFILE
        once clients hold every descriptor, and the watchdog, unfed, would have systemd kill
        the service and every session with it."""
        self._blocked = trio.Event()  # set when something waits: `run` retries
        self._problems = Occurrences(WARN_EVERY)  # one warning a `WARN_EVERY` at most

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> None:
        """Send now if the socket takes it; else keep it, in order, for `run` to send."""
        if not self.address:
            return
        message = "\n".join(fields).encode()
        if message == _WATCHDOG and _WATCHDOG in self.pending:
            return  # one ping waiting says as much as many
        if len(self.pending) >= MAX_PENDING:
            self.pending.popleft()
            self.dropped += 1
            self._warn("sd_notify: the notify socket takes nothing; dropped the oldest datagram")
        self.pending.append(message)
        self.flush()

    def flush(self) -> None:
        """Send what waits, in order, until the socket takes no more. Never blocks."""
        while self.pending:
            try:
                if self._socket is None:
                    self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._socket.setblocking(False)
                self._socket.sendto(self.pending[0], self.address)
            except BlockingIOError:  # its receive queue is full: later (`run`)
                self._blocked.set()
                self._warn(f"sd_notify: the notify socket is full; retrying every {RETRY:g} s")
                return
            except OSError as exc:  # systemd gone: nothing to tell, nothing to stop for
                self.dropped += 1
                self._warn(f"sd_notify failed: {exc}")
            self.pending.popleft()

    async def run(self) -> None:
        """Send what the socket could not take when it was said, every `RETRY` seconds."""
        while True:
            await self._blocked.wait()
            self._blocked = trio.Event()
            while self.pending:
                await trio.sleep(RETRY)
                self.flush()

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _warn(self, message: str) -> None:
        """The first problem at once, then at most one a `WARN_EVERY`, with how many there were
        (`limits.Occurrences`, as for what clients cause over and over)."""
        said = self._problems.note(time.monotonic())
        if said is not None:
            log.warning("%s%s", message, said)

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
