"""Contracts no other test checked: the file a sample run writes, voxel by voxel; the weights
sampling and --init_from use (the EMA) on models whose output is not zero; the learned FATS
timesteps a checkpoint stores are what sampling uses by default.

Expected values are computed here independently of the code under test: the intensity
percentiles with ``numpy.percentile``, the crop and padding by slicing, the brain mask from the
raw files.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fixtures_data import one_thread  # noqa: F401 (a fixture)
from fixtures_data import run_main
from guided_diffusion.bratsloader import Geometry
from guided_diffusion.checkpoints import export_safetensors, load_model, save_checkpoint
from guided_diffusion.config import DiffusionConfig, ModelConfig, SampleConfig, TrainConfig
from guided_diffusion.factory import build_model, build_schedule

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = ModelConfig(num_channels=8, channel_mult=(1, 2), num_res_blocks=1, num_groups=4)
DIFFUSION = DiffusionConfig("fast_direct", 4)  # a 4-step schedule (kind, length: positional)
GEOMETRY = Geometry.scaled(0.2)  # files (48, 48, 31), network grid (44, 44, 32): crop 2, one padded slice
COND = ("t1n", "t1c", "t2w")  # MODALITIES order without the target t2f


def random_model(seed: int) -> torch.nn.Module:
    """The tiny UNet with every weight random (its output layer is not zero, unlike a fresh one)."""
    torch.manual_seed(seed)
    model = build_model(MODEL)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2 if p.ndim > 1 else 0.05)
    return model.eval()


def write_checkpoint(path: Path, extra: dict | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A checkpoint whose raw weights and EMA weights differ; returns (raw model, EMA model)."""
    raw, ema = random_model(1), random_model(2)
    save_checkpoint(path, {
        "model": raw.state_dict(), "ema": ema.state_dict(), "optimizer": None, "step": 3,
        "config": {"model": MODEL.to_dict(), "diffusion": DIFFUSION.to_dict(),
                   "train": TrainConfig(target_modality="t2f").to_dict()},
        "schedule": build_schedule(DIFFUSION).state_dict(), "extra": extra or {},
    })
    return raw, ema


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    raw, ema = write_checkpoint(path)
    return path, raw, ema


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory) -> Path:
    from guided_diffusion.demo_data import make_demo_dataset

    root = tmp_path_factory.mktemp("demo48")
    make_demo_dataset(root, geometry=GEOMETRY, seed=3, n_train=1, n_val=0, n_pseudo=0)
    return root / "training"


def net_input(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((1, 32, 4, 4, 4), generator=gen), torch.tensor([2.0])


# --------------------------------------------------------------------------- which weights


def outputs_of(model, x, time):
    with torch.no_grad():
        return model(x, time)


def test_load_model_uses_the_ema_weights_by_default(checkpoint):
    path, raw, ema = checkpoint
    x, time = net_input()
    expected_ema, expected_raw = outputs_of(ema, x, time), outputs_of(raw, x, time)
    assert expected_ema.abs().min() > 0 and not torch.allclose(expected_ema, expected_raw)
    torch.testing.assert_close(outputs_of(load_model(path).model, x, time), expected_ema, rtol=0, atol=0)
    torch.testing.assert_close(outputs_of(load_model(path, use_ema=False).model, x, time), expected_raw, rtol=0, atol=0)


def test_exported_safetensors_hold_the_ema_weights(checkpoint, tmp_path):
    path, _, ema = checkpoint
    exported = export_safetensors(torch.load(path, weights_only=True), tmp_path / "model.safetensors")
    x, time = net_input(1)
    loaded = load_model(exported)
    torch.testing.assert_close(outputs_of(loaded.model, x, time), outputs_of(ema, x, time), rtol=0, atol=0)
    assert loaded.target_modality == "t2f" and loaded.schedule.num_steps == 4


def test_init_from_starts_model_and_ema_from_the_checkpoint_weights(checkpoint, tmp_path):
    from guided_diffusion.train_util import Trainer

    path, _, ema = checkpoint
    trainer = Trainer(MODEL, DIFFUSION, TrainConfig(run_dir=str(tmp_path / "run"), init_from=str(path)), train_set=[])
    for name, value in ema.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], value), name
        assert torch.equal(trainer.ema.state_dict()[name], value), name
    assert trainer.extra["init_from"]["path"] == str(path)


# --------------------------------------------------------------------------- the written synthesis


def reference_preprocess(path: Path) -> np.ndarray:
    """cWDM's preprocessing written out: clip to the 0.1 / 99.9 percentiles, min-max scale, then
    zero-pad the depth at its end and crop GEOMETRY.crop voxels off each in-plane side."""
    vol = np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)
    low, high = np.percentile(vol, [0.1, 99.9])
    scaled = ((np.clip(vol, low, high) - low) / (high - low)).astype(np.float32)
    x, y, z = GEOMETRY.original_shape
    c = GEOMETRY.crop
    padded = np.zeros((x, y, GEOMETRY.padded_depth), dtype=np.float32)
    padded[:, :, :z] = scaled
    return padded[c:x - c, c:y - c, :]


def test_sample_writes_the_synthesis_voxel_by_voxel_on_the_input_grid(checkpoint, case_dir, tmp_path):
    from guided_diffusion.synthesis import synthesize_volumes

    path, _, ema = checkpoint
    out = tmp_path / "out"
    assert run_main("sample", ["--checkpoint", path, "--data_dir", case_dir, "--target", "t2f", "--out_dir", out,
                               "--nfe", 2, "--device", "cpu"]) == 0
    (case,) = sorted(p for p in case_dir.iterdir() if p.is_dir())
    files = {m: case / f"{case.name}-{m}.nii.gz" for m in (*COND, "t2f")}
    volumes = np.zeros((1, 4, *GEOMETRY.network_shape), dtype=np.float32)
    for i, m in enumerate(COND):
        volumes[0, i] = reference_preprocess(files[m])
    # the checkpoint's sampling defaults (DDIM, eta 0, cWDM clipping, seed 0), 2 evenly spaced steps of 4
    cfg = SampleConfig("ddim", seed=0, eta=0.0, clip_denoised=True)
    synthesis = synthesize_volumes(ema, build_schedule(DIFFUSION), torch.from_numpy(volumes), "t2f", cfg,
                                   [case.name], [3, 0])[0].numpy()
    x, y, z = GEOMETRY.original_shape
    c = GEOMETRY.crop
    expected = np.zeros((x, y, z), dtype=np.float32)
    expected[c:x - c, c:y - c, :] = synthesis[:, :, :z]
    head = np.zeros((x, y, z), dtype=bool)  # where any conditioning modality is above 0 (skull-stripped input)
    head[c:x - c, c:y - c, :] = (volumes[0, :3] > 0).any(axis=0)[:, :, :z]
    assert 0.05 < head.mean() < 0.95
    written = nib.load(str(out / case.name / f"{case.name}-t2f.nii.gz")).get_fdata()
    np.testing.assert_allclose(written[head], expected[head], rtol=0, atol=2e-5)
    # outside the head: zero (the documented background rule), or the raw synthesis for versions without it
    assert (written[~head] == 0).all() or np.allclose(written[~head], expected[~head], rtol=0, atol=2e-5)
    assert np.ptp(expected[head]) > 0.1  # a non-trivial volume, so flips and shifts show
    written_affine = nib.load(str(out / case.name / f"{case.name}-t2f.nii.gz")).affine
    np.testing.assert_array_equal(written_affine, nib.load(str(files["t2f"])).affine)


def test_the_brain_mask_is_where_any_modality_is_positive(case_dir):
    from guided_diffusion.bratsloader import discover_cases, load_case

    (case,) = discover_cases(case_dir, mode="train", geometry=GEOMETRY, check_data=False)[0]
    data = load_case(case, GEOMETRY)
    raw = [np.asarray(nib.load(str(case.files[m])).dataobj) for m in (*COND, "t2f")]
    brain = np.any([v > 0 for v in raw], axis=0)
    assert 0 < brain.mean() < 1
    x, y, z = GEOMETRY.original_shape
    c = GEOMETRY.crop
    expected = np.zeros((x, y, GEOMETRY.padded_depth), dtype=bool)
    expected[:, :, :z] = brain
    np.testing.assert_array_equal(data.brain_mask, expected[c:x - c, c:y - c])


# --------------------------------------------------------------------------- learned FATS timesteps


def test_learned_timesteps_stored_in_a_checkpoint_are_the_default(tmp_path):
    from guided_diffusion.fats import FatsState, LearnedTimesteps
    from guided_diffusion.synthesis import synthesize

    state = FatsState(learned={2: LearnedTimesteps((2, 1))}, default_nfe=2)
    path = tmp_path / "fats.pt"
    write_checkpoint(path, extra=state.into_extra({}))
    loaded = load_model(path)
    volumes = torch.rand((1, 4, 8, 8, 4), generator=torch.Generator().manual_seed(0))
    visited = {}
    for nfe in (0, 2, 3):
        seen = []
        synthesize(loaded, volumes, "t2f", SampleConfig("ddim", nfe), ["c"], None,
                   lambda info, seen=seen: seen.append(info["t"]))
        visited[nfe] = seen
    assert visited[0] == [2, 1]  # no budget requested: the stored default budget's learned steps
    assert visited[2] == [2, 1]  # the budget that has learned steps
    assert visited[3] == [3, 2, 0]  # no learned steps for 3: evenly spaced over the 4 steps (3, 1.5, 0)


def test_a_checkpoint_without_fats_state_samples_every_step_by_default(checkpoint):
    from guided_diffusion.synthesis import synthesize

    seen = []
    synthesize(load_model(checkpoint[0]), torch.rand((1, 4, 8, 8, 4)), "t2f", SampleConfig("ddim", 0), ["c"], None,
               lambda info: seen.append(info["t"]))
    assert seen == [3, 2, 1, 0]


def test_the_default_budget_falls_back_to_the_smallest_fitted_one():
    from guided_diffusion.fats import FatsState

    fitted = {4: [9, 6, 3, 0], 2: [9, 0], 3: [9, 4, 0]}
    assert FatsState().with_learned(fitted, default_nfe=3).default_nfe == 3
    assert FatsState().with_learned(fitted, default_nfe=5).default_nfe == 2  # 5 was not fitted: the smallest
    assert FatsState().with_learned(fitted, default_nfe=5).learned_timesteps(4) == [9, 6, 3, 0]


def test_an_old_checkpoints_default_budget_beside_the_state_is_still_used():
    from guided_diffusion.fats import FatsState

    version_1 = {"version": 1, "energy_stats": None, "band_shifts": None, "kappa": None, "extra": {},
                 "timesteps": {"2": {"steps": [9, 0]}, "3": {"steps": [9, 4, 0]}}, "default_k": 3}
    state = FatsState.from_extra({"fats": version_1})
    assert state.default_nfe == 3 and state.learned_timesteps(3) == [9, 4, 0]


def test_sample_auto_writes_what_sample_writes_for_the_same_case(checkpoint, case_dir, tmp_path):
    import shutil

    path = checkpoint[0]
    (case,) = sorted(p for p in case_dir.iterdir() if p.is_dir())
    incomplete = tmp_path / "incomplete"
    shutil.copytree(case, incomplete / case.name)
    (incomplete / case.name / f"{case.name}-t2f.nii.gz").unlink()
    assert run_main("sample", ["--checkpoint", path, "--data_dir", case_dir, "--target", "t2f", "--out_dir",
                               tmp_path / "sample", "--nfe", 2, "--device", "cpu"]) == 0
    assert run_main("sample_auto", ["--checkpoint", f"t2f={path}", "--data_dir", incomplete, "--out_dir",
                                    tmp_path / "auto", "--nfe", 2, "--device", "cpu"]) == 0
    name = f"{case.name}/{case.name}-t2f.nii.gz"
    sampled, completed = nib.load(str(tmp_path / "sample" / name)), nib.load(str(tmp_path / "auto" / name))
    np.testing.assert_array_equal(completed.get_fdata(), sampled.get_fdata())
    np.testing.assert_array_equal(completed.affine, sampled.affine)
