"""The client side of confidential jobs: judge workers, encrypt a job, keep its keys.

    keys, spec = encrypt_job(...)   # after choose_recipients(assess_workers(...))

Nothing secret leaves the client: the job's data key goes out only sealed to the
accepted workers' attested keys, and the per-job result key stays here (in memory, and,
for the CLI, in a 0600 file per job under the user config folder).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nacl.public import PrivateKey

from csml.attestation.evidence import Assessment, assess
from csml.attestation.policy import Policy, PolicyError, policy_path
from csml.client.config import config_path
from csml.client.errors import CsmlError
from csml.client.key_store import KeyStore as KeyStore  # (its home before)
from csml.crypto import (
    DecryptionError,
    b64d,
    b64e,
    new_data_key,
    new_job_nonce,
    wrap_key,
)
from csml.crypto.envelope import JobManifest, ResultPayload, open_result, seal_manifest
from csml.schemas import EncryptedResult, WorkerKeyInfo


class AttestationRefused(CsmlError):
    """No worker of the app passed attestation under the client's policy."""

    def __init__(self, message: str, assessments: list[WorkerAssessment]) -> None:
        super().__init__(message, code="attestation_refused")
        self.assessments = assessments


@dataclass
class WorkerAssessment:
    worker: WorkerKeyInfo
    assessment: Assessment

    @property
    def accepted(self) -> bool:
        return self.assessment.ok

    def summary(self) -> str:
        who = f"worker {self.worker.worker_id[:12]} ({self.worker.kind})"
        if self.accepted:
            return f"{who}: accepted" + (" INSECURELY (unattested)" if self.worker.insecure else "")
        return f"{who}: " + "; ".join(c.describe() for c in self.assessment.failures)


def resolve_policy(app: str, policy: Policy | str | os.PathLike[str] | None) -> Policy:
    """`policy` as given, else the app's policy file under the user config, else defaults."""
    try:
        if isinstance(policy, Policy):
            chosen = policy
        elif policy is not None:
            chosen = Policy.load(Path(policy))
        else:
            path = policy_path(app, config_path().parent)
            chosen = Policy.load(path) if path.exists() else Policy()
    except PolicyError as exc:
        raise CsmlError(str(exc), field="policy") from None
    if chosen.app is not None and chosen.app != app:
        raise CsmlError(f"the policy {chosen.source} is for app {chosen.app!r}, not {app!r}")
    return chosen


def assess_workers(
    workers: list[WorkerKeyInfo], policy: Policy, now: datetime | None = None
) -> list[WorkerAssessment]:
    when = now or datetime.now(UTC)
    out = []
    for w in workers:
        try:
            public_key = b64d(w.public_key, "public_key", 32)
            evidence = b64d(w.evidence, "evidence")
        except ValueError as exc:
            from csml.attestation.evidence import Check

            out.append(
                WorkerAssessment(
                    w, Assessment(w.kind, (Check("evidence_format", False, str(exc)),))
                )
            )
            continue
        result = assess(
            kind=w.kind,
            evidence=evidence,
            collateral=w.collateral,
            public_key=public_key,
            app=w.app,
            policy=policy,
            now=when,
        )
        out.append(WorkerAssessment(w, result))
    return out


def choose_recipients(
    assessments: list[WorkerAssessment], app: str, policy: Policy
) -> list[WorkerAssessment]:
    """The accepted workers; refuses (naming every failed check) when there is none."""
    if not assessments:
        raise AttestationRefused(
            f"no live {app} worker has registered a key for confidential jobs; start one "
            "(`csml worker --app ...`) and retry",
            [],
        )
    accepted = [a for a in assessments if a.accepted]
    if accepted:
        return accepted
    lines = [f"refusing to submit: no {app} worker passed attestation ({policy.source})"]
    lines += [f"  {a.summary()}" for a in assessments]
    raise AttestationRefused("\n".join(lines), assessments)


@dataclass
class JobKeys:
    """What only the client knows about a confidential job."""

    app: str
    operation: str
    job_nonce: bytes
    result_key: PrivateKey
    recipients: dict[str, bytes]  # worker id -> attested public key
    data_key: bytes = field(default=b"", repr=False)  # only while submitting; never saved

    def to_json(self) -> dict[str, Any]:
        return {
            "v": 1,
            "app": self.app,
            "operation": self.operation,
            "job_nonce": b64e(self.job_nonce),
            "result_private_key": b64e(bytes(self.result_key)),
            "recipients": {w: b64e(k) for w, k in self.recipients.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobKeys:
        return cls(
            app=data["app"],
            operation=data["operation"],
            job_nonce=b64d(data["job_nonce"], "job_nonce"),
            result_key=PrivateKey(b64d(data["result_private_key"], "result key", 32)),
            recipients={w: b64d(k, "public key", 32) for w, k in data["recipients"].items()},
        )


def encrypt_job(
    app: str,
    operation: str,
    params: dict[str, Any],
    input_names: list[str],
    recipients: list[WorkerKeyInfo],
) -> tuple[JobKeys, dict[str, Any]]:
    """Fresh keys for one job, and the `spec.confidential` object to send."""
    data_key = new_data_key()
    nonce = new_job_nonce()
    result_key = PrivateKey.generate()
    result_public = bytes(result_key.public_key)
    keys = JobKeys(
        app=app,
        operation=operation,
        job_nonce=nonce,
        result_key=result_key,
        recipients={w.worker_id: b64d(w.public_key, "public_key", 32) for w in recipients},
        data_key=data_key,
    )
    # The coordinator names operations with underscores (`detect-faces` is `detect_faces`).
    manifest = JobManifest(app, operation.replace("-", "_"), params, input_names, result_public)
    spec = {
        "version": 1,
        "job_nonce": b64e(nonce),
        "recipients": [
            {"worker_id": w, "wrapped_key": b64e(wrap_key(data_key, pk))}
            for w, pk in keys.recipients.items()
        ],
        "result_public_key": b64e(result_public),
        "encrypted_params": b64e(seal_manifest(data_key, nonce, manifest)),
    }
    return keys, spec


def open_job_result(
    job_id: str, keys: JobKeys, encrypted: EncryptedResult
) -> tuple[ResultPayload, bytes]:
    """Decrypt a job's result; the key it returns opens the output files."""
    worker_pk = keys.recipients.get(encrypted.worker_id)
    if worker_pk is None:
        raise CsmlError(
            f"the result of job {job_id[:12]} claims to come from worker "
            f"{encrypted.worker_id[:12]}, which this job was not encrypted to: refused"
        )
    try:
        return open_result(
            encrypted,
            result_key=keys.result_key,
            worker_public_key=worker_pk,
            job_nonce=keys.job_nonce,
        )
    except (DecryptionError, ValueError) as exc:
        raise CsmlError(f"the result of job {job_id[:12]} does not decrypt: {exc}") from None
