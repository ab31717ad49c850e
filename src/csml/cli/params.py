"""Turning `key=value` words into job parameters and input files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from csml.client import CsmlError
from csml.schemas import AppInfo, OperationInfo


def parse_params(pairs: list[str], params_json: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if params_json:
        try:
            loaded = json.loads(params_json)
        except json.JSONDecodeError as exc:
            raise CsmlError(f"--params-json is not valid JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise CsmlError("--params-json must be a JSON object")
        params.update(loaded)
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise CsmlError(f"parameter {pair!r} is not of the form key=value")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


def find_operation(app: AppInfo, operation: str) -> OperationInfo:
    wanted = operation.replace("-", "_")
    for op in app.operations:
        if op.name == wanted:
            return op
    names = ", ".join(o.name.replace("_", "-") for o in app.operations)
    raise CsmlError(f"application {app.name!r} has no operation {operation!r}; it has: {names}")


def map_files(
    op: OperationInfo, words: list[str], by_id: dict[str, Any] | None = None
) -> dict[str, Path]:
    """`name=path` words go to that input; bare paths fill the inputs in declared order.
    A model input is left out when `by_id` (the params) names a stored model."""
    files: dict[str, Path] = {}
    named = bool(by_id and "model" in by_id)
    from_store = {i.name for i in op.inputs if i.model is not None and named}
    free = [i.name for i in op.inputs if i.name not in from_store]
    for word in words:
        name, sep, path = word.partition("=")
        if sep and name in free:
            files[name] = Path(path)
            free.remove(name)
    for word in words:
        name, sep, _ = word.partition("=")
        if sep and name in files:
            continue
        if not free:
            raise CsmlError(
                f"too many files: {op.name} takes {', '.join(i.name for i in op.inputs) or 'none'}"
            )
        files[free.pop(0)] = Path(word)
    for spec in op.inputs:
        if spec.required and spec.name not in files and spec.name not in from_store:
            raise CsmlError(f"{op.name} needs the input file {spec.name!r}")
    for name, file in files.items():
        if not file.is_file():
            raise CsmlError(f"input {name!r}: no such file {str(file)!r}")
    return files


def parse_requires(items: list[str]) -> dict[str, Any]:
    """`--require` options (NAME=VALUE, NAME>=NUMBER) as a requirement (checked)."""
    from csml import placement

    try:
        pairs = [placement.parse_assignment(item, minimum=True) for item in items]
        found: dict[str, Any] = {}
        for name, cond in pairs:
            found = placement.merge(found, {name: cond})
        return placement.check_requires(found)
    except placement.PlacementError as exc:
        raise CsmlError(f"--require: {exc}") from None


def parse_labels(items: list[str]) -> dict[str, Any]:
    """`--label` options (NAME=VALUE; true/false and numbers are typed) as labels."""
    from csml import placement

    try:
        return placement.check_labels(dict(placement.parse_assignment(i) for i in items))
    except placement.PlacementError as exc:
        raise CsmlError(f"--label: {exc}") from None
