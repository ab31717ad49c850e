"""Routes for workers: join, claim jobs under a lease, heartbeat, move files, complete.

Workers reach the store only through these routes, so they can run anywhere
that reaches the coordinator over HTTP. A worker serves one app, which its join
token must allow (403 otherwise); it claims only jobs of that app. What it may
change in the catalog is decided by `csml.coordinator.catalog` (pinned versions).

Protocol 2 (batched, see `csml.schemas.workers`): a claim carries the heartbeats of
the worker's running jobs and small inputs inline; `POST …/complete` ends several
jobs in one transaction with small outputs inline. The single-job heartbeat, file and
complete routes stay for older workers. A claim that finds nothing writes nothing
(the worker's liveness is written at most once per heartbeat interval).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from csml import ids
from csml.coordinator import claim_answers
from csml.coordinator.api_attestation import add_worker_key
from csml.coordinator.auth import (
    AuthFirstRoute,
    bearer,
    current_join_token,
    current_worker,
    from_headers,
    lean,
)
from csml.coordinator.errors import ApiError, not_found, status_of
from csml.coordinator.file_responses import BlobResponse, WholeFile
from csml.coordinator.notify import app_key, watch_hang_up
from csml.coordinator.pipelines import PIPELINE_APP
from csml.coordinator.queue import Outcome
from csml.coordinator.state import core
from csml.coordinator.uploads import safe_media_type
from csml.coordinator.worker_tokens import CACHE as WORKER_TOKENS
from csml.schemas import (
    ClaimResponse,
    FileInfo,
    Heartbeat,
    HeartbeatResponse,
    JobCompletion,
    WorkerRegistered,
    WorkerRegistration,
)
from csml.schemas.workers import (
    PROTOCOL,
    ClaimRequest,
    CompletionBatch,
    CompletionOutcome,
    CompletionResults,
)
from csml.store import workers
from csml.store.blobs import HashingWriter, TooLarge, check_name, fsync_paths, in_db
from csml.store.db import transaction
from csml.store.tables import JoinToken, utcnow
from csml.store.workers import WorkerRow

router = APIRouter(route_class=AuthFirstRoute, prefix="/v1/workers", tags=["workers"])
Joiner = Annotated[JoinToken, Depends(current_join_token)]


@from_headers
async def calling_worker(request: Request) -> WorkerRow:
    """The calling worker: on the event loop when remembered (`WORKER_TOKENS`), else
    looked up (`auth.current_worker`) off it."""
    cached = WORKER_TOKENS.get(ids.hash_secret(bearer(request)))
    if cached is not None:
        return cached
    return await run_in_threadpool(current_worker, request)


Me = Annotated[WorkerRow, Depends(calling_worker)]


def _outcomes(outcomes: list[Outcome]) -> list[CompletionOutcome]:
    """Each completion as the single-job route would have answered it."""
    return [
        CompletionOutcome(job_id=o.job_id, status=204)
        if o.refusal is None
        else CompletionOutcome(
            job_id=o.job_id, status=status_of(o.refusal), error=o.refusal.message
        )
        for o in outcomes
    ]


def _answer(answer: ClaimResponse) -> Response:
    """A claim's answer as the lean handler would send it, its inline inputs spliced in
    (`claim_answers`: the same bytes, without re-encoding ~210 KB of base64 a photo)."""
    return Response(claim_answers.encoded(answer), media_type="application/json")


def _same(worker: WorkerRow, worker_id: str) -> None:
    if worker.id != worker_id:
        raise not_found("worker", worker_id)


@router.post("", status_code=201, response_model=WorkerRegistered)
def register(body: WorkerRegistration, request: Request, join: Joiner) -> WorkerRegistered:
    """Join the cluster with a join token; announces the app this worker serves (one the
    token allows: 403 otherwise) and its manifest (pinned per version: 409 if it differs)."""
    c = core(request)
    if not join.allows(body.app.name):
        allowed = ", ".join(join.apps or []) or "none"
        raise ApiError(
            403,
            "app_not_allowed",
            f"app.name: this join token may serve only {allowed}, not {body.app.name!r}; "
            f"ask the operator for one made with --app {body.app.name}",
            field="app.name",
        )
    if body.app.name == PIPELINE_APP:
        raise ApiError(
            422,
            "reserved_app_name",
            f"app.name: {PIPELINE_APP!r} is reserved for pipeline jobs; rename the app",
            field="app.name",
        )
    token = ids.new_secret("csmlw")
    with transaction(c.sessions) as session:
        c.catalog.register(session, body.app, join)
        now = utcnow()
        # Verification: a contributed token whose worker was quarantined joins quarantined.
        caught = join.contributor_id is not None and workers.quarantined_under(session, join.id)
        worker_id = workers.add_worker(
            session,
            token_hash=ids.hash_secret(token),
            join_token_id=join.id,
            app=body.app.name,
            app_version=body.app.version,
            slots=body.slots,
            sandbox=body.sandbox,
            now=now,
            labels=body.labels,
            quarantined_at=now if caught else None,
        )
        if body.attestation is not None:
            add_worker_key(session, worker_id, body.attestation)
    return WorkerRegistered(
        worker_id=worker_id,
        worker_token=token,
        lease_seconds=c.settings.lease_seconds,
        heartbeat_seconds=c.settings.heartbeat_seconds,
        protocol=PROTOCOL,
        inline_output_bytes=c.queue.inline_output_bytes,
    )


@router.delete("/{worker_id}", status_code=204)
def leave(worker_id: str, request: Request, me: Me) -> Response:
    """Leave the cluster (graceful shutdown); running jobs come back when their lease ends.
    Queued confidential jobs sealed only to workers that are gone fail now ("resubmit")."""
    _same(me, worker_id)
    c = core(request)
    c.queue.leave(me)
    WORKER_TOKENS.forget_worker(me.id)
    return Response(status_code=204)


@router.post("/{worker_id}/claim", response_model=ClaimResponse)
@lean
async def claim(worker_id: str, body: ClaimRequest, request: Request, me: Me) -> Response:
    """Take up to `max_jobs` queued jobs of this worker's app, each under a lease; with
    `running`, also a heartbeat of those jobs (the answer's `abort` says which to stop);
    with `completions` (protocol 3), first end those jobs, in the claim's transaction
    (the answer's `results` say what `POST …/complete` would have answered)."""
    _same(me, worker_id)
    c = core(request)
    deadline = time.monotonic() + body.wait
    running = body.running
    results: list[CompletionOutcome] = []
    key = app_key(me.app)
    with c.notifier.subscribe(key) as event:
        if body.completions:  # committed before any wait: a long-poll holds only the answer
            outcomes, answer = await c.queue.complete_and_claim_async(
                me,
                body.completions,
                body.max_jobs,
                running,
                wait=body.wait,
                warm=body.warm_models,
            )
            results = _outcomes(outcomes)
            running = None
        else:
            answer = None
        woken = False  # by a job queued meanwhile (then the claim takes without a probe)
        waited = False  # a wait ended (a re-check probes, whatever the claim knew)
        gone: asyncio.Task[None] | None = None  # ends when the worker hangs up
        try:
            while True:
                if answer is None:
                    answer = await c.queue.claim_and_beat_async(
                        me,
                        body.max_jobs,
                        running,
                        wait=max(0.0, deadline - time.monotonic()),
                        warm=body.warm_models,
                        woken=woken,
                        recheck=waited,
                    )
                    running = None  # the heartbeat is done; re-checks only claim
                if woken and not answer.jobs:
                    c.notifier.pass_on(key, event)  # nothing for it: the next idle claimer's turn
                remaining = deadline - time.monotonic()
                if answer.jobs or answer.abort or remaining <= 0:
                    answer.results = results
                    return _answer(answer)
                if gone is None:
                    gone = watch_hang_up(request.receive, event)
                if gone.done():  # the worker went away: wait no more, take nothing for it
                    answer.results = results
                    return _answer(answer)
                answer = None
                woken = await c.notifier.wait(event, min(remaining, c.notifier.recheck_seconds))
                waited = True
                if gone.done():
                    if woken:
                        c.notifier.pass_on(key, event)
                    return _answer(ClaimResponse(jobs=[], abort=[], results=results))
        finally:
            if gone is not None:
                gone.cancel()


@router.post("/{worker_id}/heartbeat", response_model=HeartbeatResponse)
@lean
async def heartbeat(worker_id: str, body: Heartbeat, request: Request, me: Me) -> HeartbeatResponse:
    """Extend the leases of running jobs, report their progress, learn which to abort."""
    _same(me, worker_id)
    return await core(request).queue.heartbeat_async(me, body)


@router.get("/{worker_id}/jobs/{job_id}/inputs/{name}", response_class=FileResponse)
@lean
async def download_input(
    worker_id: str, job_id: str, name: str, request: Request, me: Me, lease_id: str = Query()
) -> FileResponse:
    """One input file of a job this worker runs. The job is read on the event loop (one
    short indexed read, as `GET /v1/jobs/{id}/outputs/{name}`), and the file's stat too,
    so an input of at most `WHOLE_FILE_BYTES` costs no thread-pool hop (`WholeFile`)."""
    _same(me, worker_id)
    c = core(request)
    job = c.queue.running_job(me, job_id, lease_id)
    for f in job.files:
        if f.kind == "input" and f.name == name:
            if in_db(f.blob):  # kept in the database: served as the file would be
                content = c.queue.file_content(job.seq, f.kind, f.name)
                if content is None:  # erased since the read
                    raise not_found("input", name)
                modified = job.created_at.timestamp()
                return BlobResponse(content, f.blob, modified, media_type=f.media_type)
            path = c.blobs.path(f.blob)
            try:
                stat_result: os.stat_result | None = os.stat(path)
            except OSError:
                stat_result = None  # FileResponse says what is wrong, as before
            return WholeFile(path, media_type=f.media_type, stat_result=stat_result)
    raise not_found("input", name)


@router.put("/{worker_id}/jobs/{job_id}/outputs/{name}", status_code=204)
@lean
async def upload_output(
    worker_id: str, job_id: str, name: str, request: Request, me: Me, lease_id: str = Query()
) -> Response:
    """Stream one output file of a running job; kept only if the job then succeeds.

    On the event loop: the job's check (one short indexed read, as `download_input`),
    the attempt folder's creation and the body's page-cache writes; the meta file and
    the fsyncs go to the thread pool in one hop, before the 204."""
    _same(me, worker_id)
    c = core(request)
    job = c.queue.running_job(me, job_id, lease_id)
    _, op = c.catalog.operation(job.app, job.operation)
    if name not in {o.name for o in op.outputs}:
        raise ApiError(422, "unknown_output", f"{op.name!r} declares no output {name!r}")
    check_name(name)
    c.queue.attempt_dir(job_id, lease_id).mkdir(parents=True, exist_ok=True)
    path = c.queue.attempt_dir(job_id, lease_id) / name
    writer = HashingWriter(path, c.settings.max_output_bytes)
    try:
        async for chunk in request.stream():
            writer.write(chunk)
    except TooLarge as exc:
        writer.abort()
        raise ApiError(
            413, "file_too_large", f"output {name!r} is over {exc.limit} bytes"
        ) from None
    except BaseException:
        writer.abort()
        raise
    digest = writer.finish(sync=False)
    info = FileInfo(
        name=name,
        size=writer.size,
        sha256=digest,
        media_type=safe_media_type(request.headers.get("content-type", "")),
    )
    meta = c.queue.output_meta_path(job_id, lease_id, name)

    def keep() -> None:
        c.queue.write_meta(meta, info)
        fsync_paths([path, meta])

    await run_in_threadpool(keep)
    return Response(status_code=204)


@router.post("/{worker_id}/complete", response_model=CompletionResults)
@lean
async def complete_batch(
    worker_id: str, body: CompletionBatch, request: Request, me: Me
) -> CompletionResults:
    """Report several jobs' ends at once; each result says what the single-job route would
    have answered (204, or 409 when its lease was lost: exactly one result is kept)."""
    _same(me, worker_id)
    outcomes = await core(request).queue.complete_many_async(me, body.completions)
    return CompletionResults(results=_outcomes(outcomes))


@router.post("/{worker_id}/jobs/{job_id}/complete", status_code=204)
def complete(
    worker_id: str, job_id: str, body: JobCompletion, request: Request, me: Me
) -> Response:
    """Report a job's end. Refused (409) if the lease was lost: exactly one result is kept."""
    _same(me, worker_id)
    core(request).queue.complete(me, job_id, body)
    return Response(status_code=204)
