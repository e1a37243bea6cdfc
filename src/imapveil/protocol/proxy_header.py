"""The PROXY protocol header (HAProxy, versions 1 and 2), read and written. Pure.

A load balancer in front of the proxy prepends one header to each connection saying who the real
client is. Version 1 is a text line (`PROXY TCP4 src dst sport dport` CRLF, at most 107 octets);
version 2 is binary (a 12-octet signature, version/command, family, a 16-bit length, then the
addresses and optional TLVs).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107
V2_MAX_BODY = 2048  # addresses plus TLVs; more is not a header we accept


class ProxyHeaderError(ValueError):
    """Not a PROXY header we accept. The message never quotes the peer's bytes."""


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """Who connected, per the header. None addresses: LOCAL/UNKNOWN, use the socket's own."""

    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    version: int


def parse(data: bytes) -> tuple[ProxyInfo, int] | None:
    """(header, its length) if `data` starts with a complete header; None if more is needed.

    Raises ProxyHeaderError when the data cannot be (the start of) a valid header.
    """
    if data.startswith(V2_SIGNATURE[: len(data)]) and len(data) < 16:
        return None
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if data.startswith(b"PROXY "[: len(data)]) and len(data) < 6:
        return None
    if data.startswith(b"PROXY "):
        return _parse_v1(data)
    raise ProxyHeaderError("no PROXY header")


def looks_like_header(data: bytes) -> bool:
    return data.startswith((b"PROXY ", V2_SIGNATURE[:8]))


def could_be_header(data: bytes) -> bool:
    """True while `data` is too short to tell: a proper prefix of either signature."""
    return (len(data) < 6 and b"PROXY ".startswith(data)) or (
        len(data) < 8 and V2_SIGNATURE.startswith(data)
    )


def _parse_v1(data: bytes) -> tuple[ProxyInfo, int] | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("v1 header longer than 107 octets")
        return None
    line = data[:end]
    if not line.isascii() or any(octet < 0x20 or octet == 0x7F for octet in line):
        # One line of text: an LF, a CR or another control octet before the CRLF is the end of
        # something else (the client's first command would have gone with an UNKNOWN line).
        raise ProxyHeaderError("v1 header with a control octet")
    parts = line.split(b" ")
    if parts[1:2] == [b"UNKNOWN"]:
        return ProxyInfo(None, None, 1), end + 2
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("malformed v1 header")
    if b"%" in parts[2] or b"%" in parts[3]:
        # `ipaddress` takes an IPv6 zone (`fe80::1%<any octets but %>`: control octets, quotes);
        # v1 writes addresses as inet_ntop does, without one.
        raise ProxyHeaderError("malformed v1 addresses")
    try:
        version = 4 if parts[1] == b"TCP4" else 6
        src = ipaddress.ip_address(parts[2].decode("ascii"))
        dst = ipaddress.ip_address(parts[3].decode("ascii"))
        if src.version != version or dst.version != version:
            raise ValueError("family mismatch")
        sport, dport = _port(parts[4]), _port(parts[5])
    except (ValueError, UnicodeDecodeError):
        raise ProxyHeaderError("malformed v1 addresses") from None
    return ProxyInfo((str(src), sport), (str(dst), dport), 1), end + 2


def _port(text: bytes) -> int:
    if not text.isdigit() or (len(text) > 1 and text.startswith(b"0")) or int(text) > 65535:
        raise ValueError("bad port")
    return int(text)


def _parse_v2(data: bytes) -> tuple[ProxyInfo, int] | None:
    ver_cmd, family, length = data[12], data[13], struct.unpack("!H", data[14:16])[0]
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError("unsupported v2 version")
    if length > V2_MAX_BODY:
        raise ProxyHeaderError("v2 header too long")
    total = 16 + length
    if len(data) < total:
        return None
    command = ver_cmd & 0x0F
    if command == 0x0:  # LOCAL: a health check from the balancer itself
        return ProxyInfo(None, None, 2), total
    if command != 0x1:
        raise ProxyHeaderError("unknown v2 command")
    if family == 0x00:  # AF_UNSPEC: the block is address information, to be ignored
        return ProxyInfo(None, None, 2), total
    body = data[16:total]
    # The family octets the specification lists; any other "must be rejected as invalid". UDP
    # (0x12, 0x22) is not this connection's transport, AF_UNIX (0x31, 0x32) no address of ours.
    if family == 0x11 and length >= 12:  # TCP over IPv4
        src = str(ipaddress.IPv4Address(body[0:4]))
        dst = str(ipaddress.IPv4Address(body[4:8]))
        sport, dport = struct.unpack("!HH", body[8:12])
        _check_tlvs(data, 16 + 12, total)
    elif family == 0x21 and length >= 36:  # TCP over IPv6
        src = str(ipaddress.IPv6Address(body[0:16]))
        dst = str(ipaddress.IPv6Address(body[16:32]))
        sport, dport = struct.unpack("!HH", body[32:36])
        _check_tlvs(data, 16 + 36, total)
    else:
        raise ProxyHeaderError("unsupported v2 address family")
    return ProxyInfo((src, sport), (dst, dport), 2), total


PP2_TYPE_CRC32C = 0x03
PP2_TYPE_SSL = 0x20


def _check_tlvs(data: bytes, start: int, end: int) -> None:
    """The TLVs of a v2 header, `data[start:end]`: each whole within the header and the last
    ending where the header ends (HAProxy's own reader refuses anything else); an SSL TLV's
    sub-TLVs likewise within it; a CRC32C four octets that match the header. The rest of what
    they say is not read."""
    pos = start
    while pos < end:
        if pos + 3 > end:
            raise ProxyHeaderError("v2 TLV cut short")
        kind, size = data[pos], int.from_bytes(data[pos + 1 : pos + 3], "big")
        value = pos + 3
        if value + size > end:
            raise ProxyHeaderError("v2 TLV longer than the header")
        if kind == PP2_TYPE_CRC32C:
            if size != 4:
                raise ProxyHeaderError("v2 CRC32C not four octets")
            blank = data[:value] + bytes(4) + data[value + 4 : end]
            if crc32c(blank) != int.from_bytes(data[value : value + 4], "big"):
                raise ProxyHeaderError("v2 CRC32C does not match")
        elif kind == PP2_TYPE_SSL:
            if size < 5:
                raise ProxyHeaderError("v2 SSL TLV too short")
            _check_tlvs_within(data, value + 5, value + size)
        pos = value + size


def _check_tlvs_within(data: bytes, start: int, end: int) -> None:
    """Sub-TLVs (of an SSL TLV): each whole within `data[start:end]`."""
    pos = start
    while pos < end:
        if pos + 3 > end:
            raise ProxyHeaderError("v2 TLV cut short")
        pos += 3 + int.from_bytes(data[pos + 1 : pos + 3], "big")
        if pos > end:
            raise ProxyHeaderError("v2 TLV longer than the header")


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for octet in range(256):
        n = octet
        for _ in range(8):
            n = (n >> 1) ^ 0x82F63B78 if n & 1 else n >> 1
        table.append(n)
    return tuple(table)


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as the v2 header's PP2_TYPE_CRC32C carries it."""
    crc = 0xFFFFFFFF
    table = _CRC32C
    for octet in data:
        crc = table[(crc ^ octet) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def build_v2(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A v2 PROXY header (command PROXY, TCP) for a connection we make upstream."""
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        # Mixed families (v4 client, v6 upstream leg): say it in v6, v4-mapped.
        src = ipaddress.IPv6Address(f"::ffff:{src}") if src.version == 4 else src
        dst = ipaddress.IPv6Address(f"::ffff:{dst}") if dst.version == 4 else dst
    family = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body
