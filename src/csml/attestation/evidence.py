"""Attestation evidence behind one small plug-in interface.

A worker makes an X25519 key pair at start and asks its `EvidenceProvider` for evidence
whose report data is `worker_key_report_data(public_key, app)`: SHA-256(b"csml-worker-key-v1"
|| public_key || app) then 32 zero bytes. A client asks the `EvidenceVerifier` of the
evidence's kind to check it against collateral and its `Policy`, and gets every check with
its outcome (`Assessment`); it encrypts a job only to workers whose assessment is ok.

Kinds built in:

- `sgx-dcap`: an Intel SGX DCAP quote (provider: Gramine's /dev/attestation; verifier:
  `dcap.verify_quote`, then MRENCLAVE / MRSIGNER / ISV SVN / debug / TCB status per policy);
- `tdx-dcap`: an Intel TDX DCAP quote (provider: Linux configfs-tsm; verifier: DCAP, then
  MRTD / RTMR0-3 / debug / TCB status);
- `none`: no evidence at all, for development. INSECURE: whoever runs the worker can read
  the jobs; clients refuse it unless told `allow_unattested` / `--insecure-allow-unattested`.

More providers (what `csml worker --attestation NAME` selects) come from the entry-point
group `csml.attestation_providers`, or from the environment variable
`CSML_ATTESTATION_PROVIDERS="name=module:factory,..."` (e.g. a test's synthetic quotes);
more verifiers from the entry-point group `csml.attestation_verifiers` (name = kind). A
factory is called without arguments and returns the provider or verifier. Nothing here
uses the network: collateral comes with the evidence or from the client's policy.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from csml.crypto.binding import worker_key_report_data

if TYPE_CHECKING:
    from csml.attestation.policy import Policy

PROVIDER_GROUP = "csml.attestation_providers"
VERIFIER_GROUP = "csml.attestation_verifiers"
PROVIDERS_ENV = "CSML_ATTESTATION_PROVIDERS"
INSECURE_KIND = "none"


class EvidenceUnavailable(Exception):
    """A provider cannot produce evidence here (no TEE, no driver, wrong platform)."""


@dataclass(frozen=True)
class Check:
    """One named check and its outcome; `expected`/`actual` say what did not match."""

    name: str
    ok: bool
    detail: str = ""
    expected: str | None = None
    actual: str | None = None

    def describe(self) -> str:
        text = f"check '{self.name}' {'passed' if self.ok else 'failed'}"
        if self.detail:
            text += f": {self.detail}"
        if not self.ok and (self.expected is not None or self.actual is not None):
            text += f" (expected {self.expected}, actual {self.actual})"
        return text


@dataclass(frozen=True)
class Assessment:
    """Every check run on one worker's evidence."""

    kind: str
    checks: tuple[Check, ...]
    insecure: bool = False
    measurements: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


@runtime_checkable
class EvidenceProvider(Protocol):
    """Worker side: evidence binding the given 64 bytes of report data."""

    name: str
    kind: str

    def produce(self, report_data: bytes) -> bytes: ...


@runtime_checkable
class EvidenceVerifier(Protocol):
    """Client side: check evidence (with collateral) against a policy and report data."""

    kind: str
    insecure: bool

    def verify(
        self,
        evidence: bytes,
        collateral: Mapping[str, Any] | None,
        policy: Policy,
        expected_report_data: bytes,
        now: datetime,
    ) -> Assessment: ...


# -- none ------------------------------------------------------------------------------


class NoneProvider:
    """No evidence. Development only: the operator can read every job."""

    name = INSECURE_KIND
    kind = INSECURE_KIND

    def produce(self, report_data: bytes) -> bytes:
        return b""


class NoneVerifier:
    kind = INSECURE_KIND
    insecure = True

    def verify(
        self,
        evidence: bytes,
        collateral: Mapping[str, Any] | None,
        policy: Policy,
        expected_report_data: bytes,
        now: datetime,
    ) -> Assessment:
        check = Check(
            "unattested",
            policy.allow_unattested,
            "INSECURE: this worker has no attestation evidence; whoever runs it can read "
            "the jobs sent to it"
            + (
                " (accepted: insecure mode was asked for)"
                if policy.allow_unattested
                else "; refused unless allow_unattested=True / --insecure-allow-unattested"
            ),
            expected="sgx-dcap or tdx-dcap evidence",
            actual="none (unattested)",
        )
        return Assessment(self.kind, (check,), insecure=True)


# -- registries ------------------------------------------------------------------------


def _builtin_providers() -> dict[str, Callable[[], EvidenceProvider]]:
    from csml.attestation.evidence_gramine import GramineSgxProvider
    from csml.attestation.evidence_tdx import TdxConfigfsProvider

    return {"none": NoneProvider, "sgx-dcap": GramineSgxProvider, "tdx-dcap": TdxConfigfsProvider}


def _builtin_verifiers() -> dict[str, Callable[[], EvidenceVerifier]]:
    from csml.attestation.evidence_dcap import SgxDcapVerifier, TdxDcapVerifier

    return {"none": NoneVerifier, "sgx-dcap": SgxDcapVerifier, "tdx-dcap": TdxDcapVerifier}


def _load_object(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise LookupError(f"{spec!r} is not of the form module:object")
    try:
        obj: Any = importlib.import_module(module_name.strip())
        for part in attr.strip().split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise LookupError(f"cannot load {spec!r}: {exc}") from None
    return obj


def _env_providers() -> dict[str, str]:
    found: dict[str, str] = {}
    for item in os.environ.get(PROVIDERS_ENV, "").split(","):
        if not item.strip():
            continue
        name, sep, target = item.partition("=")
        if not sep or not name.strip() or not target.strip():
            raise LookupError(
                f"{PROVIDERS_ENV}: {item.strip()!r} is not of the form name=module:object"
            )
        found[name.strip()] = target.strip()
    return found


def provider_names() -> list[str]:
    names = set(_builtin_providers())
    names.update(ep.name for ep in entry_points(group=PROVIDER_GROUP))
    names.update(_env_providers())
    return sorted(names)


def load_provider(name: str) -> EvidenceProvider:
    """The provider `csml worker --attestation NAME` selects."""
    factory: Callable[[], Any] | None = None
    env = _env_providers()
    if name in env:
        factory = _load_object(env[name])
    else:
        for ep in entry_points(group=PROVIDER_GROUP):
            if ep.name == name:
                factory = ep.load()
                break
        else:
            factory = _builtin_providers().get(name)
    if factory is None:
        raise LookupError(f"no attestation provider {name!r}; known: {', '.join(provider_names())}")
    provider = factory()
    if not isinstance(provider, EvidenceProvider):
        raise LookupError(f"attestation provider {name!r} lacks name/kind/produce()")
    return provider


def verifier_for(kind: str) -> EvidenceVerifier | None:
    for ep in entry_points(group=VERIFIER_GROUP):
        if ep.name == kind:
            verifier = ep.load()()
            return verifier if isinstance(verifier, EvidenceVerifier) else None
    factory = _builtin_verifiers().get(kind)
    return factory() if factory is not None else None


def assess(
    *,
    kind: str,
    evidence: bytes,
    collateral: Mapping[str, Any] | None,
    public_key: bytes,
    app: str,
    policy: Policy,
    now: datetime,
) -> Assessment:
    """Judge one worker's evidence for `public_key` serving `app` under `policy`."""
    verifier = verifier_for(kind)
    if verifier is not None and verifier.insecure:
        return verifier.verify(evidence, collateral, policy, b"", now)
    accepted = ", ".join(policy.evidence) or "none"
    if kind not in policy.evidence:
        return Assessment(
            kind,
            (
                Check(
                    "evidence_kind",
                    False,
                    "the policy does not accept this kind of evidence",
                    expected=f"one of: {accepted}",
                    actual=kind,
                ),
            ),
        )
    if verifier is None:
        return Assessment(
            kind,
            (
                Check(
                    "evidence_kind",
                    False,
                    f"no verifier for evidence kind {kind!r} is installed here",
                    expected=f"one of: {accepted}",
                    actual=kind,
                ),
            ),
        )
    expected = worker_key_report_data(public_key, app)
    result = verifier.verify(evidence, collateral, policy, expected, now)
    first = Check("evidence_kind", True, f"{kind} is accepted by the policy ({policy.source})")
    return Assessment(
        result.kind, (first, *result.checks), result.insecure, dict(result.measurements)
    )
