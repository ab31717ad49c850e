"""Helpers for the app tests. Real data: scikit-learn's bundled datasets as CSV files, a text that
Python ships, scikit-image's photos. Nothing is downloaded."""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from csml.apps.base import App
from csml.apps.testing import run_operation

SKIMAGE_DATA = Path(str(__import__("skimage").__file__)).parent / "data"


def write_csv(
    path: Path, x: np.ndarray, labels: list[str] | None, names: list[str], label: str = "label"
) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*names, *([label] if labels is not None else [])])
        for i, row in enumerate(x):
            writer.writerow([*(repr(float(v)) for v in row), *([labels[i]] if labels else [])])
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@dataclass
class Dataset:
    name: str
    x: np.ndarray
    labels: list[str]
    features: list[str]

    def csv(self, folder: Path, rows: np.ndarray | None = None, tag: str = "") -> Path:
        idx = np.arange(len(self.labels)) if rows is None else rows
        return write_csv(
            folder / f"{self.name}{tag}.csv",
            self.x[idx],
            [self.labels[i] for i in idx],
            self.features,
        )

    def split(self, folder: Path, test_size: float = 0.3, seed: int = 0) -> Split:
        from sklearn.model_selection import train_test_split

        idx = np.arange(len(self.labels))
        train, test = train_test_split(
            idx, test_size=test_size, random_state=seed, stratify=self.labels
        )
        return Split(
            self.csv(folder, train, "-train"),
            self.csv(folder, test, "-test"),
            [self.labels[i] for i in test],
        )


@dataclass
class Split:
    train: Path
    test: Path
    test_labels: list[str]


def load_dataset(name: str) -> Dataset:
    import sklearn.datasets as skd

    bunch = getattr(skd, f"load_{name}")()
    x = np.asarray(bunch.data, dtype=np.float64)
    names = [str(n) for n in getattr(bunch, "target_names", [])]
    labels = [names[t] if names and name != "digits" else str(t) for t in bunch.target]
    features = [f"f{i}" for i in range(x.shape[1])]
    if name in ("iris", "wine", "breast_cancer"):
        features = [re.sub(r"[^0-9A-Za-z]+", "_", str(n)).strip("_") for n in bunch.feature_names]
    return Dataset(name, x, labels, features)


def zen_text() -> str:
    """The Zen of Python, as the `this` module keeps it (rot13), decoded."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return codecs.decode(this.s, "rot13")


@dataclass
class Ran:
    result: dict[str, Any]
    out: Path
    progress: list[tuple[float, str]] = field(default_factory=list)

    def output(self, name: str) -> Path:
        return self.out / name


class Runner:
    """Calls an operation in this process as a worker would (`csml.apps.testing`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.n = 0

    def __call__(
        self,
        app: App,
        operation: str,
        inputs: dict[str, Path],
        params: dict[str, Any] | None = None,
    ) -> Ran:
        self.n += 1
        run = run_operation(app, operation, params, inputs, self.root / f"job{self.n}")
        return Ran(run.result, run.workdir / "outputs", run.progress)


def accuracy_from_predictions(predictions: Path, truth: list[str]) -> float:
    rows = read_csv(predictions)
    assert [int(r["row"]) for r in rows] == list(range(len(truth)))
    return sum(r["prediction"] == t for r, t in zip(rows, truth, strict=True)) / len(truth)
