"""Tests for guided_diffusion/bratsloader.py and conditioning.py (tiny shapes, CPU)."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import torch

from guided_diffusion.bratsloader import (
    BRATS_GEOMETRY, BratsDataset, CaseError, Geometry, discover_cases, expected_path,
    load_case, load_reference, normalize_intensity, save_volume, to_network_grid, to_original_grid,
)
from guided_diffusion.conditioning import MODALITIES, cond_modalities, split_case

GEOMETRY = Geometry(original_shape=(12, 12, 7), crop=1, padded_depth=8)  # network (10, 10, 8)
AFFINE = np.array([[-1.5, 0, 0, 10.0], [0, -1.5, 0, 20.0], [0, 0, 2.0, -5.0], [0, 0, 0, 1]])


def _volume(rng, shape=GEOMETRY.original_shape):
    """Positive brain-like blob in a zero background, float32 (X, Y, Z)."""
    vol = rng.uniform(10, 100, shape).astype(np.float32)
    vol[:2] = vol[-2:] = 0
    return vol


def _save(path, data, affine=AFFINE):
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, path)


def make_case(root, case_id, *, seed=0, skip=(), seg=True):
    """Write a tiny case folder; returns the folder."""
    rng = np.random.default_rng(seed)
    folder = root / case_id
    folder.mkdir(parents=True)
    for m in MODALITIES:
        if m not in skip:
            _save(expected_path(folder, m), _volume(rng))
    if seg:
        _save(expected_path(folder, "seg"), rng.integers(0, 4, GEOMETRY.original_shape).astype(np.uint8))
    return folder


# --------------------------------------------------------------------------- conditioning


def test_cond_modalities_and_split_case():
    assert cond_modalities("t1c") == ("t1n", "t2w", "t2f")
    with pytest.raises(ValueError, match="unknown modality"):
        cond_modalities("flair")
    volumes = torch.arange(4.0).view(1, 4, 1, 1, 1).expand(2, 4, 3, 3, 3)
    target, cond = split_case(volumes, "t2w")
    assert target.shape == (2, 1, 3, 3, 3) and cond.shape == (2, 3, 3, 3, 3)
    assert target.unique().tolist() == [2.0]
    assert cond[0, :, 0, 0, 0].tolist() == [0.0, 1.0, 3.0]
    with pytest.raises(ValueError, match="split_case"):
        split_case(volumes[:, :3], "t1n")


# --------------------------------------------------------------------------- geometry


def test_geometry_shapes():
    assert BRATS_GEOMETRY.original_shape == (240, 240, 155)
    assert BRATS_GEOMETRY.network_shape == (224, 224, 160)
    demo = Geometry.scaled(0.25)
    assert demo.original_shape == (60, 60, 39) and demo.network_shape == (56, 56, 40)
    assert Geometry.from_original_shape((60, 60, 39)) == demo
    assert Geometry.from_original_shape((240, 240, 155)) == BRATS_GEOMETRY
    BRATS_GEOMETRY.check_divisible(5)
    demo.check_divisible(3)
    with pytest.raises(ValueError, match="not divisible"):
        demo.check_divisible(4)
    with pytest.raises(ValueError):
        Geometry.from_original_shape((50, 61, 39))
    with pytest.raises(ValueError, match="padded_depth"):
        Geometry((12, 12, 7), 1, 6)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_grid_round_trip(as_tensor):
    rng = np.random.default_rng(0)
    vol = rng.standard_normal((2, *GEOMETRY.original_shape)).astype(np.float32)
    x = torch.from_numpy(vol) if as_tensor else vol
    net = to_network_grid(x, GEOMETRY)
    assert type(net) is type(x) and tuple(net.shape) == (2, *GEOMETRY.network_shape)
    assert float(abs(net[..., 7:]).max()) == 0.0  # depth padding at the end
    back = np.asarray(to_original_grid(net, GEOMETRY))
    np.testing.assert_array_equal(back[:, 1:-1, 1:-1, :], vol[:, 1:-1, 1:-1, :])
    inside = np.zeros(GEOMETRY.original_shape, bool)
    inside[1:-1, 1:-1, :] = True
    assert (back[:, ~inside] == 0).all()
    with pytest.raises(ValueError, match="to_network_grid"):
        to_network_grid(net, GEOMETRY)
    with pytest.raises(ValueError, match="to_original_grid"):
        to_original_grid(x, GEOMETRY)


def test_normalize_intensity():
    vol = np.random.default_rng(0).gamma(2.0, 100.0, (20, 20, 10))
    vol[0, 0, 0] = 1e6  # outlier, clipped at the 99.9th percentile
    out = normalize_intensity(vol)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    assert (out == 1.0).sum() >= 2
    with pytest.raises(ValueError, match="constant"):
        normalize_intensity(np.full((4, 4, 4), 3.0))


# --------------------------------------------------------------------------- discovery


def test_discovery_train_and_auto(tmp_path):
    train = tmp_path / "train"
    make_case(train, "BraTS-GLI-00000-000")
    make_case(train, "BraTS-MEN-00001-000", seg=False)
    (train / "notes.json").write_text("{}")  # files at the root are ignored
    cases, errors = discover_cases(train, mode="train", geometry=GEOMETRY, check_data=True)
    assert errors == [] and [c.case_id for c in cases] == ["BraTS-GLI-00000-000", "BraTS-MEN-00001-000"]
    assert cases[0].seg_path is not None and cases[1].seg_path is None

    auto = tmp_path / "auto"
    make_case(auto, "BraTS-PED-00002-000", skip=("t1c",), seg=False)
    make_case(auto, "BraTS-SSA-00003-000", skip=("t2f",))
    cases, errors = discover_cases(auto, mode="auto", geometry=GEOMETRY)
    assert errors == [] and [c.missing for c in cases] == ["t1c", "t2f"]
    data = load_case(cases[0], GEOMETRY)
    assert data.available.tolist() == [True, False, True, True]
    assert (data.volumes[1] == 0).all()


def test_dataset_items(tmp_path):
    make_case(tmp_path, "BraTS-GLI-00000-000", seed=1)
    make_case(tmp_path, "BraTS-GLI-00001-000", seed=2)
    cases, _ = discover_cases(tmp_path, geometry=GEOMETRY)
    item = BratsDataset(cases, GEOMETRY)[0]
    assert item["volumes"].shape == (4, 10, 10, 8) and item["volumes"].dtype == torch.float32
    assert 0.0 <= item["volumes"].min() and item["volumes"].max() == 1.0
    assert item["seg"].shape == (10, 10, 8) and item["brain_mask"].dtype == torch.bool
    assert item["case_id"] == "BraTS-GLI-00000-000"
    # brain mask: > 0 in any modality; background rows 0-1 -> network rows 0
    assert not item["brain_mask"][0].any() and item["brain_mask"][1:-1, :, :7].all()
    assert not item["brain_mask"][..., 7].any()  # depth padding
    make_case(tmp_path, "BraTS-GLI-00002-000", seg=False)
    cases, _ = discover_cases(tmp_path, geometry=GEOMETRY)
    assert "seg" not in BratsDataset(cases, GEOMETRY)[0]  # same keys for every item


# --------------------------------------------------------------------------- bad inputs


def _corrupt(folder, kind):
    """Damage one file of a complete case; return the path expected in the error."""
    t1n, seg = expected_path(folder, "t1n"), expected_path(folder, "seg")
    rng = np.random.default_rng(3)
    if kind == "not_nifti":
        t1n.write_bytes(b"this is not a NIfTI file")
    elif kind == "garbage_gzip":
        t1n.write_bytes(gzip.compress(b"hello"))
    elif kind == "truncated":
        data = t1n.read_bytes()
        t1n.write_bytes(data[: len(data) // 2])
    elif kind == "2d":
        _save(t1n, _volume(rng)[..., 0])
    elif kind == "4d":
        _save(t1n, _volume(rng)[..., None].repeat(2, axis=3))
    elif kind == "shape":
        _save(t1n, _volume(rng, (12, 12, 8)))
    elif kind in ("nan", "inf"):
        vol = _volume(rng)
        vol[5, 5, 3] = np.nan if kind == "nan" else np.inf
        _save(t1n, vol)
    elif kind == "all_zero":
        _save(t1n, np.zeros(GEOMETRY.original_shape, np.float32))
    elif kind == "affine":
        _save(t1n, _volume(rng), AFFINE + np.diag([0, 0, 0.5, 0]))
    elif kind in ("seg_label", "seg_fraction"):
        labels = np.zeros(GEOMETRY.original_shape, np.float32)
        labels[3, 3, 3] = 4 if kind == "seg_label" else 1.5
        _save(seg, labels)
        return seg
    elif kind == "unexpected":
        extra = folder / "README.txt"
        extra.write_text("x")
        return extra
    elif kind == "missing":
        t1n.unlink()
    return t1n


DATA_PROBLEMS = {"truncated": "truncated", "nan": "NaN", "inf": "NaN or Inf", "all_zero": "all zero",
                 "seg_label": "labels", "seg_fraction": "labels"}
HEADER_PROBLEMS = {"not_nifti": "cannot read", "garbage_gzip": "cannot read", "2d": "3D",
                   "4d": "3D", "shape": "shape", "affine": "affine", "unexpected": "unexpected",
                   "missing": "missing modality t1n"}


@pytest.mark.parametrize("kind", sorted({**DATA_PROBLEMS, **HEADER_PROBLEMS}))
def test_bad_input_gives_case_error_naming_the_file(tmp_path, kind):
    good = make_case(tmp_path, "BraTS-GLI-00000-000")
    folder = make_case(tmp_path, "BraTS-GLI-00001-000", seed=1)
    path = _corrupt(folder, kind)
    problem = {**DATA_PROBLEMS, **HEADER_PROBLEMS}[kind]
    cases, errors = discover_cases(tmp_path, geometry=GEOMETRY, check_data=True)
    assert [c.folder for c in cases] == [good] and len(errors) == 1
    assert errors[0].path == path and str(errors[0]).startswith(f"{path}: ")
    assert problem in errors[0].problem
    if kind in DATA_PROBLEMS:  # header-only discovery keeps it; loading reports it
        cases, errors = discover_cases(tmp_path, geometry=GEOMETRY)
        assert len(cases) == 2 and errors == []
        with pytest.raises(CaseError, match=problem) as info:
            load_case(cases[1], GEOMETRY)
        assert info.value.path == path


def test_shapes_disagree_without_fixed_geometry(tmp_path):
    folder = make_case(tmp_path, "BraTS-GLI-00000-000")
    _save(expected_path(folder, "t2w"), _volume(np.random.default_rng(0), (12, 12, 9)))
    _, errors = discover_cases(tmp_path, geometry=None)
    assert errors[0].path == expected_path(folder, "t2w") and "differs" in errors[0].problem


@pytest.mark.parametrize("skip, problem", [((), "no modality is missing"),
                                           (("t1n", "t2w"), "2 modalities missing (t1n, t2w)")])
def test_auto_mode_needs_exactly_one_missing(tmp_path, skip, problem):
    folder = make_case(tmp_path, "BraTS-MET-00000-000", skip=skip)
    cases, errors = discover_cases(tmp_path, mode="auto", geometry=GEOMETRY)
    assert cases == [] and errors[0].path == folder and problem in str(errors[0])


def test_missing_root_is_a_case_error(tmp_path):
    with pytest.raises(CaseError, match="does not exist"):
        discover_cases(tmp_path / "nope")


# --------------------------------------------------------------------------- writing


def test_save_volume_keeps_grid_and_header(tmp_path):
    make_case(tmp_path / "in", "BraTS-GLI-00000-000")
    (case,), _ = discover_cases(tmp_path / "in", geometry=GEOMETRY)
    data = load_case(case, GEOMETRY)
    reference = load_reference(case, GEOMETRY)
    out = tmp_path / "out" / "BraTS-GLI-00000-000-t1n.nii.gz"
    back = to_original_grid(torch.from_numpy(data.volumes[0]), GEOMETRY)
    save_volume(out, back, reference)
    saved = nib.load(out)
    np.testing.assert_array_equal(saved.affine, reference.affine)
    for key in ("dim", "pixdim", "qform_code", "sform_code", "xyzt_units", "srow_x", "srow_z"):
        np.testing.assert_array_equal(saved.header[key], reference.header[key])
    assert saved.get_data_dtype() == np.float32
    original = normalize_intensity(np.asarray(reference.get_fdata()))
    np.testing.assert_array_equal(saved.get_fdata()[1:-1, 1:-1], original[1:-1, 1:-1])
    with pytest.raises(FileExistsError, match="overwrite"):
        save_volume(out, back, reference)
    save_volume(out, back * 0, reference, overwrite=True)
    assert nib.load(out).get_fdata().max() == 0
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temporary left
    with pytest.raises(ValueError, match="to_original_grid"):
        save_volume(tmp_path / "x.nii.gz", data.volumes[0], reference)
