from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imapveil.protocol.id_params import IdFields, IdSyntaxError, parse, serialize
from tests.helpers.corpus import Row, rows

CORPUS = rows()


@pytest.mark.parametrize("row", CORPUS, ids=[r.label for r in CORPUS])
def test_every_corpus_row_parses_and_round_trips(row: Row) -> None:
    fields = parse(row.args)
    again = parse(serialize(fields, literal_plus=False) + b"\r\n")
    assert again == fields
    if b"NIL" in row.args[:4]:
        assert fields is None
    else:
        assert fields is not None and fields[0][0]


def test_forms_the_rfc_allows() -> None:
    assert parse(b'("name" "x" "version" NIL)\r\n') == ((b"name", b"x"), (b"version", None))
    assert parse(b"nil\r\n") is None
    assert parse(b'(  "name"   "a\\"b\\\\c"  )\r\n') == ((b"name", b'a"b\\c'),)
    assert parse(b'("name" {3}\r\nabc "os" {2+}\r\nhi "x" ~{1}\r\n\xff)\r\n') == (
        (b"name", b"abc"),
        (b"os", b"hi"),
        (b"x", b"\xff"),
    )
    assert parse(b"()\r\n") == ()
    assert parse(b'("NAME" "Mail")') == ((b"NAME", b"Mail"),)


@pytest.mark.parametrize(
    "bad",
    [
        b"\r\n",
        b"(\r\n",
        b'("name")\r\n',
        b'("name" "x" "os")\r\n',
        b'("name" "unterminated)\r\n',
        b'("name" "bad \\x escape")\r\n',
        b'("name" {10}\r\nshort)\r\n',
        b'("name" {99999999999999999999999}\r\nx)\r\n',
        b'("name" "x") trailing\r\n',
        b'("name""x")\r\n',
        b"NILS\r\n",
        b'(name "x")\r\n',
    ],
)
def test_malformed_lists_raise_only_our_error(bad: bytes) -> None:
    with pytest.raises(IdSyntaxError):
        parse(bad)


values = st.binary(max_size=40) | st.text(max_size=20).map(str.encode)
id_lists = st.none() | st.lists(
    st.tuples(st.binary(min_size=0, max_size=30), st.none() | values), max_size=8
).map(tuple)


@settings(max_examples=300)
@given(id_lists, st.booleans())
def test_parse_inverts_serialize(fields: IdFields, literal_plus: bool) -> None:
    assert parse(serialize(fields, literal_plus=literal_plus) + b"\r\n") == fields


@settings(max_examples=500)
@given(
    st.lists(
        st.sampled_from(
            [b"(", b")", b'"', b"\\", b" ", b"NIL", b"{3}\r\n", b"{2+}\r\n", b"~{1}\r\n"]
        )
        | st.binary(max_size=6),
        max_size=20,
    ).map(b"".join)
)
def test_no_input_raises_anything_else(data: bytes) -> None:
    with contextlib.suppress(IdSyntaxError):
        parse(data)
