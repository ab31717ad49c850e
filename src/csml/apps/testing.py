"""Run an app's operation in this process, as a worker would, for the app's own tests.

No coordinator, worker or sandbox: inputs are checked against the operation's declared
files (as the coordinator does), copied under the name of the input they are (as a
worker downloads them), the parameters are validated by the operation's model, the result
must travel as JSON, and only declared output files come back (as a worker uploads them).
Errors the app raises (`JobError`, pydantic's `ValidationError`) are raised unchanged.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csml.apps.base import App, JobContext, OperationParams

InputData = Path | str | bytes
"""An input file: a path to copy (`Path` or `str`), or its contents (`bytes`)."""


@dataclass
class OperationRun:
    """What a job of the operation would have given its user."""

    result: dict[str, Any]
    """The result, after a JSON round trip (what a client receives)."""
    outputs: dict[str, Path]
    """Each declared output the operation wrote, by name."""
    progress: list[tuple[float, str]] = field(default_factory=list)
    """Every `ctx.progress(fraction, message)` report, in order."""
    workdir: Path = Path()

    def output(self, name: str) -> Path:
        try:
            return self.outputs[name]
        except KeyError:
            written = ", ".join(sorted(self.outputs)) or "none"
            raise KeyError(f"the operation wrote no output {name!r} (written: {written})") from None


def run_operation(
    app: App,
    operation: str,
    params: Mapping[str, Any] | OperationParams | None = None,
    inputs: Mapping[str, InputData] | None = None,
    workdir: Path | None = None,
) -> OperationRun:
    """Run `app`'s `operation` with `params` on `inputs` in `workdir` (by default a temporary
    folder, removed when the interpreter exits, so outputs stay readable until then).

    ValueError for an unknown operation or input, a missing required input, a result that
    is not JSON, or a file written outside the declared outputs (a worker would drop it).
    """
    if operation not in app.operations:
        known = ", ".join(sorted(app.operations)) or "none"
        raise ValueError(f"app {app.name!r} has no operation {operation!r}; it has: {known}")
    op = app.operations[operation]
    given = dict(inputs or {})
    declared = {i.name for i in op.inputs}
    for extra in sorted(set(given) - declared):
        raise ValueError(
            f"operation {operation!r} takes no input file {extra!r}; "
            f"it takes: {', '.join(sorted(declared)) or 'none'}"
        )
    for spec in op.inputs:
        if spec.required and spec.name not in given:
            raise ValueError(f"operation {operation!r} needs the input file {spec.name!r}")

    root = workdir if workdir is not None else _temporary_folder(app.name)
    inputs_dir, outputs_dir, scratch = root / "inputs", root / "outputs", root / "tmp"
    for folder in (inputs_dir, outputs_dir, scratch):
        folder.mkdir(parents=True, exist_ok=False)
    paths = {name: _place(data, inputs_dir / name) for name, data in given.items()}

    progress: list[tuple[float, str]] = []
    ctx = JobContext(
        paths, outputs_dir, progress=lambda f, m: progress.append((f, m)), scratch=scratch
    )
    raw = params.model_dump() if isinstance(params, OperationParams) else dict(params or {})
    result = op.run(ctx, raw)
    try:
        result = json.loads(json.dumps(result))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the result of {operation!r} is not JSON: {exc}") from None

    declared_out = {o.name for o in op.outputs}
    written = {p.name: p for p in sorted(outputs_dir.iterdir())}
    stray = sorted(n for n, p in written.items() if n not in declared_out or not p.is_file())
    if stray:
        raise ValueError(
            f"operation {operation!r} wrote {', '.join(stray)} besides its declared outputs "
            f"({', '.join(sorted(declared_out)) or 'none'}); a worker would not return them"
        )
    return OperationRun(result, written, progress, root)


def _temporary_folder(app_name: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=f"csml-{app_name}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _place(data: InputData, dest: Path) -> Path:
    if isinstance(data, bytes):
        dest.write_bytes(data)
    else:
        shutil.copyfile(data, dest)
    return dest
