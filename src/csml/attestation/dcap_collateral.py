"""DCAP collateral: the input bundle, and the signed TCB info / QE identity documents."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from enum import StrEnum
from typing import Any


class CollateralFormatError(ValueError):
    """Collateral is missing a field or has one of the wrong form."""


class TcbStatus(StrEnum):
    """TCB statuses, as spelled in Intel's TCB info and identity documents."""

    UP_TO_DATE = "UpToDate"
    SW_HARDENING_NEEDED = "SWHardeningNeeded"
    CONFIGURATION_NEEDED = "ConfigurationNeeded"
    CONFIGURATION_AND_SW_HARDENING_NEEDED = "ConfigurationAndSWHardeningNeeded"
    OUT_OF_DATE = "OutOfDate"
    OUT_OF_DATE_CONFIGURATION_NEEDED = "OutOfDateConfigurationNeeded"
    REVOKED = "Revoked"
    TD_RELAUNCH_ADVISED = "TDRelaunchAdvised"
    TD_RELAUNCH_ADVISED_CONFIGURATION_NEEDED = "TDRelaunchAdvisedConfigurationNeeded"


_LEVEL_STATUSES = frozenset(list(TcbStatus)[:7])
_IDENTITY_STATUSES = frozenset({TcbStatus.UP_TO_DATE, TcbStatus.OUT_OF_DATE, TcbStatus.REVOKED})


@dataclass(frozen=True)
class Collateral:
    """Verification collateral, as fetched from Intel PCS or a PCCS.

    CRLs are hex DER (PEM also accepted); chains are PEM; `tcb_info` and
    `qe_identity` are the exact signed JSON texts; signatures are hex r||s.
    """

    pck_crl_issuer_chain: str
    root_ca_crl: str
    pck_crl: str
    tcb_info_issuer_chain: str
    tcb_info: str
    tcb_info_signature: str
    qe_identity_issuer_chain: str
    qe_identity: str
    qe_identity_signature: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Collateral:
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise CollateralFormatError(f"collateral lacks {', '.join(missing)}")
        wrong = [n for n in names if not isinstance(data[n], str)]
        if wrong:
            raise CollateralFormatError(f"collateral fields must be strings: {', '.join(wrong)}")
        return cls(**{n: data[n] for n in names})

    def to_json(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _Node:
    """Typed access to a JSON object; errors name the path of the bad field."""

    def __init__(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise CollateralFormatError(f"{path} must be a JSON object")
        self.value: dict[str, Any] = value
        self.path = path

    def _get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self.value:
            if default is not ...:
                return default
            raise CollateralFormatError(f"{self.path}.{key} is missing")
        got = self.value[key]
        if not isinstance(got, kind) or isinstance(got, bool):
            raise CollateralFormatError(f"{self.path}.{key} has the wrong type")
        return got

    def text(self, key: str) -> str:
        return str(self._get(key, str))

    def uint(self, key: str) -> int:
        got = int(self._get(key, int))
        if got < 0:
            raise CollateralFormatError(f"{self.path}.{key} is negative")
        return got

    def hexbytes(self, key: str, size: int) -> bytes:
        try:
            got = bytes.fromhex(self.text(key))
        except ValueError:
            raise CollateralFormatError(f"{self.path}.{key} is not hex") from None
        if len(got) != size:
            raise CollateralFormatError(f"{self.path}.{key} is {len(got)} bytes, expected {size}")
        return got

    def date(self, key: str) -> datetime:
        try:
            got = datetime.fromisoformat(self.text(key))
        except ValueError:
            raise CollateralFormatError(f"{self.path}.{key} is not an ISO 8601 date") from None
        if got.tzinfo is None:
            raise CollateralFormatError(f"{self.path}.{key} has no time zone")
        return got

    def node(self, key: str) -> _Node:
        return _Node(self._get(key, dict), f"{self.path}.{key}")

    def nodes(self, key: str, default: Any = ...) -> list[_Node]:
        items = self._get(key, list, default)
        return [_Node(v, f"{self.path}.{key}[{i}]") for i, v in enumerate(items)]

    def strings(self, key: str) -> tuple[str, ...]:
        items = self._get(key, list, [])
        if not all(isinstance(v, str) for v in items):
            raise CollateralFormatError(f"{self.path}.{key} must be a list of strings")
        return tuple(items)

    def status(self, allowed: frozenset[TcbStatus]) -> TcbStatus:
        raw = self.text("tcbStatus")
        if raw not in {s.value for s in allowed}:
            raise CollateralFormatError(f"{self.path}.tcbStatus '{raw}' is not a known status")
        return TcbStatus(raw)


def _parse_document(text: str, what: str) -> _Node:
    try:
        return _Node(json.loads(text), what)
    except json.JSONDecodeError as e:
        raise CollateralFormatError(f"{what} is not valid JSON: {e}") from None


@dataclass(frozen=True)
class TcbLevel:
    sgx_svns: tuple[int, ...]
    pce_svn: int
    tdx_svns: tuple[int, ...]
    tcb_date: str
    status: TcbStatus
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True)
class IdentityLevel:
    """A TCB level of the QE identity or of a TDX module identity."""

    isv_svn: int
    tcb_date: str
    status: TcbStatus
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True)
class TdxModuleIdentity:
    id: str
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes
    levels: tuple[IdentityLevel, ...]


def _identity_levels(node: _Node) -> tuple[IdentityLevel, ...]:
    levels = tuple(
        IdentityLevel(
            n.node("tcb").uint("isvsvn"),
            n.text("tcbDate"),
            n.status(_IDENTITY_STATUSES),
            n.strings("advisoryIDs"),
        )
        for n in node.nodes("tcbLevels")
    )
    if not levels:
        raise CollateralFormatError(f"{node.path}.tcbLevels is empty")
    return tuple(sorted(levels, key=lambda lv: lv.isv_svn, reverse=True))


def _svns(node: _Node, key: str) -> tuple[int, ...]:
    comps = node.nodes(key)
    if len(comps) != 16:
        raise CollateralFormatError(f"{node.path}.{key} has {len(comps)} entries, expected 16")
    return tuple(c.uint("svn") for c in comps)


def _tcb_level(n: _Node, version: int, tdx: bool) -> TcbLevel:
    tcb = n.node("tcb")
    if version >= 3:
        sgx = _svns(tcb, "sgxtcbcomponents")
        tdx_svns = _svns(tcb, "tdxtcbcomponents") if tdx else ()
    else:
        sgx = tuple(tcb.uint(f"sgxtcbcomp{i:02d}svn") for i in range(1, 17))
        tdx_svns = ()
    return TcbLevel(
        sgx, tcb.uint("pcesvn"), tdx_svns, n.text("tcbDate"), n.status(_LEVEL_STATUSES),
        n.strings("advisoryIDs"),
    )  # fmt: skip


def _module(n: _Node, with_levels: bool) -> TdxModuleIdentity:
    return TdxModuleIdentity(
        n.text("id") if with_levels else "",
        n.hexbytes("mrsigner", 48),
        n.hexbytes("attributes", 8),
        n.hexbytes("attributesMask", 8),
        _identity_levels(n) if with_levels else (),
    )


@dataclass(frozen=True)
class TcbInfo:
    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    fmspc: bytes
    pce_id: bytes
    tcb_evaluation_data_number: int
    levels: tuple[TcbLevel, ...]
    tdx_module: TdxModuleIdentity | None
    tdx_module_identities: tuple[TdxModuleIdentity, ...]

    @property
    def is_tdx(self) -> bool:
        return self.id == "TDX" and self.version >= 3

    @classmethod
    def parse(cls, text: str) -> TcbInfo:
        doc = _parse_document(text, "tcbInfo")
        version = doc.uint("version")
        if version not in (2, 3):
            raise CollateralFormatError(f"tcbInfo.version {version} is not supported (2 or 3)")
        if (tcb_type := doc.uint("tcbType")) != 0:
            raise CollateralFormatError(f"tcbInfo.tcbType {tcb_type} is not supported (0)")
        tcb_id = doc.text("id") if version >= 3 else "SGX"
        tdx = tcb_id == "TDX"
        levels = [_tcb_level(n, version, tdx) for n in doc.nodes("tcbLevels")]
        if not levels:
            raise CollateralFormatError("tcbInfo.tcbLevels is empty")
        # Intel's QVL orders levels by SGX SVNs, then PCESVN, then TDX SVNs, highest first.
        levels.sort(key=lambda lv: (lv.sgx_svns, lv.pce_svn, lv.tdx_svns), reverse=True)
        return cls(
            id=tcb_id,
            version=version,
            issue_date=doc.date("issueDate"),
            next_update=doc.date("nextUpdate"),
            fmspc=doc.hexbytes("fmspc", 6),
            pce_id=doc.hexbytes("pceId", 2),
            tcb_evaluation_data_number=doc.uint("tcbEvaluationDataNumber"),
            levels=tuple(levels),
            tdx_module=_module(doc.node("tdxModule"), False) if tdx else None,
            tdx_module_identities=tuple(
                _module(n, True) for n in doc.nodes("tdxModuleIdentities", [])
            ),
        )


@dataclass(frozen=True)
class QeIdentity:
    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    tcb_evaluation_data_number: int
    miscselect: bytes
    miscselect_mask: bytes
    attributes: bytes
    attributes_mask: bytes
    mrsigner: bytes
    isv_prod_id: int
    levels: tuple[IdentityLevel, ...]

    @classmethod
    def parse(cls, text: str) -> QeIdentity:
        doc = _parse_document(text, "enclaveIdentity")
        version = doc.uint("version")
        if version != 2:
            raise CollateralFormatError(f"enclaveIdentity.version {version} is not supported (2)")
        return cls(
            id=doc.text("id"),
            version=version,
            issue_date=doc.date("issueDate"),
            next_update=doc.date("nextUpdate"),
            tcb_evaluation_data_number=doc.uint("tcbEvaluationDataNumber"),
            miscselect=doc.hexbytes("miscselect", 4),
            miscselect_mask=doc.hexbytes("miscselectMask", 4),
            attributes=doc.hexbytes("attributes", 16),
            attributes_mask=doc.hexbytes("attributesMask", 16),
            mrsigner=doc.hexbytes("mrsigner", 32),
            isv_prod_id=doc.uint("isvprodid"),
            levels=_identity_levels(doc),
        )
