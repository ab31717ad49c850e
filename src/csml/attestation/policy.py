"""What a client accepts of a worker's attestation: one TOML file per app.

    # ~/.config/csml/policies/opencv.toml (or `--policy FILE`)
    app = "opencv"                          # optional; refused if it names another app
    evidence = ["sgx-dcap"]                 # accepted kinds (default: sgx-dcap, tdx-dcap)
    mrenclave = ["<64 hex>"]                # SGX: any of these (a single string works too)
    mrsigner = ["<64 hex>"]
    min_isv_svn = 3
    isv_prod_id = 0
    mrtd = ["<96 hex>"]                     # TDX
    rtmr0 = ["<96 hex>"]                    # ... rtmr1, rtmr2, rtmr3
    tcb_statuses = ["UpToDate"]             # the default
    allow_debug = false                     # the default
    root_ca = "intel-root.pem"              # default: Intel's SGX root, pinned in csml
    collateral = "collateral.json"          # default: the collateral the worker sent

Paths are relative to the policy file. An SGX policy must name an MRENCLAVE or an
MRSIGNER and a TDX policy an MRTD: otherwise any enclave or TD would pass, and the
`measurements` check fails. `none` (unattested) evidence is never accepted by a policy;
only the client's explicit insecure flag lets it through.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from csml.attestation.dcap_collateral import TcbStatus

DEFAULT_EVIDENCE = ("sgx-dcap", "tdx-dcap")
HEX32 = ("mrenclave", "mrsigner")
HEX48 = ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3")
KEYS = {
    "app",
    "evidence",
    *HEX32,
    *HEX48,
    "min_isv_svn",
    "isv_prod_id",
    "tcb_statuses",
    "allow_debug",
    "root_ca",
    "collateral",
}
_HEX = re.compile(r"^[0-9a-fA-F]*$")


class PolicyError(ValueError):
    """The policy file is wrong; the message names the key."""


@dataclass(frozen=True)
class Policy:
    evidence: tuple[str, ...] = DEFAULT_EVIDENCE
    mrenclave: tuple[str, ...] = ()
    mrsigner: tuple[str, ...] = ()
    min_isv_svn: int | None = None
    isv_prod_id: int | None = None
    mrtd: tuple[str, ...] = ()
    rtmr0: tuple[str, ...] = ()
    rtmr1: tuple[str, ...] = ()
    rtmr2: tuple[str, ...] = ()
    rtmr3: tuple[str, ...] = ()
    tcb_statuses: tuple[str, ...] = (TcbStatus.UP_TO_DATE.value,)
    allow_debug: bool = False
    root_ca_pem: bytes | None = None
    collateral: dict[str, Any] | None = None
    app: str | None = None
    source: str = "default policy"
    allow_unattested: bool = False

    def unattested(self, allow: bool) -> Policy:
        """This policy, with the client's insecure flag."""
        return replace(self, allow_unattested=allow)

    def rtmr(self, index: int) -> tuple[str, ...]:
        values: tuple[str, ...] = getattr(self, f"rtmr{index}")
        return values

    @classmethod
    def load(cls, path: Path) -> Policy:
        try:
            text = path.read_text()
        except OSError as exc:
            raise PolicyError(f"cannot read the policy {path}: {exc.strerror}") from None
        return cls.from_toml(text, base_dir=path.parent, source=str(path))

    @classmethod
    def from_toml(cls, text: str, *, base_dir: Path, source: str = "policy") -> Policy:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"{source} is not valid TOML: {exc}") from None
        return cls.from_dict(data, base_dir=base_dir, source=source)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, base_dir: Path, source: str) -> Policy:
        unknown = sorted(set(data) - KEYS)
        if unknown:
            raise PolicyError(
                f"{source}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(KEYS))}"
            )
        kw: dict[str, Any] = {"source": source}
        if "app" in data:
            kw["app"] = _string(data["app"], "app", source)
        if "evidence" in data:
            kinds = _strings(data["evidence"], "evidence", source)
            if "none" in kinds:
                raise PolicyError(
                    f"{source}: evidence: 'none' cannot be accepted by a policy; unattested "
                    "workers need the client's --insecure-allow-unattested flag"
                )
            kw["evidence"] = kinds
        for key in (*HEX32, *HEX48):
            if key in data:
                size = 32 if key in HEX32 else 48
                kw[key] = tuple(
                    _hex(v, key, size, source) for v in _strings(data[key], key, source)
                )
        for key in ("min_isv_svn", "isv_prod_id"):
            if key in data:
                value = data[key]
                if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 65536:
                    raise PolicyError(f"{source}: {key} must be an integer 0..65535")
                kw[key] = value
        if "tcb_statuses" in data:
            statuses = _strings(data["tcb_statuses"], "tcb_statuses", source)
            valid = [s.value for s in TcbStatus]
            for s in statuses:
                if s not in valid:
                    raise PolicyError(
                        f"{source}: tcb_statuses: {s!r} is not a TCB status; one of: "
                        + ", ".join(valid)
                    )
            kw["tcb_statuses"] = statuses
        if "allow_debug" in data:
            if not isinstance(data["allow_debug"], bool):
                raise PolicyError(f"{source}: allow_debug must be true or false")
            kw["allow_debug"] = data["allow_debug"]
        if "root_ca" in data:
            path = base_dir / _string(data["root_ca"], "root_ca", source)
            try:
                pem = path.read_bytes()
            except OSError as exc:
                raise PolicyError(
                    f"{source}: root_ca: cannot read {path}: {exc.strerror}"
                ) from None
            if b"-----BEGIN CERTIFICATE-----" not in pem:
                raise PolicyError(f"{source}: root_ca: {path} holds no PEM certificate")
            kw["root_ca_pem"] = pem
        if "collateral" in data:
            path = base_dir / _string(data["collateral"], "collateral", source)
            try:
                collateral = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise PolicyError(f"{source}: collateral: cannot read {path}: {exc}") from None
            if not isinstance(collateral, dict):
                raise PolicyError(f"{source}: collateral: {path} is not a JSON object")
            kw["collateral"] = collateral
        return cls(**kw)

    def describe(self) -> str:
        parts = [f"evidence {', '.join(self.evidence)}"]
        for key in (*HEX32, *HEX48):
            values = getattr(self, key)
            if values:
                parts.append(f"{key} {' | '.join(v[:16] + '…' for v in values)}")
        if self.min_isv_svn is not None:
            parts.append(f"isv_svn >= {self.min_isv_svn}")
        parts.append(f"TCB {', '.join(self.tcb_statuses)}")
        parts.append("debug allowed" if self.allow_debug else "no debug")
        if self.root_ca_pem is not None:
            parts.append("custom root CA")
        return "; ".join(parts)


def _string(value: Any, key: str, source: str) -> str:
    if not isinstance(value, str) or not value:
        raise PolicyError(f"{source}: {key} must be a non-empty string")
    return value


def _strings(value: Any, key: str, source: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise PolicyError(f"{source}: {key} must be a string or a list of strings")
    return tuple(value)


def _hex(value: str, key: str, size: int, source: str) -> str:
    if not _HEX.match(value) or len(value) != 2 * size:
        raise PolicyError(f"{source}: {key}: {value!r} is not {size} bytes of hex")
    return value.lower()


def policy_path(app: str, config_dir: Path) -> Path:
    """Where the CLI and SDK look for an app's policy when none is given."""
    return config_dir / "policies" / f"{app}.toml"
