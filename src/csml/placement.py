"""Placement: worker labels, job requirements and the models a worker holds warm.

Pure functions (no I/O), shared by the schemas, the coordinator and the worker.

Labels. A worker announces at registration a dict of labels, name -> value:
  - at most `MAX_LABELS` of them; a name matches `NAME_PATTERN` (lowercase letter,
    then lowercase letters, digits, `_`; at most 40 characters);
  - a value is a boolean, a finite number (int or float, at most 2**53 in magnitude)
    or a string of at most `MAX_TEXT` characters.

Requirements (`OperationInfo.requires`, `JobSpec.requires`). A dict of label name ->
condition, at most `MAX_REQUIRES` conditions, names as for labels. A condition is:
  - a boolean, number or string: *equality*. The worker has a label of that name and
    it is equal: strings exactly (case matters), booleans only to booleans, numbers
    numerically (`16` equals `16.0`; a boolean is never a number);
  - `{"min": n}` with n a finite number: a *minimum*. The worker has a label of that
    name that is a number (not a boolean) and it is >= n.
A worker without the label never meets a condition on it. A worker meets a
requirement when it meets every condition (an empty requirement: every worker).

A job's effective requirement is its operation's `requires` and its own together
(`merge`): both must hold. On a name in both: two equalities must be equal; two
minima give the larger one; an equality and a minimum keep the equality if its value
is a number >= the minimum; anything else can never be met and is refused.

The canonical form (`canonical`) is JSON with sorted names, no spaces, integral
floats written as integers; `key_of` is its SHA-256 (hex): the job's `requires_key`
(None: no requirement). Equal requirements have equal keys.

Warm models. A worker keeps a network loaded only in the process of the owner whose
job loaded it (processes are per owner, never shared), so a model is warm for one
owner: `warm_key(owner_key, model_sha256)` names the pair, and a claim carries the
warm keys the worker holds (`ClaimRequest.warm_models`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

NAME_PATTERN = r"^[a-z][a-z0-9_]{0,39}$"
MAX_LABELS = 32
MAX_REQUIRES = 16
MAX_TEXT = 100
MAX_WARM = 64
SHA256_PATTERN = r"^[0-9a-f]{64}$"

Scalar = bool | int | float | str
_NAME = re.compile(NAME_PATTERN)


class PlacementError(ValueError):
    """A label or requirement that breaks the rules; `name` is the offending entry."""

    def __init__(self, message: str, name: str = "") -> None:
        super().__init__(message)
        self.name = name


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


MAX_NUMBER = 2**53
"""Numbers are at most this in magnitude (exact as JSON numbers everywhere)."""


def _number(value: Any, where: str, name: str) -> int | float:
    if not _is_number(value):
        raise PlacementError(f"{where}: must be a finite number", name)
    if isinstance(value, int):
        if abs(value) > MAX_NUMBER:
            raise PlacementError(f"{where}: at most 2**53 in magnitude", name)
        return value
    if not math.isfinite(value):
        raise PlacementError(f"{where}: must be a finite number", name)
    if abs(value) > MAX_NUMBER:
        raise PlacementError(f"{where}: at most 2**53 in magnitude", name)
    return int(value) if value.is_integer() else float(value)


def _scalar(value: Any, where: str, name: str) -> Scalar:
    if isinstance(value, bool):
        return value
    if _is_number(value):
        return _number(value, where, name)
    if isinstance(value, str):
        if len(value) > MAX_TEXT:
            raise PlacementError(f"{where}: at most {MAX_TEXT} characters", name)
        return value
    raise PlacementError(f"{where}: must be a boolean, a number or a string", name)


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise PlacementError(
            f"{what} name {name!r}: lowercase letters, digits and _, starting with a letter, "
            "at most 40 characters",
            str(name),
        )
    return name


def check_labels(labels: Mapping[str, Any]) -> dict[str, Scalar]:
    """The labels, normalised (integral floats as ints); PlacementError if not valid."""
    if len(labels) > MAX_LABELS:
        raise PlacementError(f"at most {MAX_LABELS} labels")
    out: dict[str, Scalar] = {}
    for name, value in labels.items():
        _check_name(name, "label")
        out[name] = _scalar(value, f"label {name!r}", name)
    return out


def check_requires(requires: Mapping[str, Any]) -> dict[str, Any]:
    """The requirement, normalised; PlacementError (naming the condition) if not valid."""
    if len(requires) > MAX_REQUIRES:
        raise PlacementError(f"at most {MAX_REQUIRES} conditions")
    out: dict[str, Any] = {}
    for name, cond in requires.items():
        _check_name(name, "requirement")
        where = f"requirement {name!r}"
        if isinstance(cond, Mapping):
            if set(cond) != {"min"}:
                raise PlacementError(
                    f'{where}: an object condition is {{"min": <number>}} only', name
                )
            out[name] = {"min": _number(cond["min"], f"{where} min", name)}
        else:
            out[name] = _scalar(cond, where, name)
    return out


def _equal(a: Scalar, b: Scalar) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_number(a) and _is_number(b):
        return a == b
    return isinstance(a, str) and isinstance(b, str) and a == b


def merge(first: Mapping[str, Any], second: Mapping[str, Any]) -> dict[str, Any]:
    """Both requirements at once (see the module docstring); PlacementError when no
    worker could ever meet them, naming the condition."""
    out = dict(first)
    for name, cond in second.items():
        if name not in out:
            out[name] = cond
            continue
        have = out[name]
        a_min, b_min = isinstance(have, Mapping), isinstance(cond, Mapping)
        if a_min and b_min:
            out[name] = {"min": max(have["min"], cond["min"])}
        elif not a_min and not b_min:
            if not _equal(have, cond):
                raise PlacementError(
                    f"requirement {name!r}: {_show(cond)} contradicts the operation's "
                    f"{_show(have)}",
                    name,
                )
        else:
            equal, minimum = (cond, have) if a_min else (have, cond)
            if not (_is_number(equal) and equal >= minimum["min"]):
                raise PlacementError(
                    f"requirement {name!r}: {_describe_one(name, equal)} and "
                    f"{_describe_one(name, minimum)} can never both hold",
                    name,
                )
            out[name] = equal
    if len(out) > MAX_REQUIRES:
        raise PlacementError(f"at most {MAX_REQUIRES} conditions, the operation's included")
    return out


def canonical(requires: Mapping[str, Any]) -> str:
    return json.dumps(dict(sorted(requires.items())), sort_keys=True, separators=(",", ":"))


def key_of(requires: Mapping[str, Any]) -> str | None:
    """The requirement's key (SHA-256 of its canonical form); None when empty."""
    if not requires:
        return None
    return hashlib.sha256(canonical(requires).encode()).hexdigest()


def meets_one(labels: Mapping[str, Any], name: str, cond: Any) -> bool:
    if name not in labels:
        return False
    have = labels[name]
    if isinstance(cond, Mapping):
        return _is_number(have) and have >= cond["min"]
    return _equal(have, cond)


def meets(labels: Mapping[str, Any], requires: Mapping[str, Any]) -> bool:
    """Whether a worker with `labels` meets every condition of `requires`."""
    return all(meets_one(labels, name, cond) for name, cond in requires.items())


def _show(value: Any) -> str:
    return json.dumps(value)


def _describe_one(name: str, cond: Any) -> str:
    if isinstance(cond, Mapping):
        return f"{name}>={_show(cond['min'])}"
    return f"{name}={_show(cond) if not isinstance(cond, str) else cond}"


def describe(requires: Mapping[str, Any]) -> str:
    """`gpu=true, gpu_memory_gb>=16` (sorted by name)."""
    return ", ".join(_describe_one(n, c) for n, c in sorted(requires.items()))


def unmet(requires: Mapping[str, Any], workers: Iterable[Mapping[str, Any]]) -> str:
    """Why none of `workers` (their labels) meets `requires`: the conditions no worker
    meets, or, if each is met by some worker, that none meets them all. "" if one does."""
    labels = list(workers)
    if any(meets(w, requires) for w in labels):
        return ""
    alone = {n: c for n, c in requires.items() if not any(meets_one(w, n, c) for w in labels)}
    if alone:
        return f"no live worker has {describe(alone)}"
    return f"no live worker has all of {describe(requires)}"


def parse_value(text: str) -> Scalar:
    """A label or condition value from the command line: `true`/`false`, a number, or
    else the text itself (a JSON string in quotes stays a string: `"16"`)."""
    if text in ("true", "false"):
        return text == "true"
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, bool | int | float | str):
        return value
    return text


def parse_assignment(text: str, *, minimum: bool = False) -> tuple[str, Any]:
    """`name=value` (and with `minimum`, `name>=number`) -> (name, condition)."""
    if minimum and ">=" in text:
        name, _, raw = text.partition(">=")
        value = parse_value(raw.strip())
        if not _is_number(value):
            raise PlacementError(f"{text!r}: a minimum needs a number", name.strip())
        return name.strip(), {"min": value}
    if "=" not in text:
        form = "NAME=VALUE or NAME>=NUMBER" if minimum else "NAME=VALUE"
        raise PlacementError(f"{text!r}: expected {form}")
    name, _, raw = text.partition("=")
    return name.strip(), parse_value(raw.strip())


def warm_key(owner_key: str, model_sha256: str) -> str:
    """What a worker announces for a model loaded in the process of one owner."""
    return hashlib.sha256(f"csml warm\0{owner_key}\0{model_sha256}".encode()).hexdigest()
