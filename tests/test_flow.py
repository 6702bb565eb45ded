"""Flow matching from the mean of the conditions (variant W, docs/flow_matching.md): the path, the
source, the Euler sampler, the trainer's flow objective, checkpoints and sample.py, on tiny CPU shapes."""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import replace

import pytest
import torch
from torch import nn

from DWT_IDWT import from_subbands, to_subbands
from fixtures_data import one_thread  # noqa: F401 (a fixture)
from fixtures_data import run_main
from guided_diffusion.checkpoints import CheckpointError, load_model
from guided_diffusion.cli import EXIT_OK, check_sampler
from guided_diffusion.commands import train
from guided_diffusion.config import ConfigError, DiffusionConfig, SampleConfig, TrainConfig
from guided_diffusion.factory import build_schedule
from guided_diffusion.flow import (FlowPath, cond_mean_source, euler_sample, flow_timesteps, interpolate,
                                   target_velocity)
from guided_diffusion.presets import TINY_MODEL, get_preset
from guided_diffusion.samplers import check_sampler_fits
from guided_diffusion.schedules import linear
from guided_diffusion.synthesis import synthesize_volumes
from guided_diffusion.timesteps import plan_timesteps
from guided_diffusion.train_util import Trainer
from test_run_sh import RUN_SH_VARIABLES, SEP, copy_run_sh, make_stub

pytestmark = pytest.mark.usefixtures("one_thread")


def test_interpolant_and_velocity_match_hand_computed_values():
    x_src = torch.tensor([[2.0, -1.0]]).view(1, 2, 1, 1, 1)
    x_1 = torch.tensor([[6.0, 3.0]]).view(1, 2, 1, 1, 1)
    # t = 0.25: 0.75 * 2 + 0.25 * 6 = 3; 0.75 * -1 + 0.25 * 3 = 0
    assert interpolate(x_src, x_1, torch.tensor([0.25])).flatten().tolist() == [3.0, 0.0]
    assert interpolate(x_src, x_1, torch.tensor([0.0])).flatten().tolist() == [2.0, -1.0]
    assert interpolate(x_src, x_1, torch.tensor([1.0])).flatten().tolist() == [6.0, 3.0]
    assert target_velocity(x_src, x_1).flatten().tolist() == [4.0, 4.0]


def test_time_grid_and_flow_timesteps():
    path = FlowPath(num_steps=1000)
    assert path.time_at(torch.tensor([999, 499, 0, -1])).tolist() == [0.0, 0.5, 0.999, 1.0]
    assert path.model_times[999].item() == 1000.0 and path.model_times[0].item() == 1.0
    assert flow_timesteps(path, 1) == [999]
    assert flow_timesteps(path, 2) == [999, 499]
    assert flow_timesteps(path, 4) == [999, 749, 499, 249]  # t = 0, 1/4, 1/2, 3/4
    assert plan_timesteps(path, None, 2) == ([999, 499], "uniform flow times (NFE=2)")
    assert plan_timesteps(FlowPath(num_steps=5), None, 0)[0] == [4, 3, 2, 1, 0]  # 0: every grid time
    for bad in (-1, 1001):
        with pytest.raises(ValueError, match="NFE"):
            plan_timesteps(path, None, bad)
    with pytest.raises(ValueError, match="warm start"):
        plan_timesteps(path, None, 2, warm_start_t=500)


def test_cond_mean_source_is_the_subbands_of_the_mean_condition_volume():
    """Oracle: Haar and the LLL scale are linear, so the band-wise mean of the three conditions'
    subbands is the subbands of their voxel-wise mean; the four-slot layout (target slot zero) agrees."""
    gen = torch.Generator().manual_seed(0)
    cond_volumes = torch.rand(2, 3, 4, 4, 6, generator=gen, dtype=torch.float64)
    expected = to_subbands(cond_volumes.mean(dim=1, keepdim=True))
    assert torch.allclose(cond_mean_source(to_subbands(cond_volumes)), expected, atol=1e-12)
    four_slots = torch.cat([cond_volumes[:, :1], torch.zeros_like(cond_volumes[:, :1]), cond_volumes[:, 1:]], dim=1)
    assert torch.allclose(cond_mean_source(to_subbands(four_slots)), expected, atol=1e-12)
    with pytest.raises(ValueError, match="slots"):
        cond_mean_source(torch.zeros(1, 16, 2, 2, 2))


def test_euler_reaches_the_target_on_the_exact_velocity_field():
    gen = torch.Generator().manual_seed(1)
    x_src, x_1 = (torch.randn(2, 8, 2, 2, 2, generator=gen, dtype=torch.float64) for _ in range(2))
    path = FlowPath(num_steps=1000)
    seen = []

    def exact_velocity(x, t):  # the stub network: the path's true (constant) velocity
        seen.append(int(t[0]))
        return x_1 - x_src

    for k in (1, 2, 4):
        seen.clear()
        states = []
        out = euler_sample(exact_velocity, path, x_src, flow_timesteps(path, k), callback=states.append)
        assert seen == flow_timesteps(path, k)
        assert torch.allclose(out, x_1, atol=1e-12)
        # every intermediate point lies on the path: x at t = (i + 1) / k
        for i, state in enumerate(states[:-1]):
            assert torch.allclose(state["x"], x_src + (i + 1) / k * (x_1 - x_src), atol=1e-12)


def test_euler_steps_on_a_linear_ode_match_the_hand_computed_product():
    """dx/dt = -x from x(0) = 1 with K = 2 Euler steps of h = 1/2: x(1) ~ (1 - 1/2)^2 = 0.25 (the exact
    solution would be e^-1: the sampler is plain Euler, not exact integration)."""
    x = torch.ones(1, 8, 1, 1, 1, dtype=torch.float64)
    out = euler_sample(lambda x_t, t: -x_t, FlowPath(num_steps=10), x, [9, 4])
    assert torch.allclose(out, torch.full_like(x, 0.25))
    out4 = euler_sample(lambda x_t, t: -x_t, FlowPath(num_steps=8), x, flow_timesteps(FlowPath(num_steps=8), 4))
    assert torch.allclose(out4, torch.full_like(x, 0.75 ** 4))


class ZeroVelocity(nn.Module):
    """A stand-in network predicting velocity 0: the flow stays at its source."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, net_input, time, **kwargs):
        return torch.zeros_like(net_input[:, :8]) + 0 * self.anchor


def _volumes(seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.4 + 0.2 * torch.rand(1, 4, 8, 8, 8, generator=gen)  # in (0.4, 0.6): the clamp never bites


def test_synthesis_starts_at_the_condition_mean_deterministic_and_noisy():
    volumes = _volumes()
    cfg = SampleConfig(sampler="euler", nfe=1, clip_denoised=False)
    path = FlowPath(num_steps=100)
    out = synthesize_volumes(ZeroVelocity(), path, volumes, "t1c", cfg, ["case"], flow_timesteps(path, 1))
    # oracle: the voxel-wise mean of the three conditioning volumes (t1n, t2w, t2f)
    assert torch.allclose(out[0], volumes[0, [0, 2, 3]].mean(0), atol=1e-6)
    again = synthesize_volumes(ZeroVelocity(), path, volumes, "t1c", replace(cfg, seed=7), ["case"], [99])
    assert torch.equal(out, again)  # the deterministic start ignores the seed
    noisy = FlowPath(num_steps=100, source_noise=0.05)
    a, b, c = (synthesize_volumes(ZeroVelocity(), noisy, volumes, "t1c", replace(cfg, seed=s), ["case"], [99])
               for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_noisy_start_has_the_configured_spread():
    cond = to_subbands(torch.rand(1, 3, 32, 32, 32, generator=torch.Generator().manual_seed(3)))
    noise = torch.randn(1, 8, 16, 16, 16, generator=torch.Generator().manual_seed(4))
    for sigma in (0.0, 0.3):
        offset = FlowPath(source_noise=sigma).start(cond, noise) - cond_mean_source(cond)
        assert offset.std().item() == pytest.approx(sigma, rel=0.03, abs=1e-7)  # 32768 draws: ~0.4 % error


def test_samplers_refuse_the_other_kind_of_model_and_configs_validate():
    path, schedule = FlowPath(), linear(10)
    check_sampler_fits("euler", path)
    check_sampler_fits("ddim", schedule)
    for name in ("ddpm", "ddim"):
        with pytest.raises(ValueError, match="does not fit a flow-matching model"):
            check_sampler_fits(name, path)
    with pytest.raises(ValueError, match="integrates a flow-matching model"):
        check_sampler_fits("euler", schedule)
    with pytest.raises(ValueError, match="does not fit"):
        synthesize_volumes(ZeroVelocity(), path, _volumes(), "t1c", SampleConfig(sampler="ddpm"), ["c"], [999])
    with pytest.raises(ConfigError, match="only used with kind 'flow'"):
        DiffusionConfig(kind="linear", source_noise=0.1)
    with pytest.raises(ConfigError, match="source_noise"):
        DiffusionConfig(kind="flow", source_noise=-0.1)
    with pytest.raises(ConfigError, match="flow_source"):
        DiffusionConfig(kind="flow", flow_source="zeros")
    built = build_schedule(DiffusionConfig(kind="flow", num_train_steps=50, source_noise=0.2))
    assert built == FlowPath(num_steps=50, source_noise=0.2)


def _tiny_trainer(tmp_path, dataset, **diffusion):
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), target_modality="t2f", lr=3e-3, batch_size=1, max_steps=40,
                      save_interval=40, log_interval=40, val_interval=0, image_interval=0, ema_rate=0.0,
                      num_workers=0)
    return Trainer(TINY_MODEL, DiffusionConfig(kind="flow", num_train_steps=20, **diffusion), cfg, dataset,
                   val_set=dataset)


def test_trainer_uses_the_velocity_loss_and_overfits_one_case(tmp_path):
    dataset = [{"volumes": torch.rand(4, 16, 16, 8, generator=torch.Generator().manual_seed(5))}]
    trainer = _tiny_trainer(tmp_path, dataset)
    # the validation loss at t index 0 (t = 1 - 1/20), computed by hand from the definitions
    volumes = dataset[0]["volumes"][None]
    x_1, cond = to_subbands(volumes[:, 3:]), to_subbands(volumes[:, :3])
    m = to_subbands(volumes[:, :3].mean(dim=1, keepdim=True))
    with torch.no_grad():
        losses = []
        for index in torch.linspace(0, 19, 4).round().long():
            t = 1.0 - (index.item() + 1) / 20
            x_t = (1 - t) * m + t * x_1
            pred = trainer.ema(torch.cat([x_t, cond], dim=1), torch.tensor([1000.0 * (1 - t)]))
            losses.append(((pred - (x_1 - m)) ** 2).mean().item())
    before = trainer.validation_loss()
    assert before == pytest.approx(sum(losses) / 4, rel=1e-5)
    for _ in range(40):
        trainer.train_step({"volumes": volumes})
    assert trainer.validation_loss() < 0.5 * before


def test_flow_preset_trains_saves_and_samples_through_the_scripts(tiny_demo_dir, tmp_path, monkeypatch):
    tiny = get_preset("tiny")
    flow_tiny = replace(tiny, diffusion=DiffusionConfig(kind="flow", num_train_steps=50, source_noise=0.1),
                        sample=SampleConfig(sampler="euler", nfe=2))
    monkeypatch.setattr(train, "get_preset", lambda name: flow_tiny)  # the demo_wfm recipe, tiny network
    run_dir = tmp_path / "run"
    assert run_main("train", ["--preset", "tiny", "--data_dir", tiny_demo_dir / "training", "--run_dir", run_dir,
                              "--target", "t2f", "--val_cases", 1, "--val_interval", 2, "--max_steps", 2,
                              "--cpu"]) == EXIT_OK
    loaded = load_model(run_dir / "t2f" / "best.pt")
    assert loaded.diffusion_config == flow_tiny.diffusion
    assert loaded.schedule == FlowPath(num_steps=50, source_noise=0.1)
    out_dir = tmp_path / "sampled"
    argv = ["--checkpoint", run_dir / "t2f" / "best.pt", "--data_dir", tiny_demo_dir / "pseudo_validation_gt",
            "--target", "t2f", "--device", "cpu"]
    assert run_main("sample", [*argv, "--out_dir", out_dir]) == EXIT_OK  # no flags: euler, 2 NFE from the checkpoint
    meta = json.loads((out_dir / "sample_config.json").read_text())
    assert meta["sample_config"]["sampler"] == "euler" and meta["timesteps"] == [49, 24] and meta["nfe"] == 2
    assert len(list(out_dir.glob("*/*-t2f.nii.gz"))) == 2
    assert run_main("sample", [*argv, "--out_dir", tmp_path / "one", "--nfe", "1"]) == EXIT_OK
    assert json.loads((tmp_path / "one" / "sample_config.json").read_text())["timesteps"] == [49]
    assert run_main("sample", [*argv, "--out_dir", tmp_path / "bad", "--sampler", "ddpm"]) != EXIT_OK
    assert not (tmp_path / "bad" / "sample_config.json").exists()
    with pytest.raises(CheckpointError, match=r"^flow\.pt: sampler 'ddim' does not fit a flow-matching model"):
        check_sampler(SampleConfig(sampler="ddim"), loaded, "flow.pt")  # what sample.py / sample_auto.py call


def test_presets():
    for name, sigma, nfe in (("wfm", 0.0, 1), ("demo_wfm", 0.0, 1), ("wfm_noisy", 0.5, 2), ("demo_wfm_noisy", 0.5, 2)):
        preset = get_preset(name)
        assert preset.diffusion.kind == "flow" and preset.diffusion.source_noise == sigma
        assert (preset.sample.sampler, preset.sample.nfe) == ("euler", nfe)
    assert get_preset("demo_wfm").model == get_preset("demo").model


def test_one_case_conditioning_serves_a_batch_of_ensemble_members():
    cond = to_subbands(torch.rand(1, 3, 4, 4, 4, generator=torch.Generator().manual_seed(6)))
    noise = torch.randn(3, 8, 2, 2, 2, generator=torch.Generator().manual_seed(7))
    for sigma in (0.0, 0.2):
        start = FlowPath(source_noise=sigma).start(cond, noise)
        assert start.shape == noise.shape
        assert torch.allclose(start, cond_mean_source(cond) + sigma * noise, atol=1e-7)


def test_run_sh_trains_demo_wfm_on_the_demo_data_and_scores_held_out_cases(tmp_path):
    """``bash run.sh --preset demo_wfm`` with no BraTS data: the flow preset is trained on the demo
    dataset and its held-out cases sampled (run.sh copied, a stub interpreter records the calls)."""
    run_sh, stub, log = copy_run_sh(tmp_path / "repo"), make_stub(tmp_path / "python"), tmp_path / "calls.log"
    case = tmp_path / "repo" / "demo_data" / "training" / "case1"
    case.mkdir(parents=True)
    (case / "case1-t1n.nii.gz").write_bytes(b"")  # the demo dataset exists (the stub would not make it)
    env = {k: v for k, v in os.environ.items() if k not in RUN_SH_VARIABLES}
    env.update(PYTHON=str(stub), STUB_LOG=str(log))
    result = subprocess.run(["bash", str(run_sh), "--preset", "demo_wfm", "--gpus", "0"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    calls = [line.split(SEP) for line in log.read_text().splitlines()]
    assert [c[0] for c in calls] == ["scripts/train.py", "scripts/sample.py"]
    train_call, sample_call = calls
    assert train_call[train_call.index("--preset") + 1] == "demo_wfm"
    assert train_call[train_call.index("--data_dir") + 1] == "demo_data/training"
    assert sample_call[sample_call.index("--checkpoint") + 1] == "runs/demo_wfm/t2f/best.pt"
    assert sample_call[sample_call.index("--held_out_of") + 1] == "runs/demo_wfm/t2f/run_config.json"
