"""A real CSML cluster on loopback for tests: coordinator and worker processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from csml.client import Client

FAST_SETTINGS = {
    "CSML_LEASE_SECONDS": "3",
    "CSML_HEARTBEAT_SECONDS": "0.5",
    "CSML_REAP_INTERVAL_SECONDS": "0.2",
    "CSML_WORKER_LIVE_SECONDS": "5",
    "CSML_CLAIM_WAIT": "1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    def __init__(self, root: Path, settings: dict[str, str] | None = None) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            **FAST_SETTINGS,
            **(settings or {}),
            "CSML_DATA_DIR": str(self.data_dir),
            "CSML_CONFIG": str(root / "user-config.toml"),
        }
        self.coordinator: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.log_dir = root / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.join_token = self.csml(
            "join-token", "create", "--any-app", "--label", "tests"
        ).stdout.strip()

    def csml(self, *args: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "csml", *args],
            env=kw.pop("env", self.env),
            capture_output=True,
            text=True,
            timeout=kw.pop("timeout", 120),
            **kw,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"csml {args} failed: {result.stdout}\n{result.stderr}")
        return result

    def start_coordinator(self) -> None:
        log = open(self.log_dir / "coordinator.log", "ab")  # noqa: SIM115
        self.coordinator = subprocess.Popen(
            [sys.executable, "-m", "csml", "server", "--port", str(self.port)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_healthy(self.url)

    def stop_coordinator(self, sig: int = signal.SIGTERM) -> None:
        assert self.coordinator is not None
        self.coordinator.send_signal(sig)
        self.coordinator.wait(timeout=30)
        self.coordinator = None

    def start_worker(
        self, app: str, slots: int = 1, extra: tuple[str, ...] = ()
    ) -> subprocess.Popen[bytes]:
        """Start `csml worker` for `app`; `extra`: more of its options (e.g. --label)."""
        n = len(self.workers)
        log = open(self.log_dir / f"worker-{app}-{n}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "csml",
                "worker",
                "--app",
                app,
                "--slots",
                str(slots),
                "--coordinator",
                self.url,
                *extra,
            ],
            env={**self.env, "CSML_JOIN_TOKEN": self.join_token},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.workers.append(proc)
        return proc

    def wait_workers(self, app: str, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            apps = {a["name"]: a for a in httpx.get(f"{self.url}/v1/apps").json()}
            if app in apps and apps[app]["workers"] >= count:
                return
            time.sleep(0.1)
        raise AssertionError(f"{count} {app} workers did not join in {timeout} s")

    def client(self, token: str | None = None) -> Client:
        return Client(self.url, token or "")

    def new_user(self) -> Client:
        c = self.client()
        c.create_identity()
        return c

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.log_dir.glob("*.log"))

    def stop(self) -> None:
        for w in self.workers:
            if w.poll() is None:
                w.terminate()
        for w in self.workers:
            try:
                w.wait(timeout=20)
            except subprocess.TimeoutExpired:
                w.kill()
        if self.coordinator is not None and self.coordinator.poll() is None:
            self.stop_coordinator()


def wait_healthy(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"coordinator at {url} did not become healthy")


@contextmanager
def running_cluster(
    root: Path, settings: dict[str, str] | None = None, workers: dict[str, int] | None = None
) -> Iterator[Cluster]:
    cluster = Cluster(root, settings)
    try:
        cluster.start_coordinator()
        for app, slots in (workers or {}).items():
            cluster.start_worker(app, slots)
        for app in workers or {}:
            cluster.wait_workers(app, 1)
        yield cluster
    finally:
        cluster.stop()


def wait_for(predicate: Any, timeout: float = 30, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def install_to_folder(package: Path, site: Path) -> Path:
    """pip-install `package` (no deps) into `site`, for PYTHONPATH; the venv stays as it was."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(package),
        ],
        check=True,
        timeout=300,
    )
    return site


def post_counts(url: str) -> dict[str, float]:
    """POST requests the coordinator at `url` has answered so far, by route template
    (from its /metrics)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("csml_http_request_duration_seconds_count{") and 'method="POST"' in line:
            route = line.split('route="', 1)[1].split('"', 1)[0]
            out[route] = out.get(route, 0.0) + float(line.rpartition(" ")[2])
    return out
