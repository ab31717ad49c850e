"""A test-only attestation provider: synthetic SGX DCAP quotes under a test root PKI.

Loaded in a worker process through `CSML_ATTESTATION_PROVIDERS=
"synthetic-sgx=synthetic_provider:SyntheticSgxProvider"` with this folder and
tests/unit/attestation on PYTHONPATH; nothing of it ships in src. The PKI comes from the folder
named by `CSML_TEST_PKI` (written by `save_pki`), the quote's shape from the JSON object in
`CSML_TEST_QUOTE` (QuoteSpec fields, e.g. {"debug": true} or {"pce_svn": 11}).

`dcap_factory` dates everything from its module clock `NOW` (2030); `factory_clock`
moves it to the present while building, and puts it back afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import dcap_factory
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from dcap_factory import QuoteSpec, TestPki, build_collateral, build_quote

# What dcap_factory puts in every synthetic SGX report body.
MRENCLAVE = hashlib.sha256(b"test enclave").hexdigest()
MRSIGNER = hashlib.sha256(b"test signer").hexdigest()
_PARTS = ("root", "ca", "tcb")


@contextmanager
def factory_clock(now: datetime | None = None) -> Iterator[None]:
    saved = dcap_factory.NOW
    dcap_factory.NOW = now or datetime.now(UTC)
    try:
        yield
    finally:
        dcap_factory.NOW = saved


def save_pki(pki: TestPki, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for part in _PARTS:
        key: ec.EllipticCurvePrivateKey = getattr(pki, f"{part}_key")
        cert: x509.Certificate = getattr(pki, part)
        (folder / f"{part}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (folder / f"{part}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def load_pki(folder: Path) -> TestPki:
    parts: dict[str, Any] = {}
    for part in _PARTS:
        parts[f"{part}_key"] = serialization.load_pem_private_key(
            (folder / f"{part}.key").read_bytes(), None
        )
        parts[part] = x509.load_pem_x509_certificate((folder / f"{part}.pem").read_bytes())
    return TestPki(**parts)


def make_test_pki(folder: Path) -> dict[str, Path]:
    """A fresh test PKI valid now, its root PEM and SGX collateral, written to `folder`."""
    with factory_clock():
        pki = TestPki.create()
        collateral = build_collateral(pki, QuoteSpec(tee="SGX"))
    save_pki(pki, folder)
    paths = {
        "folder": folder,
        "root": folder / "root.pem",
        "collateral": folder / "collateral.json",
    }
    paths["collateral"].write_text(json.dumps(collateral))
    return paths


class SyntheticSgxProvider:
    name = "synthetic-sgx"
    kind = "sgx-dcap"

    def __init__(self) -> None:
        self.pki = load_pki(Path(os.environ["CSML_TEST_PKI"]))
        self.spec: dict[str, Any] = json.loads(os.environ.get("CSML_TEST_QUOTE") or "{}")

    def produce(self, report_data: bytes) -> bytes:
        with factory_clock():
            quote = build_quote(
                QuoteSpec(tee="SGX", report_data=report_data, **self.spec), self.pki
            )
        return cast(bytes, quote)
