"""`Sandbox.run(..., on_started, started_grace)`: a job that answers within its grace
never calls `on_started`; one still running after it calls it once. A real sandbox
(zygote, job child, isolation); the job's answer and its sleep are what decide, not a
timing: the quick job has a minute of grace, the slow one sleeps a second past 10 ms."""

from __future__ import annotations

from pathlib import Path

from csml.worker.sandbox import Sandbox, SandboxJob


def test_on_started_waits_for_the_grace_and_a_quick_answer_skips_it(tmp_path: Path) -> None:
    box = Sandbox("echo", workdir=tmp_path)
    try:
        outputs = tmp_path / "outputs"
        outputs.mkdir()
        calls: list[str] = []

        def job(params: dict[str, object]) -> SandboxJob:
            return SandboxJob("echo", params, {}, outputs, 30, 512, 30)

        warm = box.run(job({"i": 0}), owner="o")  # the owner's child, started and idle
        assert warm.ok, warm.error
        quick = box.run(
            job({"i": 1}), owner="o", on_started=lambda: calls.append("quick"), started_grace=60
        )
        assert quick.ok and (quick.result or {})["params"]["i"] == 1, quick.error
        assert calls == []  # it answered within its grace
        slow = box.run(
            job({"i": 2, "sleep": 1.0}),
            owner="o",
            on_started=lambda: calls.append("slow"),
            started_grace=0.01,
        )
        assert slow.ok and (slow.result or {})["params"]["i"] == 2, slow.error
        assert calls == ["slow"]  # once, while it slept
        plain = box.run(job({"i": 3}), owner="o", on_started=lambda: calls.append("plain"))
        assert plain.ok, plain.error
        assert calls == ["slow", "plain"]  # no grace: once it is sent, as before
    finally:
        box.close()
