"""Placement: the label and requirement language (`csml.placement`), and the claim that
takes only jobs whose requirement the worker's labels meet, preferring warm models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from csml import placement
from csml.apps.base import App, Input, JobContext, ModelSpec, OperationParams, Output
from csml.apps.echo import app as echo_app
from csml.client import Client, CsmlError
from csml.schemas import ClaimedJob, ClaimResponse, WorkerRegistered
from csml.store import jobs as store
from tests.unit.conftest import MakeCoordinator
from tests.unit.inproc import BASE_URL, HttpWorker, InProcessCoordinator, error_of

# -- the language -------------------------------------------------------------------


def test_equality_is_typed_and_numbers_compare_numerically() -> None:
    labels = {"gpu": True, "gpu_memory_gb": 24, "arch": "x86_64", "cuda": 12.0}
    assert placement.meets(labels, {"gpu": True})
    assert not placement.meets(labels, {"gpu": False})
    assert not placement.meets(labels, {"gpu": 1})  # a boolean is never a number
    assert not placement.meets({"gpu": 1}, {"gpu": True})
    assert placement.meets(labels, {"cuda": 12})  # 12 == 12.0
    assert placement.meets(labels, {"arch": "x86_64"})
    assert not placement.meets(labels, {"arch": "X86_64"})  # case matters
    assert not placement.meets(labels, {"gpu_memory_gb": "24"})  # a string is not a number
    assert not placement.meets(labels, {"tpu": True})  # a missing label never meets


def test_a_minimum_needs_a_number_at_least_it() -> None:
    assert placement.meets({"mem": 24}, {"mem": {"min": 16}})
    assert placement.meets({"mem": 16.0}, {"mem": {"min": 16}})
    assert not placement.meets({"mem": 15.9}, {"mem": {"min": 16}})
    assert not placement.meets({"mem": True}, {"mem": {"min": 0}})
    assert not placement.meets({"mem": "32"}, {"mem": {"min": 16}})
    assert not placement.meets({}, {"mem": {"min": 0}})
    assert placement.meets({}, {})  # no requirement: every worker


@pytest.mark.parametrize(
    ("requires", "says"),
    [
        ({"GPU": True}, "requirement name 'GPU'"),
        ({"9gpu": True}, "requirement name '9gpu'"),
        ({"a" * 41: True}, "at most 40 characters"),
        ({"gpu": None}, "boolean, a number or a string"),
        ({"gpu": [1]}, "boolean, a number or a string"),
        ({"mem": {"max": 3}}, '{"min": <number>} only'),
        ({"mem": {"min": "3"}}, "finite number"),
        ({"mem": {"min": float("inf")}}, "finite number"),
        ({"mem": {"min": True}}, "finite number"),
        ({"mem": {"min": 10**400}}, "at most 2**53"),
        ({"mem": 1e300}, "at most 2**53"),
        ({"os": "x" * 101}, "at most 100 characters"),
        ({f"k{i}": True for i in range(17)}, "at most 16 conditions"),
    ],
)
def test_bad_requirements_are_refused(requires: dict[str, Any], says: str) -> None:
    with pytest.raises(placement.PlacementError) as caught:
        placement.check_requires(requires)
    assert says in str(caught.value)


def test_labels_are_bounded_and_named() -> None:
    assert placement.check_labels({"gpu": True, "mem": 24.0}) == {"gpu": True, "mem": 24}
    with pytest.raises(placement.PlacementError, match="label name"):
        placement.check_labels({"Bad-Name": 1})
    with pytest.raises(placement.PlacementError, match="at most 32 labels"):
        placement.check_labels({f"l{i}": i for i in range(33)})
    with pytest.raises(placement.PlacementError, match="finite number"):
        placement.check_labels({"x": float("nan")})


def test_merge_keeps_both_conditions_or_refuses_the_impossible() -> None:
    assert placement.merge({"gpu": True}, {"mem": {"min": 8}}) == {"gpu": True, "mem": {"min": 8}}
    assert placement.merge({"mem": {"min": 8}}, {"mem": {"min": 16}}) == {"mem": {"min": 16}}
    assert placement.merge({"mem": {"min": 8}}, {"mem": 24}) == {"mem": 24}
    assert placement.merge({"gpu": True}, {"gpu": True}) == {"gpu": True}
    with pytest.raises(placement.PlacementError, match="contradicts") as caught:
        placement.merge({"gpu": True}, {"gpu": False})
    assert caught.value.name == "gpu"
    with pytest.raises(placement.PlacementError, match="never both hold"):
        placement.merge({"mem": {"min": 32}}, {"mem": 24})
    with pytest.raises(placement.PlacementError, match="never both hold"):
        placement.merge({"mem": {"min": 1}}, {"mem": "big"})


def test_equal_requirements_have_one_key() -> None:
    a = placement.key_of(placement.check_requires({"gpu": True, "mem": {"min": 16.0}}))
    b = placement.key_of(placement.check_requires({"mem": {"min": 16}, "gpu": True}))
    assert a == b and a is not None and len(a) == 64
    assert placement.key_of({}) is None
    assert a != placement.key_of({"gpu": True})


def test_unmet_names_what_no_worker_has() -> None:
    req = {"gpu": True, "mem": {"min": 16}}
    workers = [{"gpu": True, "mem": 8}, {"gpu": False, "mem": 32}]
    assert placement.unmet(req, workers) == "no live worker has all of gpu=true, mem>=16"
    assert placement.unmet(req, [{"gpu": False}]) == "no live worker has gpu=true, mem>=16"
    assert placement.unmet(req, [{"gpu": True, "mem": 16}]) == ""
    assert placement.unmet({"os": "linux"}, []) == "no live worker has os=linux"


def test_command_line_assignments() -> None:
    assert placement.parse_assignment("gpu=true") == ("gpu", True)
    assert placement.parse_assignment("mem=24") == ("mem", 24)
    assert placement.parse_assignment("arch=x86_64") == ("arch", "x86_64")
    assert placement.parse_assignment('ver="12"') == ("ver", "12")
    assert placement.parse_assignment("mem>=16", minimum=True) == ("mem", {"min": 16})
    with pytest.raises(placement.PlacementError, match="needs a number"):
        placement.parse_assignment("mem>=lots", minimum=True)
    with pytest.raises(placement.PlacementError, match="NAME=VALUE"):
        placement.parse_assignment("gpu")


# -- the claim ----------------------------------------------------------------------

toy = App("toy", version="1.0", description="Placement tests: a model input and a GPU op.")
TOY_MODEL = ModelSpec("toy", "toy")


class ToyParams(OperationParams):
    pass


@toy.operation(inputs=[Input("model", "A model.", required=False, model=TOY_MODEL)])
def infer(ctx: JobContext, params: ToyParams) -> dict[str, Any]:
    """Read the model."""
    return {"warm": False}


@toy.operation(requires={"gpu": True})
def render(ctx: JobContext, params: ToyParams) -> dict[str, Any]:
    """Needs a GPU."""
    return {}


@toy.operation(outputs=[Output("model", "A model.", "application/json", model=TOY_MODEL)])
def train(ctx: JobContext, params: ToyParams) -> dict[str, Any]:
    """Write a model."""
    ctx.output("model").write_text(json.dumps([1, 2, 3]))
    return {}


def labelled(coordinator: InProcessCoordinator, app: App, **labels: Any) -> HttpWorker:
    """A worker of `app` announcing `labels`."""
    r = coordinator.http.post(
        "/v1/workers",
        json={
            "app": app.manifest().model_dump(mode="json"),
            "slots": 4,
            "sandbox": "none",
            "labels": labels,
        },
        headers={"Authorization": f"Bearer {coordinator.join_token(app.name)}"},
    )
    assert r.status_code == 201, r.text
    return HttpWorker(coordinator.http, app, WorkerRegistered.model_validate(r.json()))


def claim(worker: HttpWorker, max_jobs: int = 1, warm: list[str] | None = None) -> list[ClaimedJob]:
    r = worker.post("/claim", {"max_jobs": max_jobs, "wait": 0, "warm_models": warm or []})
    assert r.status_code == 200, r.text
    return ClaimResponse.model_validate(r.json()).jobs


def echo(user: Client, n: int, **requires: Any) -> str:
    return user.submit("echo", "echo", params={"n": n}, requires=requires or None).id


def test_a_job_requiring_a_label_goes_only_to_a_worker_with_it(
    coordinator: InProcessCoordinator,
) -> None:
    cpu = labelled(coordinator, echo_app, gpu=False, cpus=8)
    gpu = labelled(coordinator, echo_app, gpu=True, gpu_memory_gb=24)
    user = coordinator.new_user()
    needs_gpu = echo(user, 0, gpu=True)
    needs_16 = echo(user, 1, gpu_memory_gb={"min": 16})
    needs_32 = echo(user, 2, gpu_memory_gb={"min": 32})
    anyone = echo(user, 3)
    assert [j.id for j in claim(cpu, 10)] == [anyone]
    assert [j.id for j in claim(gpu, 10)] == [needs_gpu, needs_16]
    assert claim(cpu, 10) == claim(gpu, 10) == []
    assert user.job(needs_32).state.value == "queued"


def test_a_requirement_first_seen_after_a_claim_is_learned_at_once(
    coordinator: InProcessCoordinator,
) -> None:
    """The keys a coordinator knows are reloaded when the probe finds a newer one."""
    gpu = labelled(coordinator, echo_app, gpu=True)
    user = coordinator.new_user()
    assert claim(gpu) == []  # the app has no requirement keys yet
    first = echo(user, 0, gpu=True)
    assert [j.id for j in claim(gpu)] == [first]
    second = echo(user, 1, gpu=True, arch="x86_64")  # a new key: no arch label
    third = echo(user, 2, gpu=True)
    assert [j.id for j in claim(gpu, 5)] == [third]
    assert user.job(second).state.value == "queued"


def test_requirement_keys_added_by_another_coordinator_are_seen(
    make_coordinator: MakeCoordinator,
) -> None:
    one, two = make_coordinator(), make_coordinator()
    gpu = labelled(one, echo_app, gpu=True)
    cpu = labelled(one, echo_app)
    assert claim(gpu) == [] and claim(cpu) == []  # `one` has read the (empty) keys
    user = two.new_user()
    job = echo(user, 0, gpu=True)  # submitted through `two`
    assert claim(cpu) == []
    assert [j.id for j in claim(gpu)] == [job]


def test_an_operation_requirement_applies_to_every_job(coordinator: InProcessCoordinator) -> None:
    cpu = labelled(coordinator, toy, gpu=False)
    gpu = labelled(coordinator, toy, gpu=True)
    user = coordinator.new_user()
    job = user.submit("toy", "render").id
    assert claim(cpu) == []
    assert [j.id for j in claim(gpu)] == [job]


def submit_raw(
    coordinator: InProcessCoordinator, user: Client, spec: dict[str, Any]
) -> httpx.Response:
    return coordinator.http.post(
        "/v1/jobs", json=spec, headers={"Authorization": f"Bearer {user.token}"}
    )


def test_bad_requirements_are_422_naming_the_field(coordinator: InProcessCoordinator) -> None:
    labelled(coordinator, toy, gpu=True)
    user = coordinator.new_user()
    r = submit_raw(
        coordinator, user, {"app": "echo", "operation": "echo", "requires": {"gpu": None}}
    )
    assert r.status_code == 422, r.text
    error = error_of(r)
    assert error["code"] == "invalid_spec" and error["field"] == "spec.requires"
    assert "requirement 'gpu'" in error["message"]
    r = submit_raw(
        coordinator, user, {"app": "toy", "operation": "render", "requires": {"gpu": False}}
    )
    assert r.status_code == 422, r.text
    error = error_of(r)
    assert error["code"] == "unsatisfiable_requirement"
    assert error["field"] == "spec.requires.gpu"
    assert "contradicts the operation's true" in error["message"]


def test_bad_labels_are_refused_at_registration(coordinator: InProcessCoordinator) -> None:
    r = coordinator.http.post(
        "/v1/workers",
        json={
            "app": echo_app.manifest().model_dump(mode="json"),
            "slots": 1,
            "labels": {"GPU": True},
        },
        headers={"Authorization": f"Bearer {coordinator.join_token('echo')}"},
    )
    assert r.status_code == 422, r.text
    assert "label name 'GPU'" in r.text


def test_a_worker_with_a_warm_model_prefers_its_jobs_within_the_window(
    make_coordinator: MakeCoordinator,
) -> None:
    coordinator = make_coordinator(placement_window=4)
    worker = labelled(coordinator, toy)
    alice, bob = coordinator.new_user(), coordinator.new_user()
    [trained] = [alice.submit("toy", "train")]
    [job] = claim(worker)
    assert worker.run(job, coordinator.settings.data_dir).status_code == 204
    model_id = alice.job(trained.id).data.models["model"]
    model_sha = alice.job(trained.id).data.outputs["model"].sha256
    cold = [bob.submit("toy", "infer").id for _ in range(3)]
    warm = alice.submit("toy", "infer", params={"model": model_id}).id
    beyond = [alice.submit("toy", "infer").id for _ in range(5)]
    late_warm = alice.submit("toy", "infer", params={"model": model_id}).id
    key = placement.warm_key(job.owner_key, model_sha)  # what the worker would announce
    other = placement.warm_key(job.owner_key, "0" * 64)
    # Fair order: cold0, warm, cold1, beyond0, cold2, beyond1..4, late_warm (round-robin
    # of bob and alice). The warm job is 2nd: taken first.
    assert [j.id for j in claim(worker, 1, [other, key])] == [warm]
    # Without warm models: strict fair order.
    assert [j.id for j in claim(worker, 1)] == [cold[0]]
    # The second warm job is beyond the window of 4 (cold1, beyond0, cold2, beyond1).
    assert [j.id for j in claim(worker, 1, [key])] == [cold[1]]
    rest = [j.id for j in claim(worker, 10)]
    assert late_warm in rest and set(rest) == {cold[2], *beyond, late_warm}


def test_a_job_no_live_worker_can_meet_says_why_and_fails_after_the_queue_timeout(
    make_coordinator: MakeCoordinator,
) -> None:
    coordinator = make_coordinator(queue_timeout_seconds=600)
    cpu = labelled(coordinator, echo_app, gpu=False)
    user = coordinator.new_user()
    job = echo(user, 0, gpu=True)
    plain = echo(user, 1)
    coordinator.reap()
    r = coordinator.http.get(
        f"/v1/jobs/{job}",
        params={"positions": "true"},
        headers={"Authorization": f"Bearer {user.token}"},
    )
    view = r.json()
    assert view["state"] == "queued" and view["queue_position"] == 1
    assert view["progress"]["message"] == "waiting: no live worker has gpu=true (gpu=true)"
    assert user.job(plain).data.progress.message == ""
    # A worker that meets it joins: the message goes.
    gpu = labelled(coordinator, echo_app, gpu=True)
    coordinator.reap()
    assert user.job(job).data.progress.message == ""
    gone = coordinator.http.delete(f"/v1/workers/{gpu.id}", headers=gpu._headers())
    assert gone.status_code == 204
    coordinator.reap()
    assert user.job(job).data.progress.message.startswith("waiting: no live worker has gpu=true")
    # The timeout passes with only the CPU worker heard from since: the job fails.
    coordinator.clock.advance(601)
    cpu.heartbeat()  # the CPU worker stays live
    coordinator.reap()
    failed = user.job(job).data
    assert failed.state.value == "failed"
    assert failed.error is not None
    assert "no echo worker that meets its requirement (gpu=true)" in failed.error
    assert "no live worker has gpu=true" in failed.error


# -- the command line -----------------------------------------------------------------


def test_csml_submit_require_reaches_only_a_worker_that_meets_it(
    coordinator: InProcessCoordinator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import csml.cli.main as cli_main

    def client(*args: Any, **kw: Any) -> Client:
        return Client(*args, **kw, transport=coordinator.transport)

    monkeypatch.setattr(cli_main, "Client", client)
    monkeypatch.setattr("csml.cli.connection.Client", client)
    monkeypatch.setenv("CSML_CONFIG", str(tmp_path / "config.toml"))
    for name in ("CSML_URL", "CSML_TOKEN", "CSML_PIN_SHA256"):
        monkeypatch.delenv(name, raising=False)
    cli = CliRunner()

    def run(*args: str) -> Any:
        return cli.invoke(cli_main.app, list(args))

    assert run("id", "new", "--url", BASE_URL).exit_code == 0
    small = labelled(coordinator, echo_app, gpu=True, gpu_memory_gb=8)
    big = labelled(coordinator, echo_app, gpu=True, gpu_memory_gb=24)
    out = run("submit", "echo", "echo", "--require", "gpu=true", "-r", "gpu_memory_gb>=16")
    assert out.exit_code == 0, out.output
    job_id = out.output.split("submitted ", 1)[1].split()[0]
    assert claim(small) == []
    assert [j.id for j in claim(big)] == [job_id]
    bad = run("submit", "echo", "echo", "--require", "gpu_memory_gb>=lots")
    assert isinstance(bad.exception, CsmlError)
    assert "--require: 'gpu_memory_gb>=lots': a minimum needs a number" in bad.exception.message
    labelled(coordinator, toy, gpu=True)
    listed = " ".join(run("apps").output.split())
    assert "render" in listed and "Needs a GPU. (needs gpu=true)" in listed


def test_unused_requirement_keys_are_forgotten_and_relearned(
    make_coordinator: MakeCoordinator,
) -> None:
    coordinator = make_coordinator(retention_hours=1)
    gpu = labelled(coordinator, echo_app, gpu=True)
    user = coordinator.new_user()
    waiting = echo(user, 0, gpu=True)  # queued (no claim) for the first part

    def keys() -> int:
        with coordinator.core.queue.read() as conn:
            return len(store.requirement_keys(conn, "echo"))

    coordinator.clock.advance(2 * 3600)
    coordinator.sweep()
    assert keys() == 1  # unused for 2 h, but a job refers to it
    user.job(waiting).cancel()
    coordinator.clock.advance(1800)
    coordinator.sweep()
    assert keys() == 1  # the cancelled job is kept for an hour: it still refers
    coordinator.clock.advance(3700)
    coordinator.sweep()  # the job is erased (retention), then its key
    assert keys() == 0
    again = echo(user, 1, gpu=True)  # the same requirement: a new row, learned again
    assert keys() == 1
    assert [j.id for j in claim(gpu)] == [again]
