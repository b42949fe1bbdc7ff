"""One atomic writer for files and directories (``llmeraser.atomic``): complete or absent, flushed to disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmeraser import atomic
from llmeraser.atomic import atomic_directory, atomic_file, extra_files, write_text_atomic
from llmeraser.jsonl import write_jsonl


def test_a_failed_file_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "rows.jsonl"
    write_text_atomic(target, "old\n")
    with pytest.raises(RuntimeError), atomic_file(target) as handle:
        handle.write("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_files_are_flushed_to_disk_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    write_jsonl(tmp_path / "a.jsonl", [{"id": "x"}])
    assert len(synced) >= 2  # the file, then its directory
    assert (tmp_path / "a.jsonl").read_text() == '{"id": "x"}\n'


def test_extra_files_join_the_directory_s_atomic_write_only_while_active(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    real = atomic.fsync_tree
    monkeypatch.setattr(atomic, "fsync_tree", lambda d: (seen.append(sorted(p.name for p in d.iterdir())), real(d))[1])
    with extra_files(tmp_path / "out", {"run.toml": "[erase]\n"}), atomic_directory(tmp_path / "out") as tmp:
        (tmp / "weights").write_text("w")
    assert seen == [["run.toml", "weights"]]  # both there before the directory gets its name
    assert (tmp_path / "out" / "run.toml").read_text() == "[erase]\n"
    with atomic_directory(tmp_path / "other") as tmp:
        (tmp / "weights").write_text("w")
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["weights"]
