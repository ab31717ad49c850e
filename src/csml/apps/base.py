"""The app model: operations with a pydantic parameter model and declared files."""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from pydantic import BaseModel, ConfigDict

from csml.schemas.apps import AppManifest, FileSpec, ModelFormat, OperationInfo

MODEL_PARAM = "model"
"""The parameter naming a stored model, on operations with a model input."""


class OperationParams(BaseModel):
    """Base of every parameter model: unknown parameters are an error, not ignored."""

    model_config = ConfigDict(extra="forbid")


class JobError(Exception):
    """A failure the user can act on (bad input, impossible request); its text is shown."""


@dataclass(frozen=True)
class ModelSpec:
    """A model file format. On an output: the job's file is kept as a model artifact of
    its owner. On an input: the input takes a stored model (by id) of this format, of
    any `version` from 1 up to this one."""

    kind: str
    format: str
    version: int = 1

    def wire(self) -> ModelFormat:
        return ModelFormat(kind=self.kind, format=self.format, version=self.version)


@dataclass(frozen=True)
class Input:
    name: str
    description: str = ""
    media_type: str = "application/octet-stream"
    required: bool = True
    model: ModelSpec | None = None

    def spec(self) -> FileSpec:
        return FileSpec(
            name=self.name,
            description=self.description,
            media_type=self.media_type,
            required=self.required,
            model=self.model.wire() if self.model else None,
        )


@dataclass(frozen=True)
class Output:
    name: str
    description: str = ""
    media_type: str = "application/octet-stream"
    model: ModelSpec | None = None

    def spec(self) -> FileSpec:
        return FileSpec(
            name=self.name,
            description=self.description,
            media_type=self.media_type,
            required=False,
            model=self.model.wire() if self.model else None,
        )


ProgressFn = Callable[[float, str], None]


class JobContext:
    """What an operation sees of its job: input paths, output paths, progress."""

    def __init__(
        self,
        inputs: dict[str, Path],
        output_dir: Path,
        progress: ProgressFn | None = None,
        scratch: Path | None = None,
    ) -> None:
        self._inputs = inputs
        self._output_dir = output_dir
        self._progress = progress
        self.scratch = scratch or output_dir.parent

    def has_input(self, name: str) -> bool:
        return name in self._inputs

    def input(self, name: str) -> Path:
        try:
            return self._inputs[name]
        except KeyError:
            raise JobError(f"input {name!r} was not supplied") from None

    def output(self, name: str) -> Path:
        """The path to write output `name` to; files written there are returned."""
        return self._output_dir / name

    def progress(self, fraction: float, message: str = "") -> None:
        if self._progress is not None:
            self._progress(min(max(fraction, 0.0), 1.0), message[:500])


OperationFn = Callable[[JobContext, Any], dict[str, Any]]


@dataclass
class Operation:
    name: str
    description: str
    params_model: type[OperationParams]
    inputs: list[Input]
    outputs: list[Output]
    func: OperationFn
    requires: dict[str, Any] = field(default_factory=dict)
    keeps_model: bool = False  # worker side: keeps its model input loaded between jobs
    deterministic: bool = False
    """Same inputs and params give byte-identical outputs and result in any process."""

    def model_input(self) -> Input | None:
        return next((i for i in self.inputs if i.model is not None), None)

    def info(self) -> OperationInfo:
        schema = self.params_model.model_json_schema()
        model_input = self.model_input()
        if model_input is not None and model_input.model is not None:
            # The coordinator resolves `model` to a stored model and sends it as the input.
            schema.setdefault("properties", {})[MODEL_PARAM] = {
                "type": "string",
                "title": "Model",
                "pattern": "^[0-9a-f]{12,64}$",
                "description": f"The id of one of your {model_input.model.format} models, "
                f"used as the input {model_input.name!r} (see GET /v1/models).",
            }
        return OperationInfo(
            name=self.name,
            description=self.description,
            params_schema=schema,
            inputs=[i.spec() for i in self.inputs],
            outputs=[o.spec() for o in self.outputs],
            requires=self.requires,
            deterministic=self.deterministic,
        )

    def run(self, ctx: JobContext, params: dict[str, Any]) -> dict[str, Any]:
        if self.model_input() is not None:
            params = {k: v for k, v in params.items() if k != MODEL_PARAM}
        parsed = self.params_model.model_validate(params)
        result = self.func(ctx, parsed)
        return result if result is not None else {}


@dataclass
class App:
    name: str
    version: str
    description: str = ""
    preload: tuple[str, ...] = ()
    """Modules a worker imports once, before forking job processes (e.g. `cv2`)."""
    operations: dict[str, Operation] = field(default_factory=dict)

    def operation(
        self,
        *,
        inputs: list[Input] | None = None,
        outputs: list[Output] | None = None,
        name: str | None = None,
        requires: dict[str, Any] | None = None,
        keeps_model: bool = False,
        deterministic: bool = False,
    ) -> Callable[[OperationFn], OperationFn]:
        """Register a function `(ctx, params) -> result dict` as an operation.
        `requires`: labels a worker must have to run it (see `csml.placement`);
        `keeps_model`: the operation keeps its model input loaded in its (per owner)
        process between jobs, and the worker announces it warm;
        `deterministic`: same inputs and params give byte-identical outputs and result in
        any process (declare it only when it is so: results of contributed workers are
        verified by comparing them)."""

        def register(func: OperationFn) -> OperationFn:
            hints = get_type_hints(func)
            params_arg = list(inspect.signature(func).parameters)[1]
            model = hints[params_arg]
            if not (isinstance(model, type) and issubclass(model, OperationParams)):
                raise TypeError(f"{func.__name__}: parameters must subclass OperationParams")
            op_name = name or func.__name__
            self.operations[op_name] = Operation(
                name=op_name,
                description=inspect.cleandoc(func.__doc__ or ""),
                params_model=model,
                inputs=list(inputs or []),
                outputs=list(outputs or []),
                func=func,
                requires=dict(requires or {}),
                keeps_model=keeps_model,
                deterministic=deterministic,
            )
            return func

        return register

    def missing_modules(self) -> list[str]:
        """Preload modules that are not installed: the app cannot run here."""
        return [m for m in self.preload if importlib.util.find_spec(m) is None]

    def manifest(self) -> AppManifest:
        return AppManifest(
            name=self.name,
            version=self.version,
            description=self.description,
            operations=[op.info() for op in self.operations.values()],
        )
