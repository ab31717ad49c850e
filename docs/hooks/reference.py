"""MkDocs hook: the reference pages generated from the code at build time.

- `reference/rest-api.md`: the coordinator's OpenAPI document, rendered to Markdown by
  essentials-openapi (no script, nothing loaded from another site when the page is read);
  the document itself is published as `reference/openapi.json`.
- `reference/cli.md`: every `csml` command and option, from the Typer application.
- the `<!-- csml:settings -->` marker in a page becomes the table of the coordinator's
  `CSML_*` settings (name, default, description), from `csml.coordinator.config.Settings`.

The app is built by the real factory (`create_app`) on a SQLite store in a temporary
folder, with settings given explicitly, so the build reads no `CSML_*` variable that
would change the document and touches no data of the person building.
"""

from __future__ import annotations

import json
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import typer
import typer.main
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page
from openapidocs.mk.v3 import OpenAPIV3DocumentationHandler  # type: ignore[import-untyped]
from pydantic_core import PydanticUndefined
from typer.cli import get_docs_for_click

SETTINGS_MARKER = "<!-- csml:settings -->"


@cache
def openapi_document() -> dict[str, Any]:
    from csml.coordinator.app import create_app
    from csml.coordinator.config import Settings

    with tempfile.TemporaryDirectory(prefix="csml-docs-") as folder:
        settings = Settings(
            data_dir=Path(folder),
            database_url=None,
            database_url_file=None,
            bootstrap_join_token_file=None,
        )
        app = create_app(settings)
        try:
            return app.openapi()
        finally:
            app.state.core.engine.dispose()


def rest_api_page() -> str:
    document = openapi_document()
    body: str = OpenAPIV3DocumentationHandler(document, style="MKDOCS").write()
    # Drop the generator's comment, title and description: this page has its own.
    body = body[body.index("<hr />") :] if "<hr />" in body else body
    head = (
        "# REST API reference\n\n"
        f"API version {document['info']['version']}, generated from the coordinator's "
        "OpenAPI document when this site was built (`create_app().openapi()`); the "
        "document itself: [openapi.json](openapi.json). A running coordinator serves the "
        "same at `/openapi.json`. The worker protocol (`/v1/workers/...`) is listed too; "
        "clients never call it. A guided tour: [REST API](../user-guide/rest-api.md).\n\n"
    )
    return head + body


def cli_page() -> str:
    from csml.cli.main import app

    command = typer.main.get_command(app)
    body = get_docs_for_click(
        obj=command, ctx=typer.Context(command), name="csml", title="CLI reference"
    )
    return (
        body.replace(
            "\n\n",
            "\n\nGenerated from the `csml` command itself when this site was built. "
            "Every command also answers `--help`.\n\n",
            1,
        )
        + "\n"
    )


# What the settings without a `description` in `Settings` mean (read from where they are
# used). A description given in `Settings` wins over these.
FALLBACK_DESCRIPTIONS = {
    "data_dir": "SQLite database (unless `CSML_DATABASE_URL`) and job files.",
    "retry_after_seconds": "`Retry-After` of a full queue, and of the active-jobs and model "
    "limits, which have no fixed reset time.",
    "lease_seconds": "How long a claimed job stays a worker's without a heartbeat.",
    "heartbeat_seconds": "How often workers are told to heartbeat.",
    "reap_interval_seconds": "How often expired leases are looked for.",
    "max_attempts": "Runs of a job (first one included) before a lost lease fails it.",
    "job_timeout_seconds": "Wall-clock limit of one job (the largest a submission may ask).",
    "job_memory_mb": "Memory a job may allocate beyond the runtime (`RLIMIT_AS`).",
    "job_cpu_seconds": "CPU time of one job (`RLIMIT_CPU`).",
    "max_wait_seconds": "Longest long-poll of `GET /v1/jobs/{id}?wait=`.",
    "identity_rate_window_seconds": (
        "The window over which the rate of new identities is estimated "
        "(`CSML_IDENTITY_RATE_LIMIT` per window: past it, the proof of work gets harder)."
    ),
    "submission_rate_window_seconds": "The window of `CSML_SUBMISSION_RATE_LIMIT`.",
}


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "the user data folder" if isinstance(value, Path) else f"`{json.dumps(value)}`"
    if field.default is None or field.default is PydanticUndefined:
        return "unset"
    return f"`{field.default}`"


def settings_table() -> str:
    from csml.coordinator.config import Settings

    rows = ["| variable | default | what |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        what = (field.description or FALLBACK_DESCRIPTIONS.get(name, "")).replace("|", "\\|")
        rows.append(f"| `CSML_{name.upper()}` | {_default(field)} | {what} |")
    return "\n".join(rows) + "\n"


def on_files(files: Files, config: MkDocsConfig) -> Files:
    files.append(File.generated(config, "reference/rest-api.md", content=rest_api_page()))
    files.append(File.generated(config, "reference/cli.md", content=cli_page()))
    document = json.dumps(openapi_document(), indent=2) + "\n"
    files.append(File.generated(config, "reference/openapi.json", content=document))
    return files


def on_page_markdown(markdown: str, page: Page, **_: Any) -> str:
    if SETTINGS_MARKER in markdown:
        return markdown.replace(SETTINGS_MARKER, settings_table())
    return markdown
