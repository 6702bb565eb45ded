"""One writer per run folder (layer 0: imports nothing from the package).

Two trainings started on the same ``--run_dir`` would both succeed and interleave their
checkpoints. :func:`hold_run_lock` takes an exclusive ``flock`` on ``<run_dir>/.lock`` for as long
as the ``with`` block runs. The kernel releases a ``flock`` when its holder exits in any way
(normal exit, exception, SIGKILL, crash), so a lock file left by a dead process is stale by
construction: the next run takes it over and logs whose it was. The file records the holder's
pid and host for the message a second run gets.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunLocked(RuntimeError):
    """The run folder is held by another live process; the message names it and its holder."""


def _holder(text: str) -> str:
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    return f"pid {fields.get('pid', '?')} on {fields.get('host', '?')}" if fields else "another process"


@contextlib.contextmanager
def hold_run_lock(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold the exclusive lock of ``run_dir`` (created if missing) inside the ``with`` block.

    Raises:
        RunLocked: another live process holds it (message: the folder and the holder's pid/host).
    Yields:
        the lock file's path.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.pread(fd, 256, 0).decode("utf-8", "replace"))
            raise RunLocked(f"{run_dir}: another training is writing this run folder ({holder}); wait for it to "
                            "finish or choose another --run_dir") from None
        previous = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
        if previous:
            logger.warning("%s: taking over the stale lock of %s (that process is gone)", run_dir, _holder(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()}\n".encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # a clean exit leaves an empty (not stale) lock file
    finally:
        os.close(fd)  # releases the flock
