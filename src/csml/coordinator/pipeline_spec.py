"""Pipelines, before anything runs: parse a pipeline spec and check every step.

Unknown apps, operations, params, wiring and missing inputs are all 422 naming
the field (`spec.steps.1.inputs.image`), refused before the files are uploaded.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from pydantic import ValidationError
from sqlalchemy.orm import Session

from csml.apps.base import MODEL_PARAM
from csml.coordinator import artifacts, quotas
from csml.coordinator.errors import ApiError, from_refusal, spec_error
from csml.refusals import Refusal
from csml.schemas import JobSpec, OperationInfo, PipelineSpec, StepSpec
from csml.schemas.pipelines import UPLOAD_PREFIX
from csml.store.blobs import check_name

if TYPE_CHECKING:
    from csml.coordinator.catalog import Catalog
    from csml.coordinator.state import Core

CONFIDENTIAL_REFUSED = (
    "pipelines cannot be confidential: the coordinator wires each step's outputs into the "
    "next step's inputs and each step may run on another app's workers, while a "
    "confidential job's files are sealed by its client to one app's attested workers. "
    "Submit confidential steps one by one"
)


def is_pipeline(raw: bytes) -> bool:
    """Whether a submission's spec is a pipeline (it has `steps`)."""
    try:
        data = json.loads(raw)
    except ValueError:
        return False
    return isinstance(data, dict) and "steps" in data


def parse(raw: bytes) -> PipelineSpec:
    data = json.loads(raw)
    steps = data.get("steps")
    confidential = "confidential" in data or (
        isinstance(steps, list) and any(isinstance(s, dict) and "confidential" in s for s in steps)
    )
    if confidential:
        raise ApiError(
            422, "confidential_pipeline", CONFIDENTIAL_REFUSED, field="spec.confidential"
        )
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        raise spec_error(exc) from None


def _step_error(exc: ApiError, base: str, field: str, status: int = 422) -> ApiError:
    """An error about one step's app, operation or params, naming that step (422)."""
    return ApiError(
        status,
        exc.code,
        f"{base}: {exc.message}",
        field=field,
        details=[{**d, "field": f"{base}.{d['field']}"} for d in exc.details or []] or None,
    )


def validate(catalog: Catalog, spec: PipelineSpec) -> list[OperationInfo]:
    """Check every step before anything runs: apps, operations, params and wiring."""
    seen: dict[str, OperationInfo] = {}
    names = [s.name for s in spec.steps]
    ops: list[OperationInfo] = []
    for i, step in enumerate(spec.steps):
        base = f"spec.steps.{i}"
        if step.name in seen:
            raise ApiError(
                422,
                "duplicate_step",
                f"{base}.name: two steps are named {step.name!r}; step names must be unique",
                field=f"{base}.name",
            )
        try:
            _, op = catalog.operation(step.app, step.operation)
        except ApiError as exc:
            where = "app" if exc.code == "unknown_app" else "operation"
            raise _step_error(exc, base, f"{base}.{where}") from None
        try:
            catalog.check_params(step.app, op.name, step.params)
        except ApiError as exc:
            raise _step_error(exc, base, f"{base}.{exc.field or 'params'}") from None
        _check_wiring(step, op, base, seen, names)
        for out in op.outputs:
            if len(f"{step.name}.{out.name}") > 64:
                raise ApiError(
                    422,
                    "invalid_spec",
                    f"{base}.name: {step.name}.{out.name} is over 64 characters; "
                    "use a shorter step name",
                    field=f"{base}.name",
                )
        seen[step.name] = op
        ops.append(op)
    return ops


def _check_wiring(
    step: StepSpec, op: OperationInfo, base: str, seen: dict[str, OperationInfo], names: list[str]
) -> None:
    declared = {f.name: f for f in op.inputs}
    by_id = artifacts.model_input(op) if MODEL_PARAM in step.params else None
    who = f"{step.app}.{op.name}"
    for name, source in step.inputs.items():
        field = f"{base}.inputs.{name}"
        want = declared.get(name)
        if want is None:
            raise ApiError(
                422,
                "unknown_input",
                f"{field}: {who} takes no input {name!r}; it takes: "
                f"{', '.join(declared) or 'none'}",
                field=field,
            )
        if by_id is not None and by_id.name == name:
            raise ApiError(
                422,
                "model_given_twice",
                f"{field}: give the model either as params.model or wired as {name!r}, not both",
                field=field,
            )
        if source.startswith(UPLOAD_PREFIX):
            try:
                check_name(source[len(UPLOAD_PREFIX) :])
            except ValueError:
                raise ApiError(
                    422,
                    "invalid_wiring",
                    f"{field}: {source!r} names no valid file part (lowercase letters, digits, "
                    "_; starting with a letter)",
                    field=field,
                ) from None
            continue
        from_step, dot, output = source.partition(".")
        if not dot:
            raise ApiError(
                422,
                "invalid_wiring",
                f"{field}: {source!r} is neither 'upload:<file part>' nor "
                "'<earlier step>.<output>'",
                field=field,
            )
        source_op = seen.get(from_step)
        if source_op is None:
            why = (
                f"step {from_step!r} does not run before step {step.name!r}: a step reads only "
                "uploads and the outputs of earlier steps"
                if from_step in names
                else f"there is no step {from_step!r} (steps: {', '.join(names)})"
            )
            raise ApiError(422, "invalid_wiring", f"{field}: {why}", field=field)
        outputs = {o.name: o for o in source_op.outputs}
        made = outputs.get(output)
        if made is None:
            raise ApiError(
                422,
                "invalid_wiring",
                f"{field}: step {from_step!r} ({source_op.name}) writes no output {output!r}; "
                f"it writes: {', '.join(outputs) or 'none'}",
                field=field,
            )
        if want.model is not None and (
            made.model is None
            or (made.model.kind, made.model.format) != (want.model.kind, want.model.format)
            or made.model.version > want.model.version
        ):
            got = f"a {made.model.format} v{made.model.version} model" if made.model else "no model"
            raise ApiError(
                422,
                "wrong_model",
                f"{field}: {who} needs a {want.model.format} model (versions 1 to "
                f"{want.model.version}); {source} is {got}",
                field=field,
            )
    for f in op.inputs:
        if f.required and f.name not in step.inputs and (by_id is None or by_id.name != f.name):
            raise ApiError(
                422,
                "missing_input",
                f"{base}.inputs.{f.name}: {who} needs the input {f.name!r}; wire it to "
                "'upload:<file part>' or '<earlier step>.<output>'",
                field=f"{base}.inputs.{f.name}",
            )


def uploads(spec: PipelineSpec) -> set[str]:
    """The file parts the steps read."""
    return {
        src[len(UPLOAD_PREFIX) :]
        for step in spec.steps
        for src in step.inputs.values()
        if src.startswith(UPLOAD_PREFIX)
    }


def check_models(session: Session, core: Core, owner_id: str, spec: PipelineSpec) -> None:
    """Models named by id (`params.model`) must be the caller's and fit their step."""
    for i, step in enumerate(spec.steps):
        ref = step.params.get(MODEL_PARAM)
        if not isinstance(ref, str):
            continue
        base = f"spec.steps.{i}"
        _, op = core.catalog.operation(step.app, step.operation)
        want = artifacts.model_input(op)
        try:
            if want is None:
                raise ApiError(422, "invalid_params", f"{op.name} takes no model")
            try:
                model = artifacts.find(session, owner_id, ref)
            except Refusal as refused:  # the model lookup raises refusals
                raise from_refusal(refused) from None
            artifacts.check_compatible(model, want, step.app, op.name)
        except ApiError as exc:  # another identity's model stays a 404, as for one job
            status = 404 if exc.status == 404 else 422
            raise _step_error(exc, base, f"{base}.params.model", status) from None


def first_spec(spec: PipelineSpec) -> JobSpec:
    first = spec.steps[0]
    return JobSpec(app=first.app, operation=first.operation, limits=spec.limits)


def check(core: Core, owner_id: str, spec: PipelineSpec) -> None:
    """Everything that can be refused before the files arrive."""
    ops = validate(core.catalog, spec)
    core.queue.limits_for(first_spec(spec))
    making = sum(quotas.models_made(op) for op in ops)  # every step's, up front
    with core.sessions() as session:
        quotas.check_new_models(core, session, core.catalog, owner_id, making)
        check_models(session, core, owner_id, spec)
        core.queue._check_capacity(session, spec.steps[0].app)


def check_files(spec: PipelineSpec, sent: set[str]) -> None:
    wanted = uploads(spec)
    for extra in sorted(sent - wanted):
        raise ApiError(
            422,
            "unknown_input",
            f"no step reads the file part {extra!r}; wire it to a step input as 'upload:{extra}'",
            field=extra,
        )
    for missing in sorted(wanted - sent):
        raise ApiError(
            422,
            "missing_input",
            f"a step reads 'upload:{missing}' but no file part {missing!r} was sent",
            field=missing,
        )
