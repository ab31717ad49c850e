"""Refuse images whose header declares too many pixels, before decoding them.

A PNG of a few hundred bytes can declare 100000 by 100000 pixels: decoding it
would allocate 30 GB. `check_image_size` reads only the header (PNG, JPEG, GIF,
BMP, WebP, TIFF, PNM) and fails the job with a clear message. Behind it, the
worker's sandbox sets OpenCV's own limit (`OPENCV_IO_MAX_IMAGE_PIXELS`, read
once when OpenCV loads) for every other format.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from csml.apps.base import JobError

MAX_IMAGE_PIXELS = 256_000_000
"""Largest input image (256 megapixels: 768 MB once decoded as 8-bit BGR)."""
OPENCV_MAX_PIXELS = 20_000 * 20_000
"""OpenCV's limit, for decoding and encoding: the largest image `resize` may produce."""

Size = tuple[int, int]


def _png(f: BinaryIO, head: bytes) -> Size | None:
    if head[12:16] != b"IHDR":
        return None
    w, h = struct.unpack(">II", head[16:24])
    return w, h


def _gif(f: BinaryIO, head: bytes) -> Size | None:
    w, h = struct.unpack("<HH", head[6:10])
    return w, h


def _bmp(f: BinaryIO, head: bytes) -> Size | None:
    (dib,) = struct.unpack("<I", head[14:18])
    if dib == 12:
        w, h = struct.unpack("<HH", head[18:22])
    else:
        w, h = struct.unpack("<ii", head[18:26])
    return abs(w), abs(h)


def _webp(f: BinaryIO, head: bytes) -> Size | None:
    kind = head[12:16]
    if kind == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", head[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if kind == b"VP8L" and head[20] == 0x2F:
        (bits,) = struct.unpack("<I", head[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8X":
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    return None


def _jpeg(f: BinaryIO, head: bytes) -> Size | None:
    f.seek(2)
    for _ in range(10_000):  # segments; a crafted file gets no unbounded loop
        byte = f.read(1)
        while byte == b"\xff":
            byte = f.read(1)
        if not byte:
            return None
        marker = byte[0]
        if marker in (0x01, *range(0xD0, 0xD9)):  # no length
            continue
        length_bytes = f.read(2)
        if len(length_bytes) < 2 or marker in (0xD9, 0xDA):  # end, or scan data before SOF
            return None
        (length,) = struct.unpack(">H", length_bytes)
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn
            data = f.read(5)
            if len(data) < 5:
                return None
            h, w = struct.unpack(">HH", data[1:5])
            return w, h
        f.seek(length - 2, 1)
    return None


def _tiff(f: BinaryIO, head: bytes) -> Size | None:
    e = "<" if head[:2] == b"II" else ">"
    (version,) = struct.unpack(e + "H", head[2:4])
    big = version == 43  # BigTIFF: 8-byte offsets and counts
    offset = struct.unpack(e + ("Q" if big else "I"), head[8:16] if big else head[4:8])[0]
    f.seek(offset)
    count_fmt, entry = ("Q", 20) if big else ("H", 12)
    raw = f.read(struct.calcsize(count_fmt))
    if len(raw) < struct.calcsize(count_fmt):
        return None
    (count,) = struct.unpack(e + count_fmt, raw)
    found: dict[int, int] = {}
    for _ in range(min(count, 4096)):
        data = f.read(entry)
        if len(data) < entry:
            break
        tag, kind = struct.unpack(e + "HH", data[:4])
        value = data[12:] if big else data[8:]
        if tag in (256, 257) and kind in (3, 4, 16):
            fmt = {3: "H", 4: "I", 16: "Q"}[kind]
            found[tag] = struct.unpack(e + fmt, value[: struct.calcsize(fmt)])[0]
    if 256 in found and 257 in found:
        return found[256], found[257]
    return None


def _pnm(f: BinaryIO, head: bytes) -> Size | None:
    f.seek(0)
    text = b" ".join(line.split(b"#")[0] for line in f.read(1024).splitlines())
    fields = text.split()
    if len(fields) < 3 or not (fields[1].isdigit() and fields[2].isdigit()):
        return None
    return int(fields[1]), int(fields[2])


Reader = Callable[[BinaryIO, bytes], Size | None]
READERS: list[tuple[tuple[bytes, ...], Reader]] = [
    ((b"\x89PNG\r\n\x1a\n",), _png),
    ((b"\xff\xd8",), _jpeg),
    ((b"GIF87a", b"GIF89a"), _gif),
    ((b"BM",), _bmp),
    ((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"), _tiff),
    ((b"P1", b"P2", b"P3", b"P4", b"P5", b"P6", b"PF", b"Pf"), _pnm),
]


def declared_size(path: Path) -> Size | None:
    """(width, height) from the file's header; None if unknown or unreadable."""
    try:
        with open(path, "rb") as f:
            head = f.read(32)
            if len(head) < 30:
                head += b"\x00" * (30 - len(head))
            if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
                return _webp(f, head)
            for signatures, reader in READERS:
                if head.startswith(signatures):
                    return reader(f, head)
    except (OSError, struct.error, ValueError):
        return None
    return None


def _amount(pixels: int) -> str:
    if pixels >= 1_000_000_000:
        return f"{pixels / 1e9:.3g} gigapixels"
    return f"{pixels / 1e6:.3g} megapixels"


def check_image_size(path: Path, name: str = "image", limit: int = MAX_IMAGE_PIXELS) -> None:
    """Fail the job if the image declares more than `limit` pixels; decode nothing."""
    size = declared_size(path)
    if size is not None and size[0] * size[1] > limit:
        w, h = size
        raise JobError(
            f"input {name!r} declares {w} \N{MULTIPLICATION SIGN} {h} pixels ({_amount(w * h)}), "
            f"over the limit of {_amount(limit)}"
        )
