"""Helpers of the end-to-end tests: a tiny demo dataset, in-process script calls, file digests,
and a Hugging Face cache populated offline.

The dataset is ``Geometry.scaled(18 / 240)``: files of (18, 18, 12) voxels, network grid
(16, 16, 12), subband grid (8, 8, 6); the ``tiny`` MODEL preset (8 channels, mult 1,2) fits it.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from guided_diffusion.bratsloader import Geometry  # noqa: E402

TINY_SIZE = 18 / 240
TINY_GEOMETRY = Geometry.scaled(TINY_SIZE)  # original (18, 18, 12), network (16, 16, 12)
TINY_COUNTS = dict(n_train=3, n_val=0, n_pseudo=2)
TINY_SEED = 1  # the two pseudo-validation cases miss different modalities (checked by the fixture)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests with one torch thread: tiny tensors gain nothing from two, and on a
    busy 2-core machine two threads make each op spin-wait (a 4-step run: 1.5 s vs 28 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_model(cfg=None, seed: int = 0):
    """A network of ``cfg`` (default: the tiny preset's) in eval mode with seeded weights, its
    zero-initialised layers (the output convolution) filled too, so its outputs are not all 0."""
    from guided_diffusion.factory import build_model
    from guided_diffusion.presets import TINY_MODEL

    torch.manual_seed(seed)
    model = build_model(TINY_MODEL if cfg is None else cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not bool(p.any()):
                p.normal_(0.0, 0.05)
    return model


def make_tiny_dataset(out: Path) -> Path:
    """training/ (3 cases with seg), pseudo_validation/ (2 cases, one modality dropped each) and
    pseudo_validation_gt/ (their complete copies) under ``out``."""
    from guided_diffusion.demo_data import make_demo_dataset

    make_demo_dataset(out, geometry=TINY_GEOMETRY, seed=TINY_SEED, **TINY_COUNTS)
    return out


def script(name: str):
    """The program that ``scripts/<name>.py`` runs: ``guided_diffusion.commands.<name>``."""
    return importlib.import_module(f"guided_diffusion.commands.{name}")


def run_main(name: str, argv: list[str]) -> int:
    """``scripts/<name>.py`` with ``argv`` in this process, through its ``main_guard`` (the same
    error handling as on the command line); returns the exit code."""
    from guided_diffusion.cli import main_guard

    module = script(name)
    with pytest.raises(SystemExit) as exit_info:
        main_guard(lambda: module.main([str(a) for a in argv]))
    return exit_info.value.code


def digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (hidden files included)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def populate_hf_cache(cache: Path, repo_id: str, files: dict[str, Path], commit: str,
                      refs: tuple[str, ...] = ("main",)) -> None:
    """Lay out ``files`` (repo path -> local file) in a huggingface_hub cache as a download of
    ``commit`` would: ``models--<org>--<repo>/blobs/<sha256>``, ``snapshots/<commit>/<path>``
    (a relative symlink to the blob) and ``refs/<ref>`` holding the commit hash."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for repo_path, src in files.items():
        data = Path(src).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / repo_path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it


def assert_same_tree(a, b, where: str = "") -> None:
    """Exact equality of nested dicts / lists of tensors and plain values (checkpoints, state dicts)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    else:
        assert a == b, where
