"""Tests for guided_diffusion/demo_data.py and its two scripts (tiny grids, CPU)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from guided_diffusion import demo_data
from guided_diffusion.bratsloader import Geometry, discover_cases, expected_path, load_case
from guided_diffusion.conditioning import MODALITIES

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = 0.125  # original (30, 30, 19), network (28, 28, 20)
GEOMETRY = Geometry.scaled(SIZE)
COUNTS = dict(n_train=2, n_val=1, n_pseudo=3)


def _digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    demo_data.make_demo_dataset(out, geometry=GEOMETRY, seed=7, **COUNTS)
    return out


def test_signal_equations_give_textbook_contrast():
    s = {name: demo_data.tissue_signals(t) for name, t in demo_data.TISSUES.items()}
    assert s["wm"]["t1n"] > s["gm"]["t1n"] > s["csf"]["t1n"]  # T1w
    assert s["csf"]["t2w"] > s["gm"]["t2w"] > s["wm"]["t2w"]  # T2w
    assert s["csf"]["t2f"] == pytest.approx(0.0, abs=1e-12)  # FLAIR nulls CSF
    assert s["oedema"]["t2f"] > s["gm"]["t2f"] > s["wm"]["t2f"]
    assert s["enhancing"]["t1c"] > 2 * s["enhancing"]["t1n"]  # gadolinium
    assert s["wm"]["t1c"] == s["wm"]["t1n"]  # intact blood-brain barrier


def test_demo_layout_is_accepted_by_the_loader(demo):
    cases, errors = discover_cases(demo / "training", geometry=GEOMETRY, check_data=True)
    assert errors == [] and len(cases) == COUNTS["n_train"]
    data = load_case(cases[0], GEOMETRY)
    assert data.volumes.shape == (4, 28, 28, 20) and data.seg is not None
    assert set(np.unique(data.seg)) >= {0, 2, 3}  # oedema and enhancing rim at least
    assert data.brain_mask.mean() > 0.2
    image = nib.load(cases[0].files["t1n"])
    assert image.header.get_zooms() == pytest.approx((8.0, 8.0, 8.0))
    assert image.affine[0, 0] < 0 and image.header["sform_code"] == 1

    cases, errors = discover_cases(demo / "validation", geometry=GEOMETRY, check_data=True)
    assert errors == [] and len(cases) == 1 and cases[0].seg_path is None

    missing = json.loads((demo / "pseudo_validation" / demo_data.MISSING_JSON).read_text())
    cases, errors = discover_cases(demo / "pseudo_validation", mode="auto", geometry=GEOMETRY, check_data=True)
    assert errors == [] and {c.case_id: c.missing for c in cases} == missing
    gt, errors = discover_cases(demo / "pseudo_validation_gt", geometry=GEOMETRY, check_data=True)
    assert errors == [] and [c.case_id for c in gt] == sorted(missing)
    assert all(c.seg_path is not None for c in gt)
    for case in cases:  # the kept files are the ground-truth files, byte for byte
        for name, path in case.files.items():
            assert path.read_bytes() == expected_path(demo / "pseudo_validation_gt" / case.case_id,
                                                      name).read_bytes()


def test_demo_generation_is_deterministic(demo, tmp_path):
    demo_data.make_demo_dataset(tmp_path / "again", geometry=GEOMETRY, seed=7, **COUNTS)
    assert _digest(tmp_path / "again") == _digest(demo)
    demo_data.make_demo_dataset(tmp_path / "other", geometry=GEOMETRY, seed=8, n_train=1, n_val=0, n_pseudo=0)
    name = "training/BraTS-DEMO-00000-000/BraTS-DEMO-00000-000-t1n.nii.gz"
    first = nib.load(tmp_path / "other" / name).get_fdata()
    assert not np.array_equal(first, nib.load(demo / name).get_fdata())


def test_demo_refuses_to_overwrite(demo, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        demo_data.make_demo_dataset(out, geometry=GEOMETRY, seed=0, n_train=1, n_val=0, n_pseudo=0)
    demo_data.make_demo_dataset(out, geometry=GEOMETRY, seed=0, n_train=2, n_val=0, n_pseudo=0, overwrite=True)
    demo_data.make_demo_dataset(out, geometry=GEOMETRY, seed=0, n_train=1, n_val=0, n_pseudo=0, overwrite=True)
    assert len(list((out / "training").iterdir())) == 1  # stale cases are gone
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "pseudo_validation",
                                                     "pseudo_validation_gt", "training", "validation"]


def test_drop_modalities_records_what_it_dropped(demo, tmp_path):
    src = demo / "training"
    before = _digest(src)
    missing, errors = demo_data.drop_modalities(src, tmp_path / "pv", seed=3)
    assert errors == [] and _digest(src) == before  # input untouched
    assert json.loads((tmp_path / "pv" / demo_data.MISSING_JSON).read_text()) == missing
    for case_id, modality in missing.items():
        names = sorted(p.name for p in (tmp_path / "pv" / case_id).iterdir())
        assert names == sorted(f"{case_id}-{m}.nii.gz" for m in MODALITIES if m != modality)
    again, _ = demo_data.drop_modalities(src, tmp_path / "pv2", seed=3, keep_seg=True)
    assert again == missing
    assert all((tmp_path / "pv2" / c / f"{c}-seg.nii.gz").exists() for c in missing)
    with pytest.raises(FileExistsError):
        demo_data.drop_modalities(src, tmp_path / "pv", seed=3)
    with pytest.raises(ValueError, match="contain"):
        demo_data.drop_modalities(src, src / "inside", seed=3)


def test_scripts_end_to_end(tmp_path):
    out = tmp_path / "demo"
    run = [sys.executable, str(REPO_ROOT / "scripts" / "make_demo_data.py"), "--out", str(out),
           "--size", str(SIZE), "--levels", "2", "--n_train", "1", "--n_val", "1", "--n_pseudo", "0"]
    subprocess.run(run, check=True, cwd=REPO_ROOT, capture_output=True)
    assert len(list((out / "training").iterdir())) == 1
    refused = subprocess.run(run, cwd=REPO_ROOT, capture_output=True, text=True)
    assert refused.returncode == 2 and "not empty" in refused.stderr

    drop = [sys.executable, str(REPO_ROOT / "scripts" / "drop_modality.py"), "--input",
            str(out / "validation"), "--output", str(tmp_path / "pv"), "--seed", "1"]
    (out / "validation" / "BraTS-BAD-00000-000").mkdir()  # incomplete: skipped, reported
    done = subprocess.run(drop, cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and "BraTS-BAD-00000-000-t1n.nii.gz: missing" in done.stderr
    missing = json.loads((tmp_path / "pv" / demo_data.MISSING_JSON).read_text())
    assert list(missing) == ["BraTS-DEMO-10000-000"] and missing["BraTS-DEMO-10000-000"] in MODALITIES
