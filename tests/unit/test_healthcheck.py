"""The containers' health check script (deploy/images/healthcheck.py) imports and answers.

It runs only inside the images, where no type checker or linter sees its imports; a
module it can no longer import makes every container 'unhealthy' (it happened once).
"""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "images" / "healthcheck.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("csml_healthcheck", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_client_role_is_healthy() -> None:
    assert load().main("client") == 0


def test_a_coordinator_that_does_not_answer_is_unhealthy_for_that_reason(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("CSML_HEALTH_PORT", str(port))
    assert load().main("coordinator") == 1
    err = capsys.readouterr().err
    assert "ConnectError" in err and "ModuleNotFoundError" not in err and "ImportError" not in err
