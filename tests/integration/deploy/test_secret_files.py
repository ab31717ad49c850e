"""Settings read from files (container secrets): the database URL, a bootstrap join token
registered at start by every coordinator replica, and the worker's join token."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import func, select

from csml import ids
from csml.coordinator.app import build_core
from csml.coordinator.config import Settings
from csml.coordinator.tokens import list_join_tokens, revoke_join_token
from csml.store.db import sqlite_url, transaction
from csml.store.tables import JoinToken
from tests.cluster import running_cluster

# Starts a coordinator and worker processes (30-200 s under load).
pytestmark = pytest.mark.timeout(300)


def secret(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o400)
    return path


def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CSML_"):
            monkeypatch.delenv(name)


def test_database_url_file_is_read_and_stripped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean_env(monkeypatch)
    url = sqlite_url(tmp_path / "elsewhere")
    monkeypatch.setenv("CSML_DATABASE_URL_FILE", str(secret(tmp_path / "db", f"{url}\n")))
    monkeypatch.setenv("CSML_DATA_DIR", str(tmp_path / "data"))
    assert Settings().resolved_database_url() == url


@pytest.mark.parametrize(
    ("content", "env", "message"),
    [
        (None, {}, "database_url_file: cannot read"),
        ("  \n", {}, "is empty"),
        ("sqlite:///x.db", {"CSML_DATABASE_URL": "sqlite:///y.db"}, "not both"),
    ],
)
def test_database_url_file_errors_name_the_setting(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    content: str | None,
    env: dict[str, str],
    message: str,
) -> None:
    clean_env(monkeypatch)
    path = tmp_path / "db"
    if content is not None:
        secret(path, content)
    monkeypatch.setenv("CSML_DATABASE_URL_FILE", str(path))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_bootstrap_join_token_is_registered_once_by_every_replica(tmp_path: Path) -> None:
    token = ids.new_secret("csmljoin")
    settings = Settings(
        data_dir=tmp_path / "data",
        bootstrap_join_token_file=secret(tmp_path / "join", token + "\n"),
    )
    cores = [build_core(settings) for _ in range(3)]  # three replicas starting on one store
    with transaction(cores[0].sessions) as session:
        rows = session.scalars(select(JoinToken)).all()
        assert len(rows) == 1
        assert rows[0].token_hash == ids.hash_secret(token)
        assert token not in (rows[0].label + rows[0].id)
    # A revoked bootstrap token stays revoked when a replica restarts.
    revoke_join_token(settings, list_join_tokens(settings)[0].id)
    build_core(settings)
    (only,) = list_join_tokens(settings)
    assert only.revoked_at is not None
    with transaction(cores[0].sessions) as session:
        assert session.scalar(select(func.count()).select_from(JoinToken)) == 1
    for core in cores:
        core.engine.dispose()


def test_a_missing_bootstrap_token_file_stops_the_start(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", bootstrap_join_token_file=tmp_path / "absent")
    with pytest.raises(ValueError, match="bootstrap_join_token_file: cannot read"):
        build_core(settings)


def worker_cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CSML_")}
    return subprocess.run(
        [sys.executable, "-m", "csml", "worker", "--app", "echo", *args],
        env={**base, "CSML_COORDINATOR": "http://127.0.0.1:9", **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


def test_worker_join_token_file_errors_are_one_line(tmp_path: Path) -> None:
    cases = [
        ((), {}, "a join token is needed"),
        (("--join-token-file", str(tmp_path / "absent")), {}, "cannot read"),
        (("--join-token-file", str(secret(tmp_path / "empty", "\n"))), {}, "is empty"),
        ((), {"CSML_JOIN_TOKEN": "csmljoin_x", "CSML_JOIN_TOKEN_FILE": str(tmp_path / "empty")},
         "not both"),
    ]  # fmt: skip
    for args, env, message in cases:
        done = worker_cli(tmp_path, *args, **env)
        assert done.returncode != 0
        assert message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_worker_joins_with_its_token_and_app_from_a_file_and_the_environment(
    tmp_path: Path,
) -> None:
    with running_cluster(tmp_path, {"CSML_POW_DIFFICULTY": "0"}) as cluster:
        token_file = secret(tmp_path / "join", cluster.join_token + "\n")
        (tmp_path / "w").mkdir()
        env = {k: v for k, v in cluster.env.items() if k != "CSML_JOIN_TOKEN"}
        worker = subprocess.Popen(
            [sys.executable, "-m", "csml", "worker"],
            env={**env, "CSML_APP": "echo", "CSML_COORDINATOR": cluster.url,
                 "CSML_JOIN_TOKEN_FILE": str(token_file), "CSML_WORKDIR": str(tmp_path / "w")},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        cluster.workers.append(worker)
        cluster.wait_workers("echo", 1)
        job = cluster.new_user().submit("echo", "echo", params={"n": 1})
        job.wait(timeout=30)
        assert job.result == {"params": {"sleep": 0.0, "n": 1}}
        assert any((tmp_path / "w").iterdir())  # CSML_WORKDIR was used


def test_operator_commands_report_a_bad_secret_file_in_one_line(tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CSML_")}
    done = subprocess.run(
        [sys.executable, "-m", "csml", "join-token", "list"],
        env={**base, "CSML_DATABASE_URL_FILE": str(tmp_path / "absent")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "database_url_file: cannot read" in done.stderr and "Traceback" not in done.stderr
