"""Verifiers for `sgx-dcap` and `tdx-dcap` evidence: DCAP, then the client's policy.

DCAP verification (`dcap.verify_quote`) proves the quote comes from a genuine, non-revoked
Intel platform under the pinned root (or the policy's root CA) with valid collateral. Its
steps are reported as `dcap.<step>`. Then every policy check runs and is reported, so a
refusal shows all that is wrong at once: `tee`, `report_data` (the worker's key and app),
`tcb_status`, `debug`, and the measurements (`mrenclave`, `mrsigner`, `isv_svn`,
`isv_prod_id` for SGX; `mrtd`, `rtmr0`..`rtmr3` for TDX).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from csml.attestation.dcap import (
    Collateral,
    CollateralFormatError,
    EnclaveReport,
    TdReport,
    VerificationError,
    VerificationReport,
    verify_quote,
)
from csml.attestation.evidence import Assessment, Check

if TYPE_CHECKING:
    from csml.attestation.policy import Policy


def _one_of(values: tuple[str, ...]) -> str:
    return values[0] if len(values) == 1 else "one of " + ", ".join(values)


def _match(name: str, actual: bytes, accepted: tuple[str, ...]) -> Check:
    value = actual.hex()
    ok = value in accepted
    return Check(
        name,
        ok,
        f"{name.upper()} {'matches' if ok else 'does not match'} the policy",
        expected=_one_of(accepted),
        actual=value,
    )


class _DcapVerifier:
    kind = ""
    tee = ""
    insecure = False

    def verify(
        self,
        evidence: bytes,
        collateral: Mapping[str, Any] | None,
        policy: Policy,
        expected_report_data: bytes,
        now: datetime,
    ) -> Assessment:
        source = "the policy" if policy.collateral is not None else "the worker"
        data = policy.collateral if policy.collateral is not None else collateral
        if data is None:
            return self._fail(
                Check(
                    "collateral",
                    False,
                    "no collateral to verify the quote with: the worker sent none and the "
                    "policy names none (`collateral = FILE`)",
                    expected="DCAP collateral (PCK CRLs, TCB info, QE identity)",
                    actual="none",
                )
            )
        try:
            col = Collateral.from_json(data)
        except CollateralFormatError as exc:
            return self._fail(Check("collateral", False, f"from {source}: {exc}"))
        checks = [Check("collateral", True, f"from {source}")]
        try:
            report = verify_quote(
                evidence,
                col,
                now=now,
                root_ca_pem=policy.root_ca_pem,
                allow_debug=True,  # judged below, with the policy's expected value
                accepted_statuses=None,  # likewise
            )
        except VerificationError as exc:
            checks += [Check(f"dcap.{c.name}", c.ok, c.detail) for c in exc.checks]
            if not exc.checks or exc.checks[-1].ok:
                checks.append(Check(f"dcap.{exc.check}", False, exc.detail))
            return Assessment(self.kind, tuple(checks))
        for c in report.checks:
            detail = c.detail
            if c.name == "debug":  # DCAP ran with debug allowed: the policy judges it below
                detail = "left to the policy (see debug)"
            checks.append(Check(f"dcap.{c.name}", c.ok, detail))
        checks += self._policy_checks(report, policy, expected_report_data)
        return Assessment(self.kind, tuple(checks), measurements=report.measurements)

    def _fail(self, check: Check) -> Assessment:
        return Assessment(self.kind, (check,))

    def _policy_checks(
        self, report: VerificationReport, policy: Policy, expected: bytes
    ) -> list[Check]:
        checks = [
            Check(
                "tee",
                report.tee == self.tee,
                f"a {report.tee} quote",
                expected=self.tee,
                actual=report.tee,
            ),
            Check(
                "report_data",
                report.report_data == expected,
                "binds this worker's public key and app"
                if report.report_data == expected
                else "the quote does not vouch for this worker's public key and app",
                expected=expected.hex(),
                actual=report.report_data.hex(),
            ),
        ]
        status = str(report.tcb_status)
        advisories = (
            f" (advisories: {', '.join(report.advisory_ids)})" if report.advisory_ids else ""
        )
        checks.append(
            Check(
                "tcb_status",
                status in policy.tcb_statuses,
                f"platform TCB status {status}{advisories}",
                expected=_one_of(policy.tcb_statuses),
                actual=status,
            )
        )
        checks.append(
            Check(
                "debug",
                policy.allow_debug or not report.debug,
                "a debug enclave/TD can be read by the host" if report.debug else "not debug",
                expected="debug allowed" if policy.allow_debug else "not debug",
                actual="debug" if report.debug else "not debug",
            )
        )
        checks += self._measurements(report, policy)
        return checks

    def _measurements(self, report: VerificationReport, policy: Policy) -> list[Check]:
        raise NotImplementedError


class SgxDcapVerifier(_DcapVerifier):
    kind = "sgx-dcap"
    tee = "SGX"

    def _measurements(self, report: VerificationReport, policy: Policy) -> list[Check]:
        body = report.quote.body
        if not isinstance(body, EnclaveReport):
            return []
        checks: list[Check] = []
        if not policy.mrenclave and not policy.mrsigner:
            checks.append(
                Check(
                    "measurements",
                    False,
                    f"the policy ({policy.source}) names no MRENCLAVE or MRSIGNER: any enclave "
                    "would pass",
                    expected="mrenclave or mrsigner in the policy",
                    actual=f"mrenclave {body.mr_enclave.hex()}, mrsigner {body.mr_signer.hex()}",
                )
            )
        if policy.mrenclave:
            checks.append(_match("mrenclave", body.mr_enclave, policy.mrenclave))
        if policy.mrsigner:
            checks.append(_match("mrsigner", body.mr_signer, policy.mrsigner))
        if policy.min_isv_svn is not None:
            checks.append(
                Check(
                    "isv_svn",
                    body.isv_svn >= policy.min_isv_svn,
                    "enclave security version",
                    expected=f">= {policy.min_isv_svn}",
                    actual=str(body.isv_svn),
                )
            )
        if policy.isv_prod_id is not None:
            checks.append(
                Check(
                    "isv_prod_id",
                    body.isv_prod_id == policy.isv_prod_id,
                    "enclave product id",
                    expected=str(policy.isv_prod_id),
                    actual=str(body.isv_prod_id),
                )
            )
        return checks


class TdxDcapVerifier(_DcapVerifier):
    kind = "tdx-dcap"
    tee = "TDX"

    def _measurements(self, report: VerificationReport, policy: Policy) -> list[Check]:
        body = report.quote.body
        if not isinstance(body, TdReport):
            return []
        checks: list[Check] = []
        if not policy.mrtd:
            checks.append(
                Check(
                    "measurements",
                    False,
                    f"the policy ({policy.source}) names no MRTD: any TD would pass",
                    expected="mrtd in the policy",
                    actual=f"mrtd {body.mr_td.hex()}",
                )
            )
        else:
            checks.append(_match("mrtd", body.mr_td, policy.mrtd))
        for i, value in enumerate((body.rtmr0, body.rtmr1, body.rtmr2, body.rtmr3)):
            if policy.rtmr(i):
                checks.append(_match(f"rtmr{i}", value, policy.rtmr(i)))
        return checks
