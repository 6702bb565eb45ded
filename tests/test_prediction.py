"""The network's parameterisation (DiffusionConfig.prediction, docs/prediction.md): x0 (cWDM) or
per-band preconditioned "v". Oracles: EDM's table-1 coefficients written in their own (VE) form,
v-prediction's closed form, a hand-computed loss, and a checkpoint round trip."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from guided_diffusion.config import ConfigError, DiffusionConfig, ModelConfig, TrainConfig
from guided_diffusion.diffusion import make_denoiser, training_losses
from guided_diffusion.factory import build_schedule
from guided_diffusion.schedules import NoiseSchedule, linear


def edm_ve_coefficients(a: float, s: float) -> tuple[float, float, float]:
    """Karras et al. 2022, table 1 (c_in, c_skip, c_out) at sigma^2 = (1 - a) / a, applied to the
    VE variable y = x_t / sqrt(a): returned as multipliers of x_t (c_in, c_skip) and of F (c_out)."""
    sigma2 = (1 - a) / a
    c_skip = s * s / (sigma2 + s * s)
    c_out = math.sqrt(sigma2) * s / math.sqrt(sigma2 + s * s)
    c_in = 1 / math.sqrt(sigma2 + s * s)
    return c_in / math.sqrt(a), c_skip / math.sqrt(a), c_out


@pytest.mark.parametrize("t", [0, 3, 9])
def test_preconditioning_is_edm_table_1_per_band(t):
    sigma_data = torch.tensor([2.0, 0.5, 1.0, 0.1, 0.3, 1.5, 0.05, 1.0], dtype=torch.float64)
    schedule = linear(10, 1e-4, 0.02, 8).with_sigma_data(sigma_data)
    c_in, c_skip, c_out = schedule.preconditioning(torch.tensor([t]))
    a = float(schedule.alpha_bar[0, t])
    for b, s in enumerate(sigma_data.tolist()):
        want = edm_ve_coefficients(a, s)
        got = (float(c_in[0, b]), float(c_skip[0, b]), float(c_out[0, b]))
        assert got == pytest.approx(want, rel=1e-9), f"band {b}"


def test_unit_sigma_data_is_v_prediction():
    schedule = build_schedule(DiffusionConfig(kind="linear", prediction="v"))
    t = torch.tensor([0, 500, 999])
    c_in, c_skip, c_out = schedule.preconditioning(t)
    a = schedule.alpha_bar_at(t)
    torch.testing.assert_close(c_in, torch.ones_like(a))
    torch.testing.assert_close(c_skip, a.sqrt())
    torch.testing.assert_close(c_out, (1 - a).sqrt())


class ConstantOutput(nn.Module):
    """Returns a fixed (B, 8, ...) tensor whatever its input, and records the input."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out
        self.inputs: list[torch.Tensor] = []

    def forward(self, x, time, **kwargs):
        self.inputs.append(x.detach().clone())
        return self.out.expand(x.shape[0], *self.out.shape[1:])


def test_a_preconditioned_denoiser_passes_x_t_through_near_the_clean_end():
    """What x0 prediction lacks (docs/prediction.md): at t = 0 the estimate is x_t whatever the
    network says, so samples keep the diversity of their noise."""
    schedule = build_schedule(DiffusionConfig(kind="linear", prediction="v"))
    x_t = torch.randn(2, 8, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    cond = torch.zeros(2, 24, 2, 2, 2)
    model = ConstantOutput(torch.full((1, 8, 2, 2, 2), 0.7))
    x0_hat = make_denoiser(model, schedule, cond)(x_t, torch.tensor([0, 0]))
    a = float(schedule.alpha_bar[0, 0])
    torch.testing.assert_close(x0_hat, math.sqrt(a) * x_t + math.sqrt(1 - a) * 0.7)
    assert (x0_hat - x_t).abs().max() < 0.02
    x0_plain = make_denoiser(model, build_schedule(DiffusionConfig(kind="linear")), cond)(x_t, torch.tensor([0, 0]))
    assert (x0_plain == 0.7).all()  # x0 prediction: the network's output, x_t ignored


def test_the_network_sees_c_in_times_x_t_then_the_conditioning():
    sigma_data = (0.5,) * 8
    schedule = build_schedule(DiffusionConfig(kind="fast_direct", num_train_steps=10, prediction="v",
                                              sigma_data=sigma_data))
    x_t = torch.full((1, 8, 2, 2, 2), 3.0)
    model = ConstantOutput(torch.zeros(1, 8, 2, 2, 2))
    make_denoiser(model, schedule, torch.full((1, 24, 2, 2, 2), 0.25))(x_t, torch.tensor([6]))
    a = float(schedule.alpha_bar[0, 6])
    c_in = 1 / math.sqrt(1 - a + a * 0.25)
    torch.testing.assert_close(model.inputs[0][:, :8], torch.full((1, 8, 2, 2, 2), 3.0 * c_in))
    assert (model.inputs[0][:, 8:] == 0.25).all()


def test_v_loss_is_the_mse_of_the_output_against_minus_v():
    """sigma_data = 1: the loss is mean_b mean_voxels (F - F*)^2 with F* = sqrt(1-a) x0 - sqrt(a) eps
    (= -v), computed here by hand; the reported per-band MSE stays the x0 MSE."""
    schedule = build_schedule(DiffusionConfig(kind="fast_direct", num_train_steps=10, prediction="v"))
    x0 = torch.arange(1.0, 9.0).reshape(1, 8, 1, 1, 1).expand(1, 8, 2, 2, 2).clone()
    noise = torch.ones(1, 8, 2, 2, 2)
    out = torch.full((1, 8, 2, 2, 2), 0.3)
    t = torch.tensor([6])
    losses = training_losses(ConstantOutput(out), schedule, x0, torch.zeros(1, 24, 2, 2, 2), t, noise)
    a = float(schedule.alpha_bar[0, 6])
    target = [math.sqrt(1 - a) * (b + 1) - math.sqrt(a) for b in range(8)]
    v_mse = [(0.3 - target[b]) ** 2 for b in range(8)]
    torch.testing.assert_close(losses["loss"][0], torch.tensor(sum(v_mse) / 8), rtol=1e-5, atol=0)
    x_t = [math.sqrt(a) * (b + 1) + math.sqrt(1 - a) for b in range(8)]
    x0_mse = [(math.sqrt(a) * x_t[b] + math.sqrt(1 - a) * 0.3 - (b + 1)) ** 2 for b in range(8)]
    torch.testing.assert_close(losses["per_band"][0], torch.tensor(x0_mse), rtol=1e-5, atol=1e-7)


def test_config_refuses_what_cannot_work():
    with pytest.raises(ConfigError, match="prediction must be one of"):
        DiffusionConfig(prediction="eps")
    with pytest.raises(ConfigError, match="sigma_data is only used with prediction 'v'"):
        DiffusionConfig(sigma_data=(1.0,) * 8)
    with pytest.raises(ConfigError, match="needs 8 finite values > 0"):
        DiffusionConfig(prediction="v", sigma_data=(1.0, 0.0, 1, 1, 1, 1, 1, 1))
    with pytest.raises(ConfigError, match="flow model"):
        DiffusionConfig(kind="flow", prediction="v")
    with pytest.raises(ValueError, match="sigma_data must be"):
        linear(10).with_sigma_data([1.0] * 7)
    with pytest.raises(ValueError, match="predicts x0"):
        linear(10).preconditioning(torch.tensor([0]))


def test_old_schedule_state_loads_as_x0_and_v_round_trips():
    plain = NoiseSchedule.from_state_dict(linear(10).state_dict())
    assert plain.sigma_data is None
    v = build_schedule(DiffusionConfig(kind="fats", num_train_steps=10, prediction="v", sigma_data=(0.2,) * 8))
    back = NoiseSchedule.from_state_dict(v.state_dict())
    torch.testing.assert_close(back.sigma_data, torch.full((8,), 0.2, dtype=torch.float64))


def test_checkpoint_keeps_the_prediction_and_refuses_an_inconsistent_one(tmp_path):
    from guided_diffusion.checkpoints import CheckpointError, load_model, read_checkpoint, save_checkpoint
    from guided_diffusion.train_util import Trainer

    model_cfg = ModelConfig(num_channels=8, channel_mult=(1, 2), num_res_blocks=1, num_groups=4)
    trainer = Trainer(model_cfg, DiffusionConfig("fast_direct", 4, prediction="v"),
                      TrainConfig(run_dir=str(tmp_path / "run")), train_set=[])
    path = trainer.save()
    loaded = load_model(path)
    assert loaded.diffusion_config.prediction == "v"
    torch.testing.assert_close(loaded.schedule.sigma_data, torch.ones(8, dtype=torch.float64))
    data = read_checkpoint(path)
    data["schedule"].pop("sigma_data")
    broken = save_checkpoint(tmp_path / "broken.pt", data)
    with pytest.raises(CheckpointError, match="broken.pt.*prediction 'v'.*no preconditioning"):
        load_model(broken)


def test_x_t_sensitivity_reads_one_for_a_copying_denoiser_and_zero_for_a_regressor():
    """experiments/x_t_sensitivity.follow: the diagnosis behind docs/prediction.md."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "x_t_sensitivity.py"
    spec = importlib.util.spec_from_file_location("x_t_sensitivity", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    schedule = linear(10, 1e-4, 0.02, 8)
    x0 = torch.randn(1, 8, 4, 4, 4, generator=torch.Generator().manual_seed(1))

    def copying(x_t, t):
        return x_t / schedule.alpha_bar_at(t).sqrt().float().view(1, -1, 1, 1, 1)

    def halfway(x_t, t):
        return 0.5 * copying(x_t, t)

    gen = torch.Generator().manual_seed(0)
    torch.testing.assert_close(module.follow(copying, schedule, x0, 3, gen), torch.ones(8), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module.follow(halfway, schedule, x0, 3, gen), torch.full((8,), 0.5), rtol=1e-5, atol=1e-5)
    assert (module.follow(lambda x_t, t: torch.zeros_like(x_t), schedule, x0, 0, gen) == 0).all()
