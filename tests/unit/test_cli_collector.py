"""`python -m csml` loads the CLI's modules with the garbage collector off and freezes
them (`csml/__main__.py`): no collection walks the ~50,000 objects start-up makes, during
the load or after it; and what a command made is frozen when it ends (`csml.cli.main
.main`), so the interpreter's collection at exit walks none of it either. Run in a fresh
interpreter: freezing is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import gc, json, runpy, sys
starts = []  # the frozen objects' count when each collection started, once the CLI loads


def started(phase, info):
    if phase == "start" and "csml.cli.main" in sys.modules:  # (not runpy's own compiling)
        starts.append(gc.get_freeze_count())


gc.callbacks.append(started)
sys.argv = ["csml", "id", "--help"]
try:
    runpy.run_module("csml", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
print(json.dumps({"starts": starts, "frozen_at_exit": gc.get_freeze_count()}))
"""


def test_no_collection_walks_the_modules_and_the_command_ends_frozen() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120
    )
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    loaded = min(seen["starts"], default=seen["frozen_at_exit"])
    assert loaded > 10_000  # every collection started once the modules were frozen
    assert seen["frozen_at_exit"] > loaded  # and what the command made was frozen at its end
