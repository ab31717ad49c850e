"""The container images, really built and run with Podman: a cluster of containers
(PostgreSQL, two coordinators, a worker per app) on a private container network, real jobs
for every app submitted from the host with the CLI, a worker container killed mid-job."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from csml.client import Client
from tests.e2e.containers.podman_cluster import (
    APPS,
    UID,
    ContainerCluster,
    container_cluster,
    ensure_images,
    image,
    missing_images,
    podman,
    podman_available,
)

IN_CI = os.environ.get("CI", "").lower() == "true"
pytestmark = [
    pytest.mark.containers,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(
        not podman_available() and not IN_CI,
        reason="podman and runc are not installed (apt-get install podman runc debootstrap; "
        "CI installs them through scripts/build-images.sh)",
    ),
]
if IN_CI or podman_available():
    pytestmark.append(
        pytest.mark.skipif(os.geteuid() != 0, reason="the Podman set-up here needs root")
    )

# Libraries each image must have, and those it must not (the dlib app decodes with OpenCV).
HAS = {
    "csml-coordinator": {"fastapi", "sqlalchemy", "psycopg", "uvicorn"},
    "csml-worker-echo": set(),
    "csml-worker-opencv": {"cv2", "numpy"},
    "csml-worker-dlib": {"dlib", "cv2", "numpy"},
    "csml-worker-dynet": {"dynet", "numpy"},
    "csml-client": {"httpx", "typer"},
}
LIBS = {"fastapi", "sqlalchemy", "psycopg", "uvicorn", "cv2", "dlib", "dynet", "numpy"}
HEALTH_WAIT = 90.0  # seconds a container has to pass one health check


@pytest.fixture(scope="module")
def images() -> None:
    """Build every image, or bring it up to date (seconds when nothing changed).

    CSML_USE_BUILT_IMAGES=1 uses the images as they are (e.g. built by CI just before)."""
    if os.environ.get("CSML_USE_BUILT_IMAGES") != "1":
        seconds = ensure_images()
        print(f"scripts/build-images.sh took {seconds:.0f} s")
    assert not missing_images(), "scripts/build-images.sh did not build every image"


@pytest.fixture(scope="module")
def cluster(images: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContainerCluster]:
    root = tmp_path_factory.mktemp("containers")
    workers = {
        "echo-1": "echo@coord1",
        "opencv-1": "opencv@coord2",
        "dlib-1": "dlib@coord1",
        "dynet-1": "dynet@coord2",
    }
    with container_cluster(root, workers) as c:
        yield c


def csml(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    """The CLI on the host, as a user runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "csml", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"csml {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def user_env(tmp_path: Path, url: str) -> dict[str, str]:
    return {
        **os.environ,
        "CSML_CONFIG": str(tmp_path / "user.toml"),
        "CSML_INSECURE_HTTP": "1",
        "CSML_URL": url,
    }


def job_id(output: str) -> str:
    return next(ln.split()[1] for ln in output.splitlines() if ln.startswith("submitted "))


def result_of(output: str) -> dict[str, object]:
    line = next(ln for ln in output.splitlines() if ln.startswith("result "))
    value = json.loads(line.removeprefix("result").strip())
    assert isinstance(value, dict)
    return value


def table(path: Path, rows: list[tuple[float, float, str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["x", "y", "label"])
        writer.writerows(rows)
    return path


def two_blobs() -> list[tuple[float, float, str]]:
    """Two well-separated classes on a grid (no randomness, no download)."""
    rows = []
    for i in range(6):
        for j in range(5):
            rows.append((0.1 * i, 0.1 * j, "a"))
            rows.append((3 + 0.1 * i, 3 + 0.1 * j, "b"))
    return rows


# ------------------------------------------------------------------------ the images


@pytest.mark.parametrize("name", sorted(HAS))
def test_image_is_non_root_and_holds_only_its_apps_libraries(images: None, name: str) -> None:
    probe = (
        "import importlib.util as u, json, os; "
        f"print(json.dumps([os.getuid(), os.getgid(), sorted(m for m in {sorted(LIBS)!r} "
        "if u.find_spec(m))]))"
    )
    out = podman("run", "--rm", "--entrypoint", "python", image(name), "-c", probe).stdout
    uid, gid, found = json.loads(out)
    assert (uid, gid) == (UID, UID)
    assert set(found) == HAS[name] & LIBS, found
    user = podman("image", "inspect", "--format", "{{.Config.User}}", image(name)).stdout
    assert user.strip() == f"{UID}:{UID}"
    health = podman("image", "inspect", "--format", "{{json .Config.Healthcheck}}", image(name))
    assert "csml-healthcheck" in health.stdout


def test_an_app_image_cannot_import_another_apps_library(images: None) -> None:
    for img, module in (("csml-worker-opencv", "dlib"), ("csml-worker-dlib", "dynet"),
                        ("csml-worker-dynet", "cv2"), ("csml-coordinator", "cv2")):  # fmt: skip
        done = podman("run", "--rm", "--entrypoint", "python", image(img), "-c",
                      f"import {module}", check=False)  # fmt: skip
        assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr, (img, done.stderr)


# ------------------------------------------------------------------------ the cluster


def test_containers_are_healthy_and_the_bootstrap_token_was_registered_once(
    cluster: ContainerCluster,
) -> None:
    for name in cluster.containers:
        if not name.endswith("-pg"):
            # A health check may time out (5 s) on a loaded machine: the container must
            # pass one within HEALTH_WAIT, as the engine's own retries would let it.
            deadline = time.monotonic() + HEALTH_WAIT
            while True:
                done = podman("healthcheck", "run", name, check=False)
                if done.returncode == 0 or time.monotonic() > deadline:
                    break
                time.sleep(2)
            assert done.returncode == 0, f"{name}: {done.stdout}{done.stderr}\n{cluster.logs(name)}"
    whoami = podman("exec", f"{cluster.prefix}-coord1", "id", "-u").stdout.strip()
    assert whoami == str(UID)
    # Two coordinators registered the same bootstrap token: one row, and it works (workers joined).
    sql = "SELECT count(*) FROM join_tokens"
    out = podman(
        "exec", "--env", f"PGPASSWORD={cluster.pg_password}", f"{cluster.prefix}-pg",
        "/usr/lib/postgresql/15/bin/psql", "-h", "127.0.0.1", "-U", "csml", "-d", "csml",
        "-tAc", sql,
    ).stdout  # fmt: skip
    assert out.strip() == "1"
    apps = {a["name"]: a for a in httpx.get(f"{cluster.urls['coord2']}/v1/apps").json()}
    assert all(apps[a]["workers"] >= 1 for a in APPS), apps
    # As uid 10001 in a container there is no root for a netns or per-job uids, but an
    # unprivileged user+net namespace still cuts each job off the network.
    logs = cluster.logs(f"{cluster.prefix}-opencv-1")
    joined = json.loads(next(ln for ln in logs.splitlines() if '"joined the cluster"' in ln))
    print("worker sandbox in a container:", joined["sandbox"])
    assert "no network (user+net namespace)" in joined["sandbox"]
    assert "worker's uid" in joined["sandbox"]


def test_real_jobs_for_every_app_from_the_host_cli(
    cluster: ContainerCluster, tmp_path: Path, photo: Path
) -> None:
    env1 = user_env(tmp_path, cluster.urls["coord1"])
    csml(env1, "id", "new")
    env2 = {**env1, "CSML_URL": cluster.urls["coord2"]}  # the same identity, other replica

    out = csml(env1, "submit", "echo", "echo", "-p", "greeting=hi", "--wait")
    assert result_of(out)["params"] == {"sleep": 0.0, "greeting": "hi"}

    out = csml(env2, "submit", "opencv", "detect-faces", str(photo), "--wait", "-o",
               str(tmp_path / "cv"))  # fmt: skip
    assert result_of(out)["count"] == 1
    (annotated,) = (tmp_path / "cv").glob("annotated*")
    assert annotated.stat().st_size > 1000

    out = csml(env1, "submit", "dlib", "detect-faces", str(photo), "-p", "adjust_threshold=0.5",
               "--wait")  # fmt: skip
    assert result_of(out)["count"] == 1

    data = table(tmp_path / "blobs.csv", two_blobs())
    out = csml(env2, "submit", "dlib", "train-svm", str(data), "--wait", "-o",
               str(tmp_path / "svm"))  # fmt: skip
    (svm_model,) = (tmp_path / "svm").glob("model*")
    out = csml(env1, "submit", "dlib", "predict-svm", f"model={svm_model}", f"data={data}",
               "--wait")  # fmt: skip
    assert result_of(out).get("accuracy") == 1.0, out

    out = csml(env1, "submit", "dynet", "train-mlp", str(data), "-p", "epochs=40",
               "--wait", "-o", str(tmp_path / "mlp"))  # fmt: skip
    (mlp_model,) = (tmp_path / "mlp").glob("model*")
    out = csml(env2, "submit", "dynet", "predict-mlp", f"model={mlp_model}",
               f"data={data}", "--wait", "-o", str(tmp_path / "pred"))  # fmt: skip
    assert result_of(out).get("accuracy") == 1.0, out


def test_a_worker_container_killed_mid_job_its_job_completes_elsewhere(
    cluster: ContainerCluster, tmp_path: Path
) -> None:
    env = user_env(tmp_path, cluster.urls["coord1"])
    csml(env, "id", "new")
    jid = job_id(csml(env, "submit", "echo", "echo", "-p", "sleep=8", "-p", "tag=survivor"))
    token = tomllib.loads((tmp_path / "user.toml").read_text())["token"]
    with Client(cluster.urls["coord2"], token, insecure_http=True) as user:
        job = user.job(jid)
        deadline = time.monotonic() + 60
        while job.state.value != "running" or job.progress[0] <= 0:
            assert time.monotonic() < deadline, f"job never ran: {job.state}\n{cluster.logs()}"
            time.sleep(0.2)
            job.refresh()
        # echo-1 is the only echo worker, so it holds the job: kill it, start another one.
        cluster.kill(f"{cluster.prefix}-echo-1")
        cluster.start_worker("echo", "coord2", "echo-2")
        deadline = time.monotonic() + 120
        while not job.done:
            assert time.monotonic() < deadline, f"job did not finish\n{cluster.logs()}"
            job.refresh(wait=10)
        assert job.state.value == "succeeded", (job.error, cluster.logs())
        assert job.data.attempts == 2
        assert job.result == {"params": {"sleep": 8.0, "tag": "survivor"}}
    out = csml(env, "status", jid)
    assert "succeeded" in out and "attempt 2/" in out, out
