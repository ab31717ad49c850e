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


def _serve(host: str, port: int, log_level: str, tls: tuple[Path, Path] | None = None) -> None:
    import uvicorn

    from csml.coordinator.app import create_app
    from csml.coordinator.logs import setup_logging
    from csml.store.private import UMASK

    os.umask(UMASK)  # whatever the coordinator writes (store, models, TLS) is owner-only
    setup_logging(log_level.upper())
    app = create_app(_settings())
    uvicorn.run(
        app,
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
) -> None:
    """Run the coordinator only (store from CSML_DATABASE_URL or the data directory)."""
    if (tls_cert is None) != (tls_key is None):
        raise CsmlError("give both --tls-cert and --tls-key, or neither")
    for path in (tls_cert, tls_key):
        if path is not None and not path.is_file():
            raise CsmlError(f"no such file {str(path)!r}")
    tls = (tls_cert, tls_key) if tls_cert and tls_key else None
    _serve(host, port, log_level, tls)


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
) -> None:
    """Serve one application for a coordinator, from any machine that reaches it."""
    from csml.apps.registry import available_app_names, load_app
    from csml.attestation.evidence import EvidenceUnavailable
    from csml.coordinator.logs import setup_logging
    from csml.worker.agent import WorkerAgent, WorkerConfig

    setup_logging()
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
    )
    try:
        agent = WorkerAgent(config)
    except (LookupError, EvidenceUnavailable) as exc:
        raise CsmlError(f"attestation {attestation!r}: {exc}") from None

    def stop(*_: object) -> None:
        agent.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    agent.run()


def _join_token(token: str | None, path: Path | None) -> str:
    """The join token, given directly or in a file (a secret mount); exactly one source."""
    if token and path:
        raise CsmlError("give --join-token or --join-token-file (CSML_JOIN_TOKEN[_FILE]), not both")
    if path is not None:
        try:
            token = path.read_text().strip()
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
    url = f"{'https' if tls else 'http'}://{host}:{port}"
    env = {**os.environ, "CSML_JOIN_TOKEN": token, "CSML_COORDINATOR": url}
    cert: tuple[Path, Path] | None = None
    if tls:
        from csml.coordinator.tls import ensure_self_signed

        cert_path, key_path, pin = ensure_self_signed(
            settings.data_dir / "tls", sorted({host, "127.0.0.1", "localhost"})
        )
        cert = (cert_path, key_path)
        env["CSML_PIN_SHA256"] = pin
        console.print(f"TLS certificate SHA-256: [bold]{pin}[/]")
        console.print(f"clients: --pin-sha256 {pin}  (or CSML_PIN_SHA256)")
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
        _serve(host, port, "warning", cert)
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
