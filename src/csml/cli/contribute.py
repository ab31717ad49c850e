"""`csml contribute`: run a worker of your own for an app, and the operator's
`csml apps contribution` rule for it.

`csml contribute APP` asks the coordinator for a join token bound to your identity and
to APP, and prints it once with the command that starts the worker; `list` and
`revoke ID` manage them. (An app named `list` or `revoke` is reached as
`csml contribute --app NAME`.)

`csml operator contributions policy|workers|lift` (the operator, where the coordinator's
settings are) sets an app's verification policy, lists contributed workers' records and
lifts a quarantine (`csml.coordinator.verification`).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from csml.cli.connection import UrlOpt, client
from csml.cli.output import console
from csml.client import CsmlError
from csml.refusals import Refusal

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

    from csml.coordinator.config import Settings

ACTIONS = ("list", "revoke")


def contribute(
    what: Annotated[
        str | None,
        typer.Argument(metavar="APP|list|revoke", help="An app to contribute a worker to."),
    ] = None,
    token_id: Annotated[str | None, typer.Argument(metavar="[ID]", help="For revoke.")] = None,
    app_name: Annotated[
        str | None, typer.Option("--app", help="The app (when it is named list or revoke).")
    ] = None,
    container: Annotated[
        bool, typer.Option("--container", help="Print the podman/docker command instead.")
    ] = False,
    label: Annotated[str, typer.Option(help="A note for yourself (e.g. the host).")] = "",
    url: UrlOpt = None,
) -> None:
    """Contribute a worker: `csml contribute opencv` prints a join token (once) and the
    command that starts your worker; `csml contribute list`; `csml contribute revoke ID`."""
    if app_name is None and what == "list":
        _list(url)
    elif app_name is None and what == "revoke":
        if not token_id:
            raise CsmlError("name the contribution to revoke: csml contribute revoke ID")
        with client(url) as c:
            c.revoke_contribution(token_id)
        console.print(f"revoked {token_id}: its workers get no more jobs", highlight=False)
    else:
        app = app_name or what
        if not app or token_id:
            raise CsmlError("usage: csml contribute APP | list | revoke ID")
        _create(app, container, label, url)


def _create(app: str, container: bool, label: str, url: str | None) -> None:
    with client(url) as c:
        made = c.contribute(app, label)
        here = c.url
    # The coordinator names itself as it was reached; the URL this client used is the one
    # known to work from here.
    worker = [here if part == made.worker_command[3] else part for part in made.worker_command]
    box = [
        part.replace(made.worker_command[3], here) if "CSML_COORDINATOR=" in part else part
        for part in made.container_command
    ]
    console.print(f"contribution {made.id[:12]} for {made.app}", highlight=False)
    console.print(f"join token   {made.token}   (shown once: keep it secret)", highlight=False)
    if container:
        console.print("save the token in ./csml-join-token (mode 0600), then run:")
        console.print("  " + shlex.join(box), highlight=False, soft_wrap=True)
        console.print("(docker works the same: replace podman by docker)")
    else:
        console.print("start the worker; it reads the token on its standard input:")
        console.print("  " + shlex.join(worker), highlight=False, soft_wrap=True)
    console.print(f"stop it for good with: csml contribute revoke {made.id[:12]}", highlight=False)


def _list(url: str | None) -> None:
    with client(url) as c:
        found = c.contributions()
    if not found:
        console.print("no contributions yet: csml contribute APP")
    for t in found:
        state = f"revoked {t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "active"
        live = [w for w in t.workers if w.stopped_at is None]
        console.print(
            f"{t.id[:12]}  {t.app:<12} {t.created_at:%Y-%m-%d %H:%M}  {state:<24} "
            f"workers {len(live)} live / {len(t.workers)}  {t.label}",
            highlight=False,
        )


def apps_contribution(
    app: Annotated[str, typer.Argument(metavar="APP")],
    allow: Annotated[
        bool | None,
        typer.Option("--allow/--deny", help="Take contributed workers for APP, or not."),
    ] = None,
    max_workers: Annotated[
        int | None, typer.Option(min=0, help="At most this many live contributed workers.")
    ] = None,
    no_cap: Annotated[bool, typer.Option("--no-cap", help="Remove the cap.")] = False,
    credit_weight: Annotated[
        float | None,
        typer.Option(
            min=0, max=1000, help="Credit per wall second of a run of APP (default 1.0; 0: none)."
        ),
    ] = None,
) -> None:
    """(Operator, run where the coordinator's settings are.) Allow or deny contributed
    workers for APP and/or cap them; --deny revokes APP's contributed tokens."""
    from csml.cli.operator import _settings
    from csml.coordinator.contributions import set_rule_in
    from csml.store.db import make_engine, make_sessionmaker, migrate

    if no_cap and max_workers is not None:
        raise CsmlError("give --max-workers N or --no-cap, not both")
    settings = _settings()
    engine = make_engine(settings.resolved_database_url())
    try:
        migrate(engine)
        cap_given = no_cap or max_workers is not None
        info = set_rule_in(
            make_sessionmaker(engine),
            settings,
            app,
            allow,
            cap_given,
            max_workers,
            credit_weight=credit_weight,
        )
    except Refusal as exc:
        raise CsmlError(exc.message) from None
    finally:
        engine.dispose()
    cap = "no cap" if info.max_workers is None else f"at most {info.max_workers}"
    state = "allowed" if info.allowed else "denied"
    weight = "" if info.credit_weight == 1.0 else f"; credit weight {info.credit_weight:g}"
    console.print(
        f"{info.app}: contributed workers {state}, {cap}; {info.contributed_workers} live" + weight,
        highlight=False,
    )


# -- `csml operator contributions ...`: verification (run where the coordinator's settings are)

operator_app = typer.Typer(help="Operator commands on the store.", no_args_is_help=True)
contributions_app = typer.Typer(
    help="Contributed workers: verification policy, records, quarantine.", no_args_is_help=True
)
operator_app.add_typer(contributions_app, name="contributions")


class _Transaction:
    """`verification.lift`'s writer for the CLI: one transaction per operation."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def run(self, op: Callable[[Connection], bool]) -> bool:
        with self.engine.begin() as conn:
            return op(conn)


@contextmanager
def _store() -> Iterator[tuple[Settings, Engine]]:
    from csml.cli.operator import _settings
    from csml.store.db import make_engine, migrate

    settings = _settings()
    engine = make_engine(settings.resolved_database_url())
    try:
        migrate(engine)
        yield settings, engine
    except Refusal as exc:
        raise CsmlError(exc.message) from None
    finally:
        engine.dispose()


@contributions_app.command("policy")
def policy(
    app: Annotated[str, typer.Argument(metavar="APP")],
    verification: Annotated[
        str,
        typer.Argument(
            metavar="POLICY", help="none, replicate:K (2..5), spot-check:P (0 < P <= 1), default."
        ),
    ],
) -> None:
    """Set how contributed workers' results for APP are checked (running coordinators
    apply it to completions at once, to claims within 2 s)."""
    from csml.coordinator.contributions import set_rule_in
    from csml.store.db import make_sessionmaker

    with _store() as (settings, engine):
        info = set_rule_in(
            make_sessionmaker(engine), settings, app, None, False, None, verification=verification
        )
    default = " (the default)" if info.verification_default else ""
    console.print(f"{info.app}: verification {info.verification}{default}", highlight=False)


@contributions_app.command("workers")
def workers(
    quarantined: Annotated[
        bool, typer.Option("--quarantined", help="Only quarantined workers.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines.")] = False,
) -> None:
    """Contributed workers with their record: agreements, disagreements, reputation,
    probation, quarantine (live ones, or every quarantined one)."""
    from csml.coordinator import verification

    with _store() as (settings, engine):
        found = verification.records(
            engine, settings.verify_probation, quarantined_only=quarantined
        )
    if as_json:
        for w in found:
            typer.echo(w.model_dump_json())
        return
    table = Table("worker", "app", "agree", "disagree", "reputation", "state")
    for w in found:
        state = (
            f"quarantined {w.quarantined_at:%Y-%m-%d %H:%M}"
            if w.quarantined_at
            else ("probation" if w.probation else "trusted by record")
        )
        table.add_row(
            w.id[:12], w.app, str(w.agreements), str(w.disagreements), str(w.reputation), state
        )
    console.print(table)


@contributions_app.command("lift")
def lift(worker_id: Annotated[str, typer.Argument(metavar="WORKER")]) -> None:
    """Lift a worker's quarantine: its record starts afresh, on probation."""
    from csml.coordinator import verification

    with _store() as (_, engine):
        full = verification.lift(engine, _Transaction(engine), worker_id)
    console.print(f"lifted the quarantine of {full[:12]}: on probation again", highlight=False)
