"""The `dlib` app: HOG faces on a real photo; SVMs on scikit-learn's bundled datasets."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

dlib = pytest.importorskip("dlib")
cv2 = pytest.importorskip("cv2")

from csml.apps import dlib_app  # noqa: E402
from csml.apps.base import JobError  # noqa: E402
from csml.apps.dlib_app import app  # noqa: E402
from tests.cluster import Cluster, running_cluster  # noqa: E402
from tests.integration.apps.support import (  # noqa: E402
    SKIMAGE_DATA,
    Dataset,
    Runner,
    accuracy_from_predictions,
    read_csv,
)

# Trains dlib models, in process and on a cluster.
pytestmark = pytest.mark.timeout(600)

# The astronaut's face in scikit-image's astronaut.png (x, y, w, h), as dlib's detector and
# OpenCV's Haar cascade both find it.
ASTRONAUT_FACE = (175, 76, 91, 91)


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0, min(ay + ah, by + bh) - max(ay, by))
    return w * h / (aw * ah + bw * bh - w * h)


# ----------------------------------------------------------------------------- faces


def test_detect_faces_finds_the_astronaut(run: Runner, astronaut: Path) -> None:
    ran = run(app, "detect_faces", {"image": astronaut})
    r = ran.result
    assert (r["width"], r["height"]) == (512, 512)
    assert r["count"] == len(r["faces"]) >= 1
    top = r["faces"][0]
    assert set(top) == {"x", "y", "w", "h", "score"}
    assert iou((top["x"], top["y"], top["w"], top["h"]), ASTRONAUT_FACE) > 0.8
    assert top["score"] > 0.5
    scores_out = [f["score"] for f in r["faces"]]
    assert scores_out == sorted(scores_out, reverse=True)
    annotated = cv2.imread(str(ran.output("annotated")))
    original = cv2.imread(str(astronaut))
    assert annotated.shape == original.shape and (annotated != original).any()
    # The same image and settings straight through dlib give the same boxes and scores.
    _, scores, _ = dlib.get_frontal_face_detector().run(original[:, :, ::-1].copy(), 1, 0.0)
    assert sorted(round(s, 6) for s in scores) == sorted(f["score"] for f in r["faces"])


def test_a_higher_threshold_keeps_only_sure_faces(run: Runner, astronaut: Path) -> None:
    loose = run(app, "detect_faces", {"image": astronaut}, {"adjust_threshold": -0.5}).result
    strict = run(app, "detect_faces", {"image": astronaut}, {"adjust_threshold": 0.5}).result
    assert strict["count"] == 1 and loose["count"] >= strict["count"]
    face = strict["faces"][0]
    assert iou((face["x"], face["y"], face["w"], face["h"]), ASTRONAUT_FACE) > 0.8


def test_no_face_on_a_photo_without_one(run: Runner) -> None:
    r = run(app, "detect_faces", {"image": SKIMAGE_DATA / "coffee.png"}, {"upsample": 0}).result
    assert r["count"] == 0 and r["faces"] == []


def test_a_file_that_is_not_an_image_fails_clearly(run: Runner, tmp_path: Path) -> None:
    bogus = tmp_path / "x.png"
    bogus.write_text("not a picture")
    with pytest.raises(JobError, match="not a decodable image"):
        run(app, "detect_faces", {"image": bogus})


# ----------------------------------------------------------------------------- SVM


def test_binary_svm_round_trip_on_breast_cancer(
    run: Runner, datasets: Callable[[str], Dataset], tmp_path: Path
) -> None:
    split = datasets("breast_cancer").split(tmp_path)
    trained = run(app, "train_svm", {"data": split.train}, {"cv_folds": 5})
    r = trained.result
    assert r["classes"] == ["benign", "malignant"] and r["binary_machines"] == 1
    assert r["class_counts"] == {"benign": 250, "malignant": 148}
    assert len(r["feature_names"]) == 30 and r["feature_names"][0] == "mean_radius"
    assert r["train_accuracy"] > 0.97 and r["cv_accuracy"] > 0.94
    assert len(r["cv_fold_accuracies"]) == 5 and r["training_seconds"] > 0
    predicted = run(app, "predict_svm", {"model": trained.output("model"), "data": split.test})
    p = predicted.result
    independent = accuracy_from_predictions(predicted.output("predictions"), split.test_labels)
    assert abs(p["accuracy"] - independent) <= 0.01
    assert independent > 0.93
    assert sum(p["predicted_counts"].values()) == p["rows"] == len(split.test_labels)


@pytest.mark.parametrize(("name", "floor"), [("iris", 0.9), ("wine", 0.93)])
def test_multiclass_svm_one_vs_one(
    run: Runner, datasets: Callable[[str], Dataset], tmp_path: Path, name: str, floor: float
) -> None:
    split = datasets(name).split(tmp_path)
    trained = run(app, "train_svm", {"data": split.train}, {"cv_folds": 3, "seed": 1})
    r = trained.result
    assert len(r["classes"]) == 3 and r["binary_machines"] == 3
    assert r["cv_accuracy"] > floor
    predicted = run(app, "predict_svm", {"model": trained.output("model"), "data": split.test})
    independent = accuracy_from_predictions(predicted.output("predictions"), split.test_labels)
    assert abs(predicted.result["accuracy"] - independent) <= 0.01
    assert independent > floor
    assert set(predicted.result["predicted_counts"]) == set(r["classes"])


def test_ten_classes_linear_and_rbf_on_digits(
    run: Runner, datasets: Callable[[str], Dataset], tmp_path: Path
) -> None:
    split = datasets("digits").split(tmp_path, test_size=0.25)
    for kernel, floor in (("rbf", 0.97), ("linear", 0.94)):
        trained = run(app, "train_svm", {"data": split.train}, {"kernel": kernel, "c": 5})
        assert trained.result["classes"] == [str(d) for d in range(10)]
        assert trained.result["binary_machines"] == 45
        predicted = run(app, "predict_svm", {"model": trained.output("model"), "data": split.test})
        acc = accuracy_from_predictions(predicted.output("predictions"), split.test_labels)
        assert acc == pytest.approx(predicted.result["accuracy"], abs=1e-12) and acc > floor


def test_stored_decision_functions_equal_dlibs_own(
    datasets: Callable[[str], Dataset],
) -> None:
    """The model file's numbers, evaluated with numpy, give dlib's own decision values."""
    ds = datasets("wine")
    x = (ds.x - ds.x.mean(0)) / ds.x.std(0)
    samples = dlib.vectors([dlib.vector(row.tolist()) for row in x])
    classes = sorted(set(ds.labels))
    for kernel in ("rbf", "linear"):
        trained = []
        for pos, neg in [(0, 1), (0, 2), (1, 2)]:  # three machines sharing support vectors
            chosen = [i for i, lab in enumerate(ds.labels) if lab in (classes[pos], classes[neg])]
            if kernel == "rbf":
                trainer = dlib.svm_c_trainer_radial_basis()
                trainer.gamma = 0.05
            else:
                trainer = dlib.svm_c_trainer_linear()
            trainer.set_c(3.0)
            targets = [1.0 if ds.labels[i] == classes[pos] else -1.0 for i in chosen]
            df = trainer.train(dlib.vectors([samples[i] for i in chosen]), dlib.array(targets))
            trained.append((df, pos, neg))
        machines = dlib_app.Machines.from_dlib(trained)
        stored = json.loads(json.dumps({"kernel": kernel, **machines.to_json()}))
        reloaded = dlib_app.Machines.from_json(stored, kernel, 3, x.shape[1])
        ours = reloaded.decision_values(x)
        theirs = np.array([[df(s) for df, _, _ in trained] for s in samples])
        assert np.allclose(ours, theirs, rtol=1e-9, atol=1e-9)
        if kernel == "rbf":
            shared = sum(len(a) for a in machines.alpha)
            assert machines.support_vector_count() < shared  # each vector is stored once


def test_predictions_carry_an_id_column_and_need_no_label(
    run: Runner, datasets: Callable[[str], Dataset], tmp_path: Path
) -> None:
    ds = datasets("iris")
    train = tmp_path / "train.csv"
    lines = ["id," + ",".join(ds.features) + ",label"]
    lines += [
        f"s{i}," + ",".join(map(repr, r.tolist())) + f",{ds.labels[i]}" for i, r in enumerate(ds.x)
    ]
    train.write_text("\n".join(lines) + "\n")
    trained = run(app, "train_svm", {"data": train}, {"id_column": "id"})
    assert "id" not in trained.result["feature_names"]
    unlabelled = tmp_path / "new.csv"
    unlabelled.write_text("\n".join(line.rsplit(",", 1)[0] for line in lines[:6]) + "\n")
    predicted = run(
        app,
        "predict_svm",
        {"model": trained.output("model"), "data": unlabelled},
        {"id_column": "id"},
    )
    assert "accuracy" not in predicted.result and predicted.result["rows"] == 5
    rows = read_csv(predicted.output("predictions"))
    assert [r["id"] for r in rows] == ["s0", "s1", "s2", "s3", "s4"]
    assert {r["prediction"] for r in rows} == {"setosa"}


def test_column_mismatch_names_missing_and_extra_columns(
    run: Runner, datasets: Callable[[str], Dataset], tmp_path: Path
) -> None:
    ds = datasets("iris")
    trained = run(app, "train_svm", {"data": ds.csv(tmp_path)})
    bad = tmp_path / "bad.csv"
    features = [f for f in ds.features if f != "petal_width_cm"]
    bad.write_text(",".join([*features, "colour"]) + "\n" + "1,2,3,red\n")
    with pytest.raises(JobError) as err:
        run(app, "predict_svm", {"model": trained.output("model"), "data": bad})
    message = str(err.value)
    assert "do not match the model's features" in message
    assert "missing 'petal_width_cm'" in message and "unexpected 'colour'" in message


def test_unknown_format_version_and_foreign_files_fail_clearly(
    run: Runner, datasets: Callable[[str], Dataset], tmp_path: Path
) -> None:
    data = datasets("iris").csv(tmp_path)
    model = run(app, "train_svm", {"data": data}, {"kernel": "linear"}).output("model")
    doc = json.loads(model.read_text())
    assert doc["format"] == "csml-dlib-svm" and doc["format_version"] == 1
    future = tmp_path / "future.json"
    future.write_text(json.dumps({**doc, "format_version": 2}))
    with pytest.raises(JobError, match="unsupported model format_version 2"):
        run(app, "predict_svm", {"model": future, "data": data})
    with pytest.raises(JobError, match="not a dlib SVM model"):
        run(app, "predict_svm", {"model": data, "data": data})
    broken = tmp_path / "broken.json"
    doc["machines"][0]["weights"] = doc["machines"][0]["weights"][:2]
    broken.write_text(json.dumps(doc))
    with pytest.raises(JobError, match="malformed"):
        run(app, "predict_svm", {"model": broken, "data": data})


def test_training_errors_are_clear(run: Runner, tmp_path: Path) -> None:
    one_class = tmp_path / "one.csv"
    one_class.write_text("a,b,label\n1,2,x\n3,4,x\n")
    with pytest.raises(JobError, match="single class"):
        run(app, "train_svm", {"data": one_class})
    with pytest.raises(JobError, match="has no column 'species'"):
        run(app, "train_svm", {"data": one_class}, {"label": "species"})


def test_a_model_reloads_in_a_new_process(
    run: Runner, datasets: Callable[[str], Dataset], tmp_path: Path
) -> None:
    split = datasets("wine").split(tmp_path)
    trained = run(app, "train_svm", {"data": split.train})
    here = run(app, "predict_svm", {"model": trained.output("model"), "data": split.test})
    code = (
        "import json, sys; from pathlib import Path; from csml.apps.base import JobContext;"
        "from csml.apps.dlib_app import app;"
        "out = Path(sys.argv[3]); out.mkdir();"
        "ctx = JobContext({'model': Path(sys.argv[1]), 'data': Path(sys.argv[2])}, out);"
        "print(json.dumps(app.operations['predict_svm'].run(ctx, {})))"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(trained.output("model")),
            str(split.test),
            str(tmp_path / "other"),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    there = json.loads(proc.stdout)
    assert there["accuracy"] == here.result["accuracy"]
    assert (tmp_path / "other" / "predictions").read_text() == (
        here.output("predictions").read_text()
    )


# ----------------------------------------------------------------------------- real cluster


@pytest.fixture(scope="module")
def dlib_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("dlib-cluster"), workers={"dlib": 1}) as c:
        yield c


def test_dlib_through_a_real_cluster(
    dlib_cluster: Cluster, astronaut: Path, datasets: Callable[[str], Dataset], tmp_path: Path
) -> None:
    client = dlib_cluster.new_user()
    faces = client.submit("dlib", "detect_faces", files={"image": astronaut}).wait(60)
    assert faces.state.value == "succeeded" and faces.result is not None, faces.error
    top = faces.result["faces"][0]
    assert iou((top["x"], top["y"], top["w"], top["h"]), ASTRONAUT_FACE) > 0.8
    assert faces.download("annotated", tmp_path / "a.png").stat().st_size > 0

    split = datasets("wine").split(tmp_path)
    train = client.submit(
        "dlib", "train_svm", files={"data": split.train}, params={"cv_folds": 5}
    ).wait(120)
    assert train.state.value == "succeeded" and train.result is not None, train.error
    assert train.result["classes"] == ["class_0", "class_1", "class_2"]
    assert train.result["cv_accuracy"] > 0.93
    model = train.download("model", tmp_path / "model.json")
    predict = client.submit("dlib", "predict_svm", files={"model": model, "data": split.test}).wait(
        60
    )
    assert predict.state.value == "succeeded" and predict.result is not None, predict.error
    independent = accuracy_from_predictions(
        predict.download("predictions", tmp_path / "pred.csv"), split.test_labels
    )
    assert abs(predict.result["accuracy"] - independent) <= 0.01 and independent > 0.93

    bad = tmp_path / "bad.csv"
    bad.write_text("alcohol,colour\n1,2\n")
    failed = client.submit("dlib", "predict_svm", files={"model": model, "data": bad}).wait(60)
    assert failed.state.value == "failed"
    assert "missing 'malic_acid'" in (failed.error or "")
    assert "unexpected 'colour'" in (failed.error or "")
