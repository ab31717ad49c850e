"""Offline verification of Intel DCAP quotes (SGX v3, TDX v4/v5) against Intel collateral.

    report = verify_quote(quote, Collateral.from_json(data), now=datetime.now(UTC))
    report.tcb_status, report.advisory_ids, report.measurements

Every step is named (see `VerificationReport.checks`); the first failing step raises
`VerificationError`, whose message names the step and what did not match. TCB statuses
other than Revoked pass: judging OutOfDate & co. is the caller's policy (or pass
`accepted_statuses`).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from csml.attestation.dcap_checks import CheckResult, VerificationError
from csml.attestation.dcap_collateral import Collateral, CollateralFormatError, TcbStatus
from csml.attestation.dcap_pck import PckInfo
from csml.attestation.dcap_quote import EnclaveReport, Quote, QuoteParseError, TdReport, parse_quote
from csml.attestation.dcap_steps import Verification
from csml.attestation.dcap_tcb import merge_advisories
from csml.attestation.dcap_x509 import INTEL_SGX_ROOT_CA_SHA256

__all__ = [
    "INTEL_SGX_ROOT_CA_SHA256",
    "CheckResult",
    "Collateral",
    "CollateralFormatError",
    "EnclaveReport",
    "PckInfo",
    "Quote",
    "QuoteParseError",
    "TcbStatus",
    "TdReport",
    "VerificationError",
    "VerificationReport",
    "parse_quote",
    "verify_quote",
]


@dataclass(frozen=True)
class VerificationReport:
    """The outcome of a successful verification."""

    checks: tuple[CheckResult, ...]
    quote: Quote
    pck: PckInfo
    tcb_status: TcbStatus
    advisory_ids: tuple[str, ...]
    platform_tcb_status: TcbStatus
    qe_tcb_status: TcbStatus
    tdx_module_tcb_status: TcbStatus | None
    tcb_date: str
    valid_until: datetime

    @property
    def tee(self) -> str:
        return "TDX" if self.quote.is_tdx else "SGX"

    @property
    def report_data(self) -> bytes:
        return self.quote.body.report_data

    @property
    def debug(self) -> bool:
        return self.quote.body.debug

    @property
    def measurements(self) -> dict[str, str]:
        """The identity of the enclave or TD, hex-encoded."""
        body = self.quote.body
        if isinstance(body, EnclaveReport):
            return {
                "mr_enclave": body.mr_enclave.hex(),
                "mr_signer": body.mr_signer.hex(),
                "isv_prod_id": str(body.isv_prod_id),
                "isv_svn": str(body.isv_svn),
                "attributes": body.attributes.hex(),
                "report_data": body.report_data.hex(),
            }
        out = {
            name: getattr(body, name).hex()
            for name in (
                "mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_seam", "mr_config_id",
                "mr_owner", "mr_owner_config", "td_attributes", "xfam", "report_data",
            )
        }  # fmt: skip
        if body.mr_service_td is not None:
            out["mr_service_td"] = body.mr_service_td.hex()
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "tee": self.tee,
            "quote_version": self.quote.header.version,
            "tcb_status": str(self.tcb_status),
            "advisory_ids": list(self.advisory_ids),
            "platform_tcb_status": str(self.platform_tcb_status),
            "qe_tcb_status": str(self.qe_tcb_status),
            "tdx_module_tcb_status": (
                None if self.tdx_module_tcb_status is None else str(self.tdx_module_tcb_status)
            ),
            "tcb_date": self.tcb_date,
            "fmspc": self.pck.fmspc.hex().upper(),
            "pce_id": self.pck.pce_id.hex(),
            "debug": self.debug,
            "measurements": self.measurements,
            "valid_until": self.valid_until.isoformat(),
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
        }


def verify_quote(
    quote: bytes,
    collateral: Collateral,
    *,
    now: datetime,
    root_ca_pem: bytes | None = None,
    allow_debug: bool = False,
    accepted_statuses: Collection[TcbStatus] | None = None,
) -> VerificationReport:
    """Verify a DCAP quote offline; raises `VerificationError` naming the failed step.

    `now` must be timezone-aware. `root_ca_pem` replaces the pinned Intel SGX Root CA
    (for tests with a test PKI). Debug enclaves/TDs fail unless `allow_debug`.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    v = Verification(quote, collateral, now, root_ca_pem, allow_debug, accepted_statuses)
    v.run()
    module = v.module_level
    return VerificationReport(
        checks=v.checks.results,
        quote=v.quote,
        pck=v.pck,
        tcb_status=v.final_status,
        advisory_ids=merge_advisories(
            v.platform.level.advisory_ids,
            module.advisory_ids if module else (),
            v.qe_level.advisory_ids,
        ),
        platform_tcb_status=v.platform_status,
        qe_tcb_status=v.qe_level.status,
        tdx_module_tcb_status=(
            None if not v.quote.is_tdx else module.status if module else TcbStatus.UP_TO_DATE
        ),
        tcb_date=min(v.platform.level.tcb_date, v.qe_level.tcb_date),
        valid_until=v.valid_until,
    )
