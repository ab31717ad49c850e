"""The coordinator's process, before it serves: what start-up made is frozen (no
collection walks the app again) and the young generation is collected less often
(`csml.cli.operator._settle_heap`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Run in a child: freezing the heap is a process-wide change the test run must not get.
# uvicorn's `Server.run` is replaced by a probe: the state it sees is what serving sees.
PROBE = """
import gc, json, sys
import uvicorn
from csml.cli import operator

def probe(self, *args, **kwargs):
    walked = gc.get_objects()  # what a full collection walks (not the frozen)
    print(json.dumps({
        "threshold": list(gc.get_threshold()),
        "app_walked": any(o is self.config.app for o in walked),
        "walked": len(walked),
        "frozen": gc.get_freeze_count(),
    }))

uvicorn.Server.run = probe
operator._serve("127.0.0.1", 0, "warning", "human")
"""


def test_the_server_freezes_its_start_up_and_collects_young_objects_less_often(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "CSML_DATA_DIR": str(tmp_path / "data")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["threshold"][0] >= 10 * 700  # Python's default: 700
    assert not seen["app_walked"]  # the app is frozen: no collection walks it
    assert seen["frozen"] > seen["walked"]
