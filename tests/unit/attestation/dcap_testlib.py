"""Helpers for the DCAP tests: the public vectors, and an independent TCB computation."""

from __future__ import annotations

import json
import struct
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

DATA = Path(__file__).resolve().parents[2] / "data" / "attestation"
VECTORS = ("sgx_quote", "tdx_quote", "tdx_quote_outdated")


def load_vector(name: str) -> tuple[bytes, dict[str, str]]:
    quote = (DATA / name).read_bytes()
    collateral = json.loads((DATA / f"{name}_collateral.json").read_text())
    return quote, collateral


def _date(text: str) -> datetime:
    return datetime.fromisoformat(text)


def collateral_window(collateral: dict[str, str]) -> tuple[datetime, datetime]:
    """(latest start, earliest end) over the TCB info, QE identity and both CRLs."""
    docs = [json.loads(collateral["tcb_info"]), json.loads(collateral["qe_identity"])]
    crls = [
        x509.load_der_x509_crl(bytes.fromhex(collateral[k])) for k in ("root_ca_crl", "pck_crl")
    ]
    starts = [_date(d["issueDate"]) for d in docs] + [c.last_update_utc for c in crls]
    ends = [_date(d["nextUpdate"]) for d in docs]
    ends += [c.next_update_utc for c in crls if c.next_update_utc is not None]
    return max(starts), min(ends)


def now_inside(collateral: dict[str, str]) -> datetime:
    start, end = collateral_window(collateral)
    assert start < end, "the vector's collateral has no common validity window"
    return start + (end - start) / 2


def tcb_document(collateral: dict[str, str]) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(collateral["tcb_info"])
    return doc


def qe_document(collateral: dict[str, str]) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(collateral["qe_identity"])
    return doc


# -- an independent, straightforward reading of the TCB rules -------------------------------

_SGX_EXT = (1, 2, 840, 113741, 1, 13, 1)


def _oid_tlv(arcs: tuple[int, ...]) -> bytes:
    body = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.insert(0, 0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(chunk)
    return bytes([0x06, len(body)]) + bytes(body)


def _int_after(der: bytes, arcs: tuple[int, ...]) -> int:
    """The INTEGER that follows the given OID inside the DER (a plain byte search)."""
    at = der.index(_oid_tlv(arcs)) + len(_oid_tlv(arcs))
    assert der[at] == 0x02, "expected an INTEGER after the OID"
    return int.from_bytes(der[at + 2 : at + 2 + der[at + 1]], "big")


def pck_tcb(quote: bytes) -> tuple[list[int], int]:
    """(16 SGX TCB component SVNs, PCESVN) from the PCK certificate inside the quote."""
    start = quote.index(b"-----BEGIN CERTIFICATE-----")
    leaf = x509.load_pem_x509_certificates(quote[start:].rstrip(b"\x00"))[0]
    der = leaf.public_bytes(Encoding.DER)
    comps = [_int_after(der, (*_SGX_EXT, 2, i)) for i in range(1, 17)]
    return comps, _int_after(der, (*_SGX_EXT, 2, 17))


def body_offsets(quote: bytes) -> tuple[int, int]:
    """(body offset, body size) from the raw header/descriptor."""
    version, _, tee = struct.unpack_from("<HHI", quote, 0)
    if version == 5:
        _, size = struct.unpack_from("<HI", quote, 48)
        return 54, size
    return 48, 384 if tee == 0 else 584


def qe_isv_svn(quote: bytes) -> int:
    version = struct.unpack_from("<H", quote, 0)[0]
    off, size = body_offsets(quote)
    qe_report = off + size + 4 + 128 + (0 if version == 3 else 6)
    return int(struct.unpack_from("<H", quote, qe_report + 258)[0])


_WORSE_WHEN_OUT_OF_DATE = {
    "UpToDate": "OutOfDate",
    "SWHardeningNeeded": "OutOfDate",
    "ConfigurationNeeded": "OutOfDateConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded": "OutOfDateConfigurationNeeded",
}


def _combine(status: str, other: str) -> str:
    if other == "Revoked":
        return "Revoked"
    if other == "OutOfDate":
        return _WORSE_WHEN_OUT_OF_DATE.get(status, status)
    return status


def expected_tcb(quote: bytes, collateral: dict[str, str]) -> tuple[str | None, list[str]]:
    """(TCB status or None if no level matches, advisory IDs), straight from the JSON."""
    tcb, qe = tcb_document(collateral), qe_document(collateral)
    comps, pcesvn = pck_tcb(quote)
    is_tdx = tcb["id"] == "TDX"
    off, _ = body_offsets(quote)
    tee = list(quote[off : off + 16]) if is_tdx else []
    skip = 2 if is_tdx and tee[1] > 0 else 0  # module SVNs are judged by tdxModuleIdentities

    def meets(level: dict[str, Any]) -> bool:
        sgx = [c["svn"] for c in level["tcb"]["sgxtcbcomponents"]]
        if any(have < need for have, need in zip(comps, sgx, strict=True)):
            return False
        if pcesvn < level["tcb"]["pcesvn"]:
            return False
        if is_tdx:
            tdx = [c["svn"] for c in level["tcb"]["tdxtcbcomponents"]]
            return all(tee[i] >= tdx[i] for i in range(skip, 16))
        return True

    matching = [lv for lv in tcb["tcbLevels"] if meets(lv)]
    if not matching:
        return None, []
    level = matching[0]
    status, advisories = level["tcbStatus"], list(level.get("advisoryIDs", []))
    if is_tdx and tee[1] > 0:
        ident = next(i for i in tcb["tdxModuleIdentities"] if i["id"] == f"TDX_{tee[1]:02X}")
        mod = next(lv for lv in ident["tcbLevels"] if tee[0] >= lv["tcb"]["isvsvn"])
        status = _combine(status, mod["tcbStatus"])
        advisories += mod.get("advisoryIDs", [])
    qe_level = next(lv for lv in qe["tcbLevels"] if qe_isv_svn(quote) >= lv["tcb"]["isvsvn"])
    status = _combine(status, qe_level["tcbStatus"])
    advisories += qe_level.get("advisoryIDs", [])
    return status, list(dict.fromkeys(advisories))


def shifted(t: datetime, seconds: float) -> datetime:
    return t + timedelta(seconds=seconds)
