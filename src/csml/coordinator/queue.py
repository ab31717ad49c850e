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

Storage: every query is the store's (`csml.store.jobs` for reads, `jobs_write` for the
lifecycle's writes, `jobs_quota` for the quota counts); every write goes through the
`Writer` (`run` from threads, `await run_async` from the event loop), whose result
comes back only once committed. A request loads a job once, as a frozen `JobRow`.
File work (adopting uploads, writing inline outputs, reading output metadata) happens
before the write operation, which stays short and store-only; pipeline steps and model
artifacts still use ORM rows, on the operation's own connection (`orm_session`). Small
inputs and inline outputs (at most `Settings.db_blob_max_bytes`) are no file work: their
bytes ride in their rows, inserted by that write (`csml.store.blobs`, "Small blobs in
the database"); `file_content` reads them back.

Placement (`csml.placement`): a job's requirement (its operation's and its own) is
stored as a key (`jobs.requires_key`, the requirement in `placement_keys`); a claim's
probe reads, in the same statement, the app's newest key id, and this coordinator
reloads the app's keys only when it grew, then computes which keys the worker's
labels meet (cached per labels): the claim takes jobs without a requirement or with
one of those keys, still one statement. A claim with warm models prefers, among the
first `placement_window` jobs, those whose `warm_key` it holds. A job whose
requirement no worker heard from within the queue timeout meets fails then; until
then the reaper keeps a message naming what no live worker has on it.

What a claim reads before its write (each read a hint: the write checks again):
- the riding heartbeat's leases, only those this coordinator does not know
  (`csml.coordinator.lease_memo`: granted, extended or read here, forgotten when the
  job's `job:<id>` change is announced);
- the probe (is a job waiting for this worker?), only when no write is due anyway (a
  heartbeat, a liveness stamp, completions riding the claim), the claim was not woken
  for a job (a woken claim takes at once; if it took nothing it probes as a re-check
  does, and the API hands the wake to the next idle claimer), and, for the first look
  of a long-poll, the queue is not known to be empty for it (`_known_empty`: its last
  claim or probe found nothing and no job of the app was announced since, per the
  notifier's marks; then a long-poll carrying completions, with no heartbeat or stamp
  due, takes nothing in their write: it only waits, after their commit). Every job
  queued is announced once with `app_key` (one claimer
  woken per job) after its commit, and a job with a placement requirement also with
  `keys_key` (this coordinator's keys of the app may be behind). Except on one writer
  lane (SQLite) for a job without a requirement submitted one at a time while a claimer
  waits here: it is announced as soon as its write is queued (`submit_async`), so the
  claim's write runs after it, mostly in the same transaction (one COMMIT for both).

Every change of a job its owner can see (submitted, running, progress, ended,
requeued, cancelled) is announced after its commit with `owner_change(owner, job)`
(`ending=True` from completion, cancel and the reapers: those may end it), a notifier
feed key that reaches the owner's event streams here and, through the
PostgreSQL relay, on the other coordinators (see `api_events`). A plain job's
one-statement end returns the ended job, which is announced with its key here
(`Notifier.notify(key, view)`): this coordinator's streams send it without loading the
job, and so do the other coordinators' when the relay could carry the view with the key
(`csml.store.relay.view_text`: not a confidential job's, nor a large one); else they load it.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

import anyio.to_thread
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from csml import ids, placement
from csml.coordinator import artifacts, pipelines, quotas
from csml.coordinator.catalog import Catalog, CatalogEntry
from csml.coordinator.config import Settings
from csml.coordinator.credit import Priority
from csml.coordinator.lease_memo import Known, LeaseMemo
from csml.coordinator.notify import (
    Notifier,
    app_key,
    job_key,
    keys_key,
    owner_change,
    owner_topics,
)
from csml.coordinator.staged_inputs import StagedFile, adopt_input_rows
from csml.coordinator.verification import Batch, Decision, Verifier, contributor_of
from csml.coordinator.verification import digest as run_digest
from csml.coordinator.worker_tokens import CACHE as WORKER_TOKENS
from csml.refusals import Conflict, Invalid, NotFound, QueueFull, RateLimited, Refusal, TooLarge
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
    base64_text,
)
from csml.schemas.workers import (
    INLINE_MAX_BYTES,
    INLINE_OUTPUT_MAX_BYTES,
    BatchedCompletion,
    ClaimResponse,
    InlineOutput,
)
from csml.store import credit as ledger
from csml.store import jobs as store
from csml.store import jobs_end as ends
from csml.store import jobs_write as writes
from csml.store import verification as verified
from csml.store.blobs import BlobStore, fsync_folders_of
from csml.store.db import is_conflict, read_each, snapshot
from csml.store.jobs import Claimant, Envelope, FileRow, JobRow, OwnedFile
from csml.store.jobs_end import Locked
from csml.store.jobs_write import Claimed, NewJob, Sealing, orm_job, orm_session
from csml.store.tables import Job, utcnow
from csml.store.verification import Run, Standing
from csml.store.writer import Rerunnable, Writer

log = logging.getLogger("csml.coordinator.queue")
T = TypeVar("T")

QUEUED, RUNNING = JobState.queued.value, JobState.running.value
TERMINAL = (JobState.succeeded.value, JobState.failed.value, JobState.cancelled.value)


INLINE_CLAIM_BYTES = 1 << 20
"""Inline inputs per claim answer, in all (decoded bytes), and so each at most: a plain
job's input within what is left of it comes inline, read from its file when it is one
(at most 1 MiB on the event loop, as `GET …/inputs/{name}` reads one, `WholeFile`); the
worker downloads the others. Until session 14 each was also at most `INLINE_MAX_BYTES`
(256 KiB): (c)'s photos over it cost a download each (0.26 per photo)."""
DEPTH_CACHE_SECONDS = 1.0  # how long a coordinator trusts its count of an app's queue
DEPTH_MARGIN = 64  # below capacity by more than max(this, capacity / 10): no exact count
# A completion batch now also updates workers' records (verification): on PostgreSQL two
# lanes' open batches may deadlock on those rows; the victim op was rolled back alone
# (its savepoint) and runs again, at most this many times in all.
CONFLICT_RETRIES = 3
MAX_GRANTED = 100_000  # leases remembered for completions' file work (then forgotten)


class _Attempt:
    """One run of a write operation, as `with attempt:` (see `_conflict_attempts`): it
    swallows PostgreSQL's abort of the run to break a deadlock or a serialisation failure
    (`db.is_conflict`), so that the caller's loop runs the operation again, unless this
    is the last run; anything else, and any exception of the last run, goes through."""

    __slots__ = ("last", "what")

    def __init__(self, what: str, last: bool) -> None:
        self.what = what
        self.last = last

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if exc is None or self.last or not is_conflict(exc):
            return False
        log.info("%s met a deadlock; running it again", self.what)
        return True


@functools.cache
def _conflict_attempts(what: str) -> tuple[_Attempt, ...]:
    """The runs of a `Writer` operation (up to `CONFLICT_RETRIES` in all), for sync and
    async callers alike::

        for attempt in _conflict_attempts("a completion batch"):
            with attempt:
                return writer.run(op)  # or: await writer.run_async(op)

    A run PostgreSQL aborted was rolled back alone (its savepoint) and its effects outside
    the database come after the operation returns, so running it again is safe. `what`
    names the operation in the log line of each repeated run. The attempts hold no
    state of a run: one tuple per `what`, made once (nothing is built per operation)."""
    return tuple(_Attempt(what, last=n == CONFLICT_RETRIES) for n in range(1, CONFLICT_RETRIES + 1))


class WorkerRef(Protocol):
    """What the queue needs of the calling worker: its id and its app (an ORM `Worker`
    or the store's `WorkerRow` both qualify). Its placement labels are read as
    `labels` when it has them (`WorkerRow.labels`; none: it meets no requirement)."""

    @property
    def id(self) -> str: ...

    @property
    def app(self) -> str: ...


def _labels_of(worker: WorkerRef) -> dict[str, Any]:
    labels = getattr(worker, "labels", None)
    return dict(labels) if labels else {}


WAITING = "waiting: "
"""How the reaper's message on a job whose requirement no live worker meets starts."""


@dataclass
class _AppKeys:
    """An app's requirement keys as this coordinator last read them."""

    newest: int = 0
    requires: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> requirement
    met: dict[str, tuple[str, ...]] = field(default_factory=dict)  # labels (canonical) -> keys


@dataclass(frozen=True)
class Outcome:
    """One completion of a batch: None if kept, else the refusal that says why not."""

    job_id: str
    refusal: Refusal | None


@dataclass(frozen=True)
class _Prepared:
    """What a completion brings from disk before its transaction: the outputs' metadata
    (succeeded jobs) and a refusal of its inline outputs, if any; `hinted`: the inline
    outputs it wrote (`written`) were written on this coordinator's grant of the lease
    (`_Granted`), not on a read, and are removed if the completion is refused.
    `contents`: the bytes of the inline outputs kept in the database (by name), which
    were written nowhere: their rows carry them."""

    outputs: tuple[FileInfo, ...]
    refusal: Refusal | None
    written: tuple[Path, ...] = ()
    hinted: bool = False
    contents: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Granted:
    """A lease this coordinator granted to a worker by a claim, for a plain job (no
    envelope): a hint for the file work before the completion's transaction (which
    checks the lease again), in place of reading the job. Used once, by the first
    completion of the job that comes here."""

    lease_id: str
    worker_id: str
    app: str
    operation: str


@dataclass(frozen=True)
class _Claim:
    stamped: bool
    abort: list[str]
    progressed: list[str]
    taken: list[Claimed]
    lease_id: str
    until: datetime  # the leases' end (taken and extended)
    extended: list[RunningJob]  # the riding heartbeat's jobs still held (leases extended)
    since: int  # the lease memo's epoch before the write (`LeaseMemo.record`)
    asked: int  # jobs asked for
    marks: _Marks | None  # before the write, if taking fewer says the queue is empty for it


_Marks = tuple[tuple[int, int], tuple[int, int]]
"""The notifier's marks of an app's `app_key` and `keys_key` (see `JobQueue._exhausted`)."""

_Beaten = tuple[list[str], list[str], list[RunningJob], datetime]
"""A heartbeat's jobs to abort, owner-change keys, jobs still held, and their leases' end."""

_Done = tuple[list[Outcome], list[str], list[str], dict[str, JobRow]]
"""A completion batch's outcomes, wake-up keys, quarantined workers, and the views it
ended jobs with, by their `owner_change` key (handed to this coordinator's streams)."""


def _lease_lost(job_id: str, state: str) -> Conflict:
    return Conflict("lease_lost", f"job {ids.short(job_id)} is no longer yours to run ({state})")


class JobQueue:
    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        blobs: BlobStore,
        catalog: Catalog,
        notifier: Notifier,
        writer: Writer,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.engine: Engine = sessions.kw["bind"]
        self.blobs = blobs
        self.catalog = catalog
        self.notifier = notifier
        self.writer = writer
        self._stamped: dict[str, float] = {}  # worker id -> when its liveness was written
        self._depths: dict[str, tuple[int, float]] = {}  # app -> (queued, when counted)
        # credit: which claims may take a credited job ahead of round-robin (the bound).
        self.credit = Priority(settings.credit_priority_k, settings.credit_priority_n)
        self._keys: dict[str, _AppKeys] = {}  # app -> its requirement keys (placement)
        self.leases = LeaseMemo(notifier)  # leases known without a read (see lease_memo)
        # worker id -> the marks before its last claim or probe that found the queue empty
        # for it; app -> the `keys_key` mark before this coordinator last read its keys.
        self._exhausted: dict[str, _Marks] = {}
        self._keys_read: dict[str, tuple[int, int]] = {}
        self._granted: dict[str, _Granted] = {}  # job id -> the lease a claim here granted
        self._max_limits: dict[str, Any] | None = None  # `limits_for` without limits, dumped
        self.verifier = Verifier(self.engine, settings.verify_probation)
        # SQLite: one writer lane and no relay, so a submission may be announced while
        # its write is queued (`submit_async`, `Notifier.notify_early`).
        self._one_lane = writer.lanes == 1 and self.engine.dialect.name == "sqlite"

    @contextmanager
    def read(self, *, each: bool = False) -> Iterator[Connection]:
        """A pooled connection for reads (never a write lock): one snapshot for all its
        statements; with `each`, every statement is its own snapshot and no transaction
        is begun (no BEGIN: for a read of one statement; see `csml.store.db`)."""
        with (read_each if each else snapshot)(self.engine) as conn:
            yield conn

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
                    raise Invalid(
                        "limit_too_high",
                        f"limits.{name}: {value} is above this coordinator's maximum of {limit}",
                        field=f"spec.limits.{name}",
                    )
                chosen[name] = value
        return JobLimits.model_validate(chosen)

    def check_spec(self, spec: JobSpec, *, reads: bool = True) -> None:
        """Everything about a submission that can be refused before its files arrive;
        without `reads`, only what needs no store (its write checks the rest)."""
        self._check_params(spec)
        self.limits_for(spec)
        if not reads:
            return
        with self.read() as conn:
            if not self._far_from_full(conn, spec.app):
                self._check_capacity(conn, spec.app)
            self._check_recipients(conn, spec)

    def _check_params(self, spec: JobSpec, found: tuple[CatalogEntry, Any] | None = None) -> None:
        """`found`: the spec's (entry, operation) as `catalog.operation` just gave them."""
        entry, op = found or self.catalog.operation(spec.app, spec.operation)
        if spec.confidential is None:
            self.catalog.check_op_params(spec.app, entry, op, spec.params)
            return
        # Encrypted params are validated by the worker; the error comes back encrypted.
        if spec.params:
            raise Invalid(
                "invalid_params",
                "a confidential job's params must be {}: they travel encrypted in "
                "spec.confidential.encrypted_params",
                field="spec.params",
            )

    def _check_recipients(self, conn: Connection, spec: JobSpec) -> None:
        """Every recipient must be a running worker of the app that registered a key."""
        if spec.confidential is None:
            return
        wanted = [r.worker_id for r in spec.confidential.recipients]
        found = store.keyed_live_workers(conn, wanted, spec.app)
        for i, worker_id in enumerate(wanted):
            if worker_id not in found:
                raise Invalid(
                    "unknown_recipient",
                    f"spec.confidential.recipients[{i}]: {ids.short(worker_id)} is not a "
                    f"running {spec.app} worker with a key (see GET /v1/apps/{spec.app}/workers)",
                    field=f"spec.confidential.recipients.{i}.worker_id",
                )

    def check_files(self, spec: JobSpec, names: set[str], op: Any = None) -> None:
        """`op`: the spec's operation, as `catalog.operation` just gave it."""
        if op is None:
            _, op = self.catalog.operation(spec.app, spec.operation)
        declared = {f.name for f in op.inputs}
        by_id = artifacts.model_input(op)
        if by_id is not None and artifacts.requested_model(spec) is not None:
            names = names | {by_id.name}  # attached from the store at submission
        for extra in sorted(names - declared):
            raise Invalid(
                "unknown_input",
                f"operation {op.name!r} takes no input file {extra!r}; "
                f"it takes: {', '.join(sorted(declared)) or 'none'}",
                field=extra,
            )
        for f in op.inputs:
            if f.required and f.name not in names:
                raise Invalid(
                    "missing_input",
                    f"operation {op.name!r} needs the input file {f.name!r}",
                    field=f.name,
                )

    def _check_capacity(self, conn: Connection | Session, app: str) -> None:
        capacity = self.settings.capacity(app)
        depth = store.queued_depth(conn, app)
        if depth >= capacity:
            retry = self.settings.retry_after_seconds
            raise QueueFull(
                "queue_full",
                f"the {app} queue is full ({depth} of {capacity}); retry in {retry} s",
                retry_after=retry,
            )

    def _far_from_full(self, conn: Connection, app: str) -> bool:
        """Whether `app`'s queue is well below its bound, from a depth this coordinator
        counted less than `DEPTH_CACHE_SECONDS` ago plus the jobs it accepted since (a soft
        view: other coordinators' submissions show at the next count). Near the bound,
        submissions count exactly under the app's lock."""
        capacity = self.settings.capacity(app)
        margin = max(DEPTH_MARGIN, capacity // 10)
        now = time.monotonic()
        cached = self._depths.get(app)
        if cached is None or now - cached[1] >= DEPTH_CACHE_SECONDS:
            cached = (store.queued_depth(conn, app), now)
        far = cached[0] + margin < capacity
        self._depths[app] = (cached[0] + 1, cached[1])
        return far

    def submit(
        self,
        owner_id: str,
        spec: JobSpec,
        staging: Path | None,
        files: dict[str, StagedFile],
        *,
        count_window: bool = False,
    ) -> JobRow:
        """Create a queued job (quotas checked in its transaction); durable on return.
        `count_window`: also count it in the owner's submission window, in the same
        transaction (`quotas.count_submission`: a refused job is not counted)."""
        [answer] = self.submit_many(owner_id, [(spec, staging, files)], count_window=count_window)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def submit_many(
        self,
        owner_id: str,
        items: list[tuple[JobSpec, Path | None, dict[str, StagedFile]]],
        *,
        count_window: bool = False,
    ) -> list[JobRow | Exception]:
        """`submit` for many jobs of one owner at once: their writes are queued together,
        in order, so they share the writer's batches (one COMMIT for many jobs); each
        item is checked and quota-counted as a single submission, after the items
        before it (with `count_window`, each counts in the submission window as a
        single one). Per item, in order: its job, or the exception that refused it."""
        answers: list[JobRow | Exception | None] = [None] * len(items)
        ops: list[Callable[[Connection], JobRow]] = []
        placed: list[tuple[int, str]] = []  # (item index, job id) of each queued op
        for index, (spec, staging, files) in enumerate(items):
            try:
                job_id, op, requires = self._prepare_submit(spec, files)
            except Exception as exc:
                answers[index] = exc
                continue
            try:
                inputs = adopt_input_rows(self.blobs, staging, job_id, files)
            except Exception as exc:
                self.blobs.remove_job(job_id)  # whatever was moved before it failed
                answers[index] = exc
                continue
            ops.append(
                self._submit_op(owner_id, spec, op, requires, job_id, inputs, files, count_window)
            )
            placed.append((index, job_id))
        queued: list[JobRow] = []
        ran = self.writer.run_many(ops)
        for n, (op_, answer) in enumerate(zip(ops, ran, strict=True)):
            if (
                isinstance(answer, Exception)
                and is_conflict(answer)
                and isinstance(op_, Rerunnable)
            ):
                try:  # PostgreSQL broke a deadlock: that op, again (see `_write`)
                    ran[n] = self._write(op_, "a submission")
                except Exception as exc:
                    ran[n] = exc
        for (index, job_id), answer in zip(placed, ran, strict=True):
            answers[index] = answer
            if isinstance(answer, Exception):
                self.blobs.remove_job(job_id)  # adopted inputs and linked models
            else:
                queued.append(answer)
        self._announce(queued)
        return [a if a is not None else RuntimeError("not submitted") for a in answers]

    def _announce(self, queued: list[JobRow]) -> None:
        """Wake one claimer per job queued (a claim may take fewer than were queued: the
        others are for other claimers), and announce the jobs with a placement
        requirement (`keys_key`: the claimers' knowledge of the app's requirement keys
        may be behind; see `_exhausted`)."""
        jobs = Counter(job.app for job in queued)
        keyed = {job.app for job in queued if job.requires_key is not None}
        for app in keyed:
            self.notifier.notify(keys_key(app))
        for app, count in jobs.items():
            self.notifier.notify(app_key(app), times=count)

    async def submit_async(
        self,
        owner_id: str,
        spec: JobSpec,
        staging: Path | None,
        files: dict[str, StagedFile],
        *,
        count_window: bool = False,
        params_checked: bool = False,
    ) -> JobRow:
        """`submit` from the event loop (the write is the writer's, without a thread hop).
        `params_checked`: the spec's params were checked already (`check_spec`).

        On one writer lane (SQLite), a job without a placement requirement is announced
        as soon as its write is queued when a claimer of its app waits here
        (`Notifier.notify_early`): that claim's write queues behind the submission's, so it
        takes the job, in the same transaction when it joins the batch (one COMMIT for
        both on a one-at-a-time job's path). Nothing is answered before the commit."""
        job_id, op, requires = self._prepare_submit(spec, files, params_checked)
        early: asyncio.Event | None = None
        key = app_key(spec.app)
        try:
            inputs = adopt_input_rows(self.blobs, staging, job_id, files)
            write = self._submit_op(
                owner_id, spec, op, requires, job_id, inputs, files, count_window
            )
            if self._one_lane and not requires and self.notifier.claimer_waits(key):
                queued = self.writer.queue_async(write, follower=True)  # the claim follows
                early = self.notifier.notify_early(key)
                job = await queued
            else:
                job = await self._write_async(write, "a submission")
        except BaseException:
            self.blobs.remove_job(job_id)
            if early is not None:
                self.notifier.withdraw(key, early)
            raise
        if early is None:
            self._announce([job])
            await self.notifier.hand_over()  # the woken claimer takes the job before we answer
        else:
            await asyncio.sleep(0)  # the claim answered by the same commit goes out first
        return job

    def _prepare_submit(
        self, spec: JobSpec, files: dict[str, StagedFile], params_checked: bool = False
    ) -> tuple[str, Any, dict[str, Any]]:
        """The new job's id, its operation and its requirement, once its spec is checked
        (the operation looked up once for all the checks; its params not again when
        `params_checked`)."""
        found = self.catalog.operation(spec.app, spec.operation)
        op = found[1]
        if not params_checked:
            self._check_params(spec, found)
        requires = self.requirement(spec, op)
        self.check_files(spec, set(files), op)
        return ids.new_id(), op, requires

    def requirement(self, spec: JobSpec, op: Any = None) -> dict[str, Any]:
        """The job's requirement: its operation's and its own (`placement.merge`);
        Invalid naming the condition when no worker could ever meet both. `op`: the
        spec's operation, as `catalog.operation` just gave it."""
        if op is None:
            _, op = self.catalog.operation(spec.app, spec.operation)
        try:
            return placement.merge(op.requires, spec.requires)
        except placement.PlacementError as exc:
            raise Invalid(
                "unsatisfiable_requirement",
                f"spec.requires: {exc}",
                field=f"spec.requires.{exc.name}" if exc.name else "spec.requires",
            ) from None

    def _submit_op(
        self,
        owner_id: str,
        spec: JobSpec,
        op: Any,
        requires: dict[str, Any],
        job_id: str,
        inputs: list[FileRow],
        files: dict[str, StagedFile],
        count_window: bool = False,
    ) -> Callable[[Connection], JobRow]:
        if spec.limits is None:  # the maxima: one JobLimits made per process, not per job
            if self._max_limits is None:
                self._max_limits = self.limits_for(spec).model_dump()
            limits = dict(self._max_limits)
        else:
            limits = self.limits_for(spec).model_dump()
        conf = spec.confidential
        upload = (
            sum(f.size for f in files.values())
            + quotas.params_bytes(spec.params)
            + (len(conf.encrypted_params) if conf else 0)
        )
        adding = quotas.models_made(op)
        requires_key = placement.key_of(requires)
        model_input = artifacts.model_input(op)
        sealing = (
            Sealing(
                version=conf.version,
                job_nonce=conf.job_nonce,
                result_public_key=conf.result_public_key,
                encrypted_params=conf.encrypted_params,
                wrapped_keys=tuple((r.worker_id, r.wrapped_key) for r in conf.recipients),
            )
            if conf is not None
            else None
        )

        admit = quotas.admission(self, owner_id, upload)

        # PostgreSQL, a job with no model, requirement or envelope: the owner's lock, its
        # count in the submission window (`count_window`), its rank and its row go in one
        # round trip when the app's queue is far from its bound (`writes.locked_insert_job`).
        plain = (
            sealing is None
            and requires_key is None
            and not adding
            and artifacts.requested_model(spec) is None
        )

        def make(rank: int, params: dict[str, Any], rows: list[FileRow]) -> NewJob:
            model = (
                next((f for f in rows if f.name == model_input.name), None)
                if model_input is not None and sealing is None
                else None
            )
            return NewJob(
                id=job_id,
                owner_id=owner_id,
                app=spec.app,
                operation=op.name,
                params=params,
                limits=limits,
                fair_rank=rank,
                created_at=utcnow(),
                max_attempts=self.settings.max_attempts,
                requires_key=requires_key,
                warm_key=(
                    placement.warm_key(owner_key(owner_id), model.sha256)
                    if model is not None
                    else None
                ),
                trusted_only=spec.trusted_only,
                min_reputation=spec.min_reputation,
            )

        def answer(seq: int, new: NewJob, rows: list[FileRow]) -> JobRow:
            return JobRow(
                seq=seq,
                id=job_id,
                owner_id=owner_id,
                app=spec.app,
                operation=op.name,
                params=new.params,
                limits=limits,
                state=QUEUED,
                fair_rank=new.fair_rank,
                created_at=new.created_at,
                started_at=None,
                finished_at=None,
                attempts=0,
                max_attempts=new.max_attempts,
                progress_fraction=0.0,
                progress_message="",
                error=None,
                result=None,
                worker_id=None,
                lease_id=None,
                lease_expires_at=None,
                parent_seq=None,
                step_index=None,
                requires_key=new.requires_key,
                warm_key=new.warm_key,
                files=tuple(rows),
                confidential=(
                    Envelope(
                        sealing.version,
                        sealing.job_nonce,
                        sealing.result_public_key,
                        sealing.encrypted_params,
                        None,
                    )
                    if sealing is not None
                    else None
                ),
                trusted_only=spec.trusted_only,
                min_reputation=spec.min_reputation,
            )

        def op_(conn: Connection) -> JobRow:
            # Lock order: the owner's identity row, its counter row, then the app's row.
            postgres = conn.dialect.name != "sqlite"
            far = self._far_from_full(conn, spec.app) if postgres and plain else None
            rank: int | None
            if far:
                rows = list(inputs)
                new = make(0, dict(spec.params), rows)  # its rank: the statement's
                now = new.created_at
                window = quotas.submission_window(self, owner_id, now) if count_window else None
                found, landed, counted = writes.locked_insert_job(conn, new, admit, window)
                if not found:
                    quotas.require_identity(conn, owner_id)  # erased meanwhile: 401
                if counted is not None:  # past the window: refused, the write undone
                    quotas.counted_submission(self, counted, now)
                if landed is not None:
                    seq, rank = landed
                    writes.add_files(conn, seq, rows)
                    return answer(seq, replace(new, fair_rank=rank), rows)
                rank = None  # refused, or no such app (below says which)
            else:
                # A job with a model, requirement or envelope, or near its app's bound:
                # statement by statement (since session 17 also with the window off: the
                # lock and rank in one round trip served only those, and little).
                if postgres:
                    quotas.require_identity(conn, owner_id)  # PostgreSQL: the owner's lock
                if count_window:  # as `abuse.check_submission` would: identity, window, quotas
                    try:
                        quotas.count_submission(self, conn, owner_id)
                    except RateLimited:
                        quotas.require_identity(conn, owner_id)  # an erased identity: 401 first
                        raise
                # One statement: the rank (it reads the app's served rank), written only
                # if the identity still exists and the job fits its active-jobs and
                # stored-bytes quotas (`quotas.admission`; race-free: see
                # `csml.store.jobs_quota`).
                rank = writes.next_rank(conn, spec.app, owner_id, admit)
            if rank is None:
                # Refused, or no such app: the checks of before say which (and raise
                # their refusal); if they pass (the counts moved since: an expiry), the
                # job is admitted by them, under the same lock.
                quotas.check_new_job(
                    self, conn, self.catalog, owner_id, upload_bytes=upload, adding_models=0
                )
                rank = writes.next_rank(conn, spec.app, owner_id)
                if rank is None:
                    raise NotFound("unknown_app", f"no application {spec.app!r}")
            quotas.check_new_models(self, conn, self.catalog, owner_id, adding)
            if not (self._far_from_full(conn, spec.app) if far is None else far):
                # Near the bound: exact, under the app's lock (far from it: no lock).
                writes.lock_app(conn, spec.app)
                self._check_capacity(conn, spec.app)
            self._check_recipients(conn, spec)
            params, rows = dict(spec.params), list(inputs)
            if artifacts.requested_model(spec) is not None:
                params, linked = self._attach_model(conn, owner_id, spec, job_id, set(files))
                rows += linked
            if requires_key is not None:
                writes.add_requirement_key(conn, spec.app, requires_key, requires, utcnow())
            new = make(rank, params, rows)
            seq = writes.insert_job(conn, new, rows, sealing)
            return answer(seq, new, rows)

        if artifacts.requested_model(spec) is None:
            # Rows only (`_depths` is a soft count: a repeat counts a job twice, as a
            # refused one counts once): the writer may run it bare, and again. A linked
            # model is a file, written once.
            return Rerunnable(op_)
        return op_

    def _attach_model(
        self, conn: Connection, owner_id: str, spec: JobSpec, job_id: str, uploaded: set[str]
    ) -> tuple[dict[str, Any], list[FileRow]]:
        """Link the caller's model named by `params.model` in as the model input (the
        model rows are still read with the ORM: `csml.coordinator.artifacts`)."""
        shell = Job(id=job_id, params=dict(spec.params), files=[])
        with orm_session(conn) as session:
            artifacts.attach(session, self.blobs, self.catalog, owner_id, spec, shell, uploaded)
        linked = [
            FileRow(f.kind, f.name, f.size, f.sha256, f.media_type, f.blob, f.model_id)
            for f in shell.files
        ]
        return dict(shell.params), linked

    # -- owner's view -------------------------------------------------------

    def get(self, owner_id: str, ident: str) -> JobRow:
        """The owner's job by id or unique prefix, with its files and envelope."""
        with self.read(each=True) as conn:
            return store.owned(conn, owner_id, ident)

    def owned_file(self, owner_id: str, ident: str, kind: str, name: str) -> OwnedFile | None:
        """The owner's job's file `name` of `kind`, with its bytes when the database
        keeps them (one read: `store.owned_file`); None when the job has no such file."""
        with self.read(each=True) as conn:
            return store.owned_file(conn, owner_id, ident, kind, name)

    def state_of(self, owner_id: str, ident: str) -> tuple[str, str]:
        """(id, state) of the owner's job, without loading it (one query)."""
        with self.read(each=True) as conn:
            return store.owned_state(conn, owner_id, ident)

    def list_jobs(
        self, owner_id: str, *, state: str | None, app: str | None, limit: int
    ) -> list[JobRow]:
        with self.read(each=True) as conn:
            return store.list_owned(conn, owner_id, state=state, app=app, limit=limit)

    def changed_jobs(self, owner_id: str, job_ids: set[str]) -> list[JobRow]:
        """The owner's jobs among `job_ids` as the owner lists them: a pipeline step
        stands for its pipeline; another identity's or an erased job is left out."""
        with self.read(each=True) as conn:
            return store.changed(conn, owner_id, job_ids)

    def cancel(self, owner_id: str, ident: str) -> JobRow:
        """Cancel the owner's job; announced to its long-polls and the owner's streams."""

        def op(conn: Connection) -> tuple[JobRow, list[str]]:
            job = store.owned(conn, owner_id, ident, lock=True)
            if job.state in TERMINAL:
                raise Conflict("already_finished", f"job {ids.short(job.id)} already {job.state}")
            now = utcnow()
            error = "cancelled by its owner"
            woken: list[str] = []
            if job.parent_seq is not None or job.step_index is not None:
                with orm_session(conn) as session:  # a pipeline or one of its steps
                    pipelines.refuse_step_cancel(session, orm_job(session, job.seq))
                    ends.end(conn, job.seq, state=JobState.cancelled.value, now=now, error=error)
                    woken = pipelines.cancel_steps(session, orm_job(session, job.seq))
            else:
                ends.end(conn, job.seq, state=JobState.cancelled.value, now=now, error=error)
            ended = replace(
                job,
                state=JobState.cancelled.value,
                finished_at=now,
                error=error,
                lease_id=None,
                lease_expires_at=None,
            )
            return ended, woken

        job, woken = self._write(op, rerun=True)
        for key in [job_key(job.id), owner_change(owner_id, job.id, ending=True), *woken]:
            self.notifier.notify(key)
        return job

    # -- workers ------------------------------------------------------------

    def claim(self, worker: WorkerRef, max_jobs: int) -> list[ClaimedJob]:
        """Take up to `max_jobs` jobs (see `claim_and_beat`)."""
        return self.claim_and_beat(worker, max_jobs).jobs

    def claim_and_beat(
        self,
        worker: WorkerRef,
        max_jobs: int,
        running: list[RunningJob] | None = None,
        *,
        wait: float = 0.0,
        warm: list[str] | None = None,
    ) -> ClaimResponse:
        """Take up to `max_jobs` jobs (one statement), extending the leases of `running`
        (a heartbeat riding along). Writes nothing when nothing is queued and no
        heartbeat or liveness stamp is due. Only jobs whose requirement the worker's
        labels meet; with `warm` (its warm keys), those jobs first near the head."""
        op, gone = self._claim_op(worker, max_jobs, running or [], wait, warm or [])
        if op is None:
            return ClaimResponse(jobs=[], abort=gone)
        return self._claimed(worker, self._write(op, "a claim"), gone)

    async def claim_and_beat_async(
        self,
        worker: WorkerRef,
        max_jobs: int,
        running: list[RunningJob] | None = None,
        *,
        wait: float = 0.0,
        warm: list[str] | None = None,
        woken: bool = False,
        recheck: bool = False,
    ) -> ClaimResponse:
        """`claim_and_beat` from the event loop. `woken`: the claim was woken for a job
        queued meanwhile, so it takes without probing first; if it took nothing (the job
        went to another claim, or is not for this worker, or needs a requirement key
        this coordinator did not know yet), it claims as a re-check would (probe,
        learning new keys, then take if something waits for it). A long-poll (`wait`)
        that is not a `recheck` does not probe when this worker's last claim or probe
        here found the queue empty for it and nothing was queued since
        (`_known_empty`): it waits for the wake-up."""
        op, gone = self._claim_op(
            worker, max_jobs, running or [], wait, warm or [], woken, known=not recheck
        )
        if op is None:
            return ClaimResponse(jobs=[], abort=gone)
        answer = self._claimed(worker, await self._write_async(op, "a claim"), gone)
        if woken and not answer.jobs:
            again = await self.claim_and_beat_async(
                worker, max_jobs, wait=wait, warm=warm, recheck=True
            )
            again.abort = [*answer.abort, *again.abort]
            return again
        return answer

    def _claim_op(
        self,
        worker: WorkerRef,
        max_jobs: int,
        running: list[RunningJob],
        wait: float,
        warm: list[str],
        woken: bool = False,
        *,
        known: bool = False,
        riding: bool = False,
    ) -> tuple[Callable[[Connection], _Claim] | None, list[str]]:
        """The claim's write (None: nothing to write) and the jobs of `running` already
        ended or lost (to abort: read, not written). `woken`: take without probing;
        `known`: a long-poll may trust `_known_empty` instead of probing; `riding`
        (with `woken`): completions ride it, so it takes in their write without probing,
        unless it long-polls with the queue known empty for it (then it writes nothing:
        no take in the completions' transaction, which their results wait for)."""
        stamp = self._stamp_due(worker.id)
        claimant = self._claimant(worker)
        since = self.leases.epoch()
        app = worker.app
        credit = self.credit if self.credit.active(app, self._any_credited) else None
        window = self.settings.placement_window if warm else 0
        # Whether taking fewer than asked means nothing more waits for this worker: not
        # with a contributed worker's filters (they change without an announcement), nor
        # credit priority (it may take fewer on purpose), nor a warm window shorter
        # than the claim.
        exhaustive = claimant is None and credit is None and (not window or max_jobs <= window)
        marks = self._marks(app) if exhaustive else None
        gone: list[str] = []
        # The riding heartbeat's lease check and the probe are hints (the write re-checks
        # both), so they need not agree: each runs on its own, without a BEGIN; the lease
        # check reads only leases this coordinator does not know (`lease_memo`), and the
        # probe runs only when no write is due anyway and the claim was not woken for a
        # job (then the write takes what there is).
        beat = self._beat_known(worker, running, wait) if running else ([], [])
        keys = self._keys.get(worker.app)
        if (
            riding
            and beat is not None
            and not (beat[0] or stamp)
            and self._known_empty(worker, marks, wait)
        ):
            return None, beat[1]
        writing = beat is not None and bool(beat[0] or stamp or woken)
        if beat is not None and keys is not None and writing:
            running, gone = beat
            met = self._met(keys, _labels_of(worker))
        elif beat is not None and not writing and known and self._known_empty(worker, marks, wait):
            return None, beat[1]
        else:
            with self.read(each=True) as conn:
                if beat is None:
                    running, gone = self._beat_due(conn, worker, running, wait)
                else:
                    running, gone = beat
                if running or stamp or woken:
                    met = self._known_met(conn, worker)  # a write is due anyway: no probe
                elif known and self._known_empty(worker, marks, wait):
                    return None, gone
                else:
                    queued, met = self._has_queued(conn, worker, claimant)
                    if not queued:
                        if marks is not None:
                            self._empty_for(worker, marks)
                        return None, gone
        worker_id = worker.id
        lease_id = ids.new_id()
        beating = running

        def op(conn: Connection) -> _Claim:
            now = utcnow()
            if stamp:
                writes.stamp_worker(conn, worker_id, now)
            abort, progressed, extended = self._beat(conn, worker_id, beating, now)
            until = now + timedelta(seconds=self.settings.lease_seconds)

            def take(limit: int, credited: bool = False) -> list[Claimed]:
                return writes.take(
                    conn,
                    worker_id,
                    app,
                    limit,
                    lease_id,
                    now,
                    until,
                    met=met,
                    warm=warm,
                    window=window,
                    credited=credited,
                    claimant=claimant,
                )

            taken = take(max_jobs) if credit is None else credit.claim(app, max_jobs, take)
            return _Claim(
                stamp, abort, progressed, taken, lease_id, until, extended, since, max_jobs, marks
            )

        # Without credit it writes only rows: the writer may run it bare, and again
        # (credit's window, in memory, records each claim once).
        return (Rerunnable(op) if credit is None else op), gone

    def _claimant(self, worker: WorkerRef) -> Claimant | None:
        """A contributed worker's claim filters (None for an operator worker: no cost)."""
        if contributor_of(worker) is None:
            return None
        return self.verifier.claimant(worker, lambda: self._deterministic(worker.app))

    def _deterministic(self, app: str) -> tuple[str, ...]:
        """`app`'s deterministic operations (those a result can be compared for)."""
        try:
            entry = self.catalog.get(app)
        except Exception:  # not catalogued (any more): nothing to compare
            return ()
        return tuple(sorted(n for n, op in entry.operations.items() if op.deterministic))

    def _marks(self, app: str) -> _Marks:
        return self.notifier.mark(app_key(app)), self.notifier.mark(keys_key(app))

    def _empty_for(self, worker: WorkerRef, marks: _Marks) -> None:
        """A claim or probe that began at `marks` found nothing (more) for `worker`."""
        if self._keys_read.get(worker.app) != marks[1]:
            # A job with a placement requirement was announced since this coordinator
            # last read the app's keys: that claim or probe may not have met it.
            self._exhausted.pop(worker.id, None)
            return
        if len(self._exhausted) > 10_000:
            self._exhausted.clear()
        self._exhausted[worker.id] = marks

    def _known_empty(self, worker: WorkerRef, marks: _Marks | None, wait: float) -> bool:
        """Whether a long-poll (`wait`) may wait at once, the queue being known to hold
        nothing for `worker`: its last claim or
        probe here found it empty, began after this coordinator last read the app's
        requirement keys, and no job of the app was announced since (nor may an
        announcement have been lost: `Notifier.mark`), by any coordinator (on PostgreSQL
        only while the relay listens). A job announced later wakes a waiter; one whose
        announcement is on its way wakes the waiter this claim becomes. A mistake would
        cost a long-poll one re-check (`Notifier.recheck_seconds`), as a lost
        notification does."""
        return (
            wait > 0
            and marks is not None
            and self.notifier.reliable
            and self._exhausted.get(worker.id) == marks
        )

    def _claimed(self, worker: WorkerRef, claim: _Claim, gone: list[str]) -> ClaimResponse:
        if claim.marks is not None and len(claim.taken) < claim.asked:
            self._empty_for(worker, claim.marks)
        else:
            self._exhausted.pop(worker.id, None)
        for t in claim.taken:  # before the announcements below (they drop nothing of it)
            self.leases.record(
                t.id,
                Known(
                    worker.id,
                    claim.lease_id,
                    claim.until,
                    t.progress_fraction,
                    t.progress_message,
                ),
                claim.since,
            )
        self._remember_extended(worker, claim.extended, claim.until, claim.since)
        # Running now, or progressed: to the owners' event streams.
        for key in [*(owner_change(t.owner_id, t.id) for t in claim.taken), *claim.progressed]:
            self.notifier.notify(key)
        if claim.stamped:
            if len(self._stamped) > 10_000:  # workers that left long ago: forget them
                self._stamped.clear()
            self._stamped[worker.id] = time.monotonic()
        if len(self._granted) > MAX_GRANTED:  # leases lost or never completed here
            self._granted.clear()
        for t in claim.taken:
            if t.sealed is None:  # a confidential job's outputs never come inline
                self._granted[t.id] = _Granted(claim.lease_id, worker.id, worker.app, t.operation)
        abort = [*gone, *claim.abort]
        return ClaimResponse(jobs=self._inline(claim.taken, claim.lease_id), abort=abort)

    def _remember_extended(
        self, worker: WorkerRef, extended: list[RunningJob], until: datetime, since: int
    ) -> None:
        """The leases a heartbeat extended (their progress now the reported one)."""
        for r in extended:
            known = Known(worker.id, r.lease_id, until, r.progress.fraction, r.progress.message)
            self.leases.record(r.job_id, known, since)

    def _stamp_due(self, worker_id: str) -> bool:
        """Whether this worker's liveness (`last_heartbeat`) needs writing: at most once per
        heartbeat interval (and a third of the live window) from this coordinator."""
        every = min(self.settings.heartbeat_seconds, self.settings.worker_live_seconds / 3)
        last = self._stamped.get(worker_id)
        return last is None or time.monotonic() - last >= every

    def _fresh_until(self, wait: float) -> datetime:
        """A lease ending after this needs no extension by a heartbeat riding on a claim
        that may long-poll `wait` seconds (see `_beat_due`)."""
        s = self.settings
        left = max(s.lease_seconds - s.heartbeat_seconds / 2, wait + s.heartbeat_seconds)
        return utcnow() + timedelta(seconds=left)

    def _beat_known(
        self, worker: WorkerRef, running: list[RunningJob], wait: float
    ) -> tuple[list[RunningJob], list[str]] | None:
        """`_beat_due` answered from the lease memo without a read, when it knows every
        job's lease as this worker's current one (else None: read). Never says a job is
        gone: only a read does."""
        fresh_until: datetime | None = None
        due = False
        for r in running:
            known = self.leases.get(r.job_id)
            if known is None or known.worker_id != worker.id or known.lease_id != r.lease_id:
                return None
            if not due:
                if fresh_until is None:
                    fresh_until = self._fresh_until(wait)
                due = known.expires_at < fresh_until or (
                    known.progress_fraction,
                    known.progress_message,
                ) != (r.progress.fraction, r.progress.message)
        return (running if due else []), []

    def _beat_due(
        self, conn: Connection, worker: WorkerRef, running: list[RunningJob], wait: float
    ) -> tuple[list[RunningJob], list[str]]:
        """The heartbeat riding on a claim (that may long-poll `wait` seconds), from one
        read of the leases: the jobs whose leases to extend (all still held, or none) and
        the jobs no longer this worker's under their lease (ended, cancelled, lost: to
        abort; a lease never comes back, so the read is as good as the write's answer).
        The leases still held are remembered (`lease_memo`): the next claim's heartbeat
        needs no read unless one of them changed.

        None is extended when every job still held has its progress unchanged and its
        lease extended less than half a heartbeat interval ago and lasting past this
        claim's wait plus a heartbeat interval (the next heartbeat, at most an interval
        later, finds the lease at least `lease_seconds - 1.5 heartbeat_seconds` from its
        end). A job that ended is no reason to write: on PostgreSQL the write would lock
        the worker's other running jobs, whose completions are on their way."""
        fresh_until = self._fresh_until(wait)
        since = self.leases.epoch()
        held = store.leases(conn, [r.job_id for r in running])
        kept: list[RunningJob] = []
        gone: list[str] = []
        due = False
        for r in running:
            lease = held.get(r.job_id)
            if (
                lease is None
                or lease.state != RUNNING
                or lease.worker_id != worker.id
                or lease.lease_id != r.lease_id
            ):
                gone.append(r.job_id)
                continue
            kept.append(r)
            if lease.lease_expires_at is not None:
                known = Known(
                    worker.id,
                    r.lease_id,
                    lease.lease_expires_at,
                    lease.progress_fraction,
                    lease.progress_message,
                )
                self.leases.record(r.job_id, known, since)
            if (
                lease.lease_expires_at is None
                or lease.lease_expires_at < fresh_until
                or (lease.progress_fraction, lease.progress_message)
                != (r.progress.fraction, r.progress.message)
            ):
                due = True
        return (kept if due else []), gone

    def _has_queued(
        self, conn: Connection, worker: WorkerRef, claimant: Claimant | None = None
    ) -> tuple[bool, tuple[str, ...]]:
        """Whether a job waits for this worker (a contributed one: within its `claimant`
        filter), and the requirement keys it meets: one read, and one more only when the
        app's requirement keys changed since this coordinator last read them (then the
        probe runs again with the new keys)."""
        app, labels = worker.app, _labels_of(worker)
        keys = self._keys.setdefault(app, _AppKeys())
        met = self._met(keys, labels)
        before = self.notifier.mark(keys_key(app))
        queued, newest = store.probe(conn, worker.id, app, met, claimant)
        self._keys_read[app] = before  # the keys known now are all those of `newest`
        if newest > keys.newest:
            keys = self._reload_keys(conn, app, keys)
            met = self._met(keys, labels)
            if not queued:
                queued, _ = store.probe(conn, worker.id, app, met, claimant)
        return queued, met

    def _known_met(self, conn: Connection, worker: WorkerRef) -> tuple[str, ...]:
        """The requirement keys this worker meets among those this coordinator knows (read
        once per app; a key added since is learned at the next probe)."""
        keys = self._keys.get(worker.app)
        if keys is None:
            before = self.notifier.mark(keys_key(worker.app))
            keys = self._reload_keys(conn, worker.app, _AppKeys())
            self._keys_read[worker.app] = before
        return self._met(keys, _labels_of(worker))

    def _reload_keys(self, conn: Connection, app: str, keys: _AppKeys) -> _AppKeys:
        found = store.requirement_keys(conn, app, keys.newest)
        requires = {**keys.requires, **{key: dict(req) for _, key, req in found}}
        fresh = _AppKeys(max([keys.newest, *(i for i, _, _ in found)]), requires)
        if len(self._keys) > 10_000:
            self._keys.clear()
        self._keys[app] = fresh
        return fresh

    @staticmethod
    def _met(keys: _AppKeys, labels: dict[str, Any]) -> tuple[str, ...]:
        """The keys of `keys` whose requirement `labels` meet (cached per labels)."""
        if not keys.requires:
            return ()
        by = placement.canonical(labels)
        met = keys.met.get(by)
        if met is None:
            met = tuple(k for k, req in keys.requires.items() if placement.meets(labels, req))
            if len(keys.met) > 1000:
                keys.met.clear()
            keys.met[by] = met
        return met

    def _any_credited(self) -> bool:
        with self.read(each=True) as conn:
            return ledger.any_credited(conn)

    def _inline(self, taken: list[Claimed], lease_id: str) -> list[ClaimedJob]:
        """The claimed jobs for the worker, with inputs of plain jobs inline (base64) up
        to a total per claim (`INLINE_CLAIM_BYTES`); the worker downloads the others."""
        budget = INLINE_CLAIM_BYTES
        out: list[ClaimedJob] = []
        for t in taken:
            job = ClaimedJob(
                id=t.id,
                operation=t.operation,
                params=t.params,
                inputs=[file_info(f) for f in t.inputs],
                lease_id=lease_id,
                attempt=t.attempts,
                limits=JobLimits.model_validate(t.limits),
                confidential=(
                    ClaimedConfidential(
                        job_nonce=t.sealed.job_nonce,
                        wrapped_key=t.sealed.wrapped_key,
                        result_public_key=t.sealed.result_public_key,
                        encrypted_params=t.sealed.encrypted_params,
                    )
                    if t.sealed is not None
                    else None
                ),
                owner_key=owner_key(t.owner_id),
            )
            out.append(job)
            if t.sealed is not None:
                continue
            for f in t.inputs:
                if f.size > budget:
                    continue
                text = self.blobs.base64_of(  # as it was submitted
                    f.blob,
                    f.sha256,
                    f.size,
                    functools.partial(self.file_content, t.seq, f.kind, f.name),
                )
                if text is None:
                    continue  # the worker's download will say what is wrong
                budget -= f.size
                job.inline_inputs[f.name] = text
        return out

    def file_content(self, seq: int, kind: str, name: str) -> bytes | None:
        """The bytes of job `seq`'s file kept in the database (`csml.store.blobs.in_db`),
        or None (no such file, or one on disk)."""
        with self.read(each=True) as conn:
            return store.file_content(conn, seq, kind, name)

    def heartbeat(self, worker: WorkerRef, beat: Heartbeat) -> HeartbeatResponse:
        """Write the worker's liveness, extend its leases, record progress; which to abort."""
        op, since = self._heartbeat_op(worker, beat)
        return self._heartbeat_done(worker, self._write(op, "a heartbeat"), since)

    async def heartbeat_async(self, worker: WorkerRef, beat: Heartbeat) -> HeartbeatResponse:
        """`heartbeat` from the event loop."""
        op, since = self._heartbeat_op(worker, beat)
        return self._heartbeat_done(worker, await self._write_async(op, "a heartbeat"), since)

    def _heartbeat_op(
        self, worker: WorkerRef, beat: Heartbeat
    ) -> tuple[Callable[[Connection], _Beaten], int]:
        """The heartbeat's write, and the lease memo's epoch before it."""
        worker_id = worker.id

        def op(conn: Connection) -> _Beaten:
            now = utcnow()
            writes.stamp_worker(conn, worker_id, now)
            until = now + timedelta(seconds=self.settings.lease_seconds)
            return *self._beat(conn, worker_id, beat.running, now), until

        return Rerunnable(op), self.leases.epoch()  # rows only: it may run again

    def _heartbeat_done(self, worker: WorkerRef, done: _Beaten, since: int) -> HeartbeatResponse:
        abort, progressed, extended, until = done
        self._stamped[worker.id] = time.monotonic()
        self._remember_extended(worker, extended, until, since)
        for key in progressed:  # to the owners' event streams
            self.notifier.notify(key)
        return HeartbeatResponse(abort=abort)

    def _beat(
        self, conn: Connection, worker_id: str, running: list[RunningJob], now: datetime
    ) -> tuple[list[str], list[str], list[RunningJob]]:
        """Extend the leases still held, record changed progress. Returns the jobs to abort
        (cancelled, finished or lease lost), the owner-change keys of the jobs whose
        progress changed (to announce after the commit), and the jobs still held (their
        leases now end `lease_seconds` from `now`, their progress the reported one)."""
        if not running:
            return [], [], []
        until = now + timedelta(seconds=self.settings.lease_seconds)
        held = writes.extend_leases(
            conn, worker_id, [(r.job_id, r.lease_id) for r in running], until
        )
        progressed: list[str] = []
        for r in running:
            h = held.get(r.job_id)
            if h is not None and (h.progress_fraction, h.progress_message) != (
                r.progress.fraction,
                r.progress.message,
            ):
                progressed.append(owner_change(h.owner_id, r.job_id))
                writes.set_progress(
                    conn, r.job_id, r.lease_id, r.progress.fraction, r.progress.message
                )
        abort = [r.job_id for r in running if r.job_id not in held]
        return abort, progressed, [r for r in running if r.job_id in held]

    def running_job(self, worker: WorkerRef, job_id: str, lease_id: str) -> JobRow:
        """A job this worker runs under `lease_id` (NotFound, or Conflict: lease lost)."""
        with self.read(each=True) as conn:
            job = store.by_id(conn, job_id)
        if job is None:
            raise NotFound.of("job", job_id)
        if job.state != RUNNING or job.worker_id != worker.id or job.lease_id != lease_id:
            raise _lease_lost(job_id, job.state)
        return job

    def attempt_dir(self, job_id: str, lease_id: str) -> Path:
        return self.blobs.job_dir(job_id) / f"attempt-{lease_id[:16]}"

    def attempt_dir_name(self, job_id: str, lease_id: str) -> str:
        """`str(attempt_dir(…))` without pathlib (a completion's listing: pathlib's joins
        cost more than the `listdir` itself)."""
        return os.path.join(
            str(self.blobs.root), "jobs", job_id[:2], job_id, f"attempt-{lease_id[:16]}"
        )

    def complete(self, worker: WorkerRef, job_id: str, done: JobCompletion) -> None:
        """One job's end; a refusal (Conflict: lease lost, Invalid …) if refused."""
        self.complete_many(
            worker, [BatchedCompletion(job_id=job_id, **done.model_dump())], raise_one=True
        )

    def complete_many(
        self, worker: WorkerRef, batch: list[BatchedCompletion], *, raise_one: bool = False
    ) -> list[Outcome]:
        """Several jobs' ends in one transaction: each job locked and checked against its
        lease; a refused one (lease lost: exactly one result is kept) does not stop the
        others. `raise_one`: raise the first refusal."""
        prepared = self._prepare(worker, batch)
        op = self._complete_op(worker, batch, prepared, raise_one)
        try:
            outcomes = self._completed(self._write(op, "a completion batch", rerun=True))
        except Refusal as exc:
            if raise_one:
                self._discard_refused([Outcome(d.job_id, exc) for d in batch], prepared)
            raise
        self._discard_refused(outcomes, prepared)
        return outcomes

    async def complete_many_async(
        self, worker: WorkerRef, batch: list[BatchedCompletion]
    ) -> list[Outcome]:
        """`complete_many` from the event loop (inline outputs are written off it)."""
        prepared = await self._prepare_async(worker, batch)
        op = self._complete_op(worker, batch, prepared, False)
        outcomes = self._completed(await self._write_async(op, "a completion batch", rerun=True))
        await self.notifier.hand_over()  # results pushed before the worker's answer
        await self._discard_refused_async(outcomes, prepared)
        return outcomes

    async def complete_and_claim_async(
        self,
        worker: WorkerRef,
        batch: list[BatchedCompletion],
        max_jobs: int,
        running: list[RunningJob] | None = None,
        *,
        wait: float = 0.0,
        warm: list[str] | None = None,
    ) -> tuple[list[Outcome], ClaimResponse]:
        """Completions riding a claim (protocol 3): `complete_many`'s batch, then
        `claim_and_beat`'s claim, in one write operation (one transaction, one commit);
        the claim takes jobs only after the batch ended its jobs. Both come back only once
        committed. A deadlock (PostgreSQL) runs the whole operation again, as for a batch."""
        prepared = await self._prepare_async(worker, batch)
        done_op = self._complete_op(worker, batch, prepared, False)
        # The completions are a write: the claim takes in it without probing first (but
        # for a long-poll whose queue is known empty: then it only waits, after them).
        claim_op, gone = self._claim_op(
            worker, max_jobs, running or [], wait, warm or [], True, riding=True
        )

        def op(
            conn: Connection,
        ) -> tuple[_Done, _Claim | None]:
            done = done_op(conn)
            return done, (claim_op(conn) if claim_op is not None else None)

        both = isinstance(done_op, Rerunnable) and (
            claim_op is None or isinstance(claim_op, Rerunnable)
        )
        done, claim = await self._write_async(
            Rerunnable(op) if both else op, "a completion batch", rerun=True
        )
        outcomes = self._completed(done)
        await self.notifier.hand_over()  # results pushed before the worker's answer
        await self._discard_refused_async(outcomes, prepared)
        if claim is None:
            return outcomes, ClaimResponse(jobs=[], abort=gone)
        return outcomes, self._claimed(worker, claim, gone)

    async def _prepare_async(
        self, worker: WorkerRef, batch: list[BatchedCompletion]
    ) -> list[_Prepared]:
        """`_prepare` in the thread pool when it may write a file (an inline output over
        `db_blob_max_bytes`: written and fsync'd there); else on the event loop (a glob
        per job, and small inline outputs only decoded and hashed, at most a worker's
        JSON body of them, as an upload's first `LOOP_BYTES` are hashed on the loop)."""
        bound = self.settings.db_blob_max_bytes
        if any(_may_write_file(d, bound) for d in batch):
            return await anyio.to_thread.run_sync(self._prepare, worker, batch)
        return self._prepare(worker, batch)

    def _write(
        self, op: Callable[[Connection], T], what: str = "a write", *, rerun: bool = False
    ) -> T:
        """`writer.run(op)`, run again when PostgreSQL aborts it to break a deadlock or a
        serialisation failure (`_conflict_attempts`) if it may be: a `Rerunnable` op (rows
        only: submits, claims, heartbeats), or `rerun` (the caller's effects outside the
        database come after the op returns: cancels and the reaper lock job rows of
        pipelines and, through the stored-bytes triggers, identity rows; completions touch
        other workers' rows, reputation and credit). Same-owner submits on several
        coordinators lock the owner's row (the stored-bytes triggers) in whatever order
        their group commits hold them; a claim may update a step its own transaction just
        queued, whose foreign-key check locks the pipeline's row. Any other op runs once
        (its effects in memory, such as credit's window, must not count twice)."""
        if not (rerun or isinstance(op, Rerunnable)):
            return self.writer.run(op)
        for attempt in _conflict_attempts(what):
            with attempt:
                return self.writer.run(op)
        raise AssertionError("unreachable")  # pragma: no cover: the last attempt raises

    async def _write_async(
        self, op: Callable[[Connection], T], what: str = "a write", *, rerun: bool = False
    ) -> T:
        """`_write` from the event loop (`writer.run_async`), by the same rule."""
        if not (rerun or isinstance(op, Rerunnable)):
            return await self.writer.run_async(op)
        for attempt in _conflict_attempts(what):
            with attempt:
                return await self.writer.run_async(op)
        raise AssertionError("unreachable")  # pragma: no cover: the last attempt raises

    def _completed(self, done: _Done) -> list[Outcome]:
        outcomes, woken, quarantined, views = done
        for worker_id in quarantined:  # committed: its next claim is filtered as quarantined
            WORKER_TOKENS.forget_worker(worker_id)
        # A completion's job key goes on its owner's relay channel (see `Notifier.notify`).
        topics = owner_topics(woken)
        for o in outcomes:
            if o.refusal is None:
                self.notifier.notify(job_key(o.job_id), topic=topics.get(o.job_id))
        for key in woken:
            self.notifier.notify(key, views.get(key))  # the view: for this process's streams
        return outcomes

    def _prepare(self, worker: WorkerRef, batch: list[BatchedCompletion]) -> list[_Prepared]:
        """The file work of a batch, before its transaction: inline outputs written (and
        fsync'd) into each attempt's folder, every output's metadata read. Files of an
        attempt are kept only if its completion is (a lost lease leaves them unlisted).

        Whose inline outputs may be written: the worker must hold the job's lease and the
        job must be plain (not confidential). A lease this coordinator granted by a claim
        (`_Granted`) says so without a read; the others are read (one statement). Either
        is a hint: the transaction decides again, and files written on a grant for a
        completion it refuses are removed (`_discard_refused`). A file is written on a
        grant only if none of its name is there yet (a repeat of a completion kept
        already never replaces what it listed): else the lease is read, as without one."""
        granted = {job_id: self._granted.pop(job_id, None) for job_id in {d.job_id for d in batch}}
        inline = [
            d.job_id
            for d in batch
            if d.inline_outputs
            and d.state == JobState.succeeded.value
            and not _holds(granted.get(d.job_id), worker, d)
        ]
        known: dict[str, Locked] = {}
        if inline:  # who holds the lease (one statement; no files loaded)
            with self.read(each=True) as conn:
                known = ends.to_complete(conn, inline)
        out: list[_Prepared] = []
        for done in batch:
            dir_name = self.attempt_dir_name(done.job_id, done.lease_id)
            refusal: Refusal | None = None
            written: list[FileInfo] = []
            contents: dict[str, bytes] = {}
            hinted = False
            if done.inline_outputs and done.state == JobState.succeeded.value:
                outputs_dir = Path(dir_name)
                grant = granted.get(done.job_id)
                try:
                    if grant is not None and _holds(grant, worker, done):
                        try:
                            written, contents = self._write_inline(
                                grant.app, grant.operation, outputs_dir, done.inline_outputs, True
                            )
                            hinted = True
                        except FileExistsError:  # written before: read who holds it
                            with self.read(each=True) as conn:
                                known.update(ends.to_complete(conn, [done.job_id]))
                    job = known.get(done.job_id)
                    if (
                        not hinted
                        and job is not None
                        and not job.confidential
                        and job.lease_id == done.lease_id
                        and job.worker_id == worker.id
                    ):
                        written, contents = self._write_inline(
                            job.app, job.operation, outputs_dir, done.inline_outputs
                        )
                except Refusal as exc:
                    refusal = exc
            metas: tuple[FileInfo, ...] = ()
            if done.state == JobState.succeeded.value:
                # Inline outputs are described from memory; uploaded ones by the meta file
                # their upload wrote (an inline output replaces an upload of the same name).
                found = {i.name: i for i in written}
                for meta in _meta_files(dir_name):
                    name = meta.name.removesuffix(".meta.json")
                    if name not in found:
                        found[name] = FileInfo.model_validate_json(meta.read_text())
                metas = tuple(found[n] for n in sorted(found, key=lambda n: f"{n}.meta.json"))
            paths = tuple(Path(dir_name, i.name) for i in written if i.name not in contents)
            out.append(_Prepared(metas, refusal, paths, hinted and bool(paths), contents))
        return out

    async def _discard_refused_async(
        self, outcomes: list[Outcome], prepared: list[_Prepared]
    ) -> None:
        """`_discard_refused` off the event loop (only when there is something to remove)."""
        if any(o.refusal is not None and p.hinted for o, p in zip(outcomes, prepared, strict=True)):
            await anyio.to_thread.run_sync(self._discard_refused, outcomes, prepared)

    def _discard_refused(self, outcomes: list[Outcome], prepared: list[_Prepared]) -> None:
        """Remove the inline outputs written on a grant (`_prepare`) for completions the
        transaction refused (the lease was lost, the job cancelled or erased since the
        claim), unless the job has succeeded since: then a repeat of the same completion
        may have listed those very files. (Files written on a read stay unlisted, as
        those of an upload for a lost lease do.)"""
        refused = [
            (o.job_id, p.written)
            for o, p in zip(outcomes, prepared, strict=True)
            if o.refusal is not None and p.hinted
        ]
        if not refused:
            return
        with self.read(each=True) as conn:
            now = ends.to_complete(conn, [job_id for job_id, _ in refused])
        for job_id, paths in refused:
            job = now.get(job_id)
            if job is not None and job.state == JobState.succeeded.value:
                continue
            for path in paths:
                path.unlink(missing_ok=True)

    def _complete_op(
        self,
        worker: WorkerRef,
        batch: list[BatchedCompletion],
        prepared: list[_Prepared],
        raise_one: bool,
    ) -> Callable[[Connection], _Done]:
        models = self._model_operations(worker.app)
        contributed = contributor_of(worker) is not None
        worker_id = worker.id
        # A plain job's end is tried as one UPDATE … RETURNING (`ends.end_held_many`: one
        # for the whole batch on SQLite): the first completion of each job, from an
        # operator worker, that carries no encrypted result and whose inline outputs were
        # accepted. What that statement does not match (a job of a pipeline, confidential,
        # verified, credited, keeping models; a lease lost; a repeat) takes the locking
        # path, which decides as before.
        fast: dict[int, ends.HeldEnd] = {}
        if not contributed and models is not None:
            seen: set[str] = set()
            for i, (done, prep) in enumerate(zip(batch, prepared, strict=True)):
                if done.job_id in seen:
                    continue
                seen.add(done.job_id)
                if done.encrypted_result is None and prep.refusal is None:
                    fast[i] = ends.HeldEnd(
                        done.job_id, done.lease_id, done.state, done.result, done.error
                    )
        model_ops = sorted(models or ())
        model_ids: dict[tuple[str, str], str] = {}  # kept models' ids, the same in every run

        def op(conn: Connection) -> _Done:
            now = utcnow()
            ended: dict[int, Outcome] = {}
            woken: list[str] = []
            views: dict[str, JobRow] = {}
            rows = ends.end_held_many(conn, worker_id, list(fast.values()), now, model_ops)
            for i, held in fast.items():
                row = rows.get(held.job_id)
                if row is None:
                    continue
                if held.state == JobState.succeeded.value and prepared[i].outputs:
                    outputs = self._output_rows(held.job_id, held.lease_id, prepared[i])
                    writes.add_files(conn, row.seq, outputs)
                    # as a load lists them (no bytes: the view is kept by streams)
                    listed = [replace(f, content=None) if f.content else f for f in outputs]
                    row = replace(row, files=(*row.files, *listed))
                key = owner_change(row.owner_id, held.job_id, ending=True)
                woken.append(key)
                views[key] = row
                ended[i] = Outcome(held.job_id, None)
            wanted = list(dict.fromkeys(d.job_id for i, d in enumerate(batch) if i not in ended))
            locked = ends.lock_to_complete(conn, wanted) if wanted else {}
            outcomes: list[Outcome] = []
            # Verification: a contributed worker's record, read afresh under this
            # transaction (an operator worker's completion reads nothing more).
            standing = verified.standing(conn, worker.id) if contributed else None
            checks = Batch()
            for i, (done, prep) in enumerate(zip(batch, prepared, strict=True)):
                if i in ended:
                    outcomes.append(ended[i])
                    continue
                try:
                    # Refusals come before `_finish` changes a row: no savepoint.
                    woken += self._finish(
                        conn,
                        worker,
                        locked.get(done.job_id),
                        done,
                        prep,
                        models,
                        now,
                        verify=(contributed, standing, checks),
                        model_ids=model_ids,
                    )
                except Refusal as exc:
                    if raise_one:
                        raise
                    outcomes.append(Outcome(done.job_id, exc))
                else:
                    outcomes.append(Outcome(done.job_id, None))
                    ended_job = locked[done.job_id]  # a repeat in the batch finds it ended
                    locked[done.job_id] = replace(ended_job, state=done.state, lease_id=None)
            quarantined: list[str] = []
            if checks.deltas or checks.earnings:
                quarantined = self.verifier.close_batch(conn, checks, now)
            if checks.credited:  # credit: what accepted runs of contributed workers earn
                accepted = [
                    ledger.Accepted(e.job_seq, e.worker_id, e.contributor_id, e.wall_seconds)
                    for e in checks.credited
                ]
                cap = self.settings.job_timeout_seconds
                if any(p.balance > 0 for p in ledger.earn_runs(conn, accepted, now, cap)):
                    self.credit.touch()
            return outcomes, woken, quarantined, views

        # An operator worker's completions of an app that keeps no models write only
        # rows (a pipeline's next step too; a model it pins is linked at one path per
        # step, see `pipelines`): the writer may run them bare, and again. A
        # contributed worker's also settle verification in memory (`close_batch`). One
        # that keeps models runs with a savepoint, as before, though its links no longer
        # stand in the way of a repeat: each kept model's id is drawn once per operation
        # (`model_ids`), so a run again after one undone (a deadlock) links the same path.
        return Rerunnable(op) if not contributed and models == set() else op

    def _output_rows(self, job_id: str, lease_id: str, prep: _Prepared) -> list[FileRow]:
        """The output rows of a succeeded completion (its files are in its attempt's folder,
        or, for small inline outputs, their bytes in the rows: `_Prepared.contents`)."""
        outputs_dir = self.attempt_dir(job_id, lease_id)
        rows: list[FileRow] = []
        for info in prep.outputs:
            content = prep.contents.get(info.name)
            path = outputs_dir / info.name
            blob = self.blobs.relative(path) if content is None else self.blobs.in_db_name(path)
            rows.append(
                FileRow(
                    "output",
                    info.name,
                    info.size,
                    info.sha256,
                    info.media_type,
                    blob,
                    None,
                    content,
                )
            )
        return rows

    def _model_operations(self, app: str) -> set[str] | None:
        """Operations of `app` whose outputs become models (None: the app is unknown)."""
        try:
            entry = self.catalog.get(app)
        except Exception:  # an app no longer catalogued: decided per job, in the ORM path
            return None
        return {
            name
            for name, op in entry.operations.items()
            if any(f.model is not None for f in op.outputs)
        }

    def _finish(
        self,
        conn: Connection,
        worker: WorkerRef,
        job: Locked | None,
        done: BatchedCompletion,
        prep: _Prepared,
        models: set[str] | None,
        now: datetime,
        verify: tuple[bool, Standing | None, Batch] | None = None,
        model_ids: dict[tuple[str, str], str] | None = None,
    ) -> list[str]:
        """End one job. Every refusal is raised before a row changes. `verify`: (whether
        the worker is contributed, its record, the batch's verification bookkeeping);
        `model_ids`: the ids of the models it keeps, by (job, output), kept across runs
        of the operation (`artifacts.keep_outputs`)."""
        job_id = done.job_id
        if job is None:
            raise NotFound.of("job", job_id)
        if job.state != RUNNING or job.worker_id != worker.id or job.lease_id != done.lease_id:
            raise _lease_lost(job_id, job.state)
        if job.confidential:
            if done.result is not None or done.inline_outputs:
                raise Invalid(
                    "plaintext_result",
                    f"job {ids.short(job_id)} is confidential: its result travels only "
                    "encrypted (encrypted_result, outputs uploaded encrypted)",
                )
        elif done.encrypted_result is not None:
            raise Invalid(
                "not_confidential",
                f"job {ids.short(job_id)} is not confidential: send its result in the clear",
            )
        if prep.refusal is not None:
            raise prep.refusal
        self._spend_credit(conn, worker, job, done, now)
        if verify is not None and not job.confidential:
            held = self._verify(conn, worker, job, done, prep, now, *verify)
            if held is not None:
                return held  # not accepted (yet): no result is written on the job
        if job.confidential:
            ends.set_encrypted_result(
                conn,
                job.seq,
                done.encrypted_result.model_dump(mode="json")
                if done.encrypted_result is not None
                else None,
            )
        succeeded = done.state == JobState.succeeded.value
        ends.end(
            conn,
            job.seq,
            state=done.state,
            now=now,
            error=done.error,
            result=done.result,
            fraction=1.0 if succeeded else None,
        )
        if succeeded:
            writes.add_files(conn, job.seq, self._output_rows(job_id, done.lease_id, prep))
        woken = [owner_change(job.owner_id, job_id, ending=True)]
        keeps_models = succeeded and (models is None or job.operation in models)
        if keeps_models or job.parent_seq is not None:
            with orm_session(conn) as session:  # model artifacts, pipelines: ORM rows
                row = orm_job(session, job.seq)
                if keeps_models:
                    artifacts.keep_outputs(session, self, self.blobs, self.catalog, row, model_ids)
                pipelines.lock_parent(session, row)  # held already (PostgreSQL) or the db
                woken += pipelines.step_finished(self, session, row)
        return woken

    def _spend_credit(
        self,
        conn: Connection,
        worker: WorkerRef,
        job: Locked,
        done: BatchedCompletion,
        now: datetime,
    ) -> None:
        """Its owner pays for a run taken by credit priority (under this lease) when its
        worker reports it, succeeded or failed, accepted or held for verification
        (`csml.store.credit`'s rule). Earnings are written where runs are accepted (the
        batch's end: `_complete_op`)."""
        if job.credit_lease is None or job.credit_lease != done.lease_id:
            return
        wall = ledger.wall_seconds(job.started_at, now)
        ledger.spend(
            conn,
            ledger.Run(job.id, job.app, worker.id, wall),
            owner_id=job.owner_id,
            now=now,
            max_seconds=self.settings.job_timeout_seconds,
        )

    def _verify(
        self,
        conn: Connection,
        worker: WorkerRef,
        job: Locked,
        done: BatchedCompletion,
        prep: _Prepared,
        now: datetime,
        contributed: bool,
        standing: Standing | None,
        checks: Batch,
    ) -> list[str] | None:
        """The verification step of a completion (`csml.coordinator.verification`): None
        when the run is accepted (the caller then ends the job with it, as for any job),
        else the wake-up keys of a job held for another run (nothing of the run's result
        is written on the job). An operator worker's run of a job nobody else ran costs
        nothing here."""
        if not contributed and job.verify_runs == 0:
            return None
        if contributed and (standing is None or standing.contributor_id is None):
            raise _lease_lost(job.id, "its worker is gone")  # before any row changes
        succeeded = done.state == JobState.succeeded.value
        wall = (now - job.started_at).total_seconds() if job.started_at is not None else 0.0
        digest = run_digest(
            done.state, done.result, done.error, [(o.name, o.sha256) for o in prep.outputs]
        )
        if standing is None:  # an operator run decides: trusted
            mine = Run(0, worker.id, None, digest, True, wall)
            pending = verified.pending_runs(conn, job.seq)
            self.verifier.accept(
                conn,
                job.seq,
                pending,
                mine,
                succeeded=succeeded,
                standing=None,
                now=now,
                batch=checks,
            )
            return None
        deterministic = job.operation in self._deterministic(job.app)
        decision, runs = self.verifier.judge(
            conn, job.seq, standing, digest, wall, deterministic=deterministic, now=now
        )
        if decision is Decision.ACCEPT:
            mine = (
                runs[-1] if runs else Run(0, worker.id, standing.contributor_id, digest, True, wall)
            )
            self.verifier.accept(
                conn,
                job.seq,
                runs,
                mine,
                succeeded=succeeded,
                standing=standing,
                now=now,
                batch=checks,
            )
            return None
        if decision is Decision.TRUSTED:
            message = "verifying: waiting for a run on one of the operator's workers"
        else:
            message = "verifying: waiting for a run on another party's worker to compare"
        verified.hold(conn, job.seq, message, trusted_only=decision is Decision.TRUSTED)
        return [owner_change(job.owner_id, job.id), app_key(job.app)]

    def _write_inline(
        self,
        app: str,
        operation: str,
        outputs_dir: Path,
        outputs: list[InlineOutput],
        exclusive: bool = False,
    ) -> tuple[list[FileInfo], dict[str, bytes]]:
        """Write a completion's inline outputs (declared names only, each at most
        `inline_output_bytes`), on disk (fsync'd with their folder) before the transaction
        commits, as an upload's; their descriptions, and the bytes of those of at most
        `db_blob_max_bytes`, which are not written here but kept in the database by the
        completion's rows (no file, no folder).

        Unlike an upload, no meta file is written: the description goes from here to the
        completion's rows in memory (an upload's meta file is only that hand-off between
        its request and the completion's). `exclusive`: FileExistsError rather than
        replace a file of the same name."""
        _, op = self.catalog.operation(app, operation)
        declared = {o.name: o.media_type for o in op.outputs}
        bound = self.settings.db_blob_max_bytes
        most = self.inline_output_bytes
        written: list[Path] = []
        infos: list[FileInfo] = []
        contents: dict[str, bytes] = {}
        for out in outputs:
            if out.name not in declared:
                raise Invalid("unknown_output", f"{op.name!r} declares no output {out.name!r}")
            try:  # strict: canonical standard base64 only (`csml.schemas.base64_text`)
                data = base64_text.decode(out.content)
            except ValueError:
                raise Invalid(
                    "invalid_output", f"inline_outputs: {out.name!r} is not valid base64"
                ) from None
            if len(data) > most:
                raise TooLarge("file_too_large", f"inline output {out.name!r} is over {most}")
            if len(data) <= bound:
                contents[out.name] = data
            else:
                if not written:
                    outputs_dir.mkdir(parents=True, exist_ok=True)
                path = outputs_dir / out.name
                with open(path, "xb" if exclusive else "wb") as f:  # x: FileExistsError
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())  # through this descriptor: no second open
                written.append(path)
            info = FileInfo(
                name=out.name,
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                media_type=declared[out.name],
            )
            if info.size <= INLINE_MAX_BYTES:  # for the event (`inline_outputs`: no larger)
                self.blobs.base64.put(info.sha256, info.size, out.content)
            infos.append(info)
        if written:
            fsync_folders_of(written)  # each file was flushed as it was written
        return infos, contents

    @property
    def inline_output_bytes(self) -> int:
        """The largest output a completion may carry inline here (said to workers at
        registration, `WorkerRegistered.inline_output_bytes`): `INLINE_OUTPUT_MAX_BYTES`,
        but no more than an upload may bring (`max_output_bytes`), nor than lets a
        completion's base64 fill more than half a worker's JSON body."""
        return min(
            INLINE_OUTPUT_MAX_BYTES,
            self.settings.max_output_bytes,
            self.settings.max_worker_json_bytes * 3 // 8,
        )

    def output_meta_path(self, job_id: str, lease_id: str, name: str) -> Path:
        return self.attempt_dir(job_id, lease_id) / f"{name}.meta.json"

    @staticmethod
    def write_meta(path: Path, info: FileInfo) -> None:
        path.write_text(json.dumps(info.model_dump()))

    # -- the reaper ---------------------------------------------------------

    def _fail_step_aware(
        self, conn: Connection, job: Locked, now: datetime, why: str, *, unclaimed: bool
    ) -> list[str] | None:
        """Fail `job`; for a pipeline step, also move its pipeline on. None (nothing done)
        when the step's pipeline is busy (being cancelled): the next round takes it."""
        if job.parent_seq is None:
            ends.fail(conn, job.seq, now, why, unclaimed=unclaimed)
            return []
        with orm_session(conn) as session:
            if not pipelines.try_lock_parent(session, orm_job(session, job.seq)):
                return None
            ends.fail(conn, job.seq, now, why, unclaimed=unclaimed)
            return pipelines.step_finished(self, session, orm_job(session, job.seq))

    def reap(self) -> int:
        """Requeue (or fail, past max attempts) running jobs whose lease expired."""

        def op(conn: Connection) -> tuple[list[tuple[str, str]], list[str]]:
            now = utcnow()
            changed: list[tuple[str, str]] = []
            woken: list[str] = []
            requeued: list[int] = []
            for job in ends.expired_leases(conn, now):
                if job.attempts >= job.max_attempts:
                    why = (
                        f"the worker running it was lost {job.attempts} times "
                        "(its lease expired); giving up"
                    )
                    keys = self._fail_step_aware(conn, job, now, why, unclaimed=False)
                    if keys is None:
                        continue
                    woken += keys
                else:
                    requeued.append(job.seq)
                changed.append((job.id, job.app))
                woken.append(owner_change(job.owner_id, job.id, ending=True))
            ends.requeue(conn, requeued, "requeued: the worker running it was lost")
            return changed, woken

        changed, woken = self._write(op, rerun=True)
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

        def op(conn: Connection) -> tuple[list[tuple[str, str]], list[str]]:
            now = utcnow()
            cutoff = now - timedelta(seconds=s.queue_timeout_seconds)
            live = ends.worker_live(now - timedelta(seconds=s.worker_live_seconds))
            failed: list[tuple[Locked, str]] = []
            orphans = ends.orphaned(conn, live)
            for job in orphans:
                failed.append(
                    (
                        job,
                        "every worker this confidential job was sealed to has left (a worker "
                        "that comes back has a new key and cannot open it); resubmit it to "
                        f"running {job.app} workers",
                    )
                )
            seen = {j.seq for j in orphans}
            for app in ends.apps_waiting_since(conn, cutoff):
                last_seen = ends.last_worker_seen(conn, app)
                if last_seen is not None and last_seen >= cutoff:
                    continue  # a worker of the app was live in the last timeout
                for job in ends.queued_before(conn, app, cutoff):
                    if job.seq not in seen:
                        failed.append(
                            (
                                job,
                                f"no {app} worker was live to run it for "
                                f"{s.queue_timeout_seconds:g} s (the queue timeout); resubmit "
                                f"it when {app} workers are running",
                            )
                        )
            waiting: list[str] = []
            failed += self._unmet(conn, now, cutoff, {j.seq for j, _ in failed}, waiting)
            ended: list[tuple[str, str]] = []
            woken: list[str] = waiting
            for job, why in failed:
                keys = self._fail_step_aware(conn, job, now, why, unclaimed=True)
                if keys is None:
                    continue  # its pipeline is busy (being cancelled): next round
                woken += keys
                ended.append((job.id, why))
                woken.append(owner_change(job.owner_id, job.id, ending=True))
            return ended, woken

        ended, woken = self.writer.run(op)
        for job_id, why in ended:
            log.info("job %s failed unclaimed: %s", ids.short(job_id), why)
            self.notifier.notify(job_key(job_id))
        for key in woken:
            self.notifier.notify(key)
        return len(ended)

    def _unmet(
        self,
        conn: Connection,
        now: datetime,
        cutoff: datetime,
        seen: set[int],
        woken: list[str],
    ) -> list[tuple[Locked, str]]:
        """Placement: on queued jobs whose requirement no live worker meets, a message
        naming what none has (cleared once one does; their owners' feeds are added to
        `woken`); those of them queued before `cutoff` whose requirement no worker
        heard from since `cutoff` met: to fail."""
        s = self.settings
        live_since = now - timedelta(seconds=s.worker_live_seconds)
        failed: list[tuple[Locked, str]] = []
        live: dict[str, list[dict[str, Any]]] = {}
        for app, key in ends.waiting_requirements(conn):
            requires = store.requirement_of(conn, app, key)
            if requires is None:
                continue
            if app not in live:
                live[app] = store.labels_since(conn, app, live_since)
            why = placement.unmet(requires, live[app])
            message = f"{WAITING}{why} ({placement.describe(requires)})" if why else ""
            for job_id, owner_id in ends.set_waiting(conn, app, key, message[:500], WAITING):
                woken += [job_key(job_id), owner_change(owner_id, job_id)]
            if not why:
                continue
            heard = store.labels_since(conn, app, cutoff, stopped=True)
            if not heard or placement.unmet(requires, heard) == "":
                continue  # no worker at all: the app's own timeout says so; or one met it
            for job in ends.queued_requiring_before(conn, app, key, cutoff):
                if job.seq not in seen:
                    failed.append(
                        (
                            job,
                            f"no {app} worker that meets its requirement "
                            f"({placement.describe(requires)}) was live to run it for "
                            f"{s.queue_timeout_seconds:g} s (the queue timeout): {why}",
                        )
                    )
        return failed

    def leave(self, worker: WorkerRef) -> None:
        """The worker left: it is stopped now (its running jobs come back when their lease
        ends); queued jobs sealed only to workers that are gone fail at once."""
        worker_id = worker.id
        self.writer.run(lambda conn: writes.stop_worker(conn, worker_id, utcnow()))
        self.fail_unclaimable()

    def live_workers(self) -> dict[str, store.LiveWorkers]:
        """Per app, its live workers (count, slots, sandboxes)."""
        cutoff = utcnow() - timedelta(seconds=self.settings.worker_live_seconds)
        with self.read() as conn:
            return store.live_workers(conn, cutoff)

    def queue_stats(self) -> dict[str, dict[str, int]]:
        """Jobs per app and state (queued and running only)."""
        with self.read() as conn:
            return store.queue_stats(conn)


def file_info(f: FileRow) -> FileInfo:
    return FileInfo(name=f.name, size=f.size, sha256=f.sha256, media_type=f.media_type)


def _may_write_file(done: BatchedCompletion, bound: int) -> bool:
    """Whether preparing `done` may write a file: it succeeded with an inline output whose
    base64 decodes to more than `bound` bytes (kept in the database up to it). The size
    is the text's (canonical base64 only: `csml.schemas.base64_text`; a text that is not
    fails to decode before anything is written)."""
    return done.state == JobState.succeeded.value and any(
        _decoded_size(out.content) > bound for out in done.inline_outputs
    )


def _decoded_size(text: str) -> int:
    """The bytes canonical base64 `text` decodes to (its length less its padding)."""
    return len(text) // 4 * 3 - (2 if text.endswith("==") else 1 if text.endswith("=") else 0)


def _holds(grant: _Granted | None, worker: WorkerRef, done: BatchedCompletion) -> bool:
    """Whether this coordinator granted `done`'s lease to `worker` (a hint, see `_Granted`)."""
    return grant is not None and grant.lease_id == done.lease_id and grant.worker_id == worker.id


@functools.lru_cache(maxsize=4096)  # per claimed job; owners repeat
def owner_key(owner_id: str) -> str:
    """What a worker learns of a job's owner: enough to keep one sandboxed process per
    owner (see `ClaimedJob.owner_key`), not the identity id itself."""
    return hashlib.sha256(b"csml owner key\0" + owner_id.encode()).hexdigest()[:32]


def _meta_files(outputs_dir: str | Path) -> list[Path]:
    """The `*.meta.json` files an attempt's uploads wrote (what `glob` finds there), from
    one `listdir`; none when the folder does not exist (no upload, no inline output: a
    no-op job's completion costs no walk of pathlib's glob machinery, and no `Path`)."""
    try:
        names = os.listdir(outputs_dir)
    except (FileNotFoundError, NotADirectoryError, PermissionError):  # as glob: none
        return []
    return [Path(outputs_dir, name) for name in names if name.endswith(".meta.json")]
