"""Models as artifacts, end to end: real coordinator, real dlib and DyNet workers."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from csml.client import Client, CsmlError
from tests.cluster import Cluster, running_cluster
from tests.integration.apps.support import Dataset, load_dataset, zen_text

# Real dlib and DyNet workers train models (waits of up to 300 s).
pytestmark = pytest.mark.timeout(900)

# find_spec, not import: DyNet must first be imported by csml.apps._dynet_init (autobatching).
if importlib.util.find_spec("dlib") is None or importlib.util.find_spec("dynet") is None:
    pytest.skip("needs the dlib and dynet extras", allow_module_level=True)

MAX_MODELS = 4


@pytest.fixture(scope="module")
def mc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("models")
    settings = {"CSML_MAX_MODELS": str(MAX_MODELS), "CSML_POW_DIFFICULTY": "0"}
    with running_cluster(root, settings, {"dlib": 1, "dynet": 1}) as c:
        yield c


@pytest.fixture(scope="module")
def iris() -> Dataset:
    return load_dataset("iris")


@pytest.fixture(scope="module")
def data(iris: Dataset, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("iris")
    split = iris.split(folder)
    return split.train, split.test


def train(user: Client, train_csv: Path) -> str:
    job = user.submit(
        "dlib", "train_svm", files={"data": train_csv}, params={"kernel": "linear"}
    ).wait(timeout=120)
    assert job.state.value == "succeeded", job.error
    return job.models["model"]


def predictions(job_folder: Path) -> list[str]:
    with open(job_folder, newline="") as f:
        return [r["prediction"] for r in csv.DictReader(f)]


def test_a_trained_model_is_kept_listed_and_used_by_id(
    mc: Cluster, data: tuple[Path, Path], tmp_path: Path
) -> None:
    user = mc.new_user()
    trainer = user.submit(
        "dlib", "train_svm", files={"data": data[0]}, params={"kernel": "linear"}
    ).wait(timeout=120)
    assert trainer.state.value == "succeeded", trainer.error
    model_id = trainer.models["model"]

    [info] = user.models()
    assert info.id == model_id
    assert (info.app, info.kind, info.format, info.format_version) == (
        "dlib",
        "svm",
        "csml-dlib-svm",
        1,
    )
    assert info.job_id == trainer.id and info.operation == "train_svm"
    assert info.sha256 == trainer.data.outputs["model"].sha256
    assert info.size == trainer.data.outputs["model"].size
    assert info.metrics == trainer.result
    saved = user.download_model(model_id, tmp_path / "model.json")
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == info.sha256

    by_id = user.submit(
        "dlib", "predict_svm", files={"data": data[1]}, params={"model": model_id[:12]}
    ).wait(timeout=120)
    assert by_id.state.value == "succeeded", by_id.error
    assert by_id.data.params["model"] == model_id  # the prefix is resolved once, at submission
    assert by_id.data.inputs["model"].sha256 == info.sha256
    by_file = user.submit("dlib", "predict_svm", files={"model": saved, "data": data[1]}).wait(
        timeout=120
    )
    a = predictions(by_id.download("predictions", tmp_path / "a.csv"))
    b = predictions(by_file.download("predictions", tmp_path / "b.csv"))
    assert a == b and len(a) > 10
    untimed = [
        {k: v for k, v in (j.result or {}).items() if "seconds" not in k} for j in (by_id, by_file)
    ]
    assert untimed[0] == untimed[1]


def test_only_the_owner_sees_or_uses_a_model(mc: Cluster, data: tuple[Path, Path]) -> None:
    owner, other = mc.new_user(), mc.new_user()
    model_id = train(owner, data[0])
    assert other.models() == []
    headers = {"Authorization": f"Bearer {other.token}"}
    for method, path in (
        ("GET", f"/v1/models/{model_id}"),
        ("GET", f"/v1/models/{model_id}/info"),
        ("DELETE", f"/v1/models/{model_id}"),
    ):
        r = httpx.request(method, mc.url + path, headers=headers)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == "not_found"
    with pytest.raises(CsmlError) as err:
        other.submit("dlib", "predict_svm", files={"data": data[1]}, params={"model": model_id})
    assert err.value.status == 404
    assert other.jobs() == []  # nothing was queued
    assert [m.id for m in owner.models()] == [model_id]  # untouched


def test_wrong_kind_both_ways_and_future_versions_are_refused_up_front(
    mc: Cluster, data: tuple[Path, Path]
) -> None:
    user = mc.new_user()
    model_id = train(user, data[0])
    with pytest.raises(CsmlError) as err:
        user.submit("dynet", "predict_mlp", files={"data": data[1]}, params={"model": model_id})
    assert err.value.status == 422 and "needs a mlp model" in err.value.message
    with pytest.raises(CsmlError) as err:
        user.submit(
            "dlib",
            "predict_svm",
            files={"data": data[1], "model": data[1]},
            params={"model": model_id},
        )
    assert err.value.status == 422 and "not both" in err.value.message
    # A model written by a newer app version than these workers read (edited in the store).
    db = sqlite3.connect(mc.data_dir / "csml.db")
    with db:
        db.execute("UPDATE models SET format_version = 2 WHERE id = ?", (model_id,))
    db.close()
    with pytest.raises(CsmlError) as err:
        user.submit("dlib", "predict_svm", files={"data": data[1]}, params={"model": model_id})
    assert err.value.status == 422
    assert "csml-dlib-svm version 2" in err.value.message
    assert "read versions 1 to 1" in err.value.message
    with pytest.raises(CsmlError) as err:
        user.import_model("dlib", "csml-dlib-svm", data[1], format_version=2)
    assert err.value.status == 422


def test_delete_import_and_quota(mc: Cluster, data: tuple[Path, Path], tmp_path: Path) -> None:
    user = mc.new_user()
    model_id = train(user, data[0])
    saved = user.download_model(model_id, tmp_path)
    queued = user.submit("dlib", "predict_svm", files={"data": data[1]}, params={"model": model_id})
    user.delete_model(model_id)
    assert user.models() == []
    with pytest.raises(CsmlError) as err:
        user.model(model_id)
    assert err.value.status == 404
    blobs = list((mc.data_dir / "blobs" / "models").rglob(f"{model_id}/*"))
    assert blobs == []
    # A job submitted before the delete keeps its own link to the file.
    assert queued.wait(timeout=120).state.value == "succeeded", queued.error

    other = mc.new_user()
    imported = other.import_model("dlib", "csml-dlib-svm", saved)
    assert imported.sha256 == hashlib.sha256(saved.read_bytes()).hexdigest()
    assert imported.job_id is None and imported.kind == "svm"
    job = other.submit(
        "dlib", "predict_svm", files={"data": data[1]}, params={"model": imported.id}
    ).wait(timeout=120)
    assert job.state.value == "succeeded", job.error
    with pytest.raises(CsmlError) as err:
        other.import_model("dlib", "no-such-format", saved)
    assert err.value.status == 422 and "csml-dlib-svm" in err.value.message

    for _ in range(MAX_MODELS - 1):
        other.import_model("dlib", "csml-dlib-svm", saved)
    with pytest.raises(CsmlError) as err:
        other.import_model("dlib", "csml-dlib-svm", saved)
    assert err.value.status == 429 and "model quota" in err.value.message
    with pytest.raises(CsmlError) as err:  # a training job would keep one more
        other.submit("dlib", "train_svm", files={"data": data[0]})
    assert err.value.status == 429
    # Inference with a kept model is not limited by the model quota.
    assert (
        other.submit("dlib", "predict_svm", files={"data": data[1]}, params={"model": imported.id})
        .wait(timeout=120)
        .state.value
        == "succeeded"
    )

    other.delete_identity()
    gone = list((mc.data_dir / "blobs" / "models").rglob(f"{imported.id}*"))
    assert gone == []


def test_models_survive_a_coordinator_restart(mc: Cluster, data: tuple[Path, Path]) -> None:
    user = mc.new_user()
    model_id = train(user, data[0])
    before = user.model(model_id)
    mc.stop_coordinator()
    mc.start_coordinator()
    mc.wait_workers("dlib", 1)
    after = user.model(model_id)
    assert after == before
    job = user.submit(
        "dlib", "predict_svm", files={"data": data[1]}, params={"model": model_id}
    ).wait(timeout=120)
    assert job.state.value == "succeeded", job.error


def test_cli_train_models_predict_and_generate(
    mc: Cluster, data: tuple[Path, Path], tmp_path: Path
) -> None:
    mc.csml("id", "new", "--url", mc.url)
    wide = {**mc.env, "COLUMNS": "160"}
    out = mc.csml("train", "dlib", "svm", str(data[0]), "--label", "label", "-p", "kernel=linear")
    assert "succeeded" in out.stdout and "kept as model" in out.stdout
    listed = mc.csml("models", env=wide).stdout
    assert "dlib" in listed and "svm" in listed and "csml-dlib-svm v1" in listed
    model_prefix = listed.split("\n")[1].split()[0]
    folder = tmp_path / "pred"
    pred = mc.csml("predict", model_prefix, str(data[1]), "-o", str(folder))
    assert "succeeded" in pred.stdout
    assert len(predictions(folder / "predictions.csv")) > 10
    bad = mc.csml("train", "dlib", "forest", str(data[0]), check=False)
    assert bad.returncode == 1 and "trains: svm" in bad.stderr and "Traceback" not in bad.stderr

    text = tmp_path / "zen.txt"
    text.write_text(zen_text())
    rnn = mc.csml(
        "train", "dynet", "char-rnn", str(text), "-p", "epochs=2", "-p", "hidden=16", timeout=300
    )
    assert "succeeded" in rnn.stdout, rnn.stdout + rnn.stderr
    rnn_id = next(
        line.split()[0]
        for line in mc.csml("models", env=wide).stdout.splitlines()
        if "char-rnn" in line
    )
    texts = [
        mc.csml("predict", rnn_id, "-p", "prompt=Beautiful", "-p", "seed=7", "-p", "length=40")
        for _ in range(2)
    ]
    assert texts[0].stdout.count("Beautiful") >= 1
    first, second = (t.stdout.split('{"text": ', 1)[1].split('", "')[0] for t in texts)
    assert first == second and first.startswith('"Beautiful')
    gone = mc.csml("models", "delete", rnn_id)
    assert "deleted" in gone.stdout
