"""Serves the web pages and their assets (package data, no build step).

Every response carries a strict Content-Security-Policy: scripts, styles and
connections only from this origin, no inline script, images also from `blob:`
(outputs fetched with the token) and `data:`.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from csml.coordinator.errors import ApiError

STATIC = Path(__file__).parent / "static"

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "connect-src 'self'; worker-src 'self'; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class _Assets(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


router = APIRouter(include_in_schema=False)


def _page(name: str) -> FileResponse:
    path = STATIC / name
    if not path.is_file():
        raise ApiError(404, "not_found", f"the web page {name} is not installed with this csml")
    return FileResponse(path, media_type="text/html", headers=SECURITY_HEADERS)


@router.api_route("/", methods=["GET", "HEAD"])
def user_page() -> FileResponse:
    return _page("index.html")


@router.api_route("/operator", methods=["GET", "HEAD"])
def operator_page() -> FileResponse:
    return _page("operator.html")


@router.get("/favicon.ico")
def favicon() -> RedirectResponse:
    return RedirectResponse("/static/icon.svg", status_code=308)


def mount(app: FastAPI) -> None:
    """Add the pages (`/`, `/operator`) and their assets (`/static/...`)."""
    app.include_router(router)
    # check_dir=False: a csml built without its page still serves the API.
    app.mount("/static", _Assets(directory=STATIC, check_dir=False), name="static")
