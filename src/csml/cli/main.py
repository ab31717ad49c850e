"""`csml`: run the platform, join it, submit jobs and fetch results."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from csml import placement
from csml.cli import (
    attest,
    batch,
    contribute,
    credit,
    demo,
    models,
    operator,
    pipeline,
    scaffold,
)
from csml.cli.connection import UrlOpt, client
from csml.cli.follow import follow
from csml.cli.output import console, fail, jobs_table, plain, show_job
from csml.cli.params import find_operation, map_files, parse_params, parse_requires
from csml.client import Client, CsmlError
from csml.client.config import UserConfig, config_path
from csml.transport import TransportError

app = typer.Typer(
    help="CSML: collaborative and secure machine learning.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
id_app = typer.Typer(help="Your anonymous identity.", no_args_is_help=True)
app.add_typer(id_app, name="id")
app.add_typer(operator.join_token_app, name="join-token")
app.command("up")(operator.up)
app.command("server")(operator.server)
app.command("worker")(operator.worker)
app.command("demo")(demo.demo)
app.command("attest")(attest.attest)
app.add_typer(scaffold.app_cli, name="app")
app.add_typer(models.models_app, name="models")
app.command("train")(models.train)
app.command("predict")(models.predict)
app.add_typer(pipeline.pipeline_app, name="pipeline")
app.command("batch")(batch.batch)
app.command("contribute")(contribute.contribute)
app.command("credit")(credit.credit)
app.add_typer(contribute.operator_app, name="operator")
apps_app = typer.Typer(
    help="Applications: list them (no command), or set an app's rules.",
    invoke_without_command=True,
)
app.add_typer(apps_app, name="apps")
apps_app.command("contribution")(contribute.apps_contribution)


@id_app.command("new")
def id_new(url: UrlOpt = None) -> None:
    """Create an anonymous identity and save it (mode 0600) for later commands."""
    saved = UserConfig.load()
    with (
        Client(url or saved.url, token="") as c,
        console.status("solving the proof-of-work challenge for a new identity…"),
    ):
        created = c.create_identity()
    path = UserConfig(url=c.url, id=created.id, token=created.token).save()
    console.print(f"identity  {created.id}")
    console.print(f"saved to  {path} (keep it: the token cannot be recovered)")


@id_app.command("delete")
def id_delete(
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    url: UrlOpt = None,
) -> None:
    """Erase your identity with all its jobs and files, then the saved config."""
    saved = UserConfig.load()
    path = config_path()
    if not saved.token:
        raise CsmlError(f"no identity saved in {path}; nothing to delete")
    if not yes:
        typer.confirm(
            f"Erase identity {(saved.id or '?')[:12]} with all its jobs and files? "
            "This cannot be undone.",
            abort=True,
        )
    with Client(url or saved.url, saved.token) as c:
        c.delete_identity()
    path.unlink(missing_ok=True)
    console.print(f"erased    {saved.id or 'the saved identity'}")
    console.print(f"removed   {path}")


@id_app.command("show")
def id_show() -> None:
    """Show the saved identity (never the token)."""
    saved = UserConfig.load()
    if not saved.id:
        raise CsmlError(f"no identity saved in {config_path()}; run `csml id new`")
    console.print(f"identity  {saved.id}\ncoordinator {saved.url}")


@apps_app.callback()
def apps(ctx: typer.Context, url: UrlOpt = None) -> None:
    """List applications, their operations, workers and queues."""
    if ctx.invoked_subcommand is not None:
        return
    with client(url) as c:
        infos = c.apps()
    for a in infos:
        q = a.queue
        console.print(
            f"[bold]{a.name}[/] {a.version}  workers {a.workers} (slots {a.slots}"
            + (f", {a.contributed_workers} contributed" if a.contributed_workers else "")
            + (f", {a.probation_workers} on probation" if a.probation_workers else "")
            + (f", {a.quarantined_workers} quarantined" if a.quarantined_workers else "")
            + ")  "
            f"queue {q.depth}/{q.capacity}, running {q.running}"
        )
        for op in a.operations:
            ins = ", ".join(i.name for i in op.inputs) or "-"
            outs = ", ".join(o.name for o in op.outputs) or "-"
            first = op.description.splitlines()[0] if op.description else ""
            needs = f" (needs {plain(placement.describe(op.requires))})" if op.requires else ""
            console.print(
                f"  {op.name.replace('_', '-'):<16} in: {ins:<10} out: {outs:<10} {first}{needs}"
            )


@app.command("submit")
def submit(
    app_name: Annotated[str, typer.Argument(metavar="APP")],
    operation: Annotated[str, typer.Argument(help="e.g. detect-faces")],
    files: Annotated[
        list[str] | None, typer.Argument(help="Input files: PATH or NAME=PATH.", show_default=False)
    ] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="Parameter KEY=VALUE (repeatable).")
    ] = None,
    params_json: Annotated[str | None, typer.Option(help="Parameters as a JSON object.")] = None,
    wait: Annotated[bool, typer.Option("--wait", "-w", help="Wait for the result.")] = False,
    timeout: Annotated[float, typer.Option(help="Most seconds to wait.")] = 3600,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Download outputs to this folder.")
    ] = None,
    confidential: Annotated[
        bool,
        typer.Option(
            "--confidential",
            help="Encrypt the job end to end to the workers whose attestation passes --policy.",
        ),
    ] = False,
    policy: attest.PolicyOpt = None,
    insecure: attest.InsecureOpt = False,
    require: Annotated[
        list[str] | None,
        typer.Option(
            "--require",
            "-r",
            help="Run only on a worker with this label: NAME=VALUE (equal) or NAME>=NUMBER "
            "(at least), e.g. gpu=true, gpu_memory_gb>=16 (repeatable).",
        ),
    ] = None,
    trusted_only: Annotated[
        bool,
        typer.Option("--trusted-only", help="Run it only on the operator's workers."),
    ] = False,
    min_reputation: Annotated[
        int | None,
        typer.Option(
            min=0, help="Only on operator workers or contributed ones with this reputation."
        ),
    ] = None,
    url: UrlOpt = None,
) -> None:
    """Submit a job; with --wait, show its progress and print the result."""
    if (policy is not None or insecure) and not confidential:
        raise CsmlError("--policy and --insecure-allow-unattested go with --confidential")
    requires = parse_requires(require or [])
    with client(url) as c:
        op = find_operation(c.app(app_name), operation)
        params = parse_params(param or [], params_json)
        inputs = map_files(op, files or [], by_id=params)
        job = c.submit(
            app_name,
            op.name,
            files=dict(inputs),
            params=params,
            confidential=confidential,
            policy=policy,
            allow_unattested=insecure,
            requires=requires,
            trusted_only=trusted_only,
            min_reputation=min_reputation,
        )
        attest.warn_insecure(job.recipients)
        console.print(f"submitted {job.id}")
        if wait or output:
            follow(job, timeout, output)


@app.command("jobs")
def jobs(
    state: Annotated[str | None, typer.Option(help="Only jobs in this state.")] = None,
    app_name: Annotated[str | None, typer.Option("--app", help="Only this app's jobs.")] = None,
    limit: int = 50,
    url: UrlOpt = None,
) -> None:
    """List your jobs, newest first."""
    with client(url) as c:
        found = c.jobs(state=state, app=app_name, limit=limit)
    console.print(jobs_table([j.data for j in found]))


@app.command("status")
def status(
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    wait: Annotated[float, typer.Option(help="Long-poll up to this many seconds.")] = 0,
    url: UrlOpt = None,
) -> None:
    """Show one job."""
    with client(url) as c:
        job = c.job(job_id)
        if wait:
            job.refresh(wait=wait)
    show_job(attest.plain_view(job))


@app.command("result")
def result(
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the outputs.")] = Path(
        "."
    ),
    url: UrlOpt = None,
) -> None:
    """Print a finished job's result and download its outputs."""
    with client(url) as c:
        job = c.job(job_id)
        if job.state.value != "succeeded":
            raise CsmlError(
                f"job {job.id[:12]} is {job.state.value}"
                + (f": {job.error}" if job.error else "; try again when it has succeeded")
            )
        typer.echo(json.dumps(job.result))
        output.mkdir(parents=True, exist_ok=True)
        for path in job.download_all(output):  # every name checked before any is written
            console.print(f"saved {plain(path)}")


@app.command("cancel")
def cancel(job_id: Annotated[str, typer.Argument(metavar="ID")], url: UrlOpt = None) -> None:
    """Cancel a queued or running job."""
    with client(url) as c:
        job = c.job(job_id).cancel()
    console.print(f"{job.id[:12]} {job.state.value}")


def main() -> None:
    # What start-up made (modules, classes, schemas) lives as long as the process: frozen,
    # no collection walks it again (`python -m csml` also loads with the collector off).
    # At the end, what the command made is frozen too: the interpreter's collection at
    # exit then walks nothing (after `csml batch` of 1,000 photos it walked every item,
    # job and view: ~80 ms of CPU, spent on garbage that the exit frees anyway).
    gc.freeze()
    try:
        _run()
    finally:
        gc.freeze()


def _run() -> None:
    try:
        app()
    except CsmlError as exc:
        fail(exc.message)
        sys.exit(1)
    except TransportError as exc:
        fail(str(exc))
        sys.exit(1)
    except KeyboardInterrupt:
        fail("interrupted")
        sys.exit(130)
