"""`csml credit`: your credit balance and ledger (earned by your contributed workers,
spent when your jobs are served ahead of round-robin), as a table or `--json`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from csml.cli.connection import UrlOpt, client
from csml.cli.output import console, plain
from csml.schemas.credit import CreditInfo


def _credits(milli: int) -> str:
    return f"{milli / 1000:,.3f}"


def credit(
    limit: Annotated[int, typer.Option(min=1, max=200, help="Ledger entries to show.")] = 20,
    before: Annotated[
        int | None, typer.Option(min=1, help="Entries older than this ledger id (paging).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
    url: UrlOpt = None,
) -> None:
    """Your credit: balance, what you earned and spent, and the newest ledger entries."""
    with client(url) as c:
        info = c.credit(limit=limit, before=before)
    if as_json:
        typer.echo(info.model_dump_json(indent=2))
        return
    show(info)


def show(info: CreditInfo) -> None:
    state = "[green]served by priority[/]" if info.credited else "round-robin only"
    console.print(
        f"balance  {_credits(info.balance_milli)} credits ({state}; at most "
        f"{info.priority.k} of every {info.priority.n} jobs of an app go by priority)",
        highlight=False,
    )
    console.print(
        f"earned   {_credits(info.earned_milli)}   spent {_credits(info.spent_milli)}",
        highlight=False,
    )
    if not info.entries:
        console.print("no ledger entries yet: contribute a worker (csml contribute APP)")
        return
    table = Table(box=None)
    for col in ("ID", "AT", "KIND", "CREDITS", "APP", "JOB", "WORKER"):
        table.add_column(col, justify="right" if col in ("ID", "CREDITS") else "left")
    for e in info.entries:
        sign, style = ("+", "green") if e.kind == "earned" else ("-", "yellow")
        table.add_row(
            str(e.id),
            e.at.strftime("%Y-%m-%d %H:%M:%S"),
            e.kind,
            f"[{style}]{sign}{_credits(e.amount_milli)}[/]",
            plain(e.app),
            plain((e.job_id or "")[:12]),
            plain((e.worker_id or "")[:12]),
        )
    console.print(table)
    if info.next_before is not None:
        console.print(f"older entries: csml credit --before {info.next_before}", highlight=False)
