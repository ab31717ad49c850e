"""Applications: named sets of typed operations. No HTTP, no SQL here.

An app author writes::

    app = App("myapp", version="1.0", description="...")

    class Params(OperationParams):
        threshold: float = 0.5

    @app.operation(inputs=[Input("image", media_type="image/*")],
                   outputs=[Output("annotated", media_type="image/png")])
    def detect(ctx: JobContext, params: Params) -> dict[str, Any]:
        ...

and registers it under the entry-point group ``csml.apps``.
"""

from csml.apps.base import (
    App,
    Input,
    JobContext,
    JobError,
    Operation,
    OperationParams,
    Output,
)
from csml.apps.registry import installed_apps, load_app

__all__ = [
    "App",
    "Input",
    "JobContext",
    "JobError",
    "Operation",
    "OperationParams",
    "Output",
    "installed_apps",
    "load_app",
]
