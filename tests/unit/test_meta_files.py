"""`queue._meta_files` finds what `Path.glob("*.meta.json")` found in an attempt's folder
(the completion path lists the folder once instead of walking pathlib's glob)."""

from __future__ import annotations

from pathlib import Path

from csml.coordinator.queue import _meta_files


def test_meta_files_are_what_glob_finds(tmp_path: Path) -> None:
    attempt = tmp_path / "attempt-0123456789abcdef"
    attempt.mkdir()
    for name in ["out.png.meta.json", "out.png", "x.meta.jsonl", "b.meta.json", ".meta.json"]:
        (attempt / name).write_text("{}")
    (attempt / "dir.meta.json").mkdir()
    assert sorted(_meta_files(attempt)) == sorted(attempt.glob("*.meta.json"))
    assert len(_meta_files(attempt)) == 4


def test_no_folder_and_a_file_in_its_place_have_none(tmp_path: Path) -> None:
    missing = tmp_path / "attempt-none"
    assert _meta_files(missing) == list(missing.glob("*.meta.json")) == []
    not_a_folder = tmp_path / "attempt-file"
    not_a_folder.write_text("")
    assert _meta_files(not_a_folder) == list(not_a_folder.glob("*.meta.json")) == []


def test_a_folder_named_by_its_text_gives_the_same(tmp_path: Path) -> None:
    """The completion path names the folder by text (`JobQueue.attempt_dir_name`)."""
    attempt = tmp_path / "attempt-0123456789abcdef"
    attempt.mkdir()
    (attempt / "out.png.meta.json").write_text("{}")
    assert _meta_files(str(attempt)) == _meta_files(attempt) == [attempt / "out.png.meta.json"]
    assert _meta_files(str(tmp_path / "none")) == []
