"""A CSML cluster of Podman containers on a private network, for tests and benchmarks.

PostgreSQL, coordinators and workers each run in a container of the images
`scripts/build-images.sh` builds, on a container network of their own with an explicit
subnet in 198.19.0.0/16 (part of 198.18.0.0/15) and name resolution between them.
The host talks to the coordinators at their container addresses (plain HTTP on that
private network, hence CSML_INSECURE_HTTP=1). `stop()` removes every container and the
network even after a failure; nothing is sent anywhere else.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from csml import ids

ROOT = Path(__file__).resolve().parents[3]
PODMAN = ("podman", "--runtime", "runc")
TAG = os.environ.get("CSML_IMAGE_TAG", "dev")
APPS = ("echo", "opencv", "dlib", "dynet")
IMAGES = (
    "csml-coordinator",
    *(f"csml-worker-{app}" for app in APPS),
    "csml-client",
    "csml-test-postgres",
)
UID = 10001  # every CSML image runs as this uid/gid (deploy/images/Dockerfile)
FAST = {  # short leases so a killed worker's job is requeued within seconds
    "CSML_LEASE_SECONDS": "3",
    "CSML_HEARTBEAT_SECONDS": "0.5",
    "CSML_REAP_INTERVAL_SECONDS": "0.2",
    "CSML_WORKER_LIVE_SECONDS": "5",
    "CSML_CLAIM_WAIT": "1",
    "CSML_POW_DIFFICULTY": "8",
}


def image(name: str) -> str:
    return f"localhost/{name}:{TAG}"


def podman_available() -> bool:
    return shutil.which("podman") is not None and shutil.which("runc") is not None


def podman(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])} failed: {result.stderr.strip()[-2000:]}")
    return result


def missing_images() -> list[str]:
    return [n for n in IMAGES if podman("image", "exists", image(n), check=False).returncode]


def ensure_images(timeout: float = 1800) -> float:
    """Build the images (scripts/build-images.sh, idempotent); returns the seconds it took."""
    start = time.monotonic()
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-images.sh")],
        env={**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)},
        check=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return time.monotonic() - start


class ContainerCluster:
    def __init__(self, root: Path, settings: dict[str, str] | None = None) -> None:
        self.root = root
        self.prefix = f"csmlt-{os.getpid()}-{secrets.token_hex(3)}"
        self.network = self.prefix
        self.settings = {**FAST, **(settings or {})}
        self.containers: list[str] = []
        self.secrets = root / "secrets"
        self.data = root / "data"
        self.join_token = ids.new_secret("csmljoin")
        self.pg_password = secrets.token_urlsafe(16)
        self.urls: dict[str, str] = {}

    # -- plumbing
    def _secret(self, name: str, value: str) -> Path:
        """The file holding one secret, written once: running containers bind-mount it, and
        rewriting it in place (truncate, then write) let a worker starting meanwhile read it
        empty ("--join-token-file: … is empty" in CI)."""
        self.secrets.mkdir(parents=True, exist_ok=True)
        path = self.secrets / name
        if path.exists():
            if path.read_text() != value + "\n":
                raise ValueError(f"secret {name!r} is already written with another value")
            return path
        path.write_text(value + "\n")
        os.chown(path, UID, UID)
        path.chmod(0o400)
        return path

    def _run(
        self,
        name: str,
        img: str,
        options: list[str],
        command: list[str],
        env: dict[str, str],
    ) -> str:
        full = f"{self.prefix}-{name}"
        self.containers.append(full)
        flags = [f"--env={k}={v}" for k, v in env.items()]
        # No health-check timer (it needs systemd); `podman healthcheck run` checks on demand.
        podman(
            "run", "--detach", "--name", full, "--hostname", name, "--network", self.network,
            "--network-alias", name,
            "--health-interval=disable", *flags, *options, img, *command,
        )  # fmt: skip
        return full

    def ip(self, container: str) -> str:
        out = podman(
            "inspect", "--format",
            f'{{{{(index .NetworkSettings.Networks "{self.network}").IPAddress}}}}',
            container,
        ).stdout.strip()  # fmt: skip
        if not out.startswith("198.19."):
            raise RuntimeError(f"{container} has no address on {self.network}: {out!r}")
        return out

    # -- the parts
    def start_network(self) -> None:
        last = ""
        for _ in range(8):
            subnet = f"198.19.{secrets.randbelow(256)}.0/24"
            made = podman("network", "create", "--subnet", subnet, self.network, check=False)
            if made.returncode == 0:
                return
            last = made.stderr
        raise RuntimeError(f"podman network create failed: {last.strip()}")

    def start_postgres(self) -> None:
        env = {
            "POSTGRES_PASSWORD": self.pg_password,
            "POSTGRES_USER": "csml",
            "POSTGRES_DB": "csml",
        }
        name = self._run("pg", image("csml-test-postgres"), [], [], env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready = podman(
                "exec", name, "/usr/lib/postgresql/15/bin/pg_isready", "-h", "127.0.0.1", "-q",
                check=False,
            )  # fmt: skip
            if ready.returncode == 0:
                return
            time.sleep(0.3)
        raise RuntimeError("PostgreSQL did not start:\n" + self.logs(name))

    def start_coordinator(self, name: str) -> str:
        """A coordinator sharing the store and the data volume; returns its URL from the host."""
        db_url = f"postgresql+psycopg://csml:{self.pg_password}@pg:5432/csml"
        self.data.mkdir(exist_ok=True)
        os.chown(self.data, UID, UID)
        env = {
            **self.settings,
            "CSML_DATABASE_URL_FILE": "/run/secrets/database_url",
            "CSML_BOOTSTRAP_JOIN_TOKEN_FILE": "/run/secrets/join_token",
        }
        options = [
            f"--volume={self._secret('database_url', db_url)}:/run/secrets/database_url:ro",
            f"--volume={self._secret('join_token', self.join_token)}:/run/secrets/join_token:ro",
            f"--volume={self.data}:/data",
        ]
        full = self._run(name, image("csml-coordinator"), options, [], env)
        url = f"http://{self.ip(full)}:8000"
        self.urls[name] = url
        wait_healthy(url, full, lambda: self.logs(full))
        return url

    def start_worker(self, app: str, coordinator: str, name: str, slots: int = 1) -> str:
        env = {
            **self.settings,
            "CSML_COORDINATOR": f"http://{coordinator}:8000",
            "CSML_JOIN_TOKEN_FILE": "/run/secrets/join_token",
            "CSML_INSECURE_HTTP": "1",
        }
        secret = self._secret("join_token", self.join_token)
        options = [f"--volume={secret}:/run/secrets/join_token:ro"]
        return self._run(name, image(f"csml-worker-{app}"), options, [f"--slots={slots}"], env)

    def wait_workers(self, app: str, count: int, timeout: float = 120) -> None:
        url = next(iter(self.urls.values()))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = {a["name"]: a for a in httpx.get(f"{url}/v1/apps", timeout=5).json()}
            if app in found and found[app]["workers"] >= count:
                return
            time.sleep(0.3)
        raise AssertionError(f"{count} {app} worker(s) did not join in {timeout} s:\n{self.logs()}")

    def kill(self, container: str) -> None:
        podman("kill", "--signal", "KILL", container)

    def logs(self, container: str | None = None) -> str:
        names = [container] if container else self.containers
        out = []
        for name in names:
            got = podman("logs", name, check=False)
            out.append(f"--- {name}\n{got.stdout[-3000:]}{got.stderr[-3000:]}")
        return "\n".join(out)

    def stop(self) -> None:
        if self.containers:
            podman("rm", "--force", "--time", "2", *self.containers, check=False, timeout=180)
        podman("network", "rm", "--force", self.network, check=False)
        if self.data.exists():  # job files belong to uid 10001
            shutil.rmtree(self.data, ignore_errors=True)


def running(container: str) -> bool:
    state = podman("inspect", "--format", "{{.State.Running}}", container, check=False)
    return state.stdout.strip() == "true"


def wait_healthy(url: str, container: str, logs: Callable[[], str], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and running(container):
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise RuntimeError(f"coordinator {container} did not become healthy:\n{logs()}")


@contextlib.contextmanager
def container_cluster(
    root: Path, workers: dict[str, str], settings: dict[str, str] | None = None
) -> Iterator[ContainerCluster]:
    """PostgreSQL, coordinators `coord1` and `coord2`, and `workers` {name: "app@coordinator"}."""
    cluster = ContainerCluster(root, settings)
    try:
        cluster.start_network()
        cluster.start_postgres()
        cluster.start_coordinator("coord1")
        cluster.start_coordinator("coord2")
        for name, where in workers.items():
            app, _, coordinator = where.partition("@")
            cluster.start_worker(app, coordinator, name)
        for app in {w.partition("@")[0] for w in workers.values()}:
            cluster.wait_workers(app, 1)
        yield cluster
    finally:
        cluster.stop()
