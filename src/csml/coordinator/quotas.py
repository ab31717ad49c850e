"""Per-identity quotas, checked inside the transaction that lands the rows.

Invariants:

- **Race-free.** Every check that admits a job or keeps a model runs in the write
  transaction that creates the job (or keeps the model), after `lock_identity`. On
  SQLite that transaction began with BEGIN IMMEDIATE, so all writers are serialised;
  on PostgreSQL the identity's row is locked (FOR NO KEY UPDATE: inserts that
  reference the identity still proceed), so one identity's submissions, model
  imports and model keeps run one at a time across coordinators while other
  identities go on in parallel. N concurrent submissions against a limit k land
  exactly k. A refused transaction writes nothing.
- **Queued + running jobs** (`max_active_jobs`): jobs that are not pipeline steps
  (a pipeline counts once, for as long as it runs).
- **Stored bytes** (`max_stored_bytes`): inputs and outputs of the identity's kept
  jobs (each blob once), the params they hold, and its models that outlived their
  job; a new job's uploaded files and params count before it lands.
- **Models** (`max_models`): models kept plus the models the identity's queued and
  running jobs will keep (each model output of a job; for a pipeline, the model
  outputs of its current and later steps). A submission whose models would not fit
  is refused up front (429; 422 when they could never fit), so the models of the
  jobs admitted always fit. The transaction that keeps a model counts again (a
  limit lowered across a restart, say): past the limit the file stays an ordinary
  output of its job and the job says why.
- Models do not expire: they stay until their owner deletes them or erases their
  identity (a job's files expire with the job; a model outlives it).

Every refusal is a 429 with `Retry-After` that names the limit and its value.
"""

from __future__ import annotations

import json
import math
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Text, cast, exists, func, or_, select
from sqlalchemy.orm import Session

from csml.coordinator.errors import ApiError, unauthorized
from csml.schemas import JobState, OperationInfo
from csml.store.tables import Identity, Job, JobFile, utcnow
from csml.store.tables_artifacts import ModelArtifact

if TYPE_CHECKING:
    from csml.coordinator.catalog import Catalog
    from csml.coordinator.config import Settings

ACTIVE = (JobState.queued.value, JobState.running.value)
TERMINAL = (JobState.succeeded.value, JobState.failed.value, JobState.cancelled.value)


class HasSettings(Protocol):
    """Anything that carries the coordinator's settings (the Core, the JobQueue)."""

    @property
    def settings(self) -> Settings: ...


def duration(seconds: float) -> str:
    s = max(1, math.ceil(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min {s % 60} s" if s % 60 else f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


def too_many(code: str, message: str, retry_after: float, **detail: Any) -> ApiError:
    retry = max(1, math.ceil(retry_after))
    return ApiError(
        429,
        code,
        message,
        headers={"Retry-After": str(retry)},
        details=[{**detail, "retry_after": retry}],
    )


# -- the identity's lock --------------------------------------------------------


def lock_identity(session: Session, identity_id: str) -> bool:
    """Serialise this identity's quota checks (see the module's invariants); False
    when the identity is gone (erased while the request was in flight)."""
    stmt = select(Identity.id).where(Identity.id == identity_id)
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(key_share=True)  # FOR NO KEY UPDATE
    return session.scalar(stmt) is not None


def require_identity(session: Session, identity_id: str) -> None:
    """`lock_identity`, refusing (401) when the identity was erased meanwhile."""
    if not lock_identity(session, identity_id):
        raise unauthorized(
            "this identity was erased while the request was in flight; nothing was kept"
        )


# -- queued + running jobs ----------------------------------------------------------


def active_jobs(session: Session, identity_id: str) -> int:
    """Queued and running jobs of the identity; a pipeline counts once, not once per step."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.owner_id == identity_id, Job.state.in_(ACTIVE), Job.parent_seq.is_(None))
        )
        or 0
    )


def check_active_jobs(owner: HasSettings, session: Session, identity_id: str) -> None:
    s = owner.settings
    if not s.max_active_jobs or active_jobs(session, identity_id) < s.max_active_jobs:
        return
    retry = s.retry_after_seconds
    raise too_many(
        "active_jobs_limit",
        f"concurrent job limit: {s.max_active_jobs} queued or running jobs reached; "
        f"resets when one of them ends (retry in {duration(retry)})",
        retry,
        limit="concurrent job limit",
        value=s.max_active_jobs,
    )


# -- stored bytes ---------------------------------------------------------------


def params_bytes(params: dict[str, Any] | None) -> int:
    """Bytes a new job's params will keep in the store (compact JSON; `{}` keeps nothing)."""
    if not params:
        return 0
    return len(json.dumps(params, separators=(",", ":"), ensure_ascii=False).encode())


def stored_bytes(session: Session, identity_id: str) -> int:
    """Bytes of the identity's job files still kept (inputs and outputs), plus its models
    whose job is gone (while the job is kept, the model shares its output's bytes), plus
    the params its kept jobs hold."""
    # Each blob once: a pipeline's steps and the pipeline itself share their files' blobs.
    blobs = (
        select(JobFile.blob, JobFile.size)
        .join(Job, Job.seq == JobFile.job_seq)
        .where(Job.owner_id == identity_id)
        .distinct()
        .subquery()
    )
    total = session.scalar(select(func.coalesce(func.sum(blobs.c.size), 0)))
    kept_jobs = select(Job.id).where(Job.owner_id == identity_id)
    models = session.scalar(
        select(func.coalesce(func.sum(ModelArtifact.size), 0)).where(
            ModelArtifact.owner_id == identity_id,
            or_(ModelArtifact.job_id.is_(None), ModelArtifact.job_id.not_in(kept_jobs)),
        )
    )
    # Params are kept in the job's row (and come back in results): count them too
    # (as their JSON text; empty params, `{}`, count nothing).
    params_text = func.length(cast(Job.params, Text))
    params = session.scalar(
        select(func.coalesce(func.sum(params_text), 0)).where(
            Job.owner_id == identity_id, params_text > 2
        )
    )
    return int(total or 0) + int(models or 0) + int(params or 0)


def check_storage(
    owner: HasSettings, session: Session, identity_id: str, upload_bytes: int
) -> None:
    """Refuse (429) when the identity's stored bytes, plus `upload_bytes` coming in,
    pass `max_stored_bytes`."""
    limit = owner.settings.max_stored_bytes
    used = stored_bytes(session, identity_id)
    if used < limit and used + upload_bytes <= limit:
        return
    retention = timedelta(hours=owner.settings.retention_hours)
    oldest = session.scalar(
        select(func.min(Job.finished_at)).where(
            Job.owner_id == identity_id,
            Job.state.in_(TERMINAL),
            exists().where(JobFile.job_seq == Job.seq),
        )
    )
    if oldest is not None:
        wait = max(1.0, (oldest + retention - utcnow()).total_seconds())
        when = f"resets in {duration(wait)}, when your oldest finished job expires"
    else:
        wait = retention.total_seconds()
        when = (
            f"resets as your jobs end and expire ({duration(wait)} after they end); "
            "or erase your identity"
        )
    incoming = f" and this upload is {upload_bytes} bytes" if used < limit else ""
    raise too_many(
        "storage_quota",
        f"storage quota: {limit} bytes per identity reached ({used} stored{incoming}); {when}",
        wait,
        limit="storage quota",
        value=limit,
        stored=used,
    )


# -- models -------------------------------------------------------------------------


def models_made(op: OperationInfo) -> int:
    """How many models a job of `op` keeps when it succeeds (its model outputs)."""
    return sum(1 for f in op.outputs if f.model is not None)


def model_count(session: Session, identity_id: str) -> int:
    """How many model artifacts `identity_id` keeps in the store."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(ModelArtifact)
            .where(ModelArtifact.owner_id == identity_id)
        )
        or 0
    )


def _made_by(catalog: Catalog, session: Session, app: str, operation: str) -> int:
    try:
        _, op = catalog.operation(app, operation, session)
    except ApiError:  # an app no longer catalogued keeps nothing
        return 0
    return models_made(op)


def reserved_models(session: Session, catalog: Catalog, identity_id: str) -> int:
    """Models the identity's queued and running jobs will keep if they succeed."""
    owned = (Job.owner_id == identity_id, Job.state.in_(ACTIVE), Job.parent_seq.is_(None))
    total = 0
    singles = session.execute(
        select(Job.app, Job.operation, func.count())
        .where(*owned, Job.step_index.is_(None))
        .group_by(Job.app, Job.operation)
    ).all()
    for app, operation, n in singles:
        total += n * _made_by(catalog, session, app, operation)
    pipelines = session.execute(
        select(Job.params, Job.step_index).where(*owned, Job.step_index.is_not(None))
    ).all()
    for params, current in pipelines:  # the current step and those after it
        for step in (params or {}).get("steps", [])[current or 0 :]:
            total += _made_by(catalog, session, str(step.get("app")), str(step.get("operation")))
    return total


def check_models(owner: HasSettings, count: int, adding: int = 1, reserved: int = 0) -> None:
    """Refuse keeping `adding` more model artifacts on top of `count` kept (from
    `model_count`) and `reserved` by running jobs (`reserved_models`) past
    `max_models`: 429 (a slot comes back when a model is deleted or a job ends, so
    the refusal carries the retry interval), or 422 when `adding` alone is past it."""
    limit = owner.settings.max_models
    if not limit or count + reserved + adding <= limit:
        return
    if adding > limit:
        raise ApiError(
            422,
            "model_quota",
            f"model quota: this submission would keep {adding} models, more than the "
            f"{limit} models per identity allowed here; split it into smaller submissions",
            field="spec",
            details=[{"limit": "model quota", "value": limit, "adding": adding}],
        )
    pending = f", {reserved} more to be kept by your queued or running jobs" if reserved else ""
    retry = owner.settings.retry_after_seconds
    raise too_many(
        "model_quota",
        f"model quota: {limit} models per identity reached ({count} kept{pending}"
        f"{f'; this submission would keep {adding}' if adding > 1 else ''}); "
        f"resets when one of them is deleted or a job ends (retry in {duration(retry)})",
        retry,
        limit="model quota",
        value=limit,
    )


def check_new_models(
    owner: HasSettings, session: Session, catalog: Catalog, identity_id: str, adding: int
) -> None:
    """Refuse (see `check_models`) `adding` more models on top of those kept and reserved."""
    if not adding or not owner.settings.max_models:
        return
    check_models(
        owner,
        model_count(session, identity_id),
        adding,
        reserved_models(session, catalog, identity_id),
    )


def may_keep_models(owner: HasSettings, session: Session, identity_id: str, adding: int) -> int:
    """In the transaction that keeps `adding` models: how many of them fit under the
    quota now (models kept so far only: those reserved were counted at submission)."""
    limit = owner.settings.max_models
    if not limit or not adding:
        return adding
    lock_identity(session, identity_id)
    return max(0, min(adding, limit - model_count(session, identity_id)))


# -- a new job --------------------------------------------------------------------


def check_new_job(
    owner: HasSettings,
    session: Session,
    catalog: Catalog,
    identity_id: str,
    *,
    upload_bytes: int,
    adding_models: int,
) -> None:
    """Everything a new job (or pipeline) must fit, in the transaction that creates it:
    the identity still exists (401 if it was erased meanwhile), queued + running jobs,
    stored bytes with its uploads, and models with those it would keep."""
    s = owner.settings
    require_identity(session, identity_id)
    check_active_jobs(owner, session, identity_id)
    if s.max_stored_bytes:
        check_storage(owner, session, identity_id, upload_bytes)
    check_new_models(owner, session, catalog, identity_id, adding_models)
