"""DCAP verification of synthetic quotes under a test PKI: TCB rules, revocation, policy."""

from __future__ import annotations

from collections.abc import Collection
from datetime import timedelta
from typing import Any

import pytest
from dcap_factory import (
    NOW,
    QuoteSpec,
    TestPki,
    build_collateral,
    build_quote,
    default_qe_identity,
    default_tcb_info,
    identity_level,
    pck_serial,
)
from dcap_testlib import expected_tcb

from csml.attestation.dcap import (
    Collateral,
    TcbStatus,
    VerificationError,
    VerificationReport,
    verify_quote,
)

SHAPES = {
    "sgx-v3": QuoteSpec(version=3, tee="SGX"),
    "tdx-v4": QuoteSpec(version=4, tee="TDX"),
    "tdx-v5-td10": QuoteSpec(version=5, tee="TDX"),
    "tdx-v5-td15": QuoteSpec(version=5, tee="TDX", td15=True),
    "sgx-v5": QuoteSpec(version=5, tee="SGX"),
}


@pytest.fixture(scope="module")
def pki() -> TestPki:
    return TestPki.create()


def _verify(
    pki: TestPki,
    spec: QuoteSpec,
    *,
    allow_debug: bool = False,
    accepted: Collection[TcbStatus] | None = None,
    **collateral: Any,
) -> VerificationReport:
    quote = build_quote(spec, pki)
    col = build_collateral(pki, spec, **collateral)
    return verify_quote(
        quote,
        Collateral.from_json(col),
        now=NOW,
        root_ca_pem=pki.root_pem,
        allow_debug=allow_debug,
        accepted_statuses=accepted,
    )


def _failure(pki: TestPki, spec: QuoteSpec, **kw: Any) -> VerificationError:
    with pytest.raises(VerificationError) as e:
        _verify(pki, spec, **kw)
    return e.value


@pytest.mark.parametrize("shape", SHAPES)
def test_every_quote_shape_verifies_under_the_test_root(pki: TestPki, shape: str) -> None:
    spec = SHAPES[shape]
    report = _verify(pki, spec)
    assert report.tcb_status == TcbStatus.UP_TO_DATE and report.advisory_ids == ()
    assert report.quote.header.version == spec.version and report.tee == spec.tee
    assert report.report_data == spec.report_data
    if spec.td15:
        assert report.quote.td.tee_tcb_svn2 == spec.tee_tcb_svn2


@pytest.mark.parametrize("shape", ["sgx-v3", "tdx-v4"])
def test_test_pki_fails_against_the_pinned_intel_root(pki: TestPki, shape: str) -> None:
    spec = SHAPES[shape]
    quote, col = build_quote(spec, pki), build_collateral(pki, spec)
    with pytest.raises(VerificationError) as e:
        verify_quote(quote, Collateral.from_json(col), now=NOW)
    assert e.value.check == "root_ca" and "Test SGX Root CA" in str(e.value)


CASES: dict[str, dict[str, Any]] = {
    "sw-hardening": {"pce_svn": 11},
    "out-of-date": {"pce_svn": 11, "components": [4, 4, 2, 2, 3, 1, 0, 5] + [0] * 8},
    "qe-out-of-date": {"pce_svn": 11, "qe_isv_svn": 7},
    "qe-out-of-date-platform-ok": {"qe_isv_svn": 6},
    "higher-than-every-level": {"pce_svn": 20, "components": [9] * 16},
}


@pytest.mark.parametrize("shape", ["sgx-v3", "tdx-v4", "tdx-v5-td10"])
@pytest.mark.parametrize("case", CASES)
def test_tcb_status_matches_independent_computation(pki: TestPki, shape: str, case: str) -> None:
    base = SHAPES[shape]
    spec = QuoteSpec(version=base.version, tee=base.tee, **CASES[case])
    quote = build_quote(spec, pki)
    col = build_collateral(pki, spec)
    report = verify_quote(quote, Collateral.from_json(col), now=NOW, root_ca_pem=pki.root_pem)
    status, advisories = expected_tcb(quote, col)
    assert (report.tcb_status, list(report.advisory_ids)) == (status, advisories)


def test_qe_out_of_date_degrades_sw_hardening(pki: TestPki) -> None:
    report = _verify(pki, QuoteSpec(pce_svn=11, qe_isv_svn=6))
    assert report.platform_tcb_status == TcbStatus.SW_HARDENING_NEEDED
    assert report.qe_tcb_status == TcbStatus.OUT_OF_DATE
    assert report.tcb_status == TcbStatus.OUT_OF_DATE
    assert report.advisory_ids == ("INTEL-SA-00001", "INTEL-SA-00615")


def test_platform_below_every_level_is_not_supported(pki: TestPki) -> None:
    err = _failure(pki, QuoteSpec(components=[1] * 16))
    assert err.check == "tcb_level" and "TCB not supported" in str(err)
    assert "SGX component #1: 1 < 4" in str(err)


def test_qe_below_every_level_is_not_supported(pki: TestPki) -> None:
    err = _failure(pki, QuoteSpec(qe_isv_svn=5))
    assert err.check == "qe_tcb" and "ISVSVN 5" in str(err)


def test_revoked_tcb_level_fails(pki: TestPki) -> None:
    spec = QuoteSpec()
    info = default_tcb_info(spec)
    info["tcbLevels"][0]["tcbStatus"] = "Revoked"
    err = _failure(pki, spec, tcb_info=info)
    assert err.check == "tcb_status" and "Revoked" in str(err)


def test_revoked_qe_level_fails(pki: TestPki) -> None:
    spec = QuoteSpec(tee="TDX", version=4)
    qe = default_qe_identity(spec)
    qe["tcbLevels"][0] = identity_level(8, "Revoked")
    assert _failure(pki, spec, qe_identity=qe).check == "tcb_status"


def test_out_of_date_tdx_module(pki: TestPki) -> None:
    spec = QuoteSpec(tee="TDX", version=4, tee_tcb_svn=bytes([3, 1, 3]) + bytes(13))
    report = _verify(pki, spec)
    assert report.tdx_module_tcb_status == TcbStatus.OUT_OF_DATE
    assert report.tcb_status == TcbStatus.OUT_OF_DATE
    assert report.advisory_ids == ("INTEL-SA-00003",)


def test_td15_relaunch_advised_after_td_preserving_update(pki: TestPki) -> None:
    old, new = bytes([3, 1, 3]) + bytes(13), bytes([4, 1, 3]) + bytes(13)
    spec = QuoteSpec(tee="TDX", version=5, td15=True, tee_tcb_svn=old, tee_tcb_svn2=new)
    assert _verify(pki, spec).tcb_status == TcbStatus.TD_RELAUNCH_ADVISED
    spec = QuoteSpec(tee="TDX", version=5, td15=True, tee_tcb_svn=old, tee_tcb_svn2=old)
    assert _verify(pki, spec).tcb_status == TcbStatus.OUT_OF_DATE


def test_unknown_tdx_module_major_version(pki: TestPki) -> None:
    err = _failure(pki, QuoteSpec(tee="TDX", version=4, tee_tcb_svn=bytes([4, 2, 3]) + bytes(13)))
    assert err.check == "tdx_module" and "TDX_02" in str(err) and "TDX_01" in str(err)


def test_tdx_module_without_major_version_uses_all_components(pki: TestPki) -> None:
    report = _verify(pki, QuoteSpec(tee="TDX", version=4, tee_tcb_svn=bytes([4, 0, 3]) + bytes(13)))
    assert report.tcb_status == TcbStatus.UP_TO_DATE
    assert report.tdx_module_tcb_status == TcbStatus.UP_TO_DATE
    low = bytes([3, 0, 3]) + bytes(13)  # below the module SVN 4 of every TDX level
    err = _failure(pki, QuoteSpec(tee="TDX", version=4, tee_tcb_svn=low))
    assert err.check == "tcb_level" and "TDX component #1: 3 < 4" in str(err)


@pytest.mark.parametrize("shape", ["sgx-v3", "tdx-v4"])
def test_debug_is_refused_unless_allowed(pki: TestPki, shape: str) -> None:
    base = SHAPES[shape]
    spec = QuoteSpec(version=base.version, tee=base.tee, debug=True)
    err = _failure(pki, spec)
    assert err.check == "debug" and "DEBUG" in str(err)
    report = _verify(pki, spec, allow_debug=True)
    assert report.debug and report.to_dict()["debug"] is True


def test_revoked_pck_certificate(pki: TestPki) -> None:
    spec = QuoteSpec()
    quote = build_quote(spec, pki)
    col = build_collateral(pki, spec, revoked_pck_serials=[pck_serial(quote)])
    with pytest.raises(VerificationError) as e:
        verify_quote(quote, Collateral.from_json(col), now=NOW, root_ca_pem=pki.root_pem)
    assert e.value.check == "pck_crl" and "is revoked" in str(e.value)


def test_revoked_pck_ca(pki: TestPki) -> None:
    err = _failure(pki, QuoteSpec(), revoke_pck_ca=True)
    assert err.check == "root_ca_crl" and "Test SGX PCK Platform CA" in str(err)


def test_expired_pck_certificate(pki: TestPki) -> None:
    err = _failure(pki, QuoteSpec(pck_not_after=NOW - timedelta(days=1)))
    assert err.check == "collateral_validity" and "collateral expired" in str(err)
    assert "Test SGX PCK Certificate" in str(err)


def test_accepted_statuses(pki: TestPki) -> None:
    spec = QuoteSpec(pce_svn=11)
    err = _failure(pki, spec, accepted=[TcbStatus.UP_TO_DATE])
    assert err.check == "tcb_status" and "SWHardeningNeeded is not accepted" in str(err)
    assert _verify(pki, spec, accepted=list(TcbStatus)).tcb_status == "SWHardeningNeeded"


def test_fmspc_mismatch(pki: TestPki) -> None:
    spec = QuoteSpec()
    info = default_tcb_info(spec)
    info["fmspc"] = "00A067110000"
    err = _failure(pki, spec, tcb_info=info)
    assert err.check == "tcb_info_match"
    assert "00A067110000" in str(err) and "00906ED50000" in str(err)


def test_qe_identity_mismatch(pki: TestPki) -> None:
    err = _failure(pki, QuoteSpec(qe_mrsigner=bytes(32)))
    assert err.check == "qe_identity_match" and "MRSIGNER" in str(err)
