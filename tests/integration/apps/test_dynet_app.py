"""The `dynet` app: an MLP on scikit-learn's bundled datasets, a char-RNN on the Zen of Python."""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip(
    "dynet_config", reason="install the cached DyNet wheel: .ci/build-dynet-wheel.sh"
)
from csml.apps.base import JobError
from csml.apps.dynet_app import app
from tests.cluster import Cluster, running_cluster
from tests.integration.apps.support import Dataset, Runner, accuracy_from_predictions

# Trains DyNet networks, in process and on a cluster.
pytestmark = pytest.mark.timeout(600)

EPOCH_MESSAGE = re.compile(r"^epoch (\d+)/(\d+), loss (\d+\.\d+)")


def losses_from_progress(progress: list[tuple[float, str]]) -> list[float]:
    found = [EPOCH_MESSAGE.match(m) for _, m in progress]
    return [float(m.group(3)) for m in found if m]


def assert_goes_down(losses: list[float]) -> None:
    assert len(losses) >= 4
    assert losses[-1] < 0.8 * losses[0], losses
    third = len(losses) // 3
    assert sum(losses[-third:]) < sum(losses[:third]), losses  # the trend, not just the ends


# ----------------------------------------------------------------------------- MLP


def test_mlp_learns_wine_and_predicts_it(
    run: Runner, datasets: Callable[[str], Dataset], tmp_path: Path
) -> None:
    split = datasets("wine").split(tmp_path)
    trained = run(
        app,
        "train_mlp",
        {"data": split.train},
        {"hidden": [32, 16], "epochs": 25, "batch_size": 16, "seed": 3},
    )
    r = trained.result
    assert r["layers"] == [13, 32, 16, 3] and r["classes"] == ["class_0", "class_1", "class_2"]
    assert [h["epoch"] for h in r["history"]] == list(range(1, 26))
    assert_goes_down([h["loss"] for h in r["history"]])
    from_progress = losses_from_progress(trained.progress)
    assert from_progress == [round(h["loss"], 3) for h in r["history"]]
    assert trained.progress[-1][0] == 1.0
    assert r["held_out_rows"] > 0 and r["held_out_accuracy"] > 0.85
    with zipfile.ZipFile(trained.output("model")) as zf:
        assert sorted(zf.namelist()) == ["header.json", "params.dynet"]
        header = json.loads(zf.read("header.json"))
    assert header["format"] == "csml-dynet-model" and header["format_version"] == 1
    assert header["kind"] == "mlp" and header["layers"] == [13, 32, 16, 3]
    assert len(header["normalization"]["mean"]) == 13

    predicted = run(app, "predict_mlp", {"model": trained.output("model"), "data": split.test})
    independent = accuracy_from_predictions(predicted.output("predictions"), split.test_labels)
    assert abs(predicted.result["accuracy"] - independent) <= 0.01 and independent > 0.85


def test_mlp_training_is_reproducible_per_seed(
    run: Runner, datasets: Callable[[str], Dataset], tmp_path: Path
) -> None:
    data = datasets("iris").csv(tmp_path)
    params = {"epochs": 5, "seed": 7}
    a = run(app, "train_mlp", {"data": data}, params).result
    b = run(app, "train_mlp", {"data": data}, params).result
    c = run(app, "train_mlp", {"data": data}, {**params, "seed": 8}).result
    assert a["history"] == b["history"] and a["held_out_accuracy"] == b["held_out_accuracy"]
    assert a["history"] != c["history"]


def test_mlp_digits_ten_classes(
    run: Runner, datasets: Callable[[str], Dataset], tmp_path: Path
) -> None:
    data = datasets("digits").csv(tmp_path)
    r = run(app, "train_mlp", {"data": data}, {"epochs": 8, "hidden": [64]}).result
    assert len(r["classes"]) == 10 and r["held_out_accuracy"] > 0.9
    assert_goes_down([h["loss"] for h in r["history"]])


def test_mlp_model_errors(run: Runner, datasets: Callable[[str], Dataset], tmp_path: Path) -> None:
    ds = datasets("iris")
    data = ds.csv(tmp_path)
    model = run(app, "train_mlp", {"data": data}, {"epochs": 2}).output("model")
    bad = tmp_path / "bad.csv"
    bad.write_text(",".join([*ds.features[:3], "colour"]) + "\n1,2,3,4\n")
    with pytest.raises(JobError, match="missing 'petal_width_cm'; unexpected 'colour'"):
        run(app, "predict_mlp", {"model": model, "data": bad})
    future = tmp_path / "future.zip"
    with zipfile.ZipFile(model) as src, zipfile.ZipFile(future, "w") as dst:
        header = json.loads(src.read("header.json"))
        dst.writestr("header.json", json.dumps({**header, "format_version": 2}))
        dst.writestr("params.dynet", src.read("params.dynet"))
    with pytest.raises(JobError, match="unsupported model format_version 2"):
        run(app, "predict_mlp", {"model": future, "data": data})
    with pytest.raises(JobError, match="not a zip archive"):
        run(app, "predict_mlp", {"model": data, "data": data})
    lying = tmp_path / "lying.zip"
    with zipfile.ZipFile(model) as src, zipfile.ZipFile(lying, "w") as dst:
        header = json.loads(src.read("header.json"))
        header["layers"] = [4, 65, 3]
        dst.writestr("header.json", json.dumps(header))
        dst.writestr("params.dynet", src.read("params.dynet"))
    with pytest.raises(JobError, match="weights do not match"):
        run(app, "predict_mlp", {"model": lying, "data": data})
    with pytest.raises(JobError, match="is a 'mlp' model"):
        run(app, "generate_text", {"model": model})


# ----------------------------------------------------------------------------- char-RNN


def test_char_rnn_perplexity_goes_down_and_generation_is_seeded(run: Runner, zen: Path) -> None:
    trained = run(app, "train_char_rnn", {"text": zen}, {"epochs": 12, "hidden": 48, "seed": 1})
    r = trained.result
    assert r["autobatch"] is True
    assert r["vocabulary_size"] == len(set(zen.read_text()))
    perplexities = [h["perplexity"] for h in r["history"]]
    assert_goes_down(perplexities)
    assert perplexities[-1] < r["vocabulary_size"]  # better than a uniform guess
    assert "perplexity" in trained.progress[-1][1]
    model = trained.output("model")

    params = {"prompt": "Beautiful is", "length": 80, "temperature": 0.8, "seed": 42}
    first = run(app, "generate_text", {"model": model}, params).result
    again = run(app, "generate_text", {"model": model}, params).result
    other = run(app, "generate_text", {"model": model}, {**params, "seed": 43}).result
    assert first["text"] == again["text"]
    assert first["text"].startswith("Beautiful is") and len(first["generated"]) == 80
    assert other["text"] != first["text"]
    assert set(first["generated"]) <= set(zen.read_text())
    greedy = run(app, "generate_text", {"model": model}, {"length": 20, "temperature": 0}).result
    assert len(greedy["text"]) == 20

    with pytest.raises(JobError, match="characters the model never saw"):
        run(app, "generate_text", {"model": model}, {"prompt": "Ω"})
    with pytest.raises(JobError, match="is a 'char_rnn' model"):
        run(app, "predict_mlp", {"model": model, "data": zen})


def test_generation_carries_the_lstm_state_exactly(run: Runner, zen: Path, tmp_path: Path) -> None:
    """generate_text starts a fresh graph per character, carrying the state of every layer;
    it samples exactly what one long graph over the whole text would."""
    import numpy as np

    from csml.apps.base import JobContext
    from csml.apps.dynet_app import _dynet, load_char_rnn

    params = {"epochs": 3, "layers": 2, "hidden": 24, "embedding": 8, "seed": 2}
    model_file = run(app, "train_char_rnn", {"text": zen}, params).output("model")
    prompt, length, temperature, seed = "Simple is", 60, 0.7, 9
    generated = run(
        app,
        "generate_text",
        {"model": model_file},
        {"prompt": prompt, "length": length, "temperature": temperature, "seed": seed},
    ).result["generated"]

    dy = _dynet()
    model = load_char_rnn(JobContext({"model": model_file}, tmp_path, scratch=tmp_path))
    index = {ch: i + 1 for i, ch in enumerate(model.vocabulary)}
    rng = np.random.default_rng(seed)
    dy.renew_cg()
    state = model.lstm.initial_state()
    for ch_id in [0, *(index[ch] for ch in prompt)]:
        state = state.add_input(model.lookup[ch_id])
    text = ""
    for _ in range(length):
        logits = dy.affine_transform([model.b_out, model.w_out, state.output()]).npvalue()
        z = logits.astype(np.float64) / temperature
        z[0] = -np.inf
        p = np.exp(z - z.max())
        nxt = int(rng.choice(len(p), p=p / p.sum()))
        text += model.vocabulary[nxt - 1]
        state = state.add_input(model.lookup[nxt])
    assert generated == text


def test_char_rnn_refuses_non_utf8_text(run: Runner, tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(JobError, match="not UTF-8"):
        run(app, "train_char_rnn", {"text": bad})


# ----------------------------------------------------------------------------- real cluster


@pytest.fixture(scope="module")
def dynet_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("dynet-cluster"), workers={"dynet": 1}) as c:
        yield c


def test_dynet_through_a_real_cluster(
    dynet_cluster: Cluster, datasets: Callable[[str], Dataset], zen: Path, tmp_path: Path
) -> None:
    client = dynet_cluster.new_user()
    split = datasets("breast_cancer").split(tmp_path)
    train = client.submit(
        "dynet", "train_mlp", files={"data": split.train}, params={"epochs": 15, "hidden": [32]}
    )
    seen: list[str] = []
    train.wait(120, on_progress=lambda j: seen.append(str(j.progress)))
    assert train.state.value == "succeeded" and train.result is not None, train.error
    assert_goes_down([h["loss"] for h in train.result["history"]])
    assert train.result["held_out_accuracy"] > 0.9
    model = train.download("model", tmp_path / "mlp.zip")
    predict = client.submit(
        "dynet", "predict_mlp", files={"model": model, "data": split.test}
    ).wait(60)
    assert predict.state.value == "succeeded" and predict.result is not None, predict.error
    independent = accuracy_from_predictions(
        predict.download("predictions", tmp_path / "pred.csv"), split.test_labels
    )
    assert abs(predict.result["accuracy"] - independent) <= 0.01 and independent > 0.9

    rnn = client.submit(
        "dynet", "train_char_rnn", files={"text": zen}, params={"epochs": 8, "seed": 5}
    ).wait(120)
    assert rnn.state.value == "succeeded" and rnn.result is not None, rnn.error
    assert rnn.result["autobatch"] is True  # configured before the zygote imported dynet
    assert_goes_down([h["perplexity"] for h in rnn.result["history"]])
    lm = rnn.download("model", tmp_path / "lm.zip")
    params = {"prompt": "Errors", "length": 60, "seed": 11}
    texts = []
    for _ in range(2):  # two separate jobs: two separate processes
        job = client.submit("dynet", "generate_text", files={"model": lm}, params=params).wait(60)
        assert job.state.value == "succeeded" and job.result is not None, job.error
        texts.append(job.result["text"])
    assert texts[0] == texts[1] and len(texts[0]) == len("Errors") + 60
