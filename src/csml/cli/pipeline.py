"""`csml pipeline`: run a chain of steps across apps as one job, and show its steps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from csml.cli.connection import UrlOpt, client
from csml.cli.follow import follow
from csml.cli.output import STATE_STYLE, console, show_job
from csml.client import CsmlError
from csml.schemas import Job

pipeline_app = typer.Typer(
    help="Pipelines: steps across apps, each step's outputs feeding the next, as one job.",
    no_args_is_help=True,
)

EXAMPLE = """{"steps": [
  {"name": "gray", "app": "opencv", "operation": "grayscale",
   "inputs": {"image": "upload:photo"}},
  {"name": "faces", "app": "dlib", "operation": "detect_faces",
   "inputs": {"image": "gray.gray"}}]}"""


def load_spec(path: Path) -> dict[str, Any]:
    """A pipeline file: `{"steps": [...], "limits"?: {...}}`, or just the list of steps."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise CsmlError(f"cannot read {str(path)!r}: {exc.strerror}") from None
    except ValueError as exc:
        raise CsmlError(f"{str(path)!r} is not JSON: {exc}") from None
    if isinstance(data, list):
        data = {"steps": data}
    if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
        raise CsmlError(f"{str(path)!r} has no list of steps; it should look like:\n{EXAMPLE}")
    return data


def parse_files(words: list[str]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for word in words:
        name, sep, path = word.partition("=")
        if not sep or not name or not path:
            raise CsmlError(f"--file {word!r}: give NAME=PATH, NAME as in 'upload:NAME'")
        if not Path(path).is_file():
            raise CsmlError(f"--file {name}: no such file {path!r}")
        files[name] = Path(path)
    return files


def steps_table(job: Job) -> Table:
    table = Table(box=None)
    for col in ("#", "STEP", "APP.OPERATION", "STATE", "JOB", "ERROR"):
        table.add_column(col)
    for i, s in enumerate(job.steps or [], start=1):
        style = STATE_STYLE.get(s.state, "dim")
        table.add_row(
            str(i),
            s.name,
            f"{s.app}.{s.operation}",
            f"[{style}]{s.state}[/]",
            (s.job_id or "-")[:12],
            (s.error or "")[:60],
        )
    return table


@pipeline_app.command("run")
def run(
    spec_file: Annotated[Path, typer.Argument(metavar="PIPELINE.json")],
    file: Annotated[
        list[str] | None,
        typer.Option("--file", "-f", help="An upload NAME=PATH, read by steps as upload:NAME."),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", "-w", help="Wait for the result.")] = False,
    timeout: Annotated[float, typer.Option(help="Most seconds to wait.")] = 3600,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Download every step's outputs to this folder."),
    ] = None,
    url: UrlOpt = None,
) -> None:
    """Submit a pipeline; with --wait, show its progress, its steps and the result."""
    spec = load_spec(spec_file)
    files = parse_files(file or [])
    with client(url) as c:
        job = c.submit_pipeline(spec["steps"], files=dict(files), limits=spec.get("limits"))
        console.print(f"submitted {job.id}")
        if not (wait or output):
            return
        try:
            follow(job, timeout, output)
        finally:
            console.print(steps_table(job.data))


@pipeline_app.command("status")
def status(job_id: Annotated[str, typer.Argument(metavar="ID")], url: UrlOpt = None) -> None:
    """Show a pipeline and each of its steps."""
    with client(url) as c:
        job = c.job(job_id)
    show_job(job.data)
    if job.data.steps is None:
        raise CsmlError(f"job {job.id[:12]} is not a pipeline; see `csml status {job.id[:12]}`")
    console.print(steps_table(job.data))
