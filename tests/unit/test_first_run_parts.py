"""The parts of a clean first run that need no process: the log format chosen for a
terminal or a pipe, human log lines, and what a `csml up` worker's environment keeps."""

from __future__ import annotations

import io
import logging
import os

import pytest

from csml.cli.children import worker_env
from csml.coordinator.logs import HumanFormatter, JsonFormatter, resolve_log_format


def test_auto_is_human_on_a_terminal_and_json_otherwise() -> None:
    main, terminal = os.openpty()
    try:
        with os.fdopen(terminal, "w", closefd=False) as tty:
            assert resolve_log_format("auto", tty) == "human"
    finally:
        os.close(main)
        os.close(terminal)
    assert resolve_log_format("auto", io.StringIO()) == "json"
    assert resolve_log_format("json", io.StringIO()) == "json"
    assert resolve_log_format("human", io.StringIO()) == "human"
    with pytest.raises(ValueError, match="use one of auto, json, human"):
        resolve_log_format("xml")


def test_human_lines_carry_the_fields_json_lines_carry() -> None:
    record = logging.LogRecord("csml.worker", logging.INFO, __file__, 1, "joined", (), None)
    record.fields = {"app": "opencv", "slots": 2}
    assert HumanFormatter().format(record) == "joined  app=opencv slots=2"
    assert '"app": "opencv"' in JsonFormatter().format(record)


def test_a_local_worker_gets_no_coordinator_setting() -> None:
    environ = {
        "PATH": "/usr/bin",
        "PYTHONPATH": "/src",
        "CSML_OPERATOR_TOKEN": "op",
        "CSML_OPERATOR_TOKEN_FILE": "/run/op",
        "CSML_DATABASE_URL": "postgresql://u:secret@db/csml",
        "CSML_DATA_DIR": "/var/lib/csml",
        "CSML_JOIN_TOKEN": "csmljoin_old",
        "CSML_CLAIM_WAIT": "1",
        "CSML_ATTESTATION": "none",
    }
    env = worker_env(environ, "https://127.0.0.1:8600", "ab" * 32)
    assert env == {
        "PATH": "/usr/bin",
        "PYTHONPATH": "/src",
        "CSML_CLAIM_WAIT": "1",
        "CSML_ATTESTATION": "none",
        "CSML_COORDINATOR": "https://127.0.0.1:8600",
        "CSML_PIN_SHA256": "ab" * 32,
    }
