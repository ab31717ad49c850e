"""Console helpers shared by the CLI commands.

Text from the coordinator or a job (names, messages, errors) goes through `plain`:
never read as Rich markup, and without control characters (no terminal escapes).
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from csml.schemas import Job

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

STATE_STYLE = {
    "queued": "yellow",
    "running": "cyan",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "magenta",
}


def plain(text: object) -> str:
    """`text` safe to print: markup escaped, control characters shown as `?`."""
    shown = "".join("?" if unicodedata.category(ch) == "Cc" else ch for ch in str(text))
    return escape(shown)


def fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {plain(message)}", highlight=False)


def jobs_table(jobs: list[Job]) -> Table:
    table = Table(box=None)
    for col in ("ID", "APP", "OPERATION", "STATE", "PROGRESS", "CREATED"):
        table.add_column(col)
    for j in jobs:
        style = STATE_STYLE.get(j.state.value, "")
        table.add_row(
            plain(j.id[:12]),
            plain(j.app),
            plain(j.operation),
            f"[{style}]{j.state.value}[/]",
            plain(f"{j.progress.fraction:4.0%} {j.progress.message}"[:40]),
            j.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    return table


def show_job(job: Job) -> None:
    style = STATE_STYLE.get(job.state.value, "")
    console.print(f"job       {plain(job.id)}")
    console.print(f"app       {plain(job.app)}.{plain(job.operation)}")
    console.print(
        f"state     [{style}]{job.state.value}[/]  (attempt {job.attempts}/{job.max_attempts})"
    )
    if job.progress.message or job.state.value == "running":
        console.print(f"progress  {job.progress.fraction:.0%} {plain(job.progress.message)}")
    if job.error:
        console.print(f"error     [red]{plain(job.error)}[/]", highlight=False)
    if job.result is not None:
        console.print("result    " + plain(json_text(job.result)))
    for name, f in job.outputs.items():
        console.print(
            f"output    {plain(name)}: {f.size} bytes, {plain(f.media_type)}, "
            f"sha256 {plain(f.sha256[:16])}…"
        )


def json_text(value: Any) -> str:
    text = json.dumps(value, indent=None)
    return text if len(text) < 400 else json.dumps(value, indent=2)
