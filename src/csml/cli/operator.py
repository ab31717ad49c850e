"""Operator commands: run the coordinator, workers, everything (`up`), join tokens.

`csml up` runs the coordinator in its own process (a thread serves HTTP) and one
worker process per app. It owns them: SIGINT or SIGTERM stops the workers first
(each finishes or hands back its jobs and leaves), then the coordinator, then
revokes the join token it made for them; a worker whose `csml up` dies anyhow
stops too (see `children.py`). The operator token and every other coordinator
setting stay in the coordinator's process: a worker gets its URL, its app and,
over stdin, its join token.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from csml.cli.children import exit_with_parent, orphaned, stop_processes, worker_env
from csml.cli.output import console
from csml.cli.params import parse_labels
from csml.client import CsmlError

if TYPE_CHECKING:
    import uvicorn

    from csml.coordinator.config import Settings

join_token_app = typer.Typer(help="Tokens that let workers join the cluster.", no_args_is_help=True)

HostOpt = Annotated[str, typer.Option(help="Address to listen on.")]
PortOpt = Annotated[int, typer.Option(help="Port to listen on.")]
LogFormatOpt = Annotated[
    str,
    typer.Option(
        envvar="CSML_LOG_FORMAT",
        help="auto (human lines on a terminal, JSON otherwise), json or human.",
    ),
]
# Set by the `csml` command that starts this one: stop when that process dies.
ParentPidOpt = Annotated[int | None, typer.Option(hidden=True)]
UP_LABEL = "csml up (local workers)"
WORKER_STOP_GRACE = 30.0  # seconds a worker of `csml up` gets to finish its jobs
SERVER_GC_THRESHOLD = (10_000, 10, 10)  # the coordinator process's collector (`_settle_heap`)


def checked_log_format(requested: str) -> str:
    """The resolved log format ("json" or "human"); a CLI error for an unknown one."""
    from csml.coordinator.logs import resolve_log_format

    try:
        return resolve_log_format(requested.lower())
    except ValueError as exc:
        raise CsmlError(f"--log-format: {exc}") from None


def _settings() -> Settings:
    try:
        from csml.coordinator.config import Settings
    except ImportError:
        raise CsmlError("the coordinator is not installed: pip install 'csml[server]'") from None
    from pydantic import ValidationError

    try:
        return Settings()
    except ValidationError as exc:  # e.g. an unreadable CSML_DATABASE_URL_FILE
        first = exc.errors()[0]
        msg = str(first["msg"]).removeprefix("Value error, ")
        where = "_".join(str(p) for p in first["loc"]).upper()
        raise CsmlError(f"CSML_{where}: {msg}" if where else msg) from None


PinOpt = Annotated[
    str | None,
    typer.Option(
        "--pin-sha256", envvar="CSML_PIN_SHA256", help="Trust exactly this TLS certificate."
    ),
]
InsecureHttpOpt = Annotated[
    bool,
    typer.Option(
        "--insecure-http",
        envvar="CSML_INSECURE_HTTP",
        help="Allow plain HTTP to a non-loopback coordinator (tokens travel in clear).",
    ),
]


def _server_config(
    settings: Settings, host: str, port: int, log_level: str, tls: tuple[Path, Path] | None
) -> uvicorn.Config:
    import uvicorn

    from csml.cli.http_protocol import CoalescingHttpToolsProtocol
    from csml.coordinator.app import create_app
    from csml.store.private import UMASK

    os.umask(UMASK)  # whatever the coordinator writes (store, models, TLS) is owner-only
    return uvicorn.Config(
        create_app(settings),
        http=CoalescingHttpToolsProtocol,  # an answer's head and body in one write
        host=host,
        port=port,
        access_log=False,
        log_config=None,
        # Open event streams (the web page) must not hold a shutdown for long.
        timeout_graceful_shutdown=5,
        log_level=log_level,
        ssl_certfile=str(tls[0]) if tls else None,
        ssl_keyfile=str(tls[1]) if tls else None,
    )


def _serve(
    host: str, port: int, log_level: str, log_format: str, tls: tuple[Path, Path] | None = None
) -> None:
    import uvicorn

    from csml.coordinator.logs import setup_logging

    setup_logging(log_level.upper(), log_format)
    config = _server_config(_settings(), host, port, log_level, tls)
    _settle_heap()
    uvicorn.Server(config).run()


def _settle_heap() -> None:
    """Before serving: freeze what start-up made, and collect the young generation less
    often (`SERVER_GC_THRESHOLD`).

    The app (routes, schemas, the engine, the catalog: ~115,000 objects beyond the
    CLI's, which `python -m csml` froze) lives as long as the process and is never
    garbage, yet each full collection walked it: bench (a), 2,000 no-op jobs, had one
    of ~110 ms CPU (and as long a stall of the event loop) in its window. A request
    makes thousands of short-lived objects that reference counting frees; at the
    default threshold (700) the young generation was collected ~100 times per 2,000
    jobs, walking whatever was in flight each time. Measured in that window: 86 CPU-µs
    of collection per job before, 23 with the freeze, 2.5 with both (two collections
    of ~2 ms); a threshold of 50,000 made single pauses of ~24 ms for no further gain.
    Cyclic garbage waits longer to be found, at most `SERVER_GC_THRESHOLD` objects'
    worth."""
    gc.freeze()
    gc.set_threshold(*SERVER_GC_THRESHOLD)


def server(
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8600,
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
    tls_cert: Annotated[
        Path | None, typer.Option(envvar="CSML_TLS_CERT", help="Serve HTTPS: certificate (PEM).")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(envvar="CSML_TLS_KEY", help="Serve HTTPS: private key (PEM).")
    ] = None,
    log_format: LogFormatOpt = "auto",
) -> None:
    """Run the coordinator only (store from CSML_DATABASE_URL or the data directory)."""
    if (tls_cert is None) != (tls_key is None):
        raise CsmlError("give both --tls-cert and --tls-key, or neither")
    for path in (tls_cert, tls_key):
        if path is not None and not path.is_file():
            raise CsmlError(f"no such file {str(path)!r}")
    tls = (tls_cert, tls_key) if tls_cert and tls_key else None
    _serve(host, port, log_level, checked_log_format(log_format), tls)


def worker(
    app_name: Annotated[
        str, typer.Option("--app", envvar="CSML_APP", help="The application to serve.")
    ],
    coordinator: Annotated[str, typer.Option(envvar="CSML_COORDINATOR", help="Coordinator URL.")],
    join_token: Annotated[
        str | None, typer.Option(envvar="CSML_JOIN_TOKEN", help="From `csml join-token create`.")
    ] = None,
    join_token_file: Annotated[
        Path | None,
        typer.Option(
            envvar="CSML_JOIN_TOKEN_FILE",
            help="A file holding the join token (e.g. a Docker or Kubernetes secret).",
        ),
    ] = None,
    slots: Annotated[int, typer.Option(min=1, max=256, help="Jobs run at once.")] = 1,
    prefetch: Annotated[
        int,
        typer.Option(
            envvar="CSML_PREFETCH",
            min=0,
            max=256,
            help="Jobs claimed beyond the free slots, to start at once when a slot frees "
            "(they show as running, held under lease, while they wait); for jobs short "
            "beside a claim's round trip, up to twice as many.",
        ),
    ] = 0,
    completion_hold: Annotated[
        float,
        typer.Option(
            envvar="CSML_COMPLETION_HOLD",
            min=0.0,
            max=60.0,
            help="With a prefetch: seconds a job's result may wait to ride the claim that "
            "refills the prefetch once half empty (0: a claim follows every job's end).",
        ),
    ] = 0.1,
    workdir: Annotated[
        Path | None, typer.Option(envvar="CSML_WORKDIR", help="Scratch folder for jobs.")
    ] = None,
    claim_wait: Annotated[
        float,
        typer.Option(envvar="CSML_CLAIM_WAIT", help="Seconds each idle claim long-polls."),
    ] = 5.0,
    attestation: Annotated[
        str,
        typer.Option(
            envvar="CSML_ATTESTATION",
            help="Evidence for this worker's key: none (INSECURE, development), sgx-dcap "
            "(in a Gramine SGX enclave), tdx-dcap (in a TDX guest), or a plug-in.",
        ),
    ] = "none",
    attestation_collateral: Annotated[
        Path | None,
        typer.Option(
            envvar="CSML_ATTESTATION_COLLATERAL",
            help="DCAP collateral (JSON) sent with the evidence for clients to verify it.",
        ),
    ] = None,
    pin_sha256: PinOpt = None,
    insecure_http: InsecureHttpOpt = False,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
    log_format: LogFormatOpt = "auto",
    parent_pid: ParentPidOpt = None,
    label: Annotated[
        list[str] | None,
        typer.Option(
            "--label",
            "-l",
            help="Announce a label NAME=VALUE for jobs' requirements, e.g. gpu=true, "
            "gpu_memory_gb=24 (repeatable; true/false and numbers are typed). arch and cpus "
            "are announced by default.",
        ),
    ] = None,
) -> None:
    """Serve one application for a coordinator, from any machine that reaches it."""
    from csml.apps.registry import available_app_names, load_app
    from csml.attestation.evidence import EvidenceUnavailable
    from csml.coordinator.logs import setup_logging
    from csml.worker.agent import WorkerAgent, WorkerConfig

    setup_logging(log_level.upper(), checked_log_format(log_format))
    if parent_pid is not None:
        exit_with_parent(parent_pid)
    labels = parse_labels(label or [])
    join_token = _join_token(join_token, join_token_file)
    collateral = _read_collateral(attestation_collateral) if attestation_collateral else None
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
    config = WorkerConfig(
        coordinator,
        join_token,
        app_name,
        slots,
        workdir,
        claim_wait,
        attestation,
        collateral,
        pin_sha256=pin_sha256,
        insecure_http=insecure_http,
        prefetch=prefetch,
        completion_hold=completion_hold,
        labels=labels,
    )
    try:
        agent = WorkerAgent(config)
    except (LookupError, EvidenceUnavailable) as exc:
        raise CsmlError(f"attestation {attestation!r}: {exc}") from None

    def stop(*_: object) -> None:
        # Not in the handler itself: it may interrupt the main thread holding a lock
        # stop() takes. A worker whose `csml up` is gone also gives up its coordinator.
        threading.Thread(target=agent.stop, args=(orphaned(parent_pid),), daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    import httpx

    try:
        agent.run()
    except httpx.HTTPStatusError as exc:  # registration refused: the app or manifest (403, 409)
        try:
            reason = str(exc.response.json()["error"]["message"])
        except (ValueError, KeyError, TypeError):
            reason = f"HTTP {exc.response.status_code}"
        raise CsmlError(f"the coordinator refused this worker: {reason}") from None


def _join_token(token: str | None, path: Path | None) -> str:
    """The join token, given directly or in a file (a secret mount); exactly one source."""
    if token and path:
        raise CsmlError("give --join-token or --join-token-file (CSML_JOIN_TOKEN[_FILE]), not both")
    if path is not None:
        try:
            # "-": from stdin, as `csml up` hands it over (never in the environment).
            token = (sys.stdin.read() if str(path) == "-" else path.read_text()).strip()
        except OSError as exc:
            raise CsmlError(f"--join-token-file: cannot read {path}: {exc.strerror}") from None
        if not token:
            raise CsmlError(f"--join-token-file: {path} is empty")
    if not token:
        raise CsmlError("a join token is needed: --join-token, --join-token-file, CSML_JOIN_TOKEN")
    return token


def _read_collateral(path: Path) -> dict[str, str]:
    """The operator's DCAP collateral file, checked before the worker joins."""
    import json

    from csml.attestation.dcap import Collateral, CollateralFormatError

    try:
        data = json.loads(path.read_text())
        return Collateral.from_json(data).to_json()
    except OSError as exc:
        raise CsmlError(f"--attestation-collateral: cannot read {path}: {exc.strerror}") from None
    except (ValueError, CollateralFormatError) as exc:
        raise CsmlError(f"--attestation-collateral: {path}: {exc}") from None


def up(
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8600,
    slots: Annotated[int, typer.Option(help="Slots per worker.")] = 2,
    apps: Annotated[
        list[str] | None, typer.Option("--app", help="Apps to start workers for (default: all).")
    ] = None,
    tls: Annotated[
        bool, typer.Option("--tls", help="Serve HTTPS with a self-signed certificate.")
    ] = False,
    log_level: Annotated[
        str, typer.Option(help="debug, info, warning, error (coordinator and workers)")
    ] = "warning",
    log_format: LogFormatOpt = "auto",
    parent_pid: ParentPidOpt = None,
) -> None:
    """Run everything on this machine: the coordinator (SQLite) and one worker per app."""
    import uvicorn

    from csml.apps.registry import installed_apps
    from csml.coordinator.logs import setup_logging
    from csml.coordinator.tokens import create_join_token, revoke_join_token_secret

    fmt = checked_log_format(log_format)
    setup_logging(log_level.upper(), fmt)
    if parent_pid is not None:
        exit_with_parent(parent_pid)
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        stop.set()  # the main thread does the stopping, in order

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    settings = _settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    names = [n for n, a in installed_apps().items() if not a.missing_modules()]
    if apps:
        names = [n for n in names if n in apps]
    url = f"{'https' if tls else 'http'}://{host}:{port}"
    cert: tuple[Path, Path] | None = None
    pin: str | None = None
    if tls:
        from csml.coordinator.tls import ensure_self_signed

        cert_path, key_path, pin = ensure_self_signed(
            settings.data_dir / "tls", sorted({host, "127.0.0.1", "localhost"})
        )
        cert = (cert_path, key_path)
        console.print(f"TLS certificate SHA-256: [bold]{pin}[/]")
        console.print(f"clients: --pin-sha256 {pin}  (or CSML_PIN_SHA256)")
    server = uvicorn.Server(_server_config(settings, host, port, log_level, cert))
    _settle_heap()
    # Not the main thread: uvicorn then leaves signals to us (it would re-raise
    # SIGTERM once served, killing this process before its workers are stopped).
    coordinator = threading.Thread(target=server.run, name="coordinator", daemon=True)
    # Bound to the apps it starts workers for (no workers: no token).
    token = create_join_token(settings, label=UP_LABEL, apps=names) if names else ""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        coordinator.start()
        while not server.started and not stop.wait(0.1):
            if not coordinator.is_alive():
                raise CsmlError(f"the coordinator did not start on {url}; see the log above")
        if stop.is_set():
            return
        env = worker_env(os.environ, url, pin)
        worker_args = ["--slots", str(slots), "--log-level", log_level, "--log-format", fmt]
        for name in names:  # from this (main) thread: the parent-death signal follows it
            procs.append(_start_worker(name, token, env, worker_args))
        console.print(f"CSML coordinator on [bold]{url}[/]  (data in {settings.data_dir})")
        console.print(f"workers: {', '.join(names) or 'none'}; Ctrl-C stops everything")
        while not stop.wait(0.5):
            if not coordinator.is_alive():
                raise CsmlError("the coordinator stopped; see the log above")
    finally:
        if procs:
            console.print("stopping the workers, then the coordinator…")
        stop_processes(procs, WORKER_STOP_GRACE)
        revoke_join_token_secret(settings, token)
        server.should_exit = True
        coordinator.join(timeout=30)
    console.print("stopped")


def _start_worker(
    app_name: str, join_token: str, env: dict[str, str], args: list[str]
) -> subprocess.Popen[bytes]:
    """`csml worker` for one app: the join token over stdin, its own process group
    (a terminal's Ctrl-C reaches `csml up` only, which stops the workers first)."""
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "csml", "worker", "--app", app_name, *args),
            *("--join-token-file", "-", "--parent-pid", str(os.getpid())),
        ],
        env=env,
        stdin=subprocess.PIPE,
        process_group=0,
    )
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError), proc.stdin:  # a worker that died: seen later
        proc.stdin.write(join_token.encode())
    return proc


@join_token_app.command("create")
def join_token_create(
    apps: Annotated[
        list[str] | None,
        typer.Option("--app", help="An app its workers may serve (repeat for several)."),
    ] = None,
    any_app: Annotated[
        bool, typer.Option("--any-app", help="Let its workers serve any app (not recommended).")
    ] = False,
    publish: Annotated[
        bool,
        typer.Option(
            "--publish", help="Let its workers announce a new version of their apps' manifests."
        ),
    ] = False,
    label: Annotated[str, typer.Option(help="A note on where it is used.")] = "",
) -> None:
    """Create a join token (shown once) for the apps named with --app."""
    from csml.coordinator.tokens import create_join_token

    if bool(apps) == any_app:
        raise CsmlError("name the apps the token may serve (--app NAME, repeatable), or --any-app")
    token = create_join_token(
        _settings(), label=label, apps=None if any_app else apps, may_publish=publish
    )
    console.print(token, highlight=False)


@join_token_app.command("list")
def join_token_list() -> None:
    """List join tokens (never the tokens themselves)."""
    from csml.coordinator.tokens import list_join_tokens

    for t in list_join_tokens(_settings()):
        state = f"revoked {t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "active"
        apps = ",".join(t.apps) if t.apps is not None else "ANY APP (unbound: replace it)"
        apps += " +publish" if t.may_publish else ""
        apps += " (contributed)" if t.contributor_id is not None else ""
        console.print(
            f"{t.id[:12]}  {t.created_at:%Y-%m-%d %H:%M}  {state:<24} {apps}  {t.label}",
            highlight=False,
        )


@join_token_app.command("revoke")
def join_token_revoke(token_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Revoke a join token: its workers stop, and app versions only it registered leave the
    catalog."""
    from csml.coordinator.tokens import revoke_join_token

    revoke_join_token(_settings(), token_id)
    console.print(f"revoked {token_id}")
