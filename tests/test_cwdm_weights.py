"""Issue 14, point 5: cWDM's bare weights behave as in cWDM. They are sampled as cWDM publishes
them (DDPM over all 1000 steps, fixed-large variance) unless flags say otherwise; their training
arguments can be stated (``--cwdm_args FILE`` or ``<weights>.json`` beside them), and when they are
not, the GroupNorm group count the shapes cannot show is assumed aloud, never silently."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from fixtures_data import one_thread  # noqa: F401 (a fixture)
from fixtures_data import run_main
from guided_diffusion import cli
from guided_diffusion.checkpoints import CheckpointError, load_model
from guided_diffusion.config import ModelConfig
from guided_diffusion.factory import build_model
from guided_diffusion.timesteps import plan_timesteps

pytestmark = pytest.mark.usefixtures("one_thread")
EIGHT_GROUPS = ModelConfig(num_channels=32, channel_mult=(1, 2), num_res_blocks=1, num_groups=8)
CWDM_ARGS = {"num_channels": 32, "channel_mult": "1,2", "num_res_blocks": 1, "num_groups": 8,
             "diffusion_steps": 1000, "noise_schedule": "linear"}


@pytest.fixture
def eight_group_weights(tmp_path):
    """A cWDM-layout model with 32 channels trained with 8 GroupNorm groups (shapes as with 32)."""
    torch.manual_seed(0)
    model = build_model(EIGHT_GROUPS).eval()
    with torch.no_grad():  # non-trivial values everywhere (the output layer starts at zero), as after training
        for param in model.parameters():
            param.uniform_(-0.2, 0.2)
    path = tmp_path / "cwdm_t2f.pt"
    torch.save(model.state_dict(), path)
    return model, path


def model_output(model):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 32, 8, 8, 8, generator=gen)
    with torch.no_grad():
        return model(x, torch.tensor([500]))


def test_assumed_group_count_is_said_and_a_stated_one_is_used(eight_group_weights, tmp_path, caplog):
    model, path = eight_group_weights
    assumed = load_model(path)
    assert assumed.model_config.num_groups == 32  # the shapes cannot tell 8 from 32 ...
    assert "num_groups=32 assumed" in assumed.extra["config_origin"]
    assert "GroupNorm groups assumed to be 32" in caplog.text and "--cwdm_args" in caplog.text  # ... so it is said
    assert not torch.allclose(model_output(assumed.model), model_output(model), atol=1e-3)

    stated = load_model(path, cwdm_args=CWDM_ARGS)
    assert stated.model_config.num_groups == 8 and stated.extra["config_origin"] == "stated (--cwdm_args)"
    assert torch.equal(model_output(stated.model), model_output(model))

    (tmp_path / "cwdm_t2f.json").write_text(json.dumps(CWDM_ARGS))  # the JSON beside the weights
    beside = load_model(path)
    assert beside.model_config == stated.model_config and str(tmp_path / "cwdm_t2f.json") in \
        beside.extra["config_origin"]


def test_stated_arguments_this_project_cannot_honour_are_refused(eight_group_weights):
    _, path = eight_group_weights
    with pytest.raises(CheckpointError, match=f"{path}.*diffusion_steps=500"):
        load_model(path, cwdm_args={**CWDM_ARGS, "diffusion_steps": 500})


def test_golden_small_model_with_its_training_arguments_matches_cwdm(golden_dir, tmp_path):
    """cWDM's own small model (16 channels, 8 groups) cannot be inferred with 32 groups: refused with
    the way out; with its arguments beside it, it computes what cWDM computed (golden output)."""
    weights = tmp_path / "small.pt"
    shutil.copy(golden_dir / "model_small_state_dict.pt", weights)
    with pytest.raises(CheckpointError, match=f"{weights}.*num_groups=32.*--cwdm_args"):
        load_model(weights)
    shutil.copy(golden_dir / "model_small_config.json", tmp_path / "small.json")
    loaded = load_model(weights)
    golden = {k: torch.from_numpy(v) for k, v in np.load(golden_dir / "golden.npz").items()}
    with torch.no_grad():
        out = loaded.model(golden["model_input"], golden["model_timesteps"])
    assert (out - golden["model_output"]).abs().max() < 1e-4


def test_cwdm_weights_are_sampled_with_ddpm_over_every_step_by_default(eight_group_weights, caplog):
    _, path = eight_group_weights
    loaded = load_model(path, cwdm_args=CWDM_ARGS)
    with caplog.at_level(logging.INFO):
        cfg = cli.checkpoint_sample_defaults(loaded)
    assert (cfg.sampler, cfg.nfe) == ("ddpm", 0)
    assert "sampling as cWDM does" in caplog.text
    timesteps, _ = plan_timesteps(loaded.schedule, loaded.fats_state, cfg.nfe)
    assert timesteps == list(range(999, -1, -1))
    # a Fast-cWDM checkpoint keeps the settings its preset stored
    loaded.extra = {"sample": {"sampler": "ddim", "nfe": 4}}
    assert (cli.checkpoint_sample_defaults(loaded).sampler, cli.checkpoint_sample_defaults(loaded).nfe) == ("ddim", 4)


def test_sample_command_takes_cwdm_args_and_records_them(eight_group_weights, tiny_demo_dir, tmp_path):
    _, path = eight_group_weights
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps(CWDM_ARGS))
    out = tmp_path / "out"
    argv = ["--checkpoint", path, "--cwdm_args", args_file, "--data_dir", tiny_demo_dir / "pseudo_validation_gt",
            "--target", "t2f", "--out_dir", out, "--nfe", 2, "--max_cases", 1]
    assert run_main("sample", argv) == 0
    meta = json.loads((out / "sample_config.json").read_text())
    assert meta["sample_config"]["sampler"] == "ddpm"  # cWDM's default; only --nfe was given
    assert meta["model"]["format"] == "cwdm" and meta["model"]["model_config"]["num_groups"] == 8
    assert meta["model"]["config_origin"] == "stated (--cwdm_args)"
    args_file.write_text("{not json")
    assert run_main("sample", [*argv[:-4], "--out_dir", tmp_path / "out2"]) == 2  # unreadable: refused by name
