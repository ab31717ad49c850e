"""Interactive API documentation (`/docs`: Swagger UI, `/redoc`: ReDoc), off by default.

Invariants: nothing is loaded from another origin. With `CSML_API_DOCS=1` the
pages and their scripts are served by the coordinator itself: the pages from this
package (`web/docs/`), Swagger UI's and ReDoc's bundles from the copies the
`fastapi-offline` wheel ships (pinned with the rest of the install, no CDN, no
floating version). Every response carries a Content-Security-Policy that allows
scripts, connections and fonts from this origin only (styles may be inline: both
UIs inject them). Off (the default), `/docs` and `/redoc` are 404 and the OpenAPI
document stays at `/openapi.json`.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

PAGES = Path(__file__).parent / "docs"
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js")

DOCS_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; "
        "worker-src 'self' blob:; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

log = logging.getLogger("csml.web")


def vendored_assets() -> Path | None:
    """The folder of Swagger UI's and ReDoc's bundles in the installed `fastapi-offline`."""
    spec = importlib.util.find_spec("fastapi_offline")
    for location in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(location) / "static"
        if all((folder / name).is_file() for name in ASSETS):
            return folder
    return None


class _Assets(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(DOCS_HEADERS)
        return response


def _page(name: str, media_type: str) -> FileResponse:
    return FileResponse(PAGES / name, media_type=media_type, headers=DOCS_HEADERS)


def mount(app: FastAPI) -> bool:
    """Serve `/docs` and `/redoc` from local copies; False (and nothing served) without them."""
    assets = vendored_assets()
    if assets is None:
        log.warning(
            "CSML_API_DOCS is on but fastapi-offline (Swagger UI, ReDoc) is not installed: "
            "/docs and /redoc stay off; the OpenAPI document is at /openapi.json"
        )
        return False
    router = APIRouter(include_in_schema=False)

    @router.get("/docs")
    def swagger() -> FileResponse:
        return _page("swagger.html", "text/html")

    @router.get("/docs/swagger-init.js")
    def swagger_init() -> FileResponse:
        return _page("swagger-init.js", "text/javascript")

    @router.get("/redoc")
    def redoc() -> FileResponse:
        return _page("redoc.html", "text/html")

    app.include_router(router)
    app.mount("/docs/assets", _Assets(directory=assets), name="docs-assets")
    return True
