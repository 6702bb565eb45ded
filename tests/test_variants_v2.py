"""Benchmark v2 variants R, P, Ctrl and FATS v2 (docs/fats_v2.md): training timestep distributions,
the warm-start sampler and its NFE accounting, residual shifts and the per-band warm-start step,
min-SNR band weights, the CRPS-scored timestep fit, FATS state version 3, the presets, and FATS v2
trained from a regression model and sampled with no flags."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from DWT_IDWT import BAND_NAMES
from fixtures_data import one_thread  # noqa: F401 (a fixture)
from fixtures_data import run_main
from guided_diffusion.checkpoints import load_model
from guided_diffusion.cli import EXIT_OK
from guided_diffusion.commands import train
from guided_diffusion.config import ConfigError, DiffusionConfig, SampleConfig, TrainConfig
from guided_diffusion.diffusion import append_dims, snr_weights, training_losses
from guided_diffusion.factory import build_model, build_schedule
from guided_diffusion.fats import FatsState, LearnedTimesteps, shifts_from_energy, warm_start_step
from guided_diffusion.fats_search import fair_crps, learn_timesteps
from guided_diffusion.presets import get_preset
from guided_diffusion.samplers import ddim_sample, ddpm_sample, warm_start_sample
from guided_diffusion.schedules import linear
from guided_diffusion.timesteps import draw_training_timesteps, plan_timesteps

# --------------------------------------------------------------------------- training timesteps


def test_uniform_training_timesteps_are_the_draws_of_before_bit_for_bit():
    drawn = draw_training_timesteps("uniform", 1000, 64, torch.Generator().manual_seed(7), "cpu")
    before = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(7))
    assert torch.equal(drawn, before)
    # and the generator is left where it was before too: the noise drawn next is unchanged
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    draw_training_timesteps("uniform", 1000, 5, gen_a, "cpu")
    torch.randint(0, 1000, (5,), generator=gen_b)
    assert torch.equal(torch.randn(4, generator=gen_a), torch.randn(4, generator=gen_b))


@pytest.mark.parametrize("spec, sampled, expected", [
    ("uniform", None, {t: 0.1 for t in range(10)}),
    ("last", None, {9: 1.0}),
    ("last_mass:0.3", None, {**{t: 0.7 / 10 for t in range(9)}, 9: 0.3 + 0.7 / 10}),
    ("sampled", (9, 5, 2), {9: 1 / 3, 5: 1 / 3, 2: 1 / 3}),
])
def test_training_timestep_frequencies_match_their_distribution(spec, sampled, expected):
    n = 200_000
    t = draw_training_timesteps(spec, 10, n, torch.Generator().manual_seed(0), "cpu", sampled)
    counts = torch.bincount(t, minlength=10)
    for step in range(10):
        p = expected.get(step, 0.0)
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(int(counts[step]) - n * p) <= 5 * sigma + 1e-9, (step, int(counts[step]), n * p)


@pytest.mark.parametrize("spec", ["last_mass", "last_mass:0", "last_mass:1.5", "last_mass:x", "last:0.1", "every"])
def test_invalid_train_timesteps_are_refused_by_the_config(spec):
    with pytest.raises(ConfigError, match="train_timesteps"):
        TrainConfig(train_timesteps=spec)


def test_sampled_training_needs_the_planned_steps():
    with pytest.raises(ValueError, match="residual_from"):
        draw_training_timesteps("sampled", 10, 2, torch.Generator(), "cpu", None)


# --------------------------------------------------------------------------- warm start (P) and NFE


def test_warm_start_plans_count_the_regression_evaluation():
    schedule = linear(1000, n_bands=1)
    assert plan_timesteps(schedule, None, 3, warm_start_t=300)[0] == [999, 300, 0]
    assert plan_timesteps(schedule, None, 4, warm_start_t=300)[0] == [999, 300, 150, 0]
    every, origin = plan_timesteps(schedule, None, 0, warm_start_t=5)
    assert every == [999, 5, 4, 3, 2, 1, 0] and "every step" in origin
    # a stored FATS v2 plan that starts [T - 1, t*] is used as it is; one that does not is not
    state = FatsState(learned={3: LearnedTimesteps((999, 300, 40))}, default_nfe=3)
    assert plan_timesteps(schedule, state, 0, warm_start_t=300)[0] == [999, 300, 40]
    assert plan_timesteps(schedule, state, 3, warm_start_t=200)[0] == [999, 200, 0]
    with pytest.raises(ValueError, match="NFE 1 must be in 2"):
        plan_timesteps(schedule, None, 1, warm_start_t=300)
    with pytest.raises(ValueError, match="warm_start_t must be a schedule step"):
        plan_timesteps(schedule, None, 3, warm_start_t=999)


@pytest.mark.parametrize("sampler", [ddim_sample, ddpm_sample])
def test_warm_start_with_a_denoiser_that_knows_the_truth_reaches_it(sampler):
    schedule = linear(1000, n_bands=8)
    truth = torch.rand(1, 8, 3, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    seen = []

    def denoiser(x_t, t):
        seen.append((int(t[0]), x_t.clone()))
        return truth.clone()

    x_T = torch.randn(1, 8, 3, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    steps = plan_timesteps(schedule, None, 4, warm_start_t=300)[0]
    out = warm_start_sample(sampler, denoiser, schedule, x_T, steps, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, truth, rtol=0, atol=1e-12)
    assert [t for t, _ in seen] == steps  # NFE = len(timesteps), the regression evaluation included
    assert torch.equal(seen[0][1], x_T)
    # at t* the network sees the estimate noised with fresh noise from the generator (its next draw)
    fresh = torch.randn(1, 8, 3, 3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ab = float(torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[300])
    torch.testing.assert_close(seen[1][1], math.sqrt(ab) * truth + math.sqrt(1 - ab) * fresh, rtol=0, atol=1e-12)


def test_warm_start_refuses_a_plan_without_the_last_step_or_a_refinement():
    schedule = linear(1000, n_bands=1)
    x = torch.zeros(1, 1, 2, 2, 2)
    with pytest.raises(ValueError, match="warm start"):
        warm_start_sample(ddim_sample, lambda x_t, t: x_t, schedule, x, [999])
    with pytest.raises(ValueError, match="warm start"):
        warm_start_sample(ddim_sample, lambda x_t, t: x_t, schedule, x, [500, 100])


def test_synthesis_with_warm_start_makes_nfe_network_evaluations(tiny_model_config):
    from guided_diffusion.synthesis import synthesize_volumes

    torch.manual_seed(0)
    model = build_model(tiny_model_config).eval()
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(1))
    schedule = linear(1000)
    cfg = SampleConfig(sampler="ddim", nfe=3, warm_start_t=300)
    steps, _ = plan_timesteps(schedule, None, cfg.nfe, cfg.warm_start_t)
    volumes = torch.rand(1, 4, 8, 8, 8)
    out = synthesize_volumes(model, schedule, volumes, "t2f", cfg, ["case"], steps)
    assert len(calls) == 3 and out.shape == (1, 8, 8, 8)
    with pytest.raises(ValueError, match="warm_start_t=200"):
        synthesize_volumes(model, schedule, volumes, "t2f", replace(cfg, warm_start_t=200), ["case"], steps)


# --------------------------------------------------------------------------- FATS v2: residual shifts, warm start


def test_residual_shifts_of_a_hand_computed_case():
    residual = {"energy": {"LLL": 0.04, "LLH": 0.0, "LHL": 0.01, "HLL": 0.01, "LHH": 0.01, "HLH": 0.01,
                           "HHL": 0.01, "HHH": 0.01}}
    mean = (0.04 + 6 * 0.01) / 8  # 0.0125
    shifts = dict(zip(BAND_NAMES, shifts_from_energy(residual, kappa=1.0, max_shift=4.0)))
    assert shifts["LLH"] == 4.0  # nothing left to generate: the largest shift, towards less noise
    assert shifts["LLL"] == pytest.approx(-math.log(0.04 / mean))  # most residual: more noise (negative)
    assert shifts["LLL"] < 0 < shifts["HHH"] == pytest.approx(math.log(mean / 0.01))
    assert shifts_from_energy(residual, kappa=0.0)[1] == 0.0  # kappa 0: cWDM's shared schedule
    with pytest.raises(ValueError, match="not all zero"):
        shifts_from_energy({"energy": {b: 0.0 for b in BAND_NAMES}})


def test_warm_start_step_matches_each_band_noise_to_its_residual():
    steps = torch.arange(21, dtype=torch.float64)
    log_snr = torch.stack([10 - steps, 12 - steps])  # band 1 shifted by +2
    # lambda_b(t*) = -log R_b: band 0 at t = 5 (R = e^-5), band 1 at t = 5 (R = e^-7)
    assert warm_start_step(log_snr, [math.exp(-5), math.exp(-7)]) == 5
    # two bands asking for t = 6 and t = 4: the least-squares compromise; a zero residual is ignored
    same = torch.stack([10 - steps, 10 - steps, 10 - steps])
    assert warm_start_step(same, [math.exp(-4), math.exp(-6), 0.0]) == 5
    assert warm_start_step(same[:1], [math.exp(30)]) == 19  # never the last step (that is the regression) ...
    assert warm_start_step(same[:1], [math.exp(-30)]) == 1  # ... nor step 0
    with pytest.raises(ValueError, match="not all zero"):
        warm_start_step(same[:1], [0.0])


def test_min_snr_band_weights_are_the_clamped_snr():
    schedule = linear(1000, n_bands=2)
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    t = torch.tensor([0, 200, 400, 999])
    snr = alpha_bar[t] / (1 - alpha_bar[t])
    w = snr_weights(schedule, t, 5.0)
    assert w.shape == (4, 2)
    assert 1 < float(snr[1]) < 5 and float(snr[2]) < 1  # one unclamped case, one at the floor
    expected = torch.tensor([5.0, float(snr[1]), 1.0, 1.0])
    torch.testing.assert_close(w[:, 0], expected.float())
    torch.testing.assert_close(w[:, 1], w[:, 0])


class _Zero(torch.nn.Module):
    def forward(self, x, time, **kwargs):
        return torch.zeros(x.shape[0], 8, *x.shape[2:])


def test_training_loss_with_min_snr_weights():
    schedule = linear(1000)
    x0 = torch.rand(2, 8, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    cond = torch.zeros(2, 24, 2, 2, 2)
    t = torch.tensor([0, 999])
    out = training_losses(_Zero(), schedule, x0, cond, t, torch.zeros_like(x0), snr_gamma=5.0)
    per_band = (x0 ** 2).mean(dim=(2, 3, 4))  # the zero network's x0 error
    torch.testing.assert_close(out["per_band"], per_band)
    torch.testing.assert_close(out["loss"], torch.stack([5 * per_band[0].mean(), per_band[1].mean()]))


# --------------------------------------------------------------------------- CRPS-scored timestep fit


def test_fair_crps_of_hand_computed_ensembles():
    ref = torch.full((1, 1, 1, 1, 1), 2.0)
    two = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1, 1)
    assert fair_crps(two, ref, {}) == pytest.approx(0.0)  # skill 1, spread |1 - 3| * 2 / (2 * 2 * 1) = 1
    same = torch.full((2, 1, 1, 1, 1), 0.0)
    assert fair_crps(same, ref, {}) == pytest.approx(2.0)  # a collapsed ensemble scores its MAE


@pytest.mark.parametrize("members", [2, 3])
def test_fair_crps_agrees_with_the_benchmark_metric(members):
    """Against prob_metrics.fair_crps (numpy, sorted-members form): an independent implementation."""
    from guided_diffusion.prob_metrics import fair_crps as benchmark_crps

    g = torch.Generator().manual_seed(4)
    samples = torch.rand(members, 1, 4, 5, 6, generator=g, dtype=torch.float64)
    ref = torch.rand(1, 1, 4, 5, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(1, 1, 4, 5, 6, generator=g) > 0.4
    ours = fair_crps(samples, ref, {"mask": mask}, members=members)
    theirs = benchmark_crps(samples[:, 0].numpy(), ref[0, 0].numpy(), mask[0, 0].numpy())
    assert ours == pytest.approx(theirs, rel=1e-12)


def test_crps_fit_prefers_a_sampler_that_keeps_its_spread():
    """Toy with a known answer: x0 ~ N(0, 1) in every coefficient, independent of the conditions,
    and the exact denoiser E[x0 | x_t]. Collapsed samples (the mean, 0) score MSE 1 and CRPS
    E|x0| = sqrt(2 / pi) = 0.798; exact samples score MSE 2 and CRPS 1 / sqrt(pi) = 0.564."""
    T, K = 40, 3
    schedule = linear(T, n_bands=8)

    def denoiser(x_t, t):
        ab = append_dims(schedule.alpha_bar_at(t), x_t)
        return ab.sqrt() / (ab + 1 - ab) * x_t

    gen = torch.Generator().manual_seed(0)
    cases = [{"x0": torch.randn(1, 8, 4, 4, 4, generator=gen, dtype=torch.float64)} for _ in range(6)]
    mse = learn_timesteps(lambda case: denoiser, schedule, cases, K, score="mse")
    crps = learn_timesteps(lambda case: denoiser, schedule, cases, K, score="crps")
    assert crps["score"] == "crps" and len(crps["steps"]) == K and crps["steps"][0] == T - 1

    def score_of(steps, n=64):  # independent evaluation on fresh targets and noise
        g = torch.Generator().manual_seed(99)
        x0 = torch.randn(n, 8, 2, 2, 2, generator=g, dtype=torch.float64)
        x = torch.randn(2 * n, 8, 2, 2, 2, generator=g, dtype=torch.float64)
        samples = ddim_sample(denoiser, schedule, x, steps)
        return fair_crps(samples, x0, {}), float(samples.var()), float(((samples[:n] - x0) ** 2).mean())

    crps_of_crps_fit, spread_crps_fit, _ = score_of(crps["steps"])
    crps_of_mse_fit, spread_mse_fit, mse_of_mse_fit = score_of(mse["steps"])
    crps_collapsed, _, _ = score_of([T - 1])
    assert crps_collapsed == pytest.approx(math.sqrt(2 / math.pi), rel=0.1)  # the known value of the mean
    assert crps_of_crps_fit < crps_of_mse_fit and crps_of_crps_fit < 0.9 * crps_collapsed
    assert spread_crps_fit > 2 * spread_mse_fit  # the MSE fit collapses towards the mean
    assert mse_of_mse_fit < 1.2  # near the mean's MSE of 1: the MSE fit is a regressor
    with pytest.raises(ValueError, match="crps"):
        learn_timesteps(lambda case: denoiser, schedule, cases, K, score="crps", reference="teacher")


# --------------------------------------------------------------------------- FATS state version 3


def test_fats_state_version_3_round_trip_and_version_2_still_loads():
    state = FatsState(energy_stats={"label": "target"}, residual_stats={"label": "residual", "energy": {"LLL": 0.1}},
                      band_shifts=(0.5,) * 8, kappa=1.0, learned={3: LearnedTimesteps((49, 7, 0))}, default_nfe=3,
                      train_timesteps=(49, 7, 0))
    stored = json.loads(json.dumps(state.to_dict()))
    assert stored["version"] == 3 and stored["train_timesteps"] == [49, 7, 0]
    assert FatsState.from_dict(stored) == state
    version_2 = {key: value for key, value in stored.items() if key not in ("residual_stats", "train_timesteps")}
    old = FatsState.from_dict({**version_2, "version": 2})
    assert old.residual_stats is None and old.train_timesteps is None and old.learned == state.learned
    with pytest.raises(ValueError, match="unsupported version 4"):
        FatsState.from_dict({**stored, "version": 4})
    with pytest.raises(ValueError, match="strictly decreasing"):
        FatsState(train_timesteps=(3, 7))


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name, kind, nfe", [("regression", "last", 1), ("demo_regression", "last", 1),
                                             ("ctrl", "last_mass", None), ("demo_ctrl", "last_mass", 10),
                                             ("fats2", "sampled", 4), ("demo_fats2", "sampled", 4)])
def test_variant_presets_build(name, kind, nfe):
    preset = get_preset(name)
    schedule = build_schedule(preset.diffusion)
    assert preset.train.train_timesteps.split(":")[0] == kind
    if nfe is not None:
        assert preset.sample.nfe == nfe
    if kind == "last":  # R samples one evaluation at the last step
        assert plan_timesteps(schedule, None, preset.sample.nfe)[0] == [schedule.num_steps - 1]
    if kind == "sampled":
        assert preset.diffusion.kind == "fats" and preset.train.min_snr_gamma > 0
    if name.startswith("demo"):
        build_model(preset.model)


# --------------------------------------------------------------------------- FATS v2 end to end


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_fats2_trains_from_a_regression_model_and_samples_with_no_flags(tiny_demo_dir, tmp_path, monkeypatch,
                                                                       prediction):
    tiny = get_preset("tiny")
    presets = {
        "r": replace(tiny, diffusion=DiffusionConfig(kind="fast_direct", num_train_steps=50),
                     train=replace(tiny.train, train_timesteps="last"), sample=SampleConfig(sampler="ddim", nfe=1)),
        "f2": replace(tiny, diffusion=DiffusionConfig(kind="fats", num_train_steps=50),
                      train=replace(tiny.train, train_timesteps="sampled", min_snr_gamma=5.0),
                      sample=SampleConfig(sampler="ddim", nfe=3)),
    }
    common = ["--preset", "tiny", "--data_dir", tiny_demo_dir / "training", "--target", "t2f", "--val_cases", 1,
              "--val_interval", 2, "--max_steps", 2, "--cpu"]
    monkeypatch.setattr(train, "get_preset", lambda name: presets["r"])
    assert run_main("train", [*common, "--run_dir", tmp_path / "r"]) == EXIT_OK
    regression = tmp_path / "r" / "t2f" / "latest.pt"
    # FATS v2 without its regression model: a clear error before any work
    monkeypatch.setattr(train, "get_preset", lambda name: presets["f2"])
    assert run_main("train", [*common, "--run_dir", tmp_path / "bad"]) != EXIT_OK
    assert run_main("train", [*common, "--run_dir", tmp_path / "f2", "--residual_from", regression,
                              "--prediction", prediction]) == EXIT_OK
    loaded = load_model(tmp_path / "f2" / "t2f" / "latest.pt")
    state = loaded.fats_state
    if prediction == "v":  # FATS step 4: each band preconditioned with its RMS, stored with the checkpoint
        rms = [math.sqrt(state.energy_stats["energy"][b]) for b in BAND_NAMES]
        assert loaded.diffusion_config.sigma_data == pytest.approx(rms, rel=1e-5)
        torch.testing.assert_close(loaded.schedule.sigma_data, torch.tensor(rms, dtype=torch.float64), rtol=1e-5, atol=0)
    else:
        assert loaded.schedule.sigma_data is None
    assert state.residual_stats["label"] == "residual" and state.energy_stats["label"] == "target"
    residual = [state.residual_stats["energy"][b] for b in BAND_NAMES]
    t_star = warm_start_step(loaded.schedule.log_snr, residual)
    assert loaded.diffusion_config.band_shifts == tuple(round(s, 6) for s in shifts_from_energy(state.residual_stats))
    assert state.train_timesteps[:2] == (49, t_star) and len(state.train_timesteps) == 3
    assert loaded.extra["sample"]["warm_start_t"] == t_star and loaded.extra["sample"]["nfe"] == 3
    out_dir = tmp_path / "sampled"
    assert run_main("sample", ["--checkpoint", tmp_path / "f2" / "t2f" / "latest.pt", "--data_dir",
                               tiny_demo_dir / "pseudo_validation_gt", "--target", "t2f", "--out_dir", out_dir,
                               "--device", "cpu", "--max_cases", 1]) == EXIT_OK
    meta = json.loads((out_dir / "sample_config.json").read_text())
    assert meta["timesteps"] == list(state.train_timesteps) and meta["nfe"] == 3
    assert meta["sample_config"]["warm_start_t"] == t_star and "warm start" in meta["timesteps_origin"]


def test_residual_energies_need_a_single_modality_diffusion_model(tiny_model_config):
    from guided_diffusion.checkpoints import LoadedModel
    from guided_diffusion.fats_training import last_step_estimate

    all_modality = replace(tiny_model_config, num_modality_labels=4)
    loaded = LoadedModel(build_model(all_modality), all_modality, DiffusionConfig(), linear(1000), "all.pt")
    with pytest.raises(ValueError, match="all.pt: residual energies are measured with a single-modality"):
        last_step_estimate(loaded, "t2f")
