"""The performance options users switch on (issue 15): ``--compile`` for sampling and training,
``--cache_dir`` for training. Each must give the same numbers as the plain path; the compile tests
run torch.compile with the eager backend (same graph capture, no minutes of C++ compilation)."""
from __future__ import annotations

import pytest
import torch

from fixtures_data import one_thread  # noqa: F401 (a fixture)
from fixtures_data import random_model
from fixtures_data import run_main
from guided_diffusion.cli import EXIT_OK
from guided_diffusion.config import DiffusionConfig, SampleConfig, TrainConfig
from guided_diffusion.factory import build_schedule
from guided_diffusion.presets import TINY_MODEL
from guided_diffusion.synthesis import synthesize_volumes
from guided_diffusion.timesteps import uniform_timesteps
from guided_diffusion.train_util import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def eager_compile(monkeypatch):
    """torch.compile / nn.Module.compile with the eager backend and fullgraph=True (a graph break in
    the UNet fails), counting the calls."""
    calls = []
    real_compile, real_module_compile = torch.compile, torch.nn.Module.compile

    def compile_(model, **kwargs):
        if isinstance(model, torch.nn.Module):  # not Module.compile's own call on its _call_impl
            calls.append(model)
        return real_compile(model, backend="eager", fullgraph=True)

    def module_compile(self, *args, **kwargs):
        calls.append(self)
        return real_module_compile(self, backend="eager", fullgraph=True)

    monkeypatch.setattr(torch, "compile", compile_)
    monkeypatch.setattr(torch.nn.Module, "compile", module_compile)
    return calls


def test_sampling_with_compile_gives_the_same_synthesis_and_compiles_once(eager_compile):
    model = random_model()
    schedule = build_schedule(DiffusionConfig(kind="fast_sampled", fast_intervals=10))
    volumes = torch.rand(2, 4, 16, 16, 12, generator=torch.Generator().manual_seed(1))
    timesteps = uniform_timesteps(schedule.num_steps, 3)
    plain = synthesize_volumes(model, schedule, volumes, "t2f", SampleConfig(sampler="ddpm"), ["a", "b"], timesteps)
    cfg = SampleConfig(sampler="ddpm", compile=True)
    compiled = synthesize_volumes(model, schedule, volumes, "t2f", cfg, ["a", "b"], timesteps)
    again = synthesize_volumes(model, schedule, volumes, "t2f", cfg, ["a", "b"], timesteps)
    assert eager_compile == [model]  # compiled once for two calls of two cases each
    assert plain.abs().max() > 0
    assert torch.allclose(compiled, plain, atol=1e-6) and torch.equal(compiled, again)


class _Cases(torch.utils.data.Dataset):
    def __init__(self):
        self.volumes = torch.rand(2, 4, 16, 16, 12, generator=torch.Generator().manual_seed(2))

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return {"volumes": self.volumes[i], "case_id": f"c{i}"}


def test_training_with_compile_gives_the_same_step(eager_compile, tmp_path):
    batch = {"volumes": _Cases().volumes[:1], "case_id": ["c0"]}
    losses = {}
    for compile_ in (False, True):
        cfg = TrainConfig(run_dir=str(tmp_path / str(compile_)), compile=compile_, val_interval=0, image_interval=0,
                          num_workers=0, lr=1e-3)
        trainer = Trainer(TINY_MODEL, DiffusionConfig(kind="fast_sampled", fast_intervals=10), cfg, _Cases())
        losses[compile_] = [trainer.train_step(batch)["loss"].item() for _ in range(3)]
    assert len(eager_compile) == 1
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert losses[False][0] != losses[False][2]  # the steps did train


def test_train_command_cache_dir_builds_one_entry_per_case(tiny_demo_dir, tmp_path):
    cache = tmp_path / "cache"
    args = ["--preset", "tiny", "--data_dir", tiny_demo_dir / "training", "--val_cases", 1, "--val_interval", 2,
            "--cpu", "--target", "t2f", "--max_steps", 2]
    assert run_main("train", [*args, "--run_dir", tmp_path / "cached", "--cache_dir", cache]) == EXIT_OK
    assert run_main("train", [*args, "--run_dir", tmp_path / "plain"]) == EXIT_OK
    entries = sorted(p.name.split(".")[0] for p in cache.glob("*.npz"))
    cases = sorted(p.name for p in (tiny_demo_dir / "training").iterdir() if p.is_dir())
    assert entries == cases  # training and validation cases, one entry each
    cached = torch.load(tmp_path / "cached" / "t2f" / "latest.pt", weights_only=True)
    plain = torch.load(tmp_path / "plain" / "t2f" / "latest.pt", weights_only=True)
    for name, tensor in plain["model"].items():
        assert torch.equal(cached["model"][name], tensor), name  # the cache changes nothing
