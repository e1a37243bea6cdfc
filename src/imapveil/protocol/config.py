"""What a session core is told at its start: limits, timeouts, the ID policy, the client leg."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from imapveil.protocol.id_policy import IdPolicy


def _no_identity(_user: bytes) -> str | None:
    return None


@dataclass(frozen=True, slots=True)
class CoreConfig:
    max_line: int = 64 * 1024
    """Longest client line (outside literals) before `* BYE`, like Dovecot's default."""
    server_hold: int = 64 * 1024
    """Longest server line held whole for parsing; longer lines stream through."""
    identify_user: Callable[[bytes], str | None] = field(default=_no_identity)
    """Maps a login name to what records say of the user (an HMAC, the name, or None)."""
    log_commands: bool = True
    idle_timeout_login: float = 60.0
    """Seconds without traffic before login (Dovecot's login timeout is 60 s too)."""
    idle_timeout: float = 31 * 60.0
    """Seconds without traffic after login; RFC 2177 clients re-issue IDLE every 29 minutes."""
    policy: Callable[[], IdPolicy] | None = None
    """The current ID policy (it may be reloaded); None: ID is relayed like any command."""
    hash_value: Callable[[bytes], str] = field(default=lambda _v: "hmac:")
    """Keyed HMAC for `record = "hash"` in ID policies."""
    max_id_records: int = 10
    """`id` records per session, and the client's IDs the policy decides: past it an ID goes
    out as `ID NIL`, undecided (deciding a hostile one costs milliseconds of the loop)."""
    max_violation_records: int = 20
    """Violation records per session (refused commands count too); the rest are counted in one
    `violations_suppressed` record at the end: one client's garbage must not flood the log."""
    inject_id: tuple[tuple[bytes, bytes], ...] = ()
    forward_client_address: bool = False
    client_tls: str = "off"
    """STARTTLS on a plain client leg: "off", "offer", or "require" (LOGINDISABLED until TLS)."""
    compress: bool = False
    """Offer COMPRESS=DEFLATE on the client leg (the proxy does the compression)."""
    strict_capabilities: bool = False
    """Advertise only capabilities the proxy knows (see protocol.capabilities.KNOWN)."""
    login_deadline: float = 180.0
    """Seconds from the connection until the client must be logged in, however it trickles
    (Dovecot's own limit for a client to log in is three minutes). 0: none."""
    greeting_timeout: float = 10.0
    """Seconds for the upstream's first line, which must be an IMAP greeting."""
    literal_timeout: float = 60.0
    """Seconds the proxy waits for the server's `+` (or answer) to a literal it forwarded."""
    max_held: int = 1024 * 1024
    """Client octets held while the client must wait for the server (the shell stops reading
    meanwhile, so this is one receive's worth; more is a client that cannot be followed)."""
    max_unanswered: int = 1_000
    """Commands sent and not answered yet, at most: beyond, the client is not read until answers
    come (each is kept until its answer, a few hundred octets, up to 4 KiB with a long tag, a
    mailbox and `MAX_LITERALS` literal sizes; a client that pipelines and reads nothing would
    have as many kept as the socket buffers on both legs hold, hundreds of MB a session)."""
    max_discard: int = 64 * 1024 * 1024
    """Octets of a refused command's literals the proxy skips to stay in step with a LITERAL+
    client; a larger literal ends the session instead (a `{2^63}` never drains)."""
