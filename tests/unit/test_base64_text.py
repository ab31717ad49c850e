"""`csml.schemas.base64_text.decode`: exactly canonical standard base64, as
`binascii.a2b_base64(strict_mode=True)` decodes it (less non-canonical spellings)."""

from __future__ import annotations

import base64
import binascii

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csml.schemas.base64_text import decode

ALPHABET = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_\\" \n\té'


@given(st.binary(max_size=300))
def test_every_encoding_decodes_to_its_bytes(data: bytes) -> None:
    assert decode(base64.b64encode(data).decode()) == data


@settings(max_examples=500)
@given(st.text(alphabet=ALPHABET, max_size=16))
def test_accepts_only_canonical_standard_base64(text: str) -> None:
    try:
        got = decode(text)
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
    ],
)
def test_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        decode(text)
