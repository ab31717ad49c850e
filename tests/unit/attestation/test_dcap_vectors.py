"""DCAP verification of the public sample quotes (Phala-Network/dcap-qvl samples)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from importlib import resources

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from dcap_testlib import (
    VECTORS,
    body_offsets,
    expected_tcb,
    load_vector,
    now_inside,
    pck_tcb,
    qe_document,
    tcb_document,
)

from csml.attestation.dcap import (
    INTEL_SGX_ROOT_CA_SHA256,
    Collateral,
    CollateralFormatError,
    TcbStatus,
    VerificationError,
    VerificationReport,
    parse_quote,
    verify_quote,
)

VERIFYING = ("sgx_quote", "tdx_quote")
STEPS = (
    "quote_format",
    "root_ca",
    "pck_cert_chain",
    "tcb_info_signature",
    "qe_identity_signature",
    "root_ca_crl",
    "pck_crl",
    "collateral_validity",
    "tcb_info_match",
    "qe_report_signature",
    "qe_report_data",
    "qe_identity_match",
    "quote_signature",
    "tcb_level",
    "qe_tcb",
    "tcb_status",
    "debug",
)


def _verify(name: str, root_ca_pem: bytes | None = None) -> VerificationReport:
    quote, col = load_vector(name)
    return verify_quote(
        quote, Collateral.from_json(col), now=now_inside(col), root_ca_pem=root_ca_pem
    )


@pytest.mark.parametrize("name", VERIFYING)
def test_vector_verifies_to_the_status_computed_from_its_tcb_info(name: str) -> None:
    quote, col = load_vector(name)
    report = verify_quote(quote, Collateral.from_json(col), now=now_inside(col))
    status, advisories = expected_tcb(quote, col)
    assert status is not None
    assert report.tcb_status == status
    assert list(report.advisory_ids) == advisories
    assert all(c.ok for c in report.checks)
    names = [c.name for c in report.checks]
    assert set(STEPS) <= set(names)
    assert report.pck.fmspc.hex().upper() == tcb_document(col)["fmspc"]
    assert report.to_dict()["tcb_status"] == status


def test_sgx_vector_fields() -> None:
    quote, col = load_vector("sgx_quote")
    report = verify_quote(quote, Collateral.from_json(col), now=now_inside(col))
    q = report.quote
    assert report.tee == "SGX" and q.header.version == 3
    enclave = q.enclave
    off, _ = body_offsets(quote)
    assert enclave.mr_enclave == quote[off + 64 : off + 96]
    assert enclave.mr_signer == quote[off + 128 : off + 160]
    assert report.report_data == quote[off + 320 : off + 384]
    assert report.measurements["mr_enclave"] == enclave.mr_enclave.hex()
    assert not report.debug
    comps, pcesvn = pck_tcb(quote)
    assert list(report.pck.tcb_components) == comps and report.pck.pce_svn == pcesvn
    assert report.pck.cpu_svn == bytes(comps)
    assert q.qe.qe_report.mr_signer.hex().upper() == qe_document(col)["mrsigner"]


def test_tdx_vector_fields() -> None:
    quote, col = load_vector("tdx_quote")
    report = verify_quote(quote, Collateral.from_json(col), now=now_inside(col))
    td = report.quote.td
    assert report.tee == "TDX" and report.quote.header.version == 4
    assert td.mr_td == quote[48 + 136 : 48 + 184]
    assert td.rtmr3 == quote[48 + 472 : 48 + 520]
    assert td.report_data == quote[48 + 520 : 48 + 584]
    assert td.tee_tcb_svn2 is None
    assert set(report.measurements) >= {"mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_seam"}
    assert report.tdx_module_tcb_status == TcbStatus.UP_TO_DATE
    assert not report.debug


def test_outdated_vector_has_no_matching_tcb_level() -> None:
    """Its PCK TCB is below every TCB level: Intel's QVL says 'TCB not supported'."""
    quote, col = load_vector("tdx_quote_outdated")
    status, _ = expected_tcb(quote, col)
    assert status is None  # the independent computation finds no level either
    with pytest.raises(VerificationError) as e:
        verify_quote(quote, Collateral.from_json(col), now=now_inside(col))
    assert e.value.check == "tcb_level"
    assert "TCB not supported" in str(e.value)
    assert all(c.ok for c in e.value.checks[:-1])
    assert "quote_signature" in [c.name for c in e.value.checks]
    parsed = parse_quote(quote)
    assert parsed.header.version == 5 and parsed.body_type == 3
    assert parsed.td.tee_tcb_svn2 is not None and parsed.td.mr_service_td == bytes(48)


# -- the pinned root ------------------------------------------------------------------------


def test_shipped_root_matches_pin_and_vectors() -> None:
    pem = resources.files("csml.attestation").joinpath("intel_sgx_root_ca.pem").read_bytes()
    root = x509.load_pem_x509_certificate(pem)
    assert hashlib.sha256(root.public_bytes(serialization.Encoding.DER)).hexdigest() == (
        INTEL_SGX_ROOT_CA_SHA256
    )
    for name in VECTORS:
        _, col = load_vector(name)
        assert x509.load_pem_x509_certificates(col["tcb_info_issuer_chain"].encode())[-1] == root


def test_explicit_intel_root_is_accepted() -> None:
    pem = resources.files("csml.attestation").joinpath("intel_sgx_root_ca.pem").read_bytes()
    _verify("tdx_quote", root_ca_pem=pem)


def test_wrong_root_fails_the_root_check(other_root_pem: bytes) -> None:
    with pytest.raises(VerificationError) as e:
        _verify("sgx_quote", root_ca_pem=other_root_pem)
    assert e.value.check == "root_ca"
    assert "not the trusted root" in str(e.value) and "root_ca" in str(e.value)


# -- the clock ------------------------------------------------------------------------------


def _fail(name: str, now: datetime) -> VerificationError:
    quote, col = load_vector(name)
    with pytest.raises(VerificationError) as e:
        verify_quote(quote, Collateral.from_json(col), now=now)
    return e.value


@pytest.mark.parametrize("name", VECTORS)
def test_after_tcb_info_next_update_is_expired(name: str) -> None:
    next_update = datetime.fromisoformat(tcb_document(load_vector(name)[1])["nextUpdate"])
    err = _fail(name, next_update + timedelta(seconds=1))
    assert err.check == "collateral_validity"
    assert "collateral expired" in str(err)
    assert f"TCB info expired at {next_update:%Y-%m-%dT%H:%M:%SZ}" in str(err)


def test_expiry_names_only_what_expired() -> None:
    _, col = load_vector("sgx_quote")
    qe_end = datetime.fromisoformat(qe_document(col)["nextUpdate"])
    assert qe_end < datetime.fromisoformat(tcb_document(col)["nextUpdate"])
    err = _fail("sgx_quote", qe_end)  # nextUpdate itself is already too late
    assert "QE identity expired" in str(err) and "TCB info" not in str(err)


@pytest.mark.parametrize("name", VECTORS)
def test_before_issue_date_is_not_yet_valid(name: str) -> None:
    issued = datetime.fromisoformat(tcb_document(load_vector(name)[1])["issueDate"])
    err = _fail(name, issued - timedelta(seconds=1))
    assert err.check == "collateral_validity"
    assert "collateral not yet valid" in str(err)
    assert f"TCB info is valid from {issued:%Y-%m-%dT%H:%M:%SZ}" in str(err)


def test_naive_clock_is_refused() -> None:
    quote, col = load_vector("sgx_quote")
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_quote(quote, Collateral.from_json(col), now=datetime(2025, 7, 1))


def test_clock_far_future_names_expired_certificates() -> None:
    err = _fail("tdx_quote", datetime(2060, 1, 1, tzinfo=UTC))
    assert "certificate 'C=US,ST=CA,L=Santa Clara,O=Intel Corporation,CN=Intel SGX Root CA'" in str(
        err
    )


# -- mixed-up collateral --------------------------------------------------------------------


def test_collateral_missing_field() -> None:
    _, col = load_vector("sgx_quote")
    del col["pck_crl"]
    with pytest.raises(CollateralFormatError, match="pck_crl"):
        Collateral.from_json(col)


def test_tcb_info_of_other_tee_is_refused() -> None:
    quote, col = load_vector("tdx_quote")
    _, sgx = load_vector("sgx_quote")
    for key in ("tcb_info", "tcb_info_signature", "tcb_info_issuer_chain"):
        col[key] = sgx[key]
    with pytest.raises(VerificationError) as e:
        verify_quote(quote, Collateral.from_json(col), now=now_inside(col))
    assert e.value.check == "tcb_info_match"
    assert "'SGX'" in str(e.value) and "TDX" in str(e.value)


def test_pck_crl_of_other_ca_is_refused() -> None:
    quote, col = load_vector("tdx_quote")
    _, sgx = load_vector("sgx_quote")
    for key in ("pck_crl", "pck_crl_issuer_chain"):
        col[key] = sgx[key]
    with pytest.raises(VerificationError) as e:
        verify_quote(quote, Collateral.from_json(col), now=now_inside(col))
    assert e.value.check == "pck_crl"
    assert "PCK Processor CA" in str(e.value) and "PCK Platform CA" in str(e.value)


def test_pem_crls_are_accepted() -> None:
    quote, col = load_vector("tdx_quote")
    now = now_inside(col)
    for key in ("root_ca_crl", "pck_crl"):
        crl = x509.load_der_x509_crl(bytes.fromhex(col[key]))
        col[key] = crl.public_bytes(serialization.Encoding.PEM).decode()
    report = verify_quote(quote, Collateral.from_json(col), now=now)
    assert report.tcb_status == TcbStatus.UP_TO_DATE
