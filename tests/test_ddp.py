"""Distributed training on the CPU: scripts/train.py under torchrun with 2 gloo processes ends with
the same weights on both ranks (gradients are averaged; each rank draws its own batch and noise)."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from fixtures_data import REPO_ROOT
from guided_diffusion.factory import build_model
from guided_diffusion.presets import get_preset
from guided_diffusion.seeding import derive_seed

STEPS = 2


def test_two_gloo_processes_end_with_identical_weights(tiny_demo_dir, tmp_path):
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(REPO_ROOT / "tests" / "ddp_worker.py"), "--preset", "tiny", "--data_dir",
            str(tiny_demo_dir / "training"), "--run_dir", str(run_dir), "--target", "t2f", "--max_steps", str(STEPS),
            "--val_cases", "0", "--cpu"]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]

    ranks = [torch.load(run_dir / "t2f" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world"] for r in ranks} == {2}
    assert {r["backend"] for r in ranks} == {"gloo"} and {r["step"] for r in ranks} == {STEPS}
    for key in ("model", "ema"):
        for name, tensor in ranks[0][key].items():
            assert torch.equal(tensor, ranks[1][key][name]), f"{key}.{name} differs between ranks"

    latest = torch.load(run_dir / "t2f" / "latest.pt", weights_only=True)  # written by rank 0 only
    assert latest["step"] == STEPS
    assert all(torch.equal(v, latest["model"][k]) for k, v in ranks[0]["model"].items())

    preset = get_preset("tiny")  # the weights moved away from the (shared) initial ones
    torch.manual_seed(derive_seed(preset.train.seed, 0))
    initial = build_model(preset.model).state_dict()
    assert not all(torch.equal(v, initial[k]) for k, v in ranks[0]["model"].items())
