"""`dlib`: face detection and support vector machines with dlib (PyPI `dlib-bin`).

Operations:

- ``detect_faces``: dlib's HOG + linear SVM frontal face detector
  (``dlib.get_frontal_face_detector``), with a detection score per face. Images
  are decoded and the annotated PNG encoded with the OpenCV app's helpers
  (`csml.apps.opencv.read_image`, `write_png`), so this operation needs
  ``opencv-python-headless`` too (the ``csml[dlib]`` extra installs it).
- ``train_svm``: a C-SVM (``dlib.svm_c_trainer_linear`` or
  ``dlib.svm_c_trainer_radial_basis``) on a CSV table. More than two classes are
  handled one-vs-one: one binary dlib SVM per pair of classes, and prediction is
  a vote (ties go to the class with the larger summed decision value, then to
  the first class). Features are standardised with the training data's mean and
  standard deviation. Optional stratified k-fold cross-validation (normalisation
  learnt inside each training fold).
- ``predict_svm``: a model from ``train_svm`` + a CSV table -> predictions CSV.

Model file, ``format: "csml-dlib-svm"``, ``format_version: 1`` (JSON, UTF-8)::

    {
      "format": "csml-dlib-svm", "format_version": 1,
      "created_by": {"csml": "0.1.0", "dlib": "20.0.1"},
      "kernel": "rbf" | "linear", "c": 10.0,
      "label_column": "label",
      "feature_names": ["f1", ...],                      # the order of every vector below
      "normalization": {"mean": [...], "std": [...]},   # x' = (x - mean) / std
      "classes": ["a", "b", ...],                        # class labels, as text
      "class_counts": {"a": 50, ...},                    # training rows per class
      "gamma": 0.25,                                     # rbf; null for linear
      "support_vectors": [[...], ...],                   # rbf: distinct ones; null for linear
      "machines": [                                      # one per pair of classes i < j
        {"positive": i, "negative": j, "b": float,
         "weights": [...]},                              # linear
        {"positive": i, "negative": j, "b": float,
         "support": [k, ...], "alpha": [...]}            # rbf: rows of support_vectors
      ]
    }

Machine ``m`` votes for class ``positive`` when ``f(x') > 0``, otherwise for
``negative``, where for a linear machine ``f(x') = weights . x' - b`` and for an
RBF machine ``f(x') = sum_k alpha[k] * exp(-gamma * |x' - support_vectors[support[k]]|^2) - b``.
These are the fields of dlib's decision functions (``weights``/``bias``, or
``alpha``/``basis_vectors``/``b``/``kernel_function.gamma``; a vector shared by
several machines is stored once), kept as numbers rather than pickles: a model
is a user upload, and loading one must never run code. Prediction evaluates the
formulas above with numpy (the tests check they give dlib's own decision
values). A reader must refuse a ``format_version`` it does not know.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from csml.apps import tabular
from csml.apps.base import (
    App,
    Input,
    JobContext,
    JobError,
    ModelSpec,
    OperationParams,
    Output,
)

if TYPE_CHECKING:
    import numpy as np

MODEL_FORMAT = "csml-dlib-svm"
MODEL_FORMAT_VERSION = 1
SVM_MODEL = ModelSpec("svm", MODEL_FORMAT, MODEL_FORMAT_VERSION)
MAX_MODEL_BYTES = 1 << 30
MAX_CLASSES = 100

_HAVE_CV2 = importlib.util.find_spec("cv2") is not None

app = App(
    "dlib",
    version="1.0",
    description="dlib: HOG face detection; SVM classifiers (linear or RBF, one-vs-one) on CSV.",
    preload=("numpy", "dlib", *(("cv2",) if _HAVE_CV2 else ()), "csml.apps._dlib_init"),
)

# ----------------------------------------------------------------------------- faces


class DetectFacesParams(OperationParams):
    upsample: int = Field(
        1, ge=0, le=3, description="Upsample the image this many times (finds smaller faces)."
    )
    adjust_threshold: float = Field(
        0.0,
        ge=-3.0,
        le=3.0,
        description="Added to the detector's threshold: higher, fewer and surer detections.",
    )


def _opencv_image_helpers() -> tuple[Any, Any]:
    """`read_image` and `write_png` of the OpenCV app, or a clear failure without OpenCV."""
    if not _HAVE_CV2:
        raise JobError(
            "dlib.detect_faces needs OpenCV to decode images, and this worker has none: "
            "install csml[dlib] (it brings opencv-python-headless)"
        )
    from csml.apps.opencv import read_image, write_png

    return read_image, write_png


@app.operation(
    inputs=[Input("image", "An image (PNG, JPEG, BMP, TIFF, WebP, ...).", media_type="image/*")],
    outputs=[Output("annotated", "The image with a box around each face.", "image/png")],
    deterministic=True,
)
def detect_faces(ctx: JobContext, params: DetectFacesParams) -> dict[str, Any]:
    """Find frontal faces with dlib's HOG detector; each face has a detection score."""
    read_image, write_png = _opencv_image_helpers()
    import cv2
    import numpy as np

    from csml.apps._dlib_init import face_detector

    image = read_image(ctx.input("image"))
    height, width = image.shape[:2]
    rgb = np.ascontiguousarray(image[:, :, ::-1])
    rects, scores, _kinds = face_detector().run(rgb, params.upsample, params.adjust_threshold)
    faces = []
    for rect, score in sorted(zip(rects, scores, strict=True), key=lambda rs: -rs[1]):
        left, top = max(0, rect.left()), max(0, rect.top())
        right, bottom = min(width, rect.right() + 1), min(height, rect.bottom() + 1)
        if right <= left or bottom <= top:
            continue
        faces.append(
            {
                "x": int(left),
                "y": int(top),
                "w": int(right - left),
                "h": int(bottom - top),
                "score": round(float(score), 6),
            }
        )
    for f in faces:
        x, y, w, h = int(f["x"]), int(f["y"]), int(f["w"]), int(f["h"])
        cv2.rectangle(image, (x, y), (x + w, y + h), (0, 255, 0), 2)
    write_png(ctx.output("annotated"), image)
    return {"count": len(faces), "faces": faces, "width": int(width), "height": int(height)}


# ----------------------------------------------------------------------------- SVM model


def _vector_key(v: Any) -> bytes:
    """The exact value of a dlib vector as bytes (dlib's own serialisation)."""
    try:
        return bytes(v.__getstate__()[0])
    except (AttributeError, IndexError, TypeError):  # pragma: no cover - other dlib builds
        import numpy as np

        return np.array(v, dtype=np.float64).tobytes()


@dataclass
class Machines:
    """The binary decision functions of a one-vs-one SVM (the model file's ``machines``).

    Machine ``m`` votes for class ``pairs[m][0]`` when ``f_m(x') > 0``, else for
    ``pairs[m][1]``. Linear: ``f_m(x') = weights[m] . x' - b[m]``. RBF:
    ``f_m(x') = sum_k alpha[m][k] exp(-gamma |x' - support_vectors[support[m][k]]|^2) - b[m]``,
    the support vectors being stored once however many machines share them.
    """

    kernel: str
    pairs: list[tuple[int, int]]
    b: np.ndarray
    weights: np.ndarray | None = None  # linear: (machines, features)
    gamma: float | None = None
    support_vectors: np.ndarray | None = None  # rbf: (distinct vectors, features)
    support: list[np.ndarray] = field(default_factory=list)  # rbf: indices, per machine
    alpha: list[np.ndarray] = field(default_factory=list)  # rbf: weights, per machine

    @classmethod
    def from_dlib(cls, trained: list[tuple[Any, int, int]]) -> Machines:
        """From dlib decision functions (all linear or all RBF with one gamma)."""
        import numpy as np

        pairs = [(pos, neg) for _, pos, neg in trained]
        if hasattr(trained[0][0], "weights"):  # _decision_function_linear
            return cls(
                "linear",
                pairs,
                b=np.array([float(df.bias) for df, _, _ in trained]),
                weights=np.array([np.array(df.weights) for df, _, _ in trained]),
            )
        rows: dict[bytes, int] = {}
        vectors: list[np.ndarray] = []
        support, alpha = [], []
        for df, _, _ in trained:  # _decision_function_radial_basis
            idx = []
            for v in df.basis_vectors:
                key = _vector_key(v)  # cheaper than converting every vector to numpy
                if key not in rows:
                    rows[key] = len(vectors)
                    vectors.append(np.array(v, dtype=np.float64).reshape(-1))
                idx.append(rows[key])
            support.append(np.array(idx, dtype=np.int64))
            alpha.append(np.array(df.alpha, dtype=np.float64))
        return cls(
            "rbf",
            pairs,
            b=np.array([float(df.b) for df, _, _ in trained]),
            gamma=float(trained[0][0].kernel_function.gamma),
            support_vectors=np.array(vectors),
            support=support,
            alpha=alpha,
        )

    def decision_values(self, x: np.ndarray) -> np.ndarray:
        """f_m for each row of the standardised matrix x: shape (rows, machines)."""
        import numpy as np

        if self.weights is not None:
            return np.asarray(x @ self.weights.T - self.b)
        sv, gamma = self.support_vectors, self.gamma
        assert sv is not None and gamma is not None
        n_sv, n_m = len(sv), len(self.pairs)
        dense = n_sv * n_m <= 16_000_000
        if dense:  # one (vectors x machines) coefficient matrix: a single product per chunk
            coef = np.zeros((n_sv, n_m))
            for m, (idx, a) in enumerate(zip(self.support, self.alpha, strict=True)):
                np.add.at(coef[:, m], idx, a)
        sv_sq = (sv * sv).sum(axis=1)
        out = np.empty((len(x), n_m))
        step = max(1, 4_000_000 // max(1, n_sv))  # bound the kernel matrix's memory
        for start in range(0, len(x), step):
            chunk = x[start : start + step]
            d2 = (chunk * chunk).sum(axis=1)[:, None] + sv_sq[None, :] - 2.0 * (chunk @ sv.T)
            np.maximum(d2, 0.0, out=d2)
            kernel = np.exp(-gamma * d2, out=d2)
            if dense:
                out[start : start + step] = kernel @ coef
            else:
                for m, (idx, a) in enumerate(zip(self.support, self.alpha, strict=True)):
                    out[start : start + step, m] = kernel[:, idx] @ a
        return np.asarray(out - self.b)

    def vote(self, x: np.ndarray, n_classes: int) -> np.ndarray:
        """Class index per row: the most votes; a tie goes to the larger summed decision
        value, then to the lower class index."""
        import numpy as np

        f = self.decision_values(x)
        votes = np.zeros((len(x), n_classes))
        margin = np.zeros((len(x), n_classes))
        for m, (pos, neg) in enumerate(self.pairs):
            win = f[:, m] > 0
            votes[:, pos] += win
            votes[:, neg] += ~win
            margin[:, pos] += f[:, m]
            margin[:, neg] -= f[:, m]
        # votes are whole numbers: the scaled margin (|.| < 0.5) only breaks ties
        scale = np.abs(margin).max(axis=1, keepdims=True) + 1.0
        return np.asarray(np.argmax(votes + 0.5 * margin / scale / (n_classes + 1), axis=1))

    def support_vector_count(self) -> int:
        return 0 if self.support_vectors is None else len(self.support_vectors)

    def to_json(self) -> dict[str, Any]:
        """The model file's ``gamma``, ``support_vectors`` and ``machines`` fields."""
        machines: list[dict[str, Any]] = []
        for m, (pos, neg) in enumerate(self.pairs):
            entry: dict[str, Any] = {"positive": pos, "negative": neg, "b": float(self.b[m])}
            if self.weights is not None:
                entry["weights"] = self.weights[m].tolist()
            else:
                entry["support"] = self.support[m].tolist()
                entry["alpha"] = self.alpha[m].tolist()
            machines.append(entry)
        return {
            "gamma": self.gamma,
            "support_vectors": None
            if self.support_vectors is None
            else self.support_vectors.tolist(),
            "machines": machines,
        }

    @classmethod
    def from_json(
        cls, data: dict[str, Any], kernel: str, n_classes: int, n_features: int
    ) -> Machines:
        """Check and load; any inconsistency is a ValueError (or KeyError/TypeError)."""
        import numpy as np

        entries = data["machines"]
        if not isinstance(entries, list) or not entries:
            raise ValueError("no decision function")
        pairs = []
        for e in entries:
            pos, neg = int(e["positive"]), int(e["negative"])
            if not (0 <= pos < n_classes and 0 <= neg < n_classes and pos != neg):
                raise ValueError("a decision function's class index is out of range")
            pairs.append((pos, neg))
        b = np.array([float(e["b"]) for e in entries])
        if kernel == "linear":
            weights = np.array([np.asarray(e["weights"], dtype=np.float64) for e in entries])
            if weights.shape != (len(entries), n_features):
                raise ValueError("the weights do not match the features")
            return cls("linear", pairs, b=b, weights=weights)
        gamma = float(data["gamma"])
        if not (gamma > 0 and math.isfinite(gamma)):
            raise ValueError("gamma must be a positive number")
        sv = np.asarray(data["support_vectors"], dtype=np.float64)
        if sv.ndim != 2 or sv.shape[1] != n_features or len(sv) == 0:
            raise ValueError("the support vectors do not match the features")
        support, alpha = [], []
        for e in entries:
            idx = np.asarray(e["support"], dtype=np.int64)
            a = np.asarray(e["alpha"], dtype=np.float64)
            if idx.ndim != 1 or idx.shape != a.shape:
                raise ValueError("a decision function's support and alpha differ in length")
            if len(idx) and (idx.min() < 0 or idx.max() >= len(sv)):
                raise ValueError("a support vector index is out of range")
            support.append(idx)
            alpha.append(a)
        values = [b, sv, *alpha]
        if not all(np.isfinite(v).all() for v in values):
            raise ValueError("a number is not finite")
        return cls("rbf", pairs, b=b, gamma=gamma, support_vectors=sv, support=support, alpha=alpha)


@dataclass
class SvmModel:
    kernel: str
    c: float
    label_column: str
    feature_names: list[str]
    scaler: tabular.Standardizer
    classes: list[str]
    class_counts: dict[str, int]
    machines: Machines

    def decide(self, x: np.ndarray) -> np.ndarray:
        """Class index per row of the raw (unstandardised) matrix x, by one-vs-one vote."""
        return self.machines.vote(self.scaler.transform(x), len(self.classes))

    def to_json(self) -> dict[str, Any]:
        import dlib

        from csml import __version__

        return {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "created_by": {"csml": __version__, "dlib": dlib.__version__},
            "kernel": self.kernel,
            "c": self.c,
            "label_column": self.label_column,
            "feature_names": self.feature_names,
            "normalization": self.scaler.to_json(),
            "classes": self.classes,
            "class_counts": self.class_counts,
            **self.machines.to_json(),
        }

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json()), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> SvmModel:
        if path.stat().st_size > MAX_MODEL_BYTES:
            raise JobError("input 'model' is larger than any model train_svm writes")
        try:
            data = json.loads(path.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise JobError(
                "input 'model' is not a dlib SVM model (not JSON); use the `model` output "
                "of dlib.train_svm"
            ) from None
        if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT:
            raise JobError(
                f"input 'model' is not a dlib SVM model (format is not {MODEL_FORMAT!r}); "
                "use the `model` output of dlib.train_svm"
            )
        version = data.get("format_version")
        if version != MODEL_FORMAT_VERSION:
            raise JobError(
                f"unsupported model format_version {version!r}: this worker reads "
                f"{MODEL_FORMAT} version {MODEL_FORMAT_VERSION} only"
            )
        try:
            kernel = data["kernel"]
            if kernel not in ("linear", "rbf"):
                raise ValueError(f"unknown kernel {kernel!r}")
            features = [str(f) for f in data["feature_names"]]
            classes = [str(c) for c in data["classes"]]
            if len(classes) < 2 or not features:
                raise ValueError("needs two classes and one feature at least")
            counts = {str(k): int(v) for k, v in dict(data.get("class_counts", {})).items()}
            return cls(
                kernel=kernel,
                c=float(data["c"]),
                label_column=str(data["label_column"]),
                feature_names=features,
                scaler=tabular.Standardizer.from_json(data["normalization"], len(features)),
                classes=classes,
                class_counts=counts,
                machines=Machines.from_json(data, kernel, len(classes), len(features)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise JobError(f"the model file is malformed: {exc}") from None


def train_ovo(
    x: np.ndarray,
    y: np.ndarray,
    classes: list[int],
    make_trainer: Any,
    on_machine: Any = None,
) -> list[tuple[Any, int, int]]:
    """One binary dlib SVM per pair of the given class indices (x already standardised):
    (dlib decision function, positive class, negative class)."""
    import dlib

    rows = [dlib.vector(row.tolist()) for row in x]  # converted once, shared by every pair
    trained = []
    pairs = [(a, b) for i, a in enumerate(classes) for b in classes[i + 1 :]]
    for n, (pos, neg) in enumerate(pairs):
        chosen = [int(i) for i in ((y == pos) | (y == neg)).nonzero()[0]]
        samples = dlib.vectors()
        samples.extend(rows[i] for i in chosen)
        labels = dlib.array([1.0 if y[i] == pos else -1.0 for i in chosen])
        trained.append((make_trainer().train(samples, labels), pos, neg))
        if on_machine is not None:
            on_machine(n + 1, len(pairs))
    return trained


# ----------------------------------------------------------------------------- operations


class TrainSvmParams(OperationParams):
    label: str = Field("label", min_length=1, description="The column holding the class.")
    kernel: Literal["rbf", "linear"] = Field("rbf", description="SVM kernel.")
    c: float = Field(10.0, gt=0, le=1e7, description="Misclassification cost C.")
    gamma: float | None = Field(
        None,
        gt=0,
        le=1e4,
        description="RBF kernel width: exp(-gamma |x - x'|^2) on standardised features; "
        "default 1 / number of features.",
    )
    epsilon: float = Field(0.001, gt=0, le=1, description="Solver stopping tolerance.")
    cv_folds: int = Field(
        0, ge=0, le=20, description="k-fold cross-validation (stratified); 0 or 1: none."
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the cross-validation folds.")
    id_column: str | None = Field(None, description="A column to ignore (row identifiers).")
    features: list[str] | None = Field(
        None, description="Feature columns; default: every column but the label and id."
    )


@app.operation(
    inputs=[
        Input(
            "data",
            "CSV with a header row: numeric feature columns and a label column.",
            media_type="text/csv",
        )
    ],
    outputs=[
        Output(
            "model",
            f"The trained model: JSON, format {MODEL_FORMAT!r} version {MODEL_FORMAT_VERSION}; "
            "kept as one of your models.",
            "application/json",
            model=SVM_MODEL,
        )
    ],
)
def train_svm(ctx: JobContext, params: TrainSvmParams) -> dict[str, Any]:
    """Train an SVM classifier (binary, or one-vs-one for more classes) on a CSV table."""
    import dlib
    import numpy as np

    data = tabular.labelled_table(
        ctx.input("data"),
        params.label,
        params.id_column,
        params.features,
        MAX_CLASSES,
        "one binary SVM per pair of classes",
    )
    features, x_raw, classes, y = data.features, data.x, data.classes, data.y
    gamma = params.gamma if params.gamma is not None else 1.0 / len(features)

    def make_trainer() -> Any:
        if params.kernel == "linear":
            trainer = dlib.svm_c_trainer_linear()
        else:
            trainer = dlib.svm_c_trainer_radial_basis()
            trainer.gamma = gamma
        trainer.set_c(params.c)
        trainer.epsilon = params.epsilon
        return trainer

    folds = params.cv_folds if params.cv_folds >= 2 else 0
    if folds > len(y):
        raise JobError(f"cv_folds={folds} is more than the {len(y)} rows")
    n_pairs = len(classes) * (len(classes) - 1) // 2
    total_steps = n_pairs * (1 + folds)
    done = 0

    def step(_: int, __: int) -> None:
        nonlocal done
        done += 1
        ctx.progress(0.99 * done / total_steps, f"trained {done}/{total_steps} binary SVMs")

    result: dict[str, Any] = {}
    if folds:
        started = time.perf_counter()
        correct = 0
        fold_acc = []
        for test_idx in tabular.stratified_folds(y, folds, params.seed):
            train_mask = np.ones(len(y), dtype=bool)
            train_mask[test_idx] = False
            scaler = tabular.Standardizer.fit(x_raw[train_mask])
            present = sorted(set(y[train_mask].tolist()))
            if len(present) < 2:
                raise JobError("a cross-validation fold has a single class; use fewer folds")
            fold_machines = Machines.from_dlib(
                train_ovo(
                    scaler.transform(x_raw[train_mask]), y[train_mask], present, make_trainer, step
                )
            )
            pred = fold_machines.vote(scaler.transform(x_raw[test_idx]), len(classes))
            hits = int((pred == y[test_idx]).sum())
            correct += hits
            fold_acc.append(hits / len(test_idx) if len(test_idx) else None)
        result["cv_folds"] = folds
        result["cv_accuracy"] = correct / len(y)
        result["cv_fold_accuracies"] = fold_acc
        result["cv_seconds"] = round(time.perf_counter() - started, 4)

    started = time.perf_counter()
    scaler = tabular.Standardizer.fit(x_raw)
    x = scaler.transform(x_raw)
    trained = train_ovo(x, y, list(range(len(classes))), make_trainer, step)
    training_seconds = time.perf_counter() - started  # what dlib took, samples conversion too
    machines = Machines.from_dlib(trained)
    model = SvmModel(
        kernel=params.kernel,
        c=params.c,
        label_column=params.label,
        feature_names=features,
        scaler=scaler,
        classes=classes,
        class_counts={c: int((y == i).sum()) for i, c in enumerate(classes)},
        machines=machines,
    )
    train_pred = model.decide(x_raw)
    model.save(ctx.output("model"))
    ctx.progress(1.0, "trained")
    return {
        "rows": len(y),
        "classes": classes,
        "class_counts": model.class_counts,
        "feature_names": features,
        "kernel": params.kernel,
        "c": params.c,
        "gamma": machines.gamma,
        "binary_machines": len(machines.pairs),
        "support_vectors": machines.support_vector_count(),
        "train_accuracy": float((train_pred == y).mean()),
        "training_seconds": round(training_seconds, 4),
        **result,
        "model_format": {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION},
    }


class PredictSvmParams(OperationParams):
    id_column: str | None = Field(
        None, description="A column copied into the predictions (default: the row number)."
    )


@app.operation(
    inputs=[
        Input(
            "model", "A model from dlib.train_svm.", media_type="application/json", model=SVM_MODEL
        ),
        Input(
            "data",
            "CSV with the model's feature columns (and optionally its label column).",
            media_type="text/csv",
        ),
    ],
    outputs=[
        Output("predictions", "CSV: the row id (or number) and the predicted class.", "text/csv")
    ],
    deterministic=True,
)
def predict_svm(ctx: JobContext, params: PredictSvmParams) -> dict[str, Any]:
    """Classify each row of a CSV table with a model from train_svm."""
    model = SvmModel.load(ctx.input("model"))
    table = tabular.read_table(ctx.input("data"), "data")
    tabular.check_columns(table, model.feature_names, (model.label_column, params.id_column))
    if params.id_column is not None:
        table.index(params.id_column)
    x_raw = table.numeric(model.feature_names)
    started = time.perf_counter()
    predicted = [model.classes[i] for i in model.decide(x_raw)]
    seconds = time.perf_counter() - started
    id_name, ids = tabular.row_ids(table, params.id_column)
    tabular.write_predictions(ctx.output("predictions"), id_name, ids, predicted)
    truth = table.labels(model.label_column) if model.label_column in table.columns else None
    # The time goes to the progress message, not the result: the result is deterministic
    # (compared across workers when a contributed worker's run is verified).
    ctx.progress(1.0, f"predicted in {seconds:.4f} s")
    return tabular.prediction_summary(predicted, model.classes, truth)
