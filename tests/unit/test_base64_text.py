"""`csml.schemas.base64_text`: `encode` writes standard base64 as `base64.b64encode`
does; `decode` reads exactly canonical standard base64, as
`binascii.a2b_base64(strict_mode=True)` decodes it (less non-canonical spellings). Both
ways are checked: `pybase64`'s (the dependency, what `encode`/`decode` are) and the
fallbacks used without it (binascii, pydantic-core)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csml.schemas import base64_text
from csml.schemas.base64_text import decode, encode

ALPHABET = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_\\" \n\té'

DECODERS: list[Callable[[str], bytes]] = [
    base64_text._decode_fast,
    base64_text._decode_pydantic,
]
ENCODERS: list[Callable[[bytes], str]] = [
    base64_text._encode_fast,
    base64_text._encode_binascii,
]


def test_the_fast_way_is_the_one_used() -> None:
    """pybase64 is a dependency: installed, it is what `encode`/`decode` are."""
    assert encode is base64_text._encode_fast
    assert decode is base64_text._decode_fast


@pytest.mark.parametrize("write", ENCODERS)
@given(data=st.binary(max_size=300))
def test_encodes_as_b64encode(write: Callable[[bytes], str], data: bytes) -> None:
    text = write(data)
    assert type(text) is str
    assert text == base64.b64encode(data).decode()


@pytest.mark.parametrize("read", DECODERS)
@given(data=st.binary(max_size=300))
def test_every_encoding_decodes_to_its_bytes(read: Callable[[str], bytes], data: bytes) -> None:
    assert read(base64.b64encode(data).decode()) == data


@pytest.mark.parametrize("read", DECODERS)
@settings(max_examples=500)
@given(text=st.text(alphabet=ALPHABET, max_size=16))
def test_accepts_only_canonical_standard_base64(read: Callable[[str], bytes], text: str) -> None:
    try:
        got = read(text)
    except ValueError:
        # refused: not something the strict decoder reads back to the same text
        try:
            kept = binascii.a2b_base64(text, strict_mode=True)
        except ValueError:  # binascii.Error, or not ASCII
            return
        assert base64.b64encode(kept).decode() != text
        return
    assert got == binascii.a2b_base64(text, strict_mode=True)
    assert base64.b64encode(got).decode() == text


@pytest.mark.parametrize("read", DECODERS)
@pytest.mark.parametrize(
    "text",
    [
        "a-_b",  # the URL-safe alphabet
        "YWI",  # no padding
        "YWJj====",  # padding past the end
        "YW\nJj",  # a line break
        " YWJj",  # a space
        "\\u0059WJj",  # a JSON escape spelling `Y`
        'YW"j',  # a quote
        "YQ==YQ==",  # data after padding
        "YWJé",  # not ASCII
        "YR==",  # bits set past the last byte (`a` is `YQ==`)
        "YWF=",  # the same, one byte short of a group (`aa` is `YWE=`)
        "YQ=a",  # padding inside the last group
    ],
)
def test_refuses(read: Callable[[str], bytes], text: str) -> None:
    with pytest.raises(ValueError):
        read(text)


@pytest.mark.parametrize("read", DECODERS)
def test_a_large_text_round_trips(read: Callable[[str], bytes]) -> None:
    data = bytes(range(256)) * 1000 + b"ab"  # a photo's size, a partial last group
    assert read(encode(data)) == data
