"""Routes for model artifacts: list, inspect, download, delete, import.

Thin: each route reads its request and calls `csml.coordinator.artifacts`, which
keeps the rules, and through it the store (`csml.store.models`). Refusals raised
below (`csml.refusals`) become HTTP in `csml.coordinator.errors`.
"""

from __future__ import annotations

import mimetypes

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from csml import ids
from csml.coordinator import artifacts, spec_limits
from csml.coordinator.api_users import ERRORS, Me
from csml.coordinator.auth import AuthFirstRoute
from csml.coordinator.staged_inputs import StagedFile
from csml.coordinator.state import Core, core
from csml.coordinator.uploads import (
    BINARY,
    Accepts,
    FormLimits,
    StorageBudget,
    multipart_body,
    parse_submission,
)
from csml.refusals import Invalid
from csml.schemas.models import ModelImport, ModelInfo, ModelList
from csml.store.models import StoredModel
from csml.store.tables import utcnow

router = APIRouter(route_class=AuthFirstRoute, prefix="/v1", tags=["models"])
IMPORT_BODY = multipart_body(
    'JSON: {"app": ..., "format": ..., "format_version"?: ..., "name"?: ...}. Send it first.',
    files={"model": BINARY},
)


@router.get("/models", response_model=ModelList, responses=ERRORS)
def list_models(request: Request, me: Me) -> ModelList:
    """Your models, newest first: trained by your jobs or imported."""
    return ModelList(models=artifacts.list_models(core(request).sessions, me.id))


@router.get("/models/{model_id}/info", response_model=ModelInfo, responses=ERRORS)
def model_info(model_id: str, request: Request, me: Me) -> ModelInfo:
    """One of your models: what made it, its format and its metrics."""
    return artifacts.view(artifacts.info(core(request).sessions, me.id, model_id))


@router.get(
    "/models/{model_id}",
    responses={200: {"content": {"application/octet-stream": {}}}, **ERRORS},
    response_class=FileResponse,
)
def download_model(model_id: str, request: Request, me: Me) -> FileResponse:
    """Download one of your models (the file its app reads)."""
    c = core(request)
    model = artifacts.info(c.sessions, me.id, model_id)
    ext = mimetypes.guess_extension(model.media_type) or ""
    return FileResponse(
        c.blobs.path(model.blob),
        media_type=model.media_type,
        filename=f"{model.app}-{model.kind}-{ids.short(model.id)}{ext}",
        headers={"X-Content-SHA256": model.sha256},
    )


@router.delete("/models/{model_id}", status_code=204, responses=ERRORS)
def delete_model(model_id: str, request: Request, me: Me) -> Response:
    """Delete one of your models. Jobs already submitted with it keep their copy."""
    c = core(request)
    artifacts.delete(c.sessions, c.blobs, me.id, model_id)
    return Response(status_code=204)


def _parse_import(raw: bytes) -> ModelImport:
    try:
        return ModelImport.model_validate_json(raw)
    except ValidationError as exc:
        raise spec_limits.invalid_spec(exc) from None


def _check_import(c: Core, owner_id: str, spec: ModelImport) -> int:
    want = artifacts.importable(c.catalog, spec.app, spec.format)
    assert want.model is not None
    version = spec.format_version or want.model.version
    if version > want.model.version:
        raise Invalid(
            "model_version_unsupported",
            f"spec.format_version: the {spec.app} workers here read {spec.format} versions "
            f"1 to {want.model.version}, not {version}",
            field="spec.format_version",
        )
    artifacts.check_import_room(c, c.sessions, c.catalog, owner_id)
    return version


@router.post(
    "/models",
    status_code=201,
    response_model=ModelInfo,
    responses=ERRORS,
    openapi_extra=IMPORT_BODY,
)
async def import_model(request: Request, me: Me) -> ModelInfo:
    """Keep a model file you have (e.g. one downloaded earlier) as one of your models.
    Multipart: a `spec` part, then the file as part `model`. Its app's workers check the
    file itself when a job uses it."""
    c = core(request)
    staging = await run_in_threadpool(c.blobs.new_staging)
    holder: dict[str, tuple[ModelImport, int]] = {}

    def on_spec(raw: bytes) -> Accepts:
        spec = _parse_import(raw)
        holder["spec"] = (spec, _check_import(c, me.id, spec))
        return Accepts({"model"}, _only_model)

    try:
        parsed = await parse_submission(
            request, staging, FormLimits.of(c.settings), on_spec, StorageBudget(c, me.id)
        )
        spec, version = holder["spec"]
        extra = sorted(set(parsed.files) - {"model"})
        if extra or "model" not in parsed.files:
            raise Invalid(
                "invalid_files",
                "send exactly one file, as the part named 'model'"
                + (f" (also got: {', '.join(extra)})" if extra else ""),
                field="model",
            )
        staged = parsed.files["model"]
        want = artifacts.importable(c.catalog, spec.app, spec.format)
        assert want.model is not None
        return await run_in_threadpool(
            _keep_import, c, me.id, spec, version, want.model.kind, staged
        )
    finally:
        await run_in_threadpool(c.blobs.discard, staging)


def _only_model(name: str) -> Invalid:
    return Invalid(
        "invalid_files",
        f"send exactly one file, as the part named 'model' (also got: {name})",
        field="model",
    )


def _keep_import(
    c: Core,
    owner_id: str,
    spec: ModelImport,
    version: int,
    kind: str,
    staged: StagedFile,
) -> ModelInfo:
    model = StoredModel(
        id=ids.new_id(),
        owner_id=owner_id,
        app=spec.app,
        kind=kind,
        format=spec.format,
        format_version=version,
        name=spec.name,
        operation=None,
        job_id=None,
        size=staged.size,
        sha256=staged.sha256,
        media_type=staged.media_type,
        blob="",  # set where the file is linked
        metrics={},
        created_at=utcnow(),
    )
    assert staged.path is not None  # a form part: always a file
    return artifacts.import_model(c, c.sessions, c.blobs, c.catalog, model, staged.path)
