"""Files of any size, encrypted in chunks with libsodium's secretstream.

Format (all of it authenticated; sizes big-endian):

    magic   8 bytes   b"CSMLSS01"
    chunk   4 bytes   plaintext bytes per chunk (1 MiB by default; at most 64 MiB)
    header 24 bytes   crypto_secretstream_xchacha20poly1305 header
    records           one per chunk: ciphertext + 17 bytes (tag byte and MAC). Every record
                      but the last holds exactly `chunk` plaintext bytes; the last holds
                      0..chunk bytes and carries TAG_FINAL.

Each record is authenticated with associated data = the caller's binding (purpose, job
nonce, file name; see `binding.py`) || magic || chunk. secretstream numbers its records
internally, so a reordered, dropped, duplicated or altered record fails; a stream that
ends without its FINAL record is truncated; bytes after it are refused. Memory use is
one chunk, whatever the file size.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

from nacl import bindings as b
from nacl.exceptions import CryptoError
from nacl.exceptions import RuntimeError as NaclRuntimeError

from csml.crypto.errors import DecryptionError

MAGIC = b"CSMLSS01"
CHUNK_SIZE = 1 << 20
MAX_CHUNK_SIZE = 64 << 20
HEADER_BYTES = b.crypto_secretstream_xchacha20poly1305_HEADERBYTES
ABYTES = b.crypto_secretstream_xchacha20poly1305_ABYTES
PREFIX_BYTES = len(MAGIC) + 4 + HEADER_BYTES
TAG_MESSAGE = b.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
TAG_FINAL = b.crypto_secretstream_xchacha20poly1305_TAG_FINAL


def ciphertext_size(plain_size: int, chunk_size: int = CHUNK_SIZE) -> int:
    """The exact encrypted size of `plain_size` bytes."""
    records = max(1, -(-plain_size // chunk_size))
    return PREFIX_BYTES + plain_size + records * ABYTES


def _read_full(src: BinaryIO, n: int) -> bytes:
    """Up to `n` bytes; fewer only at end of file (pipes may return short reads)."""
    data = src.read(n)
    if len(data) == n or not data:
        return bytes(data)
    parts = [data]
    got = len(data)
    while got < n:
        more = src.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _framing(chunk_size: int) -> bytes:
    return MAGIC + struct.pack(">I", chunk_size)


def encrypt_iter(
    src: BinaryIO, key: bytes, ad: bytes, chunk_size: int = CHUNK_SIZE
) -> Iterator[bytes]:
    """Yield the encrypted stream of `src`: the 36-byte prefix, then one record per chunk."""
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size must be 1..{MAX_CHUNK_SIZE}")
    state = b.crypto_secretstream_xchacha20poly1305_state()
    header = b.crypto_secretstream_xchacha20poly1305_init_push(state, key)
    framing = _framing(chunk_size)
    full_ad = ad + framing
    yield framing + header
    chunk = _read_full(src, chunk_size)
    while True:
        following = _read_full(src, chunk_size) if len(chunk) == chunk_size else b""
        tag = TAG_MESSAGE if following else TAG_FINAL
        yield b.crypto_secretstream_xchacha20poly1305_push(state, chunk, full_ad, tag)
        if tag == TAG_FINAL:
            return
        chunk = following


def encrypt_file(
    src: BinaryIO, dst: BinaryIO, key: bytes, ad: bytes, chunk_size: int = CHUNK_SIZE
) -> int:
    """Encrypt `src` into `dst`; returns the bytes written."""
    written = 0
    for piece in encrypt_iter(src, key, ad, chunk_size):
        dst.write(piece)
        written += len(piece)
    return written


class EncryptingReader:
    """A read-only file object whose bytes are the encrypted stream of `src` (for uploads)."""

    def __init__(self, src: BinaryIO, key: bytes, ad: bytes, chunk_size: int = CHUNK_SIZE):
        self._pieces = encrypt_iter(src, key, ad, chunk_size)
        self._buffer = b""
        self._offset = 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            rest = [self._buffer[self._offset :], *self._pieces]
            self._buffer, self._offset = b"", 0
            return b"".join(rest)
        while len(self._buffer) - self._offset == 0:
            piece = next(self._pieces, None)
            if piece is None:
                return b""
            self._buffer, self._offset = piece, 0
        out = self._buffer[self._offset : self._offset + n]
        self._offset += len(out)
        return out


class StreamDecryptor:
    """Push-style decryption: `feed` ciphertext as it arrives, get plaintext, then `finish`.

    Raises `DecryptionError` naming `what` and the chunk at fault.
    """

    def __init__(self, key: bytes, ad: bytes, what: str = "the stream") -> None:
        self.key = key
        self.ad = ad
        self.what = what
        self._buffer = bytearray()
        self._state: b.crypto_secretstream_xchacha20poly1305_state | None = None
        self._record = 0
        self._full_ad = b""
        self._index = 0
        self._final = False
        self.plaintext_bytes = 0

    def _start(self) -> None:
        prefix = bytes(self._buffer[:PREFIX_BYTES])
        del self._buffer[:PREFIX_BYTES]
        if prefix[: len(MAGIC)] != MAGIC:
            raise DecryptionError(f"{self.what} is not a CSML encrypted stream (bad magic)")
        (chunk_size,) = struct.unpack(">I", prefix[len(MAGIC) : len(MAGIC) + 4])
        if not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise DecryptionError(f"{self.what} declares an invalid chunk size {chunk_size}")
        self._record = chunk_size + ABYTES
        self._full_ad = self.ad + _framing(chunk_size)
        self._state = b.crypto_secretstream_xchacha20poly1305_state()
        try:
            b.crypto_secretstream_xchacha20poly1305_init_pull(
                self._state, prefix[len(MAGIC) + 4 :], self.key
            )
        except (CryptoError, NaclRuntimeError, ValueError):
            raise DecryptionError(f"{self.what} has an invalid stream header") from None

    def _pull(self, record: bytes) -> bytes:
        assert self._state is not None
        if self._final:
            raise DecryptionError(f"{self.what} has data after its final chunk")
        try:
            plain, tag = b.crypto_secretstream_xchacha20poly1305_pull(
                self._state, record, self._full_ad
            )
        except (CryptoError, NaclRuntimeError, ValueError):
            raise DecryptionError(
                f"chunk {self._index} of {self.what} failed authentication: the ciphertext "
                "was altered, reordered or truncated, or belongs to another file or job"
            ) from None
        if tag == TAG_FINAL:
            self._final = True
        elif tag != TAG_MESSAGE:
            raise DecryptionError(f"chunk {self._index} of {self.what} has an unexpected tag")
        self._index += 1
        self.plaintext_bytes += len(plain)
        return plain

    def feed(self, data: bytes) -> bytes:
        if self._final and data:
            raise DecryptionError(f"{self.what} has data after its final chunk")
        if self._state is None:
            self._buffer += data
            if len(self._buffer) < PREFIX_BYTES:
                return b""
            self._start()
            data, self._buffer = bytes(self._buffer), bytearray()
        # Whole records straight from `data` (plus what was left over last time): a full
        # record may still be the last one; its tag says so.
        buf = bytes(self._buffer) + data if self._buffer else data
        view = memoryview(buf)
        pos, out = 0, []
        while len(buf) - pos >= self._record:
            out.append(self._pull(bytes(view[pos : pos + self._record])))
            pos += self._record
            if self._final and pos < len(buf):
                raise DecryptionError(f"{self.what} has data after its final chunk")
        self._buffer = bytearray(view[pos:])
        return out[0] if len(out) == 1 else b"".join(out)

    def finish(self) -> bytes:
        """The last (short) chunk; raises if the stream was truncated."""
        if self._state is None:
            raise DecryptionError(
                f"{self.what} is truncated: {len(self._buffer)} bytes, shorter than the "
                "stream header"
            )
        out = b""
        if self._buffer:
            record = bytes(self._buffer)
            self._buffer.clear()
            if len(record) < ABYTES:
                raise DecryptionError(f"{self.what} is truncated inside chunk {self._index}")
            out = self._pull(record)
        if not self._final:
            raise DecryptionError(
                f"{self.what} is truncated: it ends after chunk {self._index - 1} without "
                "its final chunk"
            )
        return out


def decrypt_file(
    src: BinaryIO, dst: BinaryIO, key: bytes, ad: bytes, what: str = "the file"
) -> int:
    """Decrypt a whole stream from `src` into `dst`, record by record; returns plaintext bytes."""
    dec = StreamDecryptor(key, ad, what)
    dst.write(dec.feed(_read_full(src, PREFIX_BYTES)))
    record = dec._record or CHUNK_SIZE + ABYTES
    while True:
        piece = _read_full(src, record)
        if len(piece) < record:
            dec._buffer += piece  # the short last record, if any: `finish` judges it
            break
        if dec._final:
            raise DecryptionError(f"{what} has data after its final chunk")
        dst.write(dec._pull(piece))
    dst.write(dec.finish())
    return dec.plaintext_bytes
