"""The `csml` command line against a real cluster, as a user would type it."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import cv2
import pytest

from tests.cluster import Cluster

# Starts a coordinator and worker processes (30-200 s under load); each CLI call is a new
# interpreter.
pytestmark = pytest.mark.timeout(300)


def test_cli_session(cluster: Cluster, photo: Path, tmp_path: Path) -> None:
    env = {**cluster.env, "CSML_CONFIG": str(tmp_path / "cfg" / "config.toml")}

    def csml(*args: str, check: bool = True) -> tuple[int, str, str]:
        r = cluster.csml(*args, env=env, check=check)
        return r.returncode, r.stdout, r.stderr

    _, out, _ = csml("id", "new", "--url", cluster.url)
    config = tmp_path / "cfg" / "config.toml"
    assert stat.S_IMODE(os.stat(config).st_mode) == 0o600
    ident = out.split()[1]
    assert len(ident) == 64 and ident in config.read_text()

    _, out, _ = csml("apps")
    assert "opencv" in out and "detect-faces" in out

    _, out, _ = csml(
        "submit", "opencv", "detect-faces", str(photo), "--wait", "-o", str(tmp_path / "out")
    )
    assert "succeeded" in out and '"count": 1' in out
    job_id = out.split()[1]
    annotated = tmp_path / "out" / "annotated.png"
    assert cv2.imread(str(annotated)) is not None

    _, out, _ = csml(
        "submit",
        "opencv",
        "detect_faces",
        str(photo),
        "-p",
        "min_neighbors=3",
        "-p",
        "scale_factor=1.2",
    )
    second = out.split()[1]
    _, out, _ = csml("status", second[:12], "--wait", "30")
    assert "succeeded" in out

    _, out, _ = csml("jobs")
    assert job_id[:12] in out and second[:12] in out

    _, out, _ = csml("result", job_id[:12], "-o", str(tmp_path / "again"))
    assert json.loads(out.splitlines()[0])["count"] == 1
    assert (tmp_path / "again" / "annotated.png").read_bytes() == annotated.read_bytes()

    _, out, _ = csml("submit", "echo", "echo", "-p", "sleep=60")
    long_job = out.split()[1]
    _, out, _ = csml("cancel", long_job[:12])
    assert "cancelled" in out


def test_cli_errors_are_one_clear_line(cluster: Cluster, tmp_path: Path) -> None:
    env = {**cluster.env, "CSML_CONFIG": str(tmp_path / "config.toml")}
    cluster.csml("id", "new", "--url", cluster.url, env=env)
    cases = [
        (["status", "0123456789abcdef"], "no job '0123456789abcdef'"),
        (["submit", "opencv", "detect-faces", str(tmp_path / "missing.jpg")], "no such file"),
        (
            ["submit", "opencv", "detect-faces", "/etc/hostname", "-p", "scale_factor=9"],
            "params.scale_factor",
        ),
        (["submit", "nope", "x"], "no application 'nope'"),
        (["submit", "opencv", "nope"], "no operation 'nope'"),
        (["apps", "--url", "http://127.0.0.1:9"], "cannot reach the coordinator"),
    ]
    for args, expected in cases:
        r = cluster.csml(*args, env=env, check=False)
        assert r.returncode == 1, args
        assert expected in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr + r.stdout
        assert r.stderr.startswith("error:")
