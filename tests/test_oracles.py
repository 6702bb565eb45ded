"""Tests with an independent oracle: each expected value is written out in the test from the
papers' formulas (DDPM's q(x_s | x_t, x0), DDIM's eq. 12, the MSE loss, the EMA recurrence,
the per-case seed), never computed with the expression the code under test uses.

The schedules' raw ``alpha_bar`` table is the only input taken from the code (the schedule values
themselves are pinned by the golden tests); everything derived from it is recomputed here.
Timestep lists are passed positionally.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch
from torch import nn

from guided_diffusion.config import DiffusionConfig, ModelConfig, SampleConfig, TrainConfig
from guided_diffusion.diffusion import ddim_step, ddpm_step, training_losses
from guided_diffusion.samplers import ddim_sample, ddpm_sample
from guided_diffusion.schedules import linear, per_band_schedule
from guided_diffusion.synthesis import synthesize_volumes

DRAWS = 40_000
SIGMAS = 6.0  # tolerance of the moment checks, in standard errors


def per_band_test_schedule(steps: int = 10):
    """A 10-step schedule whose 8 bands differ (FATS shifts), so band mix-ups show."""
    return per_band_schedule(linear(steps, 1e-4, 0.02, 1), [1.5, -1.0, 0.5, 0.0, -0.5, 1.0, -1.5, 2.0])


def ab(schedule, t: int) -> torch.Tensor:
    """(8,) alpha_bar of step t read from the raw table; t = -1 is the clean end (1)."""
    return torch.ones(schedule.n_bands, dtype=torch.float64) if t < 0 else schedule.alpha_bar[:, t]


def col(v: torch.Tensor) -> torch.Tensor:
    """(8,) per-band values -> (1, 8, 1, 1, 1) float64."""
    return v.double().reshape(1, -1, 1, 1, 1)


def q_posterior(schedule, x_t, x0, t: int, s: int):
    """Mean and variance of q(x_s | x_t, x0) (Ho et al. 2020 eq. 7 for the pair s < t)."""
    a_t, a_s = col(ab(schedule, t)), col(ab(schedule, s))
    alpha_ts = a_t / a_s  # signal kept from s to t
    beta_ts = 1 - alpha_ts
    mean = (a_s.sqrt() * beta_ts / (1 - a_t)) * x0 + (alpha_ts.sqrt() * (1 - a_s) / (1 - a_t)) * x_t
    var = beta_ts * (1 - a_s) / (1 - a_t)
    return mean, var, beta_ts


def check_moments(samples: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
    """Empirical mean and variance over dim 0 against the expected ones, within SIGMAS standard errors."""
    n = samples.shape[0]
    emp_mean, emp_var = samples.mean(0, keepdim=True), samples.var(0, keepdim=True)
    var = var.expand_as(emp_mean)
    assert ((emp_mean - mean).abs() <= SIGMAS * (var / n).sqrt()).all(), (emp_mean - mean).abs().max()
    assert ((emp_var - var).abs() <= SIGMAS * var * math.sqrt(2 / (n - 1))).all(), ((emp_var / var) - 1).abs().max()


@pytest.fixture(scope="module")
def pair():
    schedule = per_band_test_schedule()
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand((1, 8, 2, 2, 1), generator=gen, dtype=torch.float64)
    x_t = torch.randn((1, 8, 2, 2, 1), generator=gen, dtype=torch.float64)
    noise = torch.randn((DRAWS, 8, 2, 2, 1), generator=gen, dtype=torch.float64)
    return schedule, x0, x_t, noise


@pytest.mark.parametrize("variance", ["small", "large"])
@pytest.mark.parametrize("t, s", [(7, 4), (3, 2), (9, 0)])
def test_ddpm_step_samples_q_posterior(pair, variance, t, s):
    schedule, x0, x_t, noise = pair
    b = noise.shape[0]
    out = ddpm_step(schedule, x_t.expand(b, -1, -1, -1, -1), x0.expand(b, -1, -1, -1, -1),
                    torch.full((b,), t), torch.full((b,), s), variance=variance, noise=noise)
    mean, small_var, beta_ts = q_posterior(schedule, x_t, x0, t, s)
    check_moments(out, mean, small_var if variance == "small" else beta_ts)  # "large": DDPM's fixed beta


@pytest.mark.parametrize("t, s", [(7, 4), (3, 2), (9, 0)])
def test_ddim_step_with_eta_one_samples_q_posterior(pair, t, s):
    schedule, x0, x_t, noise = pair
    b = noise.shape[0]
    out = ddim_step(x_t.expand(b, -1, -1, -1, -1), x0.expand(b, -1, -1, -1, -1), ab(schedule, t).expand(b, -1),
                    ab(schedule, s).expand(b, -1), eta=1.0, noise=noise)
    mean, var, _ = q_posterior(schedule, x_t, x0, t, s)
    check_moments(out, mean, var)


def eq12_step(x, x0_hat, a_t, a_s, eta, noise):
    """Song et al. 2021, eq. 12 (with eq. 16's sigma), written out per band."""
    a_t, a_s = col(a_t).to(x), col(a_s).to(x)
    eps_hat = (x - a_t.sqrt() * x0_hat) / (1 - a_t).sqrt()
    sigma = eta * torch.sqrt((1 - a_s) / (1 - a_t)) * torch.sqrt(1 - a_t / a_s)
    direction = torch.sqrt(1 - a_s - sigma ** 2) * eps_hat
    return a_s.sqrt() * x0_hat + direction + (sigma * noise if eta else 0)


def wobbly_denoiser(x, t):
    """A denoiser that depends on x, on t and on the band, unlike a perfect one."""
    band = torch.arange(1, 9, dtype=x.dtype).reshape(1, 8, 1, 1, 1)
    return torch.tanh(x * band / 4) * (1 + t.to(x.dtype).reshape(-1, 1, 1, 1, 1) / 10) + 0.1 * band


@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_sampler_with_a_non_constant_denoiser_follows_eq_12(eta):
    schedule = per_band_test_schedule()
    timesteps = [9, 6, 2, 1]
    x_T = torch.randn((2, 8, 3, 2, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    clip = lambda x0: x0.clamp(-0.8, 0.9)  # noqa: E731
    got = ddim_sample(wobbly_denoiser, schedule, x_T, timesteps, eta=eta, clip=clip,
                      generator=torch.Generator().manual_seed(5))
    gen, x = torch.Generator().manual_seed(5), x_T
    for i, t in enumerate(timesteps):
        x0_hat = clip(wobbly_denoiser(x, torch.full((2,), t)))
        if i + 1 == len(timesteps):
            x = x0_hat  # the last step returns the clean estimate
            break
        noise = torch.randn(x.shape, generator=gen, dtype=x.dtype) if eta else None
        x = eq12_step(x, x0_hat, ab(schedule, t), ab(schedule, timesteps[i + 1]), eta, noise)
    torch.testing.assert_close(got, x, rtol=1e-10, atol=1e-10)


def test_ddpm_sampler_with_a_non_constant_denoiser_follows_the_posterior():
    schedule = per_band_test_schedule()
    timesteps = [8, 5, 3, 0]
    x_T = torch.randn((2, 8, 3, 2, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    clip = lambda x0: x0.clamp(-0.8, 0.9)  # noqa: E731
    got = ddpm_sample(wobbly_denoiser, schedule, x_T, timesteps, clip=clip, generator=torch.Generator().manual_seed(6))
    gen, x = torch.Generator().manual_seed(6), x_T
    for i, t in enumerate(timesteps):
        x0_hat = clip(wobbly_denoiser(x, torch.full((2,), t)))
        if i + 1 == len(timesteps):
            x = x0_hat
            break
        mean, _, beta_ts = q_posterior(schedule, x, x0_hat, t, timesteps[i + 1])  # cWDM: fixed-large variance
        x = mean + beta_ts.sqrt() * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    torch.testing.assert_close(got, x, rtol=1e-10, atol=1e-10)


class HalfOfInput(nn.Module):
    """Predicts x0 = 0.5 * x_t (the first 8 input channels) and records what it was given."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # a device to live on
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, time, **kwargs):
        self.inputs.append((x.detach().clone(), time.detach().clone()))
        return 0.5 * x[:, :8] + 0 * self.anchor


def test_training_loss_on_a_hand_computed_case():
    schedule = linear(10, 1e-4, 0.02, 8)  # 10 steps: model time = 100 t
    x0 = torch.arange(1.0, 9.0).reshape(1, 8, 1, 1, 1).expand(1, 8, 2, 2, 2).clone()  # band b holds b + 1
    cond = torch.full((1, 24, 2, 2, 2), 0.25)
    noise = torch.ones(1, 8, 2, 2, 2)
    t = torch.tensor([6])
    model = HalfOfInput()
    out = training_losses(model, schedule, x0, cond, t, noise)
    a = float(schedule.alpha_bar[0, 6])
    x_t = [math.sqrt(a) * (b + 1) + math.sqrt(1 - a) for b in range(8)]  # q(x_t | x0), noise = 1
    per_band = [(0.5 * x_t[b] - (b + 1)) ** 2 for b in range(8)]
    torch.testing.assert_close(out["per_band"][0], torch.tensor(per_band), rtol=1e-5, atol=0)
    torch.testing.assert_close(out["loss"][0], torch.tensor(sum(per_band) / 8), rtol=1e-5, atol=0)
    net_input, time = model.inputs[0]
    assert net_input.shape == (1, 32, 2, 2, 2)
    torch.testing.assert_close(net_input[0, :8, 0, 0, 0], torch.tensor(x_t), rtol=1e-5, atol=0)  # x_t first
    assert (net_input[:, 8:] == 0.25).all()  # then the conditioning
    assert time.tolist() == [600.0]  # the model time of step 6 of a 10-step schedule (1000 / 10 per step)
    weights = torch.tensor([2.0, 0, 0, 0, 0, 0, 0, 1.0])
    weighted = training_losses(model, schedule, x0, cond, t, noise, band_weights=weights)["loss"][0]
    torch.testing.assert_close(weighted, torch.tensor((2 * per_band[0] + per_band[7]) / 3), rtol=1e-5, atol=0)


# --------------------------------------------------------------------------- training step


def tiny_trainer(tmp_path, **train_changes):
    from guided_diffusion.train_util import Trainer

    model_cfg = ModelConfig(num_channels=8, channel_mult=(1, 2), num_res_blocks=1, num_groups=4)
    train_cfg = TrainConfig(run_dir=str(tmp_path / "run"), **train_changes)
    return Trainer(model_cfg, DiffusionConfig("fast_direct", 2), train_cfg, train_set=[])


def tiny_batch(seed: int = 0) -> dict:
    return {"volumes": torch.rand((1, 4, 8, 8, 8), generator=torch.Generator().manual_seed(seed))}


def test_ema_after_one_step_is_the_rate_weighted_average(tmp_path):
    trainer = tiny_trainer(tmp_path, lr=0.05, ema_rate=0.75)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_step(tiny_batch())
    after = trainer.model.state_dict()
    moved = max((after[k] - before[k]).abs().max().item() for k in before if before[k].is_floating_point())
    assert moved > 0.01  # the large lr makes a wrong rate visible
    for name, ema_value in trainer.ema.state_dict().items():
        if ema_value.is_floating_point() and name in dict(trainer.model.named_parameters()):
            torch.testing.assert_close(ema_value, 0.75 * before[name] + 0.25 * after[name], rtol=1e-6, atol=1e-7)


def test_each_training_step_draws_its_own_timesteps_and_noise_over_the_whole_schedule(tmp_path, monkeypatch):
    import guided_diffusion.train_util as train_util

    drawn = []
    real = train_util.training_losses

    def recording(model, schedule, x0, cond, t, noise, **kwargs):
        drawn.append((t.clone(), noise.clone()))
        return real(model, schedule, x0, cond, t, noise, **kwargs)

    monkeypatch.setattr(train_util, "training_losses", recording)
    trainer = tiny_trainer(tmp_path)
    for _ in range(24):
        trainer.train_step(tiny_batch())
    assert {int(t) for t, _ in drawn} == {0, 1}  # both steps of the 2-step schedule, the last one included
    assert all(not torch.equal(a[1], b[1]) for a, b in zip(drawn, drawn[1:]))


# --------------------------------------------------------------------------- synthesis seeding


def expected_case_noise(seed: int, case_id: str, shape) -> torch.Tensor:
    """The documented per-case seed: (seed * 1000003 + crc32(case id)) mod 2^63."""
    case_seed = (seed * 1_000_003 + zlib.crc32(case_id.encode())) % 2 ** 63
    return torch.randn(shape, generator=torch.Generator().manual_seed(case_seed))


def test_each_case_starts_from_its_own_noise_whatever_the_batch():
    model = HalfOfInput()
    volumes = torch.rand((2, 4, 8, 8, 4), generator=torch.Generator().manual_seed(0))
    cfg = SampleConfig("ddim", seed=11, clip_denoised=False)
    schedule = linear(4, 1e-4, 0.02, 8)
    synthesize_volumes(model, schedule, volumes, "t2f", cfg, ["BraTS-001", "BraTS-002"], [3, 1])
    first_inputs = [x for x, _ in model.inputs[::2]]  # two network calls per case, the first sees x_T
    for case_id, net_input in zip(["BraTS-001", "BraTS-002"], first_inputs):
        torch.testing.assert_close(net_input[:, :8], expected_case_noise(11, case_id, (1, 8, 4, 4, 2)),
                                   rtol=0, atol=0)


def test_synthesis_is_eq_12_clamped_in_image_space_and_uses_eta_and_the_clip_flag():
    from DWT_IDWT import from_subbands

    schedule = per_band_test_schedule(6)
    volumes = torch.rand((1, 4, 8, 8, 4), generator=torch.Generator().manual_seed(1))
    timesteps = [5, 3, 0]
    results = {}
    for eta, clip in [(0.0, False), (0.7, False), (0.0, True)]:
        cfg = SampleConfig("ddim", eta=eta, seed=4, clip_denoised=clip)
        results[eta, clip] = synthesize_volumes(HalfOfInput(), schedule, volumes, "t2w", cfg, ["c1"], timesteps)
    for eta in (0.0, 0.7):  # unclipped: the oracle loop
        gen = torch.Generator().manual_seed((4 * 1_000_003 + zlib.crc32(b"c1")) % 2 ** 63)
        x = torch.randn((1, 8, 4, 4, 2), generator=gen)  # x_T, then each step's noise, from the case's generator
        for i, t in enumerate(timesteps[:-1]):
            noise = torch.randn(x.shape, generator=gen) if eta else None
            x = eq12_step(x, 0.5 * x, ab(schedule, t), ab(schedule, timesteps[i + 1]), eta, noise)
        x0 = 0.5 * x
        expected = from_subbands(x0).clamp(0, 1)[:, 0]
        torch.testing.assert_close(results[eta, False], expected, rtol=1e-5, atol=1e-6)
    out = results[0.0, False]
    assert out.min() == 0 and out.max() == 1  # the oracle's volume leaves [0, 1]: the clamp shows
    assert not torch.equal(results[0.0, True], out)  # cWDM's x0 clipping changes the path


def grad_norm(model) -> float:
    return math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters() if p.grad is not None))


def test_the_gradient_norm_is_clipped_to_grad_clip(tmp_path):
    unclipped = tiny_trainer(tmp_path / "a", grad_clip=0.0)
    unclipped.train_step(tiny_batch())
    assert grad_norm(unclipped.model) > 0.01
    clipped = tiny_trainer(tmp_path / "b", grad_clip=0.001)
    clipped.train_step(tiny_batch())
    assert grad_norm(clipped.model) == pytest.approx(0.001, rel=1e-3)


def test_validation_scores_the_ema_weights_not_the_raw_ones(tmp_path):
    trainer = tiny_trainer(tmp_path)
    trainer.val_set = [{"volumes": tiny_batch(1)["volumes"][0], "case_id": "v"}]
    before = trainer.validation_loss()
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.5)
    assert trainer.validation_loss() == before
    with torch.no_grad():
        for p in trainer.ema.parameters():
            p.add_(0.5)
    assert trainer.validation_loss() != before
