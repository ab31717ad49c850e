"""`csml.apps.testing.run_operation` holds an app to what a worker and the coordinator do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import Field, ValidationError

from csml.apps import App, Input, JobContext, JobError, OperationParams, Output
from csml.apps.testing import run_operation

app = App("tester", version="1.0")


class Params(OperationParams):
    times: int = Field(1, ge=1, le=10)
    stray: bool = False
    tuple_result: bool = False
    set_result: bool = False


@app.operation(
    inputs=[Input("data"), Input("extra", required=False)],
    outputs=[Output("copy"), Output("never")],
)
def repeat(ctx: JobContext, params: Params) -> dict[str, Any]:
    data = ctx.input("data").read_bytes()
    if not data:
        raise JobError("input 'data' is empty")
    for i in range(params.times):
        ctx.progress((i + 1) / params.times, f"copy {i + 1}")
    ctx.output("copy").write_bytes(data * params.times)
    if params.stray:
        ctx.output("notes.txt").write_text("not declared")
    if params.set_result:
        return {"names": {ctx.input("data").name}}
    return {
        "size": len(data) * params.times,
        "input_name": ctx.input("data").name,
        "has_extra": ctx.has_input("extra"),
        "pair": (1, 2) if params.tuple_result else [1, 2],
    }


def test_runs_like_a_worker(tmp_path: Path) -> None:
    source = tmp_path / "any-name.bin"
    source.write_bytes(b"ab")
    run = run_operation(app, "repeat", Params(times=3, tuple_result=True), {"data": source})
    # Inputs arrive under their input's name; the result went through JSON.
    assert run.result == {"size": 6, "input_name": "data", "has_extra": False, "pair": [1, 2]}
    assert run.output("copy").read_bytes() == b"ababab"
    assert set(run.outputs) == {"copy"}
    assert run.progress == [(1 / 3, "copy 1"), (2 / 3, "copy 2"), (1.0, "copy 3")]
    with pytest.raises(KeyError, match="wrote no output 'never'"):
        run.output("never")
    again = run_operation(app, "repeat", {}, {"data": b"x", "extra": b"y"}, tmp_path / "w")
    assert again.result["has_extra"] and again.workdir == tmp_path / "w"


def test_refuses_what_the_coordinator_or_worker_would(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no operation 'repeats'; it has: repeat"):
        run_operation(app, "repeats", {}, {"data": b"x"})
    with pytest.raises(ValueError, match="takes no input file 'date'"):
        run_operation(app, "repeat", {}, {"data": b"x", "date": b"x"})
    with pytest.raises(ValueError, match="needs the input file 'data'"):
        run_operation(app, "repeat", {}, {"extra": b"x"})
    with pytest.raises(ValueError, match=r"wrote notes\.txt besides its declared outputs"):
        run_operation(app, "repeat", {"stray": True}, {"data": b"x"})
    with pytest.raises(ValueError, match="result of 'repeat' is not JSON"):
        run_operation(app, "repeat", {"set_result": True}, {"data": b"x"})
    with pytest.raises(ValidationError):
        run_operation(app, "repeat", {"times": 11}, {"data": b"x"})
    with pytest.raises(ValidationError):
        run_operation(app, "repeat", {"colour": "red"}, {"data": b"x"})
    with pytest.raises(JobError, match="is empty"):
        run_operation(app, "repeat", {}, {"data": b""})
