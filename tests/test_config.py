"""Configs are pure data: JSON round trip, and old files with retired keys still load."""
import json

import pytest
import torch

from guided_diffusion.checkpoints import load_model, save_checkpoint
from guided_diffusion.config import ConfigError, DiffusionConfig, SampleConfig
from guided_diffusion.factory import build_model, build_schedule


def test_retired_keys_of_old_files_are_accepted_and_dropped():
    old_diffusion = {"kind": "fast_direct", "num_train_steps": 10, "beta_start": 1e-4, "beta_end": 0.02, "n_bands": 8,
                     "clip_denoised": False, "band_shifts": [], "max_shift": 4.0, "fats_base": "linear"}
    cfg = DiffusionConfig.from_dict(old_diffusion)
    assert cfg == DiffusionConfig(kind="fast_direct", num_train_steps=10)
    assert "clip_denoised" not in cfg.to_dict() and not hasattr(cfg, "clip_denoised")
    sample = SampleConfig.from_json(json.dumps({"sampler": "ddpm", "nfe": 3, "batch_size": 4}))
    assert sample == SampleConfig(sampler="ddpm", nfe=3) and "batch_size" not in sample.to_dict()
    assert SampleConfig().clip_denoised  # clipping itself is a sampling setting and stays


def test_unknown_keys_are_still_refused():
    with pytest.raises(ConfigError, match=r"unknown keys \['clip'\]"):
        DiffusionConfig.from_dict({"kind": "linear", "clip": True})
    with pytest.raises(ConfigError, match="batch"):
        SampleConfig.from_dict({"batch": 2})
    with pytest.raises(TypeError):
        SampleConfig(batch_size=2)  # retired keys are accepted from files only, not as fields


def test_a_checkpoint_written_with_the_retired_keys_loads(tmp_path, tiny_model_config):
    diffusion = DiffusionConfig(kind="fast_direct", num_train_steps=10)
    old_config = {"model": tiny_model_config.to_dict(), "diffusion": {**diffusion.to_dict(), "clip_denoised": True},
                  "sample": {**SampleConfig().to_dict(), "batch_size": 1}}
    model = build_model(tiny_model_config)
    path = save_checkpoint(tmp_path / "old.pt", {"model": model.state_dict(), "ema": None, "step": 3,
                                                 "config": old_config,
                                                 "schedule": build_schedule(diffusion).state_dict()})
    loaded = load_model(path)
    assert loaded.diffusion_config == diffusion and loaded.step == 3
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values()))


# Configs written before the rename of "steps" (it meant the schedule length T in a diffusion config,
# Fast-DDPM's interval count for kind fast_sampled, and the NFE in a sample config), verbatim.
OLD_FAST_SAMPLED = {"kind": "fast_sampled", "steps": 10, "beta_start": 1e-4, "beta_end": 0.02, "n_bands": 8,
                    "band_shifts": [], "max_shift": 4.0, "fats_base": "linear"}
OLD_FATS = {"kind": "fats", "steps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "n_bands": 8,
            "band_shifts": [0.5, 0.0, 0.0, -0.5, 0.0, 0.0, 0.0, 1.0], "max_shift": 4.0, "fats_base": "linear"}
OLD_SAMPLE = {"sampler": "ddim", "steps": 4, "eta": 0.0, "clip_denoised": True, "seed": 0, "precision": "fp32"}


def test_old_steps_keys_load_under_their_new_names_with_a_deprecation_note(caplog):
    with caplog.at_level("WARNING"):
        fast = DiffusionConfig.from_dict(OLD_FAST_SAMPLED)
        fats = DiffusionConfig.from_dict(OLD_FATS)
        direct = DiffusionConfig.from_dict({"kind": "fast_direct", "steps": 10})
        sample = SampleConfig.from_dict(OLD_SAMPLE)
    assert (fast.num_train_steps, fast.fast_intervals) == (1000, 10)
    assert (fats.num_train_steps, fats.fast_intervals, fats.band_shifts[-1]) == (1000, 0, 1.0)
    assert (direct.num_train_steps, direct.fast_intervals) == (10, 0)
    assert sample.nfe == 4 and "steps" not in sample.to_dict()
    notes = [r.getMessage() for r in caplog.records]
    assert sum("deprecated" in n for n in notes) == 4
    assert any("'fast_intervals'" in n for n in notes) and any("'nfe'" in n for n in notes)
    # the old fast_sampled schedule: 11 points of the 1000-step curve, t = 0 included
    assert build_schedule(fast).model_times.tolist() == [0, 99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
    with pytest.raises(ConfigError, match="both"):
        SampleConfig.from_dict({"steps": 2, "nfe": 2})


def test_fast_intervals_belongs_to_fast_sampled_only():
    with pytest.raises(ConfigError, match="only used with kind 'fast_sampled'"):
        DiffusionConfig(kind="linear", fast_intervals=10)
    with pytest.raises(ConfigError, match="needs 1 <= fast_intervals"):
        DiffusionConfig(kind="fast_sampled")
    # fast_sampled over a shorter curve: 5 intervals of the (rescaled) 100-step linear curve
    short = build_schedule(DiffusionConfig(kind="fast_sampled", num_train_steps=100, fast_intervals=5))
    assert short.num_steps == 6 and short.model_times.tolist() == [0.0, 190.0, 390.0, 590.0, 790.0, 990.0]


def test_a_checkpoint_written_with_the_old_steps_keys_loads(tmp_path, tiny_model_config):
    model = build_model(tiny_model_config)
    schedule = build_schedule(DiffusionConfig(kind="fast_sampled", fast_intervals=10))
    path = save_checkpoint(tmp_path / "old.pt", {"model": model.state_dict(), "ema": None, "step": 1,
                                                 "config": {"model": tiny_model_config.to_dict(),
                                                            "diffusion": OLD_FAST_SAMPLED},
                                                 "schedule": schedule.state_dict(), "extra": {"sample": OLD_SAMPLE}})
    loaded = load_model(path)
    assert loaded.diffusion_config == DiffusionConfig(kind="fast_sampled", fast_intervals=10)
    assert SampleConfig.from_dict(loaded.extra["sample"]) == SampleConfig(sampler="ddim", nfe=4)
