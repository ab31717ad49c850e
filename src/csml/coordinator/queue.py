"""The job lifecycle: submit, claim under a lease, heartbeat, complete, cancel, reap.

Every state change is one short transaction. A submission checks the owner's
quotas in the transaction that creates the job (`csml.coordinator.quotas`), so
concurrent submissions cannot overshoot them. Claims lock rows with
`FOR UPDATE SKIP LOCKED` on PostgreSQL; on SQLite every write transaction
holds the database lock (BEGIN IMMEDIATE), which serialises them.

No job waits forever: the reaper fails a queued confidential job as soon as none
of the workers it was sealed to is live (a restarted worker has a new key, so it
could never be claimed: the owner must resubmit), and any queued job that waited
`queue_timeout_seconds` during which no worker of its app was live.

Fairness: each queued job gets a `fair_rank` one past the larger of its
owner's last rank in that app (a counter row per (app, identity)) and the rank
the app last served. Claims take the lowest rank first (the head of
`ix_jobs_claim`), so identities are served round-robin and a user with 1,000
queued jobs delays a newcomer by about one job per other user. An owner whose
queued jobs were cancelled keeps their counter: their next job ranks behind the
ones they cancelled (never ahead of anyone else's place).

No per-app lock on the hot path (PostgreSQL): a submission upserts its owner's
counter row and reads the served rank without locking; a claim is one
`UPDATE … WHERE seq IN (SELECT … FOR UPDATE SKIP LOCKED) RETURNING` and moves the
served rank only if no other transaction holds the app's row (SKIP LOCKED again),
so it never waits. The queue bound is soft far from full (a depth counted at most
`DEPTH_CACHE_SECONDS` ago by this coordinator, plus what it accepted since) and
exact near it (counted under the app's row lock), so concurrent submissions
cannot overshoot a bound they are close to.

Every change of a job its owner can see (submitted, running, progress, ended,
requeued, cancelled) is announced after its commit with `owner_change(owner, job)`,
a notifier feed key that reaches the owner's event streams here and, through the
PostgreSQL relay, on the other coordinators (see `api_events`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, or_, select, tuple_, update
from sqlalchemy.orm import Session, sessionmaker

from csml import ids
from csml.coordinator import artifacts, pipelines, quotas
from csml.coordinator.catalog import Catalog
from csml.coordinator.config import Settings
from csml.coordinator.errors import ApiError, not_found
from csml.coordinator.lookup import find_owned, owned_job_state
from csml.coordinator.notify import Notifier, feed_key
from csml.schemas import (
    ClaimedConfidential,
    ClaimedJob,
    FileInfo,
    Heartbeat,
    HeartbeatResponse,
    JobCompletion,
    JobLimits,
    JobSpec,
    JobState,
    RunningJob,
)
from csml.schemas.workers import (
    INLINE_MAX_BYTES,
    BatchedCompletion,
    ClaimResponse,
    CompletionOutcome,
    InlineOutput,
)
from csml.store.blobs import BlobStore, fsync_paths
from csml.store.db import transaction
from csml.store.tables import AppRecord, FairCounter, Job, JobFile, Worker, utcnow
from csml.store.tables_confidential import (
    JobConfidential,
    JobRecipient,
    WorkerKey,
    confidential_of,
    mark_not_confidential,
)

log = logging.getLogger("csml.coordinator.queue")

QUEUED, RUNNING = JobState.queued.value, JobState.running.value
TERMINAL = (JobState.succeeded.value, JobState.failed.value, JobState.cancelled.value)


INLINE_CLAIM_BYTES = 1 << 20  # inline inputs per claim answer, in all
DEPTH_CACHE_SECONDS = 1.0  # how long a coordinator trusts its count of an app's queue
DEPTH_MARGIN = 64  # below capacity by more than max(this, capacity / 10): no exact count


@dataclass
class _Taken:
    """A job just claimed and where its inputs' bytes are."""

    job: ClaimedJob
    blobs: list[str]
    owner_id: str


@dataclass
class StagedFile:
    name: str
    path: Path
    size: int
    sha256: str
    media_type: str


def app_key(app: str) -> str:
    return f"app:{app}"


def job_key(job_id: str) -> str:
    return f"job:{job_id}"


def owner_feed(owner_id: str) -> str:
    """The notifier topic on which an identity's job changes are announced (item: job id)."""
    return f"owner:{owner_id}"


def owner_change(owner_id: str, job_id: str) -> str:
    """The key announcing that this job of this owner changed (state, progress, result)."""
    return feed_key(owner_feed(owner_id), job_id)


class JobQueue:
    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        blobs: BlobStore,
        catalog: Catalog,
        notifier: Notifier,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.blobs = blobs
        self.catalog = catalog
        self.notifier = notifier
        self._stamped: dict[str, float] = {}  # worker id -> when its liveness was written
        self._depths: dict[str, tuple[int, float]] = {}  # app -> (queued, when counted)

    # -- submission ---------------------------------------------------------

    def limits_for(self, spec: JobSpec) -> JobLimits:
        s = self.settings
        req = spec.limits
        maxima = {
            "timeout_seconds": s.job_timeout_seconds,
            "memory_mb": s.job_memory_mb,
            "cpu_seconds": s.job_cpu_seconds,
        }
        chosen: dict[str, Any] = dict(maxima)
        if req is not None:
            for name, limit in maxima.items():
                value = getattr(req, name)
                if value is None:
                    continue
                if value > limit:
                    raise ApiError(
                        422,
                        "limit_too_high",
                        f"limits.{name}: {value} is above this coordinator's maximum of {limit}",
                        field=f"spec.limits.{name}",
                    )
                chosen[name] = value
        return JobLimits.model_validate(chosen)

    def check_spec(self, spec: JobSpec) -> None:
        """Everything about a submission that can be refused before its files arrive."""
        self._check_params(spec)
        self.limits_for(spec)
        with self.sessions() as session:
            if not self._far_from_full(session, spec.app):
                self._check_capacity(session, spec.app)
            self._check_recipients(session, spec)

    def _check_params(self, spec: JobSpec) -> None:
        if spec.confidential is None:
            self.catalog.check_params(spec.app, spec.operation, spec.params)
            return
        # Encrypted params are validated by the worker; the error comes back encrypted.
        self.catalog.operation(spec.app, spec.operation)
        if spec.params:
            raise ApiError(
                422,
                "invalid_params",
                "a confidential job's params must be {}: they travel encrypted in "
                "spec.confidential.encrypted_params",
                field="spec.params",
            )

    def _check_recipients(self, session: Session, spec: JobSpec) -> None:
        """Every recipient must be a running worker of the app that registered a key."""
        if spec.confidential is None:
            return
        wanted = [r.worker_id for r in spec.confidential.recipients]
        found = set(
            session.scalars(
                select(Worker.id)
                .join(WorkerKey, WorkerKey.worker_id == Worker.id)
                .where(Worker.id.in_(wanted), Worker.app == spec.app, Worker.stopped_at.is_(None))
            ).all()
        )
        for i, worker_id in enumerate(wanted):
            if worker_id not in found:
                raise ApiError(
                    422,
                    "unknown_recipient",
                    f"spec.confidential.recipients[{i}]: {ids.short(worker_id)} is not a "
                    f"running {spec.app} worker with a key (see GET /v1/apps/{spec.app}/workers)",
                    field=f"spec.confidential.recipients.{i}.worker_id",
                )

    def check_files(self, spec: JobSpec, names: set[str]) -> None:
        _, op = self.catalog.operation(spec.app, spec.operation)
        declared = {f.name for f in op.inputs}
        by_id = artifacts.model_input(op)
        if by_id is not None and artifacts.requested_model(spec) is not None:
            names = names | {by_id.name}  # attached from the store at submission
        for extra in sorted(names - declared):
            raise ApiError(
                422,
                "unknown_input",
                f"operation {op.name!r} takes no input file {extra!r}; "
                f"it takes: {', '.join(sorted(declared)) or 'none'}",
                field=extra,
            )
        for f in op.inputs:
            if f.required and f.name not in names:
                raise ApiError(
                    422,
                    "missing_input",
                    f"operation {op.name!r} needs the input file {f.name!r}",
                    field=f.name,
                )

    def _check_capacity(self, session: Session, app: str) -> None:
        capacity = self.settings.capacity(app)
        depth = session.scalar(
            select(func.count()).select_from(Job).where(Job.app == app, Job.state == QUEUED)
        )
        if depth is not None and depth >= capacity:
            retry = self.settings.retry_after_seconds
            raise ApiError(
                429,
                "queue_full",
                f"the {app} queue is full ({depth} of {capacity}); retry in {retry} s",
                headers={"Retry-After": str(retry)},
            )

    def _far_from_full(self, session: Session, app: str) -> bool:
        """Whether `app`'s queue is well below its bound, from a depth this coordinator
        counted less than `DEPTH_CACHE_SECONDS` ago plus the jobs it accepted since (a soft
        view: other coordinators' submissions show at the next count). Near the bound,
        submissions count exactly under the app's lock."""
        capacity = self.settings.capacity(app)
        margin = max(DEPTH_MARGIN, capacity // 10)
        now = time.monotonic()
        cached = self._depths.get(app)
        if cached is None or now - cached[1] >= DEPTH_CACHE_SECONDS:
            depth = session.scalar(
                select(func.count()).select_from(Job).where(Job.app == app, Job.state == QUEUED)
            )
            cached = (depth or 0, now)
        far = cached[0] + margin < capacity
        self._depths[app] = (cached[0] + 1, cached[1])
        return far

    @staticmethod
    def _next_rank(session: Session, app: str, owner_id: str, served: int) -> int:
        """One past the larger of the owner's last rank in `app` and the rank served: an
        upsert of the owner's counter row (no app lock; one owner's submissions queue on
        their own row only)."""
        values = {"app": app, "owner_id": owner_id, "last_rank": served + 1}
        bumped = {
            "last_rank": case((FairCounter.last_rank > served, FairCounter.last_rank), else_=served)
            + 1
        }
        if session.get_bind().dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            pg = pg_insert(FairCounter).values(**values)
            stmt = pg.on_conflict_do_update(
                index_elements=[FairCounter.app, FairCounter.owner_id], set_=bumped
            ).returning(FairCounter.last_rank)
        else:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            lite = sqlite_insert(FairCounter).values(**values)
            stmt = lite.on_conflict_do_update(
                index_elements=[FairCounter.app, FairCounter.owner_id], set_=bumped
            ).returning(FairCounter.last_rank)
        rank: int = session.execute(stmt).scalar_one()
        return rank

    def submit(
        self,
        owner_id: str,
        spec: JobSpec,
        staging: Path | None,
        files: dict[str, StagedFile],
    ) -> Job:
        _, op = self.catalog.operation(spec.app, spec.operation)
        self._check_params(spec)
        self.check_files(spec, set(files))
        limits = self.limits_for(spec)
        job_id = ids.new_id()
        try:
            with transaction(self.sessions) as session:
                # Lock order: the owner's identity row, then the app's row.
                quotas.check_new_job(
                    self,
                    session,
                    self.catalog,
                    owner_id,
                    upload_bytes=sum(f.size for f in files.values())
                    + quotas.params_bytes(spec.params)
                    + (len(spec.confidential.encrypted_params) if spec.confidential else 0),
                    adding_models=quotas.models_made(op),
                )
                served = session.scalar(
                    select(AppRecord.served_rank).where(AppRecord.name == spec.app)
                )
                if served is None:
                    raise ApiError(404, "unknown_app", f"no application {spec.app!r}")
                if not self._far_from_full(session, spec.app):
                    # Near the bound: exact, under the app's lock (far from it: no lock).
                    session.execute(
                        select(AppRecord.name).where(AppRecord.name == spec.app).with_for_update()
                    )
                    self._check_capacity(session, spec.app)
                self._check_recipients(session, spec)
                rank = self._next_rank(session, spec.app, owner_id, served)
                job = Job(
                    id=job_id,
                    owner_id=owner_id,
                    app=spec.app,
                    operation=op.name,
                    params=spec.params,
                    limits=limits.model_dump(),
                    state=QUEUED,
                    fair_rank=rank,
                    created_at=utcnow(),
                    attempts=0,
                    max_attempts=self.settings.max_attempts,
                    progress_fraction=0.0,
                    progress_message="",
                    files=[],
                )
                job.files.extend(adopt_inputs(self.blobs, staging, job_id, files))
                artifacts.attach(session, self.blobs, self.catalog, owner_id, spec, job, set(files))
                session.add(job)
                if spec.confidential is not None:
                    self._add_confidential(session, job, spec)
                else:
                    mark_not_confidential(job)
        except BaseException:
            self.blobs.remove_job(job_id)  # adopted inputs and linked models
            raise
        self.notifier.notify(app_key(spec.app))
        return job

    @staticmethod
    def _add_confidential(session: Session, job: Job, spec: JobSpec) -> None:
        conf = spec.confidential
        assert conf is not None
        session.flush()  # assigns job.seq
        session.add(
            JobConfidential(
                job=job,
                version=conf.version,
                job_nonce=conf.job_nonce,
                result_public_key=conf.result_public_key,
                encrypted_params=conf.encrypted_params,
                encrypted_result=None,
            )
        )
        for r in conf.recipients:
            session.add(
                JobRecipient(job_seq=job.seq, worker_id=r.worker_id, wrapped_key=r.wrapped_key)
            )

    # -- owner's view -------------------------------------------------------

    def find(self, session: Session, owner_id: str, ident: str, *, lock: bool = False) -> Job:
        return find_owned(session, Job, owner_id, ident, "job", lock=lock)

    def get(self, owner_id: str, ident: str) -> Job:
        with self.sessions() as session:
            return self.find(session, owner_id, ident)

    def state_of(self, owner_id: str, ident: str) -> tuple[str, str]:
        """(id, state) of the owner's job, without loading it (one query)."""
        with self.sessions() as session:
            return owned_job_state(session, owner_id, ident)

    def list_jobs(
        self, owner_id: str, *, state: str | None, app: str | None, limit: int
    ) -> list[Job]:
        stmt = select(Job).where(Job.owner_id == owner_id, Job.parent_seq.is_(None))  # no steps
        if state:
            stmt = stmt.where(Job.state == state)
        if app:
            stmt = stmt.where(Job.app == app)
        with self.sessions() as session:
            return list(session.scalars(stmt.order_by(Job.seq.desc()).limit(limit)).all())

    def changed_jobs(self, owner_id: str, job_ids: set[str]) -> list[Job]:
        """The owner's jobs among `job_ids` as the owner lists them: a pipeline step
        stands for its pipeline; another identity's or an erased job is left out."""
        found: dict[int, Job] = {}
        wanted = sorted(job_ids)
        with self.sessions() as session:
            for i in range(0, len(wanted), 500):
                rows = session.scalars(
                    select(Job).where(Job.owner_id == owner_id, Job.id.in_(wanted[i : i + 500]))
                ).all()
                parents = {r.parent_seq for r in rows if r.parent_seq is not None}
                found.update((r.seq, r) for r in rows if r.parent_seq is None)
                if parents - found.keys():
                    found.update(
                        (r.seq, r)
                        for r in session.scalars(
                            select(Job).where(
                                Job.owner_id == owner_id, Job.seq.in_(parents - found.keys())
                            )
                        ).all()
                    )
        return sorted(found.values(), key=lambda j: j.seq)

    def cancel(self, owner_id: str, ident: str) -> Job:
        """Cancel the owner's job; announced to its long-polls and the owner's streams."""
        with transaction(self.sessions) as session:
            job = self.find(session, owner_id, ident, lock=True)
            if job.state in TERMINAL:
                raise ApiError(
                    409, "already_finished", f"job {ids.short(job.id)} already {job.state}"
                )
            pipelines.refuse_step_cancel(session, job)
            job.state = JobState.cancelled.value
            job.finished_at = utcnow()
            job.error = "cancelled by its owner"
            job.lease_id = None
            job.lease_expires_at = None
            woken = pipelines.cancel_steps(session, job)
        for key in [job_key(job.id), owner_change(owner_id, job.id), *woken]:
            self.notifier.notify(key)
        return job

    # -- workers ------------------------------------------------------------

    def claim(self, worker: Worker, max_jobs: int) -> list[ClaimedJob]:
        """Take up to `max_jobs` jobs (see `claim_and_beat`)."""
        return self.claim_and_beat(worker, max_jobs).jobs

    def claim_and_beat(
        self, worker: Worker, max_jobs: int, running: list[RunningJob] | None = None
    ) -> ClaimResponse:
        """Take up to `max_jobs` jobs (one statement), extending the leases of `running`
        (a heartbeat riding along). Writes nothing when nothing is queued and no
        heartbeat or liveness stamp is due."""
        now = utcnow()
        stamp = self._stamp_due(worker.id)
        if not running and not stamp and not self._has_queued(worker):
            return ClaimResponse(jobs=[])
        with transaction(self.sessions) as session:
            if stamp:
                session.execute(
                    update(Worker).where(Worker.id == worker.id).values(last_heartbeat=now)
                )
            abort, progressed = self._beat(session, worker, running or [], now)
            taken = self._take(session, worker, max_jobs, now)
        # Running now, or progressed: to the owners' event streams.
        for key in [*(owner_change(t.owner_id, t.job.id) for t in taken), *progressed]:
            self.notifier.notify(key)
        if stamp:
            if len(self._stamped) > 10_000:  # workers that left long ago: forget them
                self._stamped.clear()
            self._stamped[worker.id] = time.monotonic()
        return ClaimResponse(jobs=self._inline(taken), abort=abort)

    def _stamp_due(self, worker_id: str) -> bool:
        """Whether this worker's liveness (`last_heartbeat`) needs writing: at most once per
        heartbeat interval (and a third of the live window) from this coordinator."""
        every = min(self.settings.heartbeat_seconds, self.settings.worker_live_seconds / 3)
        last = self._stamped.get(worker_id)
        return last is None or time.monotonic() - last >= every

    def _claimable(self, worker: Worker) -> ColumnElement[bool]:
        # A confidential job goes only to the workers its data key was sealed to.
        has_recipients = select(JobRecipient.job_seq).where(JobRecipient.job_seq == Job.seq)
        for_me = has_recipients.where(JobRecipient.worker_id == worker.id)
        return and_(
            Job.app == worker.app,
            Job.state == QUEUED,
            or_(~has_recipients.exists(), for_me.exists()),
        )

    def _has_queued(self, worker: Worker) -> bool:
        with self.sessions() as session:
            found = session.execute(select(Job.seq).where(self._claimable(worker)).limit(1)).first()
        return found is not None

    def _take(self, session: Session, worker: Worker, max_jobs: int, now: datetime) -> list[_Taken]:
        """Claim the queue head in one `UPDATE … WHERE seq IN (SELECT … FOR UPDATE SKIP
        LOCKED) RETURNING` (SQLite: the write lock taken at BEGIN stands for the row locks)."""
        lease_id = ids.new_id()
        head = (
            select(Job.seq)
            .where(self._claimable(worker))
            .order_by(Job.fair_rank, Job.seq)
            .limit(max_jobs)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        rows = session.execute(
            update(Job)
            .where(Job.seq.in_(head))
            .values(
                state=RUNNING,
                worker_id=worker.id,
                lease_id=lease_id,
                lease_expires_at=now + timedelta(seconds=self.settings.lease_seconds),
                started_at=now,
                attempts=Job.attempts + 1,
                error=None,
            )
            .returning(
                Job.seq,
                Job.id,
                Job.owner_id,
                Job.operation,
                Job.params,
                Job.limits,
                Job.attempts,
                Job.fair_rank,
            )
            .execution_options(synchronize_session=False)
        ).all()
        if not rows:
            return []
        seqs = [r.seq for r in rows]
        top = max(r.fair_rank for r in rows)
        # The served rank moves up unless another transaction holds the app's row (then
        # that one moves it, or the next claim does): a claim never waits on it.
        behind = (
            select(AppRecord.name)
            .where(AppRecord.name == worker.app, AppRecord.served_rank < top)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        session.execute(
            update(AppRecord)
            .where(AppRecord.name.in_(behind))
            .values(served_rank=top)
            .execution_options(synchronize_session=False)
        )
        inputs: dict[int, list[tuple[FileInfo, str]]] = {}
        for seq, name, size, sha256, media_type, blob in session.execute(
            select(
                JobFile.job_seq,
                JobFile.name,
                JobFile.size,
                JobFile.sha256,
                JobFile.media_type,
                JobFile.blob,
            ).where(JobFile.job_seq.in_(seqs), JobFile.kind == "input")
        ):
            info = FileInfo(name=name, size=size, sha256=sha256, media_type=media_type)
            inputs.setdefault(seq, []).append((info, blob))
        sealed = {
            seq: ClaimedConfidential(
                job_nonce=nonce,
                wrapped_key=wrapped,
                result_public_key=result_key,
                encrypted_params=params,
            )
            for seq, nonce, result_key, params, wrapped in session.execute(
                select(
                    JobConfidential.job_seq,
                    JobConfidential.job_nonce,
                    JobConfidential.result_public_key,
                    JobConfidential.encrypted_params,
                    JobRecipient.wrapped_key,
                )
                .join(JobRecipient, JobRecipient.job_seq == JobConfidential.job_seq)
                .where(JobConfidential.job_seq.in_(seqs), JobRecipient.worker_id == worker.id)
            )
        }
        return [
            _Taken(
                ClaimedJob(
                    id=r.id,
                    operation=r.operation,
                    params=r.params,
                    inputs=[info for info, _ in inputs.get(r.seq, [])],
                    lease_id=lease_id,
                    attempt=r.attempts,
                    limits=JobLimits.model_validate(r.limits),
                    confidential=sealed.get(r.seq),
                    owner_key=owner_key(r.owner_id),
                ),
                [blob for _, blob in inputs.get(r.seq, [])],
                r.owner_id,
            )
            for r in sorted(rows, key=lambda r: (r.fair_rank, r.seq))
        ]

    def _inline(self, taken: list[_Taken]) -> list[ClaimedJob]:
        """Put small inputs of plain jobs into the claim (base64), up to a total per claim;
        the worker downloads the others."""
        budget = INLINE_CLAIM_BYTES
        for t in taken:
            if t.job.confidential is not None:
                continue
            for info, blob in zip(t.job.inputs, t.blobs, strict=True):
                if info.size > INLINE_MAX_BYTES or info.size > budget:
                    continue
                try:
                    data = self.blobs.path(blob).read_bytes()
                except OSError:
                    continue  # the worker's download will say what is wrong
                budget -= len(data)
                t.job.inline_inputs[info.name] = base64.b64encode(data).decode()
        return [t.job for t in taken]

    def heartbeat(self, worker: Worker, beat: Heartbeat) -> HeartbeatResponse:
        now = utcnow()
        with transaction(self.sessions) as session:
            session.execute(update(Worker).where(Worker.id == worker.id).values(last_heartbeat=now))
            abort, progressed = self._beat(session, worker, beat.running, now)
        self._stamped[worker.id] = time.monotonic()
        for key in progressed:  # to the owners' event streams
            self.notifier.notify(key)
        return HeartbeatResponse(abort=abort)

    def _beat(
        self, session: Session, worker: Worker, running: list[RunningJob], now: datetime
    ) -> tuple[list[str], list[str]]:
        """Extend the leases still held (one UPDATE … RETURNING), record changed progress.
        Returns the jobs to abort (cancelled, finished or lease lost) and the owner-change
        keys of the jobs whose progress changed (to announce after the commit)."""
        if not running:
            return [], []
        extended = session.execute(
            update(Job)
            .where(
                tuple_(Job.id, Job.lease_id).in_([(r.job_id, r.lease_id) for r in running]),
                Job.state == RUNNING,
                Job.worker_id == worker.id,
            )
            .values(lease_expires_at=now + timedelta(seconds=self.settings.lease_seconds))
            .returning(Job.id, Job.progress_fraction, Job.progress_message, Job.owner_id)
            .execution_options(synchronize_session=False)
        ).all()
        held = {r.id: (r.progress_fraction, r.progress_message) for r in extended}
        owners = {r.id: r.owner_id for r in extended}
        progressed: list[str] = []
        for r in running:
            if r.job_id in held and held[r.job_id] != (r.progress.fraction, r.progress.message):
                progressed.append(owner_change(owners[r.job_id], r.job_id))
                session.execute(
                    update(Job)
                    .where(Job.id == r.job_id, Job.lease_id == r.lease_id)
                    .values(
                        progress_fraction=r.progress.fraction, progress_message=r.progress.message
                    )
                    .execution_options(synchronize_session=False)
                )
        return [r.job_id for r in running if r.job_id not in held], progressed

    def running_job(self, session: Session, worker: Worker, job_id: str, lease_id: str) -> Job:
        job = session.scalars(select(Job).where(Job.id == job_id)).first()
        if job is None:
            raise not_found("job", job_id)
        if job.state != RUNNING or job.worker_id != worker.id or job.lease_id != lease_id:
            raise ApiError(
                409,
                "lease_lost",
                f"job {ids.short(job_id)} is no longer yours to run ({job.state})",
            )
        return job

    def attempt_dir(self, job_id: str, lease_id: str) -> Path:
        return self.blobs.job_dir(job_id) / f"attempt-{lease_id[:16]}"

    def complete(self, worker: Worker, job_id: str, done: JobCompletion) -> None:
        """One job's end; ApiError (409 lease lost, 422 …) if refused."""
        outcome = self.complete_many(
            worker, [BatchedCompletion(job_id=job_id, **done.model_dump())], raise_one=True
        )
        assert outcome[0].status == 204

    def complete_many(
        self, worker: Worker, batch: list[BatchedCompletion], *, raise_one: bool = False
    ) -> list[CompletionOutcome]:
        """Several jobs' ends in one transaction: each job loaded once (with its files and
        envelope), each checked against its lease; a refused one (lease lost: exactly one
        result is kept) does not stop the others. `raise_one`: raise the first refusal."""
        wanted = list(dict.fromkeys(d.job_id for d in batch))
        outcomes: list[CompletionOutcome] = []
        woken: list[str] = []
        with transaction(self.sessions) as session:
            if session.get_bind().dialect.name != "sqlite":
                # The pipelines' lock order: parents before their steps.
                parents = session.scalars(
                    select(Job.parent_seq)
                    .where(Job.id.in_(wanted), Job.parent_seq.is_not(None))
                    .order_by(Job.parent_seq)
                ).all()
                if parents:
                    session.execute(select(Job.seq).where(Job.seq.in_(parents)).with_for_update())
            jobs = {
                j.id: j
                for j in session.scalars(
                    select(Job).where(Job.id.in_(wanted)).with_for_update()
                ).all()
            }
            for done in batch:
                job = jobs.get(done.job_id)
                try:
                    # Refusals (ApiError) come before `_finish` changes a row: no savepoint.
                    woken += self._finish(session, worker, job, done)
                except ApiError as exc:
                    if raise_one:
                        raise
                    outcomes.append(
                        CompletionOutcome(job_id=done.job_id, status=exc.status, error=exc.message)
                    )
                else:
                    outcomes.append(CompletionOutcome(job_id=done.job_id, status=204))
        for key in [*(job_key(o.job_id) for o in outcomes if o.status == 204), *woken]:
            self.notifier.notify(key)
        return outcomes

    def _finish(
        self, session: Session, worker: Worker, job: Job | None, done: BatchedCompletion
    ) -> list[str]:
        """End one job. Every refusal is raised before a row changes (only inline output
        files may be written, inside the attempt's folder, kept only on success)."""
        job_id = done.job_id
        if job is None:
            raise not_found("job", job_id)
        if job.state != RUNNING or job.worker_id != worker.id or job.lease_id != done.lease_id:
            raise ApiError(
                409,
                "lease_lost",
                f"job {ids.short(job_id)} is no longer yours to run ({job.state})",
            )
        conf = confidential_of(job)
        if conf is not None:
            if done.result is not None or done.inline_outputs:
                raise ApiError(
                    422,
                    "plaintext_result",
                    f"job {ids.short(job_id)} is confidential: its result travels only "
                    "encrypted (encrypted_result, outputs uploaded encrypted)",
                )
            conf.encrypted_result = (
                done.encrypted_result.model_dump(mode="json")
                if done.encrypted_result is not None
                else None
            )
        elif done.encrypted_result is not None:
            raise ApiError(
                422,
                "not_confidential",
                f"job {ids.short(job_id)} is not confidential: send its result in the clear",
            )
        outputs_dir = self.attempt_dir(job_id, done.lease_id)
        if done.state == JobState.succeeded.value and done.inline_outputs:
            self._write_inline(job, outputs_dir, done.inline_outputs)
        job.state = done.state
        job.finished_at = utcnow()
        job.result = done.result
        job.error = done.error
        job.lease_id = None
        job.lease_expires_at = None
        if done.state == JobState.succeeded.value:
            job.progress_fraction = 1.0
            for meta in sorted(outputs_dir.glob("*.meta.json")):
                info = FileInfo.model_validate_json(meta.read_text())
                job.files.append(
                    JobFile(
                        kind="output",
                        name=info.name,
                        size=info.size,
                        sha256=info.sha256,
                        media_type=info.media_type,
                        blob=self.blobs.relative(outputs_dir / info.name),
                    )
                )
            artifacts.keep_outputs(session, self, self.blobs, self.catalog, job)
        pipelines.lock_parent(session, job)  # held already (PostgreSQL) or the write lock
        return [owner_change(job.owner_id, job_id), *pipelines.step_finished(self, session, job)]

    def _write_inline(self, job: Job, outputs_dir: Path, outputs: list[InlineOutput]) -> None:
        """Write a completion's inline outputs (declared names only, each bounded) as an
        upload would, on disk before the transaction commits."""
        _, op = self.catalog.operation(job.app, job.operation)
        declared = {o.name: o.media_type for o in op.outputs}
        written: list[Path] = []
        outputs_dir.mkdir(parents=True, exist_ok=True)
        for out in outputs:
            if out.name not in declared:
                raise ApiError(
                    422, "unknown_output", f"{op.name!r} declares no output {out.name!r}"
                )
            try:
                data = base64.b64decode(out.content, validate=True)
            except ValueError:
                raise ApiError(
                    422, "invalid_output", f"inline_outputs: {out.name!r} is not valid base64"
                ) from None
            if len(data) > INLINE_MAX_BYTES:
                raise ApiError(
                    413, "file_too_large", f"inline output {out.name!r} is over {INLINE_MAX_BYTES}"
                )
            path = outputs_dir / out.name
            path.write_bytes(data)
            info = FileInfo(
                name=out.name,
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                media_type=declared[out.name],
            )
            meta = outputs_dir / f"{out.name}.meta.json"
            self.write_meta(meta, info)
            written += [path, meta]
        fsync_paths(written)

    def output_meta_path(self, job_id: str, lease_id: str, name: str) -> Path:
        return self.attempt_dir(job_id, lease_id) / f"{name}.meta.json"

    @staticmethod
    def write_meta(path: Path, info: FileInfo) -> None:
        path.write_text(json.dumps(info.model_dump()))

    def reap(self) -> int:
        """Requeue (or fail, past max attempts) running jobs whose lease expired."""
        now = utcnow()
        changed: list[tuple[str, str]] = []
        woken: list[str] = []
        with transaction(self.sessions) as session:
            expired = session.scalars(
                select(Job)
                .where(Job.state == RUNNING, Job.lease_expires_at < now)
                .with_for_update(skip_locked=True)
                .limit(500)
            ).all()
            for job in expired:
                if job.attempts >= job.max_attempts and not pipelines.try_lock_parent(session, job):
                    continue  # its pipeline is busy (being cancelled): next round
                job.worker_id = None
                job.lease_id = None
                job.lease_expires_at = None
                if job.attempts >= job.max_attempts:
                    job.state = JobState.failed.value
                    job.finished_at = now
                    job.error = (
                        f"the worker running it was lost {job.attempts} times "
                        "(its lease expired); giving up"
                    )
                    woken += pipelines.step_finished(self, session, job)
                else:
                    job.state = QUEUED
                    job.progress_fraction = 0.0
                    job.progress_message = "requeued: the worker running it was lost"
                changed.append((job.id, job.app))
                woken.append(owner_change(job.owner_id, job.id))
        for job_id, app in changed:
            self.notifier.notify(job_key(job_id))
            self.notifier.notify(app_key(app))
        for key in woken:
            self.notifier.notify(key)
        if changed:
            log.info("requeued or failed %d jobs whose lease expired", len(changed))
        return len(changed) + self.fail_unclaimable()

    def fail_unclaimable(self) -> int:
        """Fail queued jobs no worker can claim: confidential ones whose recipients all
        left (at once), and any that waited `queue_timeout_seconds` with no live worker
        of its app in that time."""
        s = self.settings
        now = utcnow()
        cutoff = now - timedelta(seconds=s.queue_timeout_seconds)
        live = and_(
            Worker.stopped_at.is_(None),
            Worker.last_heartbeat >= now - timedelta(seconds=s.worker_live_seconds),
        )
        failed: list[tuple[Job, str]] = []
        woken: list[str] = []
        with transaction(self.sessions) as session:
            has_recipients = select(JobRecipient.job_seq).where(JobRecipient.job_seq == Job.seq)
            live_recipient = (
                select(JobRecipient.job_seq)
                .join(Worker, Worker.id == JobRecipient.worker_id)
                .where(JobRecipient.job_seq == Job.seq, live)
            )
            orphans = session.scalars(
                select(Job)
                .where(Job.state == QUEUED, has_recipients.exists(), ~live_recipient.exists())
                .with_for_update(skip_locked=True)
                .limit(500)
            ).all()
            for job in orphans:
                failed.append(
                    (
                        job,
                        "every worker this confidential job was sealed to has left (a worker "
                        "that comes back has a new key and cannot open it); resubmit it to "
                        f"running {job.app} workers",
                    )
                )
            stale_apps = session.scalars(
                select(Job.app).where(Job.state == QUEUED, Job.created_at < cutoff).distinct()
            ).all()
            for app in stale_apps:
                last_seen = session.scalar(
                    select(func.max(func.coalesce(Worker.stopped_at, Worker.last_heartbeat))).where(
                        Worker.app == app
                    )
                )
                if last_seen is not None and last_seen >= cutoff:
                    continue  # a worker of the app was live in the last timeout
                waiting = session.scalars(
                    select(Job)
                    .where(Job.state == QUEUED, Job.app == app, Job.created_at < cutoff)
                    .with_for_update(skip_locked=True)
                    .limit(500)
                ).all()
                for job in waiting:
                    if job not in orphans:
                        failed.append(
                            (
                                job,
                                f"no {app} worker was live to run it for "
                                f"{s.queue_timeout_seconds:g} s (the queue timeout); resubmit "
                                f"it when {app} workers are running",
                            )
                        )
            ended: list[tuple[str, str]] = []
            for job, why in failed:
                if not pipelines.try_lock_parent(session, job):
                    continue  # its pipeline is busy (being cancelled): next round
                job.state = JobState.failed.value
                job.finished_at = now
                job.error = why
                job.progress_message = ""
                woken += pipelines.step_finished(self, session, job)
                ended.append((job.id, why))
                woken.append(owner_change(job.owner_id, job.id))
        for job_id, why in ended:
            log.info("job %s failed unclaimed: %s", ids.short(job_id), why)
            self.notifier.notify(job_key(job_id))
        for key in woken:
            self.notifier.notify(key)
        return len(ended)

    def queue_stats(self) -> dict[str, dict[str, int]]:
        """Jobs per app and state (queued and running only)."""
        stats: dict[str, dict[str, int]] = {}
        with self.sessions() as session:
            rows = session.execute(
                select(Job.app, Job.state, func.count())
                .where(Job.state.in_([QUEUED, RUNNING]))
                .group_by(Job.app, Job.state)
            ).all()
        for app, state, count in rows:
            stats.setdefault(app, {})[state] = count
        return stats


def adopt_inputs(
    blobs: BlobStore, staging: Path | None, job_id: str, files: dict[str, StagedFile]
) -> list[JobFile]:
    """Move the staged uploads to be job `job_id`'s inputs; their rows."""
    if staging is None or not files:
        return []
    moved = blobs.adopt(staging, job_id, "inputs")
    return [
        JobFile(
            kind="input",
            name=f.name,
            size=f.size,
            sha256=f.sha256,
            media_type=f.media_type,
            blob=blobs.relative(moved / f.name),
        )
        for f in files.values()
    ]


def file_info(f: JobFile) -> FileInfo:
    return FileInfo(name=f.name, size=f.size, sha256=f.sha256, media_type=f.media_type)


def owner_key(owner_id: str) -> str:
    """What a worker learns of a job's owner: enough to keep one sandboxed process per
    owner (see `ClaimedJob.owner_key`), not the identity id itself."""
    return hashlib.sha256(b"csml owner key\0" + owner_id.encode()).hexdigest()[:32]


def _claimed_confidential(job: Job, wrapped: dict[int, str]) -> ClaimedConfidential | None:
    conf = confidential_of(job)
    if conf is None:
        return None
    return ClaimedConfidential(
        job_nonce=conf.job_nonce,
        wrapped_key=wrapped[job.seq],
        result_public_key=conf.result_public_key,
        encrypted_params=conf.encrypted_params,
    )
