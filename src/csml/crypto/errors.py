"""The one error every decryption failure raises, with a message a person can act on."""

from __future__ import annotations


class DecryptionError(Exception):
    """A ciphertext did not decrypt: altered, truncated, reordered, or for another key/job."""
