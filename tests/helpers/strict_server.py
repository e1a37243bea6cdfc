"""A reference server for the fail-closed properties: it reads what the proxy forwards exactly
the way RFC 9051 says a server must, and checks the one thing the proxy promises about it.

It reads line fragments; a fragment ending in `{N}` gets a "+" (or, as the test draws it, a
tagged NO instead: the command is refused and the next octets are a new command, which is what
Dovecot does after some errors). It reads literal octets only after its own "+". IDLE is
answered as Dovecot answers it, whatever follows it on the line: "+ idling", then a line that
ends it (DONE, or anything else: BAD, and that line is not run). It keeps every octet of the ID
commands it executed, so that a test can look for identifiers in them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from imapveil.protocol.lexer import strip_eol

_LITERAL = re.compile(rb"\{(\d+)(\+?)\}\Z")


class StrictServer:
    def __init__(self, decisions: Iterator[bool]) -> None:
        self._decisions = decisions
        self._buf = bytearray()
        self._literal_left = 0
        self._in_command = False
        self._tag = b""
        self._verb = b""
        self._idling = False
        self.id_octets = bytearray()
        self.commands: list[tuple[bytes, bytes]] = []  # (tag, verb) of each command begun

    def feed(self, data: bytes) -> bytes:
        """Octets from the proxy; returns the server's answers."""
        out = bytearray()
        self._buf += data
        while self._buf:
            if self._literal_left:
                take = min(self._literal_left, len(self._buf))
                if self._verb == b"ID":
                    self.id_octets += self._buf[:take]
                del self._buf[:take]
                self._literal_left -= take
                continue
            nl = self._buf.find(b"\n")
            if nl < 0:
                break
            line = bytes(self._buf[: nl + 1])
            del self._buf[: nl + 1]
            body = strip_eol(line)
            if self._idling:
                self._idling = False
                ok = body.upper() == b"DONE"
                out += self._tag + (b" OK idle done\r\n" if ok else b" BAD Expected DONE\r\n")
                continue
            if not self._in_command:
                tag, _, rest = body.partition(b" ")
                self._tag, self._verb = tag, rest.split(b" ", 1)[0].upper()
                self.commands.append((self._tag, self._verb))
            if self._verb == b"ID":
                self.id_octets += line
            if self._verb == b"IDLE" and not self._in_command:
                self._idling = True  # Dovecot idles, literal announcement or not
                out += b"+ idling\r\n"
                continue
            m = _LITERAL.search(body)
            if m is None:
                self._in_command = False
                if self._verb == b"ID":
                    out += b"* ID NIL\r\n"
                out += self._tag + b" OK done\r\n"
                continue
            assert not m.group(2), "a non-synchronizing literal reached the server"
            # Every literal octet must follow the server's "+" for it: nothing may have been
            # sent after the announcement before the server answered it.
            assert not self._buf, "octets after {N} before the server's continuation"
            if next(self._decisions, True):
                self._in_command = True
                self._literal_left = int(m.group(1))
                out += b"+ go ahead\r\n"
            else:
                self._in_command = False
                out += self._tag + b" NO refused before its literal\r\n"
        return bytes(out)
