"""A reused child's jobs read its /proc files, and the zygote's children, through
descriptors kept open (`isolation_procs.ProcFile`: one pread each), not by path (open,
read, close): a reused child's job reads no /proc file by path. A real sandbox (zygote,
job child, isolation)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from csml.worker import isolation_procs, sandbox
from csml.worker.sandbox import Sandbox, SandboxJob

JOBS = 20


def test_a_reused_childs_jobs_read_its_proc_files_through_kept_descriptors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths: list[str] = []

    def counting(real: Callable[[str], bytes]) -> Callable[[str], bytes]:
        def read(path: str) -> bytes:
            paths.append(path)
            return real(path)

        return read

    monkeypatch.setattr(sandbox, "read_proc", counting(isolation_procs.read_proc))
    monkeypatch.setattr(isolation_procs, "read_proc", counting(isolation_procs.read_proc))
    box = Sandbox("echo", workdir=tmp_path)
    try:
        outputs = tmp_path / "outputs"
        outputs.mkdir()
        pids: set[int] = set()
        for i in range(JOBS + 1):
            if i == 1:
                paths.clear()  # (the first job starts the child)
            outcome = box.run(SandboxJob("echo", {"i": i}, {}, outputs, 30, 512, 30), owner="o")
            assert outcome.ok and (outcome.result or {})["params"]["i"] == i, outcome.error
            pids.update(r.child.pid for r in box._idle.values())
        assert len(pids) == 1  # one child served every job
        zygote = f"/proc/{box._zygote.pid}/"
        by_path = [p for p in paths if not p.startswith(zygote)]
        assert by_path == [], by_path[:8]
        # The zygote's memory, at most once a second (`Sandbox._zygote_bytes`); its
        # children through their kept descriptor.
        assert all(p == f"{zygote}statm" for p in paths), paths[:8]
    finally:
        box.close()
