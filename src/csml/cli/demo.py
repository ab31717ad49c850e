"""`csml demo`: the main job, end to end, on the embedded default.

It runs `csml up` (coordinator and an OpenCV worker) as a child in its own
process group, with logs at error level in the demo's format (human on a
terminal), and stops it however the demo ends (done, failed, Ctrl-C): `csml up`
stops its worker, then its coordinator, and revokes its join token; if the demo
is killed outright, `csml up` notices (`--parent-pid`) and stops the same way.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer

from csml.cli.output import console
from csml.client import Client, CsmlError

STOP_TIMEOUT = 90.0  # `csml up` gives its worker 30 s to finish its jobs


def sample_photo() -> Path:
    try:
        import skimage
    except ImportError:
        raise CsmlError(
            "the sample photo comes with scikit-image: pip install 'csml[demo]'"
        ) from None
    return Path(skimage.__file__).parent / "data" / "astronaut.png"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CsmlError("the platform did not start; see the log above")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise CsmlError(f"the platform did not answer at {url} within {timeout:g} s")


def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the result.")] = Path(
        "csml-demo-output"
    ),
    data_dir: Annotated[
        Path | None, typer.Option(help="Platform data folder (default: a temporary one).")
    ] = None,
    log_format: Annotated[
        str,
        typer.Option(
            envvar="CSML_LOG_FORMAT",
            help="The platform's logs: auto (human on a terminal, JSON otherwise), json, human.",
        ),
    ] = "auto",
) -> None:
    """Start CSML on this machine, detect faces on a sample photo, print the result, stop."""
    from csml.cli.operator import checked_log_format

    photo = sample_photo()
    fmt = checked_log_format(log_format)
    data = data_dir or Path(tempfile.mkdtemp(prefix="csml-demo-"))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "CSML_DATA_DIR": str(data)}
    console.print(f"starting CSML at {url} (SQLite and workers in {data})")
    platform = subprocess.Popen(
        [
            *(sys.executable, "-m", "csml", "up", "--port", str(port), "--app", "opencv"),
            *("--log-level", "error", "--log-format", fmt, "--parent-pid", str(os.getpid())),
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        process_group=0,  # a terminal's Ctrl-C reaches the demo, which stops it in order
    )
    try:
        _wait_healthy(url, platform)
        with Client(url, token="") as client:
            identity = client.create_identity()
            console.print(f"anonymous identity {identity.id[:12]}")
            deadline = time.monotonic() + 60
            while client.app("opencv").workers == 0:
                if time.monotonic() > deadline:
                    raise CsmlError("no opencv worker joined within 60 s")
                time.sleep(0.2)
            job = client.submit("opencv", "detect_faces", files={"image": photo})
            console.print(f"job {job.id[:12]}: detect_faces on {photo.name}")
            job.wait(timeout=120)
            if job.state.value != "succeeded":
                raise CsmlError(f"the job {job.state.value}: {job.error}")
            output.mkdir(parents=True, exist_ok=True)
            saved = job.download("annotated", output / "annotated.png")
            assert job.result is not None
            console.print(f"faces found: {job.result['count']} {job.result['faces']}")
            console.print(f"annotated image: [bold]{saved.resolve()}[/]")
    finally:
        console.print("stopping CSML")
        platform.terminate()  # its worker first, then the coordinator
        try:
            platform.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            platform.kill()  # its worker notices its parent is gone and stops too
            platform.wait()
