"""`csml app new`: the generated package installs, passes its own tests and serves jobs."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from csml.client import InvalidRequest
from tests.cluster import install_to_folder, running_cluster
from tests.e2e.containers.podman_cluster import UID, podman, podman_available

# Pip-installs scaffolded apps into folders and runs them on a cluster.
pytestmark = pytest.mark.timeout(1200)

NAME = "word-stats"
MODULE = "csml_app_word_stats"
TEXT = "It was the best of times, it was the worst of times.\nIt was the age of wisdom.\n"
TABLE = "species,petal_length\nsetosa,1.4\nsetosa,1.3\nvirginica,6.0\nversicolor,\n"


def csml_app_new(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "csml", "app", "new", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def scaffold_and_install(tmp_path: Path) -> tuple[Path, Path]:
    made = csml_app_new(NAME, "--dir", str(tmp_path), "--description", "Word & table stats")
    assert made.returncode == 0, made.stderr
    pkg = tmp_path / f"csml-app-{NAME}"
    site = install_to_folder(pkg, tmp_path / "site")
    return pkg, site


def test_generated_package_layout(tmp_path: Path) -> None:
    made = csml_app_new(NAME, "--dir", str(tmp_path), "--description", 'Says "hi" — ünïcode')
    assert made.returncode == 0, made.stderr
    pkg = tmp_path / f"csml-app-{NAME}"
    project = tomllib.loads((pkg / "pyproject.toml").read_text())
    assert project["project"]["name"] == f"csml-app-{NAME}"
    assert project["project"]["description"] == 'Says "hi" — ünïcode'
    assert project["project"]["entry-points"]["csml.apps"] == {NAME: f"{MODULE}:app"}
    assert any(d.startswith("csml") for d in project["project"]["dependencies"])
    assert (pkg / "src" / MODULE / "__init__.py").is_file()
    assert (pkg / "tests" / "test_operations.py").is_file()
    docker = (pkg / "Dockerfile").read_text()
    assert "ARG BASE=" in docker and "--no-index" in docker and "USER 10001:10001" in docker
    assert f'CMD ["csml", "worker", "--app", "{NAME}"' in docker
    assert f"csml-worker-{NAME}" in (pkg / "README.md").read_text()
    lint = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--no-cache",
            "--select",
            "E,F,W,I,B,UP,SIM,RUF",
            str(pkg),
        ],
        capture_output=True,
        text=True,
        cwd=pkg,
    )
    assert lint.returncode == 0, lint.stdout


@pytest.mark.parametrize("bad", ["Stats", "1stats", "my app", "a" * 41, "stats!", "échos"])
def test_invalid_name_is_refused_clearly(tmp_path: Path, bad: str) -> None:
    made = csml_app_new(bad, "--dir", str(tmp_path))
    assert made.returncode == 1
    assert f"invalid app name {bad!r}" in made.stderr and "Traceback" not in made.stderr
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_and_installed_app_are_refused(tmp_path: Path) -> None:
    existing = tmp_path / f"csml-app-{NAME}"
    existing.mkdir()
    (existing / "mine.txt").write_text("keep me")
    made = csml_app_new(NAME, "--dir", str(tmp_path))
    assert made.returncode == 1 and "already exists; not overwriting" in made.stderr
    assert [p.name for p in existing.iterdir()] == ["mine.txt"]
    taken = csml_app_new("echo", "--dir", str(tmp_path))
    assert taken.returncode == 1 and "'echo' is already installed" in taken.stderr
    assert not (tmp_path / "csml-app-echo").exists()
    multi = csml_app_new("fine", "--dir", str(tmp_path), "--description", "two\nlines")
    assert multi.returncode == 1 and "--description" in multi.stderr


def test_scaffolded_app_passes_its_tests_and_serves_jobs(tmp_path: Path) -> None:
    pkg, site = scaffold_and_install(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(site)}
    own = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=pkg,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert own.returncode == 0 and " passed" in own.stdout, own.stdout + own.stderr

    with running_cluster(tmp_path / "cluster") as cluster:
        cluster.env["PYTHONPATH"] = str(site)  # the worker's; the coordinator needs nothing
        cluster.start_worker(NAME)
        cluster.wait_workers(NAME, 1)
        client = cluster.new_user()
        info = client.app(NAME)
        assert info.description == "Word & table stats"
        assert {op.name for op in info.operations} == {"text_stats", "csv_summary"}

        job = client.submit(
            NAME, "text_stats", files={"text": TEXT.encode()}, params={"top": 2}
        ).wait(60)
        assert job.state.value == "succeeded", job.error
        assert job.result is not None
        assert (job.result["lines"], job.result["words"], job.result["characters"]) == (
            2,
            18,
            len(TEXT),
        )
        assert job.result["top"] == [{"word": "it", "count": 3}, {"word": "of", "count": 3}]
        rows = list(csv.DictReader(io.StringIO(job.download("frequencies", tmp_path).read_text())))
        assert {r["word"]: int(r["count"]) for r in rows}["times"] == 2

        table = client.submit(NAME, "csv_summary", files={"table": TABLE.encode()}).wait(60)
        assert table.state.value == "succeeded", table.error
        assert table.result is not None and table.result["rows"] == 4
        species, petal = table.result["columns"]
        assert (species["distinct"], species["top"][0], species["numeric"]) == (3, "setosa", False)
        assert (petal["missing"], petal["min"], petal["max"]) == (1, 1.3, 6.0)
        assert petal["mean"] == pytest.approx((1.4 + 1.3 + 6.0) / 3)
        summary = table.download("summary", tmp_path / "summary.csv").read_text()
        assert summary.splitlines()[0].startswith("column,filled,missing,numeric")

        # The coordinator validates against the schema the worker announced.
        with pytest.raises(InvalidRequest) as err:
            client.submit(NAME, "text_stats", files={"text": b"x"}, params={"top": 0})
        assert err.value.field == "params.top"
        broken = client.submit(NAME, "text_stats", files={"text": b"ok\n\xff\n"}).wait(60)
        assert broken.state.value == "failed" and "not UTF-8 text (line 2)" in (broken.error or "")

        # The README's command line works as written.
        cluster.csml("id", "new", "--url", cluster.url)
        (tmp_path / "in.txt").write_text(TEXT)
        out = cluster.csml(
            "submit",
            NAME,
            "text-stats",
            str(tmp_path / "in.txt"),
            "-p",
            "top=5",
            "--wait",
            "-o",
            str(tmp_path / "cli-out"),
        )
        assert "succeeded" in out.stdout
        saved = next((tmp_path / "cli-out").glob("frequencies*"))  # a suffix for its media type
        assert saved.read_text().startswith("word,count")


IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.mark.containers
@pytest.mark.timeout(1800)
@pytest.mark.skipif(
    not IN_CI and not (podman_available() and os.geteuid() == 0),
    reason="needs podman and runc, as root (scripts/build-images.sh installs them in CI)",
)
def test_scaffolded_image_builds_offline_and_serves_a_job(tmp_path: Path) -> None:
    """The generated Dockerfile, built from a wheelhouse with no network, runs as uid 10001
    and joins a coordinator with a join-token file, as README.md says."""
    root = Path(__file__).resolve().parents[2]
    base = os.environ.get("CSML_BASE_IMAGE", "localhost/debian-base:bookworm")
    script_env = {**os.environ, "PYTHON": sys.executable}
    if podman("image", "exists", base, check=False).returncode:  # built by the script, once
        script_env["CSML_IMAGES"] = "csml-worker-echo"
        subprocess.run(["bash", str(root / "scripts/build-images.sh")], env=script_env, check=True)
    else:  # csml's wheel from this tree, plus every dependency
        subprocess.run(
            ["bash", str(root / "scripts/build-images.sh"), "--wheelhouse"],
            env=script_env,
            check=True,
        )
    cache = Path(os.environ.get("CSML_CACHE_DIR", Path.home() / ".cache" / "csml"))
    made = csml_app_new(NAME, "--dir", str(tmp_path))
    assert made.returncode == 0, made.stderr
    pkg = tmp_path / f"csml-app-{NAME}"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-index", "--no-build-isolation",
         "--find-links", str(cache / "wheelhouse"), "--wheel-dir", str(pkg / "wheelhouse"),
         str(pkg), "csml"],
        check=True,
        timeout=300,
    )  # fmt: skip
    tag = f"localhost/csml-worker-{NAME}:test-{os.getpid()}"
    podman("build", "--quiet", "--build-arg", f"BASE={base}", "-t", tag, str(pkg), timeout=900)
    container = f"csml-scaffold-test-{os.getpid()}"
    try:
        with running_cluster(tmp_path / "cluster") as cluster:
            secret = tmp_path / "join-token"
            secret.write_text(cluster.join_token + "\n")
            os.chown(secret, UID, UID)
            secret.chmod(0o400)
            podman(
                "run", "--detach", "--name", container, "--network", "host",
                f"--env=CSML_COORDINATOR={cluster.url}",
                "--env=CSML_JOIN_TOKEN_FILE=/run/secrets/join-token",
                f"--volume={secret}:/run/secrets/join-token:ro", tag,
            )  # fmt: skip
            cluster.wait_workers(NAME, 1, timeout=60)
            assert podman("exec", container, "id", "-u").stdout.strip() == str(UID)
            job = cluster.new_user().submit(
                NAME, "text_stats", files={"text": TEXT.encode()}, params={"top": 1}
            )
            job.wait(60)
            assert job.state.value == "succeeded", job.error
            assert job.result is not None and job.result["top"] == [{"word": "it", "count": 3}]
    finally:
        podman("rm", "--force", "--time", "5", container, check=False)
        podman("rmi", "--force", tag, check=False)
