"""Records the proxy writes about sessions.

Records are built redacted: they have no field that could hold a credential or a message body.
Commands are described by tag, verb, outcome and sizes; users by the identity the configuration
chose (an HMAC by default). Every record is a slotted dataclass whose `to_dict` gives the JSON
object written to the event log, with an `event` key naming its kind. Nothing changes a record
once it is made (several sinks read the same one); they are not frozen only because a frozen
dataclass costs about seven times as much to make (1.3 against 0.2 us for the per-command record,
which every command makes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar


def _fields(record: Any) -> dict[str, Any]:
    """A record's fields, shallowly (dataclasses.asdict deep-copies and is several times slower;
    records hold only plain values)."""
    return {name: getattr(record, name) for name in record.__slots__}


@dataclass(slots=True)
class SessionStarted:
    event: ClassVar[str] = "session_start"
    session: str
    client: str
    upstream: str

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.event, **_fields(self)}


@dataclass(slots=True)
class SessionEnded:
    """How a session ended. `reason` is one of `END_REASONS`."""

    event: ClassVar[str] = "session_end"
    session: str
    client: str
    upstream: str
    reason: str
    detail: str | None
    state: str
    user: str | None
    duration_ms: float
    bytes_from_client: int
    bytes_from_server: int
    commands: int
    client_tls: bool = False
    compressed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.event, **_fields(self)}


@dataclass(slots=True)
class CommandCompleted:
    """One client command and the server's tagged answer (`status` None: no answer came)."""

    event: ClassVar[str] = "command"
    session: str
    tag: str
    verb: str
    state: str
    status: str | None
    code: str | None
    duration_ms: float | None
    literals: tuple[int, ...] = ()
    mechanism: str | None = None
    user: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"event": self.event, **_fields(self)}
        d["literals"] = list(self.literals)
        return d


@dataclass(slots=True)
class Violation:
    """A peer broke the protocol. `detail` never quotes the peer's bytes, only sizes and names."""

    event: ClassVar[str] = "violation"
    session: str
    source: str
    kind: str
    detail: str = ""
    action: str = "forwarded"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {"event": self.event, **_fields(self)}
        if not self.extra:
            del d["extra"]
        return d


@dataclass(slots=True)
class IdExchange:
    """One RFC 2971 ID command and its answer, as the policy allows them to be recorded.

    `client`/`server` hold only what the policy records (None: NIL or none sent); `dropped`
    names the fields that were not forwarded upstream, never their values; `forwarded` names the
    fields that were (None: NIL went upstream).
    """

    event: ClassVar[str] = "id"
    session: str
    tag: str
    state: str
    status: str | None
    malformed: bool
    client: dict[str, str | None] | None
    dropped: tuple[str, ...]
    forwarded: tuple[str, ...] | None
    server: dict[str, str | None] | None
    policy: str = ""
    policy_digest: str = ""
    injected: bool = False
    """The proxy sent this ID itself (`inject_id`), because the client sent none."""

    def to_dict(self) -> dict[str, Any]:
        d = {"event": self.event, **_fields(self)}
        d["dropped"] = list(self.dropped)
        d["forwarded"] = None if self.forwarded is None else list(self.forwarded)
        return d


@dataclass(slots=True)
class SessionTraits:
    """What a session's client program used and how it behaved, for the statistics store only.

    Emitted by the core just before `SessionEnded`, for sessions that reached the server. The
    event log does not write it: fingerprints describe programs, not people, but a rare one can
    single out a person in a small organisation, so they are kept only where every output is
    floored by `min_group_users` (the statistics store).

    `extensions`: the IMAP extensions the client used, normalised (upper case, sorted, unique,
    bounded), e.g. `("CONDSTORE", "ENABLE", "IDLE", "QRESYNC")`. `behaviour`: the behaviour
    signature's short name (`b1_` and 12 hex digits of the digest of `behaviour_text`, its
    canonical text). `ja4`: the JA4 fingerprint of the client leg's TLS ClientHello (None: no
    TLS on the client leg, or no ClientHello could be read).
    """

    event: ClassVar[str] = "traits"
    session: str
    extensions: tuple[str, ...] = ()
    behaviour: str | None = None
    behaviour_text: str | None = None
    ja4: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"event": self.event, **_fields(self)}
        d["extensions"] = list(self.extensions)
        return d


@dataclass(slots=True)
class PolicyLoaded:
    """The ID policy was loaded or reloaded (SIGHUP); `error` says why a new one was refused."""

    event: ClassVar[str] = "policy"
    policy: str
    policy_digest: str
    ok: bool
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.event, **_fields(self)}


@dataclass(slots=True)
class ConfigLoaded:
    """The configuration was (re)loaded, or a reload was refused and the old one stays."""

    event: ClassVar[str] = "config"
    source: str
    ok: bool
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.event, **_fields(self)}


@dataclass(slots=True)
class StoreDropped:
    """Statistics were lost (neither stored nor spooled): `count` items — rows of every kind:
    session rows, ID exchanges, command counts, session traits (extensions in use and
    fingerprints) — since the last such record, `total` since the start; `sessions` and
    `total_sessions` the session rows among them."""

    event: ClassVar[str] = "store_dropped"
    count: int
    total: int
    sessions: int = 0
    total_sessions: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.event, **_fields(self)}


@dataclass(slots=True)
class OverLimit:
    """Connections from `client` (an address, no port; for IPv6 the network counted as one
    client, `2001:db8:1:2::/64`) refused over a connection limit: one
    record for the first, then one per interval for the `refused` ones that followed in the last
    `seconds`, instead of a session record each. `detail` is the latest reason."""

    event: ClassVar[str] = "over_limit"
    client: str
    refused: int
    detail: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.event, **_fields(self)}


Record = (
    SessionStarted
    | SessionEnded
    | CommandCompleted
    | Violation
    | IdExchange
    | SessionTraits
    | PolicyLoaded
    | ConfigLoaded
    | StoreDropped
    | OverLimit
)

END_REASONS = (
    "logout",  # LOGOUT completed
    "client_closed",  # the client closed the connection
    "server_closed",  # the server closed the connection without BYE
    "server_bye",  # the server sent * BYE and closed
    "line_too_long",  # a client line exceeded the limit; we sent * BYE
    "protocol_error",  # a peer broke framing beyond recovery; we sent * BYE (if we could)
    "idle_timeout",  # no traffic within the idle timeout; we sent * BYE
    "upstream_unavailable",  # the upstream could not be reached; we sent * BYE
    "over_limit",  # a connection limit was reached; we sent * BYE [UNAVAILABLE]
    "proxy_header",  # a PROXY protocol header was missing, malformed or not allowed
    "tls_error",  # a TLS handshake failed, or TLS arrived where plain text was expected
    "shutdown",  # the proxy shut down
    "error",  # a network error on either leg
)
