"""Routes for anonymous users: identities, apps, jobs and their outputs."""

from __future__ import annotations

import functools
import mimetypes
import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from csml import ids
from csml.coordinator import (
    abuse,
    artifacts,
    contributions,
    pipeline_spec,
    pipelines,
    spec_limits,
    verification,
)
from csml.coordinator.auth import AuthFirstRoute, current_identity, lean
from csml.coordinator.errors import ApiError, from_refusal, not_found, spec_error
from csml.coordinator.file_responses import BlobResponse, WholeFile
from csml.coordinator.notify import job_key, owner_change, owner_feed
from csml.coordinator.staged_inputs import StagedFile
from csml.coordinator.state import Core, core
from csml.coordinator.uploads import (
    SMALL_SUBMISSION_BYTES,
    Accepts,
    FormLimits,
    StorageBudget,
    multipart_body,
    parse_submission,
)
from csml.coordinator.views import job_views
from csml.refusals import Refusal
from csml.schemas import (
    AppInfo,
    ErrorBody,
    IdentityCreated,
    IdentityInfo,
    Job,
    JobList,
    JobSpec,
    JobState,
    PipelineSpec,
    QueueInfo,
    base64_text,
)
from csml.schemas.identities import IdentityChallenge, IdentityProof
from csml.store.blobs import in_db
from csml.store.jobs import JobRow
from csml.store.tables import Identity, utcnow
from csml.store.verification import TrustCounts

T = TypeVar("T")
router = APIRouter(route_class=AuthFirstRoute, prefix="/v1")
Me = Annotated[Identity, Depends(current_identity)]
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 409, 413, 422, 429)
}


@router.post("/identities/challenge", response_model=IdentityChallenge, tags=["identities"])
def identity_challenge(request: Request) -> IdentityChallenge:
    """A proof-of-work challenge for `POST /v1/identities`: find a `nonce` such that
    SHA-256(challenge || nonce) starts with `difficulty` zero bits. Usable once, until
    `expires_at`. The difficulty rises (one bit per doubling, up to a cap) with the recent
    rate of new identities, so a flood makes itself expensive but locks no one out."""
    return abuse.issue_challenge(core(request))


@router.post(
    "/identities",
    status_code=201,
    response_model=IdentityCreated,
    tags=["identities"],
    responses=ERRORS,
)
def create_identity(request: Request, proof: IdentityProof | None = None) -> IdentityCreated:
    """Create an anonymous identity with a solved challenge (`{"challenge", "nonce"}`; no body
    when the service needs no proof of work). The token is shown once; the service keeps only
    its hash. A challenge made too easy by a flood since it was issued is refused with
    `challenge_too_easy` (422): get a new one."""
    return abuse.create_identity(core(request), proof)


@router.get("/identities/me", response_model=IdentityInfo, tags=["identities"], responses=ERRORS)
def whoami(me: Me) -> IdentityInfo:
    return IdentityInfo(id=me.id, created_at=me.created_at)


@router.delete("/identities/me", status_code=204, tags=["identities"], responses=ERRORS)
def delete_me(request: Request, me: Me) -> Response:
    """Erase your identity with all its jobs (running ones are stopped), files and records.
    The token stops working at once; this cannot be undone."""
    c = core(request)
    abuse.delete_identity(c, me.id)
    c.identities.erased(me.id)  # here at once; other coordinators through the relay
    return Response(status_code=204)


def app_infos(c: Core) -> list[AppInfo]:
    live = c.queue.live_workers()
    stats = c.queue.queue_stats()
    by_kind = contributions.worker_counts(c)  # (operator-run, contributed) per app
    cutoff = utcnow() - timedelta(seconds=c.settings.worker_live_seconds)
    trust = verification.trust_counts(c.engine, cutoff, c.settings.verify_probation)
    infos = []
    for name, entry in sorted(c.catalog.entries().items()):
        workers = live.get(name)
        st = stats.get(name, {})
        infos.append(
            AppInfo(
                **entry.manifest.model_dump(),
                workers=workers.workers if workers else 0,
                slots=workers.slots if workers else 0,
                sandboxes=list(workers.sandboxes) if workers else [],
                operator_workers=by_kind.get(name, (0, 0))[0],
                contributed_workers=by_kind.get(name, (0, 0))[1],
                attested_workers=trust.get(name, TrustCounts()).attested,
                probation_workers=trust.get(name, TrustCounts()).probation,
                quarantined_workers=trust.get(name, TrustCounts()).quarantined,
                queue=QueueInfo(
                    depth=st.get(JobState.queued.value, 0),
                    running=st.get(JobState.running.value, 0),
                    capacity=c.settings.capacity(name),
                ),
            )
        )
    return infos


@router.get("/apps", response_model=list[AppInfo], tags=["apps"])
def list_apps(request: Request) -> list[AppInfo]:
    """Every application with its operations, live workers and queue."""
    return app_infos(core(request))


@router.get("/apps/{name}", response_model=AppInfo, tags=["apps"], responses=ERRORS)
def get_app(name: str, request: Request) -> AppInfo:
    for info in app_infos(core(request)):
        if info.name == name:
            return info
    raise not_found("application", name)


def parse_spec(raw: bytes) -> JobSpec:
    try:
        return JobSpec.model_validate_json(raw)
    except ValidationError as exc:
        raise spec_error(exc) from None


SUBMIT_BODY = multipart_body(
    'JSON: {"app": ..., "operation": ..., "params": {...}} or a pipeline {"steps": [{"name", '
    '"app", "operation", "params", "inputs": {"image": "upload:photo"}}, ...]}. Send it first.',
    json_ref="#/components/schemas/JobSpec",
)


def refusal(check: Callable[[T, set[str]], None], spec: T, names: set[str]) -> ApiError:
    """The error `check` gives for these file names (the one refusing an unknown part)."""
    try:
        check(spec, names)
    except ApiError as exc:
        return exc
    except Refusal as exc:
        return from_refusal(exc)
    raise AssertionError(f"{check.__qualname__} accepted {sorted(names)}")


class _Budget(StorageBudget):
    """The upload's storage budget, refusing as the multipart parser expects (ApiError)."""

    def __call__(self, received: int) -> None:
        try:
            super().__call__(received)
        except Refusal as exc:
            raise from_refusal(exc) from None


def check_model_quota(c: Core, owner_id: str, spec: JobSpec) -> None:
    _, op = c.catalog.operation(spec.app, spec.operation)
    abuse.check_model_quota(c, owner_id, artifacts.makes_models(op))


@router.post(
    "/jobs",
    status_code=202,
    response_model=Job,
    tags=["jobs"],
    responses=ERRORS,
    openapi_extra=SUBMIT_BODY,
)
@lean
async def submit_job(request: Request, me: Me) -> JSONResponse:
    """Submit a job: multipart with a `spec` part and one part per input file (or JSON if none)."""
    c = core(request)
    if request.headers.get("content-type", "").startswith("application/json"):
        raw = await request.body()  # at most max_spec_bytes (csml.coordinator.middleware)
        return await _submit_json(c, me.id, raw)
    else:
        upload = abuse.announced_upload(request.headers)
        windowed = bool(c.settings.submission_rate_limit)
        # A small body is read before any check of the store, as a JSON spec is: its
        # job's write checks the identity, window and quotas (no early read, no hop);
        # a pipeline's store checks run in its submission's hop. A larger one (or one
        # of unknown length) is refused past a limit before a byte of it is parsed.
        small = 0 < upload <= SMALL_SUBMISSION_BYTES
        # Made by the first input that goes to disk: small ones stay in memory (no folder).
        staging = c.blobs.staging_path()
        holder: dict[str, JobSpec] = {}
        piped: dict[str, PipelineSpec] = {}
        budget = _Budget(c, me.id, unchecked=SMALL_SUBMISSION_BYTES if small else 0)
        prechecked: list[bool] = []
        on_disk = True  # whether the staging folder may exist (see the `finally`)

        def precheck() -> None:
            # 429 past a limit before a byte of the body is parsed: a read, in the hop
            # of the first chunk; the job's write counts it. Its stored bytes seed the
            # upload's budget. Its own refusal is not counted (as when it ran alone).
            budget.used = abuse.precheck_submission(c, me.id, upload)
            prechecked.append(True)

        def on_spec(raw: bytes) -> Accepts:
            """Check the spec (off the event loop, or on it when small); the file parts
            it takes."""
            try:
                return check_spec(raw)
            except Refusal as exc:  # the multipart parser reports ApiErrors
                raise from_refusal(exc) from None

        def check_spec(raw: bytes) -> Accepts:
            data, budget.extra = spec_limits.load_kept(raw, c.settings)
            if _is_pipeline(data):
                pipeline = piped["spec"] = pipeline_spec.parse(raw)
                if small:  # what needs no store; the rest in the submission's hop
                    pipeline_spec.validate(c.catalog, pipeline)
                    c.queue.limits_for(pipeline_spec.first_spec(pipeline))
                else:
                    pipeline_spec.check(c, me.id, pipeline)
                wanted = pipeline_spec.uploads(pipeline)
                return Accepts(
                    wanted,
                    lambda name: refusal(pipeline_spec.check_files, pipeline, wanted | {name}),
                )
            spec = holder["spec"] = parse_spec(raw)
            # Small: what needs no store (params, limits); capacity, recipients and
            # the model quota are checked by the job's write, as for a JSON spec.
            c.queue.check_spec(spec, reads=not small)
            if not small:
                check_model_quota(c, me.id, spec)
            _, op = c.catalog.operation(spec.app, spec.operation)
            names = {f.name for f in op.inputs}
            return Accepts(names, lambda name: refusal(c.queue.check_files, spec, names | {name}))

        try:
            try:
                parsed = await parse_submission(
                    request,
                    staging,
                    FormLimits.of(c.settings),
                    on_spec,
                    budget,
                    None if small else precheck,
                    keep_bytes=c.settings.db_blob_max_bytes,  # small inputs: in the database
                    spec_on_loop=small,
                )
            except (ApiError, Refusal):
                if windowed and (prechecked or small):  # refused before its write: counted
                    await run_in_threadpool(abuse.check_submission, c, me.id, upload)
                raise
            if piped:
                return await run_in_threadpool(
                    _submit_form_pipeline,
                    c,
                    me.id,
                    piped["spec"],
                    staging,
                    parsed.files,
                    upload if windowed else None,
                    small,
                )
            # The folder is made only for a file that went to disk (`MemoryFirst`).
            on_disk = any(f.path is not None for f in parsed.files.values())
            job = await c.queue.submit_async(
                me.id,
                holder["spec"],
                staging,
                parsed.files,
                count_window=windowed,
                params_checked=True,  # by `check_spec`, as its part arrived
            )
            plain = holder["spec"].confidential is None  # a sealed job's inputs: never inline
            for f in parsed.files.values():  # kept in the database: its claim's text
                if plain and f.content is not None:
                    c.blobs.base64.put(f.sha256, f.size, base64_text.encode(f.content))
            return _submitted(c, me.id, job)
        finally:
            # A submitted job's files were moved away with it.
            if on_disk and os.path.lexists(staging):
                await run_in_threadpool(c.blobs.discard, staging)


def _is_pipeline(data: Any) -> bool:
    """Whether a spec, as `spec_limits.load_kept` parsed it, is a pipeline (it has
    `steps`: `pipeline_spec.is_pipeline` without parsing the bytes again)."""
    return isinstance(data, dict) and "steps" in data


async def _submit_json(c: Core, owner_id: str, raw: bytes) -> JSONResponse:
    """Check and submit a JSON job or pipeline spec (no files). A single job goes through
    the writer from the event loop; its quotas and its count in the submission window
    are checked in its own transaction (`count_window`: one statement, no transaction of
    their own). A spec refused before that transaction is counted (or refused past the
    window) by the early check (`abuse.check_submission`) first, as all were before."""
    data, kept = spec_limits.load_kept(raw, c.settings)
    if _is_pipeline(data):  # {"steps": [...]}: see csml.coordinator.pipelines
        return await run_in_threadpool(_submit_pipeline_json, c, owner_id, raw, kept)
    windowed = bool(c.settings.submission_rate_limit)
    try:
        spec = parse_spec(raw)
        _, op = c.catalog.operation(spec.app, spec.operation)
        if c.settings.max_models and artifacts.makes_models(op):
            await run_in_threadpool(check_model_quota, c, owner_id, spec)
    except (ApiError, Refusal):
        if windowed:  # 429 past a limit, else counted; then this refusal
            await run_in_threadpool(abuse.check_submission, c, owner_id, kept)
        raise
    job = await c.queue.submit_async(owner_id, spec, None, {}, count_window=windowed)
    return _submitted(c, owner_id, job)


def _submit_form_pipeline(
    c: Core,
    owner_id: str,
    spec: PipelineSpec,
    staging: Path,
    files: dict[str, StagedFile],
    counted: int | None,
    small: bool,
) -> JSONResponse:
    """Submit a multipart pipeline, in one hop: counted in the window first when one is
    kept (`counted`: the upload's announced bytes; its write does not count it), then,
    for a small submission, the checks of its spec that read the store (a larger one's
    ran before its files were read)."""
    if counted is not None:
        abuse.check_submission(c, owner_id, counted)
    if small:
        pipeline_spec.check(c, owner_id, spec)
    return _submit_pipeline(c, owner_id, spec, staging, files)


def _submit_pipeline_json(c: Core, owner_id: str, raw: bytes, kept: int) -> JSONResponse:
    abuse.check_submission(c, owner_id, kept)  # 429 past a limit
    pipeline = pipeline_spec.parse(raw)
    pipeline_spec.check(c, owner_id, pipeline)
    return _submit_pipeline(c, owner_id, pipeline, None, {})


def _submit_pipeline(
    c: Core,
    owner_id: str,
    spec: PipelineSpec,
    staging: Path | None,
    files: dict[str, StagedFile],
) -> JSONResponse:
    """Submit a pipeline (its parent is read back as the store row views are made of)."""
    parent = pipelines.submit(c, owner_id, spec, staging, files)
    return _submitted(c, owner_id, c.queue.get(owner_id, parent.id))


class _RenderedJSON(JSONResponse):
    """A `JSONResponse` whose body is already JSON bytes (same headers)."""

    def render(self, content: Any) -> bytes:
        assert isinstance(content, bytes)
        return content


def _submitted(c: Core, owner_id: str, job: JobRow) -> JSONResponse:
    """The 202 for a new job (no queue position: the event stream and `?positions=true`
    GETs carry it); announced to the owner's event streams. The view is rendered by
    pydantic in one call (`model_dump_json`: the values `model_dump` and `json.dumps`
    gave; a float's exponent may be written `1e-7` where `json.dumps` wrote `1e-07`;
    nothing in it is NaN or infinite, `spec_limits` refuses those in params)."""
    c.notifier.notify(owner_change(owner_id, job.id))
    view = job_views(c.queue, [job], positions=False)[0]
    return _RenderedJSON(
        view.model_dump_json().encode(),
        status_code=202,
        headers={"Location": f"/v1/jobs/{job.id}"},
    )


POSITIONS = Query(
    False, description="Include each queued job's `queue_position` (costs a query per app)."
)


def _view_response(
    c: Core, owner_id: str, job_id: str, positions: bool
) -> tuple[str, JSONResponse]:
    """The job's state and wire view as a response: one load (row, files, envelope)."""
    view = job_views(c.queue, [c.queue.get(owner_id, job_id)], positions=positions)[0]
    return view.state.value, JSONResponse(view.model_dump(mode="json"))


@router.get("/jobs", response_model=JobList, tags=["jobs"], responses=ERRORS)
def list_jobs(
    request: Request,
    me: Me,
    state: JobState | None = None,
    app: str | None = Query(None, max_length=40),
    limit: int = Query(100, ge=1, le=1000),
    positions: bool = POSITIONS,
) -> JobList:
    """Your jobs, newest first."""
    c = core(request)
    jobs = c.queue.list_jobs(me.id, state=state.value if state else None, app=app, limit=limit)
    return JobList(jobs=job_views(c.queue, jobs, positions=positions))


@router.get("/jobs/{job_id}", response_model=Job, tags=["jobs"], responses=ERRORS)
@lean
async def get_job(
    job_id: str,
    request: Request,
    me: Me,
    wait: float = Query(0.0, ge=0, le=300, description="Long-poll up to this many seconds."),
    positions: bool = POSITIONS,
) -> JSONResponse:
    """A job; with `wait`, answers as soon as it reaches a final state (or the wait ends).

    The job is loaded once, when answering; while waiting, only its state is re-read
    (after a wake-up for it, or every few seconds as a safety net). Reads run on the
    event loop (short indexed statements; no thread-pool hop). Given a whole id, the
    wait subscribes before its first read (one state read); given a prefix, it reads
    the id first and its state again once subscribed. Either way no change between the
    read and the subscription is missed."""
    c = core(request)
    if wait <= 0:
        return _view_response(c, me.id, job_id, positions)[1]
    deadline = time.monotonic() + min(wait, c.settings.max_wait_seconds)
    whole = len(job_id) == ids.ID_LENGTH and ids.is_id_prefix(job_id)
    full_id, state = (job_id, None) if whole else c.queue.state_of(me.id, job_id)
    if state is None or not JobState(state).terminal:
        # With the owner's topic: a completion's key is relayed on its bucket only.
        topic = owner_feed(me.id)
        with c.notifier.subscribe(job_key(full_id), topic) as event:
            await c.notifier.heard(topic)  # the relay listens there: no key missed
            # Subscribed: (re-)read, so a change just before subscribing is not missed.
            _, state = c.queue.state_of(me.id, full_id)
            while not JobState(state).terminal:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if await c.notifier.wait(event, min(remaining, c.notifier.recheck_seconds)):
                    # Mostly its end (or a requeue): load it, and answer if it ended.
                    state, response = _view_response(c, me.id, full_id, positions)
                    if JobState(state).terminal:
                        return response
                else:
                    _, state = c.queue.state_of(me.id, full_id)
    return _view_response(c, me.id, full_id, positions)[1]


@router.delete("/jobs/{job_id}", response_model=Job, tags=["jobs"], responses=ERRORS)
def cancel_job(job_id: str, request: Request, me: Me) -> Job:
    """Cancel a queued or running job (a running one is stopped on its worker)."""
    c = core(request)
    job = c.queue.cancel(me.id, job_id)
    return job_views(c.queue, [job], positions=False)[0]


@router.get(
    "/jobs/{job_id}/outputs/{name}",
    tags=["jobs"],
    responses={200: {"content": {"application/octet-stream": {}}}, **ERRORS},
    response_class=FileResponse,
)
@lean
async def download_output(job_id: str, name: str, request: Request, me: Me) -> FileResponse:
    """Stream one output file of a job.

    The job and its file are read on the event loop in one short indexed read (with the
    file's bytes when the database keeps them: `JobQueue.owned_file`), and the file's stat
    too, so a small output costs no thread-pool hop (see `WholeFile`); an output kept in
    the database is served with the same headers (`BlobResponse`). Only a job without
    that output is loaded whole, to name the outputs it has."""
    c = core(request)
    found = c.queue.owned_file(me.id, job_id, "output", name)
    if found is not None:
        f = found.file
        filename = f"{ids.short(found.job_id)}-{f.name}{_extension(f.media_type)}"
        if in_db(f.blob):  # kept in the database: served as the file would be
            if f.content is None:  # erased since it was listed
                raise not_found("output", name)
            return BlobResponse(
                f.content,
                f.blob,
                found.ended_at.timestamp(),
                media_type=f.media_type,
                filename=filename,
                headers={"X-Content-SHA256": f.sha256},
            )
        path = c.blobs.path(f.blob)
        try:
            stat_result: os.stat_result | None = os.stat(path)
        except OSError:
            stat_result = None  # FileResponse says what is wrong, as before
        return WholeFile(
            path,
            media_type=f.media_type,
            filename=filename,
            headers={"X-Content-SHA256": f.sha256},
            stat_result=stat_result,
        )
    job = c.queue.get(me.id, job_id)
    names = ", ".join(f.name for f in job.files if f.kind == "output") or "none"
    raise ApiError(
        404,
        "not_found",
        f"job {ids.short(job.id)} has no output {name!r} (state {job.state}; outputs: {names})",
    )


@functools.lru_cache(maxsize=256)
def _extension(media_type: str) -> str:
    """The file name extension of a media type ("" if none is known); media types come
    from the catalog's declared outputs, so the cache stays small."""
    return mimetypes.guess_extension(media_type) or ""
