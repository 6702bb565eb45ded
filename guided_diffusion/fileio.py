"""The one atomic file write of the project (layer 0: imports nothing from the package).

Every file the code writes for later reading (checkpoints, configs, metrics, figures,
NIfTI volumes) goes through :func:`atomic_write`: the data is written to a uniquely named
temporary file in the target folder (``.<name>.<random><suffix>``), flushed to disk, renamed
over the final name, and the folder entry is flushed too. A reader therefore sees either the
old file or the complete new one, never a partial file, even after a crash or power loss;
concurrent writers of the same name never share a temporary file.

With ``replace=False`` the finished temporary file is published with ``os.link`` instead of a
rename: the link fails when the final name exists, so a file that appeared while the data was
being produced (another run, a scan copied in by hand) is never replaced, not even by a race.
Files get the permissions an ordinary ``open(path, "w")`` would give them (0666 minus the
umask), not the 0600 of the temporary file.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

TEMP_SUFFIX = ".tmp"  # leftovers of killed writes end in this (the train command cleans them up)


def atomic_write(path: str | os.PathLike, write_fn: Callable[[str], Any], *, suffix: str = TEMP_SUFFIX,
                 replace: bool = True) -> Path:
    """Write ``path`` atomically through ``write_fn(tmp_path)``.

    Args:
        path: the final file name; missing parent folders are created.
        write_fn: called once with the temporary file's path (str); it must write the whole
            file there (e.g. ``lambda tmp: torch.save(obj, tmp)``).
        suffix: the temporary file's suffix, for writers that choose the format from the name
            (``".nii.gz"`` for nibabel).
        replace: False: never replace an existing ``path``; raise ``FileExistsError`` (naming it)
            when it exists at the moment of publishing.
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
        os.chmod(tmp, 0o666 & ~current_umask())
        _fsync_file(tmp)
        if replace:
            os.replace(tmp, path)
        else:
            _publish_new(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _publish_new(tmp: str, path: Path) -> None:
    """Give the finished ``tmp`` the name ``path`` unless that exists (atomically), then drop ``tmp``."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "exists; refusing to overwrite it", str(path)) from None
    except OSError as err:  # a file system without hard links: reserve the name, then rename over it
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV):
            raise
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, "exists; refusing to overwrite it", str(path)) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS tells (Linux), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


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
