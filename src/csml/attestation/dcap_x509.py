"""X.509 for DCAP: the pinned Intel SGX Root CA, chains, CRLs, raw r||s ECDSA."""

from __future__ import annotations

import warnings
from importlib import resources
from itertools import pairwise

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

#: SHA-256 of the DER of Intel's "Intel SGX Root CA" certificate (valid 2018-05-21 .. 2049-12-31).
INTEL_SGX_ROOT_CA_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
_ROOT_PEM_RESOURCE = "intel_sgx_root_ca.pem"


class ChainError(ValueError):
    """A certificate chain does not verify."""


class RootMismatch(ChainError):
    """A chain is not anchored at the trusted root."""


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def describe(cert: x509.Certificate) -> str:
    """Short, human-readable identity of a certificate."""
    with warnings.catch_warnings():  # malformed names warn; the text is only for messages
        warnings.simplefilter("ignore")
        name = cert.subject.rfc4514_string()
    return f"'{name}' (sha256 {fingerprint(cert)[:16]}…)"


def load_trusted_root(root_ca_pem: bytes | None) -> tuple[x509.Certificate, str]:
    """The trusted root and how it was chosen; the shipped root must match the pin."""
    if root_ca_pem is None:
        pem = resources.files("csml.attestation").joinpath(_ROOT_PEM_RESOURCE).read_bytes()
        source = "pinned Intel SGX Root CA"
    else:
        pem, source = root_ca_pem, "injected root"
    try:
        root = x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise RootMismatch(f"{source} is not a PEM certificate: {e}") from None
    if root_ca_pem is None and fingerprint(root) != INTEL_SGX_ROOT_CA_SHA256:
        raise RootMismatch(
            f"shipped {_ROOT_PEM_RESOURCE} has sha256 {fingerprint(root)}, "
            f"expected the pinned {INTEL_SGX_ROOT_CA_SHA256}"
        )
    try:
        root.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        raise RootMismatch(f"{source} {describe(root)} is not a self-signed CA") from None
    return root, source


def load_chain(pem: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise ChainError(f"{what} is not a valid PEM certificate chain: {e}") from None
    return certs


def _is_self_issued(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer


def anchor_chain(
    certs: list[x509.Certificate], root: x509.Certificate, what: str
) -> list[x509.Certificate]:
    """`certs` (leaf first) ending with `root`, the trusted root appended if absent."""
    if not certs:
        raise ChainError(f"{what} is empty")
    last = certs[-1]
    if _is_self_issued(last):
        if last != root:
            raise RootMismatch(
                f"{what} ends at root {describe(last)}, not the trusted root {describe(root)}"
            )
        return certs
    if last.issuer != root.subject:
        raise RootMismatch(
            f"{what} top certificate {describe(last)} is issued by "
            f"'{last.issuer.rfc4514_string()}', not the trusted root {describe(root)}"
        )
    return [*certs, root]


def verify_chain(chain: list[x509.Certificate], what: str) -> None:
    """Check each certificate is signed by the next, a CA allowed to sign it."""
    for i, (child, parent) in enumerate(pairwise(chain)):
        try:
            bc = parent.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise ChainError(f"{what}: issuer {describe(parent)} is not a CA")
        if bc.path_length is not None and i > bc.path_length:
            raise ChainError(f"{what}: path length of {describe(parent)} exceeded")
        try:
            ku = parent.extensions.get_extension_for_class(x509.KeyUsage).value
            if not ku.key_cert_sign:
                raise ChainError(f"{what}: issuer {describe(parent)} may not sign certificates")
        except x509.ExtensionNotFound:
            pass
        try:
            child.verify_directly_issued_by(parent)
        except InvalidSignature:
            raise ChainError(
                f"{what}: signature of {describe(child)} does not verify with the key of "
                f"{describe(parent)}"
            ) from None
        except (ValueError, TypeError) as e:
            raise ChainError(
                f"{what}: {describe(child)} is not issued by {describe(parent)}: {e}"
            ) from None


def p256_key(raw: bytes) -> ec.EllipticCurvePublicKey:
    """A P-256 public key from its raw 64-byte X||Y encoding."""
    if len(raw) != 64:
        raise ValueError(f"raw P-256 key is {len(raw)} bytes, expected 64")
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)


def cert_p256_key(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ChainError(f"{describe(cert)} does not have a P-256 key")
    return key


def verify_raw_ecdsa(key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> bool:
    """Verify an ECDSA-SHA256 signature given as raw r||s (64 bytes)."""
    if len(signature) != 64:
        return False
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    try:
        key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def load_crl(text: str, what: str) -> x509.CertificateRevocationList:
    """A CRL given as hex DER (PCS/PCCS style) or PEM."""
    try:
        if text.lstrip().startswith("-----BEGIN"):
            return x509.load_pem_x509_crl(text.encode())
        return x509.load_der_x509_crl(bytes.fromhex(text))
    except ValueError as e:
        raise ChainError(f"{what} is not a hex DER or PEM CRL: {e}") from None


def verify_crl(crl: x509.CertificateRevocationList, issuer: x509.Certificate, what: str) -> None:
    if crl.issuer != issuer.subject:
        raise ChainError(
            f"{what} issuer '{crl.issuer.rfc4514_string()}' is not "
            f"'{issuer.subject.rfc4514_string()}'"
        )
    key = issuer.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(key):
        raise ChainError(f"{what} signature does not verify with the key of {describe(issuer)}")


def revoked(crl: x509.CertificateRevocationList, cert: x509.Certificate) -> bool:
    """Whether `cert` (issued by the CRL's issuer) is listed in `crl`."""
    if cert.issuer != crl.issuer:
        return False
    return crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
