"""Every operation a built-in app declares `deterministic` really is: run twice, each
time in a fresh Python process (as two workers would), on the same inputs and params, it
gives the same digest (`csml.coordinator.verification.digest`: result and outputs'
SHA-256), the one verification compares. And every deterministic operation is covered
here, so a new one cannot be declared without being checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from csml.apps.registry import installed_apps
from tests.integration.apps import dnn_builders as nets
from tests.integration.apps.support import Dataset

pytestmark = pytest.mark.timeout(600)

RUN_ONE = """
import hashlib, json, sys
from pathlib import Path
from csml.apps.registry import load_app
from csml.apps.testing import run_operation
from csml.coordinator.verification import digest

app_name, operation, params, inputs, workdir = json.loads(sys.argv[1])
ran = run_operation(load_app(app_name), operation, params,
                    {k: Path(v) for k, v in inputs.items()}, Path(workdir))
outputs = [(n, hashlib.sha256(p.read_bytes()).hexdigest()) for n, p in ran.outputs.items()]
print(digest("succeeded", ran.result, None, outputs))
"""


def digest_in_a_new_process(
    app: str, operation: str, params: dict[str, Any], inputs: dict[str, Path], workdir: Path
) -> str:
    arg = json.dumps([app, operation, params, {k: str(v) for k, v in inputs.items()}, str(workdir)])
    done = subprocess.run(
        [sys.executable, "-c", RUN_ONE, arg], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def cases(tmp: Path, astronaut: Path, iris: Dataset) -> dict[tuple[str, str], tuple[Any, ...]]:
    """(app, operation) -> (params, inputs) for every deterministic built-in operation."""
    from csml.apps.testing import run_operation

    out: dict[tuple[str, str], tuple[Any, ...]] = {
        ("echo", "echo"): ({"n": 1, "s": "ü"}, {"data": astronaut}),
    }
    for op in ("detect_faces", "edges", "resize", "grayscale", "blur"):
        params = {"width": 64} if op == "resize" else {}
        out[("opencv", op)] = (params, {"image": astronaut})
    out[("dlib", "detect_faces")] = ({}, {"image": astronaut})
    apps = installed_apps()
    if "dlib" in apps:
        trained = run_operation(apps["dlib"], "train_svm", {}, {"data": iris.csv(tmp)})
        out[("dlib", "predict_svm")] = (
            {},
            {"model": trained.output("model"), "data": iris.csv(tmp)},
        )
    net = tmp / "cnn.onnx"
    net.write_bytes(nets.onnx_cnn(seed=3).data)
    out[("opencv", "dnn_infer")] = ({"size": [8, 8]}, {"network": net, "image": astronaut})
    return out


def test_deterministic_operations_give_the_same_digest_in_two_processes(
    tmp_path: Path, astronaut: Path, datasets: Any
) -> None:
    apps = installed_apps()
    declared = {
        (name, op_name)
        for name, app in apps.items()
        for op_name, op in app.operations.items()
        if op.deterministic
    }
    assert declared, "no deterministic operation is installed"
    known = cases(tmp_path, astronaut, datasets("iris"))
    assert declared <= set(known), f"not covered here: {sorted(declared - set(known))}"
    for app, operation in sorted(declared):
        params, inputs = known[(app, operation)]
        first, second = (
            digest_in_a_new_process(
                app, operation, params, inputs, tmp_path / f"{app}-{operation}-{i}"
            )
            for i in (1, 2)
        )
        assert first == second, f"{app}.{operation} differs between two processes"
        print(f"{app}.{operation}: {first[:16]} twice")
