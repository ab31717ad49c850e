"""Schemathesis hooks (loaded through SCHEMATHESIS_HOOKS): besides the bodies it makes
from the schema, send oversized and deeply nested ones to every operation with a body.

A JSON body is sometimes replaced by one nested `NESTED_DEPTH` lists deep (past the
coordinator's nesting limits, within what the client's JSON encoder can write) or one
with a string of `OVERSIZED` bytes (past the JSON and spec limits); a form's `spec`
part sometimes by 100,000 `[` or `OVERSIZED` bytes. Every one must get a 4xx.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import strategies as st

NESTED_DEPTH = 400
OVERSIZED = 300 * 1024


def _nested() -> Any:
    value: Any = 0
    for _ in range(NESTED_DEPTH):
        value = [value]
    return {"nested": value}


def _hostile(body: Any) -> list[Any]:
    if isinstance(body, dict) and isinstance(body.get("spec"), str):  # a form with a spec part
        return [{**body, "spec": "[" * 100_000}, {**body, "spec": "x" * OVERSIZED}]
    if isinstance(body, dict):
        return [{**body, "pad": "x" * OVERSIZED}, {**body, **_nested()}]
    return [{"pad": "x" * OVERSIZED}, _nested()]


@schemathesis.hook
def flatmap_body(context: schemathesis.HookContext, body: Any) -> st.SearchStrategy[Any]:
    return st.sampled_from([body, body, *_hostile(body)])
