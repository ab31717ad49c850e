"""The streaming construction and the envelopes: round trips, and every way to break them."""

from __future__ import annotations

import io
import os

import pytest
from nacl.public import PrivateKey

from csml.crypto import (
    DecryptionError,
    EncryptingReader,
    StreamDecryptor,
    associated_data,
    ciphertext_size,
    decrypt_file,
    encrypt_file,
    new_data_key,
    new_job_nonce,
    unwrap_key,
    worker_key_report_data,
    wrap_key,
)
from csml.crypto.envelope import (
    JobManifest,
    ResultPayload,
    open_manifest,
    open_result,
    seal_manifest,
    seal_result,
)
from csml.crypto.stream import ABYTES, PREFIX_BYTES

CHUNK = 4096  # small chunks: many of them in a small file
NONCE = new_job_nonce()
AD = associated_data("input", NONCE, "image")


def _encrypt(data: bytes, key: bytes, ad: bytes = AD, chunk: int = CHUNK) -> bytes:
    out = io.BytesIO()
    encrypt_file(io.BytesIO(data), out, key, ad, chunk)
    return out.getvalue()


def _decrypt(blob: bytes, key: bytes, ad: bytes = AD) -> bytes:
    out = io.BytesIO()
    decrypt_file(io.BytesIO(blob), out, key, ad, "input 'image'")
    return out.getvalue()


def _records(blob: bytes, chunk: int = CHUNK) -> tuple[bytes, list[bytes]]:
    size = chunk + ABYTES
    body = blob[PREFIX_BYTES:]
    return blob[:PREFIX_BYTES], [body[i : i + size] for i in range(0, len(body), size)]


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 10 * CHUNK + 77])
def test_round_trip_of_every_size(size: int) -> None:
    key, data = new_data_key(), os.urandom(size)
    blob = _encrypt(data, key)
    assert len(blob) == ciphertext_size(size, CHUNK)
    assert _decrypt(blob, key) == data
    assert size < 32 or data[:32] not in blob


def test_multi_chunk_file_streams_with_bounded_memory(tmp_path: object) -> None:
    """A file of many 1 MiB chunks through real files; the reader is a file object."""
    key, data = new_data_key(), os.urandom(5 * (1 << 20) + 12345)
    src = io.BytesIO(data)
    reader = EncryptingReader(src, key, AD)
    pieces = []
    while piece := reader.read(64 * 1024):
        assert len(piece) <= 64 * 1024
        pieces.append(piece)
    blob = b"".join(pieces)
    assert len(blob) == ciphertext_size(len(data))
    dec = StreamDecryptor(key, AD, "x")
    out = bytearray()
    for i in range(0, len(blob), 777_777):  # arbitrary network-sized pieces
        out += dec.feed(blob[i : i + 777_777])
    out += dec.finish()
    assert bytes(out) == data


def test_truncation_is_detected_at_every_record_boundary() -> None:
    key, data = new_data_key(), os.urandom(5 * CHUNK + 10)
    blob = _encrypt(data, key)
    prefix, records = _records(blob)
    for keep in range(len(records)):
        cut = prefix + b"".join(records[:keep])
        with pytest.raises(DecryptionError, match="truncated"):
            _decrypt(cut, key)
    with pytest.raises(DecryptionError):
        _decrypt(blob[:-1], key)  # inside the last record
    with pytest.raises(DecryptionError, match="truncated"):
        _decrypt(blob[: PREFIX_BYTES - 1], key)


def test_exact_multiple_has_no_empty_trailer_to_drop() -> None:
    """A file of whole chunks ends with a full FINAL chunk: dropping it is truncation."""
    key = new_data_key()
    blob = _encrypt(os.urandom(4 * CHUNK), key)
    prefix, records = _records(blob)
    assert len(records) == 4
    with pytest.raises(DecryptionError, match="truncated"):
        _decrypt(prefix + b"".join(records[:3]), key)


def test_reordered_duplicated_or_appended_records_fail() -> None:
    key, data = new_data_key(), os.urandom(4 * CHUNK + 5)
    prefix, records = _records(_encrypt(data, key))
    swapped = [records[1], records[0], *records[2:]]
    with pytest.raises(DecryptionError, match=r"chunk 0 .* failed authentication"):
        _decrypt(prefix + b"".join(swapped), key)
    duplicated = [records[0], records[0], *records[1:]]
    with pytest.raises(DecryptionError, match="chunk 1"):
        _decrypt(prefix + b"".join(duplicated), key)
    with pytest.raises(DecryptionError):
        _decrypt(prefix + b"".join(records) + records[-1], key)  # inside a short final record
    prefix, records = _records(_encrypt(os.urandom(2 * CHUNK), key))
    with pytest.raises(DecryptionError, match="after its final chunk"):
        _decrypt(prefix + b"".join(records) + records[0], key)


def test_any_flipped_byte_fails() -> None:
    key, data = new_data_key(), os.urandom(3 * CHUNK + 100)
    blob = _encrypt(data, key)
    for offset in (0, 9, 12, 20, PREFIX_BYTES, PREFIX_BYTES + CHUNK, len(blob) // 2, len(blob) - 1):
        bad = bytearray(blob)
        bad[offset] ^= 0x01
        with pytest.raises(DecryptionError):
            _decrypt(bytes(bad), key)


def test_ciphertext_is_bound_to_its_name_purpose_job_and_key() -> None:
    key, data = new_data_key(), os.urandom(CHUNK + 1)
    blob = _encrypt(data, key)
    for other in (
        associated_data("input", NONCE, "other"),  # swapped between files
        associated_data("output", NONCE, "image"),  # an input passed off as an output
        associated_data("input", new_job_nonce(), "image"),  # swapped between jobs
    ):
        with pytest.raises(DecryptionError, match="failed authentication"):
            _decrypt(blob, key, other)
    with pytest.raises(DecryptionError):
        _decrypt(blob, new_data_key())
    bad_chunk = bytearray(blob)
    bad_chunk[8:12] = (CHUNK * 2).to_bytes(4, "big")  # the chunk size is authenticated too
    with pytest.raises(DecryptionError):
        _decrypt(bytes(bad_chunk), key)


def test_not_a_stream() -> None:
    with pytest.raises(DecryptionError, match="bad magic"):
        _decrypt(b"\x89PNG\r\n\x1a\n" + bytes(100), new_data_key())


def test_keys_wrap_to_one_worker_only() -> None:
    worker, other = PrivateKey.generate(), PrivateKey.generate()
    key = new_data_key()
    wrapped = wrap_key(key, bytes(worker.public_key))
    assert len(wrapped) == 80 and unwrap_key(wrapped, worker) == key
    with pytest.raises(DecryptionError, match="not sealed to this worker"):
        unwrap_key(wrapped, other)


def test_report_data_binds_key_and_app() -> None:
    pk = bytes(PrivateKey.generate().public_key)
    rd = worker_key_report_data(pk, "opencv")
    assert len(rd) == 64 and rd[32:] == bytes(32)
    assert rd != worker_key_report_data(pk, "echo")
    assert rd != worker_key_report_data(bytes(PrivateKey.generate().public_key), "opencv")


def test_manifest_and_result_envelopes() -> None:
    data_key, nonce = new_data_key(), new_job_nonce()
    client = PrivateKey.generate()
    worker = PrivateKey.generate()
    manifest = JobManifest(
        "opencv", "detect_faces", {"min_neighbors": 4}, ["image"], bytes(client.public_key)
    )
    sealed = seal_manifest(data_key, nonce, manifest)
    assert open_manifest(data_key, nonce, sealed) == manifest
    with pytest.raises(DecryptionError):
        open_manifest(data_key, new_job_nonce(), sealed)
    result_key = new_data_key()
    payload = ResultPayload("succeeded", result={"count": 1}, outputs={"annotated": {"size": 3}})
    enc = seal_result(
        payload,
        result_key=result_key,
        worker_id="a" * 64,
        worker_key=worker,
        client_public_key=bytes(client.public_key),
        job_nonce=nonce,
    )
    opened, key = open_result(
        enc, result_key=client, worker_public_key=bytes(worker.public_key), job_nonce=nonce
    )
    assert opened == payload and key == result_key
    # A result boxed by anyone but the attested worker (e.g. the coordinator, which knows
    # the client's result public key) does not open.
    forged = seal_result(
        payload,
        result_key=result_key,
        worker_id="a" * 64,
        worker_key=PrivateKey.generate(),
        client_public_key=bytes(client.public_key),
        job_nonce=nonce,
    )
    with pytest.raises(DecryptionError, match="does not come from that worker"):
        open_result(
            forged, result_key=client, worker_public_key=bytes(worker.public_key), job_nonce=nonce
        )
