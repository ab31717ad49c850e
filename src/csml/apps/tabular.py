"""CSV tables for the tabular apps (`dlib`'s SVMs, `dynet`'s MLPs): read, check, split, write.

A table is a UTF-8 CSV file (a byte-order mark is allowed) whose first row names
the columns. Training takes one column as the label (any text: ``setosa``,
``0``, ``spam``), optionally one as a row id, and uses the other columns (or the
ones named) as numeric features. Every failure is a `JobError` that names the
row and column at fault, so a user can fix their file.

Everything here is plain Python and numpy: no ML library, no HTTP.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from csml.apps.base import JobError

if TYPE_CHECKING:
    import numpy as np

MAX_COLUMNS = 100_000
MAX_LISTED = 10
"""At most this many names are quoted in one error message."""


def _names(names: Iterable[str]) -> str:
    listed = list(names)
    shown = ", ".join(repr(n) for n in listed[:MAX_LISTED])
    more = len(listed) - MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


@dataclass
class Table:
    """A parsed CSV file: column names and rows of strings (`line` numbers are 1-based)."""

    name: str
    columns: list[str]
    rows: list[list[str]]
    lines: list[int]

    def __len__(self) -> int:
        return len(self.rows)

    def index(self, column: str) -> int:
        try:
            return self.columns.index(column)
        except ValueError:
            raise JobError(
                f"input {self.name!r} has no column {column!r}; its columns are "
                f"{_names(self.columns)}"
            ) from None

    def column(self, column: str) -> list[str]:
        i = self.index(column)
        return [row[i] for row in self.rows]

    def labels(self, column: str) -> list[str]:
        """The values of a label column; an empty cell is an error."""
        values = self.column(column)
        for value, line in zip(values, self.lines, strict=True):
            if value == "":
                raise JobError(f"input {self.name!r}, line {line}: column {column!r} is empty")
        return values

    def numeric(self, columns: Sequence[str]) -> np.ndarray:
        """The named columns as a float64 matrix (rows x columns); every cell must be a number."""
        import numpy as np

        idx = [self.index(c) for c in columns]
        try:  # fast path: numpy converts every cell; on any doubt, the loop below says where
            fast = np.array([[row[i] for i in idx] for row in self.rows], dtype=np.float64)
            if fast.shape == (len(self.rows), len(idx)) and np.isfinite(fast).all():
                return fast
        except (ValueError, TypeError):
            pass
        out = np.empty((len(self.rows), len(idx)), dtype=np.float64)
        for r, (row, line) in enumerate(zip(self.rows, self.lines, strict=True)):
            for k, i in enumerate(idx):
                cell = row[i]
                try:
                    value = float(cell)
                except ValueError:
                    value = math.nan
                    bad = True
                else:
                    bad = not math.isfinite(value)
                if bad:
                    shown = cell if len(cell) <= 40 else cell[:40] + "..."
                    raise JobError(
                        f"input {self.name!r}, line {line}: column {columns[k]!r} must be a "
                        f"finite number, got {shown!r}"
                    )
                out[r, k] = value
        return out


def read_table(path: Path, name: str) -> Table:
    """Parse a CSV file with a header row; fail the job on anything malformed."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            try:
                header = next(reader)
            except StopIteration:
                raise JobError(
                    f"input {name!r} is empty; send a CSV file with a header row"
                ) from None
            columns = [c.strip() for c in header]
            if len(columns) > MAX_COLUMNS:
                raise JobError(f"input {name!r} has {len(columns)} columns (limit {MAX_COLUMNS})")
            if any(c == "" for c in columns):
                raise JobError(f"input {name!r}: the header row has an empty column name")
            dupes = [c for c, n in Counter(columns).items() if n > 1]
            if dupes:
                raise JobError(f"input {name!r}: duplicate column names {_names(dupes)}")
            rows: list[list[str]] = []
            lines: list[int] = []
            for row in reader:
                if not row or all(cell.strip() == "" for cell in row):
                    continue  # blank line
                if len(row) != len(columns):
                    raise JobError(
                        f"input {name!r}, line {reader.line_num}: {len(row)} fields where the "
                        f"header has {len(columns)}"
                    )
                rows.append([cell.strip() for cell in row])
                lines.append(reader.line_num)
    except UnicodeDecodeError as exc:
        raise JobError(f"input {name!r} is not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise JobError(f"input {name!r} is not a valid CSV file: {exc}") from None
    if not rows:
        raise JobError(f"input {name!r} has a header but no data rows")
    return Table(name, columns, rows, lines)


def feature_columns(
    table: Table, label: str | None, id_column: str | None, features: Sequence[str] | None
) -> list[str]:
    """The feature columns for training: the ones named, or all but the label and id."""
    reserved = {c for c in (label, id_column) if c is not None}
    for c in reserved:
        table.index(c)
    if features is not None:
        if not features:
            raise JobError("`features` names no column")
        dupes = [c for c, n in Counter(features).items() if n > 1]
        if dupes:
            raise JobError(f"`features` names {_names(dupes)} more than once")
        clash = [c for c in features if c in reserved]
        if clash:
            raise JobError(f"{_names(clash)} cannot be both a feature and the label or id column")
        missing = [c for c in features if c not in table.columns]
        if missing:
            raise JobError(f"input {table.name!r} has no column {_names(missing)}")
        return list(features)
    cols = [c for c in table.columns if c not in reserved]
    if not cols:
        raise JobError(f"input {table.name!r} has no feature column besides the label")
    return cols


def check_columns(
    table: Table, expected: Sequence[str], allowed: Iterable[str | None] = ()
) -> None:
    """The table must have exactly the model's feature columns (plus the `allowed` ones)."""
    present = set(table.columns)
    missing = [c for c in expected if c not in present]
    extra_ok = set(expected) | {a for a in allowed if a is not None}
    extra = [c for c in table.columns if c not in extra_ok]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {_names(missing)}")
        if extra:
            parts.append(f"unexpected {_names(extra)}")
        raise JobError(
            f"the columns of input {table.name!r} do not match the model's features: "
            + "; ".join(parts)
            + f" (the model expects {_names(expected)})"
        )


def sorted_labels(values: Iterable[str]) -> list[str]:
    """Distinct labels, in numeric order when they are all numbers, else in text order."""
    distinct = set(values)
    try:
        return sorted(distinct, key=lambda v: (float(v), v))
    except ValueError:
        return sorted(distinct)


@dataclass
class Labelled:
    """A training table: feature names, the feature matrix, class names, class indices."""

    features: list[str]
    x: np.ndarray
    classes: list[str]
    y: np.ndarray


def labelled_table(
    path: Path,
    label: str,
    id_column: str | None,
    features: Sequence[str] | None,
    max_classes: int,
    limit_reason: str = "",
) -> Labelled:
    """Read input `data` for training: at least two classes, at most `max_classes`."""
    import numpy as np

    table = read_table(path, "data")
    names = feature_columns(table, label, id_column, features)
    x = table.numeric(names)
    labels = table.labels(label)
    classes = sorted_labels(labels)
    if len(classes) < 2:
        raise JobError(f"column {label!r} has a single class ({classes[0]!r}); need two or more")
    if len(classes) > max_classes:
        why = f": {limit_reason}" if limit_reason else ""
        raise JobError(f"column {label!r} has {len(classes)} classes (limit {max_classes}{why})")
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[v] for v in labels], dtype=np.int64)
    return Labelled(names, x, classes, y)


@dataclass
class Standardizer:
    """Per-feature mean and standard deviation learnt on training data (a constant: std 1)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        import numpy as np

        std = x.std(axis=0)
        return cls(np.asarray(x.mean(axis=0)), np.asarray(np.where(std > 0, std, 1.0)))

    def transform(self, x: np.ndarray) -> np.ndarray:
        import numpy as np

        return np.asarray((x - self.mean) / self.std)

    def to_json(self) -> dict[str, list[float]]:
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    @classmethod
    def from_json(cls, data: Any, n_features: int) -> Standardizer:
        import numpy as np

        try:
            mean = np.asarray(data["mean"], dtype=np.float64)
            std = np.asarray(data["std"], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            raise JobError("the model's normalisation is malformed") from None
        if mean.shape != (n_features,) or std.shape != (n_features,) or not (std > 0).all():
            raise JobError("the model's normalisation does not match its features")
        return cls(mean, std)


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held out): about `fraction` of each class held out, at least one of
    every class with two or more rows; shuffled with `seed`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    held: list[np.ndarray] = []
    for cls in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == cls))
        n = round(len(idx) * fraction) if fraction > 0 else 0
        if fraction > 0 and len(idx) >= 2:
            n = min(max(n, 1), len(idx) - 1)
        held.append(idx[:n])
        train.append(idx[n:])
    return rng.permutation(np.concatenate(train)), np.sort(np.concatenate(held))


def stratified_folds(y: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """`k` disjoint index sets covering every row, each class dealt round-robin."""
    import numpy as np

    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    start = 0
    for cls in np.unique(y):
        for i, row in enumerate(rng.permutation(np.flatnonzero(y == cls))):
            folds[(start + i) % k].append(int(row))
        start += int((y == cls).sum())
    return [np.sort(np.asarray(f, dtype=np.int64)) for f in folds]


def row_ids(table: Table, id_column: str | None) -> tuple[str, list[str]]:
    """The name and values of the id column of the predictions (the row number if none)."""
    if id_column is None:
        return "row", [str(i) for i in range(len(table))]
    return id_column, table.column(id_column)


def write_predictions(
    path: Path, id_name: str, ids: Sequence[str], predicted: Sequence[str]
) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([id_name, "prediction"])
        writer.writerows(zip(ids, predicted, strict=True))


def prediction_summary(
    predicted: Sequence[str], classes: Sequence[str], truth: Sequence[str] | None
) -> dict[str, Any]:
    """Counts per predicted class, and accuracy against `truth` when there is one."""
    counts = Counter(predicted)
    summary: dict[str, Any] = {
        "rows": len(predicted),
        "predicted_counts": {c: counts.get(c, 0) for c in classes},
    }
    if truth is not None:
        correct = sum(p == t for p, t in zip(predicted, truth, strict=True))
        summary["accuracy"] = correct / len(predicted) if predicted else None
        summary["correct"] = correct
        unknown = sorted(set(truth) - set(classes))
        if unknown:
            summary["unknown_labels"] = unknown[:MAX_LISTED]
    return summary
