"""`csml attest`: verify every worker of an app the way a confidential submission would.

Also the CLI's helpers for confidential jobs: the key store next to the user config,
the red warning for unattested workers, and the decrypted view of a job.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from csml.cli.output import console, err_console
from csml.client import Client, CsmlError
from csml.client.config import UserConfig

if TYPE_CHECKING:
    from csml.client.confidential import WorkerAssessment
    from csml.client.key_store import KeyStore
    from csml.client.sdk import Job
    from csml.schemas import Job as JobData

PolicyOpt = Annotated[
    Path | None,
    typer.Option(
        "--policy",
        help="Attestation policy (TOML). Default: policies/APP.toml next to the user config.",
        show_default=False,
    ),
]
InsecureOpt = Annotated[
    bool,
    typer.Option(
        "--insecure-allow-unattested",
        help="Also accept workers without attestation (kind none): INSECURE, their operator "
        "can read the job.",
    ),
]


def key_store() -> KeyStore:
    from csml.client.key_store import KeyStore  # (light: not `confidential`'s crypto)

    return KeyStore()


def warn_insecure(assessments: list[WorkerAssessment]) -> None:
    """The loud warning for unattested workers that were accepted."""
    for a in assessments:
        if a.accepted and a.worker.insecure:
            err_console.print(
                f"[bold red]WARNING: worker {a.worker.worker_id[:12]} has no attestation "
                "(kind none): whoever runs it can read this job. Accepted only because of "
                "--insecure-allow-unattested.[/]",
                highlight=False,
            )


def plain_view(job: Job) -> JobData:
    """The job with a confidential result and error decrypted (when this client can)."""
    if not job.confidential:
        return job.data
    try:
        return job.data.model_copy(update={"result": job.result, "error": job.error})
    except CsmlError as exc:
        err_console.print(f"[yellow]note:[/] {exc.message}", highlight=False)
        return job.data


def _wide() -> Console:
    """Measurements are long hex strings: never cut them when the output is not a terminal."""
    if console.is_terminal:
        return console
    return Console(soft_wrap=True, width=max(console.width, 320), highlight=False)


def _table(assessment: WorkerAssessment) -> Table:
    table = Table(box=None, pad_edge=False)
    table.add_column("CHECK", no_wrap=True)
    table.add_column("RESULT", no_wrap=True)
    table.add_column("EXPECTED", overflow="fold")
    table.add_column("ACTUAL", overflow="fold")
    table.add_column("DETAIL", overflow="fold")
    for c in assessment.assessment.checks:
        mark = "[green]ok[/]" if c.ok else "[bold red]FAIL[/]"
        table.add_row(c.name, mark, c.expected or "", c.actual or "", c.detail)
    return table


def attest(
    app_name: Annotated[str, typer.Argument(metavar="APP")],
    policy: PolicyOpt = None,
    insecure: InsecureOpt = False,
    url: Annotated[
        str | None,
        typer.Option("--url", envvar="CSML_URL", help="Coordinator URL.", show_default=False),
    ] = None,
) -> None:
    """Verify the attestation of every live worker of APP: each check and its outcome."""
    from csml.client.confidential import resolve_policy

    saved = UserConfig.load()
    chosen = resolve_policy(app_name, policy).unattested(insecure)
    with Client(url or saved.url, saved.token) as c:
        assessments = c.attest(app_name, chosen, insecure)
    console.print(f"policy    {chosen.source}: {chosen.describe()}", highlight=False)
    if not assessments:
        raise CsmlError(f"no live {app_name} worker has registered a key for confidential jobs")
    for a in assessments:
        w = a.worker
        if a.accepted and w.insecure:
            verdict = "[bold red]ACCEPTED INSECURELY (no attestation)[/]"
        elif a.accepted:
            verdict = "[bold green]accepted[/]"
        else:
            verdict = "[bold red]refused[/]"
        console.print(f"\nworker    {w.worker_id}  ({w.kind})  {verdict}", highlight=False)
        if w.insecure:
            console.print(
                "[bold red]INSECURE: this worker has no attestation; its operator can read "
                "the jobs sent to it.[/]",
                highlight=False,
            )
        _wide().print(_table(a))
        for failure in a.assessment.failures:
            console.print(f"[red]refused:[/] {failure.describe()}", highlight=False)
    if not any(a.accepted for a in assessments):
        raise typer.Exit(1)
