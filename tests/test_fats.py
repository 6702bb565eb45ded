"""FATS: energy statistics, per-band schedules, learned timesteps, shift searches, checkpoint state."""
import io
import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from DWT_IDWT import BAND_NAMES, clip_in_image_space, from_subbands, to_subbands
from guided_diffusion.config import ConfigError, DiffusionConfig
from guided_diffusion.diffusion import append_dims, make_denoiser
from guided_diffusion.factory import build_model, build_schedule, fats_schedule
from guided_diffusion.fats import (FatsState, LearnedTimesteps, band_energy_stats, ramped_shifts, shifts_from_energy,
                                   subband_mask)
from guided_diffusion.fats_search import BAND_GROUPS, learn_timesteps, masked_mse, refine_group_shifts, search_kappa
from guided_diffusion.samplers import ddim_sample
from guided_diffusion.schedules import cosine, linear, per_band_schedule
from guided_diffusion.timesteps import power_timesteps, uniform_timesteps


# --------------------------------------------------------------------------- energy statistics


def test_band_energy_stats_measure_known_energies_inside_the_brain_only():
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([2.0, 1.0, 0.5, 0.25, 0.1, 0.05, 0.02, 0.01])
    bands = torch.randn(2, 8, 4, 4, 4, generator=gen, dtype=torch.float64) * scales.view(1, 8, 1, 1, 1)
    volumes = from_subbands(bands)  # volumes whose normalised subbands are exactly `bands`
    brain = torch.zeros(2, 8, 8, 8, dtype=torch.bool)
    brain[0, 0:3, :, 2:8] = True  # voxel rows 0..2 touch subband rows 0 and 1 (max-pooling)
    brain[1, 5, 5, 5] = True  # a single voxel: one subband coefficient
    expected_mask = torch.zeros(2, 1, 4, 4, 4, dtype=torch.bool)
    expected_mask[0, 0, 0:2, :, 1:4] = True
    expected_mask[1, 0, 2, 2, 2] = True
    assert torch.equal(subband_mask(brain), expected_mask)
    outside = ~expected_mask
    for dim in (2, 3, 4):
        outside = outside.repeat_interleave(2, dim=dim)
    volumes[outside] = 1e3  # voxels whose subband coefficients are all outside the brain: must not count

    truth = to_subbands(volumes)
    torch.testing.assert_close(truth[expected_mask.expand_as(truth)], bands[expected_mask.expand_as(truth)])
    inside = bands.permute(1, 0, 2, 3, 4)[:, expected_mask[:, 0]]  # (8, n_brain)
    stats = band_energy_stats(iter(to_subbands(volumes)), iter(brain))
    assert stats["count"] == inside.shape[1] == 2 * 4 * 3 + 1 and stats["n_volumes"] == 2
    for b, name in enumerate(BAND_NAMES):
        assert stats["energy"][name] == pytest.approx(float((inside[b] ** 2).mean()), rel=1e-9)
        assert stats["mean"][name] == pytest.approx(float(inside[b].mean()), rel=1e-9)
    assert stats["energy"]["LLL"] > 10 * stats["energy"]["HHH"]
    json.dumps(stats)  # JSON-serialisable


def test_band_energy_stats_of_a_constant_block_follow_the_lll_scale():
    volume = torch.zeros(1, 1, 8, 8, 8)
    volume[..., :4, :4, :4] = 1.0  # aligned 2x2x2 blocks of ones: only LLL, 2 sqrt(2) / 3 each
    stats = band_energy_stats([to_subbands(volume)], [volume[0, 0] > 0])
    assert stats["energy"]["LLL"] == pytest.approx(8.0 / 9.0, rel=1e-6)
    assert all(stats["energy"][b] == pytest.approx(0.0, abs=1e-12) for b in BAND_NAMES[1:])
    with pytest.raises(ValueError, match="no brain"):
        band_energy_stats([to_subbands(volume)], [torch.zeros(8, 8, 8)])


def _stats(energies):
    return {"energy": dict(zip(BAND_NAMES, energies))}


def test_shifts_from_energy_equalise_effective_snr():
    energies = [1.0, 0.1, 0.1, 0.01, 0.1, 0.01, 0.01, 0.001]
    shifts = shifts_from_energy(_stats(energies), reference="LLL", max_shift=10.0)
    assert shifts == pytest.approx([math.log(1 / e) for e in energies])
    # Equal effective log-SNR: log E_b + delta_b is the same for every band.
    assert [math.log(e) + d for e, d in zip(energies, shifts)] == pytest.approx([0.0] * 8, abs=1e-12)
    assert shifts_from_energy(_stats(energies), reference="LLL")[-1] == 4.0  # capped at max_shift
    assert sum(shifts_from_energy(_stats(energies), reference="geomean", max_shift=10)) == pytest.approx(0, abs=1e-12)
    assert shifts_from_energy(_stats(energies), kappa=0.0) == (0.0,) * 8
    grouped = shifts_from_energy(_stats(energies), groups=BAND_GROUPS, reference="LLL", max_shift=10)
    assert grouped[1] == grouped[2] == grouped[4] == pytest.approx(math.log(10))
    assert grouped[3] == grouped[5] == grouped[6] == pytest.approx(math.log(100))
    with pytest.raises(ValueError, match="reference"):
        shifts_from_energy(_stats(energies), reference="median")


# --------------------------------------------------------------------------- per-band schedules


@pytest.mark.parametrize("base_kind,steps", [("linear", 1000), ("linear", 10), ("cosine", 100)])
def test_zero_shifts_reduce_exactly_to_the_base_schedule(base_kind, steps):
    base = linear(steps, n_bands=8) if base_kind == "linear" else cosine(steps, n_bands=8)
    for shifts in ((), (0.0,) * 8):
        sched = build_schedule(DiffusionConfig(kind="fats", num_train_steps=steps, fats_base=base_kind,
                                               band_shifts=shifts))
        assert torch.equal(sched.alpha_bar, base.alpha_bar)
        assert torch.equal(sched.model_times, base.model_times)
    # a zero-shift band keeps the base row bit for bit even when other bands are shifted
    mixed = fats_schedule(DiffusionConfig(kind="fats", num_train_steps=steps, fats_base=base_kind,
                                          band_shifts=(0.0, 1.0, -1.0, 2.0, 0.0, 3.0, -2.0, 4.0)))
    assert torch.equal(mixed.alpha_bar[[0, 4]], base.alpha_bar[[0, 4]])
    assert not torch.equal(mixed.alpha_bar[1], base.alpha_bar[1])


@pytest.mark.parametrize("steps", [1000, 100, 10])
def test_shifted_bands_keep_the_endpoints_and_move_snr_the_right_way(steps):
    base = linear(steps, n_bands=1)
    shifts = (-4.0, -2.0, -0.5, 0.5, 1.0, 2.0, 3.0, 4.0)
    sched = fats_schedule(DiffusionConfig(kind="fats", num_train_steps=steps, band_shifts=shifts))
    # terminal SNR near zero and t = 0 near clean, for every band
    assert bool((sched.alpha_bar[:, -1] < 1e-3).all())
    torch.testing.assert_close(sched.alpha_bar[:, -1], base.alpha_bar[0, -1].expand(8), rtol=1e-12, atol=0)
    torch.testing.assert_close(sched.alpha_bar[:, 0], base.alpha_bar[0, 0].expand(8), rtol=1e-12, atol=0)
    # in the middle the log-SNR moves by about delta, in its direction
    mid = steps // 2
    moved = sched.log_snr[:, mid] - base.log_snr[0, mid]
    for d, m in zip(shifts, moved.tolist()):
        assert math.copysign(1, m) == math.copysign(1, d)
        assert 0.6 * abs(d) < abs(m) <= 1.05 * abs(d), (d, m)
    # larger shift -> higher SNR at every inner step
    assert bool((sched.log_snr[1:, 1:-1] > sched.log_snr[:-1, 1:-1]).all())


def test_shifts_are_capped_at_max_shift():
    base = linear(100, n_bands=1)
    capped = per_band_schedule(base, [10.0, -10.0], max_shift=4.0)
    torch.testing.assert_close(capped.alpha_bar, per_band_schedule(base, [4.0, -4.0]).alpha_bar, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="max_shift"):
        DiffusionConfig(kind="fats", band_shifts=(5.0,) * 8)
    with pytest.raises(ConfigError, match="fats_base"):
        DiffusionConfig(kind="fats", fats_base="sigmoid")
    cfg = DiffusionConfig(kind="fats", fats_base="cosine", band_shifts=(1.0,) * 8)
    assert DiffusionConfig.from_json(cfg.to_json()) == cfg


def test_ramped_shifts():
    shifts = (2.0, -4.0)
    assert ramped_shifts(shifts, 0, 100) == (0.0, -0.0)
    assert ramped_shifts(shifts, 25, 100) == (0.5, -1.0)
    assert ramped_shifts(shifts, 500, 100) == shifts
    assert ramped_shifts(shifts, 0, 0) == shifts


# --------------------------------------------------------------------------- learned timesteps

# Toy with a known answer: x0 ~ N(0, diag(v_b)) per band, so the optimal denoiser E[x0 | x_t] and
# the exact probability-flow (deterministic DDIM, infinitely many steps) map from x_T are closed
# form. The K-step sampler's error to that map depends on where the steps are; evenly spaced steps
# are far from the best.
VAR = torch.tensor([1.0, 0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 1e-4], dtype=torch.float64)


def _gaussian_denoiser(schedule):
    v = VAR.view(1, -1, 1, 1, 1)

    def denoiser(x_t, t):
        ab = append_dims(schedule.alpha_bar_at(t), x_t)
        return ab.sqrt() * v / (ab * v + 1 - ab) * x_t

    return denoiser


def _ode_cases(schedule, n=2):
    ab_T = schedule.alpha_bar[:, -1].view(1, -1, 1, 1, 1)
    v = VAR.view(1, -1, 1, 1, 1)
    cases = []
    for i in range(n):
        x_T = torch.randn(4, 8, 3, 3, 3, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        cases.append({"x_T": x_T, "x0": v.sqrt() / (ab_T * v + 1 - ab_T).sqrt() * x_T})
    return cases


def _error(denoiser, schedule, cases, steps):
    return sum(masked_mse(ddim_sample(denoiser, schedule, c["x_T"], steps), c["x0"], c) for c in cases) / len(cases)


def test_learned_timesteps_find_the_brute_force_optimum_of_a_toy():
    T, K = 40, 3
    schedule = fats_schedule(DiffusionConfig(kind="fats", num_train_steps=T, band_shifts=(-1, 1, 1, 2, 1, 2, 2, 3)))
    denoiser = _gaussian_denoiser(schedule)
    cases = _ode_cases(schedule)
    result = learn_timesteps(lambda case: denoiser, schedule, cases, K)
    steps = result["steps"]
    assert len(steps) == K and steps[0] == T - 1 and steps[-1] >= 0
    assert all(a > b for a, b in zip(steps, steps[1:]))
    # the reported error is the real sampler's error with those steps (prefix caching is exact)
    assert result["error"] == pytest.approx(_error(denoiser, schedule, cases, steps), rel=1e-9)
    assert result["uniform_steps"] == uniform_timesteps(T, K)
    assert result["uniform_error"] == pytest.approx(_error(denoiser, schedule, cases, uniform_timesteps(T, K)),
                                                   rel=1e-9)
    brute = min(_error(denoiser, schedule, cases, [T - 1, a, b])
                for a, b in itertools.combinations(range(T - 2, -1, -1), 2))
    assert result["error"] <= brute * (1 + 1e-9)
    assert result["error"] < 0.5 * result["uniform_error"]


def test_learned_timesteps_on_the_shared_1000_step_schedule_with_a_teacher():
    schedule = linear(1000)
    denoiser = _gaussian_denoiser(schedule)
    cases = [{"x0": torch.zeros(2, 8, 3, 3, 3, dtype=torch.float64)}]  # only its shape is used with a teacher
    teacher = uniform_timesteps(1000, 100)
    seen = []
    result = learn_timesteps(lambda case: denoiser, schedule, cases, 4, reference="teacher", teacher_steps=teacher,
                             callback=seen.append, seed=3)
    steps = result["steps"]
    assert len(steps) == 4 and steps[0] == 999 and steps[-1] >= 0
    assert all(a > b for a, b in zip(steps, steps[1:]))
    assert result["error"] < 0.5 * result["uniform_error"] and seen
    x_T = torch.randn(2, 8, 3, 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = ddim_sample(denoiser, schedule, x_T, teacher)
    assert result["error"] == pytest.approx(float(((ddim_sample(denoiser, schedule, x_T, steps) - ref) ** 2).mean()),
                                            rel=1e-9)
    assert learn_timesteps(lambda case: denoiser, schedule, cases, 1)["steps"] == [999]


def test_learned_timesteps_with_a_network_clip_and_mask(tiny_model_config):
    torch.manual_seed(0)
    model = build_model(tiny_model_config).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    shifts = (0.0, 1.0, 1.0, 2.0, 1.0, 2.0, 2.0, 3.0)
    schedule = fats_schedule(DiffusionConfig(kind="fats", num_train_steps=12, band_shifts=shifts))
    cases = [{"x0": to_subbands(torch.rand(1, 1, 8, 8, 8)), "cond": torch.rand(1, 24, 4, 4, 4),
              "mask": subband_mask(torch.rand(1, 8, 8, 8) > 0.5)}]
    result = learn_timesteps(lambda case: make_denoiser(model, schedule, case["cond"]), schedule, cases, 3,
                             clip=clip_in_image_space, grid=4, max_sweeps=1, rhos=(2.0,))
    assert result["steps"][0] == 11 and result["error"] <= result["uniform_error"] and result["nfe"] < 60
    with torch.no_grad():
        out = ddim_sample(make_denoiser(model, schedule, cases[0]["cond"]), schedule,
                          torch.randn(1, 8, 4, 4, 4, generator=torch.Generator().manual_seed(0)), result["steps"],
                          clip=clip_in_image_space)
    assert result["error"] == pytest.approx(masked_mse(out, cases[0]["x0"], cases[0]), rel=1e-5)


def test_power_timesteps_are_strictly_decreasing_from_the_last_step():
    for T, K, rho in [(1000, 10, 3.0), (12, 10, 3.0), (10, 10, 0.5), (5, 1, 2.0)]:
        steps = power_timesteps(T, K, rho)
        assert len(steps) == K and steps[0] == T - 1 and steps[-1] >= 0
        assert all(a > b for a, b in zip(steps, steps[1:]))
    assert power_timesteps(1000, 10, 1.0) == uniform_timesteps(1000, 10)


# --------------------------------------------------------------------------- shift refinement


def test_search_kappa_and_group_shift_refinement():
    result = search_kappa(lambda k: (k - 0.6) ** 2 if k != 0.25 else float("nan"))
    assert result["best_kappa"] == 0.5 and dict(map(tuple, result["errors"]))[0.25] == math.inf
    start = (0.0,) * 8
    # optimum: group offsets +1, -0.5, +0.25, 0 from the start
    target = [1.0, -0.5, -0.5, 0.25, -0.5, 0.25, 0.25, 0.0]
    refined = refine_group_shifts(lambda s: sum((a - b) ** 2 for a, b in zip(s, target)), start, max_evals=60)
    assert refined["shifts"] == pytest.approx(target) and refined["error"] == pytest.approx(0.0)
    assert refined["evals"] <= 60 and len(refined["history"]) == refined["evals"]


# --------------------------------------------------------------------------- checkpoint state


def test_fats_state_round_trip_keeps_shifts_and_timesteps():
    stats = band_energy_stats([torch.randn(8, 2, 2, 2)])
    shifts = (-1.5, 0.25, 0.25, 1.0, 0.25, 1.0, 1.0, 4.0)
    result = {"k": 4, "steps": [999, 400, 120, 7], "error": 0.01, "uniform_steps": [999, 666, 333, 0],
              "uniform_error": 0.02}
    state = FatsState(energy_stats=stats, band_shifts=shifts, kappa=0.75).with_learned({4: result, 2: (999, 300)}, 4)
    again = FatsState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert again == state
    assert again.band_shifts == shifts and again.kappa == 0.75 and again.energy_stats == stats
    assert again.learned_timesteps(4) == [999, 400, 120, 7] and again.learned_timesteps(2) == [999, 300]
    assert again.learned[4] == LearnedTimesteps((999, 400, 120, 7), 0.01, (999, 666, 333, 0), 0.02)
    assert again.default_nfe == 4 and again.learned_timesteps(3) is None
    buffer = io.BytesIO()
    torch.save(state.into_extra({"sample": {}}), buffer)
    buffer.seek(0)
    extra = torch.load(buffer, weights_only=True)
    assert set(extra) == {"sample", "fats"} and FatsState.from_extra(extra) == state
    assert FatsState.from_extra({"sample": {}}) is None
    assert FatsState().with_learned({2: (9, 4)}, default_nfe=4).default_nfe == 2  # 4 was not fitted
    with pytest.raises(ValueError, match="strictly decreasing"):
        FatsState().with_learned({3: [999, 999, 0]}, 3)
    with pytest.raises(ValueError, match="NFE=3 must be 3 indices"):
        FatsState(learned={3: LearnedTimesteps((999, 0))})
    with pytest.raises(ValueError, match="version"):
        FatsState.from_dict({**state.to_dict(), "version": 99})


# What the previous code wrote into checkpoint["extra"]["fats"] (fats_state_dict version 1, with the
# default budget "default_k" beside the state's keys), verbatim.
OLD_FATS_EXTRA = {
    "version": 1,
    "energy_stats": {"energy": {"LLL": 0.5}},
    "band_shifts": [-1.5, 0.25, 0.25, 1.0, 0.25, 1.0, 1.0, 4.0],
    "kappa": 1.0,
    "timesteps": {"4": {"steps": [999, 400, 120, 7], "error": 0.01, "uniform_steps": [999, 666, 333, 0],
                        "uniform_error": 0.02},
                  "2": {"steps": [999, 300], "error": 0.05, "uniform_steps": [999, 0], "uniform_error": 0.07}},
    "extra": {},
    "default_k": 4,
}


def test_a_version_1_fats_state_with_default_k_still_loads(caplog):
    with caplog.at_level("WARNING"):
        state = FatsState.from_extra({"fats": OLD_FATS_EXTRA, "sample": {"sampler": "ddim", "steps": 4}})
    assert "version 1" in caplog.text
    assert state.default_nfe == 4 and state.kappa == 1.0 and state.band_shifts[-1] == 4.0
    assert state.learned_timesteps(4) == [999, 400, 120, 7] and state.learned_timesteps(2) == [999, 300]
    assert state.learned[2].uniform_timesteps == (999, 0) and state.learned[2].uniform_error == 0.07
    assert state.energy_stats == {"energy": {"LLL": 0.5}}
    rewritten = state.to_dict()
    assert rewritten["version"] == 3 and "default_k" not in rewritten and "timesteps" not in rewritten
    assert FatsState.from_dict(rewritten) == state
    # before any step was learned, version 1 already stored default_k: no learned steps, no error
    early = FatsState.from_dict({**OLD_FATS_EXTRA, "timesteps": {}})
    assert early.default_nfe == 4 and early.learned == {}


# --------------------------------------------------------------------------- script


def _write_tiny_brats(root: Path, n_cases: int) -> None:
    """BraTS-layout cases on the 1/8-scale grid (30, 30, 19): a noisy ball of brain in zeros."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*(np.arange(s) for s in (30, 30, 19)), indexing="ij"))
    ball = ((grid - np.array([15, 15, 9]).reshape(3, 1, 1, 1)) ** 2).sum(0) < 64
    for i in range(n_cases):
        case = root / f"BraTS-TEST-{i:05d}-000"
        case.mkdir(parents=True)
        for modality in ("t1n", "t1c", "t2w", "t2f"):
            vol = (ball * (100 + 20 * rng.standard_normal(ball.shape))).astype(np.float32)
            nib.save(nib.Nifti1Image(vol, np.diag([8.0, 8.0, 8.0, 1.0])), case / f"{case.name}-{modality}.nii.gz")


def test_fats_stats_script_end_to_end(tmp_path):
    _write_tiny_brats(tmp_path / "training", 3)
    from guided_diffusion.commands import fats_stats as script
    out = tmp_path / "stats.json"
    with pytest.raises(SystemExit) as exit_info:
        script.cli.main_guard(lambda: script.main(["--data_dir", str(tmp_path / "training"), "--target", "t1c",
                                                   "--out", str(out), "--max_cases", "2", "--seed", "1"]))
    assert exit_info.value.code == 0
    stats = json.loads(out.read_text())
    assert stats["n_volumes"] == 2 and len(stats["case_ids"]) == 2 and stats["target_modality"] == "t1c"
    assert stats["energy"]["LLL"] > stats["energy"]["HHH"] > 0
    shifts = stats["shifts_kappa1_mean"]
    assert len(shifts) == 8 and shifts[-1] > 0 > shifts[0]


def test_fats_stats_reproduces_what_training_measured(tmp_path):
    """Same cases, seed and case budget: the command writes exactly the statistics that FATS training
    stores in its checkpoint (prepare_fats_schedule), key for key, float for float."""
    from guided_diffusion.bratsloader import BratsDataset
    from guided_diffusion.cli import find_cases
    from guided_diffusion.commands import fats_stats as script
    from guided_diffusion.fats_training import prepare_fats_schedule

    _write_tiny_brats(tmp_path / "training", 4)
    out = tmp_path / "stats.json"
    argv = ["--data_dir", str(tmp_path / "training"), "--target", "t2f", "--out", str(out), "--max_cases", "3",
            "--seed", "5"]
    assert script.main(argv) == 0
    written = json.loads(out.read_text())
    cases, _, geometry = find_cases(str(tmp_path / "training"), "train", check_data=False)
    _, _, extra = prepare_fats_schedule(DiffusionConfig(kind="fats"), BratsDataset(cases, geometry), "t2f", seed=5,
                                        max_cases=3)
    trained = FatsState.from_extra(json.loads(json.dumps(extra))).energy_stats
    reported = {key: value for key, value in written.items()
                if key not in ("data_dir", "network_shape", "shifts_kappa1_mean")}
    assert reported == trained
    assert trained["n_volumes"] == 3 and trained["seed"] == 5 and len(set(trained["case_ids"])) == 3
    # a different seed picks other cases, so the comparison above is not vacuous
    assert script.main([*argv[:-1], "6"]) == 0
    assert json.loads(out.read_text())["case_ids"] != trained["case_ids"]


def test_fats_fit_steps_stores_learned_timesteps_that_sampling_then_uses(tmp_path, tiny_model_config):
    """The command (fit_and_store_timesteps underneath) keeps the checkpoint's FATS state and adds the
    learned timesteps; the timestep policy then samples the default budget's learned steps."""
    from guided_diffusion.checkpoints import load_model, save_checkpoint
    from guided_diffusion.commands import fats_fit_steps
    from guided_diffusion.timesteps import plan_timesteps

    _write_tiny_brats(tmp_path / "held_out", 2)
    diffusion = DiffusionConfig(kind="fats", num_train_steps=20, band_shifts=(0.5,) * 8)
    torch.manual_seed(0)
    model = build_model(tiny_model_config)
    for p in model.parameters():  # break the zero init so the output depends on the input
        torch.nn.init.normal_(p, std=0.05)
    stored = FatsState(band_shifts=diffusion.band_shifts, kappa=0.5, default_nfe=2)
    source = save_checkpoint(tmp_path / "model.pt", {
        "model": model.state_dict(), "ema": None, "step": 7,
        "config": {"model": tiny_model_config.to_dict(), "diffusion": diffusion.to_dict()},
        "schedule": build_schedule(diffusion).state_dict(), "extra": stored.into_extra({"sample": {"nfe": 2}})})
    out = tmp_path / "with_steps.pt"
    assert fats_fit_steps.main(["--checkpoint", str(source), "--data_dir", str(tmp_path / "held_out"), "--target",
                                "t2f", "--nfe", "1", "2", "--default_nfe", "2", "--max_cases", "1", "--out",
                                str(out), "--device", "cpu"]) == 0
    loaded = load_model(out)
    state = loaded.fats_state
    assert loaded.step == 7 and loaded.extra["sample"] == {"nfe": 2}
    assert (state.band_shifts, state.kappa, state.default_nfe) == (stored.band_shifts, 0.5, 2)
    assert sorted(state.learned) == [1, 2] and state.learned_timesteps(1) == [19]
    learned_2 = state.learned_timesteps(2)
    assert learned_2[0] == 19 and state.learned[2].error <= state.learned[2].uniform_error
    assert plan_timesteps(loaded.schedule, state, 0) == (learned_2, "learned (NFE=2)")
    assert load_model(source).fats_state.learned == {}  # the source checkpoint is left alone


def test_a_v_predicting_fats_model_preconditions_each_band_with_its_rms(tmp_path):
    """FATS design step 4: sigma_data_b = sqrt(E_b), E_b the band's mean square inside the brain,
    recomputed here straight from the subbands of the cases the statistics used."""
    from DWT_IDWT import BAND_NAMES, to_subbands
    from guided_diffusion.bratsloader import BratsDataset
    from guided_diffusion.cli import find_cases
    from guided_diffusion.conditioning import split_case
    from guided_diffusion.fats import subband_mask
    from guided_diffusion.fats_training import prepare_fats_schedule

    _write_tiny_brats(tmp_path / "training", 3)
    cases, _, geometry = find_cases(str(tmp_path / "training"), "train", check_data=False)
    dataset = BratsDataset(cases, geometry)
    cfg, schedule, extra = prepare_fats_schedule(DiffusionConfig(kind="fats", prediction="v"), dataset, "t2f", seed=1,
                                                 max_cases=3)
    sums, counts = torch.zeros(8, dtype=torch.float64), 0
    for item in (dataset[i] for i in range(3)):
        bands = to_subbands(split_case(item["volumes"][None], "t2f")[0]).double()[0]
        mask = subband_mask(item["brain_mask"][None])[0, 0]
        sums += (bands ** 2)[:, mask].sum(dim=1)
        counts += int(mask.sum())
    expected = (sums / counts).sqrt()
    assert cfg.sigma_data == pytest.approx(expected.tolist(), rel=1e-5)
    torch.testing.assert_close(schedule.sigma_data, torch.tensor(cfg.sigma_data, dtype=torch.float64))
    assert len(set(cfg.sigma_data)) > 1  # the bands really differ: not one shared scale
    x0_cfg, x0_schedule, _ = prepare_fats_schedule(DiffusionConfig(kind="fats"), dataset, "t2f", seed=1, max_cases=3)
    assert x0_cfg.sigma_data == () and x0_schedule.sigma_data is None
    assert BAND_NAMES[0] == "LLL" and cfg.sigma_data[0] > cfg.sigma_data[-1]
