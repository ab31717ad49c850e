"""Routes for model artifacts: list, inspect, download, delete, import."""

from __future__ import annotations

import mimetypes

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from pydantic import ValidationError
from sqlalchemy import delete, select
from starlette.concurrency import run_in_threadpool

from csml import ids
from csml.coordinator import artifacts, quotas
from csml.coordinator.api_users import ERRORS, Me
from csml.coordinator.auth import AuthFirstRoute
from csml.coordinator.errors import ApiError, spec_error
from csml.coordinator.queue import StagedFile
from csml.coordinator.state import Core, core
from csml.coordinator.uploads import (
    BINARY,
    Accepts,
    FormLimits,
    StorageBudget,
    multipart_body,
    parse_submission,
)
from csml.schemas.models import ModelImport, ModelInfo, ModelList
from csml.store.db import transaction
from csml.store.tables import utcnow
from csml.store.tables_artifacts import ModelArtifact

router = APIRouter(route_class=AuthFirstRoute, prefix="/v1", tags=["models"])
IMPORT_BODY = multipart_body(
    'JSON: {"app": ..., "format": ..., "format_version"?: ..., "name"?: ...}. Send it first.',
    files={"model": BINARY},
)


@router.get("/models", response_model=ModelList, responses=ERRORS)
def list_models(request: Request, me: Me) -> ModelList:
    """Your models, newest first: trained by your jobs or imported."""
    with core(request).sessions() as session:
        rows = session.scalars(
            select(ModelArtifact)
            .where(ModelArtifact.owner_id == me.id)
            .order_by(ModelArtifact.seq.desc())
        ).all()
        return ModelList(models=[artifacts.view(m) for m in rows])


@router.get("/models/{model_id}/info", response_model=ModelInfo, responses=ERRORS)
def model_info(model_id: str, request: Request, me: Me) -> ModelInfo:
    """One of your models: what made it, its format and its metrics."""
    with core(request).sessions() as session:
        return artifacts.view(artifacts.find(session, me.id, model_id))


@router.get(
    "/models/{model_id}",
    responses={200: {"content": {"application/octet-stream": {}}}, **ERRORS},
    response_class=FileResponse,
)
def download_model(model_id: str, request: Request, me: Me) -> FileResponse:
    """Download one of your models (the file its app reads)."""
    c = core(request)
    with c.sessions() as session:
        model = artifacts.find(session, me.id, model_id)
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
    with transaction(c.sessions) as session:
        model = artifacts.find(session, me.id, model_id)
        session.execute(delete(ModelArtifact).where(ModelArtifact.seq == model.seq))
    artifacts.remove_files(c.blobs, [model.id])
    return Response(status_code=204)


def _parse_import(raw: bytes) -> ModelImport:
    try:
        return ModelImport.model_validate_json(raw)
    except ValidationError as exc:
        raise spec_error(exc) from None


def _check_import(c: Core, owner_id: str, spec: ModelImport) -> int:
    want = artifacts.importable(c.catalog, spec.app, spec.format)
    assert want.model is not None
    version = spec.format_version or want.model.version
    if version > want.model.version:
        raise ApiError(
            422,
            "model_version_unsupported",
            f"spec.format_version: the {spec.app} workers here read {spec.format} versions "
            f"1 to {want.model.version}, not {version}",
            field="spec.format_version",
        )
    with c.sessions() as session:
        quotas.check_new_models(c, session, c.catalog, owner_id, 1)
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
            raise ApiError(
                422,
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


def _only_model(name: str) -> ApiError:
    return ApiError(
        422,
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
    model_id = ids.new_id()
    target = artifacts.model_dir(c.blobs, model_id) / spec.name
    artifacts.link_or_copy(staged.path, target)
    try:
        with transaction(c.sessions) as session:
            quotas.require_identity(session, owner_id)  # 401 if erased meanwhile
            quotas.check_new_models(c, session, c.catalog, owner_id, 1)
            model = ModelArtifact(
                id=model_id,
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
                blob=c.blobs.relative(target),
                metrics={},
                created_at=utcnow(),
            )
            session.add(model)
            session.flush()
            return artifacts.view(model)
    except BaseException:
        artifacts.remove_files(c.blobs, [model_id])
        raise
