"""A disk cache of preprocessed cases, so a training step does not wait for gzip and percentiles.

Reading a full-size BraTS case means decompressing four or five NIfTI files and computing two
percentiles per modality (1.4-2.1 s per case on a 2-core CPU, about 1 case/s with two loader
workers on the GPU machine: ``benchmarks/gpu_suite.py``), longer than a GPU training step.
:class:`CachedBratsDataset` stores each case's network-grid arrays once and reads them back
(an uncompressed ``.npz``: a few tens of milliseconds).

Entries are exact: the arrays are the float32 / bool / uint8 output of ``load_case`` itself, so
training from the cache is bit-identical to training from the files. An entry's name carries a
key that hashes the content of every source file of the case, the preprocessing version, the
geometry and the clipping quantiles; an edited or replaced file, or a change of preprocessing
(bump :data:`PREPROCESSING_VERSION`), gives a new key and the entry is rebuilt, and the stale one
is removed. Entries are written through :func:`guided_diffusion.fileio.atomic_write` (unique
temporary name, then rename), so concurrent DDP ranks or loader workers building the same entry
never see a partial file: the last complete write wins, and all are identical. A corrupt or
unreadable entry is rebuilt with a warning, never trusted.

Disk: 4 x 224 x 224 x 160 float32 volumes + masks = about 135 MB per full-size case.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from .bratsloader import BRATS_GEOMETRY, CLIP_QUANTILES, BratsDataset, Case, Geometry
from .fileio import atomic_write

logger = logging.getLogger(__name__)

PREPROCESSING_VERSION = 1  # bump whenever load_case's output changes for the same files
_CHUNK = 1 << 20
_ARRAYS = ("volumes", "available", "brain_mask")


def file_digest(path: Path) -> str:
    """BLAKE2b of a file's bytes (hex, 32 characters)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def cache_key(case: Case, geometry: Geometry) -> str:
    """Key of a case's entry: its files' content, the preprocessing version and the geometry."""
    spec = {
        "version": PREPROCESSING_VERSION,
        "geometry": [list(geometry.original_shape), geometry.crop, geometry.padded_depth],
        "quantiles": list(CLIP_QUANTILES),
        "files": {name: file_digest(path) for name, path in sorted(case.files.items())},
    }
    return hashlib.blake2b(json.dumps(spec, sort_keys=True).encode(), digest_size=12).hexdigest()


class CachedBratsDataset(BratsDataset):
    """:class:`BratsDataset` whose items are read from ``cache_dir`` once built.

    Items are identical to the uncached dataset's (``volumes`` (4, *network_shape) float32,
    ``available`` (4,) bool, ``brain_mask`` (*network_shape) bool, ``case_id``, and ``seg``
    (*network_shape) uint8 when every case has one).
    """

    def __init__(self, cases: list[Case], cache_dir: str | os.PathLike, geometry: Geometry = BRATS_GEOMETRY):
        super().__init__(cases, geometry)
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)

    def entry_path(self, case: Case) -> Path:
        return self.cache_dir / f"{case.case_id}.{cache_key(case, self.geometry)}.npz"

    def __getitem__(self, index: int) -> dict:
        case = self.cases[index]
        path = self.entry_path(case)
        item = self._read(path, case)
        if item is None:
            item = super().__getitem__(index)
            self._write(path, case, item)
        return item

    def _read(self, path: Path, case: Case) -> dict | None:
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            logger.warning("%s: unreadable cache entry, rebuilding it (%s)", path, err)
            return None
        if not set(_ARRAYS) <= set(arrays) or (self.has_seg and "seg" not in arrays):
            logger.warning("%s: incomplete cache entry, rebuilding it", path)
            return None
        item = {name: torch.from_numpy(arrays[name]) for name in _ARRAYS}
        item["case_id"] = case.case_id
        if self.has_seg:
            item["seg"] = torch.from_numpy(arrays["seg"])
        return item

    def _write(self, path: Path, case: Case, item: dict) -> None:
        arrays = {name: item[name].numpy() for name in _ARRAYS}
        if "seg" in item:
            arrays["seg"] = item["seg"].numpy()

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)

        atomic_write(path, write)
        for stale in self.cache_dir.glob(f"{case.case_id}.*.npz"):
            key = stale.name[len(case.case_id) + 1:-len(".npz")]
            if stale != path and len(key) == 24 and all(c in "0123456789abcdef" for c in key):
                stale.unlink(missing_ok=True)  # this case's entry for files that no longer exist
