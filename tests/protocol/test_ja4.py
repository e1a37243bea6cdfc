"""JA4 from the first octets a TLS client sent (protocol/ja4.py).

The expected values come from outside this code: FoxIO's specification (technical_details/JA4.md:
its worked example, its raw form, its no-signature-algorithm hash and its ALPN rules) and
fingerprints published for real stacks (ja4db's Python entry; curl's cipher and extension hashes).
The ClientHellos in tests/data/ja4/ were captured from Python's ssl, curl and gnutls-cli on this
project's Debian (OpenSSL 3.0, GnuTLS 3.7) against a listening socket; see `_vector`.
Every ClientHello is also fed cut into records every way: one record, one octet per record,
random record sizes, and with what follows it; every proper prefix gives None.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imapveil.protocol import ja4

DATA = Path(__file__).parent.parent / "data" / "ja4"
SHAPE = re.compile(r"t(1[0-3]|s[23]|d[123]|00)[di]\d{4}[0-9A-Za-z]{2}_[0-9a-f]{12}_[0-9a-f]{12}")

# FoxIO's worked example (JA4.md, "Cipher hash", "Extension hash", "Example", "Raw Output").
SPEC_CIPHERS = [0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8]
SPEC_CIPHERS += [0xC013, 0xC014, 0x009C, 0x009D, 0x002F, 0x0035]
SPEC_EXTENSIONS = [0x001B, 0x0000, 0x0033, 0x0010, 0x4469, 0x0017, 0x002D, 0x000D]
SPEC_EXTENSIONS += [0x0005, 0x0023, 0x0012, 0x002B, 0xFF01, 0x000B, 0x000A, 0x0015]
SPEC_SIGALGS = [0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601]
SPEC_JA4 = "t13d1516h2_8daaf6152771_e5627efa2ab1"
SPEC_JA4_R = (
    "t13d1516h2_002f,0035,009c,009d,1301,1302,1303,c013,c014,c02b,c02c,c02f,c030,cca8,cca9_"
    "0005,000a,000b,000d,0012,0015,0017,001b,0023,002b,002d,0033,4469,ff01_"
    "0403,0804,0401,0503,0805,0501,0806,0601"
)
GREASE = [0x0A0A + 0x1010 * i for i in range(16)]


# -- building ClientHellos ----------------------------------------------------------------------


def u8(data: bytes) -> bytes:
    return len(data).to_bytes(1, "big") + data


def u16(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def words(values: Sequence[int]) -> bytes:
    return b"".join(v.to_bytes(2, "big") for v in values)


def sni(host: bytes = b"mail.example.org") -> bytes:
    return u16(b"\x00" + u16(host))


def alpn(*protocols: bytes) -> bytes:
    return u16(b"".join(u8(p) for p in protocols))


def extension_data(kind: int, *, sigalgs: Sequence[int], versions: Sequence[int]) -> bytes:
    if kind == 0x0000:
        return sni()
    if kind == 0x0010:
        return alpn(b"h2", b"http/1.1")
    if kind == 0x000D:
        return u16(words(sigalgs))
    if kind == 0x002B:
        return u8(words(versions))
    return b""


def hello(
    ciphers: list[int],
    extensions: list[tuple[int, bytes]] | None,
    *,
    version: int = 0x0303,
    session: bytes = bytes(32),
    compression: bytes = b"\x00",
    trailer: bytes = b"",
) -> bytes:
    """A ClientHello handshake message (type, 24-bit length, body)."""
    body = version.to_bytes(2, "big") + bytes(range(32)) + u8(session)
    body += u16(words(ciphers)) + u8(compression)
    if extensions is not None:
        body += u16(b"".join(k.to_bytes(2, "big") + u16(d) for k, d in extensions))
    body += trailer
    return b"\x01" + len(body).to_bytes(3, "big") + body


def spec_hello(
    *,
    ciphers: list[int] = SPEC_CIPHERS,
    kinds: list[int] = SPEC_EXTENSIONS,
    sigalgs: list[int] = SPEC_SIGALGS,
    versions: Sequence[int] = (0x0304, 0x0303),
) -> bytes:
    exts = [(k, extension_data(k, sigalgs=sigalgs, versions=versions)) for k in kinds]
    return hello(ciphers, exts)


def records(message: bytes, sizes: list[int] | None = None, version: bytes = b"\x03\x01") -> bytes:
    """`message` in handshake records of the given fragment sizes (the last takes the rest)."""
    out = bytearray()
    pos = 0
    for size in sizes or []:
        if pos >= len(message):
            break
        piece = message[pos : pos + size]
        out += b"\x16" + version + u16(piece)
        pos += len(piece)
    while pos < len(message):
        piece = message[pos : pos + 16384]
        out += b"\x16" + version + u16(piece)
        pos += len(piece)
    return bytes(out)


def unrecord(data: bytes) -> bytes:
    """The handshake octets of a captured flight (the inverse of `records`)."""
    out = bytearray()
    pos = 0
    while pos + 5 <= len(data):
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        out += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
    return bytes(out)


def _vector(name: str) -> bytes:
    """A captured first flight: `hex` of what the client sent before the server answered."""
    return bytes.fromhex((DATA / f"{name}-clienthello.hex").read_text().strip())


# -- FoxIO's specification ------------------------------------------------------------------------


def test_the_specifications_example() -> None:
    data = records(spec_hello())
    assert ja4.fingerprint(data) == SPEC_JA4
    assert ja4.fingerprint_raw(data) == SPEC_JA4_R


def test_without_signature_algorithms_the_list_ends_without_underscore() -> None:
    # JA4.md: "0005,000a,...,4469,ff01 = 6d807ffa2a79" (the extension is there, its list empty)
    data = records(spec_hello(sigalgs=[]))
    assert ja4.fingerprint(data) == "t13d1516h2_8daaf6152771_6d807ffa2a79"


def test_grease_is_ignored_everywhere() -> None:
    data = records(
        spec_hello(
            ciphers=[GREASE[3], *SPEC_CIPHERS, GREASE[9]],
            kinds=[GREASE[0], *SPEC_EXTENSIONS[:5], GREASE[15], *SPEC_EXTENSIONS[5:]],
            sigalgs=[GREASE[4], *SPEC_SIGALGS],
            versions=[GREASE[7], 0x0304, 0x0303],
        )
    )
    assert ja4.fingerprint(data) == SPEC_JA4
    assert ja4.fingerprint_raw(data) == SPEC_JA4_R


def test_only_grease_signature_algorithms_count_as_none() -> None:
    data = records(spec_hello(sigalgs=[GREASE[1], GREASE[2]]))
    assert ja4.fingerprint(data) == "t13d1516h2_8daaf6152771_6d807ffa2a79"


def test_no_ciphers_but_grease_and_no_extensions_give_zeros() -> None:
    data = records(hello([GREASE[5]], None))
    assert ja4.fingerprint(data) == "t12i000000_000000000000_000000000000"
    assert ja4.fingerprint_raw(data) == "t12i000000__"


def test_only_sni_and_alpn_leave_an_empty_extension_hash() -> None:
    data = records(hello([0x1301], [(0x0000, sni()), (0x0010, alpn(b"imap"))]))
    # two extensions counted; c is zeros because both are left out of its list
    cipher_hash = hashlib.sha256(b"1301").hexdigest()[:12]
    assert ja4.fingerprint(data) == f"t12d0102ip_{cipher_hash}_000000000000"


def test_the_cipher_hash_is_sha256_of_the_sorted_list() -> None:
    data = records(hello([0x0035, 0x002F], None))
    expected = hashlib.sha256(b"002f,0035").hexdigest()[:12]
    assert ja4.fingerprint(data) == f"t12i020000_{expected}_000000000000"


@pytest.mark.parametrize(
    ("first", "chars"),
    [
        (b"h2", "h2"),
        (b"http/1.1", "h1"),
        (b"imap", "ip"),
        (b"x", "xx"),  # one character is first and last
        (b"\xab", "ab"),  # JA4.md's non-alphanumeric examples: the hex form's first and last
        (b"\xab\xcd", "ad"),
        (b"\x30\xab", "3b"),
        (b"\x30\x31\xab\xcd", "3d"),
        (b"\x30\xab\xcd\x31", "01"),
    ],
)
def test_alpn_first_and_last_characters(first: bytes, chars: str) -> None:
    data = records(hello([0x1301], [(0x0010, alpn(first, b"h2"))]))
    result = ja4.fingerprint(data)
    assert result is not None
    assert result[8:10] == chars


def test_an_empty_alpn_list_is_00() -> None:
    data = records(hello([0x1301], [(0x0010, alpn())]))
    result = ja4.fingerprint(data)
    assert result is not None and result[:10] == "t12i010100"


@pytest.mark.parametrize(
    ("legacy", "versions", "code"),
    [
        (0x0303, None, "12"),
        (0x0301, None, "10"),
        (0x0300, None, "s3"),
        (0x0303, [0x0304, 0x0303], "13"),
        (0x0303, [0x0303, 0x0304], "13"),  # the highest, not the first
        (0x0303, [0x0A0A, 0x0304], "13"),
        (0x0304, [0x0302], "11"),  # supported_versions wins over the ClientHello's own
        (0x0303, [0x7F1C], "00"),  # unknown
    ],
)
def test_the_version(legacy: int, versions: list[int] | None, code: str) -> None:
    exts = None if versions is None else [(0x002B, u8(words(versions)))]
    data = records(hello([0x1301], exts, version=legacy), version=b"\x03\x03")
    result = ja4.fingerprint(data)
    assert result is not None and result[1:3] == code


def test_counts_stop_at_99() -> None:
    ciphers = list(range(0x0100, 0x0100 + 150))
    exts = [(0x1000 + i, b"") for i in range(120)]
    result = ja4.fingerprint(records(hello(ciphers, exts)))
    assert result is not None and result[4:8] == "9999"


# -- real stacks -----------------------------------------------------------------------------------


def test_pythons_ssl_as_published() -> None:
    # ja4db lists t13i181000_85036bcba153_d41ae481755e as Python (OpenSSL 3, no SNI, no ALPN)
    assert ja4.fingerprint(_vector("python")) == "t13i181000_85036bcba153_d41ae481755e"


def test_curl_as_published() -> None:
    # curl with OpenSSL is published as t13d3112.._e8f1e7e78f70_b26ce05bbdd6 (cipher and
    # extension hashes; the counts depend on the options it was run with)
    result = ja4.fingerprint(_vector("curl"))
    assert result is not None
    assert result[:4] == "t13d" and result[4:6] == "31"
    assert result[10:] == "_e8f1e7e78f70_b26ce05bbdd6"


def test_three_stacks_three_fingerprints() -> None:
    results = {ja4.fingerprint(_vector(n)) for n in ("python", "curl", "gnutls")}
    assert None not in results and len(results) == 3


# -- records cut every way -----------------------------------------------------------------------

MESSAGES = {
    "spec": spec_hello(),
    "python": unrecord(_vector("python")),
    "curl": unrecord(_vector("curl")),
    "gnutls": unrecord(_vector("gnutls")),
}


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_one_octet_per_record(name: str) -> None:
    message = MESSAGES[name]
    whole = ja4.fingerprint(records(message))
    assert whole is not None
    assert ja4.fingerprint(records(message, [1] * len(message))) == whole
    assert ja4.fingerprint_raw(records(message, [1] * len(message))) == ja4.fingerprint_raw(
        records(message)
    )


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_every_proper_prefix_is_none_and_what_follows_is_ignored(name: str) -> None:
    data = records(MESSAGES[name], [3, 1, 200])
    whole = ja4.fingerprint(data)
    assert whole is not None
    for cut in range(len(data)):
        assert ja4.fingerprint(data[:cut]) is None
    change_cipher_spec = b"\x14\x03\x03\x00\x01\x01"
    assert ja4.fingerprint(data + change_cipher_spec + b"\x17\x03\x03\x00\x05hello") == whole
    assert ja4.fingerprint(data + b"\xff" * 100) == whole


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(sorted(MESSAGES)), sizes=st.lists(st.integers(1, 600), max_size=40))
def test_random_record_fragmentation(name: str, sizes: list[int]) -> None:
    message = MESSAGES[name]
    assert ja4.fingerprint(records(message, sizes)) == ja4.fingerprint(records(message))


@settings(max_examples=100, deadline=None)
@given(
    grease=st.lists(st.sampled_from(GREASE), min_size=1, max_size=4, unique=True),
    where=st.integers(0, 20),
)
def test_grease_anywhere_changes_nothing(grease: list[int], where: int) -> None:
    kinds = list(SPEC_EXTENSIONS)
    for g in grease:
        kinds.insert(where % (len(kinds) + 1), g)
    ciphers = list(SPEC_CIPHERS)
    ciphers.insert(where % len(ciphers), grease[0])
    data = records(spec_hello(ciphers=ciphers, kinds=kinds, sigalgs=[*grease, *SPEC_SIGALGS]))
    assert ja4.fingerprint(data) == SPEC_JA4


# -- what is not a ClientHello -------------------------------------------------------------------


def _replace(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new) :]


def _with_extension_data(kind: int, data: bytes) -> bytes:
    return records(hello([0x1301], [(kind, data)]))


HOSTILE = {
    "empty": b"",
    "imap": b"a001 CAPABILITY\r\n",
    "sslv2 hello": bytes.fromhex("80 2e 01 0003 01 0015 0000 0010") + bytes(37),
    "alert record": b"\x15\x03\x01\x00\x02\x02\x28",
    "application data": b"\x17\x03\x03" + u16(spec_hello()),
    "record version 2": records(spec_hello(), version=b"\x02\x00"),
    "empty record": b"\x16\x03\x01\x00\x00" + records(spec_hello()),
    "record over 2^14": b"\x16\x03\x01\x40\x01" + bytes(16385),
    "record length lies": b"\x16\x03\x01\x10\x00" + spec_hello()[:100],
    "server hello": records(b"\x02" + spec_hello()[1:]),
    "handshake length 2^24-1": records(b"\x01\xff\xff\xff" + spec_hello()[4:]),
    "handshake length too long": records(_replace(spec_hello(), 1, b"\x00\x10\x00")),
    "handshake length short": records(_replace(spec_hello(), 1, b"\x00\x00\x30")),
    "session id over 32": records(hello([0x1301], None, session=bytes(33))),
    "odd cipher list": records(_replace(hello([0x1301], None), 4 + 2 + 32 + 1 + 32, b"\x00\x03")),
    "no cipher": records(hello([], None)),
    "no compression": records(hello([0x1301], None, compression=b"")),
    "cipher length 0xffff": records(
        _replace(hello([0x1301], None), 4 + 2 + 32 + 1 + 32, b"\xff\xff")
    ),
    "extensions overflow": records(hello([0x1301], [(0x0017, b"")])[:-2] + b"\xff\xff"),
    "extension length lies": _with_extension_data(0x0017, b"")[:-2] + b"\x00\x09",
    "duplicate extension": records(hello([0x1301], [(0x0017, b""), (0x0017, b"")])),
    "alpn length lies": _with_extension_data(0x0010, b"\x00\x05\x02h2"),
    "alpn name overflow": _with_extension_data(0x0010, b"\x00\x03\x09h2"),
    "alpn nested overflow": _with_extension_data(0x0010, b"\xff\xff\x02h2"),
    "sigalgs odd": _with_extension_data(0x000D, b"\x00\x03\x04\x03\x08"),
    "sigalgs length lies": _with_extension_data(0x000D, b"\x00\x08\x04\x03"),
    "versions odd": _with_extension_data(0x002B, b"\x03\x03\x04\x03"),
    "versions only grease": _with_extension_data(0x002B, b"\x02\x0a\x0a"),
    "versions trailing": _with_extension_data(0x002B, b"\x02\x03\x04\x00"),
    "trailing octets in the message": records(hello([0x1301], [(0x0017, b"")], trailer=b"\x00")),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_not_a_well_formed_client_hello_is_none(name: str) -> None:
    assert ja4.parse(HOSTILE[name]) is None
    assert ja4.fingerprint(HOSTILE[name]) is None
    assert ja4.fingerprint_raw(HOSTILE[name]) is None


def test_the_hostile_cases_differ_from_valid_ones_only_where_they_say() -> None:
    # the helpers build valid hellos when nothing lies, so each case above fails for its own reason
    assert ja4.fingerprint(_with_extension_data(0x0010, alpn(b"h2"))) is not None
    assert ja4.fingerprint(_with_extension_data(0x000D, u16(words([0x0403])))) is not None
    assert ja4.fingerprint(_with_extension_data(0x002B, u8(words([0x0304])))) is not None
    assert ja4.fingerprint(records(hello([0x1301], [(0x0017, b"")]))) is not None
    assert ja4.fingerprint(records(hello([0x1301], None, session=bytes(32)))) is not None
    assert ja4.fingerprint(records(hello([0x1301], [(0x0017, b"")], trailer=b""))) is not None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_garbage_never_raises(data: bytes) -> None:
    result = ja4.fingerprint(data)
    assert result is None or SHAPE.fullmatch(result)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(sorted(MESSAGES)),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.integers(0, 10_000),
)
def test_damaged_hellos_never_raise(name: str, edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(records(MESSAGES[name], [5, 300]))
    for at, value in edits:
        data[at % len(data)] = value
    for piece in (bytes(data), bytes(data[: cut % (len(data) + 1)])):
        result = ja4.fingerprint(piece)
        assert result is None or SHAPE.fullmatch(result)
        raw = ja4.fingerprint_raw(piece)
        assert (raw is None) == (result is None)


def test_grease_values() -> None:
    assert [v for v in range(0x10000) if ja4.is_grease(v)] == GREASE
