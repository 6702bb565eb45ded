"""The one atomic file write of the project (layer 0: imports nothing from the package).

Every file the code writes for later reading (checkpoints, configs, metrics, figures,
NIfTI volumes) goes through :func:`atomic_write`: the data is written to a uniquely named
temporary file in the target folder (``.<name>.<random><suffix>``), flushed to disk, renamed
over the final name, and the folder entry is flushed too. A reader therefore sees either the
old file or the complete new one, never a partial file, even after a crash or power loss;
concurrent writers of the same name never share a temporary file.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

TEMP_SUFFIX = ".tmp"  # leftovers of killed writes end in this (the train command cleans them up)


def atomic_write(path: str | os.PathLike, write_fn: Callable[[str], Any], *, suffix: str = TEMP_SUFFIX) -> Path:
    """Write ``path`` atomically through ``write_fn(tmp_path)``.

    Args:
        path: the final file name; missing parent folders are created.
        write_fn: called once with the temporary file's path (str); it must write the whole
            file there (e.g. ``lambda tmp: torch.save(obj, tmp)``).
        suffix: the temporary file's suffix, for writers that choose the format from the name
            (``".nii.gz"`` for nibabel).
    Returns:
        ``path`` as a :class:`Path`. On any failure the temporary file is removed, the final
        name is untouched and the exception propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write_fn(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON with sorted keys and a final newline, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _fsync_file(name: str) -> None:
    with open(name, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX; folders cannot be opened for fsync elsewhere)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
