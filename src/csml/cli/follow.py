"""Waiting for a job with a live progress bar, then showing and saving its result."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from csml.cli import attest
from csml.cli.output import console, plain, show_job
from csml.client import Job


def follow(job: Job, timeout: float, output: Path | None) -> None:
    """Wait (bar: state, fraction, the job's message), print the job, save its outputs.
    Exits 1 unless the job succeeded."""
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(job.state.value, total=1.0)

        def update(_: Job) -> None:
            fraction, message = job.progress
            bar.update(task, completed=fraction, description=f"{job.state.value} {message}"[:60])

        job.wait(timeout=timeout, on_progress=update)
    show_job(attest.plain_view(job))
    for name, model_id in job.models.items():
        console.print(f"model     {name} kept as model {model_id} (see `csml models`)")
    if output is not None and job.state.value == "succeeded":
        output.mkdir(parents=True, exist_ok=True)
        for path in job.download_all(output):  # every name checked before any is written
            console.print(f"saved     {plain(path)}")
    if job.state.value != "succeeded":
        raise typer.Exit(1)
