"""`csml.client.batch._write_new`: how `csml batch` writes an item's output that came
inline (`save_outputs`; end to end in tests/integration/test_batch.py): whole or not
at all, never a `.part` file left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from csml.client.batch import _extension, _write_new


def test_write_new_leaves_no_part_file_when_it_fails(tmp_path: Path) -> None:
    """A write that cannot end (here: the target is a folder, so the rename fails)
    removes its `.part` file and leaves the target as it was."""
    target = tmp_path / "out.png"
    target.mkdir()
    with pytest.raises(OSError):
        _write_new(target, b"x" * 1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    assert target.is_dir()


def test_write_new_replaces_an_older_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "out.png"
    target.write_bytes(b"an older, longer content" * 100)
    _write_new(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_extension_is_the_one_download_gives() -> None:
    assert _extension("image/png") == ".png"
    assert _extension("application/x-no-such-type") == ""
