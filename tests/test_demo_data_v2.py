"""Tests for demo data v2 (guided_diffusion/demo_data_v2.py), its oracle and the floors command (tiny grids)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from guided_diffusion import demo_data, demo_data_v2 as v2, demo_floors
from guided_diffusion.bratsloader import (
    BratsDataset, CaseError, Geometry, discover_cases, expected_path, load_case,
)
from guided_diffusion.commands import demo_floors as floors_command
from guided_diffusion.constants import MODALITIES

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = 0.125  # original (30, 30, 19), network (28, 28, 20)
GEOMETRY = Geometry.scaled(SIZE)
SEED = 3
COUNTS = dict(n_train=1, n_test=2, draws=2, oracle_draws=3)
TEST_CASE = "BraTS-DEMO-30000-000"
# sha256 of v1's simulate_case(seed 7, case BraTS-DEMO-00000-000, size 0.125) volumes + seg, computed
# before demo data v2 existed: v1 must stay bit for bit.
V1_GOLDEN = "f90294f7aabf8d4674d236701f2b5a9eb18b5cf42b7c0f4efcb018a6f9b519b8"


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _voxels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


@pytest.fixture(scope="module")
def template():
    return demo_data.load_template(GEOMETRY)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo_v2")
    v2.make_demo_dataset_v2(out, geometry=GEOMETRY, seed=SEED, **COUNTS)
    return out


def _v1_hash(volumes: dict, seg: np.ndarray) -> str:
    h = hashlib.sha256()
    for m in MODALITIES:
        h.update(volumes[m].tobytes())
    h.update(seg.tobytes())
    return h.hexdigest()


def test_v1_is_unchanged_and_resimulated_exactly(template):
    case = "BraTS-DEMO-00000-000"
    volumes, seg = demo_data.simulate_case(template, np.random.default_rng(demo_data.case_seed_words(7, case)))
    assert _v1_hash(volumes, seg) == V1_GOLDEN
    again, seg_again = demo_floors.v1_case(template, 7, case)
    assert _v1_hash(again, seg_again) == V1_GOLDEN
    redrawn, seg_redrawn = demo_floors.v1_case(template, 7, case, "t2w", 1)
    for m in MODALITIES:  # only the target's own numbers change, the conditions stay byte for byte
        assert np.array_equal(redrawn[m], volumes[m]) == (m != "t2w")
    assert np.array_equal(seg_redrawn, seg)


def test_generation_is_deterministic_by_seed(demo, template, tmp_path):
    v2.make_demo_dataset_v2(tmp_path / "again", geometry=GEOMETRY, seed=SEED, **COUNTS)
    assert _digest(tmp_path / "again") == _digest(demo)
    other, _ = v2.simulate_case_v2(template, SEED + 1, TEST_CASE, 0)
    assert not np.array_equal(other["t1n"], _voxels(expected_path(demo / "test" / TEST_CASE, "t1n")))


def test_layout_and_the_loader_reads_it_ignoring_oracle(demo):
    names = sorted(p.name for p in (demo / "training").iterdir())
    assert names == ["BraTS-DEMO-00000-000-d0", "BraTS-DEMO-00000-000-d1"]
    cases, errors = discover_cases(demo / "training", geometry=GEOMETRY, check_data=True)
    assert errors == [] and len(cases) == 2
    item = BratsDataset(cases, GEOMETRY)[0]
    assert item["volumes"].shape == (4, 28, 28, 20) and "seg" in item
    a, b = (load_case(c, GEOMETRY) for c in cases)
    assert np.array_equal(a.brain_mask, b.brain_mask)  # one anatomy ...
    assert all(not np.array_equal(a.volumes[i], b.volumes[i]) for i in range(4))  # ... every modality re-drawn

    test_cases, errors = discover_cases(demo / "test", geometry=GEOMETRY, check_data=True)
    assert errors == [] and [c.case_id for c in test_cases] == [TEST_CASE, "BraTS-DEMO-30001-000"]
    assert sorted(test_cases[0].files) == sorted((*MODALITIES, "seg"))
    assert len(list((demo / "test" / TEST_CASE / "oracle").iterdir())) == 4 * COUNTS["oracle_draws"]


def test_loader_still_rejects_other_extra_entries(demo, tmp_path):
    case = tmp_path / "data" / TEST_CASE
    shutil.copytree(demo / "test" / TEST_CASE, case)
    (case / "notes").mkdir()
    _, errors = discover_cases(case.parent, geometry=GEOMETRY)
    assert len(errors) == 1 and "notes: unexpected file" in str(errors[0])
    (case / "notes").rmdir()
    shutil.rmtree(case / "oracle")
    (case / "oracle").write_text("a file, not the oracle folder")
    _, errors = discover_cases(case.parent, geometry=GEOMETRY)
    assert len(errors) == 1 and "oracle: unexpected file" in str(errors[0])


def test_oracle_draws_fix_the_conditions_and_redraw_the_target(demo, template):
    folder = demo / "test" / TEST_CASE
    own = {m: _voxels(expected_path(folder, m)) for m in MODALITIES}
    for target in MODALITIES:
        draws = v2.load_oracle(folder, target)
        assert draws.shape == (COUNTS["oracle_draws"], 30, 30, 19)
        assert all(not np.array_equal(d, own[target]) for d in draws)
        assert not np.array_equal(draws[0], draws[1])
        volumes, _ = v2.simulate_case_v2(template, SEED, TEST_CASE, {m: 2 if m == target else 0 for m in MODALITIES})
        assert np.array_equal(volumes[target], draws[1])  # draw2 is the target's latent at draw 2 ...
        for m in MODALITIES:
            if m != target:  # ... with the other three exactly the case's files
                assert volumes[m].tobytes() == own[m].tobytes()


def test_oracle_network_grid_is_the_loader_preprocessing(demo, tmp_path):
    folder = demo / "test" / TEST_CASE
    case = tmp_path / TEST_CASE
    case.mkdir()
    for m in MODALITIES:
        shutil.copyfile(expected_path(folder, m), expected_path(case, m))
    shutil.copyfile(v2.oracle_path(folder, "t2f", 2), expected_path(case, "t2f"))
    loaded = load_case(discover_cases(tmp_path, geometry=GEOMETRY)[0][0], GEOMETRY)
    grid = v2.oracle_network_grid(folder, "t2f")
    assert grid.shape == (COUNTS["oracle_draws"], 28, 28, 20) and grid.dtype == torch.float32
    assert torch.equal(grid[1], torch.from_numpy(loaded.volumes[MODALITIES.index("t2f")]))


def test_missing_oracle_names_the_folder(demo, tmp_path):
    with pytest.raises(CaseError, match=r"training/BraTS-DEMO-00000-000-d0/oracle: no oracle draws of t1c"):
        v2.load_oracle(demo / "training" / "BraTS-DEMO-00000-000-d0", "t1c")
    with pytest.raises(ValueError, match="modality must be one of"):
        v2.load_oracle(demo / "test" / TEST_CASE, "flair")


def _enhancing_draw(template, case_id: str, enhancing: bool) -> int:
    """The first T1c draw of ``case_id`` whose tumour enhances (or does not)."""
    for draw in range(40):
        _, seg = v2.simulate_case_v2(template, SEED, case_id, {m: draw if m == "t1c" else 0 for m in MODALITIES})
        if (seg == 3).any() == enhancing:
            return draw
    raise AssertionError("no such draw in 40")


def test_enhancement_is_seen_only_in_t1c(template):
    on, off = _enhancing_draw(template, TEST_CASE, True), _enhancing_draw(template, TEST_CASE, False)
    vol_on, seg_on = v2.simulate_case_v2(template, SEED, TEST_CASE, {m: on if m == "t1c" else 0 for m in MODALITIES})
    vol_off, seg_off = v2.simulate_case_v2(template, SEED, TEST_CASE, {m: off if m == "t1c" else 0 for m in MODALITIES})
    for m in ("t1n", "t2w", "t2f"):  # enhancing or not, the non-contrast sequences are the same bytes
        assert vol_on[m].tobytes() == vol_off[m].tobytes()
    assert np.array_equal(seg_on > 0, seg_off > 0) and np.array_equal(seg_on == 2, seg_off == 2)
    assert not (seg_off == 3).any()
    # ET is where T1c is bright: its T1c / T1n ratio beats the non-enhancing solid tumour's
    solid = (seg_on == 1) & (seg_off == 1)
    ratio = vol_on["t1c"] / np.maximum(vol_on["t1n"], 1)
    assert ratio[seg_on == 3].mean() > 1.2 * ratio[solid & (seg_on != 3)].mean()
    assert np.allclose(ratio[seg_off == 1].mean(), (vol_off["t1c"] / np.maximum(vol_off["t1n"], 1))[solid].mean(),
                       rtol=0.5)


def test_et_label_is_the_enhancing_latent(template):
    anatomy = v2.simulate_anatomy(template, np.random.default_rng(v2.draw_words(SEED, TEST_CASE, 0, 0)))
    on = _enhancing_draw(template, TEST_CASE, True)
    rng = np.random.default_rng(v2.draw_words(SEED, TEST_CASE, 1 + MODALITIES.index("t1c"), on))
    _, enhancing = v2.simulate_modality(anatomy, "t1c", rng)
    seg = v2.segmentation(anatomy, enhancing)
    expected = anatomy.mask & (anatomy.tumour >= 0.5) & (anatomy.core < 0.5) & (enhancing >= 0.5)
    assert expected.any() and np.array_equal(seg == 3, expected)
    # the solid tumour's tissue values are the same whatever its gadolinium, except in T1c
    solid = anatomy.tissues[v2.SOLID]
    with_gad = demo_data.tissue_signals(demo_data.Tissue(solid.t1, solid.t2, solid.pd, gad=1.0))
    without = demo_data.tissue_signals(demo_data.Tissue(solid.t1, solid.t2, solid.pd, gad=0.0))
    assert all(with_gad[m] == without[m] for m in ("t1n", "t2w", "t2f")) and with_gad["t1c"] > without["t1c"]


def test_power_law_field_has_the_documented_spectrum():
    field = v2.power_law_field(np.random.default_rng(0), (64, 64, 64))
    assert abs(field.mean()) < 1e-9 and field.std() == pytest.approx(1.0)
    power = np.abs(np.fft.fftn(field)) ** 2
    k = np.sqrt(sum(f**2 for f in np.meshgrid(*(np.fft.fftfreq(64),) * 3, indexing="ij")))
    shells = [(k > lo) & (k <= 1.25 * lo) for lo in (0.05, 0.1, 0.2, 0.4)]
    slope = np.polyfit(np.log([k[s].mean() for s in shells]), np.log([power[s].mean() for s in shells]), 1)[0]
    assert slope == pytest.approx(-v2.TEXTURE_EXPONENT, abs=0.15)


def test_case_floors_match_the_gaussian_formulas():
    gen = torch.Generator().manual_seed(0)
    sigma, c, n = 0.1, 0.5, 3
    draws = c + sigma * torch.randn((n, 32, 32, 32), generator=gen, dtype=torch.float64)
    target = c + sigma * torch.randn((32, 32, 32), generator=gen, dtype=torch.float64)
    brain = torch.ones(32, 32, 32, dtype=torch.bool)
    floors = demo_floors.case_floors(target, draws, brain, brain.clone().fill_(False))
    # E (mean of N draws - independent draw)^2 = sigma^2 (1 + 1/N); the N/(N+1) factor recovers sigma^2
    assert floors["mse_brain"] == pytest.approx(sigma**2, rel=0.03)
    assert np.isnan(floors["mse_tumor"])
    # orthonormal Haar: white noise has variance sigma^2 in every band; a constant c is 2 sqrt(2) c in LLL
    assert floors["band_ratio"]["LLL"] == pytest.approx(sigma**2 / (8 * c**2 + sigma**2), rel=0.05)
    assert all(floors["band_ratio"][b] == pytest.approx(1.0, rel=0.05) for b in floors["band_ratio"] if b != "LLL")


def test_floors_command_json_and_t1c_beats_v1(demo, tmp_path):
    out = tmp_path / "floors.json"
    assert floors_command.main(["--data", str(demo / "test"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"settings", "summary", "cases"}
    assert sorted(report["cases"]) == [TEST_CASE, "BraTS-DEMO-30001-000"]
    for m in MODALITIES:
        row = report["summary"][m]
        assert set(row) == {"mse_brain", "mse_tumor", "psnr_brain", "psnr_tumor", "band_ratio", "n_cases"}
        assert sorted(row["band_ratio"]) == sorted(["LLL", "LLH", "LHL", "LHH", "HLL", "HLH", "HHL", "HHH"])
        assert 0 < row["mse_brain"] < 0.1 and all(0 < r < 1 for r in row["band_ratio"].values())
    v1 = demo_floors.summarize(demo_floors.simulated_floors(1, GEOMETRY, seed=SEED, n_cases=2, oracle_draws=3,
                                                            modalities=("t1c",)))
    assert report["summary"]["t1c"]["mse_tumor"] > 3 * v1["t1c"]["mse_tumor"]


def test_floors_command_reports_a_case_without_oracle(demo, tmp_path):
    data = tmp_path / "test"
    shutil.copytree(demo / "test", data)
    shutil.rmtree(data / TEST_CASE / "oracle")
    done = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "demo_floors.py"), "--data", str(data),
                           "--json", str(tmp_path / "f.json"), "--modalities", "t1c"],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and f"{TEST_CASE}/oracle: no oracle draws of t1c" in done.stderr
    assert list(json.loads((tmp_path / "f.json").read_text())["cases"]) == ["BraTS-DEMO-30001-000"]


def test_floors_skip_a_case_with_one_oracle_draw(demo, tmp_path):
    data = tmp_path / "test"
    shutil.copytree(demo / "test", data)
    for n in range(2, COUNTS["oracle_draws"] + 1):
        v2.oracle_path(data / TEST_CASE, "t2w", n).unlink()
    per_case, errors = demo_floors.floors_from_dataset(data, ("t2w",))
    assert list(per_case) == ["BraTS-DEMO-30001-000"]
    assert len(errors) == 1 and f"{TEST_CASE}: demo_floors.py: need at least 2 oracle draws, got 1" in str(errors[0])


def test_make_demo_data_version_flags(tmp_path):
    script = [sys.executable, str(REPO_ROOT / "scripts" / "make_demo_data.py"), "--size", str(SIZE), "--levels", "2"]
    done = subprocess.run(script + ["--out", str(tmp_path / "v2"), "--version", "2", "--n_train", "1",
                                    "--n_test", "1", "--draws", "1", "--oracle_draws", "0"],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "v2").iterdir()) == ["test", "training"]
    assert not (tmp_path / "v2" / "test" / TEST_CASE / "oracle").exists()
    refused = subprocess.run(script + ["--out", str(tmp_path / "v1"), "--draws", "2"],
                             cwd=REPO_ROOT, capture_output=True, text=True)
    assert refused.returncode == 2 and "--draws only apply to --version 2" in refused.stderr


def test_target_only_training_draws_keep_the_conditions(tmp_path):
    """train_target: an anatomy's training draws share the three conditions byte for byte and differ
    in the target (nothing for a network to memorise); joint draws (the default) change every modality."""
    counts = dict(n_train=1, n_test=0, draws=2, oracle_draws=0)
    v2.make_demo_dataset_v2(tmp_path / "tt", geometry=GEOMETRY, seed=SEED, train_target="t1c", **counts)
    v2.make_demo_dataset_v2(tmp_path / "joint", geometry=GEOMETRY, seed=SEED, **counts)
    for layout, conditions_equal in (("tt", True), ("joint", False)):
        d0, d1 = sorted((tmp_path / layout / "training").iterdir())
        for modality in MODALITIES:
            same = _digest_file(expected_path(d0, modality)) == _digest_file(expected_path(d1, modality))
            assert same == (conditions_equal and modality != "t1c"), (layout, modality)
    with pytest.raises(ValueError, match="train_target"):
        v2.make_demo_dataset_v2(tmp_path / "bad", geometry=GEOMETRY, seed=SEED, train_target="flair", **counts)


def _digest_file(path: Path) -> str:
    return hashlib.sha256(np.ascontiguousarray(_voxels(path)).tobytes()).hexdigest()
