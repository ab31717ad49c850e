"""TCB level selection and status convergence, after Intel's QVL (4.1.2.4.17)."""

from __future__ import annotations

from dataclasses import dataclass

from csml.attestation.dcap_collateral import (
    IdentityLevel,
    QeIdentity,
    TcbInfo,
    TcbLevel,
    TcbStatus,
    TdxModuleIdentity,
)

_S = TcbStatus
_CONFIG = frozenset(
    {
        _S.CONFIGURATION_NEEDED,
        _S.OUT_OF_DATE_CONFIGURATION_NEEDED,
        _S.CONFIGURATION_AND_SW_HARDENING_NEEDED,
        _S.TD_RELAUNCH_ADVISED_CONFIGURATION_NEEDED,
    }
)
_SGX_RELAUNCHABLE = frozenset(
    {
        _S.UP_TO_DATE,
        _S.SW_HARDENING_NEEDED,
        _S.CONFIGURATION_NEEDED,
        _S.CONFIGURATION_AND_SW_HARDENING_NEEDED,
    }
)


class TcbNotSupported(ValueError):
    """No TCB level of the collateral matches the platform or enclave."""


class TdxModuleMismatch(ValueError):
    """The TCB info has no identity for the quote's TDX module."""


@dataclass(frozen=True)
class PlatformMatch:
    sgx_level: TcbLevel
    level: TcbLevel  # the level whose status applies (the TDX level for TDX)


def _shortfalls(have: tuple[int, ...], need: tuple[int, ...], start: int = 0) -> list[str]:
    return [
        f"#{i + 1}: {have[i]} < {need[i]}" for i in range(start, len(need)) if have[i] < need[i]
    ]


def _tdx_start(tee_tcb_svn: bytes) -> int:
    # With a TDX module major version, its SVNs (bytes 0-1) are judged by the module identity.
    return 2 if tee_tcb_svn[1] > 0 else 0


def match_platform(
    info: TcbInfo, components: tuple[int, ...], pce_svn: int, tee_tcb_svn: bytes | None
) -> PlatformMatch:
    """The highest TCB level the platform meets (levels are sorted highest first)."""
    sgx_level: TcbLevel | None = None
    for level in info.levels:
        if _shortfalls(components, level.sgx_svns) or pce_svn < level.pce_svn:
            continue
        if tee_tcb_svn is None:
            return PlatformMatch(level, level)
        sgx_level = sgx_level or level
        if not _shortfalls(tuple(tee_tcb_svn), level.tdx_svns, _tdx_start(tee_tcb_svn)):
            return PlatformMatch(sgx_level, level)
    raise TcbNotSupported(_explain_no_match(info, components, pce_svn, tee_tcb_svn))


def _explain_no_match(
    info: TcbInfo, components: tuple[int, ...], pce_svn: int, tee_tcb_svn: bytes | None
) -> str:
    def gaps(level: TcbLevel) -> list[str]:
        out = [f"SGX component {g}" for g in _shortfalls(components, level.sgx_svns)]
        if pce_svn < level.pce_svn:
            out.append(f"PCESVN {pce_svn} < {level.pce_svn}")
        if tee_tcb_svn is not None:
            start = _tdx_start(tee_tcb_svn)
            out += [
                f"TDX component {g}" for g in _shortfalls(tuple(tee_tcb_svn), level.tdx_svns, start)
            ]
        return out

    nearest = min(reversed(info.levels), key=lambda lv: len(gaps(lv)))  # ties: the lowest
    tdx = f", TEE_TCB_SVN {tee_tcb_svn.hex()}" if tee_tcb_svn is not None else ""
    return (
        f"TCB not supported: the platform (SGX TCB components {list(components)}, "
        f"PCESVN {pce_svn}{tdx}) is below every one of the {len(info.levels)} TCB levels of "
        f"the TCB info for FMSPC {info.fmspc.hex().upper()}; nearest level "
        f"({nearest.tcb_date}, {nearest.status}) needs {'; '.join(gaps(nearest))}"
    )


def _find_module(info: TcbInfo, major: int) -> TdxModuleIdentity:
    wanted = f"TDX_{major:02X}"
    for identity in info.tdx_module_identities:
        if identity.id.upper() == wanted:
            return identity
    known = ", ".join(i.id for i in info.tdx_module_identities) or "none"
    raise TdxModuleMismatch(f"TCB info has no TDX module identity {wanted} (has {known})")


def expected_tdx_module(info: TcbInfo, tee_tcb_svn: bytes) -> TdxModuleIdentity:
    """The module identity (MRSIGNER, attributes) the TD report must match."""
    if tee_tcb_svn[1] > 0:
        return _find_module(info, tee_tcb_svn[1])
    if info.tdx_module is None:
        raise TdxModuleMismatch("TDX TCB info has no tdxModule")
    return info.tdx_module


def _identity_level(levels: tuple[IdentityLevel, ...], isv_svn: int, what: str) -> IdentityLevel:
    for level in levels:
        if isv_svn >= level.isv_svn:
            return level
    raise TcbNotSupported(
        f"TCB not supported: {what} ISVSVN {isv_svn} is below the lowest level "
        f"({levels[-1].isv_svn})"
    )


def match_tdx_module(info: TcbInfo, tee_tcb_svn: bytes) -> IdentityLevel | None:
    """The module's TCB level; None for a module without major version (judged by the TCB level)."""
    if tee_tcb_svn[1] == 0:
        return None
    identity = _find_module(info, tee_tcb_svn[1])
    return _identity_level(identity.levels, tee_tcb_svn[0], f"TDX module {identity.id}")


def match_qe(identity: QeIdentity, isv_svn: int) -> IdentityLevel:
    return _identity_level(identity.levels, isv_svn, f"{identity.id} identity")


def _degrade(status: TcbStatus, other: TcbStatus) -> TcbStatus:
    """Fold an identity status (UpToDate, OutOfDate or Revoked) into a TCB level status."""
    if other == _S.OUT_OF_DATE:
        if status in (_S.UP_TO_DATE, _S.SW_HARDENING_NEEDED):
            return _S.OUT_OF_DATE
        if status in (_S.CONFIGURATION_NEEDED, _S.CONFIGURATION_AND_SW_HARDENING_NEEDED):
            return _S.OUT_OF_DATE_CONFIGURATION_NEEDED
    if other == _S.REVOKED:
        return _S.REVOKED
    return status


def converge_tdx_module(tdx_status: TcbStatus, module_status: TcbStatus) -> TcbStatus:
    return _degrade(tdx_status, module_status)


def converge_qe(status: TcbStatus, qe_status: TcbStatus) -> TcbStatus:
    return _degrade(status, qe_status)


def check_relaunch(
    info: TcbInfo,
    tee_tcb_svn2: bytes,
    sgx_status: TcbStatus,
    tdx_status: TcbStatus,
    module_status: TcbStatus,
    qe_status: TcbStatus,
) -> TcbStatus:
    """TDX 1.5: advise a TD relaunch when a TD-preserving update already fixed the TCB."""
    if (
        qe_status != _S.UP_TO_DATE
        or sgx_status not in _SGX_RELAUNCHABLE
        or tdx_status not in (_S.OUT_OF_DATE, _S.OUT_OF_DATE_CONFIGURATION_NEEDED)
        or module_status != _S.OUT_OF_DATE
    ):
        return tdx_status
    latest = info.levels[0]
    if tee_tcb_svn2[1] == 0:
        module_ok = tee_tcb_svn2[0] >= latest.tdx_svns[0]
    else:
        module_ok = tee_tcb_svn2[0] >= _find_module(info, tee_tcb_svn2[1]).levels[0].isv_svn
    if not (module_ok and tee_tcb_svn2[2] >= latest.tdx_svns[2]):
        return tdx_status
    if sgx_status in _CONFIG or tdx_status in _CONFIG:
        return _S.TD_RELAUNCH_ADVISED_CONFIGURATION_NEEDED
    return _S.TD_RELAUNCH_ADVISED


def merge_advisories(*groups: tuple[str, ...]) -> tuple[str, ...]:
    """Advisory IDs of all groups, first occurrence order, without repeats."""
    return tuple(dict.fromkeys(a for g in groups for a in g))
