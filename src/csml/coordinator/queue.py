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
owner's last queued rank in that app and the rank the app last served. Claims
take the lowest rank first, so identities are served round-robin and a user
with 1,000 queued jobs delays a newcomer by about one job per other user.

Every change of a job its owner can see (submitted, running, progress, ended,
requeued, cancelled) is announced after its commit with `owner_change(owner, job)`,
a notifier feed key that reaches the owner's event streams here and, through the
PostgreSQL relay, on the other coordinators (see `api_events`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, case, func, or_, select, update
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
)
from csml.store.blobs import BlobStore
from csml.store.db import transaction
from csml.store.tables import AppRecord, Job, JobFile, Worker, utcnow
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
                app_row = session.get(AppRecord, spec.app, with_for_update=True)
                if app_row is None:
                    raise ApiError(404, "unknown_app", f"no application {spec.app!r}")
                self._check_capacity(session, spec.app)
                self._check_recipients(session, spec)
                owner_rank = session.scalar(
                    select(func.max(Job.fair_rank)).where(
                        Job.owner_id == owner_id, Job.app == spec.app, Job.state == QUEUED
                    )
                )
                job = Job(
                    id=job_id,
                    owner_id=owner_id,
                    app=spec.app,
                    operation=op.name,
                    params=spec.params,
                    limits=limits.model_dump(),
                    state=QUEUED,
                    fair_rank=max(owner_rank or 0, app_row.served_rank) + 1,
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
        now = utcnow()
        lease_id = ids.new_id()
        with transaction(self.sessions) as session:
            # Lock order everywhere: the worker row, then job rows (no deadlock with heartbeat).
            session.execute(update(Worker).where(Worker.id == worker.id).values(last_heartbeat=now))
            # A confidential job goes only to the workers its data key was sealed to.
            has_recipients = select(JobRecipient.job_seq).where(JobRecipient.job_seq == Job.seq)
            for_me = has_recipients.where(JobRecipient.worker_id == worker.id)
            seqs = session.scalars(
                select(Job.seq)
                .where(
                    Job.app == worker.app,
                    Job.state == QUEUED,
                    or_(~has_recipients.exists(), for_me.exists()),
                )
                .order_by(Job.fair_rank, Job.seq)
                .limit(max_jobs)
                .with_for_update(skip_locked=True)
            ).all()
            if not seqs:
                return []
            session.execute(
                update(Job)
                .where(Job.seq.in_(seqs))
                .values(
                    state=RUNNING,
                    worker_id=worker.id,
                    lease_id=lease_id,
                    lease_expires_at=now + timedelta(seconds=self.settings.lease_seconds),
                    started_at=now,
                    attempts=Job.attempts + 1,
                    error=None,
                )
            )
            jobs = session.scalars(select(Job).where(Job.seq.in_(seqs))).all()
            top = max(j.fair_rank for j in jobs)
            session.execute(
                update(AppRecord)
                .where(AppRecord.name == worker.app)
                .values(
                    served_rank=case(
                        (AppRecord.served_rank < top, top), else_=AppRecord.served_rank
                    )
                )
            )
            wrapped: dict[int, str] = {}
            if any(confidential_of(j) is not None for j in jobs):
                wrapped = {
                    seq: key
                    for seq, key in session.execute(
                        select(JobRecipient.job_seq, JobRecipient.wrapped_key).where(
                            JobRecipient.job_seq.in_(seqs), JobRecipient.worker_id == worker.id
                        )
                    ).all()
                }
            claimed = [
                ClaimedJob(
                    id=j.id,
                    operation=j.operation,
                    params=j.params,
                    inputs=[file_info(f) for f in j.files if f.kind == "input"],
                    lease_id=lease_id,
                    attempt=j.attempts,
                    limits=JobLimits.model_validate(j.limits),
                    confidential=_claimed_confidential(j, wrapped),
                    owner_key=owner_key(j.owner_id),
                )
                for j in sorted(jobs, key=lambda j: (j.fair_rank, j.seq))
            ]
            started = [owner_change(j.owner_id, j.id) for j in jobs]
        for key in started:  # running now: to the owners' event streams
            self.notifier.notify(key)
        return claimed

    def heartbeat(self, worker: Worker, beat: Heartbeat) -> HeartbeatResponse:
        now = utcnow()
        leases = {r.job_id: r for r in beat.running}
        abort: list[str] = []
        progressed: list[str] = []
        with transaction(self.sessions) as session:
            session.execute(update(Worker).where(Worker.id == worker.id).values(last_heartbeat=now))
            if not leases:
                return HeartbeatResponse()
            rows = {
                j.id: j
                for j in session.scalars(
                    select(Job).where(Job.id.in_(list(leases))).with_for_update()
                ).all()
            }
            expires = now + timedelta(seconds=self.settings.lease_seconds)
            for job_id, running in leases.items():
                job = rows.get(job_id)
                if (
                    job is None
                    or job.state != RUNNING
                    or job.worker_id != worker.id
                    or job.lease_id != running.lease_id
                ):
                    abort.append(job_id)
                    continue
                job.lease_expires_at = expires
                if (job.progress_fraction, job.progress_message) != (
                    running.progress.fraction,
                    running.progress.message,
                ):
                    progressed.append(owner_change(job.owner_id, job.id))
                job.progress_fraction = running.progress.fraction
                job.progress_message = running.progress.message
        for key in progressed:  # to the owners' event streams
            self.notifier.notify(key)
        return HeartbeatResponse(abort=abort)

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
        outputs_dir = self.attempt_dir(job_id, done.lease_id)
        with transaction(self.sessions) as session:
            job = self.running_job(session, worker, job_id, done.lease_id)
            pipelines.lock_parent(session, job)
            session.refresh(job, with_for_update=True)
            if job.state != RUNNING or job.lease_id != done.lease_id:
                raise ApiError(409, "lease_lost", f"job {ids.short(job_id)} is no longer yours")
            conf = confidential_of(job)
            if conf is not None:
                if done.result is not None:
                    raise ApiError(
                        422,
                        "plaintext_result",
                        f"job {ids.short(job_id)} is confidential: its result travels only "
                        "encrypted (encrypted_result)",
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
            woken = pipelines.step_finished(self, session, job)
        for key in [job_key(job_id), owner_change(job.owner_id, job_id), *woken]:
            self.notifier.notify(key)

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
