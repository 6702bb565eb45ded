"""Golden tests: this project's baseline computes what the public cWDM code computes.

Reads ``$FASTCWDM_GOLDEN_DIR`` (default tests/golden/cwdm, shipped with the repository); a skip
fails the run (the tests are ``required``, see tests/required_marker.py).
"""
import json

import numpy as np
import pytest
import pywt
import torch

from DWT_IDWT import clip_in_image_space, dwt3, idwt3, to_subbands
from guided_diffusion.config import ModelConfig
from guided_diffusion.diffusion import make_denoiser, reverse_step_mean_variance
from guided_diffusion.schedules import linear
from guided_diffusion.unet import UNet3D
from guided_diffusion.checkpoints import model_config_from_cwdm_args


@pytest.fixture(scope="module")
def golden(golden_dir):
    return {k: torch.from_numpy(v) for k, v in np.load(golden_dir / "golden.npz").items()}


@pytest.fixture(scope="module")
def small_model(golden_dir):
    args = json.loads((golden_dir / "model_small_config.json").read_text())
    model = UNet3D(model_config_from_cwdm_args(args))
    state = torch.load(golden_dir / "model_small_state_dict.pt", weights_only=True, map_location="cpu")
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model.eval()


def test_dwt_and_idwt_match_cwdm(golden):
    bands = dwt3(golden["dwt_input"])
    assert (bands - golden["dwt_bands"]).abs().max() < 1e-5
    assert (idwt3(golden["dwt_bands"]) - golden["idwt_of_bands"]).abs().max() < 1e-5
    ref = pywt.dwtn(golden["dwt_input"][0, 0].double().numpy(), "haar", axes=(0, 1, 2))
    for k, key in enumerate(("aaa", "aad", "ada", "add", "daa", "dad", "dda", "ddd")):
        assert np.abs(bands[0, k].double().numpy() - ref[key]).max() < 1e-5


def test_conditioning_subbands_match_cwdm(golden):
    assert (to_subbands(golden["pmv_cond_volumes"]) - golden["pmv_cond"]).abs().max() < 1e-5


def test_small_unet_reproduces_model_output(golden, small_model):
    with torch.no_grad():
        out = small_model(golden["model_input"], golden["model_timesteps"])
    assert (out - golden["model_output"]).abs().max() < 1e-4


def test_one_reverse_step_matches_p_mean_variance(golden, small_model):
    schedule = linear()
    denoiser = make_denoiser(small_model, schedule, golden["pmv_cond"])
    with torch.no_grad():
        out = reverse_step_mean_variance(schedule, denoiser, golden["pmv_x_t"], golden["pmv_t"],
                                         clip=clip_in_image_space, variance="large")
    assert (out["pred_x0"] - golden["pmv_pred_xstart"]).abs().max() < 1e-4
    assert (out["mean"] - golden["pmv_mean"]).abs().max() < 1e-4
    assert (out["log_variance"].expand_as(out["mean"]) - golden["pmv_log_variance"]).abs().max() < 1e-4


def test_linear_schedule_matches(golden):
    schedule = linear()
    t = torch.arange(1000)
    coef_x0, coef_xt, variance = schedule.posterior(t, t - 1)
    log_var_clipped = torch.log(torch.cat([variance[1:2, 0], variance[1:, 0]]))
    for name, ours in [("betas", schedule.betas[0]), ("alphas_cumprod", schedule.alpha_bar[0]),
                       ("posterior_mean_coef1", coef_x0[:, 0]), ("posterior_mean_coef2", coef_xt[:, 0]),
                       ("posterior_log_variance_clipped", log_var_clipped)]:
        ref = golden[f"linear1000_{name}"]
        assert ref.dtype == torch.float64
        assert (ours - ref).abs().max() < 1e-10, name


def test_full_published_configuration_accepts_cwdm_state_dict(golden_dir):
    shapes = json.loads((golden_dir / "full_model_state_dict_shapes.json").read_text())
    model = UNet3D(ModelConfig())
    state = {name: torch.zeros(shape) for name, shape in shapes.items()}
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert sum(p.numel() for p in model.parameters()) == sum(int(np.prod(s)) for s in shapes.values())
