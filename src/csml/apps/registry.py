"""Finding apps: the `csml.apps` entry-point group."""

from __future__ import annotations

from functools import cache
from importlib.metadata import EntryPoint, entry_points

from csml.apps.base import App

GROUP = "csml.apps"


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def available_app_names() -> list[str]:
    return sorted(_entry_points())


@cache
def load_app(name: str) -> App:
    """Import the app registered as `name`; KeyError when none is."""
    eps = _entry_points()
    if name not in eps:
        raise KeyError(name)
    app = eps[name].load()
    if not isinstance(app, App):
        raise TypeError(f"entry point {name!r} is not a csml.apps.App")
    return app


def app_module(name: str) -> str:
    return _entry_points()[name].module


def installed_apps() -> dict[str, App]:
    """Apps whose entry point loads; an app missing its library is left out."""
    apps: dict[str, App] = {}
    for name in available_app_names():
        try:
            apps[name] = load_app(name)
        except ImportError:
            continue
    return apps
