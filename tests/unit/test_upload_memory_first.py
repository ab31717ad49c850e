"""`uploads.MemoryFirst`: a form's file part held in memory while it is at most `keep`
bytes, written to its staged file (the staging folder made then) once it passes that;
the file limit holds either way."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from csml.coordinator.uploads import MemoryFirst
from csml.store.blobs import TooLarge


def test_a_part_within_keep_stays_in_memory_and_makes_no_folder(tmp_path: Path) -> None:
    staging = tmp_path / "staging-1"
    writer = MemoryFirst(staging / "image", limit=1000, keep=100)
    writer.write(b"a" * 60)
    writer.write(b"b" * 40)
    assert writer.finish() == hashlib.sha256(b"a" * 60 + b"b" * 40).hexdigest()
    assert writer.content == b"a" * 60 + b"b" * 40
    assert writer.size == 100
    assert not staging.exists()


def test_a_part_past_keep_goes_whole_to_its_staged_file(tmp_path: Path) -> None:
    staging = tmp_path / "staging-2"
    writer = MemoryFirst(staging / "image", limit=1000, keep=100)
    writer.write(b"a" * 60)
    writer.write(b"b" * 60)  # past keep: what was held goes first
    writer.write(b"c" * 10)
    data = b"a" * 60 + b"b" * 60 + b"c" * 10
    assert writer.finish() == hashlib.sha256(data).hexdigest()
    assert writer.content is None
    assert (staging / "image").read_bytes() == data
    assert writer.size == len(data)
    assert (staging.stat().st_mode & 0o777) == 0o700


@pytest.mark.parametrize("keep", [0, 100, 5000])
def test_the_file_limit_holds_in_memory_and_on_disk(tmp_path: Path, keep: int) -> None:
    writer = MemoryFirst(tmp_path / f"s{keep}" / "image", limit=150, keep=keep)
    writer.write(b"x" * 150)
    with pytest.raises(TooLarge):
        writer.write(b"x")
    writer.abort()
    assert not (tmp_path / f"s{keep}" / "image").exists()
