"""The app model: operations with a pydantic parameter model and declared files."""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from pydantic import BaseModel, ConfigDict

from csml.schemas.apps import AppManifest, FileSpec, OperationInfo


class OperationParams(BaseModel):
    """Base of every parameter model: unknown parameters are an error, not ignored."""

    model_config = ConfigDict(extra="forbid")


class JobError(Exception):
    """A failure the user can act on (bad input, impossible request); its text is shown."""


@dataclass(frozen=True)
class Input:
    name: str
    description: str = ""
    media_type: str = "application/octet-stream"
    required: bool = True

    def spec(self) -> FileSpec:
        return FileSpec(
            name=self.name,
            description=self.description,
            media_type=self.media_type,
            required=self.required,
        )


@dataclass(frozen=True)
class Output:
    name: str
    description: str = ""
    media_type: str = "application/octet-stream"

    def spec(self) -> FileSpec:
        return FileSpec(
            name=self.name, description=self.description, media_type=self.media_type, required=False
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

    def info(self) -> OperationInfo:
        return OperationInfo(
            name=self.name,
            description=self.description,
            params_schema=self.params_model.model_json_schema(),
            inputs=[i.spec() for i in self.inputs],
            outputs=[o.spec() for o in self.outputs],
        )

    def run(self, ctx: JobContext, params: dict[str, Any]) -> dict[str, Any]:
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
    ) -> Callable[[OperationFn], OperationFn]:
        """Register a function `(ctx, params) -> result dict` as an operation."""

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
