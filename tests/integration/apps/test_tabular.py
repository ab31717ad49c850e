"""CSV helpers: every malformed file fails the job with a message naming what is wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from csml.apps import tabular
from csml.apps.base import JobError


def table(tmp_path: Path, text: str, name: str = "data") -> tabular.Table:
    path = tmp_path / "t.csv"
    path.write_text(text, encoding="utf-8")
    return tabular.read_table(path, name)


def test_a_csv_is_parsed_with_its_header_bom_and_blank_lines(tmp_path: Path) -> None:
    t = table(tmp_path, "\ufeffa, b ,label\n1,2,x\n\n3,4.5,y\n")
    assert t.columns == ["a", "b", "label"]
    assert t.lines == [2, 4]
    assert t.numeric(["b", "a"]).tolist() == [[2.0, 1.0], [4.5, 3.0]]
    assert t.labels("label") == ["x", "y"]
    assert tabular.feature_columns(t, "label", None, None) == ["a", "b"]
    assert tabular.feature_columns(t, "label", "a", None) == ["b"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("a,b\n", "no data rows"),
        ("a,a\n1,2\n", "duplicate column names 'a'"),
        ("a,\n1,2\n", "empty column name"),
        ("a,b\n1,2\n3\n", "line 3: 1 fields where the header has 2"),
    ],
)
def test_malformed_csv_files_fail_clearly(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(JobError, match=message):
        table(tmp_path, text)


def test_a_non_utf8_file_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes(b"a,b\n\xff\xfe,1\n")
    with pytest.raises(JobError, match="not UTF-8"):
        tabular.read_table(path, "data")


@pytest.mark.parametrize("cell", ["abc", "nan", "inf", ""])
def test_a_non_numeric_cell_is_named_by_line_and_column(tmp_path: Path, cell: str) -> None:
    t = table(tmp_path, f"a,b,label\n1,2,x\n3,{cell},y\n")
    with pytest.raises(JobError, match=f"line 3: column 'b' must be a finite number, got '{cell}'"):
        t.numeric(["a", "b"])


def test_label_and_feature_errors(tmp_path: Path) -> None:
    t = table(tmp_path, "a,b,label\n1,2,x\n3,4,\n")
    with pytest.raises(JobError, match="line 3: column 'label' is empty"):
        t.labels("label")
    with pytest.raises(JobError, match="has no column 'class'; its columns are 'a', 'b', 'label'"):
        tabular.feature_columns(t, "class", None, None)
    with pytest.raises(JobError, match="has no column 'c'"):
        tabular.feature_columns(t, "label", None, ["a", "c"])
    with pytest.raises(JobError, match="cannot be both"):
        tabular.feature_columns(t, "label", None, ["a", "label"])


def test_check_columns_names_missing_and_extra_columns(tmp_path: Path) -> None:
    t = table(tmp_path, "a,c,extra,label,id\n1,2,3,x,r1\n")
    with pytest.raises(JobError) as err:
        tabular.check_columns(t, ["a", "b", "c"], ("label", "id"))
    message = str(err.value)
    assert "missing 'b'" in message and "unexpected 'extra'" in message
    assert "'label'" not in message.split("(the model")[0]  # allowed columns are not extra
    tabular.check_columns(t, ["a", "c", "extra"], ("label", "id"))


def test_labels_sort_numerically_when_they_are_numbers() -> None:
    assert tabular.sorted_labels(["10", "9", "2", "10"]) == ["2", "9", "10"]
    assert tabular.sorted_labels(["b", "a", "10"]) == ["10", "a", "b"]


def test_stratified_split_and_folds_cover_every_row_once() -> None:
    y = np.array([0] * 50 + [1] * 30 + [2] * 3)
    train, held = tabular.stratified_split(y, 0.2, seed=1)
    assert sorted([*train.tolist(), *held.tolist()]) == list(range(len(y)))
    assert [int((y[held] == c).sum()) for c in range(3)] == [10, 6, 1]
    again = tabular.stratified_split(y, 0.2, seed=1)
    assert (again[1] == held).all()
    folds = tabular.stratified_folds(y, 5, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(y)))
    assert all(int((y[f] == 0).sum()) == 10 for f in folds)
    assert tabular.stratified_split(y, 0.0, seed=0)[1].size == 0


def test_standardizer_round_trips_through_json() -> None:
    x = np.array([[1.0, 5.0], [3.0, 5.0]])
    s = tabular.Standardizer.fit(x)
    assert s.transform(x).tolist() == [[-1.0, 0.0], [1.0, 0.0]]  # a constant column: std 1
    back = tabular.Standardizer.from_json(s.to_json(), 2)
    assert (back.transform(x) == s.transform(x)).all()
    with pytest.raises(JobError, match="does not match"):
        tabular.Standardizer.from_json(s.to_json(), 3)
