"""`tdx-dcap` evidence from inside an Intel TDX guest, through Linux configfs-tsm.

A report entry is a directory made under /sys/kernel/config/tsm/report: writing 64 bytes
to its `inblob` sets the TD report data, reading `outblob` returns the DCAP quote, and
`generation` counts writes, so reading it before and after shows no other writer raced us.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from csml.attestation.evidence import EvidenceUnavailable

DEFAULT_ROOT = Path("/sys/kernel/config/tsm/report")
log = logging.getLogger("csml.attestation")


class TdxConfigfsProvider:
    name = "tdx-dcap"
    kind = "tdx-dcap"

    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        self.root = root

    def _new_entry(self) -> Path:
        entry = self.root / f"csml-{os.getpid()}-{secrets.token_hex(4)}"
        entry.mkdir()
        return entry

    def _remove_entry(self, entry: Path) -> None:
        try:
            entry.rmdir()
        except OSError as exc:
            log.warning("could not remove the configfs-tsm entry %s: %s", entry, exc)

    def produce(self, report_data: bytes) -> bytes:
        if len(report_data) != 64:
            raise ValueError("TDX report data is 64 bytes")
        if not self.root.is_dir():
            raise EvidenceUnavailable(
                f"tdx-dcap evidence needs the Linux configfs-tsm interface at {self.root} "
                "(a TDX guest, kernel >= 6.7, configfs mounted)"
            )
        entry = self._new_entry()
        try:
            provider_file = entry / "provider"
            if provider_file.exists():
                provider = provider_file.read_text().strip()
                if "tdx" not in provider:
                    raise EvidenceUnavailable(
                        f"the configfs-tsm provider here is {provider!r}, not a TDX guest"
                    )
            (entry / "inblob").write_bytes(report_data)
            before = (entry / "generation").read_text().strip()
            quote = (entry / "outblob").read_bytes()
            after = (entry / "generation").read_text().strip()
            if before != after:
                raise EvidenceUnavailable(
                    "another writer changed the configfs-tsm report while it was read; retry"
                )
            if not quote:
                raise EvidenceUnavailable("configfs-tsm returned an empty quote")
            return quote
        finally:
            self._remove_entry(entry)
