"""Base64 text of the wire (inline inputs and outputs): written, and read back strictly.

`encode(data)` is the standard base64 of `data` (what `base64.b64encode` writes, as
`str`). `decode(text)` accepts exactly the canonical standard base64 of some bytes
(RFC 4648 section 4: the `A-Z a-z 0-9 + /` alphabet, `=` padding to a multiple of 4
characters, no whitespace, no bits set past the last byte) and raises `ValueError` for
anything else: what `encode` and `base64.b64encode` write, which every CSML sender uses.
That is the set `binascii.a2b_base64(text, strict_mode=True)` accepts, less its
non-canonical spellings (`YW==` for `a`), which no encoder writes.

Both run in `pybase64` (SIMD, libbase64) when it is installed (a dependency): for a
247 KB photo output ~13 µs to decode and ~4 µs to encode here, against ~200-500 µs and
~300 µs for pydantic-core's and binascii's (a (c) photo is encoded and decoded twice each
way between coordinator and agent). Its strict mode (`validate=True`) refuses any
character outside the alphabet and any misplaced or missing padding; the bits past the
last byte are checked here (the last group, encoded again, must be the text's). Without
`pybase64` (a tree installed before it was a dependency): `binascii` to encode,
pydantic-core (`val_json_bytes="base64"`, Rust, ~4x binascii's decoder) to decode, which
also takes the URL-safe alphabet and missing padding that the checks before it refuse.
"""

from __future__ import annotations

import base64
from types import ModuleType

from pydantic import ConfigDict, TypeAdapter, ValidationError

_fast: ModuleType | None
try:
    import pybase64 as _fast
except ImportError:  # pragma: no cover: a dependency; kept working without it
    _fast = None

_BYTES = TypeAdapter(bytes, config=ConfigDict(val_json_bytes="base64"))


def _encode_fast(data: bytes) -> str:
    """The standard base64 of `data` (padded, no line breaks), by `pybase64`."""
    assert _fast is not None
    text: str = _fast.b64encode_as_string(data)
    return text


def _encode_binascii(data: bytes) -> str:
    """`_encode_fast`'s text, by `binascii` (without `pybase64`)."""
    return base64.b64encode(data).decode("ascii")


def _decode_fast(text: str) -> bytes:
    """The bytes of canonical standard base64 `text`; ValueError if it is not that."""
    assert _fast is not None
    try:  # the alphabet, padding only at the end, a multiple of 4 characters
        data: bytes = _fast.b64decode(text, validate=True)
    except (ValueError, TypeError):  # binascii.Error; a str not ASCII
        raise ValueError("not canonical standard base64") from None
    tail = len(data) % 3
    if tail and _fast.b64encode_as_string(data[-tail:]) != text[-4:]:
        raise ValueError("not canonical standard base64")  # bits past the last byte
    return data


def _decode_pydantic(text: str) -> bytes:
    """`_decode_fast`, in pydantic-core (without `pybase64`)."""
    # Padded; the standard alphabet; no backslash, which JSON would read as an escape
    # (`\u0041` is `A`). A `"` or a control character then fails the JSON itself.
    if len(text) % 4 or "-" in text or "_" in text or "\\" in text:
        raise ValueError("not canonical standard base64")
    try:
        return _BYTES.validate_json(f'"{text}"')
    except ValidationError:
        raise ValueError("not canonical standard base64") from None


encode = _encode_fast if _fast is not None else _encode_binascii
"""The standard base64 of `data` (padded, no line breaks)."""
decode = _decode_fast if _fast is not None else _decode_pydantic
"""The bytes of canonical standard base64 `text`; ValueError if it is not that."""
