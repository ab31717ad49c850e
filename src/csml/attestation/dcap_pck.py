"""The Intel SGX extension of a PCK certificate (OID 1.2.840.113741.1.13.1).

A minimal DER reader: only what the extension uses (SEQUENCE, OID, INTEGER,
ENUMERATED, OCTET STRING, BOOLEAN).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"
_PPID, _TCB, _PCEID, _FMSPC, _SGX_TYPE = (f"{SGX_EXTENSION_OID}.{i}" for i in range(1, 6))
_PCESVN = f"{_TCB}.17"
_CPUSVN = f"{_TCB}.18"

_SEQUENCE, _OID, _INTEGER, _ENUMERATED, _OCTETS = 0x30, 0x06, 0x02, 0x0A, 0x04


class PckExtensionError(ValueError):
    """The PCK certificate's SGX extension is missing or malformed."""


@dataclass(frozen=True)
class PckInfo:
    """Platform data from the PCK certificate's SGX extension."""

    ppid: bytes
    cpu_svn: bytes
    tcb_components: tuple[int, ...]
    pce_svn: int
    pce_id: bytes
    fmspc: bytes
    sgx_type: int


def _tlv(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """Read one DER TLV at `pos`: (tag, content, next position)."""
    if pos + 2 > len(data):
        raise PckExtensionError("DER truncated")
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise PckExtensionError("bad DER length")
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise PckExtensionError("DER truncated")
    return tag, data[pos : pos + length], pos + length


def _children(content: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(content):
        tag, value, pos = _tlv(content, pos)
        out.append((tag, value))
    return out


def _oid(content: bytes) -> str:
    if not content:
        raise PckExtensionError("empty OID")
    arcs, value = [], 0
    for byte in content:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in [first, arcs[0] - 40 * first, *arcs[1:]])


def _pairs(content: bytes) -> dict[str, tuple[int, bytes]]:
    """A SEQUENCE OF SEQUENCE { OID, value } as {oid: (tag, value)}."""
    out: dict[str, tuple[int, bytes]] = {}
    for tag, item in _children(content):
        parts = _children(item) if tag == _SEQUENCE else []
        if len(parts) != 2 or parts[0][0] != _OID:
            raise PckExtensionError("expected SEQUENCE { OID, value }")
        out[_oid(parts[0][1])] = parts[1]
    return out


def _get(pairs: dict[str, tuple[int, bytes]], oid: str, tag: int, size: int | None = None) -> bytes:
    if oid not in pairs:
        raise PckExtensionError(f"SGX extension lacks {oid}")
    got_tag, value = pairs[oid]
    if got_tag != tag or (size is not None and len(value) != size):
        raise PckExtensionError(f"SGX extension field {oid} is malformed")
    return value


def _uint(value: bytes) -> int:
    if not value or value[0] & 0x80:
        raise PckExtensionError("expected a non-negative INTEGER")
    return int.from_bytes(value, "big")


def parse_sgx_extension(der: bytes) -> PckInfo:
    """Parse the DER value of the SGX extension."""
    tag, content, end = _tlv(der, 0)
    if tag != _SEQUENCE or end != len(der):
        raise PckExtensionError("SGX extension is not a single SEQUENCE")
    top = _pairs(content)
    tcb = _pairs(_get(top, _TCB, _SEQUENCE))
    comps = tuple(_uint(_get(tcb, f"{_TCB}.{i}", _INTEGER)) for i in range(1, 17))
    return PckInfo(
        ppid=_get(top, _PPID, _OCTETS, 16),
        cpu_svn=_get(tcb, _CPUSVN, _OCTETS, 16),
        tcb_components=comps,
        pce_svn=_uint(_get(tcb, _PCESVN, _INTEGER)),
        pce_id=_get(top, _PCEID, _OCTETS, 2),
        fmspc=_get(top, _FMSPC, _OCTETS, 6),
        sgx_type=_uint(_get(top, _SGX_TYPE, _ENUMERATED)),
    )


def pck_info(cert: x509.Certificate) -> PckInfo:
    """The SGX extension data of a PCK certificate."""
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(SGX_EXTENSION_OID))
    except x509.ExtensionNotFound:
        raise PckExtensionError("PCK certificate has no SGX extension") from None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise PckExtensionError("SGX extension has an unexpected type")
    return parse_sgx_extension(value.value)
