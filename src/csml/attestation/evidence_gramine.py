"""`sgx-dcap` evidence from inside a Gramine SGX enclave.

Gramine exposes the enclave's attestation as pseudo-files: writing 64 bytes to
/dev/attestation/user_report_data sets the REPORTDATA of the next quote, and reading
/dev/attestation/quote returns a DCAP quote over it (needs `sgx.remote_attestation =
"dcap"` in the manifest and a reachable quoting enclave on the host).
"""

from __future__ import annotations

import threading
from pathlib import Path

from csml.attestation.evidence import EvidenceUnavailable

DEFAULT_ROOT = Path("/dev/attestation")


class GramineSgxProvider:
    name = "sgx-dcap"
    kind = "sgx-dcap"
    _lock = threading.Lock()  # the pseudo-files hold one report data at a time

    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        self.root = root

    def produce(self, report_data: bytes) -> bytes:
        if len(report_data) != 64:
            raise ValueError("SGX report data is 64 bytes")
        quote_file = self.root / "quote"
        if not quote_file.exists():
            raise EvidenceUnavailable(
                f"sgx-dcap evidence needs Gramine's {self.root} (run the worker inside a "
                'Gramine SGX enclave with sgx.remote_attestation = "dcap")'
            )
        kind_file = self.root / "attestation_type"
        if kind_file.exists():
            kind = kind_file.read_text().strip()
            if kind != "dcap":
                raise EvidenceUnavailable(
                    f"Gramine's attestation type is {kind!r}, not 'dcap': set "
                    'sgx.remote_attestation = "dcap" in the manifest'
                )
        with self._lock:
            (self.root / "user_report_data").write_bytes(report_data)
            quote = quote_file.read_bytes()
        if not quote:
            raise EvidenceUnavailable(f"{quote_file} returned no quote")
        return quote
