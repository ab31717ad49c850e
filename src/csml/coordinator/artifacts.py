"""Model artifacts: kept when a job writes a model output, usable by id in later jobs.

A model file is hard-linked (not copied) from the job's output into
`blobs/models/`, so it outlives the job's retention at no extra disk cost;
a job that uses a model gets its own link, so deleting the model cannot pull
the file from under a queued job. A pipeline gets its own link at submission
for each step that names a model by id (a file row of kind `PINNED` on the
pipeline, which its views do not show), so a later step runs even when the model
was deleted meanwhile.

Models do not expire: one stays until its owner deletes it or erases their
identity. How many an identity keeps is bounded by the model quota, checked
when a job that makes models is submitted (`csml.coordinator.quotas`) and again
in the transaction that keeps them (`keep_outputs`, `import_model`).

Rows are the store's (`csml.store.models`, `StoredModel` values); this module links
files and decides. Refusals are `csml.refusals` kinds: another identity's model is
`NotFound`, as is a name that cannot be an id.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from csml import ids
from csml.apps.base import MODEL_PARAM
from csml.coordinator import quotas
from csml.coordinator.catalog import Catalog
from csml.refusals import Invalid, Refusal
from csml.schemas import FileSpec, JobSpec, OperationInfo
from csml.schemas.models import ModelInfo
from csml.store import models as store
from csml.store.blobs import BlobStore, fsync_folders_of, in_db
from csml.store.db import transaction
from csml.store.models import StoredModel
from csml.store.private import create_private_file
from csml.store.tables import Job, JobFile, utcnow

MAX_METRICS_BYTES = 64 * 1024
PINNED = "model"  # JobFile.kind of a pipeline's own link to a model a step names by id


def model_input(op: OperationInfo) -> FileSpec | None:
    return next((f for f in op.inputs if f.model is not None), None)


def makes_models(op: OperationInfo) -> bool:
    return any(f.model is not None for f in op.outputs)


def model_dir(blobs: BlobStore, model_id: str) -> Path:
    return blobs.root / "models" / model_id[:2] / model_id


def link_or_copy(src: Path, dst: Path) -> None:
    """`dst` becomes a hard link to `src` (a copy across file systems). One there already
    (a run of the same write operation that was rolled back, run again: `pin`) is kept
    when it is `src`'s, else replaced by a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except FileExistsError:
        if not os.path.samefile(src, dst):
            shutil.copyfile(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_model_file(blobs: BlobStore, content: bytes, dst: Path) -> None:
    """`dst` becomes a file of `content` (a model kept from an output kept in the
    database, `csml.store.blobs.in_db`), fsync'd with its folder before the model's row
    commits."""
    blobs.make_dirs(dst.parent)
    with os.fdopen(create_private_file(dst), "wb") as out:
        out.write(content)
        out.flush()
        os.fsync(out.fileno())
    fsync_folders_of([dst])


def find(session: Session, owner_id: str, ident: str) -> StoredModel:
    """The caller's model by id or unique prefix; another identity's is not found."""
    return store.find_owned(session, owner_id, ident)


def requested_model(spec: JobSpec) -> str | None:
    value = spec.params.get(MODEL_PARAM)
    return value if isinstance(value, str) else None


def check_compatible(model: StoredModel, want: FileSpec, app: str, operation: str) -> None:
    fmt = want.model
    assert fmt is not None
    short = ids.short(model.id)
    if model.format != fmt.format or model.kind != fmt.kind:
        raise Invalid(
            "wrong_model",
            f"params.model: model {short} is a {model.app} {model.kind} model "
            f"({model.format}); {app}.{operation} needs a {fmt.kind} model ({fmt.format})",
            field="spec.params.model",
        )
    if model.format_version > fmt.version:
        raise Invalid(
            "model_version_unsupported",
            f"params.model: model {short} is {model.format} version {model.format_version}; "
            f"the {app} workers here read versions 1 to {fmt.version}. Upgrade the {app} "
            "workers, or retrain the model with them",
            field="spec.params.model",
        )


def attach(
    session: Session,
    blobs: BlobStore,
    catalog: Catalog,
    owner_id: str,
    spec: JobSpec,
    job: Job,
    uploaded: set[str],
) -> None:
    """Resolve `params.model` to the caller's model and link it in as the model input."""
    model_ref = requested_model(spec)
    if model_ref is None:
        return
    _, op = catalog.operation(spec.app, spec.operation, session)
    want = model_input(op)
    if want is None:  # the params schema already refuses this; keep the check local too
        raise Invalid("invalid_params", f"{op.name} takes no model", field="spec.params")
    if want.name in uploaded:
        raise Invalid(
            "model_given_twice",
            f"give the model either as params.model or as the file {want.name!r}, not both",
            field="spec.params.model",
        )
    model = find(session, owner_id, model_ref)
    check_compatible(model, want, spec.app, op.name)
    target = blobs.job_dir(job.id) / "inputs" / want.name
    link_or_copy(blobs.path(model.blob), target)
    job.params = {**job.params, MODEL_PARAM: model.id}
    job.files.append(
        JobFile(
            kind="input",
            name=want.name,
            size=model.size,
            sha256=model.sha256,
            media_type=model.media_type,
            blob=blobs.relative(target),
            model_id=model.id,
        )
    )


def pin(
    session: Session, blobs: BlobStore, owner_id: str, model_ref: str, job: Job, key: str
) -> StoredModel:
    """Give `job` its own link to the caller's model `model_ref`, as its file `key` of
    kind `PINNED` (a pipeline pins the model of each step that names one at
    submission, so deleting the model later cannot fail that step)."""
    model = find(session, owner_id, model_ref)
    target = blobs.job_dir(job.id) / PINNED / key / model.name
    link_or_copy(blobs.path(model.blob), target)
    job.files.append(
        JobFile(
            kind=PINNED,
            name=key,
            size=model.size,
            sha256=model.sha256,
            media_type=model.media_type,
            blob=blobs.relative(target),
            model_id=model.id,
        )
    )
    return model


def _metrics(result: dict[str, Any] | None) -> dict[str, Any]:
    if not result or len(json.dumps(result)) > MAX_METRICS_BYTES:
        return {}
    return result


def keep_outputs(
    session: Session,
    owner: quotas.HasSettings,
    blobs: BlobStore,
    catalog: Catalog,
    job: Job,
    model_ids: dict[tuple[str, str], str] | None = None,
) -> None:
    """Make each model output of a succeeded job a model artifact of its owner, as far
    as the model quota allows now (checked here, in the transaction that keeps them);
    an output past it stays an ordinary output and the job's message says so.

    Each model's id is drawn once per (job, output) in `model_ids`, which a write
    operation keeps across its runs: a run again after one rolled back links the same
    path (`link_or_copy` finds the link there), where a new id would leave the undone
    run's folder with no row."""
    try:
        _, op = catalog.operation(job.app, job.operation, session)
    except Refusal:
        return
    declared = {f.name: f.model for f in op.outputs if f.model is not None}
    made = [f for f in job.files if f.kind == "output" and declared.get(f.name) is not None]
    room = quotas.may_keep_models(owner, session, job.owner_id, len(made))
    for f in made[room:]:
        job.progress_message = (
            f"output {f.name!r} was not kept as a model: model quota of "
            f"{owner.settings.max_models} models reached (download it, delete a model "
            "and import it with POST /v1/models to keep it)"
        )
    for f in made[:room]:
        fmt = declared[f.name]
        assert fmt is not None
        if model_ids is None:
            model_id = ids.new_id()
        elif (key := (job.id, f.name)) in model_ids:
            model_id = model_ids[key]
        else:
            model_id = model_ids[key] = ids.new_id()
        target = model_dir(blobs, model_id) / f.name
        if in_db(f.blob):  # a small output kept in the database: a model is a file
            write_model_file(blobs, f.content or b"", target)
        else:
            link_or_copy(blobs.path(f.blob), target)
        f.model_id = model_id
        store.add(
            session,
            StoredModel(
                id=model_id,
                owner_id=job.owner_id,
                app=job.app,
                kind=fmt.kind,
                format=fmt.format,
                format_version=fmt.version,
                name=f.name,
                operation=job.operation,
                job_id=job.id,
                size=f.size,
                sha256=f.sha256,
                media_type=f.media_type,
                blob=blobs.relative(target),
                metrics=_metrics(job.result),
                created_at=utcnow(),
            ),
        )


def importable(catalog: Catalog, app: str, fmt: str) -> FileSpec:
    """The model input of `app` that reads format `fmt` (for `POST /v1/models`)."""
    entry = catalog.get(app)
    formats: list[str] = []
    for op in entry.manifest.operations:
        want = model_input(op)
        if want is not None and want.model is not None:
            if want.model.format == fmt:
                return want
            formats.append(want.model.format)
    known = ", ".join(sorted(set(formats))) or "none"
    raise Invalid(
        "unknown_model_format",
        f"spec.format: the {app} app reads no {fmt!r} models; it reads: {known}",
        field="spec.format",
    )


def view(model: StoredModel) -> ModelInfo:
    return ModelInfo(
        id=model.id,
        app=model.app,
        kind=model.kind,
        format=model.format,
        format_version=model.format_version,
        name=model.name,
        operation=model.operation,
        job_id=model.job_id,
        size=model.size,
        sha256=model.sha256,
        media_type=model.media_type,
        created_at=model.created_at,
        metrics=model.metrics,
    )


def remove_files(blobs: BlobStore, model_ids: list[str]) -> None:
    for model_id in model_ids:
        shutil.rmtree(model_dir(blobs, model_id), ignore_errors=True)


# -- the owner's models (for the routes) --------------------------------------------


def list_models(sessions: sessionmaker[Session], owner_id: str) -> list[ModelInfo]:
    """The owner's models, newest first."""
    with sessions() as session:
        return [view(m) for m in store.list_owned(session, owner_id)]


def info(sessions: sessionmaker[Session], owner_id: str, ident: str) -> StoredModel:
    """The owner's model `ident` (id or unique prefix)."""
    with sessions() as session:
        return find(session, owner_id, ident)


def delete(sessions: sessionmaker[Session], blobs: BlobStore, owner_id: str, ident: str) -> None:
    """Delete the owner's model `ident`: its row, then its files (jobs already
    submitted with it keep their own link)."""
    with transaction(sessions) as session:
        model = store.delete_owned(session, owner_id, ident)
    remove_files(blobs, [model.id])


def check_import_room(
    owner: quotas.HasSettings, sessions: sessionmaker[Session], catalog: Catalog, owner_id: str
) -> None:
    """Refuse an import early when the model quota has no room for one more."""
    with sessions() as session:
        quotas.check_new_models(owner, session, catalog, owner_id, 1)


def import_model(
    owner: quotas.HasSettings,
    sessions: sessionmaker[Session],
    blobs: BlobStore,
    catalog: Catalog,
    model: StoredModel,
    source: Path,
) -> ModelInfo:
    """Keep the file `source` as `model` (its `blob` is set here): linked under the
    models' folder, then its row, in a transaction that checks the owner still exists
    and the model quota again; the link is removed if the row is not kept."""
    target = model_dir(blobs, model.id) / model.name
    link_or_copy(source, target)
    try:
        with transaction(sessions) as session:
            quotas.require_identity(session, model.owner_id)  # refused if erased meanwhile
            quotas.check_new_models(owner, session, catalog, model.owner_id, 1)
            kept = replace(model, blob=blobs.relative(target))
            store.add(session, kept)
        return view(kept)
    except BaseException:
        remove_files(blobs, [model.id])
        raise
