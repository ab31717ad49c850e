"""`csml contribute`: run a worker of your own for an app, and the operator's
`csml apps contribution` rule for it.

`csml contribute APP` asks the coordinator for a join token bound to your identity and
to APP, and prints it once with the command that starts the worker; `list` and
`revoke ID` manage them. (An app named `list` or `revoke` is reached as
`csml contribute --app NAME`.)
"""

from __future__ import annotations

import shlex
from typing import Annotated

import typer

from csml.cli.connection import UrlOpt, client
from csml.cli.output import console
from csml.client import CsmlError
from csml.refusals import Refusal

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
