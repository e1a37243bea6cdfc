"""Capability mediation: the client sees what the proxy can actually deliver.

The server's list describes the server's leg, not the client's: whether STARTTLS is possible and
LOGIN disabled depends on the client leg; COMPRESS is done by the proxy on the client leg; SASL
mechanisms with channel binding (`*-PLUS`) cannot cross a TLS terminator; CLIENTID ties a client
to the server's view of the connection; UNAUTHENTICATE would take the session to another user
behind the proxy's back. Unknown extensions pass by default (the framer follows
them); `strict` keeps only what the proxy knows (RFC 2971 §5 asks intermediaries to).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

# What the proxy knows it relays correctly (RFC 9051 and the extensions clients use).
KNOWN = frozenset(
    """IMAP4REV1 IMAP4REV2 IDLE ID LITERAL+ LITERAL- NAMESPACE UIDPLUS UNSELECT CHILDREN
    MOVE CONDSTORE QRESYNC ENABLE ESEARCH ESORT SORT SORT=DISPLAY THREAD=REFERENCES
    THREAD=REFS THREAD=ORDEREDSUBJECT MULTIAPPEND CATENATE URL-PARTIAL BINARY SPECIAL-USE
    CREATE-SPECIAL-USE LIST-EXTENDED LIST-STATUS STATUS=SIZE SASL-IR LOGIN-REFERRALS
    MAILBOX-REFERRALS I18NLEVEL=1 SEARCHRES WITHIN CONTEXT=SEARCH CONTEXT=SORT QUOTA
    QUOTA=RES-STORAGE QUOTA=RES-MESSAGE ACL RIGHTS=TEKX METADATA METADATA-SERVER NOTIFY
    SAVEDATE OBJECTID PREVIEW SNIPPET=FUZZY PREVIEW=FUZZY APPENDLIMIT UTF8=ACCEPT
    X-GM-EXT-1 XLIST""".split()  # noqa: SIM905 (one word per capability reads best as text)
)


_LEG_OWN = frozenset((b"STARTTLS", b"LOGINDISABLED", b"CLIENTID", b"UNAUTHENTICATE"))
"""Never passed on as the server says them: the client leg's own (STARTTLS, LOGINDISABLED),
or what the proxy's state cannot follow (CLIENTID; UNAUTHENTICATE, answered BAD:
`ClientLeg._decide`)."""


@dataclass(frozen=True, slots=True)
class LegState:
    client_tls: str  # "off" | "offer" | "require": STARTTLS on a plain client leg
    client_secure: bool  # the client leg is TLS (implicit, or after STARTTLS)
    compress: bool  # the proxy offers COMPRESS=DEFLATE on the client leg
    compressed: bool  # it is active
    strict: bool
    authenticated: bool = False  # STARTTLS is for the not authenticated state only (RFC 9051)


def mediate(tokens: list[bytes], leg: LegState) -> list[bytes]:
    out = []
    for token in tokens:
        upper = token.upper()
        if upper in _LEG_OWN or upper.startswith(b"COMPRESS="):
            continue
        if upper.startswith(b"AUTH="):
            if upper.endswith(b"-PLUS"):
                continue
            if leg.client_tls == "require" and not leg.client_secure:
                continue  # no authentication before TLS
        elif leg.strict and upper.decode("ascii", "replace") not in KNOWN:
            continue
        out.append(token)
    if not leg.client_secure and not leg.authenticated and leg.client_tls in ("offer", "require"):
        out.append(b"STARTTLS")
        if leg.client_tls == "require":
            out.append(b"LOGINDISABLED")
    if leg.compress and not leg.compressed and leg.authenticated:  # RFC 4978: after login
        out.append(b"COMPRESS=DEFLATE")
    return out


CACHED = 4096
"""Capability lists up to this long are mediated once per text and leg state, not per session
(every session of a server sees the same two or three lists): the cache holds at most 256 of
them, so at most 1 MiB whatever a server sends."""


def rewrite(args: bytes, leg: LegState) -> bytes | None:
    """The mediated list for the text after CAPABILITY, or None if nothing changes."""
    if len(args) <= CACHED:
        return _cached(args, leg)
    return _rewrite(args, leg)


def _rewrite(args: bytes, leg: LegState) -> bytes | None:
    tokens = args.split()
    mediated = mediate(tokens, leg)
    return None if mediated == tokens else b" ".join(mediated)


_cached = functools.lru_cache(maxsize=256)(_rewrite)
