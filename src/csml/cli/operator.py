"""Operator commands: run the coordinator, workers, everything (`up`), join tokens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from csml.cli.output import console
from csml.client import CsmlError

if TYPE_CHECKING:
    from csml.coordinator.config import Settings

join_token_app = typer.Typer(help="Tokens that let workers join the cluster.", no_args_is_help=True)

HostOpt = Annotated[str, typer.Option(help="Address to listen on.")]
PortOpt = Annotated[int, typer.Option(help="Port to listen on.")]


def _settings() -> Settings:
    try:
        from csml.coordinator.config import Settings
    except ImportError:
        raise CsmlError("the coordinator is not installed: pip install 'csml[server]'") from None
    return Settings()


def _serve(host: str, port: int, log_level: str) -> None:
    import uvicorn

    from csml.coordinator.app import create_app
    from csml.coordinator.logs import setup_logging

    setup_logging(log_level.upper())
    app = create_app(_settings())
    uvicorn.run(app, host=host, port=port, access_log=False, log_config=None, log_level=log_level)


def server(
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8600,
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
) -> None:
    """Run the coordinator only (store from CSML_DATABASE_URL or the data directory)."""
    _serve(host, port, log_level)


def worker(
    app_name: Annotated[str, typer.Option("--app", help="The application to serve.")],
    coordinator: Annotated[str, typer.Option(envvar="CSML_COORDINATOR", help="Coordinator URL.")],
    join_token: Annotated[
        str, typer.Option(envvar="CSML_JOIN_TOKEN", help="From `csml join-token create`.")
    ],
    slots: Annotated[int, typer.Option(min=1, max=256, help="Jobs run at once.")] = 1,
    workdir: Annotated[Path | None, typer.Option(help="Scratch folder for jobs.")] = None,
    claim_wait: Annotated[
        float,
        typer.Option(envvar="CSML_CLAIM_WAIT", help="Seconds each idle claim long-polls."),
    ] = 5.0,
) -> None:
    """Serve one application for a coordinator, from any machine that reaches it."""
    from csml.apps.registry import available_app_names, load_app
    from csml.coordinator.logs import setup_logging
    from csml.worker.agent import WorkerAgent, WorkerConfig

    setup_logging()
    if app_name not in available_app_names():
        raise CsmlError(
            f"no application {app_name!r} is installed here; installed: "
            + ", ".join(available_app_names())
        )
    missing = load_app(app_name).missing_modules()
    if missing:
        raise CsmlError(
            f"application {app_name!r} needs {', '.join(missing)}: pip install 'csml[{app_name}]'"
        )
    agent = WorkerAgent(WorkerConfig(coordinator, join_token, app_name, slots, workdir, claim_wait))

    def stop(*_: object) -> None:
        agent.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    agent.run()


def up(
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8600,
    slots: Annotated[int, typer.Option(help="Slots per worker.")] = 2,
    apps: Annotated[
        list[str] | None, typer.Option("--app", help="Apps to start workers for (default: all).")
    ] = None,
) -> None:
    """Run everything on this machine: the coordinator (SQLite) and one worker per app."""
    from csml.apps.registry import installed_apps
    from csml.coordinator.tokens import create_join_token

    settings = _settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    token = create_join_token(settings, label="csml up (local workers)")
    names = [n for n, a in installed_apps().items() if not a.missing_modules()]
    if apps:
        names = [n for n in names if n in apps]
    url = f"http://{host}:{port}"
    env = {**os.environ, "CSML_JOIN_TOKEN": token, "CSML_COORDINATOR": url}
    procs: list[subprocess.Popen[bytes]] = []

    def start_workers() -> None:
        for name in names:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "csml", "worker", "--app", name, "--slots", str(slots)],
                    env=env,
                    stdin=subprocess.DEVNULL,
                )
            )

    console.print(f"CSML coordinator on [bold]{url}[/]  (data in {settings.data_dir})")
    console.print(f"workers: {', '.join(names) or 'none'}; Ctrl-C stops everything")
    threading.Timer(0.5, start_workers).start()
    try:
        _serve(host, port, "warning")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


@join_token_app.command("create")
def join_token_create(
    label: Annotated[str, typer.Option(help="A note on where it is used.")] = "",
) -> None:
    """Create a join token (shown once) on the coordinator's store."""
    from csml.coordinator.tokens import create_join_token

    console.print(create_join_token(_settings(), label=label), highlight=False)


@join_token_app.command("list")
def join_token_list() -> None:
    """List join tokens (never the tokens themselves)."""
    from csml.coordinator.tokens import list_join_tokens

    for t in list_join_tokens(_settings()):
        state = f"revoked {t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "active"
        console.print(f"{t.id[:12]}  {t.created_at:%Y-%m-%d %H:%M}  {state:<24} {t.label}")


@join_token_app.command("revoke")
def join_token_revoke(token_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Revoke a join token: workers that joined with it are refused from now on."""
    from csml.coordinator.tokens import revoke_join_token

    revoke_join_token(_settings(), token_id)
    console.print(f"revoked {token_id}")
