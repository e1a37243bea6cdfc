from __future__ import annotations

import contextlib
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imapveil.protocol.proxy_header import (
    V2_SIGNATURE,
    ProxyHeaderError,
    ProxyInfo,
    build_v2,
    looks_like_header,
    parse,
)

V1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 143\r\n"
V1_6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 143\r\n"


def feed_bytewise(data: bytes) -> tuple[ProxyInfo, int]:
    """Whatever the split, parse says "more" until the header is whole, then the same answer."""
    for end in range(len(data)):
        result = parse(data[:end])
        if result is not None:
            return result
    result = parse(data)
    assert result is not None
    return result


@pytest.mark.parametrize(
    ("header", "source", "destination"),
    [
        (V1, ("192.0.2.7", 51234), ("198.51.100.1", 143)),
        (V1_6, ("2001:db8::7", 51234), ("2001:db8::1", 143)),
        (
            build_v2(("192.0.2.7", 51234), ("198.51.100.1", 143)),
            ("192.0.2.7", 51234),
            ("198.51.100.1", 143),
        ),
        (
            build_v2(("2001:db8::7", 1), ("2001:db8::1", 993)),
            ("2001:db8::7", 1),
            ("2001:db8::1", 993),
        ),
    ],
)
def test_headers_whole_and_byte_by_byte(
    header: bytes, source: tuple[str, int], destination: tuple[str, int]
) -> None:
    data = header + b"a1 CAPABILITY\r\n"
    info, length = feed_bytewise(data)
    assert (info.source, info.destination) == (source, destination)
    assert data[length:] == b"a1 CAPABILITY\r\n"
    assert parse(data) == (info, length)


def test_local_and_unknown_use_the_socket_address() -> None:
    local = V2_SIGNATURE + bytes([0x20, 0x00, 0, 0])
    assert parse(local) == (ProxyInfo(None, None, 2), 16)
    assert parse(b"PROXY UNKNOWN\r\n") == (ProxyInfo(None, None, 1), 15)


@pytest.mark.parametrize(
    "bad",
    [
        b"a1 LOGIN x y\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 51234\r\n",
        b"PROXY TCP4 2001:db8::1 198.51.100.1 1 2\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 051234 143\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 70000 143\r\n",
        b"PROXY UDP4 192.0.2.7 198.51.100.1 1 2\r\n",
        b"PROXY " + b"x" * 120,
        V2_SIGNATURE + bytes([0x30, 0x11, 0, 12]) + bytes(12),  # version 3
        V2_SIGNATURE + bytes([0x22, 0x11, 0, 12]) + bytes(12),  # command 2
        V2_SIGNATURE + bytes([0x21, 0x11, 0xFF, 0xFF]),  # too long
        V2_SIGNATURE + bytes([0x21, 0x31, 0, 0]),  # AF_UNIX
    ],
)
def test_malformed_headers(bad: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(bad)


def test_only_headers_look_like_headers() -> None:
    assert looks_like_header(V1) and looks_like_header(build_v2(("192.0.2.1", 1), ("192.0.2.2", 2)))
    assert not looks_like_header(b"a1 CAPABILITY\r\n")


@given(
    st.ip_addresses(),
    st.integers(0, 65535),
    st.ip_addresses(),
    st.integers(0, 65535),
)
def test_build_v2_round_trips(
    src: ipaddress.IPv4Address | ipaddress.IPv6Address,
    sport: int,
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address,
    dport: int,
) -> None:
    header = build_v2((str(src), sport), (str(dst), dport))
    result = parse(header)
    assert result is not None
    info, length = result
    assert length == len(header)
    assert info.source is not None and info.destination is not None
    if src.version == dst.version:
        assert info.source == (str(src), sport) and info.destination == (str(dst), dport)
    else:
        assert info.source[1] == sport and info.destination[1] == dport


@given(st.binary(max_size=64))
def test_arbitrary_bytes_raise_only_our_error(data: bytes) -> None:
    with contextlib.suppress(ProxyHeaderError):
        parse(data)
