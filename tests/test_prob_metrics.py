"""guided_diffusion.prob_metrics against independent references.

Toy posterior: per voxel p(x | c) = N(mu, sigma^2) with a known mu; the target, the oracle draws
and the "exact sampler" are independent draws from it, the "posterior mean" is M copies of mu.
Expected values come from the toy's algebra, a brute-force double loop, the closed-form CRPS of
a Gaussian, scoringrules (a separate implementation) and hand-built cases.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm, spearmanr

from guided_diffusion import prob_metrics as pm
from guided_diffusion.metrics import ssim3d

SHAPE = (16, 16, 8)


def gaussian_toy(m=8, n=64, c=0.5, a=0.25, sigma=1.0, seed=0):
    """mu = c + a * (-1)^(i+j+k): a constant (all its energy in LLL) plus a 3D checkerboard (all
    in HHH). Returns mu, target, exact-sampler samples (m), oracle draws (n), sigma."""
    rng = np.random.default_rng(seed)
    i, j, k = np.indices(SHAPE)
    mu = c + a * (-1.0) ** (i + j + k)
    draw = lambda count: mu + sigma * rng.standard_normal((count, *SHAPE))  # noqa: E731
    return mu, draw(1)[0], draw(m), draw(n), sigma


# --------------------------------------------------------------------------- fair CRPS
def brute_force_fair_crps(samples, target, mask):
    m = samples.shape[0]
    values = []
    for v in zip(*np.nonzero(mask)):
        xs, y = samples[(slice(None), *v)], target[v]
        skill = sum(abs(x - y) for x in xs) / m
        pairs = sum(abs(xs[p] - xs[q]) for p in range(m) for q in range(m) if p != q)
        values.append(skill - pairs / (2 * m * (m - 1)) if m > 1 else skill)
    return float(np.mean(values))


@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_fair_crps_matches_a_double_loop(m):
    rng = np.random.default_rng(m)
    samples, target = rng.standard_normal((m, 3, 2, 2)), rng.standard_normal((3, 2, 2))
    mask = rng.random((3, 2, 2)) > 0.3
    assert pm.fair_crps(samples, target, mask) == pytest.approx(brute_force_fair_crps(samples, target, mask),
                                                                rel=1e-12)


def test_fair_crps_matches_scoringrules():
    sr = pytest.importorskip("scoringrules")
    rng = np.random.default_rng(1)
    samples, target = rng.standard_normal((6, 4, 4, 4)), rng.standard_normal((4, 4, 4))
    expected = sr.crps_ensemble(target.ravel(), samples.reshape(6, -1).T, estimator="fair", backend="numpy").mean()
    assert pm.fair_crps(samples, target, None) == pytest.approx(float(expected), rel=1e-12)


def test_fair_crps_of_gaussian_samples_approaches_the_closed_form():
    """CRPS(N(mu, s^2), y) = s (z (2 Phi(z) - 1) + 2 phi(z) - 1 / sqrt(pi)), z = (y - mu) / s."""
    rng = np.random.default_rng(2)
    shape = (20, 20, 20)
    mu, s, y = rng.standard_normal(shape), rng.uniform(0.5, 2.0, shape), rng.standard_normal(shape)
    samples = mu + s * rng.standard_normal((32, *shape))
    z = (y - mu) / s
    closed = np.mean(s * (z * (2 * norm.cdf(z) - 1) + 2 * norm.pdf(z) - 1 / math.sqrt(math.pi)))
    assert pm.fair_crps(samples, y, None) == pytest.approx(closed, rel=0.02)


def test_fair_crps_of_copies_is_the_mae_exactly_and_a_single_sample_too():
    mu, target, *_ = gaussian_toy()
    mask = np.zeros(SHAPE, bool)
    mask[1:6, 2:7, :5] = True
    mae = np.abs(mu - target)[mask].mean()
    assert pm.fair_crps(np.stack([mu] * 4), target, mask) == mae
    assert pm.fair_crps(mu[None], target, mask) == mae


# --------------------------------------------------------------------------- the Gaussian posterior toy
def test_fair_crps_is_proper_the_exact_sampler_beats_the_posterior_mean():
    """For y ~ N(mu, s^2): E CRPS(N(mu, s^2), y) = s / sqrt(pi) ~ 0.564 s, while the posterior mean
    scores its MAE, E|y - mu| = s sqrt(2 / pi) ~ 0.798 s."""
    mu, target, samples, _, sigma = gaussian_toy(m=16, n=2)
    assert pm.fair_crps(samples, target, None) == pytest.approx(sigma / math.sqrt(math.pi), rel=0.05)
    assert pm.fair_crps(mu[None], target, None) == pytest.approx(sigma * math.sqrt(2 / math.pi), rel=0.05)


def test_exact_sampler_scores_one_on_the_spread_metrics_and_zero_on_the_mean_distance():
    mu, target, samples, oracle, sigma = gaussian_toy(m=16, n=64)
    assert pm.spread_skill(samples, oracle, None) == pytest.approx(1.0, abs=0.06)
    assert pm.band_spread_skill(samples, oracle) == pytest.approx([1.0] * 8, abs=0.15)
    assert pm.band_energy_ratio(samples, oracle) == pytest.approx([1.0] * 8, abs=0.1)
    assert pm.spread_error_ratio(samples, target, None) == pytest.approx(1.0, abs=0.06)
    # the raw MSE of the two means is sigma^2 (1/16 + 1/64) ~ 0.078; debiased it is ~0
    assert abs(pm.oracle_mean_distance(samples, oracle, None)) < 0.01 * sigma ** 2


def test_spread_error_ratio_of_two_exact_members_is_one():
    """With M = 2 the (M + 1) / M correction is a factor sqrt(3/2) = 1.22: the ratio stays ~1."""
    rng = np.random.default_rng(10)
    mu = rng.random((32, 32, 16))
    samples, target = mu + 0.2 * rng.standard_normal((2, *mu.shape)), mu + 0.2 * rng.standard_normal(mu.shape)
    assert pm.spread_error_ratio(samples, target, None) == pytest.approx(1.0, abs=0.05)


def test_oracle_mean_distance_measures_the_squared_bias():
    mu, target, samples, oracle, sigma = gaussian_toy(m=16, n=64)
    assert pm.oracle_mean_distance(samples + 0.3, oracle, None) == pytest.approx(0.09, abs=0.015)


def test_posterior_mean_has_no_spread_and_the_predicted_band_energy():
    """Orthonormal Haar: the constant c puts 8 c^2 per coefficient into LLL, the checkerboard 8 a^2
    into HHH, nothing elsewhere; white noise puts sigma^2 into every coefficient of every band, so
    rho_b = 1 - R_b / E_b = E_mu,b / (E_mu,b + sigma^2 n_b)."""
    c, a, sigma = 0.5, 0.25, 1.0
    mu, target, _, oracle, _ = gaussian_toy(m=2, n=256, c=c, a=a, sigma=sigma)
    copies = np.stack([mu] * 4)
    assert pm.spread_skill(copies, oracle, None) == 0.0
    assert pm.band_spread_skill(copies, oracle) == [0.0] * 8
    assert pm.spread_error_ratio(copies, target, None) == 0.0
    expected = [8 * c ** 2 / (8 * c ** 2 + sigma ** 2)] + [0.0] * 6 + [8 * a ** 2 / (8 * a ** 2 + sigma ** 2)]
    assert pm.band_energy_ratio(copies, oracle) == pytest.approx(expected, abs=0.04)


# --------------------------------------------------------------------------- uncertainty maps
def calibrated_by_construction(err_per_std=0.5, n=1000, seed=3):
    """Members base +- s (so the per-voxel std is s * sqrt(4/3)), target base - 0.5 s: |error| = 0.5 s."""
    rng = np.random.default_rng(seed)
    std = rng.permutation(np.linspace(0.1, 1.0, n)).reshape(10, 10, 10)
    base = rng.standard_normal((10, 10, 10))
    signs = np.array([1.0, -1.0, 1.0, -1.0])[:, None, None, None]
    return base + signs * std, base - err_per_std * std, std


def test_uncertainty_calibration_when_the_error_is_proportional_to_the_std():
    samples, target, _ = calibrated_by_construction()
    result = pm.uncertainty_calibration(samples, target, None)
    assert result["spearman"] == pytest.approx(1.0, abs=1e-12)
    # std ranks k = 0..999 equally spaced from 0.1 to 1: top 100 have mean rank 949.5, the rest 449.5
    step = 0.9 / 999
    assert result["top10_error_ratio"] == pytest.approx((0.1 + step * 949.5) / (0.1 + step * 449.5), rel=1e-12)


def test_spearman_is_a_rank_correlation():
    """|error| = std^3 is monotone in the std but far from linear: rank correlation 1, Pearson < 0.95."""
    samples, _, std = calibrated_by_construction()
    target = samples.mean(0) + std ** 3
    assert np.corrcoef(std.ravel(), std.ravel() ** 3)[0, 1] < 0.95
    assert pm.uncertainty_calibration(samples, target, None)["spearman"] == pytest.approx(1.0, abs=1e-12)


def test_a_large_mask_is_subsampled_evenly_for_the_rank_correlation(monkeypatch):
    """Above MAX_SPEARMAN_VOXELS the ranks come from every k-th mask voxel: the same value on every
    call, equal to scipy's on that stride; the top-10% ratio still uses every voxel."""
    samples, _, std = calibrated_by_construction()
    target = samples.mean(0) + np.random.default_rng(11).standard_normal((10, 10, 10))
    full = pm.uncertainty_calibration(samples, target, None)
    monkeypatch.setattr(pm, "MAX_SPEARMAN_VOXELS", 300)
    err = np.abs(samples.mean(0) - target).ravel()
    first, second = (pm.uncertainty_calibration(samples, target, None) for _ in range(2))
    assert first == second
    assert first["spearman"] == pytest.approx(spearmanr(std.ravel()[::4], err[::4]).statistic, rel=1e-12)
    assert first["spearman"] != full["spearman"] and first["top10_error_ratio"] == full["top10_error_ratio"]


def test_uncertainty_calibration_of_an_unrelated_spread_is_near_zero_and_one():
    samples, _, _ = calibrated_by_construction()
    target = samples.mean(0) + np.random.default_rng(4).standard_normal((10, 10, 10))
    result = pm.uncertainty_calibration(samples, target, None)
    assert abs(result["spearman"]) < 0.1 and result["top10_error_ratio"] == pytest.approx(1.0, abs=0.2)


# --------------------------------------------------------------------------- spectra
def test_rapsd_of_white_noise_is_flat_at_its_variance():
    rng = np.random.default_rng(5)
    spectra = [pm.rapsd(rng.standard_normal((24, 24, 16)), None) for _ in range(8)]
    freqs = spectra[0][0]
    power = np.mean([p for _, p in spectra], axis=0)
    np.testing.assert_allclose(freqs, np.arange(1, 9) / 16)
    np.testing.assert_allclose(power, 1.0, atol=0.25)


def test_rapsd_distance_is_zero_for_itself_and_the_db_of_a_scale():
    rng = np.random.default_rng(6)
    x = rng.random((12, 12, 10))
    mask = np.zeros(x.shape, bool)
    mask[2:10, 1:11, 2:9] = True
    assert pm.rapsd_distance(x[None], x, mask) == 0.0
    # power scales with the square: 2x is 10 log10(4) dB above x in every bin
    assert pm.rapsd_distance(2 * x[None], x, mask) == pytest.approx(10 * math.log10(4), rel=1e-12)
    # a reference of draws averages their spectra: (1 + 9) / 2 = 5 times x's power
    assert pm.rapsd_distance(x[None], np.stack([x, 3 * x]), mask) == pytest.approx(10 * math.log10(5), rel=1e-12)


# --------------------------------------------------------------------------- teacher, diversity
def test_teacher_distance_pairs_samples_by_index():
    rng = np.random.default_rng(7)
    teacher = rng.random((2, 4, 4, 4))
    offsets = np.array([0.1, 0.3])[:, None, None, None]
    assert pm.teacher_distance(teacher + offsets, teacher, None) == pytest.approx(0.2, rel=1e-12)
    # swapped teacher samples are not the pairs of these samples
    assert pm.teacher_distance(teacher, teacher[::-1], None) > 0.1


def test_msssim_diversity_is_zero_for_identical_samples_and_positive_otherwise():
    rng = np.random.default_rng(8)
    x = rng.random((16, 16, 16))
    assert pm.msssim_diversity(np.stack([x, x, x])) == pytest.approx(0.0, abs=1e-9)
    noisy = np.stack([x, np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1)])
    assert pm.msssim_diversity(noisy) > 0.01


def test_msssim_diversity_on_a_small_box_is_one_minus_plain_ssim():
    """A 10^3 box fits one scale of the 7-tap window: MS-SSIM is the plain 3D SSIM there."""
    rng = np.random.default_rng(9)
    x = rng.random((2, 14, 14, 14))
    x[1] = 0.7 * x[0] + 0.3 * x[1]
    mask = np.zeros((14, 14, 14), bool)
    mask[2:12, 3:13, 1:11] = True
    box = x[:, 2:12, 3:13, 1:11]
    assert pm.msssim_diversity(x, mask) == pytest.approx(1 - ssim3d(box[0], box[1], kernel_size=7), rel=1e-9)
    mask[:] = False
    mask[2:8, 2:12, 2:12] = True  # 6 voxels along x: smaller than the window
    with pytest.raises(ValueError, match="bounding box"):
        pm.msssim_diversity(x, mask)


# --------------------------------------------------------------------------- ensemble_metrics
def test_ensemble_metrics_collects_the_metrics_and_is_none_safe():
    mu, target, samples, _, _ = gaussian_toy(m=4)
    brain = np.ones(SHAPE, bool)
    tumour = np.zeros(SHAPE, bool)
    tumour[2:5, 2:5, 2:5] = True
    before = samples.copy()
    out = pm.ensemble_metrics(torch.from_numpy(samples), target, brain, tumour)
    np.testing.assert_array_equal(samples, before)
    assert tuple(out) == pm.ENSEMBLE_METRIC_KEYS
    calibration = pm.uncertainty_calibration(samples, target, brain)
    assert out == {
        "crps_brain": pm.fair_crps(samples, target, brain), "crps_tumor": pm.fair_crps(samples, target, tumour),
        "spread_error_brain": pm.spread_error_ratio(samples, target, brain),
        "spread_error_tumor": pm.spread_error_ratio(samples, target, tumour),
        "std_error_spearman": calibration["spearman"], "top10_std_error_ratio": calibration["top10_error_ratio"]}
    no_tumour = pm.ensemble_metrics(samples, target, brain, np.zeros(SHAPE, bool))
    assert no_tumour["crps_tumor"] is None and no_tumour["spread_error_tumor"] is None
    assert no_tumour["crps_brain"] == out["crps_brain"]
    single = pm.ensemble_metrics(samples[:1], target, None, None)
    assert single["crps_brain"] == pytest.approx(np.abs(samples[0] - target).mean(), rel=1e-12)
    assert [single[k] for k in pm.ENSEMBLE_METRIC_KEYS if k != "crps_brain"] == [None] * 5


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call", [
    lambda s, t, o, m: pm.spread_error_ratio(s[:1], t, m),
    lambda s, t, o, m: pm.spread_skill(s[:1], o, m),
    lambda s, t, o, m: pm.band_spread_skill(s, o[:1]),
    lambda s, t, o, m: pm.oracle_mean_distance(s[:1], o, m),
    lambda s, t, o, m: pm.msssim_diversity(s[:1]),
    lambda s, t, o, m: pm.uncertainty_calibration(s[:1], t, m),
])
def test_a_single_member_is_refused_where_a_spread_is_needed(call):
    _, target, samples, oracle, _ = gaussian_toy(m=3, n=3)
    with pytest.raises(ValueError, match="at least 2"):
        call(samples, target, oracle, np.ones(SHAPE, bool))


def test_shape_mismatch_empty_mask_and_odd_dims_are_clear_errors():
    _, target, samples, oracle, _ = gaussian_toy(m=3, n=3)
    with pytest.raises(ValueError, match="different volume shapes"):
        pm.fair_crps(samples, target[:-1], None)
    with pytest.raises(ValueError, match=r"target must have shape \(X, Y, Z\)"):
        pm.fair_crps(samples, target[None], None)
    with pytest.raises(ValueError, match="mask has shape"):
        pm.spread_skill(samples, oracle, np.ones((8, 8, 7), bool))
    with pytest.raises(ValueError, match="mask is empty"):
        pm.fair_crps(samples, target, np.zeros(SHAPE, bool))
    with pytest.raises(ValueError, match="pair up"):
        pm.teacher_distance(samples, samples[:2], None)
    with pytest.raises(ValueError, match="even volume dimensions"):
        pm.band_energy_ratio(samples[..., :7], oracle[..., :7])


def test_torch_and_numpy_inputs_agree_and_are_not_modified():
    _, target, samples, oracle, _ = gaussian_toy(m=3, n=5)
    t_samples = torch.from_numpy(samples.astype(np.float32))
    kept = t_samples.clone()
    as_numpy = pm.fair_crps(samples.astype(np.float32), target, None)
    assert pm.fair_crps(t_samples, torch.from_numpy(target), None) == as_numpy
    assert torch.equal(t_samples, kept)
