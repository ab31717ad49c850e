"""Console helpers shared by the CLI commands."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
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


def fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)


def jobs_table(jobs: list[Job]) -> Table:
    table = Table(box=None)
    for col in ("ID", "APP", "OPERATION", "STATE", "PROGRESS", "CREATED"):
        table.add_column(col)
    for j in jobs:
        style = STATE_STYLE.get(j.state.value, "")
        table.add_row(
            j.id[:12],
            j.app,
            j.operation,
            f"[{style}]{j.state.value}[/]",
            f"{j.progress.fraction:4.0%} {j.progress.message}"[:40],
            j.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    return table


def show_job(job: Job) -> None:
    style = STATE_STYLE.get(job.state.value, "")
    console.print(f"job       {job.id}")
    console.print(f"app       {job.app}.{job.operation}")
    console.print(
        f"state     [{style}]{job.state.value}[/]  (attempt {job.attempts}/{job.max_attempts})"
    )
    if job.progress.message or job.state.value == "running":
        console.print(f"progress  {job.progress.fraction:.0%} {job.progress.message}")
    if job.error:
        console.print(f"error     [red]{job.error}[/]", highlight=False)
    if job.result is not None:
        console.print("result    " + json_text(job.result))
    for name, f in job.outputs.items():
        console.print(f"output    {name}: {f.size} bytes, {f.media_type}, sha256 {f.sha256[:16]}…")


def json_text(value: Any) -> str:
    text = json.dumps(value, indent=None)
    return text if len(text) < 400 else json.dumps(value, indent=2)
