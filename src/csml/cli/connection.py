"""The coordinator a CLI command talks to: the `--url` option and the saved identity.

Every command builds its `Client` here, so the URL, the saved token and the store of
confidential jobs' result keys (0600 files next to the user config) are the same for all.
"""

from __future__ import annotations

from typing import Annotated

import typer

from csml.cli import attest
from csml.client import Client
from csml.client.config import UserConfig

UrlOpt = Annotated[
    str | None,
    typer.Option("--url", envvar="CSML_URL", help="Coordinator URL.", show_default=False),
]


def client(url: str | None = None) -> Client:
    saved = UserConfig.load()
    return Client(url or saved.url, saved.token, key_store=attest.key_store())
