"""Configs are pure data: JSON round trip, and old files with retired keys still load."""
import json

import pytest
import torch

from guided_diffusion.checkpoints import load_model, save_checkpoint
from guided_diffusion.config import ConfigError, DiffusionConfig, SampleConfig
from guided_diffusion.factory import build_model, build_schedule


def test_retired_keys_of_old_files_are_accepted_and_dropped():
    old_diffusion = {"kind": "fast_direct", "steps": 10, "beta_start": 1e-4, "beta_end": 0.02, "n_bands": 8,
                     "clip_denoised": False, "band_shifts": [], "max_shift": 4.0, "fats_base": "linear"}
    cfg = DiffusionConfig.from_dict(old_diffusion)
    assert cfg == DiffusionConfig(kind="fast_direct", steps=10)
    assert "clip_denoised" not in cfg.to_dict() and not hasattr(cfg, "clip_denoised")
    sample = SampleConfig.from_json(json.dumps({"sampler": "ddpm", "steps": 3, "batch_size": 4}))
    assert sample == SampleConfig(sampler="ddpm", steps=3) and "batch_size" not in sample.to_dict()
    assert SampleConfig().clip_denoised  # clipping itself is a sampling setting and stays


def test_unknown_keys_are_still_refused():
    with pytest.raises(ConfigError, match=r"unknown keys \['clip'\]"):
        DiffusionConfig.from_dict({"kind": "linear", "clip": True})
    with pytest.raises(ConfigError, match="batch"):
        SampleConfig.from_dict({"batch": 2})
    with pytest.raises(TypeError):
        SampleConfig(batch_size=2)  # retired keys are accepted from files only, not as fields


def test_a_checkpoint_written_with_the_retired_keys_loads(tmp_path, tiny_model_config):
    diffusion = DiffusionConfig(kind="fast_direct", steps=10)
    old_config = {"model": tiny_model_config.to_dict(), "diffusion": {**diffusion.to_dict(), "clip_denoised": True},
                  "sample": {**SampleConfig().to_dict(), "batch_size": 1}}
    model = build_model(tiny_model_config)
    path = save_checkpoint(tmp_path / "old.pt", {"model": model.state_dict(), "ema": None, "step": 3,
                                                 "config": old_config,
                                                 "schedule": build_schedule(diffusion).state_dict()})
    loaded = load_model(path)
    assert loaded.diffusion_config == diffusion and loaded.step == 3
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values()))
