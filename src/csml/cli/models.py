"""`csml models`, `csml train` and `csml predict`: models kept on the cluster under your id."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from csml.cli.connection import UrlOpt, client
from csml.cli.follow import follow
from csml.cli.output import console, json_text, plain
from csml.cli.params import map_files, parse_params
from csml.client import Client, CsmlError
from csml.schemas import OperationInfo
from csml.schemas.models import ModelInfo

models_app = typer.Typer(
    help="Your models: trained by your jobs, or imported.", invoke_without_command=True
)
ParamOpt = Annotated[
    list[str] | None, typer.Option("--param", "-p", help="Parameter KEY=VALUE (repeatable).")
]
WaitOpt = Annotated[bool, typer.Option("--wait/--no-wait", help="Wait and show progress.")]
TimeoutOpt = Annotated[float, typer.Option(help="Most seconds to wait.")]
OutputOpt = Annotated[
    Path | None, typer.Option("--output", "-o", help="Download outputs to this folder.")
]


def _headline(metrics: dict[str, object]) -> str:
    keys = ("train_accuracy", "held_out_accuracy", "cv_accuracy", "final_perplexity")
    shown = [f"{k}={metrics[k]:.3g}" for k in keys if isinstance(metrics.get(k), int | float)]
    return " ".join(shown)


def models_table(models: list[ModelInfo]) -> Table:
    table = Table(box=None)
    for col in ("ID", "APP", "KIND", "FORMAT", "SIZE", "CREATED"):
        table.add_column(col, no_wrap=True)
    table.add_column("METRICS")
    for m in models:
        table.add_row(
            m.id[:12],
            m.app,
            m.kind,
            f"{m.format} v{m.format_version}",
            f"{m.size:,}",
            m.created_at.strftime("%Y-%m-%d %H:%M"),
            _headline(m.metrics),
        )
    return table


@models_app.callback()
def models_default(ctx: typer.Context, url: UrlOpt = None) -> None:
    """List your models (the default), or manage one with a subcommand."""
    if ctx.invoked_subcommand is None:
        models_list(url)


@models_app.command("list")
def models_list(url: UrlOpt = None) -> None:
    """List your models, newest first."""
    with client(url) as c:
        found = c.models()
    if not found:
        console.print("no models yet: train one, e.g. `csml train dlib svm data.csv --label y`")
        return
    console.print(models_table(found))


@models_app.command("show")
def show(model_id: Annotated[str, typer.Argument(metavar="ID")], url: UrlOpt = None) -> None:
    """Print one model's details and metrics as JSON."""
    with client(url) as c:
        typer.echo(json.dumps(c.model(model_id).model_dump(mode="json"), indent=2))


@models_app.command("download")
def download(
    model_id: Annotated[str, typer.Argument(metavar="ID")],
    output: Annotated[Path, typer.Option("--output", "-o", help="File or folder.")] = Path("."),
    url: UrlOpt = None,
) -> None:
    """Save a model's file (to import elsewhere, or to keep)."""
    with client(url) as c:
        console.print(f"saved {plain(c.download_model(model_id, output))}")


@models_app.command("delete")
def delete(model_id: Annotated[str, typer.Argument(metavar="ID")], url: UrlOpt = None) -> None:
    """Delete a model (jobs already submitted with it keep their copy)."""
    with client(url) as c:
        c.delete_model(model_id)
    console.print(f"deleted {model_id}")


@models_app.command("import")
def import_(
    app_name: Annotated[str, typer.Argument(metavar="APP")],
    fmt: Annotated[str, typer.Argument(metavar="FORMAT", help="e.g. csml-dlib-svm")],
    file: Annotated[Path, typer.Argument(metavar="FILE")],
    format_version: Annotated[int | None, typer.Option(help="Default: the newest.")] = None,
    url: UrlOpt = None,
) -> None:
    """Keep a model file (e.g. one you downloaded) as one of your models."""
    if not file.is_file():
        raise CsmlError(f"no such file {str(file)!r}")
    with client(url) as c:
        info = c.import_model(app_name, fmt, file, format_version=format_version)
    console.print(f"imported {info.id}  ({info.app} {info.kind}, {info.format})")


def _data_input(op: OperationInfo) -> list[str]:
    """The inputs a user gives as files (not the model)."""
    return [i.name for i in op.inputs if i.model is None]


def train(
    app_name: Annotated[str, typer.Argument(metavar="APP", help="e.g. dlib, dynet")],
    what: Annotated[str, typer.Argument(metavar="WHAT", help="e.g. svm, mlp, char-rnn")],
    file: Annotated[Path, typer.Argument(metavar="FILE", help="Training data (CSV, text...).")],
    label: Annotated[
        str | None, typer.Option(help="The column holding the class (tables).")
    ] = None,
    param: ParamOpt = None,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = 3600,
    output: OutputOpt = None,
    url: UrlOpt = None,
) -> None:
    """Train a model (runs APP's `train_WHAT`); it is kept as one of your models."""
    operation = "train_" + what.replace("-", "_")
    params = parse_params(param or [], None)
    if label is not None:
        params["label"] = label
    with client(url) as c:
        info = c.app(app_name)
        op = next((o for o in info.operations if o.name == operation), None)
        if op is None:
            kinds = [
                o.name[6:].replace("_", "-") for o in info.operations if o.name[:6] == "train_"
            ]
            raise CsmlError(
                f"{app_name} trains no {what!r} models; it trains: {', '.join(kinds) or 'none'}"
            )
        inputs = _data_input(op)
        if len(inputs) != 1:
            raise CsmlError(f"{app_name}.{operation} takes the files {inputs}: use `csml submit`")
        files = map_files(op, [f"{inputs[0]}={file}"])
        job = c.submit(app_name, operation, files=dict(files), params=params)
        console.print(f"submitted {job.id}")
        if wait:
            follow(job, timeout, output)


def _using_operation(c: Client, model: ModelInfo, wanted: str | None) -> OperationInfo:
    ops = [
        o
        for o in c.app(model.app).operations
        for i in o.inputs
        if i.model is not None and (i.model.format, i.model.kind) == (model.format, model.kind)
    ]
    if wanted is not None:
        ops = [o for o in ops if o.name == wanted.replace("-", "_")]
    if len(ops) != 1:
        names = ", ".join(o.name for o in ops) or "none"
        raise CsmlError(
            f"model {model.id[:12]} ({model.app} {model.kind}) is used by: {names}"
            + ("; pick one with --operation" if len(ops) > 1 else "")
        )
    return ops[0]


def predict(
    model_id: Annotated[str, typer.Argument(metavar="MODEL", help="A model id (or prefix).")],
    files: Annotated[
        list[str] | None, typer.Argument(metavar="[FILE]...", help="Data: PATH or NAME=PATH.")
    ] = None,
    operation: Annotated[
        str | None, typer.Option(help="When several operations use this kind of model.")
    ] = None,
    param: ParamOpt = None,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = 3600,
    output: OutputOpt = None,
    url: UrlOpt = None,
) -> None:
    """Run one of your models on new data (or, for a text model, generate text)."""
    params = parse_params(param or [], None)
    with client(url) as c:
        model = c.model(model_id)
        op = _using_operation(c, model, operation)
        params["model"] = model.id
        inputs = map_files(op, files or [], by_id=params)
        job = c.submit(model.app, op.name, files=dict(inputs), params=params)
        console.print(f"submitted {job.id} ({model.app}.{op.name} with model {model.id[:12]})")
        if wait:
            follow(job, timeout, output)
        elif job.result is not None:
            console.print(json_text(job.result))
