"""Schedules: per-band arrays, reductions to the shared schedule, Fast-DDPM variants, the registry."""
import math

import pytest
import torch

from guided_diffusion.config import ConfigError, DiffusionConfig
from guided_diffusion.constants import FATS_BASES, SCHEDULE_KINDS
from guided_diffusion.diffusion import q_sample
from guided_diffusion.factory import _FATS_BASE_CURVES, SCHEDULE_BUILDERS, build_schedule
from guided_diffusion.schedules import NoiseSchedule, cosine, fast_sampled, linear


def test_identical_bands_reduce_exactly_to_the_shared_schedule():
    shared = linear(n_bands=1)
    banded = linear(n_bands=8)
    t = torch.tensor([0, 5, 999])
    s = t - 1
    for a, b in zip(banded.posterior(t, s), shared.posterior(t, s)):
        assert torch.equal(a, b.expand_as(a))
    x0, noise = torch.randn(3, 8, 2, 2, 2), torch.randn(3, 8, 2, 2, 2)
    assert torch.equal(q_sample(banded, x0, t, noise), q_sample(shared.per_band(8), x0, t, noise))


def test_a_band_can_be_noised_differently():
    base = linear(n_bands=2)
    alpha_bar = base.alpha_bar.clone()
    alpha_bar[1] = alpha_bar[1] ** 2  # band 1 noisier at every step
    sched = NoiseSchedule(alpha_bar, base.model_times)
    x0, noise = torch.ones(1, 2, 1, 1, 1), torch.zeros(1, 2, 1, 1, 1)
    x_t = q_sample(sched, x0, torch.tensor([500]), noise).flatten()
    assert x_t[1] < x_t[0]
    assert x_t[0] == pytest.approx(base.alpha_bar[0, 500].sqrt().item())


def test_posterior_over_a_respaced_pair_matches_the_composed_forward_process():
    sched = linear(n_bands=1)
    t, s = torch.tensor([700]), torch.tensor([300])
    coef_x0, coef_xt, variance = sched.posterior(t, s)
    ab_t, ab_s = sched.alpha_bar[0, 700], sched.alpha_bar[0, 300]
    # E[x_s | x0] must be recovered when averaging the posterior over x_t ~ q(x_t | x0).
    assert (coef_x0 + coef_xt * ab_t.sqrt()).item() == pytest.approx(ab_s.sqrt().item(), rel=1e-12)
    # Var[x_s | x0] = E[posterior var] + Var[coef_xt x_t] = 1 - ab_s.
    assert (variance + coef_xt ** 2 * (1 - ab_t)).item() == pytest.approx((1 - ab_s).item(), rel=1e-12)


def test_fast_ddpm_variants():
    direct = build_schedule(DiffusionConfig(kind="fast_direct", num_train_steps=10))
    assert direct.num_steps == 10 and direct.alpha_bar[0, -1] < linear().alpha_bar[0, -1] * 10
    torch.testing.assert_close(direct.betas[0, 0], torch.tensor(1e-4 * 100, dtype=torch.float64))
    sampled = fast_sampled(10)
    assert sampled.num_steps == 11  # includes t = 0: 11 network evaluations
    assert sampled.model_times.tolist() == [0, 99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
    torch.testing.assert_close(sampled.alpha_bar[0], linear().alpha_bar[0, sampled.model_times.long()])


def test_cosine_and_validation():
    sched = cosine(100)
    assert sched.alpha_bar[0, -1] < 1e-3 and sched.alpha_bar[0, 0] > 0.99
    with pytest.raises(ValueError, match="decreasing"):
        NoiseSchedule(torch.ones(1, 3, dtype=torch.float64), torch.arange(3.0))
    with pytest.raises(ValueError, match="s < t"):
        sched.posterior(torch.tensor([3]), torch.tensor([3]))


def test_state_dict_round_trip():
    sched = fast_sampled(10)
    again = NoiseSchedule.from_state_dict(sched.state_dict())
    assert torch.equal(again.alpha_bar, sched.alpha_bar) and torch.equal(again.model_times, sched.model_times)


def test_the_schedule_registry_builds_exactly_the_kinds_configs_accept():
    assert tuple(SCHEDULE_BUILDERS) == SCHEDULE_KINDS
    assert tuple(_FATS_BASE_CURVES) == FATS_BASES
    for kind in SCHEDULE_KINDS:
        if kind == "fast_sampled":
            schedule, expected = build_schedule(DiffusionConfig(kind=kind, fast_intervals=10)), 11
        else:
            steps = 1000 if kind == "linear" else 10
            schedule, expected = build_schedule(DiffusionConfig(kind=kind, num_train_steps=steps)), steps
        assert schedule.n_bands == 8 and schedule.num_steps == expected


def test_the_linear_kind_is_ddpms_1000_step_schedule():
    """Independent oracle: alpha_bar = prod(1 - beta) with betas from 1e-4 to 0.02 in 1000 steps."""
    schedule = build_schedule(DiffusionConfig(kind="linear"))
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    for t in (0, 1, 499, 999):
        expected = math.prod(1 - b for b in betas[: t + 1])
        assert schedule.alpha_bar[3, t].item() == pytest.approx(expected, rel=1e-9)
    assert schedule.model_times.tolist() == list(range(1000))


def test_linear_with_another_length_is_refused_and_points_to_fast_direct():
    with pytest.raises(ConfigError, match="kind 'fast_direct'"):
        DiffusionConfig(kind="linear", num_train_steps=10)
    with pytest.raises(ConfigError, match="fast_direct"):
        DiffusionConfig.from_dict({"kind": "linear", "steps": 100})  # an old file's spelling, same refusal
    direct = build_schedule(DiffusionConfig(kind="fast_direct", num_train_steps=10))
    betas = [0.01 + (0.999 - 0.01) * i / 9 for i in range(10)]  # betas x 1000 / 10, the end capped at 0.999
    assert direct.alpha_bar[0, -1].item() == pytest.approx(math.prod(1 - b for b in betas), rel=1e-9)
    assert direct.model_times.tolist() == [100.0 * i for i in range(10)]
