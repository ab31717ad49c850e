"""Four hosts on a simulated network: a coordinator, two worker hosts and a client host.

Each host is a network namespace with one address in 198.18.0.0/24, cabled to a
bridge. The coordinator serves HTTPS on its own address with a self-signed
certificate; the workers and the client trust it by its pinned fingerprint
only, and a worker needs nothing but the URL, the pin and a join token (no
store, no data folder of the coordinator's). Then a worker host's cable is
pulled mid-job: its job must come back after the lease and finish on the other
host; plugged in again, the cut-off worker must be live and run jobs again.

Needs root and iproute2; skipped otherwise (CSML_REQUIRE_NETNS=1 makes that a failure).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from csml.coordinator.tls import ensure_self_signed
from tests.e2e.multihost.netns import Host, NetnsUnavailable, Network, network

# Coordinator, workers and client in network namespaces (root).
pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[3]
PORT = 8600
LEASE_SECONDS = 4.0
LIVE_SECONDS = 3.0
JOB_SECONDS = 5.0

COORDINATOR_SETTINGS = {
    "CSML_LEASE_SECONDS": str(LEASE_SECONDS),
    "CSML_HEARTBEAT_SECONDS": "0.5",
    "CSML_REAP_INTERVAL_SECONDS": "0.2",
    "CSML_WORKER_LIVE_SECONDS": str(LIVE_SECONDS),
    "CSML_POW_DIFFICULTY": "8",
}


def base_env(home: Path) -> dict[str, str]:
    """What any host's process gets: no CSML_* setting of the test's environment."""
    home.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(REPO),
        "PWD": str(REPO),
    }


class ClientHost:
    """Talks to `client_host.py` running in the client's namespace."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        assert proc.stdin is not None and proc.stdout is not None
        self._in: IO[str] = proc.stdin
        self._out: IO[str] = proc.stdout
        ready = self._read()
        assert ready == {"ok": "ready"}, ready

    def _read(self) -> dict[str, Any]:
        line = self._out.readline()
        if not line:
            raise AssertionError(f"the client host exited ({self.proc.poll()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def call(self, **req: Any) -> Any:
        self._in.write(json.dumps(req) + "\n")
        self._in.flush()
        answer = self._read()
        assert "error" not in answer, answer["error"]
        return answer["ok"]

    def live_workers(self) -> int:
        return int(self.call(op="apps").get("echo", 0))

    def job(self, job_id: str, wait: float = 0.0) -> dict[str, Any]:
        job: dict[str, Any] = self.call(op="job", id=job_id, wait=wait)
        return job

    def close(self) -> None:
        self._in.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Store:
    """Read-only look into the coordinator's SQLite store: who ran what."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10) as db:
            return db.execute(sql, args).fetchall()

    def host_of_job(self, job_id: str) -> str | None:
        """The join-token label of the worker holding (or that last held) the job."""
        rows = self._rows(
            "SELECT t.label FROM jobs j JOIN workers w ON w.id = j.worker_id "
            "JOIN join_tokens t ON t.id = w.join_token_id WHERE j.id = ?",
            (job_id,),
        )
        return rows[0][0] if rows else None

    def last_heartbeat(self, label: str) -> str:
        rows = self._rows(
            "SELECT max(w.last_heartbeat) FROM workers w "
            "JOIN join_tokens t ON t.id = w.join_token_id WHERE t.label = ?",
            (label,),
        )
        return str(rows[0][0])


def wait_until(what: str, predicate: Any, timeout: float, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for: {what}")


@pytest.fixture
def net() -> Iterator[Network]:
    try:
        with network({"coord": 1, "wa": 11, "wb": 12, "client": 20}) as n:
            yield n
    except NetnsUnavailable as exc:
        if os.environ.get("CSML_REQUIRE_NETNS") == "1":
            pytest.fail(str(exc), pytrace=False)
        pytest.skip(str(exc))


def start_worker(net: Network, host: Host, url: str, pin: str, token: str, root: Path) -> None:
    env = {**base_env(root / f"{host.name}-home"), "CSML_JOIN_TOKEN": token}
    argv = [sys.executable, "-m", "csml", "worker", "--app", "echo", "--slots", "1"]
    argv += ["--coordinator", url, "--pin-sha256", pin, "--claim-wait", "2"]
    net.start(host, argv, env, root / f"worker-{host.name}.log")


def test_workers_on_other_hosts_survive_a_cut_link(net: Network, tmp_path: Path) -> None:
    coord, client_ns = net.hosts["coord"], net.hosts["client"]
    url = f"https://{coord.address}:{PORT}"
    data = tmp_path / "coordinator-data"
    cert, key, pin = ensure_self_signed(tmp_path / "tls", [coord.address])
    coord_env = {
        **base_env(tmp_path / "coord-home"),
        **COORDINATOR_SETTINGS,
        "CSML_DATA_DIR": str(data),
    }

    # The operator on the coordinator host: one join token per worker host.
    tokens = {}
    for label in ("host-a", "host-b"):
        create = [sys.executable, "-m", "csml", "join-token", "create", "--app", "echo"]
        made = subprocess.run(
            coord.cmd([*create, "--label", label]),
            env=coord_env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        tokens[label] = made.stdout.strip()
    server = [sys.executable, "-m", "csml", "server", "--host", coord.address]
    server += ["--port", str(PORT), "--tls-cert", str(cert), "--tls-key", str(key)]
    server += ["--log-level", "warning"]
    coordinator = net.start(coord, server, coord_env, tmp_path / "coordinator.log")

    def logs() -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(tmp_path.glob("*.log"))
        )

    with subprocess.Popen(
        client_ns.cmd([sys.executable, "-m", "tests.e2e.multihost.client_host", url, pin]),
        env=base_env(tmp_path / "client-home"),
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            client = ClientHost(proc)
            try:
                run_scenario(net, client, Store(data / "csml.db"), url, pin, tokens, tmp_path)
            finally:
                client.close()
        except BaseException:
            print(logs())
            raise
    assert coordinator.poll() is None, logs()


def run_scenario(
    net: Network,
    client: ClientHost,
    store: Store,
    url: str,
    pin: str,
    tokens: dict[str, str],
    root: Path,
) -> None:
    wa, wb = net.hosts["wa"], net.hosts["wb"]
    start_worker(net, wa, url, pin, tokens["host-a"], root)
    start_worker(net, wb, url, pin, tokens["host-b"], root)
    wait_until("both worker hosts joined", lambda: client.live_workers() == 2, 60)

    # One job per worker (one slot each): a long one on each host.
    jobs = [client.call(op="submit", params={"sleep": JOB_SECONDS, "n": i}) for i in range(2)]
    wait_until(
        "both jobs running",
        lambda: all(client.job(j)["state"] == "running" for j in jobs),
        30,
    )
    hosts = {j: store.host_of_job(j) for j in jobs}
    assert sorted(str(h) for h in hosts.values()) == ["host-a", "host-b"], hosts
    on_a = next(j for j, h in hosts.items() if h == "host-a")
    on_b = next(j for j, h in hosts.items() if h == "host-b")

    # Pull host A's cable mid-job.
    cut_at = time.monotonic()
    wa.link(up=False)
    wait_until("host A counted as gone", lambda: client.live_workers() == 1, 30)
    done_a = client.job(on_a, wait=60)
    requeued_after = time.monotonic() - cut_at
    done_b = client.job(on_b, wait=30)
    assert done_b["state"] == "succeeded" and done_b["attempts"] == 1, done_b
    assert done_a["state"] == "succeeded", done_a
    assert done_a["attempts"] == 2, done_a  # once on A (lost), once on B
    assert done_a["result"]["params"]["n"] == jobs.index(on_a)
    assert store.host_of_job(on_a) == "host-b"
    # The lease had to run out first: not before it, and not much after.
    assert LEASE_SECONDS - 1 < requeued_after < LEASE_SECONDS + 3 * JOB_SECONDS + 10
    print(f"\njob cut off on host A finished on host B {requeued_after:.1f} s after the cut")

    # Plug it back in: the same worker process heartbeats again and is live.
    before = store.last_heartbeat("host-a")
    wa.link(up=True)
    restored_at = time.monotonic()
    wait_until("host A live again", lambda: client.live_workers() == 2, 90)
    assert store.last_heartbeat("host-a") > before
    print(f"host A live again {time.monotonic() - restored_at:.1f} s after the link came back")

    # And it takes work again: with host B's worker gone, a new job runs on A.
    b_worker = net.procs[-1]
    b_worker.terminate()
    b_worker.wait(timeout=30)
    wait_until("host B's worker left", lambda: client.live_workers() == 1, 30)
    job = client.call(op="submit", params={"after": "rejoin"})
    done = client.job(job, wait=60)
    assert done["state"] == "succeeded", done
    assert done["result"]["params"]["after"] == "rejoin"
    assert store.host_of_job(job) == "host-a"
