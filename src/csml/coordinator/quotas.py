"""Per-identity quotas, checked inside the transaction that lands the rows.

Invariants:

- **Race-free.** Every check that admits a job or keeps a model runs in the write
  transaction that creates the job (or keeps the model), after `lock_identity` (on
  SQLite a single job's identity, active-jobs and stored-bytes checks are instead the
  condition of the statement that writes its rank, `admission`: the database is held). On
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
  job; a new job's uploaded files and params count before it lands. The store keeps
  them as a counter on the identity's row, changed in the statement that changes the
  rows (`csml.store.jobs_quota`): reading them costs the same whatever is kept.
- **Models** (`max_models`): models kept plus the models the identity's queued and
  running jobs will keep (each model output of a job; for a pipeline, the model
  outputs of its current and later steps). A submission whose models would not fit
  is refused up front (429; 422 when they could never fit), so the models of the
  jobs admitted always fit. The transaction that keeps a model counts again (a
  limit lowered across a restart, say): past the limit the file stays an ordinary
  output of its job and the job says why.
- Models do not expire: they stay until their owner deletes them or erases their
  identity (a job's files expire with the job; a model outlives it).

Every refusal is a `QuotaExceeded` (429 with `Retry-After`) that names the limit and its
value (`Invalid` when a submission could never fit). The counting SQL is the store's
(`csml.store.jobs_quota`); the checks take a Core `Connection` (the submit's writer
operation) or, for callers still on the ORM, a `Session`.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy.orm import Session

from csml.refusals import Invalid, QuotaExceeded, RateLimited, Refusal, Unauthenticated
from csml.schemas import OperationInfo
from csml.store import abuse as windows
from csml.store import jobs_quota as counts
from csml.store.jobs_quota import Conn
from csml.store.tables import utcnow

if TYPE_CHECKING:
    from csml.coordinator.catalog import Catalog
    from csml.coordinator.config import Settings
    from csml.coordinator.errors import ApiError


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


def exceeded(code: str, message: str, retry_after: float, **detail: Any) -> QuotaExceeded:
    """A quota refusal that passes with time (429 with Retry-After)."""
    retry = max(1, math.ceil(retry_after))
    return QuotaExceeded(
        code, message, retry_after=retry, details=[{**detail, "retry_after": retry}]
    )


def too_many(code: str, message: str, retry_after: float, **detail: Any) -> ApiError:
    """`exceeded` in its HTTP form, for callers not yet on refusals (`abuse`)."""
    from csml.coordinator.errors import from_refusal

    return from_refusal(exceeded(code, message, retry_after, **detail))


# -- the identity's lock --------------------------------------------------------


def lock_identity(session: Conn, identity_id: str) -> bool:
    """Serialise this identity's quota checks (see the module's invariants); False
    when the identity is gone (erased while the request was in flight)."""
    return counts.lock_identity(session, identity_id)


def require_identity(session: Conn, identity_id: str, *, lock: bool = True) -> None:
    """`lock_identity`, refusing (401) when the identity was erased meanwhile (without
    `lock`: only whether it exists, from a plain read)."""
    found = (
        lock_identity(session, identity_id)
        if lock
        else counts.identity_exists(session, identity_id)
    )
    if not found:
        raise _erased()


def require_identity_stored(session: Conn, identity_id: str) -> int:
    """`require_identity` without the lock, answering the identity's stored bytes (for
    `check_storage`'s `used`) from the same read."""
    stored = counts.stored_bytes_if_exists(session, identity_id)
    if stored is None:
        raise _erased()
    return stored


def _erased() -> Unauthenticated:
    return Unauthenticated(
        "unauthorized",
        "this identity was erased while the request was in flight; nothing was kept",
    )


# -- submissions per window ---------------------------------------------------------


def submit_key(identity_id: str) -> str:
    """The identity's submission window (a `rate_windows` row)."""
    return f"submit:{identity_id}"


def _per(window: float) -> str:
    return {60.0: "minute", 3600.0: "hour", 86400.0: "day"}.get(window, f"{window:g} s")


def rate_limited(what: str, limit: int, window: float, wait: float, code: str) -> RateLimited:
    retry = max(1, math.ceil(wait))
    return RateLimited(
        code,
        f"{what}: {limit} per {_per(window)} reached; resets in {duration(wait)}",
        details=[{"limit": what, "value": limit, "window_seconds": window, "retry_after": retry}],
        retry_after=retry,
    )


def count_submission(owner: HasSettings, session: Conn, identity_id: str) -> None:
    """Count one submission in the identity's window (`submission_rate_limit` per
    `submission_rate_window_seconds`; nothing when it is 0), or refuse it
    (`RateLimited`, counting nothing) past the limit. One statement (the window's
    upsert, `csml.store.abuse.count_in_window`), in the caller's write transaction:
    whatever refuses the submission later in it rolls the count back too."""
    s = owner.settings
    if not s.submission_rate_limit:
        return
    limit, window = s.submission_rate_limit, s.submission_rate_window_seconds
    wait = windows.count_in_window(session, submit_key(identity_id), limit, window, utcnow())
    if wait is not None:
        raise rate_limited("submission rate limit", limit, window, wait, "submission_rate_limited")


def submission_window(owner: HasSettings, identity_id: str, now: datetime) -> dict[str, Any] | None:
    """`count_submission`'s window upsert, as values for a caller that sends it with its
    other statements (`csml.store.jobs_write.locked_insert_job`); None when there is no
    limit. `counted_submission` then reads what it answered."""
    s = owner.settings
    if not s.submission_rate_limit:
        return None
    return windows.window_params(submit_key(identity_id), s.submission_rate_window_seconds, now)


def counted_submission(owner: HasSettings, counted: tuple[datetime, int], now: datetime) -> None:
    """Refuse (`RateLimited`, as `count_submission`) when the window as counted
    (`submission_window`'s answer, at `now`) is past the limit: the caller's write must
    then fail, which takes its count back."""
    s = owner.settings
    limit, window = s.submission_rate_limit, s.submission_rate_window_seconds
    wait = windows.window_wait(*counted, limit, window, now)
    if wait is not None:
        raise rate_limited("submission rate limit", limit, window, wait, "submission_rate_limited")


# -- queued + running jobs ----------------------------------------------------------


def active_jobs(session: Conn, identity_id: str) -> int:
    """Queued and running jobs of the identity; a pipeline counts once, not once per step."""
    return counts.active_jobs(session, identity_id)


def check_active_jobs(owner: HasSettings, session: Conn, identity_id: str) -> None:
    s = owner.settings
    if not s.max_active_jobs or active_jobs(session, identity_id) < s.max_active_jobs:
        return
    retry = s.retry_after_seconds
    raise exceeded(
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


def stored_bytes(session: Conn, identity_id: str) -> int:
    """Bytes of the identity's job files still kept (inputs and outputs), plus its models
    whose job is gone (while the job is kept, the model shares its output's bytes), plus
    the params its kept jobs hold."""
    return counts.stored_bytes(session, identity_id)


def check_storage(
    owner: HasSettings,
    session: Conn,
    identity_id: str,
    upload_bytes: int,
    used: int | None = None,
) -> None:
    """Refuse (429) when the identity's stored bytes (`used` if the caller just counted
    them with `stored_bytes`), plus `upload_bytes` coming in, pass `max_stored_bytes`."""
    limit = owner.settings.max_stored_bytes
    if used is None:
        used = stored_bytes(session, identity_id)
    if used < limit and used + upload_bytes <= limit:
        return
    retention = timedelta(hours=owner.settings.retention_hours)
    oldest = counts.oldest_finished_with_files(session, identity_id)
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
    raise exceeded(
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


def model_count(session: Conn, identity_id: str) -> int:
    """How many model artifacts `identity_id` keeps in the store."""
    return counts.model_count(session, identity_id)


def _made_by(catalog: Catalog, session: Conn, app: str, operation: str) -> int:
    from csml.coordinator.errors import ApiError  # the catalog may still raise it

    try:
        _, op = catalog.operation(app, operation, session if isinstance(session, Session) else None)
    except (ApiError, Refusal):  # an app no longer catalogued keeps nothing
        return 0
    return models_made(op)


def reserved_models(session: Conn, catalog: Catalog, identity_id: str) -> int:
    """Models the identity's queued and running jobs will keep if they succeed."""
    total = 0
    for app, operation, n in counts.active_operations(session, identity_id):
        total += n * _made_by(catalog, session, app, operation)
    for params, current in counts.active_pipelines(session, identity_id):
        for step in params.get("steps", [])[current:]:  # the current step and those after
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
        raise Invalid(
            "model_quota",
            f"model quota: this submission would keep {adding} models, more than the "
            f"{limit} models per identity allowed here; split it into smaller submissions",
            field="spec",
            details=[{"limit": "model quota", "value": limit, "adding": adding}],
        )
    pending = f", {reserved} more to be kept by your queued or running jobs" if reserved else ""
    retry = owner.settings.retry_after_seconds
    raise exceeded(
        "model_quota",
        f"model quota: {limit} models per identity reached ({count} kept{pending}"
        f"{f'; this submission would keep {adding}' if adding > 1 else ''}); "
        f"resets when one of them is deleted or a job ends (retry in {duration(retry)})",
        retry,
        limit="model quota",
        value=limit,
    )


def check_new_models(
    owner: HasSettings, session: Conn, catalog: Catalog, identity_id: str, adding: int
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


def may_keep_models(owner: HasSettings, session: Conn, identity_id: str, adding: int) -> int:
    """In the transaction that keeps `adding` models: how many of them fit under the
    quota now (models kept so far only: those reserved were counted at submission)."""
    limit = owner.settings.max_models
    if not limit or not adding:
        return adding
    lock_identity(session, identity_id)
    return max(0, min(adding, limit - model_count(session, identity_id)))


# -- a new job --------------------------------------------------------------------


def admission(owner: HasSettings, identity_id: str, upload_bytes: int) -> counts.Admission:
    """`check_new_job`'s checks but the models' as a condition for the statement that
    writes the job's rank (`csml.store.jobs_write.next_rank`): a job it refuses writes
    nothing, and `check_new_job` then says why (same refusals, same order)."""
    s = owner.settings
    return counts.Admission(identity_id, s.max_active_jobs, s.max_stored_bytes, upload_bytes)


def check_new_job(
    owner: HasSettings,
    session: Conn,
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
