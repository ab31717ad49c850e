"""HTTPS with a pinned self-signed certificate; no plain HTTP off the machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from csml.client import Client, CsmlError, Unreachable
from tests.cluster import FAST_SETTINGS, free_port, wait_for

# `csml up --tls` starts a coordinator and workers, then waits for them.
pytestmark = pytest.mark.timeout(300)


def test_up_tls_serves_https_to_pinned_clients_and_workers(tmp_path: Path, photo: Path) -> None:
    port = free_port()
    env = {**os.environ, **FAST_SETTINGS, "CSML_DATA_DIR": str(tmp_path / "data")}
    log = open(tmp_path / "up.log", "w+")  # noqa: SIM115
    up = subprocess.Popen(
        [sys.executable, "-m", "csml", "up", "--tls", "--port", str(port), "--app", "opencv"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def pin() -> str | None:
            text = (tmp_path / "up.log").read_text()
            for line in text.splitlines():
                if line.startswith("TLS certificate SHA-256:"):
                    return line.split()[-1]
            return None

        fingerprint = wait_for(pin, timeout=60)
        url = f"https://127.0.0.1:{port}"
        with Client(url, token="", pin_sha256=fingerprint) as client:

            def ready() -> bool:
                try:
                    return client.app("opencv").workers == 1
                except Unreachable:
                    return False

            wait_for(ready, timeout=60)
            client.create_identity()
            job = client.submit("opencv", "detect_faces", files={"image": photo}).wait(60)
            assert job.result is not None and job.result["count"] == 1
        wrong = "0" * 64
        with Client(url, token="", pin_sha256=wrong) as client, pytest.raises(Unreachable):
            client.apps()
        with pytest.raises(httpx.ConnectError):  # no pin: the system CA store refuses it
            httpx.get(f"{url}/healthz")
        assert httpx.get(f"{url}/healthz", verify=False).json()["status"] == "ok"
    finally:
        os.killpg(up.pid, signal.SIGTERM)
        up.wait(timeout=30)


def test_plain_http_off_the_machine_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CsmlError, match=r"refusing plain HTTP to 198\.18\.0\.7"):
        Client("http://198.18.0.7:8600", token="x")
    Client("http://198.18.0.7:8600", token="x", insecure_http=True).close()
    Client("http://127.0.0.1:8600", token="x").close()
    Client("http://[::1]:8600", token="x").close()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "csml",
            "worker",
            "--app",
            "echo",
            "--coordinator",
            "http://198.18.0.7:8600",
            "--join-token",
            "csmljoin_x",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CSML_DATA_DIR": str(tmp_path)},
    )
    assert r.returncode == 1
    assert "refusing plain HTTP" in r.stderr and "Traceback" not in r.stderr
