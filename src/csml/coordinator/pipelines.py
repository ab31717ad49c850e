"""Pipelines: one job that runs a short chain of steps across applications.

The parent row (app `pipeline`) is what its owner sees and lists; it is never
claimed (its stored state is `running` until it ends, and it holds no lease).
Each step is an ordinary job of its own app, linked by `parent_seq` and
`step_index`, created when it becomes ready (the first at submission), so
workers claim it like any other. A step's inputs are rows pointing at the blobs
of the parent's uploads or of earlier steps' outputs (no copy); each step's
outputs are mirrored on the parent as `<step>.<output>`, which is also how
later steps name them. A model a step names by id (`params.model`) is pinned on
the parent at submission (`artifacts.pin`; a pipeline submitted before that, when
the step starts), and the step reads that link, so the step runs even if the model
is deleted meanwhile. Starting a step writes rows only (its files are the parent's),
and a pin's link has one path per (pipeline, step): a completion that starts a step
may run again after its run was undone (see `csml.store.writer`) and leaves nothing
behind on disk that has no row.

Quotas: a pipeline counts once against the owner's queued + running jobs, and
all the models its steps would keep are counted at submission, in the
transaction that creates it (`csml.coordinator.quotas`).

Lock order: the parent row, then its step rows (cancel, complete); the reaper,
which holds a step's lock first, only tries the parent's (SKIP LOCKED) and
leaves the step for its next round when it is busy.

The queries are the store's (`csml.store.pipelines`); this module decides. Refusals
are `csml.refusals` kinds (`Invalid` for a first step that cannot start, `Conflict`
for cancelling a step).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from csml import ids
from csml.apps.base import MODEL_PARAM
from csml.coordinator import artifacts, pipeline_spec, quotas
from csml.coordinator.notify import app_key, job_key
from csml.coordinator.staged_inputs import StagedFile, adopt_inputs
from csml.refusals import Conflict, Invalid, Refusal
from csml.schemas import JobSpec, JobState, PipelineSpec, StepSpec
from csml.schemas.pipelines import UPLOAD_PREFIX
from csml.store import pipelines as store
from csml.store.blobs import in_db
from csml.store.db import transaction
from csml.store.jobs import QUEUED, RUNNING, TERMINAL
from csml.store.tables import Job, JobFile, utcnow
from csml.store.tables_confidential import mark_not_confidential

if TYPE_CHECKING:
    from csml.coordinator.queue import JobQueue
    from csml.coordinator.state import Core

PIPELINE_APP = "pipeline"
PIPELINE_OPERATION = "run"
PENDING = "pending"


def is_parent(job: Job) -> bool:
    return job.parent_seq is None and job.step_index is not None


def step_specs(parent: Job) -> list[StepSpec]:
    return [StepSpec.model_validate(s) for s in parent.params.get("steps", [])]


def _label(index: int, step: StepSpec) -> str:
    return f"step {index + 1} {step.name!r} ({step.app}.{step.operation})"


# -- running ------------------------------------------------------------------------


def submit(
    core: Core,
    owner_id: str,
    spec: PipelineSpec,
    staging: Path | None,
    files: dict[str, StagedFile],
) -> Job:
    """Create the parent job and its first step, in one transaction."""
    ops = pipeline_spec.validate(core.catalog, spec)
    pipeline_spec.check_files(spec, set(files))
    limits = core.queue.limits_for(pipeline_spec.first_spec(spec))
    steps = [
        s.model_copy(update={"operation": op.name}).model_dump(mode="json")
        for s, op in zip(spec.steps, ops, strict=True)
    ]
    parent_id = ids.new_id()
    first = spec.steps[0]
    try:
        with transaction(core.sessions) as session:
            # Lock order: the owner's identity row, then the apps' rows (as JobQueue.submit).
            quotas.check_new_job(
                core,
                session,
                core.catalog,
                owner_id,
                upload_bytes=sum(f.size for f in files.values())
                + sum(quotas.params_bytes(s.params) for s in spec.steps),
                adding_models=sum(quotas.models_made(op) for op in ops),
            )
            pipeline_spec.check_models(session, core, owner_id, spec)
            parent = Job(
                id=parent_id,
                owner_id=owner_id,
                app=PIPELINE_APP,
                operation=PIPELINE_OPERATION,
                params={"steps": steps},
                limits=limits.model_dump(),
                state=RUNNING,
                fair_rank=0,
                created_at=utcnow(),
                attempts=0,
                max_attempts=core.settings.max_attempts,
                progress_fraction=0.0,
                progress_message=f"step 1/{len(steps)} {first.name}: queued",
                step_index=0,
                files=[],
            )
            parent.files.extend(adopt_inputs(core.blobs, staging, parent_id, files))
            for step in spec.steps:  # its own copy of each model named by id
                ref = step.params.get(MODEL_PARAM)
                if isinstance(ref, str):
                    artifacts.pin(session, core.blobs, owner_id, ref, parent, step.name)
            mark_not_confidential(parent)
            store.add(session, parent, flush=True)
            store.lock_app(session, first.app)  # as JobQueue.submit
            core.queue._check_capacity(session, first.app)
            made = create_step(core.queue, session, parent, 0)
            if isinstance(made, str):
                raise Invalid("invalid_spec", made, field="spec.steps.0")
    except BaseException:
        core.blobs.remove_job(parent_id)  # its uploads and pins (a step has no folder)
        raise
    core.notifier.notify(app_key(first.app))
    return parent


def create_step(queue: JobQueue, session: Session, parent: Job, index: int) -> Job | str:
    """Queue step `index` of `parent`; a string says why it cannot run."""
    step = step_specs(parent)[index]
    label = _label(index, step)
    try:
        _, op = queue.catalog.operation(step.app, step.operation, session)
    except Refusal as exc:
        return f"{label} cannot start: {exc.message}"
    served_rank = store.lock_app(session, step.app)
    if served_rank is None:
        return f"{label} cannot start: no application {step.app!r}"
    required = {f.name for f in op.inputs if f.required}
    job_id = ids.new_id()
    inputs: list[JobFile] = []
    for name, source in step.inputs.items():
        key = source[len(UPLOAD_PREFIX) :] if source.startswith(UPLOAD_PREFIX) else source
        kind = "input" if source.startswith(UPLOAD_PREFIX) else "output"
        found = next((f for f in parent.files if f.kind == kind and f.name == key), None)
        if found is None:
            if name in required:
                return (
                    f"{label} cannot start: its input {name!r} was to come from {source}, "
                    "which was not written"
                )
            continue
        inputs.append(
            JobFile(
                kind="input",
                name=name,
                size=found.size,
                sha256=found.sha256,
                media_type=found.media_type,
                blob=found.blob,
                model_id=found.model_id,
                content=found.content if in_db(found.blob) else None,  # the row holds the bytes
            )
        )
    owner_rank = store.owner_queued_rank(session, parent.owner_id, step.app, QUEUED)
    job = Job(
        id=job_id,
        owner_id=parent.owner_id,
        app=step.app,
        operation=op.name,
        params=dict(step.params),
        limits=dict(parent.limits),
        state=QUEUED,
        fair_rank=max(owner_rank, served_rank) + 1,
        created_at=utcnow(),
        attempts=0,
        max_attempts=parent.max_attempts,
        progress_fraction=0.0,
        progress_message="",
        files=inputs,
        parent_seq=parent.seq,
        step_index=index,
    )
    pinned = next(
        (f for f in parent.files if f.kind == artifacts.PINNED and f.name == step.name), None
    )
    want = artifacts.model_input(op)
    ref = step.params.get(MODEL_PARAM)
    if (
        pinned is None
        and want is not None
        and isinstance(ref, str)
        and want.name not in step.inputs
    ):
        # A pipeline submitted before models were pinned at submission: pinned now, on
        # the pipeline too, never in a folder of the new step. A completion starting this
        # step may run again (the writer, a deadlock): an undone run's link is found
        # again at the same path, or goes with the pipeline, where one under this run's
        # `job_id` would be left with no row.
        try:
            artifacts.check_compatible(
                artifacts.find(session, parent.owner_id, ref), want, step.app, op.name
            )
            artifacts.pin(session, queue.blobs, parent.owner_id, ref, parent, step.name)
        except Refusal as exc:
            return f"{label} cannot start: {exc.message}"
        pinned = parent.files[-1]
    if pinned is not None and want is not None and want.name not in step.inputs:
        job.params = {**job.params, MODEL_PARAM: pinned.model_id}
        job.files.append(
            JobFile(
                kind="input",
                name=want.name,
                size=pinned.size,
                sha256=pinned.sha256,
                media_type=pinned.media_type,
                blob=pinned.blob,
                model_id=pinned.model_id,
            )
        )
    else:  # no model named, or one the operation cannot take: refused before any link
        spec = JobSpec(app=step.app, operation=op.name, params=step.params)
        try:
            artifacts.attach(
                session, queue.blobs, queue.catalog, parent.owner_id, spec, job, set(step.inputs)
            )
        except Refusal as exc:
            return f"{label} cannot start: {exc.message}"
    mark_not_confidential(job)
    store.add(session, job)
    parent.step_index = index
    return job


def lock_parent(session: Session, step: Job) -> None:
    """Take the parent's row lock before the step's (the pipelines' lock order)."""
    if step.parent_seq is not None:
        store.lock_parent(session, step.parent_seq)


def try_lock_parent(session: Session, step: Job) -> bool:
    """For the reaper, which already holds the step: the parent's lock, or False if busy."""
    if step.parent_seq is None:
        return True
    return store.try_lock_parent(session, step.parent_seq)


def step_finished(queue: JobQueue, session: Session, step: Job) -> list[str]:
    """After a step ended (parent locked): start the next one or end the pipeline.

    Returns the notifier keys to wake once the transaction commits."""
    if step.parent_seq is None or step.step_index is None:
        return []
    parent = store.get(session, step.parent_seq)
    if parent is None or parent.state in TERMINAL:
        return []
    specs = step_specs(parent)
    i, n = step.step_index, len(specs)
    spec = specs[i]
    keys = [job_key(parent.id)]
    if step.state != JobState.succeeded.value:
        what = "was cancelled" if step.state == JobState.cancelled.value else "failed"
        _end(
            parent, JobState.failed, f"{_label(i, spec)} {what}: {step.error or 'no reason given'}"
        )
        parent.progress_message = f"step {i + 1}/{n} {spec.name}: {step.state}"
        return keys
    for f in step.files:
        if f.kind == "output":
            parent.files.append(
                JobFile(
                    kind="output",
                    name=f"{spec.name}.{f.name}",
                    size=f.size,
                    sha256=f.sha256,
                    media_type=f.media_type,
                    blob=f.blob,
                    model_id=f.model_id,
                    content=f.content if in_db(f.blob) else None,  # the row holds the bytes
                )
            )
    store.flush(session)
    if i + 1 == n:
        rows = store.steps_of(session, parent.seq)
        results = {specs[r.step_index].name: r.result for r in rows if r.step_index is not None}
        _end(parent, JobState.succeeded, None)
        parent.result = {"steps": {s.name: results.get(s.name) for s in specs}}
        parent.progress_fraction = 1.0
        parent.progress_message = f"done: {n} steps"
        return keys
    made = create_step(queue, session, parent, i + 1)
    if isinstance(made, str):
        _end(parent, JobState.failed, made)
        return keys
    parent.progress_fraction = (i + 1) / n
    parent.progress_message = f"step {i + 2}/{n} {specs[i + 1].name}: queued"
    return [*keys, app_key(made.app)]


def _end(parent: Job, state: JobState, error: str | None) -> None:
    parent.state = state.value
    parent.error = error
    parent.finished_at = utcnow()


def refuse_step_cancel(session: Session, job: Job) -> None:
    """A step is cancelled through its pipeline (which keeps the lock order)."""
    if job.parent_seq is None or job.step_index is None:
        return
    parent_id = store.id_of(session, job.parent_seq)
    raise Conflict(
        "pipeline_step",
        f"job {ids.short(job.id)} is step {job.step_index + 1} of pipeline "
        f"{ids.short(parent_id or '')}: cancel the pipeline instead",
    )


def cancel_steps(session: Session, parent: Job) -> list[str]:
    """The parent was just cancelled: cancel its live step (its worker stops it)."""
    if not is_parent(parent):
        return []
    live = store.lock_live_steps(session, parent.seq, [QUEUED, RUNNING])
    now = utcnow()
    for step in live:
        step.state = JobState.cancelled.value
        step.finished_at = now
        step.error = "cancelled with its pipeline"
        step.lease_id = None
        step.lease_expires_at = None
    return [job_key(s.id) for s in live]


def with_steps(session: Session, jobs: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
    """`jobs` (seq, id) plus the steps of the pipelines among them, each once."""
    out = list(dict.fromkeys(jobs))
    out.extend(store.step_keys(session, [seq for seq, _ in out]))
    return list(dict.fromkeys(out))
