"""A flipped byte anywhere that matters fails verification, naming the step."""

from __future__ import annotations

import base64
import re

import pytest
from dcap_testlib import VECTORS, body_offsets, load_vector, now_inside

from csml.attestation.dcap import Collateral, VerificationError, parse_quote, verify_quote

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\n(.+?)\n-----END CERTIFICATE-----", re.DOTALL)


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def _flip_hex(text: str, at: int) -> str:
    return text[:at] + ("1" if text[at] == "0" else "0") + text[at + 1 :]


def _flip_text(text: str, at: int) -> str:
    return text[:at] + chr(ord(text[at]) ^ 0x01) + text[at + 1 :]


def _failed_check(name: str, quote: bytes | None = None, **collateral: str) -> VerificationError:
    raw, col = load_vector(name)
    now = now_inside(col)
    col.update(collateral)
    with pytest.raises(VerificationError) as e:
        verify_quote(raw if quote is None else quote, Collateral.from_json(col), now=now)
    assert e.value.checks[-1].name == e.value.check and not e.value.checks[-1].ok
    assert all(c.ok for c in e.value.checks[:-1])
    return e.value


def _quote_with_cert_flipped(raw: bytes, index: int) -> bytes:
    """Flip a byte in the middle of the DER of the index-th PEM certificate in the quote."""
    match = list(_PEM.finditer(raw))[index]
    body = match.group(1)
    der = base64.b64decode(body)
    der = _flip(der, len(der) // 2)
    b64 = base64.b64encode(der)
    lines = b"\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
    assert len(lines) == len(body)  # same length: the size fields of the quote stay right
    return raw[: match.start(1)] + lines + raw[match.end(1) :]


@pytest.mark.parametrize("name", VECTORS)
class TestQuoteTampering:
    def test_header(self, name: str) -> None:
        raw, _ = load_vector(name)
        err = _failed_check(name, _flip(raw, 28 + 5))  # a byte of the header's user data
        assert err.check == "quote_signature"
        assert "quote signature" in str(err) and "attestation key" in str(err)

    def test_body(self, name: str) -> None:
        raw, _ = load_vector(name)
        off, size = body_offsets(raw)
        assert _failed_check(name, _flip(raw, off + 70)).check == "quote_signature"
        assert _failed_check(name, _flip(raw, off + size - 1)).check == "quote_signature"

    def test_quote_signature(self, name: str) -> None:
        raw, _ = load_vector(name)
        at = raw.index(parse_quote(raw).signature) + 10
        assert _failed_check(name, _flip(raw, at)).check == "quote_signature"

    def test_attestation_key(self, name: str) -> None:
        raw, _ = load_vector(name)
        at = raw.index(parse_quote(raw).attestation_key) + 40
        err = _failed_check(name, _flip(raw, at))
        assert err.check == "qe_report_data"
        assert "SHA-256(attestation key || QE auth data)" in str(err)

    def test_qe_report(self, name: str) -> None:
        raw, _ = load_vector(name)
        at = raw.index(parse_quote(raw).qe.qe_report.raw) + 130  # inside its MRSIGNER
        err = _failed_check(name, _flip(raw, at))
        assert err.check == "qe_report_signature"
        assert "PCK certificate" in str(err)

    def test_qe_report_signature(self, name: str) -> None:
        raw, _ = load_vector(name)
        at = raw.index(parse_quote(raw).qe.qe_report_signature) + 50
        assert _failed_check(name, _flip(raw, at)).check == "qe_report_signature"

    def test_qe_auth_data(self, name: str) -> None:
        raw, _ = load_vector(name)
        at = raw.index(parse_quote(raw).qe.qe_auth_data) + 3
        assert _failed_check(name, _flip(raw, at)).check == "qe_report_data"

    @pytest.mark.parametrize("index", [0, 1])
    def test_pck_certificate(self, name: str, index: int) -> None:
        raw, _ = load_vector(name)
        err = _failed_check(name, _quote_with_cert_flipped(raw, index))
        assert err.check == "pck_cert_chain"
        assert "PCK certificate chain" in str(err)

    def test_root_certificate_in_quote(self, name: str) -> None:
        raw, _ = load_vector(name)
        assert _failed_check(name, _quote_with_cert_flipped(raw, 2)).check == "root_ca"

    def test_truncated(self, name: str) -> None:
        raw, _ = load_vector(name)
        err = _failed_check(name, raw[:600])
        assert err.check == "quote_format" and "truncated" in str(err)


@pytest.mark.parametrize("name", VECTORS)
class TestCollateralTampering:
    def test_tcb_info(self, name: str) -> None:
        _, col = load_vector(name)
        text = col["tcb_info"]
        at = text.index('"pcesvn":') + len('"pcesvn":')  # a digit of the first level's PCESVN
        err = _failed_check(name, tcb_info=_flip_text(text, at))
        assert err.check == "tcb_info_signature"
        assert "TCB info signature does not verify" in str(err)

    def test_tcb_info_signature(self, name: str) -> None:
        _, col = load_vector(name)
        err = _failed_check(name, tcb_info_signature=_flip_hex(col["tcb_info_signature"], 70))
        assert err.check == "tcb_info_signature"

    def test_qe_identity(self, name: str) -> None:
        _, col = load_vector(name)
        text = col["qe_identity"]
        at = text.index('"isvsvn":') + len('"isvsvn":')
        err = _failed_check(name, qe_identity=_flip_text(text, at))
        assert err.check == "qe_identity_signature"
        assert "QE identity signature does not verify" in str(err)

    def test_qe_identity_signature(self, name: str) -> None:
        _, col = load_vector(name)
        err = _failed_check(name, qe_identity_signature=_flip_hex(col["qe_identity_signature"], 3))
        assert err.check == "qe_identity_signature"

    def test_pck_crl(self, name: str) -> None:
        _, col = load_vector(name)
        crl = col["pck_crl"]
        err = _failed_check(name, pck_crl=_flip_hex(crl, len(crl) - 20))  # in the signature
        assert err.check == "pck_crl"

    def test_root_ca_crl(self, name: str) -> None:
        _, col = load_vector(name)
        crl = col["root_ca_crl"]
        err = _failed_check(name, root_ca_crl=_flip_hex(crl, len(crl) - 20))
        assert err.check == "root_ca_crl"


@pytest.mark.parametrize("name", VECTORS)
def test_sampled_flips_fail_with_a_named_check(name: str) -> None:
    """Every authenticated byte matters; elsewhere (PEM layout, padding) errors stay named."""
    raw, col = load_vector(name)
    collateral, now = Collateral.from_json(col), now_inside(col)
    pem_start = raw.index(b"-----BEGIN CERTIFICATE-----")
    for at in range(0, len(raw), 53):
        try:
            verify_quote(_flip(raw, at), collateral, now=now)
        except VerificationError as e:
            assert e.check in e.checks[-1].name
        else:
            assert at >= pem_start, f"flipping byte {at} went unnoticed"
