"""End-to-end encryption of confidential jobs (libsodium through PyNaCl; no home-made crypto).

- `keys`: X25519 key pairs, data keys wrapped with sealed boxes (client -> worker) or
  authenticated boxes (worker -> client), base64 helpers.
- `aead`: one-shot XChaCha20-Poly1305-IETF for small messages (params, results).
- `stream`: files in 1 MiB chunks with `crypto_secretstream_xchacha20poly1305`,
  the last chunk tagged FINAL, so truncation, reordering and tampering are detected.
- `binding`: the associated data that ties each ciphertext to its job and its name.

The wire format is described in README.md ("Confidential jobs").
"""

from csml.crypto.aead import open_message, seal_message
from csml.crypto.binding import associated_data, new_job_nonce, worker_key_report_data
from csml.crypto.errors import DecryptionError
from csml.crypto.keys import (
    KEY_BYTES,
    b64d,
    b64e,
    box_key,
    new_data_key,
    unbox_key,
    unwrap_key,
    wrap_key,
)
from csml.crypto.stream import (
    CHUNK_SIZE,
    EncryptingReader,
    StreamDecryptor,
    ciphertext_size,
    decrypt_file,
    encrypt_file,
    encrypt_iter,
)

__all__ = [
    "CHUNK_SIZE",
    "KEY_BYTES",
    "DecryptionError",
    "EncryptingReader",
    "StreamDecryptor",
    "associated_data",
    "b64d",
    "b64e",
    "box_key",
    "ciphertext_size",
    "decrypt_file",
    "encrypt_file",
    "encrypt_iter",
    "new_data_key",
    "new_job_nonce",
    "open_message",
    "seal_message",
    "unbox_key",
    "unwrap_key",
    "worker_key_report_data",
    "wrap_key",
]
