"""Row 9 of issue 12: clients trust no names from the server.

A hostile coordinator (a real HTTP server on 127.0.0.1, in a thread) answers the
job, output and model routes with names that are paths (`../x`, an absolute
path, `a/b`, `a\\b`), `..`, empty, hidden (`.bashrc`) or hold control characters.
Through the SDK and the CLI (`csml result -o DIR`, `csml models download -o DIR`)
each is refused with one clear line naming it, and nothing is written anywhere
(neither outside DIR nor in it). A plain name still downloads, so the server
does serve files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from csml.client import Client, CsmlError

PAYLOAD = b"written by a hostile coordinator"
GOOD = "annotated"


def hostile_names(elsewhere: Path) -> list[str]:
    return [
        "../x",
        "../../x",
        str(elsewhere / "x"),
        "a/b",
        "a\\b",
        "x\x07",
        "x\ny",
        "..",
        "",
        ".bashrc",
    ]


def job_id(i: int) -> str:
    return f"{i + 1:064x}"


def job_body(jid: str, names: list[str]) -> dict[str, Any]:
    return {
        "id": jid,
        "app": "echo",
        "operation": "echo",
        "params": {},
        "state": "succeeded",
        "created_at": "2026-01-01T00:00:00Z",
        "max_attempts": 3,
        "result": {},
        "outputs": {
            n: {"name": n, "size": len(PAYLOAD), "sha256": "0" * 64, "media_type": "text/plain"}
            for n in names
        },
    }


def model_body(mid: str, app: str) -> dict[str, Any]:
    return {
        "id": mid,
        "app": app,
        "kind": "svm",
        "format": "dlib-svm",
        "format_version": 1,
        "name": "model",
        "size": len(PAYLOAD),
        "sha256": "0" * 64,
        "media_type": "application/zip",
        "created_at": "2026-01-01T00:00:00Z",
    }


class HostileCoordinator:
    """Jobs whose outputs (and models whose apps) carry the names it is given; any other
    GET gets a file."""

    def __init__(self, jobs: dict[str, list[str]], models: dict[str, str]) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                parts = [unquote(p) for p in urlsplit(self.path).path.split("/")[1:]]
                owner.requests.append(self.path)
                if parts[:2] == ["v1", "jobs"] and len(parts) == 3 and parts[2] in jobs:
                    self.reply(json.dumps(job_body(parts[2], jobs[parts[2]])).encode())
                elif parts[:2] == ["v1", "models"] and len(parts) == 4 and parts[2] in models:
                    self.reply(json.dumps(model_body(parts[2], models[parts[2]])).encode())
                else:  # any file, whatever the path became on the way
                    self.reply(PAYLOAD, "application/octet-stream")

            def reply(
                self, body: bytes, media: str = "application/json", status: int = 200
            ) -> None:
                self.send_response(status)
                self.send_header("Content-Type", media)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.requests: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HostileCoordinator:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """out/ (the chosen folder) inside a parent, and an unrelated folder elsewhere."""
    (tmp_path / "parent" / "out").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    out, elsewhere = tmp_path / "parent" / "out", tmp_path / "elsewhere"
    return {"root": tmp_path, "out": out, "elsewhere": elsewhere}


def written(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


@pytest.fixture
def hostile(layout: dict[str, Path]) -> Iterator[tuple[HostileCoordinator, list[str]]]:
    names = hostile_names(layout["elsewhere"])
    jobs = {job_id(i): [n] for i, n in enumerate(names)}
    jobs[job_id(len(names))] = [GOOD]
    jobs[job_id(len(names) + 1)] = [GOOD, "../x"]  # one bad name spoils the lot
    models = {"m" + job_id(i)[1:]: n for i, n in enumerate(["../..", "a/b", "x\x07", "/tmp"])}
    models["m" + job_id(99)[1:]] = "dlib"
    with HostileCoordinator(jobs, models) as server:
        yield server, names


def test_the_sdk_refuses_every_unsafe_output_name(
    hostile: tuple[HostileCoordinator, list[str]], layout: dict[str, Path]
) -> None:
    server, names = hostile
    out = layout["out"]
    with Client(server.url, "a-token") as client:
        for i, name in enumerate(names):
            job = client.job(job_id(i))
            with pytest.raises(CsmlError) as caught:
                job.download(name, out)
            assert caught.value.message.startswith(f"refusing the output name {name!r}: ")
            with pytest.raises(CsmlError):
                job.download_all(out)
            with pytest.raises(CsmlError):
                list(job.iter_output(name))
        assert written(layout["root"]) == []
        mixed = client.job(job_id(len(names) + 1))
        with pytest.raises(CsmlError, match=r"'\.\./x'"):
            mixed.download_all(out)
        assert written(layout["root"]) == []
        saved = client.job(job_id(len(names))).download_all(out)
    assert saved == [out / "annotated.txt"] and saved[0].read_bytes() == PAYLOAD
    assert not any("outputs/.." in r or "outputs/a/" in r for r in server.requests)


def test_the_sdk_refuses_unsafe_model_file_names(
    hostile: tuple[HostileCoordinator, list[str]], layout: dict[str, Path]
) -> None:
    server, _ = hostile
    out = layout["out"]
    with Client(server.url, "a-token") as client:
        for i in range(4):
            with pytest.raises(CsmlError, match=r"^refusing the model file name "):
                client.download_model("m" + job_id(i)[1:], out)
        assert written(layout["root"]) == []
        saved = client.download_model("m" + job_id(99)[1:], out)
    assert saved.parent == out and saved.read_bytes() == PAYLOAD


def csml(url: str, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CSML_CONFIG": str(root / "config.toml"), "CSML_TOKEN": "a-token"}
    return subprocess.run(
        [sys.executable, "-m", "csml", *args, "--url", url],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_cli_refuses_them_in_one_line_and_writes_nothing(
    hostile: tuple[HostileCoordinator, list[str]], layout: dict[str, Path]
) -> None:
    server, names = hostile
    out, root = layout["out"], layout["root"]
    for i, name in enumerate(names):
        run = csml(server.url, root, "result", job_id(i), "-o", str(out))
        assert run.returncode == 1, (name, run.stdout, run.stderr)
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, (name, run.stderr)
        assert lines[0].startswith(f"error: refusing the output name {name!r}: "), lines
        assert "Traceback" not in run.stderr + run.stdout
    run = csml(server.url, root, "models", "download", "m" + job_id(0)[1:], "-o", str(out))
    assert run.returncode == 1 and "refusing the model file name '../..-svm-" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert written(root) == []
    good = csml(server.url, root, "result", job_id(len(names)), "-o", str(out))
    assert good.returncode == 0, good.stderr
    assert written(root) == ["parent/out/annotated.txt"]
