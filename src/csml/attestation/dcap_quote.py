"""Parsing of Intel DCAP quotes: SGX v3, TDX v4 and v5 (ECDSA-256, P-256)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

TEE_SGX = 0x00000000
TEE_TDX = 0x00000081
ATT_KEY_ECDSA_P256 = 2
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")

BODY_SGX = 1
BODY_TD10 = 2
BODY_TD15 = 3
HEADER_LEN = 48
SGX_REPORT_LEN = 384
TD10_REPORT_LEN = 584
TD15_REPORT_LEN = 648

CERT_PCK_CHAIN = 5
CERT_QE_REPORT = 6


class QuoteParseError(ValueError):
    """The quote bytes are not a well-formed DCAP quote."""


class _Reader:
    def __init__(self, data: bytes, offset: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = offset
        self.end = len(data) if end is None else end

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise QuoteParseError(
                f"quote truncated reading {what}: need {n} bytes at offset {self.pos}, "
                f"{self.end - self.pos} left"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "little")

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "little")


@dataclass(frozen=True)
class QuoteHeader:
    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes


@dataclass(frozen=True)
class EnclaveReport:
    """An SGX report body (the ISV enclave's, or the QE's)."""

    raw: bytes
    cpu_svn: bytes
    misc_select: bytes
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes

    @property
    def debug(self) -> bool:
        """ATTRIBUTES.DEBUG (bit 1)."""
        return bool(self.attributes[0] & 0x02)

    @classmethod
    def parse(cls, raw: bytes) -> EnclaveReport:
        if len(raw) != SGX_REPORT_LEN:
            raise QuoteParseError(f"SGX report is {len(raw)} bytes, expected {SGX_REPORT_LEN}")
        prod, svn = struct.unpack_from("<HH", raw, 256)
        return cls(
            raw=raw,
            cpu_svn=raw[0:16],
            misc_select=raw[16:20],
            attributes=raw[48:64],
            mr_enclave=raw[64:96],
            mr_signer=raw[128:160],
            isv_prod_id=prod,
            isv_svn=svn,
            report_data=raw[320:384],
        )


@dataclass(frozen=True)
class TdReport:
    """A TD report body: TDX 1.0 (584 bytes) or TDX 1.5 (648 bytes)."""

    raw: bytes
    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    report_data: bytes
    tee_tcb_svn2: bytes | None
    mr_service_td: bytes | None

    @property
    def debug(self) -> bool:
        """TD_ATTRIBUTES.TUD.DEBUG (bit 0)."""
        return bool(self.td_attributes[0] & 0x01)

    @classmethod
    def parse(cls, raw: bytes) -> TdReport:
        if len(raw) not in (TD10_REPORT_LEN, TD15_REPORT_LEN):
            raise QuoteParseError(f"TD report is {len(raw)} bytes, expected 584 or 648")
        f = [raw[a:b] for a, b in _TD_FIELDS]
        td15 = len(raw) == TD15_REPORT_LEN
        return cls(
            raw=raw,
            tee_tcb_svn=f[0],
            mr_seam=f[1],
            mr_signer_seam=f[2],
            seam_attributes=f[3],
            td_attributes=f[4],
            xfam=f[5],
            mr_td=f[6],
            mr_config_id=f[7],
            mr_owner=f[8],
            mr_owner_config=f[9],
            rtmr0=f[10],
            rtmr1=f[11],
            rtmr2=f[12],
            rtmr3=f[13],
            report_data=f[14],
            tee_tcb_svn2=raw[584:600] if td15 else None,
            mr_service_td=raw[600:648] if td15 else None,
        )


_TD_SIZES = (16, 48, 48, 8, 8, 8, 48, 48, 48, 48, 48, 48, 48, 48, 64)
_TD_FIELDS = tuple((sum(_TD_SIZES[:i]), sum(_TD_SIZES[: i + 1])) for i in range(len(_TD_SIZES)))


@dataclass(frozen=True)
class QeReportCertData:
    """The QE's report, its PCK signature, its auth data and the PCK chain."""

    qe_report: EnclaveReport
    qe_report_signature: bytes
    qe_auth_data: bytes
    cert_type: int
    cert_data: bytes

    @property
    def pck_chain_pem(self) -> bytes:
        """The PEM PCK certificate chain (certification data type 5)."""
        return self.cert_data.rstrip(b"\x00")


@dataclass(frozen=True)
class Quote:
    raw: bytes
    header: QuoteHeader
    body_type: int
    body: EnclaveReport | TdReport
    signed_data: bytes
    signature: bytes
    attestation_key: bytes
    qe: QeReportCertData

    @property
    def is_tdx(self) -> bool:
        return self.header.tee_type == TEE_TDX

    @property
    def enclave(self) -> EnclaveReport:
        if not isinstance(self.body, EnclaveReport):
            raise TypeError("not an SGX quote")
        return self.body

    @property
    def td(self) -> TdReport:
        if not isinstance(self.body, TdReport):
            raise TypeError("not a TDX quote")
        return self.body


def _parse_header(r: _Reader) -> QuoteHeader:
    version, akt, tee = struct.unpack("<HHI", r.take(8, "header"))
    qe_svn, pce_svn = struct.unpack("<HH", r.take(4, "header"))
    vendor = r.take(16, "QE vendor id")
    user = r.take(20, "user data")
    if version not in (3, 4, 5):
        raise QuoteParseError(f"quote version {version} is not supported (3, 4 or 5)")
    if akt != ATT_KEY_ECDSA_P256:
        raise QuoteParseError(
            f"attestation key type {akt} is not supported ({ATT_KEY_ECDSA_P256}, ECDSA P-256)"
        )
    if tee not in (TEE_SGX, TEE_TDX):
        raise QuoteParseError(f"TEE type 0x{tee:x} is not supported (0x0 SGX, 0x81 TDX)")
    if version == 3 and tee != TEE_SGX:
        raise QuoteParseError("a version 3 quote must be an SGX quote")
    if version == 4 and tee != TEE_TDX:
        raise QuoteParseError("a version 4 quote must be a TDX quote")
    if vendor != INTEL_QE_VENDOR_ID:
        raise QuoteParseError(
            f"QE vendor id {vendor.hex()} is not Intel's ({INTEL_QE_VENDOR_ID.hex()})"
        )
    return QuoteHeader(version, akt, tee, qe_svn, pce_svn, vendor, user)


def _parse_body(r: _Reader, header: QuoteHeader) -> tuple[int, EnclaveReport | TdReport]:
    if header.version == 3:
        return BODY_SGX, EnclaveReport.parse(r.take(SGX_REPORT_LEN, "enclave report"))
    if header.version == 4:
        return BODY_TD10, TdReport.parse(r.take(TD10_REPORT_LEN, "TD report"))
    body_type, size = r.u16("body type"), r.u32("body size")
    expected = {BODY_SGX: SGX_REPORT_LEN, BODY_TD10: TD10_REPORT_LEN, BODY_TD15: TD15_REPORT_LEN}
    if body_type not in expected:
        raise QuoteParseError(f"body type {body_type} is not supported (1, 2 or 3)")
    if (body_type == BODY_SGX) != (header.tee_type == TEE_SGX):
        raise QuoteParseError(f"body type {body_type} does not match TEE 0x{header.tee_type:x}")
    if size != expected[body_type]:
        raise QuoteParseError(
            f"body type {body_type} has size {size}, expected {expected[body_type]}"
        )
    raw = r.take(size, "report body")
    return body_type, EnclaveReport.parse(raw) if body_type == BODY_SGX else TdReport.parse(raw)


def _parse_qe_cert_data(r: _Reader) -> QeReportCertData:
    qe_report = EnclaveReport.parse(r.take(SGX_REPORT_LEN, "QE report"))
    qe_sig = r.take(64, "QE report signature")
    auth = r.take(r.u16("QE auth data size"), "QE auth data")
    cert_type = r.u16("certification data type")
    cert_data = r.take(r.u32("certification data size"), "certification data")
    return QeReportCertData(qe_report, qe_sig, auth, cert_type, cert_data)


def parse_quote(raw: bytes) -> Quote:
    """Parse a DCAP quote; raises `QuoteParseError` naming what is malformed."""
    raw = bytes(raw)
    r = _Reader(raw)
    header = _parse_header(r)
    body_type, body = _parse_body(r, header)
    signed = raw[: r.pos]
    sig_len = r.u32("signature data size")
    s = _Reader(raw, r.pos, r.pos + sig_len)
    if s.end > len(raw):
        raise QuoteParseError(
            f"quote truncated: signature data size {sig_len} exceeds "
            f"the {len(raw) - r.pos} bytes left"
        )
    signature = s.take(64, "quote signature")
    att_key = s.take(64, "attestation key")
    if header.version == 3:
        qe = _parse_qe_cert_data(s)
    else:
        outer_type, outer_size = s.u16("certification data type"), s.u32("certification data size")
        if outer_type != CERT_QE_REPORT:
            raise QuoteParseError(
                f"certification data type {outer_type} is not supported "
                f"(expected {CERT_QE_REPORT}, QE report certification data)"
            )
        inner = _Reader(raw, s.pos, s.pos + outer_size)
        if inner.end > s.end:
            raise QuoteParseError("QE report certification data overruns the signature data")
        qe = _parse_qe_cert_data(inner)
        if inner.pos != inner.end:
            raise QuoteParseError(
                f"QE report certification data has {inner.end - inner.pos} unparsed bytes"
            )
    if qe.cert_type != CERT_PCK_CHAIN:
        raise QuoteParseError(
            f"certification data type {qe.cert_type} is not supported "
            f"(only {CERT_PCK_CHAIN}, a PEM PCK certificate chain)"
        )
    return Quote(raw, header, body_type, body, signed, signature, att_key, qe)
