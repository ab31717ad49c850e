"""A newcomer's first run: `csml demo` and `csml up` on a terminal print human lines
only (no JSON log line, traceback or "coordinator unreachable" warning) and leave
no process behind, however they stop (done, SIGTERM, Ctrl-C). `csml up` also
revokes the join token it made, and its workers never see the operator token."""

from __future__ import annotations

import secrets
import signal
from pathlib import Path

import pytest

from tests.process_tree import (
    SIGNALS,
    WatchedCommand,
    alarming_lines,
    environ_of,
    start_up,
    up_env,
    up_join_token_state,
)

# Real processes on 2 shared cores: the OpenCV worker imports its libraries first.
pytestmark = pytest.mark.timeout(600)


def test_demo_prints_human_lines_and_leaves_no_process(tmp_path: Path) -> None:
    env = up_env(tmp_path)
    args = ["demo", "-o", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")]
    with WatchedCommand(args, env, tmp_path) as demo:
        code = demo.wait(timeout=480)
        survivors = demo.describe(demo.survivors())
        output = demo.output
        # csml up, its OpenCV worker and the worker's zygote, at least.
        assert len(demo.seen) >= 3, demo.describe(list(demo.seen.values()))
    assert code == 0, output
    assert "faces found: 1" in output, output
    assert not survivors, f"still running after the demo: {survivors}"
    assert not alarming_lines(output), output
    assert up_join_token_state(env).startswith("revoked"), output


@pytest.mark.parametrize("sig", sorted(SIGNALS))
def test_up_stops_everything_on_signal(tmp_path: Path, sig: str) -> None:
    operator_token = secrets.token_urlsafe(24)
    env = up_env(tmp_path, CSML_OPERATOR_TOKEN=operator_token)
    up, _url = start_up(tmp_path, ["echo", "opencv"], env)
    with up:
        for pid in up.seen:
            environ = environ_of(pid)
            assert operator_token.encode() not in environ, f"process {pid} holds it"
            assert b"CSML_JOIN_TOKEN=" not in environ, f"process {pid} holds a join token"
        if SIGNALS[sig] == signal.SIGINT:
            up.signal_group(signal.SIGINT)  # Ctrl-C on its terminal
        else:
            up.proc.send_signal(signal.SIGTERM)  # `kill PID`, a service manager
        code = up.wait(timeout=180)
        survivors = up.describe(up.survivors())
        output = up.output
        assert len(up.seen) >= 4, up.describe(list(up.seen.values()))
    assert code == 0, output
    assert not survivors, f"still running after csml up: {survivors}"
    assert not alarming_lines(output), output
    assert up_join_token_state(env).startswith("revoked"), output
