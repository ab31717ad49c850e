"""Synthetic DCAP quotes and collateral under a test PKI (for `verify_quote(root_ca_pem=...)`).

pki = TestPki.create()
spec = QuoteSpec(version=4, tee="TDX")
quote = build_quote(spec, pki)
collateral = build_collateral(pki, spec)  # a dict for Collateral.from_json
verify_quote(quote, Collateral.from_json(collateral), now=NOW, root_ca_pem=pki.root_pem)
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

NOW = datetime(2030, 1, 15, tzinfo=UTC)
QE_VENDOR = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
SGX_EXT = "1.2.840.113741.1.13.1"
FMSPC = bytes.fromhex("00906ED50000")
QE_MRSIGNER = bytes.fromhex("8c4f5775d796503e96137f77c68a829a0056ac8ded70140b081b094490c57bff")


# -- tiny DER encoder for the SGX extension -------------------------------------------------


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def _oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        while arc > 0x7F:
            arc >>= 7
            chunk.insert(0, 0x80 | (arc & 0x7F))
        body += bytes(chunk)
    return _der(0x06, bytes(body))


def _int(value: int, tag: int = 0x02) -> bytes:
    return _der(tag, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _pair(oid: str, value: bytes) -> bytes:
    return _der(0x30, _oid(oid) + value)


def sgx_extension(components: list[int], pce_svn: int, fmspc: bytes = FMSPC) -> bytes:
    tcb = b"".join(_pair(f"{SGX_EXT}.2.{i + 1}", _int(svn)) for i, svn in enumerate(components))
    tcb += _pair(f"{SGX_EXT}.2.17", _int(pce_svn))
    tcb += _pair(f"{SGX_EXT}.2.18", _der(0x04, bytes(components)))
    return _der(
        0x30,
        _pair(f"{SGX_EXT}.1", _der(0x04, bytes(range(16))))
        + _pair(f"{SGX_EXT}.2", _der(0x30, tcb))
        + _pair(f"{SGX_EXT}.3", _der(0x04, b"\x00\x00"))
        + _pair(f"{SGX_EXT}.4", _der(0x04, fmspc))
        + _pair(f"{SGX_EXT}.5", _int(0, 0x0A)),
    )


# -- the PKI --------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)])


def _cert(
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool,
    path_length: int | None = None,
    extra: x509.ExtensionType | None = None,
    not_after: datetime = NOW + timedelta(days=3650),
) -> x509.Certificate:
    issuer_name, signer = (issuer[0].subject, issuer[1]) if issuer else (_name(cn), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=365))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
    )
    if extra is not None:
        builder = builder.add_extension(extra, critical=False)
    return builder.sign(signer, hashes.SHA256())


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem(*certs: x509.Certificate) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


def raw_sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


@dataclass
class TestPki:
    root_key: ec.EllipticCurvePrivateKey
    root: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    ca: x509.Certificate
    tcb_key: ec.EllipticCurvePrivateKey
    tcb: x509.Certificate

    __test__ = False  # not a pytest class

    @classmethod
    def create(cls) -> TestPki:
        root_key, ca_key, tcb_key = _key(), _key(), _key()
        root = _cert("Test SGX Root CA", root_key, None, ca=True, path_length=1)
        ca = _cert("Test SGX PCK Platform CA", ca_key, (root, root_key), ca=True, path_length=0)
        tcb = _cert("Test SGX TCB Signing", tcb_key, (root, root_key), ca=False)
        return cls(root_key, root, ca_key, ca, tcb_key, tcb)

    @property
    def root_pem(self) -> bytes:
        return self.root.public_bytes(serialization.Encoding.PEM)

    def pck_leaf(
        self, components: list[int], pce_svn: int, key: ec.EllipticCurvePrivateKey, **kw: Any
    ) -> x509.Certificate:
        ext = x509.UnrecognizedExtension(
            x509.ObjectIdentifier(SGX_EXT), sgx_extension(components, pce_svn)
        )
        return _cert(
            "Test SGX PCK Certificate", key, (self.ca, self.ca_key), ca=False, extra=ext, **kw
        )


# -- quotes ---------------------------------------------------------------------------------


@dataclass
class QuoteSpec:
    """What to put in a synthetic quote (and its PCK certificate)."""

    version: int = 3
    tee: str = "SGX"  # or "TDX"
    td15: bool = False  # v5 only: TD report 1.5 body
    debug: bool = False
    report_data: bytes = bytes(range(64))
    components: list[int] = field(default_factory=lambda: [5, 5, 2, 2, 3, 1, 0, 5] + [0] * 8)
    pce_svn: int = 13
    tee_tcb_svn: bytes = bytes([4, 1, 3]) + bytes(13)
    tee_tcb_svn2: bytes = bytes([4, 1, 3]) + bytes(13)
    qe_isv_svn: int = 8
    qe_mrsigner: bytes = QE_MRSIGNER
    pck_not_after: datetime = NOW + timedelta(days=3650)

    @property
    def qe_prod_id(self) -> int:
        return 2 if self.tee == "TDX" else 1


def _sgx_body(spec: QuoteSpec) -> bytes:
    body = bytearray(384)
    body[48] = 0x05 | (0x02 if spec.debug else 0)  # INIT | MODE64BIT (| DEBUG)
    body[64:96] = hashlib.sha256(b"test enclave").digest()
    body[128:160] = hashlib.sha256(b"test signer").digest()
    body[320:384] = spec.report_data
    return bytes(body)


def _td_body(spec: QuoteSpec) -> bytes:
    body = bytearray(648 if spec.td15 else 584)
    body[0:16] = spec.tee_tcb_svn
    body[120] = 0x01 if spec.debug else 0
    body[123] = 0x10  # SEPT_VE_DISABLE
    body[136:184] = hashlib.sha384(b"test td").digest()
    body[520:584] = spec.report_data
    if spec.td15:
        body[584:600] = spec.tee_tcb_svn2
    return bytes(body)


def _qe_report(spec: QuoteSpec, att_pub: bytes, auth: bytes) -> bytes:
    report = bytearray(384)
    report[48] = 0x11  # INIT | PROVISIONKEY... as in Intel's QE identity
    report[128:160] = spec.qe_mrsigner
    report[256:260] = struct.pack("<HH", spec.qe_prod_id, spec.qe_isv_svn)
    report[320:352] = hashlib.sha256(att_pub + auth).digest()
    return bytes(report)


def build_quote(spec: QuoteSpec, pki: TestPki) -> bytes:
    """A quote signed by a fresh attestation key, its QE report signed by a fresh PCK key."""
    tee = 0x81 if spec.tee == "TDX" else 0
    header = struct.pack("<HHIHH", spec.version, 2, tee, 0, 0) + QE_VENDOR + bytes(20)
    body = _sgx_body(spec) if spec.tee == "SGX" else _td_body(spec)
    if spec.version == 5:
        body_type = 1 if spec.tee == "SGX" else 3 if spec.td15 else 2
        body = struct.pack("<HI", body_type, len(body)) + body
    signed = header + body
    att_key, pck_key = _key(), _key()
    att_pub = att_key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )[1:]
    auth = bytes(range(32))
    qe_report = _qe_report(spec, att_pub, auth)
    leaf = pki.pck_leaf(spec.components, spec.pce_svn, pck_key, not_after=spec.pck_not_after)
    pem = _pem(leaf, pki.ca, pki.root).encode()
    qe_part = (
        qe_report
        + raw_sign(pck_key, qe_report)
        + struct.pack("<H", len(auth))
        + auth
        + struct.pack("<HI", 5, len(pem))
        + pem
    )
    if spec.version != 3:
        qe_part = struct.pack("<HI", 6, len(qe_part)) + qe_part
    sig_data = raw_sign(att_key, signed) + att_pub + qe_part
    return signed + struct.pack("<I", len(sig_data)) + sig_data


# -- collateral -----------------------------------------------------------------------------


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def tcb_level(
    components: list[int],
    pce_svn: int,
    status: str,
    advisories: list[str] | None = None,
    tdx: list[int] | None = None,
) -> dict[str, Any]:
    tcb: dict[str, Any] = {
        "sgxtcbcomponents": [{"svn": s} for s in components],
        "pcesvn": pce_svn,
    }
    if tdx is not None:
        tcb["tdxtcbcomponents"] = [{"svn": s} for s in tdx]
    level: dict[str, Any] = {"tcb": tcb, "tcbDate": "2029-01-01T00:00:00Z", "tcbStatus": status}
    if advisories:
        level["advisoryIDs"] = advisories
    return level


def identity_level(
    isv_svn: int, status: str, advisories: list[str] | None = None
) -> dict[str, Any]:
    level: dict[str, Any] = {
        "tcb": {"isvsvn": isv_svn},
        "tcbDate": "2029-01-01T00:00:00Z",
        "tcbStatus": status,
    }
    if advisories:
        level["advisoryIDs"] = advisories
    return level


def default_tcb_info(spec: QuoteSpec) -> dict[str, Any]:
    tdx = spec.tee == "TDX"
    up = [5, 5, 2, 2, 3, 1, 0, 5] + [0] * 8
    old = [4, 4, 2, 2, 3, 1, 0, 5] + [0] * 8
    tdx_up = [4, 0, 3] + [0] * 13 if tdx else None
    info: dict[str, Any] = {
        "id": "TDX" if tdx else "SGX",
        "version": 3,
        "issueDate": _iso(NOW - timedelta(days=1)),
        "nextUpdate": _iso(NOW + timedelta(days=30)),
        "fmspc": FMSPC.hex().upper(),
        "pceId": "0000",
        "tcbType": 0,
        "tcbEvaluationDataNumber": 17,
        "tcbLevels": [
            tcb_level(up, 13, "UpToDate", tdx=tdx_up),
            tcb_level(up, 11, "SWHardeningNeeded", ["INTEL-SA-00001"], tdx=tdx_up),
            tcb_level(old, 11, "OutOfDate", ["INTEL-SA-00001", "INTEL-SA-00002"], tdx=tdx_up),
        ],
    }
    if tdx:
        zero_module = {"mrsigner": "00" * 48, "attributes": "00" * 8, "attributesMask": "FF" * 8}
        info["tdxModule"] = zero_module
        info["tdxModuleIdentities"] = [
            {
                "id": "TDX_01",
                **zero_module,
                "tcbLevels": [
                    identity_level(4, "UpToDate"),
                    identity_level(2, "OutOfDate", ["INTEL-SA-00003"]),
                ],
            }
        ]
    return info


def default_qe_identity(spec: QuoteSpec) -> dict[str, Any]:
    return {
        "id": "TD_QE" if spec.tee == "TDX" else "QE",
        "version": 2,
        "issueDate": _iso(NOW - timedelta(days=1)),
        "nextUpdate": _iso(NOW + timedelta(days=30)),
        "tcbEvaluationDataNumber": 17,
        "miscselect": "00000000",
        "miscselectMask": "FFFFFFFF",
        "attributes": "11000000000000000000000000000000",
        "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
        "mrsigner": QE_MRSIGNER.hex().upper(),
        "isvprodid": spec.qe_prod_id,
        "tcbLevels": [
            identity_level(8, "UpToDate"),
            identity_level(6, "OutOfDate", ["INTEL-SA-00615"]),
        ],
    }


def _crl(issuer: x509.Certificate, key: ec.EllipticCurvePrivateKey, revoked: list[int]) -> str:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(NOW - timedelta(days=1))
        .next_update(NOW + timedelta(days=30))
    )
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(NOW - timedelta(days=2))
            .build()
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER).hex()


def pck_serial(quote: bytes) -> int:
    start = quote.index(b"-----BEGIN CERTIFICATE-----")
    return x509.load_pem_x509_certificates(quote[start:])[0].serial_number


def build_collateral(
    pki: TestPki,
    spec: QuoteSpec,
    *,
    tcb_info: dict[str, Any] | None = None,
    qe_identity: dict[str, Any] | None = None,
    revoked_pck_serials: list[int] | None = None,
    revoke_pck_ca: bool = False,
) -> dict[str, str]:
    tcb_text = json.dumps(tcb_info or default_tcb_info(spec), separators=(",", ":"))
    qe_text = json.dumps(qe_identity or default_qe_identity(spec), separators=(",", ":"))
    signing_chain = _pem(pki.tcb, pki.root)
    return {
        "pck_crl_issuer_chain": _pem(pki.ca, pki.root),
        "root_ca_crl": _crl(
            pki.root, pki.root_key, [pki.ca.serial_number] if revoke_pck_ca else []
        ),
        "pck_crl": _crl(pki.ca, pki.ca_key, revoked_pck_serials or []),
        "tcb_info_issuer_chain": signing_chain,
        "tcb_info": tcb_text,
        "tcb_info_signature": raw_sign(pki.tcb_key, tcb_text.encode()).hex(),
        "qe_identity_issuer_chain": signing_chain,
        "qe_identity": qe_text,
        "qe_identity_signature": raw_sign(pki.tcb_key, qe_text.encode()).hex(),
    }
