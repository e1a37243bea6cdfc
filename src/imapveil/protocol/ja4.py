"""JA4, FoxIO's TLS client fingerprint, from the first octets a client sent. Pure.

The input is what arrived on the client leg before the handshake went on: TLS records (5-octet
header: content type, version, length; then the fragment). The ClientHello handshake message is
reassembled from the fragments of consecutive handshake records (a ClientHello may span several
records and a record boundary may fall anywhere, even inside the 4-octet handshake header), then
read field by field. Anything that is not a well-formed ClientHello gives None: a record of
another type or version, a length that points past the end or past `MAX_HELLO`, a list whose
length does not fit its parent, a field left over. Nothing here raises on the peer's octets, and
the work is linear in the input it looks at (at most the records that carry the ClientHello).

JA4 as FoxIO's specification (technical_details/JA4.md in FoxIO-LLC/ja4) defines it:

    a = "t" + version + ("d" if SNI else "i") + ciphers(2) + extensions(2) + alpn(2)
    b = sha256("c1,c2,...", the cipher suites sorted, 4 lowercase hex digits each)[:12]
    c = sha256("e1,e2,..." sorted, without SNI 0000 and ALPN 0010, + "_" + the signature
        algorithms in their order, the "_..." only when there are any)[:12]

GREASE values (RFC 8701: 0x0a0a, 0x1a1a, ... 0xfafa) are left out everywhere: from the cipher
suites, the extensions, the supported versions and the signature algorithms. The version is the
highest of supported_versions when the extension is there, else the ClientHello's own; the record
version is ignored. Counts are two digits, at most 99. `alpn` is the first and last character of
the first ALPN protocol when both are ASCII letters or digits, else the first and last digit of
its hex form; "00" without ALPN or with an empty first protocol. An empty cipher list gives
`000000000000` for b, an empty extension list (after SNI and ALPN are left out) the same for c.
This proxy only sees TLS over TCP, so the protocol letter is always "t".
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

MAX_HELLO = 64 * 1024
"""The largest ClientHello read (a post-quantum key share makes one about 2 KB; the handshake
length field allows 16 MB). A longer one gives None."""

_HANDSHAKE = 22
_CLIENT_HELLO = 1
_MAX_FRAGMENT = 1 << 14  # RFC 8446 §5.1: a record's plaintext is at most 2^14 octets
_EMPTY_HASH = "000000000000"

_SERVER_NAME = 0x0000
_SIGNATURE_ALGORITHMS = 0x000D
_ALPN = 0x0010
_SUPPORTED_VERSIONS = 0x002B

_VERSIONS = {
    0x0304: "13",
    0x0303: "12",
    0x0302: "11",
    0x0301: "10",
    0x0300: "s3",
    0x0002: "s2",
    0xFEFF: "d1",
    0xFEFD: "d2",
    0xFEFC: "d3",
}


def is_grease(value: int) -> bool:
    """RFC 8701: 0x0a0a, 0x1a1a, ..., 0xfafa."""
    return value & 0x0F0F == 0x0A0A and value >> 8 == value & 0xFF


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What JA4 reads from a ClientHello, GREASE values already left out, in wire order."""

    version: int  # the ClientHello's legacy_version
    ciphers: tuple[int, ...]
    extensions: tuple[int, ...]
    supported_versions: tuple[int, ...]
    signature_algorithms: tuple[int, ...]
    alpn: bytes | None  # the first ALPN protocol; None without the extension or protocols


def fingerprint(data: bytes | bytearray | memoryview) -> str | None:
    """The JA4 fingerprint of the ClientHello at the start of `data`, or None."""
    hello = parse(data)
    if hello is None:
        return None
    prefix, ciphers, extensions = _parts(hello)
    return f"{prefix}_{_hash12(ciphers)}_{_hash12(extensions)}"


def fingerprint_raw(data: bytes | bytearray | memoryview) -> str | None:
    """JA4_r: the same with the lists themselves in place of their hashes (for debugging)."""
    hello = parse(data)
    if hello is None:
        return None
    return "_".join(_parts(hello))


def parse(data: bytes | bytearray | memoryview) -> ClientHello | None:
    """The ClientHello the TLS records at the start of `data` carry, or None."""
    message = _reassemble(memoryview(data))
    return None if message is None else _client_hello(message)


def _reassemble(data: memoryview) -> bytes | None:
    """The first handshake message's body, from as many records as it takes; None unless it is a
    whole ClientHello in handshake records. Reads no record after the one it ends in."""
    message = bytearray()
    need = 4  # the handshake header first, then the length it announces
    pos = 0
    while len(message) < need:
        if pos + 5 > len(data):
            return None
        kind, major, length = data[pos], data[pos + 1], (data[pos + 3] << 8) | data[pos + 4]
        if kind != _HANDSHAKE or major != 3 or not 0 < length <= _MAX_FRAGMENT:
            return None
        if pos + 5 + length > len(data):
            return None
        message += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if need == 4 and len(message) >= 4:
            if message[0] != _CLIENT_HELLO:
                return None
            need = 4 + int.from_bytes(message[1:4], "big")
            if need > 4 + MAX_HELLO:
                return None
    return bytes(message[4:need])


class _Reader:
    """Reads big-endian fields from a buffer; every read past the end gives None."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: bytes, pos: int = 0, end: int | None = None) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end

    def left(self) -> int:
        return self.end - self.pos

    def take(self, n: int) -> bytes | None:
        if n > self.left():
            return None
        self.pos += n
        return self.buf[self.pos - n : self.pos]

    def number(self, size: int) -> int | None:
        raw = self.take(size)
        return None if raw is None else int.from_bytes(raw, "big")

    def vector(self, length_size: int) -> _Reader | None:
        """The sub-buffer a length prefix of `length_size` octets announces."""
        n = self.number(length_size)
        if n is None or n > self.left():
            return None
        sub = _Reader(self.buf, self.pos, self.pos + n)
        self.pos += n
        return sub

    def u16_list(self) -> list[int] | None:
        """The rest as 16-bit values; None when an odd octet is left."""
        if self.left() % 2:
            return None
        values = [int.from_bytes(self.buf[i : i + 2], "big") for i in range(self.pos, self.end, 2)]
        self.pos = self.end
        return values


def _client_hello(body: bytes) -> ClientHello | None:
    r = _Reader(body)
    version = r.number(2)
    if version is None or r.take(32) is None:  # the random
        return None
    session = r.vector(1)
    ciphers = r.vector(2)
    compression = r.vector(1)
    if session is None or session.left() > 32 or ciphers is None or compression is None:
        return None
    suites = ciphers.u16_list()
    if suites is None or not suites or not compression.left():
        return None
    extensions: dict[int, bytes] = {}
    order: list[int] = []
    if r.left():  # extensions are optional (TLS 1.2 and before), but then nothing else may follow
        block = r.vector(2)
        if block is None or r.left() or not _extensions(block, extensions, order):
            return None
    return _build(version, suites, extensions, order)


def _extensions(block: _Reader, found: dict[int, bytes], order: list[int]) -> bool:
    """Each extension's type and data; False when one does not fit or a type repeats."""
    while block.left():
        kind = block.number(2)
        data = block.vector(2)
        if kind is None or data is None or kind in found:
            return False
        found[kind] = data.buf[data.pos : data.end]
        order.append(kind)
    return True


def _build(
    version: int, suites: list[int], extensions: dict[int, bytes], order: list[int]
) -> ClientHello | None:
    supported = _values(extensions.get(_SUPPORTED_VERSIONS), 1)
    algorithms = _values(extensions.get(_SIGNATURE_ALGORITHMS), 2)
    alpn = _first_protocol(extensions.get(_ALPN, b"\x00\x00"))
    if supported is None or algorithms is None or alpn is None:
        return None
    if _SUPPORTED_VERSIONS in extensions and not supported:
        return None  # RFC 8446 §4.2.1: at least one version, and GREASE is none
    return ClientHello(
        version=version,
        ciphers=tuple(v for v in suites if not is_grease(v)),
        extensions=tuple(v for v in order if not is_grease(v)),
        supported_versions=supported,
        signature_algorithms=algorithms,
        alpn=alpn or None,
    )


def _values(data: bytes | None, length_size: int) -> tuple[int, ...] | None:
    """The 16-bit values, GREASE left out, of a list behind a length prefix that must cover
    exactly the rest; () for an extension that is not there, None for a malformed one."""
    if data is None:
        return ()
    r = _Reader(data)
    inner = r.vector(length_size)
    if inner is None or r.left():
        return None
    listed = inner.u16_list()
    return None if listed is None else tuple(v for v in listed if not is_grease(v))


def _first_protocol(data: bytes) -> bytes | None:
    """The first protocol of an ALPN extension (RFC 7301: a 16-bit list length, then 8-bit
    length-prefixed names, none empty); b"" for an empty list; None when malformed."""
    r = _Reader(data)
    names = r.vector(2)
    if names is None or r.left():
        return None
    first: bytes | None = None
    while names.left():
        name = names.vector(1)
        if name is None:
            return None
        if first is None:
            first = name.buf[name.pos : name.end]
    return first or b""


def _parts(hello: ClientHello) -> tuple[str, str, str]:
    """JA4_a, and the two lists that b and c hash."""
    version = max(hello.supported_versions) if hello.supported_versions else hello.version
    sni = "d" if _SERVER_NAME in hello.extensions else "i"
    a = (
        f"t{_VERSIONS.get(version, '00')}{sni}"
        f"{min(len(hello.ciphers), 99):02d}{min(len(hello.extensions), 99):02d}"
        f"{_alpn(hello.alpn)}"
    )
    ciphers = ",".join(f"{v:04x}" for v in sorted(hello.ciphers))
    kept = sorted(v for v in hello.extensions if v not in (_SERVER_NAME, _ALPN))
    extensions = ",".join(f"{v:04x}" for v in kept)
    if extensions and hello.signature_algorithms:
        extensions += "_" + ",".join(f"{v:04x}" for v in hello.signature_algorithms)
    return a, ciphers, extensions


def _alpn(first: bytes | None) -> str:
    if not first:
        return "00"
    head, tail = first[0], first[-1]
    if _alphanumeric(head) and _alphanumeric(tail):
        return chr(head) + chr(tail)
    digits = first.hex()
    return digits[0] + digits[-1]


def _alphanumeric(octet: int) -> bool:
    return 0x30 <= octet <= 0x39 or 0x41 <= octet <= 0x5A or 0x61 <= octet <= 0x7A


def _hash12(text: str) -> str:
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:12] if text else _EMPTY_HASH
