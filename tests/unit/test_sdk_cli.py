"""The SDK (`csml.client.Client`) and the CLI (Typer's runner) against the coordinator in
this process: identities, apps, submit, wait, result, outputs, cancel, errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import csml.cli.main as cli_main
from csml.client import Client, CsmlError, InvalidRequest, Unauthorized, WaitTimeout
from tests.unit.inproc import BASE_URL, HttpWorker, InProcessCoordinator


def test_the_sdk_end_to_end(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker, tmp_path: Path
) -> None:
    user = coordinator.client()
    created = user.create_identity()
    assert user.token == created.token and len(created.id) == 64
    echo = user.app("echo")
    assert echo.workers == 1 and echo.slots == 4 and "echo" in {o.name for o in echo.operations}
    assert {"echo", "opencv"} <= {a.name for a in user.apps()}

    source = tmp_path / "in.bin"
    source.write_bytes(b"\x00\x01 payload")
    job = user.submit("echo", "echo", files={"data": source}, params={"x": [1, 2]})
    assert job.state.value == "queued" and not job.done
    with pytest.raises(WaitTimeout):
        job.wait(timeout=0.01)
    [claimed] = echo_worker.claim()
    echo_worker.heartbeat(claimed, fraction=0.25)
    assert job.refresh().progress == (0.25, "25% done")
    assert echo_worker.run(claimed, tmp_path / "work").status_code == 204

    assert job.wait(timeout=10).state.value == "succeeded"
    assert job.result == {"params": {"sleep": 0.0, "x": [1, 2]}}
    assert set(job.outputs) == {"data"}
    assert b"".join(job.iter_output("data")) == b"\x00\x01 payload"
    assert [j.id for j in user.jobs()] == [job.id]
    assert user.job(job.id[:12]).id == job.id  # a unique prefix finds it

    user.delete_identity()
    with pytest.raises(Unauthorized):
        coordinator.client(created.token).jobs()


def test_the_sdk_cancels_and_reports_failures(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    user = coordinator.new_user()
    queued = user.submit("echo", "echo")
    assert queued.cancel().state.value == "cancelled"
    failing = user.submit("echo", "echo")
    [claimed] = echo_worker.claim()
    echo_worker.complete(claimed, "failed", error="JobError: no face found")
    assert failing.wait(timeout=10).state.value == "failed"
    assert failing.error == "JobError: no face found"


@pytest.fixture
def cli(
    coordinator: InProcessCoordinator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[CliRunner]:
    """The CLI's clients reach the in-process coordinator; its config lives in `tmp_path`."""

    def client(*args: Any, **kw: Any) -> Client:
        return Client(*args, **kw, transport=coordinator.transport)

    monkeypatch.setattr(cli_main, "Client", client)  # `csml id new` makes its own
    monkeypatch.setattr("csml.cli.connection.Client", client)  # every other command
    monkeypatch.setenv("CSML_CONFIG", str(tmp_path / "config" / "config.toml"))
    for name in ("CSML_URL", "CSML_TOKEN", "CSML_PIN_SHA256"):
        monkeypatch.delenv(name, raising=False)
    yield CliRunner()


def run(cli: CliRunner, *args: str) -> str:
    result = cli.invoke(cli_main.app, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def test_the_cli_end_to_end(
    cli: CliRunner, coordinator: InProcessCoordinator, echo_worker: HttpWorker, tmp_path: Path
) -> None:
    out = run(cli, "id", "new", "--url", BASE_URL)
    assert "identity" in out and (tmp_path / "config" / "config.toml").exists()
    assert "echo" in run(cli, "apps")

    (tmp_path / "doc.txt").write_text("from the cli")
    out = run(cli, "submit", "echo", "echo", f"data={tmp_path / 'doc.txt'}", "-p", "word=hi")
    job_id = out.split("submitted ", 1)[1].split()[0]
    assert "queued" in run(cli, "status", job_id)
    assert job_id[:12] in run(cli, "jobs")
    [claimed] = echo_worker.claim()
    assert claimed.id == job_id and claimed.params == {"word": "hi"}
    assert echo_worker.run(claimed, tmp_path / "work").status_code == 204

    out = run(cli, "result", job_id, "-o", str(tmp_path / "out"))
    assert json.loads(out.splitlines()[0]) == {"params": {"sleep": 0.0, "word": "hi"}}
    [saved] = (tmp_path / "out").iterdir()
    assert saved.read_text() == "from the cli"

    second = run(cli, "submit", "echo", "echo").split("submitted ", 1)[1].split()[0]
    assert "cancelled" in run(cli, "cancel", second)


def test_the_cli_names_what_was_wrong(cli: CliRunner, coordinator: InProcessCoordinator) -> None:
    run(cli, "id", "new", "--url", BASE_URL)
    result = cli.invoke(cli_main.app, ["submit", "echo", "echo", "-p", "sleep=-1"])
    assert isinstance(result.exception, InvalidRequest)
    assert result.exception.field == "params.sleep"
    result = cli.invoke(cli_main.app, ["result", "0" * 12])
    assert isinstance(result.exception, CsmlError)
    assert result.exception.message == "no job '000000000000' is visible to you"


def test_the_cli_prints_one_line_on_error(
    cli: CliRunner, coordinator: InProcessCoordinator, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    run(cli, "id", "new", "--url", BASE_URL)
    monkeypatch.setattr("sys.argv", ["csml", "submit", "nope", "echo"])
    with pytest.raises(SystemExit) as exit_:
        cli_main.main()
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no application 'nope'") and "Traceback" not in err
