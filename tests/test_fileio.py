"""fileio.atomic_write / save_json: all or nothing under the final name, durable, no shared temp files."""
import json
import os
import threading
from pathlib import Path

import pytest

from guided_diffusion import fileio
from guided_diffusion.fileio import atomic_write, save_json


def test_save_json_writes_sorted_indented_json_with_a_final_newline(tmp_path):
    path = save_json({"b": [1, 2], "a": {"y": 1.5, "x": None}}, tmp_path / "new" / "out.json")
    text = path.read_text()
    assert text == '{\n  "a": {\n    "x": null,\n    "y": 1.5\n  },\n  "b": [\n    1,\n    2\n  ]\n}\n'
    assert json.loads(text) == {"a": {"x": None, "y": 1.5}, "b": [1, 2]}
    assert sorted(p.name for p in tmp_path.joinpath("new").iterdir()) == ["out.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    path = tmp_path / "model.pt"
    path.write_text("old")

    def dies_half_way(tmp):
        Path(tmp).write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, dies_half_way)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_the_file_and_its_folder_are_flushed_to_disk_before_and_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    monkeypatch.setattr(fileio.os, "replace", replace)
    atomic_write(tmp_path / "a.bin", lambda tmp: Path(tmp).write_bytes(b"x"))
    assert events == [("fsync", "file"), ("replace", "a.bin"), ("fsync", "dir")]


def test_temporary_names_are_unique_hidden_and_keep_the_requested_suffix(tmp_path):
    seen = []
    barrier = threading.Barrier(4)

    def write(tmp):
        seen.append(Path(tmp).name)
        barrier.wait(timeout=10)  # all four temporary files exist at once
        Path(tmp).write_text(tmp)

    threads = [threading.Thread(target=atomic_write, args=(tmp_path / "same.nii.gz", write),
                                kwargs={"suffix": ".nii.gz"}) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 4
    assert all(name.startswith(".same.nii.gz.") and name.endswith(".nii.gz") for name in seen)
    assert (tmp_path / "same.nii.gz").read_text().endswith(".nii.gz")  # one complete write won
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.nii.gz"]
