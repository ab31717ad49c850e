"""How applications describe themselves: operations, parameters, files."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field

from csml import placement

Requirement = Annotated[dict[str, Any], AfterValidator(placement.check_requires)]
"""Labels a worker must have (`csml.placement`'s language), checked: an operation's or a
job's `requires`."""


class ModelFormat(BaseModel):
    """A model file format an operation writes (output) or reads (input)."""

    kind: str = Field(description="What the model is, e.g. `svm`, `mlp`, `char-rnn`, `dnn`.")
    format: str = Field(description="The file format's name, e.g. `csml-dlib-svm`.")
    version: int = Field(
        ge=1, description="Output: the version written. Input: the newest version read."
    )


class FileSpec(BaseModel):
    name: str
    description: str = ""
    media_type: str = Field("application/octet-stream", description="Expected media type.")
    required: bool = True
    model: ModelFormat | None = Field(
        None, description="Set when the file is a model (kept as an artifact, or usable by id)."
    )


class OperationInfo(BaseModel):
    name: str
    description: str = ""
    params_schema: dict[str, Any] = Field(description="JSON schema of the parameters.")
    inputs: list[FileSpec] = []
    outputs: list[FileSpec] = []
    requires: Requirement = Field(
        {},
        description='Labels a worker must have to run this operation, e.g. {"gpu": true} '
        'or {"gpu_memory_gb": {"min": 16}} (see docs/user-guide/placement.md).',
    )

    deterministic: bool = Field(
        False,
        description="Same inputs and params give byte-identical outputs and result on any "
        "worker: results of contributed workers can be verified by comparing them (issue 13).",
    )


class AppManifest(BaseModel):
    """What a worker announces about the app it serves."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,39}$")
    version: str
    description: str = ""
    operations: list[OperationInfo]


class QueueInfo(BaseModel):
    depth: int = Field(description="Jobs waiting.")
    running: int
    capacity: int = Field(description="Most jobs that may wait; more get 429.")


class AppInfo(AppManifest):
    workers: int = Field(description="Live workers serving this app.")
    operator_workers: int = Field(
        0, description="Of those, run by the operator (joined with the operator's tokens)."
    )
    contributed_workers: int = Field(
        0, description="Of those, contributed by identities (`csml contribute`)."
    )
    attested_workers: int = Field(
        0,
        description="Of those, registered with an attestation (announced: the coordinator "
        "does not check it; clients of confidential jobs do).",
    )
    probation_workers: int = Field(
        0, description="Contributed workers on probation: every result of theirs is verified."
    )
    quarantined_workers: int = Field(
        0, description="Contributed workers in quarantine: they only re-run jobs being checked."
    )
    slots: int = Field(description="Jobs the live workers can run at once.")
    sandboxes: list[str] = Field(
        [], description="How the live workers isolate jobs (one entry per distinct set-up)."
    )
    queue: QueueInfo
