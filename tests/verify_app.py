"""`vcheck`: a deterministic test app for verification (issue 13), in two copies that
announce the same manifest: an honest one and a lying one that returns a wrong result
(and output) one time in three. `write_app` installs a copy into a folder for PYTHONPATH
(the package and its `csml.apps` entry point, no pip needed); worker processes started
with that folder on PYTHONPATH serve it (`csml worker --app vcheck`)."""

from __future__ import annotations

from pathlib import Path

APP = "vcheck"

SOURCE = '''"""vcheck: squares a number (a verification test app)."""

from __future__ import annotations

import random
import time
from typing import Any

from pydantic import Field

from csml.apps.base import App, JobContext, OperationParams, Output

LIE_RATE = {lie_rate!r}  # this copy's; not part of the manifest
app = App("vcheck", version="1.0", description="Squares a number (verification tests).")


class SquareParams(OperationParams):
    n: int = Field(ge=0, le=10**9)
    work: float = Field(0.0, ge=0, le=10, description="CPU seconds to spend first.")


@app.operation(
    outputs=[Output("square", "n squared, as text.", "text/plain")], deterministic=True
)
def square(ctx: JobContext, params: SquareParams) -> dict[str, Any]:
    """n squared, in the result and as a file."""
    end = time.process_time() + params.work
    while time.process_time() < end:
        pass
    value = params.n * params.n
    if LIE_RATE and random.SystemRandom().random() < LIE_RATE:
        value += 1  # a wrong result, and a wrong output with it
    ctx.output("square").write_text(str(value))
    return {{"square": value}}
'''


def write_app(site: Path, *, lie_rate: float = 0.0) -> Path:
    """Write the app (lying `lie_rate` of the time) under `site`; `site` is returned."""
    package = site / "csml_vcheck"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "app.py").write_text(SOURCE.format(lie_rate=lie_rate))
    info = site / "csml_vcheck-1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: csml-vcheck\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[csml.apps]\n{APP} = csml_vcheck.app:app\n")
    return site
