"""Limits on a submitted job spec, checked before anything else parses it.

Invariants:
- A spec is at most `max_spec_bytes` (`TooLarge` `spec_too_large`).
- It is parsed once here by a parser with a fixed recursion limit, so no
  nesting reaches Python's recursion limit later: nesting past that limit, or
  past `max_params_depth` inside params (a few levels more elsewhere), is a
  `Malformed` `too_deeply_nested` naming where.
- Numbers are finite: `NaN` and `Infinity` (which JSON does not have, but
  Python's parsers accept) are `Invalid` `invalid_number` naming the field, so
  they never reach the params' numeric bounds (every comparison with NaN is false).
- Params (every step's, for a pipeline) are at most `max_params_bytes` as
  compact JSON (`TooLarge` `params_too_large`); `kept_bytes` is what the job keeps of
  them (empty params: nothing), charged to the identity's stored bytes at
  submission, as `abuse.stored_bytes` counts the params of kept jobs.
- Refusals are `csml.refusals` kinds (the API maps them to 413, 400, 422).
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import pydantic_core
from pydantic import ValidationError

from csml.refusals import Invalid, Malformed, TooLarge

if TYPE_CHECKING:
    from csml.coordinator.config import Settings

# Levels of a spec above a step's params: {"steps": [{"params": ...}]}.
SPEC_LEVELS = 3


def load(raw: bytes, settings: Settings) -> Any:
    """The parsed spec, within its limits (see the module docstring)."""
    return load_kept(raw, settings)[0]


def load_kept(raw: bytes, settings: Settings) -> tuple[Any, int]:
    """`load`, with the spec's `kept_bytes` (counted once, for its limit and its caller)."""
    if len(raw) > settings.max_spec_bytes:
        raise TooLarge(
            "spec_too_large",
            f"the spec is over {settings.max_spec_bytes} bytes (CSML_MAX_SPEC_BYTES); "
            "send files as form parts, not inside params",
            field="spec",
        )
    try:
        data = pydantic_core.from_json(raw, allow_inf_nan=True)
    except ValueError as exc:
        if "recursion limit" in str(exc):
            raise too_deep("spec", settings.max_params_depth) from None
        raise Invalid("invalid_spec", f"spec is not valid JSON: {exc}", field="spec") from None
    check_tree(data, "spec", settings.max_params_depth + SPEC_LEVELS, settings.max_params_depth)
    for where, params in params_of(data):
        check_tree(params, where, settings.max_params_depth, settings.max_params_depth)
    size = kept_bytes(data)
    if size > settings.max_params_bytes:
        raise TooLarge(
            "params_too_large",
            f"spec.params: {size} bytes of params, over the limit of {settings.max_params_bytes} "
            "(CSML_MAX_PARAMS_BYTES); send data as input files",
            field="spec.params",
        )
    return data, size


def params_of(data: Any) -> list[tuple[str, Any]]:
    """Each params object of a spec (a job's, or every step's of a pipeline), with its field."""
    if not isinstance(data, dict):
        return []
    found: list[tuple[str, Any]] = []
    if "params" in data:
        found.append(("spec.params", data["params"]))
    steps = data.get("steps")
    if isinstance(steps, list):
        for i, step in enumerate(steps):
            if isinstance(step, dict) and "params" in step:
                found.append((f"spec.steps.{i}.params", step["params"]))
    return found


def kept_bytes(data: Any) -> int:
    """Bytes of params a job keeps in the store: params as compact JSON, plus a
    confidential job's encrypted params."""
    size = sum(
        len(json.dumps(p, separators=(",", ":"), ensure_ascii=False).encode())
        for _, p in params_of(data)
        if p  # empty params keep nothing
    )
    if isinstance(data, dict) and isinstance(data.get("confidential"), dict):
        sealed = data["confidential"].get("encrypted_params")
        if isinstance(sealed, str):
            size += len(sealed)
    return size


def too_deep(where: str, limit: int) -> Malformed:
    return Malformed(
        "too_deeply_nested",
        f"{where}: lists and objects are nested too deeply (params may nest "
        f"{limit} levels, CSML_MAX_PARAMS_DEPTH)",
        field=where,
    )


def check_tree(value: Any, where: str, depth_limit: int, params_limit: int) -> None:
    """Refuse nesting deeper than `depth_limit` and non-finite numbers under `value`."""
    stack: list[tuple[Any, str, int]] = [(value, where, 1)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, float) and not math.isfinite(node):
            raise Invalid(
                "invalid_number",
                f"{path}: {node} is not a number this service accepts; send a finite number",
                field=path,
            )
        if isinstance(node, dict):
            children: Any = node.items()
        elif isinstance(node, list):
            children = enumerate(node)
        else:
            continue
        if depth > depth_limit:
            raise too_deep(path, params_limit)
        stack.extend((child, f"{path}.{key}", depth + 1) for key, child in children)


def invalid_spec(exc: ValidationError) -> Invalid:
    """A submitted `spec` that does not validate: `invalid_spec` naming its first bad field."""
    err = exc.errors()[0]
    if err["type"] == "json_invalid":
        return Invalid("invalid_spec", f"spec is not valid JSON: {err['msg']}", field="spec")
    loc = ".".join(str(p) for p in err["loc"])
    field = f"spec.{loc}" if loc else "spec"
    return Invalid("invalid_spec", f"{field}: {err['msg']}", field=field)
