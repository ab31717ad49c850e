"""The verification steps, in order; each records a named outcome or fails."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Collection
from datetime import datetime

from cryptography import x509

from csml.attestation.dcap_checks import CheckFailed, Checklist
from csml.attestation.dcap_collateral import (
    Collateral,
    IdentityLevel,
    QeIdentity,
    TcbInfo,
    TcbStatus,
)
from csml.attestation.dcap_pck import PckInfo, pck_info
from csml.attestation.dcap_quote import BODY_TD15, Quote, TdReport, parse_quote
from csml.attestation.dcap_tcb import (
    PlatformMatch,
    check_relaunch,
    converge_qe,
    converge_tdx_module,
    expected_tdx_module,
    match_platform,
    match_qe,
    match_tdx_module,
)
from csml.attestation.dcap_x509 import (
    RootMismatch,
    anchor_chain,
    cert_p256_key,
    describe,
    fingerprint,
    load_chain,
    load_crl,
    load_trusted_root,
    p256_key,
    revoked,
    verify_chain,
    verify_crl,
    verify_raw_ecdsa,
)

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _masked(value: bytes, mask: bytes) -> bytes:
    return bytes(v & m for v, m in zip(value, mask, strict=True))


class Verification:
    """One run of the verification; attributes fill in as steps pass."""

    def __init__(
        self,
        raw: bytes,
        collateral: Collateral,
        now: datetime,
        root_ca_pem: bytes | None,
        allow_debug: bool,
        accepted_statuses: Collection[TcbStatus] | None,
    ) -> None:
        self.raw, self.col, self.now = raw, collateral, now
        self.root_ca_pem = root_ca_pem
        self.allow_debug = allow_debug
        self.accepted = accepted_statuses
        self.checks = Checklist()
        self.signing_chains: list[list[x509.Certificate]] = []

    def step(self, name: str, fn: Callable[[], str]) -> None:
        try:
            detail = fn()
        except (CheckFailed, ValueError) as e:
            raise self.checks.failed(name, str(e)) from None
        except Exception as e:  # malformed input may surface as any error: fail closed
            raise self.checks.failed(name, f"{type(e).__name__}: {e}") from None
        self.checks.passed(name, detail)

    def run(self) -> None:
        self.step("quote_format", self.quote_format)
        self.step("root_ca", self.root_ca)
        self.step("pck_cert_chain", self.pck_cert_chain)
        self.step("tcb_info_signature", self.tcb_info_signature)
        self.step("qe_identity_signature", self.qe_identity_signature)
        self.step("root_ca_crl", self.root_ca_crl)
        self.step("pck_crl", self.pck_crl)
        self.step("collateral_validity", self.collateral_validity)
        self.step("tcb_info_match", self.tcb_info_match)
        self.step("qe_report_signature", self.qe_report_signature)
        self.step("qe_report_data", self.qe_report_data)
        self.step("qe_identity_match", self.qe_identity_match)
        self.step("quote_signature", self.quote_signature)
        if self.quote.is_tdx:
            self.step("tdx_module", self.tdx_module)
        self.step("tcb_level", self.tcb_level)
        self.step("qe_tcb", self.qe_tcb)
        self.step("tcb_status", self.tcb_status)
        self.step("debug", self.debug)

    # -- quote and certificates -------------------------------------------------------------

    def quote_format(self) -> str:
        self.quote: Quote = parse_quote(self.raw)
        h = self.quote.header
        tee = "TDX" if self.quote.is_tdx else "SGX"
        return f"{tee} quote v{h.version}, body type {self.quote.body_type}, ECDSA P-256, Intel QE"

    def _chain_sources(self) -> list[tuple[str, bytes]]:
        c = self.col
        return [
            ("PCK certificate chain (in the quote)", self.quote.qe.pck_chain_pem),
            ("PCK CRL issuer chain", c.pck_crl_issuer_chain.encode()),
            ("TCB info issuer chain", c.tcb_info_issuer_chain.encode()),
            ("QE identity issuer chain", c.qe_identity_issuer_chain.encode()),
        ]

    def root_ca(self) -> str:
        self.root, source = load_trusted_root(self.root_ca_pem)
        for what, pem in self._chain_sources():
            blocks = _PEM_CERT.findall(pem)
            if not blocks:
                raise CheckFailed(f"{what} has no PEM certificate")
            try:
                top = x509.load_pem_x509_certificate(blocks[-1])
            except ValueError as e:
                raise CheckFailed(f"{what}: top certificate does not parse: {e}") from None
            anchor_chain([top], self.root, what)
        return f"{source} {describe(self.root)}; the 4 certificate chains end at it"

    def _chain(self, what: str, pem: bytes) -> list[x509.Certificate]:
        try:
            chain = anchor_chain(load_chain(pem, what), self.root, what)
        except RootMismatch as e:  # the root step saw the top certificate; this is a broken chain
            raise CheckFailed(str(e)) from None
        verify_chain(chain, what)
        return chain

    def pck_cert_chain(self) -> str:
        self.pck_chain = self._chain(*self._chain_sources()[0])
        leaf = self.pck_chain[0]
        cns = leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        if not any("SGX PCK Certificate" in str(a.value) for a in cns):
            raise CheckFailed(f"leaf {describe(leaf)} is not an SGX PCK Certificate")
        self.pck: PckInfo = pck_info(leaf)
        self.pck_key = cert_p256_key(leaf)
        p = self.pck
        return (
            f"{' <- '.join(describe(c) for c in self.pck_chain)}; FMSPC {p.fmspc.hex().upper()}, "
            f"PCEID {p.pce_id.hex()}, PCESVN {p.pce_svn}, CPUSVN {p.cpu_svn.hex()}"
        )

    def _signed_document(self, what: str, chain_pem: str, text: str, sig_hex: str) -> str:
        chain = self._chain(f"{what} issuer chain", chain_pem.encode())
        try:
            signature = bytes.fromhex(sig_hex)
        except ValueError:
            raise CheckFailed(f"{what} signature is not hex") from None
        if not verify_raw_ecdsa(cert_p256_key(chain[0]), signature, text.encode()):
            raise CheckFailed(
                f"{what} signature does not verify over the {what} JSON text with the key of "
                f"{describe(chain[0])}"
            )
        self.signing_chains.append(chain)
        return f"signed by {describe(chain[0])}"

    def tcb_info_signature(self) -> str:
        c = self.col
        detail = self._signed_document(
            "TCB info", c.tcb_info_issuer_chain, c.tcb_info, c.tcb_info_signature
        )
        self.tcb_info = TcbInfo.parse(c.tcb_info)
        return detail

    def qe_identity_signature(self) -> str:
        c = self.col
        detail = self._signed_document(
            "QE identity", c.qe_identity_issuer_chain, c.qe_identity, c.qe_identity_signature
        )
        self.qe_identity = QeIdentity.parse(c.qe_identity)
        return detail

    def root_ca_crl(self) -> str:
        self.root_crl = load_crl(self.col.root_ca_crl, "root CA CRL")
        verify_crl(self.root_crl, self.root, "root CA CRL")
        certs = [c for chain in [self.pck_chain, *self.signing_chains] for c in chain[:-1]]
        for cert in certs:
            if revoked(self.root_crl, cert):
                raise CheckFailed(f"{describe(cert)} is revoked by the root CA CRL")
        count = len({fingerprint(c) for c in certs})
        return f"signed by the root; none of {count} certificates it issued is revoked"

    def pck_crl(self) -> str:
        chain = self._chain("PCK CRL issuer chain", self.col.pck_crl_issuer_chain.encode())
        self.crl_chain = chain
        for cert in chain[:-1]:
            if revoked(self.root_crl, cert):
                raise CheckFailed(f"PCK CRL issuer {describe(cert)} is revoked by the root CA CRL")
        self.pck_crl_obj = crl = load_crl(self.col.pck_crl, "PCK CRL")
        verify_crl(crl, chain[0], "PCK CRL")
        leaf = self.pck_chain[0]
        if crl.issuer != leaf.issuer:
            raise CheckFailed(
                f"PCK CRL is issued by '{crl.issuer.rfc4514_string()}' but the PCK certificate "
                f"by '{leaf.issuer.rfc4514_string()}'"
            )
        if revoked(crl, leaf):
            raise CheckFailed(
                f"PCK certificate {describe(leaf)} (serial {leaf.serial_number:x}) is revoked"
            )
        return f"signed by {describe(chain[0])}; PCK certificate not among {len(crl)} revoked"

    # -- time -------------------------------------------------------------------------------

    def _windows(self) -> list[tuple[str, datetime, datetime | None, bool]]:
        """(item, valid from, valid until, until-is-inclusive) of every collateral item."""
        ti, qi = self.tcb_info, self.qe_identity
        out: list[tuple[str, datetime, datetime | None, bool]] = [
            ("TCB info", ti.issue_date, ti.next_update, False),
            ("QE identity", qi.issue_date, qi.next_update, False),
            ("root CA CRL", self.root_crl.last_update_utc, self.root_crl.next_update_utc, False),
            ("PCK CRL", self.pck_crl_obj.last_update_utc, self.pck_crl_obj.next_update_utc, False),
        ]
        seen: set[str] = set()
        for chain in [self.pck_chain, self.crl_chain, *self.signing_chains]:
            for cert in chain:
                if fingerprint(cert) not in seen:
                    seen.add(fingerprint(cert))
                    name = f"certificate {describe(cert)}"
                    out.append((name, cert.not_valid_before_utc, cert.not_valid_after_utc, True))
        return out

    def collateral_validity(self) -> str:
        now, expired, early = self.now, [], []
        windows = self._windows()
        for item, start, end, inclusive in windows:
            if now < start:
                early.append(f"{item} is valid from {_iso(start)}")
            if end is None:
                expired.append(f"{item} has no nextUpdate")
            elif now > end or (now == end and not inclusive):
                expired.append(f"{item} expired at {_iso(end)}")
        if expired or early:
            head = "collateral expired" if expired else "collateral not yet valid"
            raise CheckFailed(f"{head} at {_iso(now)}: {'; '.join(expired + early)}")
        ends = [(end, item) for item, _, end, _ in windows if end is not None]
        self.valid_until, first = min(ends)
        return (
            f"{len(windows)} items valid at {_iso(now)}; "
            f"first to expire: {first} at {_iso(self.valid_until)}"
        )

    # -- QE and quote -----------------------------------------------------------------------

    def tcb_info_match(self) -> str:
        ti, pck = self.tcb_info, self.pck
        tee = "TDX" if self.quote.is_tdx else "SGX"
        if ti.id != tee or (tee == "TDX" and ti.version < 3):
            raise CheckFailed(f"TCB info is '{ti.id}' version {ti.version}, the quote is {tee}")
        if ti.fmspc != pck.fmspc:
            raise CheckFailed(
                f"TCB info FMSPC {ti.fmspc.hex().upper()} != "
                f"PCK certificate FMSPC {pck.fmspc.hex().upper()}"
            )
        if ti.pce_id != pck.pce_id:
            raise CheckFailed(
                f"TCB info PCEID {ti.pce_id.hex()} != PCK certificate PCEID {pck.pce_id.hex()}"
            )
        fmspc = ti.fmspc.hex().upper()
        return f"{ti.id} TCB info v{ti.version} for FMSPC {fmspc}, PCEID {ti.pce_id.hex()}"

    def qe_report_signature(self) -> str:
        qe = self.quote.qe
        if not verify_raw_ecdsa(self.pck_key, qe.qe_report_signature, qe.qe_report.raw):
            raise CheckFailed("QE report signature does not verify with the PCK certificate's key")
        return "QE report signed by the PCK key"

    def qe_report_data(self) -> str:
        qe = self.quote.qe
        expected = hashlib.sha256(self.quote.attestation_key + qe.qe_auth_data).digest()
        got = qe.qe_report.report_data[:32]
        if got != expected:
            raise CheckFailed(
                f"QE report_data[0:32] is {got.hex()}, expected SHA-256(attestation key || "
                f"QE auth data) = {expected.hex()}"
            )
        return "QE report binds the attestation key"

    def qe_identity_match(self) -> str:
        qi, r = self.qe_identity, self.quote.qe.qe_report
        want_id = "TD_QE" if self.quote.is_tdx else "QE"
        problems = []
        if qi.id != want_id:
            problems.append(f"identity is for '{qi.id}', expected '{want_id}'")
        if r.mr_signer != qi.mrsigner:
            problems.append(f"MRSIGNER {r.mr_signer.hex()} != {qi.mrsigner.hex()}")
        if r.isv_prod_id != qi.isv_prod_id:
            problems.append(f"ISVPRODID {r.isv_prod_id} != {qi.isv_prod_id}")
        if (got := _masked(r.misc_select, qi.miscselect_mask)) != qi.miscselect:
            problems.append(f"masked MISCSELECT {got.hex()} != {qi.miscselect.hex()}")
        if (got := _masked(r.attributes, qi.attributes_mask)) != qi.attributes:
            problems.append(f"masked ATTRIBUTES {got.hex()} != {qi.attributes.hex()}")
        if problems:
            raise CheckFailed(f"QE report does not match the QE identity: {'; '.join(problems)}")
        return f"{qi.id} MRSIGNER {r.mr_signer.hex()[:16]}…, ISVPRODID {r.isv_prod_id}"

    def quote_signature(self) -> str:
        try:
            key = p256_key(self.quote.attestation_key)
        except ValueError:
            raise CheckFailed("attestation key is not a valid P-256 point") from None
        if not verify_raw_ecdsa(key, self.quote.signature, self.quote.signed_data):
            raise CheckFailed(
                "quote signature over the header and report body does not verify with the "
                "attestation key"
            )
        return f"{len(self.quote.signed_data)} signed bytes verified"

    # -- TCB --------------------------------------------------------------------------------

    @property
    def td(self) -> TdReport:
        return self.quote.td

    def tdx_module(self) -> str:
        td = self.td
        want = expected_tdx_module(self.tcb_info, td.tee_tcb_svn)
        name = want.id or "tdxModule"
        if td.mr_signer_seam != want.mrsigner:
            raise CheckFailed(
                f"MRSIGNERSEAM {td.mr_signer_seam.hex()} != {name} MRSIGNER {want.mrsigner.hex()}"
            )
        mask = want.attributes_mask
        if _masked(td.seam_attributes, mask) != _masked(want.attributes, mask) or any(
            a & ~m for a, m in zip(td.seam_attributes, mask, strict=True)
        ):
            raise CheckFailed(
                f"SEAMATTRIBUTES {td.seam_attributes.hex()} do not match {name} attributes "
                f"{want.attributes.hex()} under mask {mask.hex()}"
            )
        return f"TDX module matches {name}"

    def tcb_level(self) -> str:
        tee_svn = self.td.tee_tcb_svn if self.quote.is_tdx else None
        pck = self.pck
        self.platform: PlatformMatch = match_platform(
            self.tcb_info, pck.tcb_components, pck.pce_svn, tee_svn
        )
        level = self.platform.level
        self.platform_status = level.status
        self.module_level: IdentityLevel | None = None
        detail = f"TCB level of {level.tcb_date}: {level.status}"
        if tee_svn is not None:
            self.module_level = match_tdx_module(self.tcb_info, tee_svn)
            module_status = self.module_level.status if self.module_level else TcbStatus.UP_TO_DATE
            self.platform_status = converge_tdx_module(level.status, module_status)
            detail += f"; TDX module {module_status} -> {self.platform_status}"
        return detail

    def qe_tcb(self) -> str:
        self.qe_level: IdentityLevel = match_qe(self.qe_identity, self.quote.qe.qe_report.isv_svn)
        return f"QE ISVSVN {self.quote.qe.qe_report.isv_svn}: {self.qe_level.status}"

    def tcb_status(self) -> str:
        status = self.platform_status
        if self.quote.is_tdx and self.quote.body_type == BODY_TD15:
            svn2 = self.td.tee_tcb_svn2
            assert svn2 is not None
            module = self.module_level.status if self.module_level else TcbStatus.UP_TO_DATE
            status = check_relaunch(
                self.tcb_info, svn2, self.platform.sgx_level.status, status, module,
                self.qe_level.status,
            )  # fmt: skip
        self.final_status = converge_qe(status, self.qe_level.status)
        if self.final_status == TcbStatus.REVOKED:
            raise CheckFailed("TCB status is Revoked: the platform or QE TCB has been revoked")
        if self.accepted is not None and self.final_status not in self.accepted:
            raise CheckFailed(
                f"TCB status {self.final_status} is not accepted "
                f"(accepted: {', '.join(sorted(self.accepted))})"
            )
        return f"TCB status {self.final_status}"

    def debug(self) -> str:
        if self.quote.body.debug and not self.allow_debug:
            what = "TD_ATTRIBUTES.DEBUG" if self.quote.is_tdx else "ATTRIBUTES.DEBUG"
            raise CheckFailed(f"{what} is set: a debug enclave/TD has no confidentiality")
        return "debug allowed" if self.allow_debug else "not a debug enclave/TD"
