"""Issue 12, row 12 (the `csml up` part): SIGTERM to `csml up` left its workers
running, retrying with a join token that never expires, and `csml up` handed the
operator token to every worker. Now SIGTERM stops the workers (and their
zygotes) and revokes the join token; the operator token stays in the
coordinator's process (a worker's environment never holds it)."""

from __future__ import annotations

import secrets
import signal
from pathlib import Path

import pytest

from tests.process_tree import environ_of, start_up, up_env, up_join_token_state

pytestmark = pytest.mark.timeout(300)


def test_sigterm_stops_workers_and_revokes_the_join_token(tmp_path: Path) -> None:
    env = up_env(tmp_path)
    up, _url = start_up(tmp_path, ["echo"], env)
    with up:
        assert up_join_token_state(env) == "active"
        workers = [p for p in up.seen.values() if "worker" in " ".join(p.cmdline())]
        assert workers, up.describe(list(up.seen.values()))
        up.proc.send_signal(signal.SIGTERM)
        code = up.wait(timeout=120)
        survivors = up.describe(up.survivors())
    assert code == 0, up.output
    assert not survivors, f"still running after SIGTERM: {survivors}"
    assert up_join_token_state(env).startswith("revoked"), up.output


def test_the_operator_token_never_reaches_a_worker(tmp_path: Path) -> None:
    operator_token = secrets.token_urlsafe(24)
    env = up_env(tmp_path, CSML_OPERATOR_TOKEN=operator_token)
    up, _url = start_up(tmp_path, ["echo"], env)
    with up:
        # csml up (the coordinator) holds it, and its environment is readable here.
        assert operator_token.encode() in environ_of(up.proc.pid)
        for pid, proc in up.seen.items():
            assert operator_token.encode() not in environ_of(pid), up.describe([proc])
        up.proc.send_signal(signal.SIGTERM)
        up.wait(timeout=120)
