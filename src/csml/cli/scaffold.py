"""`csml app new NAME`: a third-party application package that installs, passes its own
tests and serves jobs as generated (operations, entry point, tests, Dockerfile, README)."""

from __future__ import annotations

import json
import re
import unicodedata
from importlib import metadata, resources
from pathlib import Path
from typing import Annotated
from urllib.parse import unquote, urlparse

import typer

from csml.cli.output import console
from csml.client import CsmlError

app_cli = typer.Typer(help="Write your own application.", no_args_is_help=True)

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
"""The app-name rule of the manifest (`csml.schemas.AppManifest.name`)."""
MAX_DESCRIPTION = 200
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")

# template file -> where it goes in the package ({module} is the import name)
FILES = {
    "pyproject.toml.tmpl": "pyproject.toml",
    "README.md.tmpl": "README.md",
    "Dockerfile.tmpl": "Dockerfile",
    "dockerignore.tmpl": ".dockerignore",
    "gitignore.tmpl": ".gitignore",
    "app.py.tmpl": "src/{module}/__init__.py",
    "test_operations.py.tmpl": "tests/test_operations.py",
}


def module_name(name: str) -> str:
    """The package's import name: `my-app` -> `csml_app_my_app`."""
    return "csml_app_" + name.replace("-", "_")


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise CsmlError(
            f"invalid app name {name!r}: use 1 to 40 characters, lowercase letters, digits, "
            "'-' or '_', starting with a letter (e.g. 'textstats')"
        )
    from csml.apps.registry import available_app_names

    if name in available_app_names():
        raise CsmlError(f"an app named {name!r} is already installed here; choose another name")
    return name


def check_description(text: str) -> str:
    text = text.strip()
    if not text or len(text) > MAX_DESCRIPTION:
        raise CsmlError(f"--description: give 1 to {MAX_DESCRIPTION} characters")
    if any(unicodedata.category(c).startswith("C") for c in text):
        raise CsmlError("--description: one line of text, without control characters")
    return text


def csml_source() -> str:
    """What `pip wheel` should take csml from: the folder or wheel this install came from.
    Never the bare name: an unrelated project has the name `csml` on PyPI."""
    try:
        direct = metadata.distribution("csml").read_text("direct_url.json")
        url = urlparse(json.loads(direct)["url"]) if direct else None
    except (metadata.PackageNotFoundError, ValueError, KeyError):
        url = None
    if url is not None and url.scheme == "file" and Path(unquote(url.path)).exists():
        return unquote(url.path)
    return "/path/to/csml"  # the README says what to put here


def csml_requirement() -> str:
    try:
        major, minor = metadata.version("csml").split(".")[:2]
    except (metadata.PackageNotFoundError, ValueError):
        return "csml"
    return f"csml>={major}.{minor}"


def render(template: str, values: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        return values[match.group(1)]  # a KeyError here is a bug in a template

    return PLACEHOLDER.sub(value, template)


def scaffold(name: str, parent: Path, description: str) -> Path:
    """Write the package `csml-app-NAME` under `parent`; return its folder."""
    name, description = check_name(name), check_description(description)
    module = module_name(name)
    target = parent / f"csml-app-{name}"
    if target.exists():
        raise CsmlError(f"{target} already exists; not overwriting it (use another --dir)")
    literal = json.dumps(description, ensure_ascii=False)  # a TOML and a Python string
    values = {
        "name": name,
        "name_literal": json.dumps(name),
        "module": module,
        "dist": f"csml-app-{name}",
        "description": description,
        "description_literal": literal,
        "csml_requirement": csml_requirement(),
        "csml_source": csml_source(),
    }
    templates = resources.files("csml.cli").joinpath("templates").joinpath("app")
    try:
        target.mkdir(parents=True)
    except OSError as exc:
        raise CsmlError(f"cannot create {target}: {exc.strerror}") from None
    for source, dest in FILES.items():
        path = target / dest.format(module=module)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(templates.joinpath(source).read_text("utf-8"), values), "utf-8")
    return target


@app_cli.command("new")
def new(
    name: Annotated[str, typer.Argument(help="The app's name, e.g. textstats.")],
    directory: Annotated[
        Path, typer.Option("--dir", help="Where to create the csml-app-NAME folder.")
    ] = Path("."),
    description: Annotated[
        str, typer.Option(help="One line saying what the app does.")
    ] = "Statistics of text files and CSV tables.",
) -> None:
    """Create csml-app-NAME: an app package with example operations, tests, a Dockerfile."""
    target = scaffold(name, directory, description)

    def say(line: str) -> None:
        console.print(line, markup=False, highlight=False)

    say(f"created   {target}/")
    for dest in FILES.values():
        say(f"          {dest.format(module=module_name(name))}")
    say(f"next      cd {target}   (then see README.md)")
    say("          python -m pip install -e '.[test]' && python -m pytest")
    say(f"          csml worker --app {name} --coordinator URL --join-token TOKEN")
