"""A FATS preset end to end on tiny data (issue 16, part 3): energy statistics and shifts before
training, the learned timesteps fitted inside train.py (not mocked) and stored in the checkpoints,
and sample.py using them by default."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from fixtures_data import one_thread  # noqa: F401 (a fixture)
from fixtures_data import run_main
from guided_diffusion.checkpoints import load_model
from guided_diffusion.cli import EXIT_OK
from guided_diffusion.commands import train
from guided_diffusion.config import DiffusionConfig, SampleConfig
from guided_diffusion.presets import get_preset

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fats_preset_trains_fits_and_samples_with_its_learned_steps(tiny_demo_dir, tmp_path, monkeypatch):
    tiny = get_preset("tiny")
    fats_tiny = replace(tiny, diffusion=DiffusionConfig(kind="fats", num_train_steps=50),
                        sample=SampleConfig(sampler="ddim", nfe=0))
    monkeypatch.setattr(train, "get_preset", lambda name: fats_tiny)  # the fats preset's recipe, tiny network
    run_dir = tmp_path / "run"
    assert run_main("train", ["--preset", "tiny", "--data_dir", tiny_demo_dir / "training", "--run_dir", run_dir,
                              "--target", "t2f", "--val_cases", 1, "--val_interval", 2, "--max_steps", 2, "--cpu",
                              "--fats_nfe", 2, 3]) == EXIT_OK
    loaded = load_model(run_dir / "t2f" / "best.pt")
    state = loaded.fats_state
    # shifts from the measured band energies: not all zero, and the schedule really is per band
    assert any(s != 0 for s in state.band_shifts)
    assert not torch.equal(loaded.schedule.alpha_bar[0], loaded.schedule.alpha_bar[-1])
    assert sorted(state.learned) == [2, 3]
    learned = list(state.learned[state.default_nfe].timesteps)
    assert len(learned) == state.default_nfe and learned[0] == 49 and learned == sorted(learned, reverse=True)
    # sampling with no budget given uses the stored default: learned steps, said so in sample_config.json
    out_dir = tmp_path / "sampled"
    assert run_main("sample", ["--checkpoint", run_dir / "t2f" / "best.pt", "--data_dir",
                               tiny_demo_dir / "pseudo_validation_gt", "--target", "t2f", "--out_dir", out_dir,
                               "--device", "cpu"]) == EXIT_OK
    meta = json.loads((out_dir / "sample_config.json").read_text())
    assert meta["timesteps"] == learned
    assert meta["timesteps_origin"] == f"learned (NFE={state.default_nfe})"
