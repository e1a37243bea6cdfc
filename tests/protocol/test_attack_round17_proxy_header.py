"""Round 17's attacks on the PROXY header parser, as a balancer (or something posing as one from
its network) could send them: v2 family octets the specification says must be rejected, TLVs
whose lengths lie, a CRC32C that does not match. Each is fed whole, octet by octet and in random
chunks (the `split` fixture), accumulated as `relay.server._read_proxy_header` accumulates them:
the parser says "more" on every proper prefix, and then the same answer."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imapveil.protocol.proxy_header import (
    V2_SIGNATURE,
    ProxyHeaderError,
    ProxyInfo,
    crc32c,
    parse,
)
from tests.helpers.feeding import Splitter, splitting_at

INET = bytes([203, 0, 113, 9, 198, 51, 100, 1]) + struct.pack("!HH", 40000, 143)
INET6 = (
    bytes.fromhex("20010db8000000000000000000000007")
    + bytes.fromhex("20010db8000000000000000000000001")
    + struct.pack("!HH", 40000, 993)
)
AFTER = b"a1 LOGIN alice wonderland\r\n"


def v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def with_crc(command: int, family: int, body: bytes) -> bytes:
    """A header whose last TLV is a CRC32C of the whole header (HAProxy's `crc32c` option)."""
    blank = v2(command, family, body + tlv(0x03, bytes(4)))
    return blank[:-4] + struct.pack("!I", crc32c(blank))


def accumulated(split: Splitter, data: bytes) -> tuple[ProxyInfo, int]:
    """What the relay's reader gets: `parse` of all that arrived so far, after each piece."""
    so_far = b""
    for piece in split(data):
        so_far += piece
        result = parse(so_far)
        if result is not None:
            assert result == parse(data)
            return result
    raise AssertionError("parse never completed")


def refused(split: Splitter, data: bytes) -> None:
    """However `data` arrives, the parser ends by refusing it (never by accepting it)."""
    so_far = b""
    with pytest.raises(ProxyHeaderError):
        for piece in split(data):
            so_far += piece
            assert parse(so_far) is None
    with pytest.raises(ProxyHeaderError):
        parse(data)


SSL_TLV = tlv(0x20, b"\x07" + bytes(4) + tlv(0x21, b"TLSv1.3") + tlv(0x23, b"TLS_AES_128_GCM"))
TLVS = tlv(0x01, b"imap") + tlv(0x02, b"mail.example.org") + SSL_TLV + tlv(0x05, bytes(32))
TLVS += tlv(0x04, b"")  # NOOP
WELL_FORMED = {
    "alpn-authority-ssl-unique-id-noop": (v2(1, 0x11, INET + TLVS), ("203.0.113.9", 40000)),
    "crc32c-inet": (with_crc(1, 0x11, INET + tlv(0x05, b"abc")), ("203.0.113.9", 40000)),
    "crc32c-inet6": (with_crc(1, 0x21, INET6), ("2001:db8::7", 40000)),
    # AF_UNSPEC and LOCAL: the block is address information to ignore, not read.
    "unspec-with-tlvs": (v2(1, 0x00, b"\x05\x00\x09ab"), None),
    "local-with-garbage": (v2(0, 0xFF, b"\x01\xff\xff"), None),  # LOCAL: the block is discarded
}


@pytest.mark.parametrize("name", list(WELL_FORMED))
def test_well_formed_v2_headers_with_tlvs_are_taken(split: Splitter, name: str) -> None:
    header, source = WELL_FORMED[name]
    info, length = accumulated(split, header + AFTER)
    assert info.source == source and length == len(header)


BAD_V2 = {
    # The family octets the specification lists are 0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32;
    # "other values are unspecified and must not be emitted ... and must be rejected as invalid
    # by receivers". Found: 0x10 and 0x20 were read as TCP, with the addresses believed.
    "inet-unspec-transport": v2(1, 0x10, INET),
    "inet6-unspec-transport": v2(1, 0x20, INET6),
    "unspec-stream": v2(1, 0x01, b""),
    "unspec-dgram": v2(1, 0x02, b""),
    "family-0xff": v2(1, 0xFF, INET),
    # UDP addresses are not this TCP connection's: believed before.
    "udp4": v2(1, 0x12, INET),
    "udp6": v2(1, 0x22, INET6),
    # TLVs whose lengths lie: one past the header's end, a cut TLV header. Accepted before.
    "tlv-past-the-end": v2(1, 0x11, INET + b"\x01\xff\xff" + b"x"),
    "tlv-one-past": v2(1, 0x11, INET + tlv(0x01, b"imap")[:-1]),
    "tlv-header-cut": v2(1, 0x11, INET + b"\x05\x00"),
    "ssl-sub-tlv-past-its-tlv": v2(1, 0x11, INET + tlv(0x20, b"\x07\0\0\0\0\x21\x00\x09v1")),
    "ssl-tlv-too-short": v2(1, 0x11, INET + tlv(0x20, b"\x07\x00")),
    # A CRC32C that does not match, or is not four octets (HAProxy refuses both).
    "crc32c-wrong": v2(1, 0x11, INET + tlv(0x03, b"\x12\x34\x56\x78")),
    "crc32c-short": v2(1, 0x11, INET + tlv(0x03, b"\x12\x34\x56")),
    "crc32c-of-another-header": with_crc(1, 0x11, INET)[:-4]
    + struct.pack("!I", crc32c(with_crc(1, 0x21, INET6))),
}


@pytest.mark.parametrize("name", list(BAD_V2))
def test_malformed_v2_headers_are_refused_however_they_arrive(split: Splitter, name: str) -> None:
    refused(split, BAD_V2[name] + AFTER)


def test_a_flipped_octet_under_a_crc32c_is_refused() -> None:
    header = with_crc(1, 0x11, INET + tlv(0x05, b"unique"))
    assert parse(header) is not None
    kind = len(header) - 7  # the CRC32C TLV's type: flipped, it is no CRC32C any more
    for at in [*range(16, kind), *range(kind + 1, len(header))]:
        corrupt = bytearray(header)
        corrupt[at] ^= 0x01
        with pytest.raises(ProxyHeaderError):
            parse(bytes(corrupt))


def test_crc32c_known_answer() -> None:
    # RFC 3720's check value for CRC32C (iSCSI): "123456789" → 0xE3069283.
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA


@given(
    st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=6),
    st.lists(st.integers(0, 400), max_size=8),
)
def test_any_tiling_of_tlvs_is_taken_and_any_cut_one_refused(
    tlvs: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    tlvs = [(k, v) for k, v in tlvs if k not in (0x03, 0x20)]  # checked kinds: above
    body = INET + b"".join(tlv(k, v) for k, v in tlvs)
    info, length = accumulated(splitting_at(cuts), v2(1, 0x11, body) + AFTER)
    assert info.source == ("203.0.113.9", 40000) and length == 16 + len(body)
    if tlvs:  # the last TLV one octet short of what it says: the header ends inside it
        refused(splitting_at(cuts), v2(1, 0x11, body[:-1]) + AFTER)


BAD_V1 = {
    # A v1 line is one line: an LF (or a CR) before its CRLF is the end of something else.
    # Found: `UNKNOWN` took everything up to the next CRLF, the client's first command with it.
    "unknown-lf-then-a-command": b"PROXY UNKNOWN x\na1 LOGIN alice wonderland\r\n",
    "unknown-cr-inside": b"PROXY UNKNOWN \r x\r\n",
    "unknown-nul-inside": b"PROXY UNKNOWN \x00\r\n",
}


@pytest.mark.parametrize("name", list(BAD_V1))
def test_a_v1_line_is_one_line_of_text(split: Splitter, name: str) -> None:
    refused(split, BAD_V1[name] + AFTER)


def test_v1_unknown_may_say_anything_printable(split: Splitter) -> None:
    header = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"
    info, length = accumulated(split, header + AFTER)
    assert info.source is None and length == len(header)


@given(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=300), st.booleans())
def test_any_v2_header_is_taken_or_refused_with_our_error(
    ver_cmd: int, family: int, body: bytes, crc: bool
) -> None:
    """Whatever the version, command, family and body (with a matching CRC32C or not): the
    header is taken, with an address of its family, or refused with ProxyHeaderError."""
    header = V2_SIGNATURE + bytes([ver_cmd, family]) + struct.pack("!H", len(body)) + body
    if crc:
        blank = header + tlv(0x03, bytes(4))
        blank = blank[:14] + struct.pack("!H", len(body) + 7) + blank[16:]
        header = blank[:-4] + struct.pack("!I", crc32c(blank))
    try:
        result = parse(header + AFTER)
    except ProxyHeaderError:
        return
    assert result is not None
    info, length = result
    assert length == len(header)
    if info.source is not None:
        assert (ver_cmd, family) in ((0x21, 0x11), (0x21, 0x21))
