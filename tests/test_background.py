"""Issue 14, point 5b: the written synthesis is zero outside the head, as the conditioning volumes
define it (one rule, ``conditioning.zero_outside_head``, for sample.py and sample_auto.py);
``--keep_background`` writes it as sampled."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from fixtures_data import one_thread  # noqa: F401 (a fixture)
from fixtures_data import run_main
from guided_diffusion.bratsloader import expected_path
from guided_diffusion.checkpoints import save_checkpoint
from guided_diffusion.conditioning import zero_outside_head
from guided_diffusion.config import TrainConfig
from guided_diffusion.constants import MODALITIES
from guided_diffusion.factory import build_model, build_schedule
from guided_diffusion.presets import get_preset

pytestmark = pytest.mark.usefixtures("one_thread")


def test_zero_outside_head_keeps_voxels_where_any_condition_is_positive():
    gen = torch.Generator().manual_seed(0)
    volumes = torch.rand(2, 4, 5, 6, 7, generator=gen)
    volumes[volumes < 0.5] = 0.0  # about 1 / 8 of the voxels: all three conditions 0
    volumes[:, 1] = 1.0  # the target channel (t1c) must not count
    synthesis = torch.rand(2, 5, 6, 7, generator=gen) + 0.1
    before = synthesis.clone()
    out = zero_outside_head(synthesis, volumes, "t1c")
    assert torch.equal(synthesis, before)  # the input is not modified
    v = volumes.numpy()
    head = (v[:, 0] > 0) | (v[:, 2] > 0) | (v[:, 3] > 0)  # t1n, t2w, t2f
    assert 0 < (~head).sum() < head.size
    expected = np.where(head, before.numpy(), 0.0)
    assert np.array_equal(out.numpy(), expected)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The ``tiny`` preset's model with random weights, which leaves a noisy background, as a
    checkpoint for each target modality."""
    tiny = get_preset("tiny")
    torch.manual_seed(0)
    model = build_model(tiny.model)
    with torch.no_grad():  # the output layer starts at zero: give it values, as after training
        for param in model.parameters():
            param.uniform_(-0.2, 0.2)
    state = model.state_dict()
    root = tmp_path_factory.mktemp("models")
    return {m: save_checkpoint(root / f"{m}.pt", {
        "model": state, "ema": state, "step": 1, "optimizer": None,
        "config": {"model": tiny.model.to_dict(), "diffusion": tiny.diffusion.to_dict(),
                   "train": TrainConfig(target_modality=m).to_dict()},
        "schedule": build_schedule(tiny.diffusion).state_dict(), "extra": {"sample": tiny.sample.to_dict()}})
        for m in MODALITIES}


def raw_head(case_dir, target):
    """Voxels where any conditioning input file (read raw, on its own grid) is above zero."""
    present = [expected_path(case_dir, m) for m in MODALITIES if m != target]
    return np.any([np.asarray(nib.load(p).dataobj) > 0 for p in present if p.is_file()], axis=0)


def test_sample_zeroes_the_background_unless_told_to_keep_it(checkpoints, tiny_demo_dir, tmp_path):
    data_dir = tiny_demo_dir / "pseudo_validation_gt"
    common = ["--checkpoint", checkpoints["t2f"], "--data_dir", data_dir, "--target", "t2f", "--nfe", 1]
    assert run_main("sample", [*common, "--out_dir", tmp_path / "zeroed"]) == 0
    assert run_main("sample", [*common, "--out_dir", tmp_path / "raw", "--keep_background"]) == 0
    for case_dir in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        head = raw_head(case_dir, "t2f")
        zeroed = nib.load(expected_path(tmp_path / "zeroed" / case_dir.name, "t2f")).get_fdata()
        raw = nib.load(expected_path(tmp_path / "raw" / case_dir.name, "t2f")).get_fdata()
        assert (raw[~head] != 0).any()  # there was a background to remove
        assert (zeroed[~head] == 0).all()
        assert np.array_equal(zeroed[head], raw[head]) and (zeroed[head] != 0).any()
    assert "zeroed" in json.loads((tmp_path / "zeroed" / "metrics.json").read_text())["background"]
    assert "raw" in json.loads((tmp_path / "raw" / "metrics.json").read_text())["background"]


def test_sample_auto_zeroes_the_background_by_the_same_rule(checkpoints, tiny_demo_dir, tmp_path):
    data_dir = tiny_demo_dir / "pseudo_validation"
    missing = json.loads((data_dir / "missing_modalities.json").read_text())
    argv = ["--data_dir", data_dir, "--out_dir", tmp_path / "out", "--nfe", 1]
    for mod in sorted(set(missing.values())):
        argv += ["--checkpoint", f"{mod}={checkpoints[mod]}"]
    assert run_main("sample_auto", argv) == 0
    written = sorted((tmp_path / "out").rglob("*.nii.gz"))
    assert len(written) == len(missing)
    for path in written:
        case_id, target = path.parent.name, missing[path.parent.name]
        head = raw_head(data_dir / case_id, target)
        out = nib.load(path).get_fdata()
        assert (out[~head] == 0).all() and (out[head] != 0).any()
