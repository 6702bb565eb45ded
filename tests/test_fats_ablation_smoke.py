"""Smoke run of the FATS ablation experiment (tiny data and model, a few training steps)."""
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments import fats_ablation  # noqa: E402

REQUIRED = {"variant", "train_schedule", "K", "nfe", "psnr", "ssim", "mse", "psnr_tumor", "ssim_tumor",
            "seconds_per_volume", "train_steps", "seed"}


def test_quick_ablation_writes_every_variant(tmp_path):
    assert fats_ablation.main(["--quick", "--out", str(tmp_path), "--threads", "1"]) == 0
    result = json.loads((tmp_path / "fats_ablation.json").read_text())
    records = result["records"]
    assert all(REQUIRED <= set(r) for r in records)
    variants = {r["variant"] for r in records}
    assert {"cwdm", "cwdm_ddim", "cwdm_respaced", "fast_direct", "fast_sampled", "fats", "fats_no_learned",
            "fats_no_shift", "regression"} <= variants
    nfe = {r["variant"]: r["nfe"] for r in records if r["variant"] in ("cwdm", "fast_sampled", "fast_direct")}
    assert nfe == {"cwdm": 1000, "fast_sampled": 11, "fast_direct": 10}  # NFE counted honestly
    assert len({r["train_steps"] for r in records}) == 1  # one training budget for every variant
    for k, entry in result["learned_timesteps"]["fats"].items():
        steps = entry["steps"]
        assert len(steps) == int(k) and steps[0] == 999 and all(a > b for a, b in zip(steps, steps[1:]))
        assert entry["error"] <= entry["uniform_error"] + 1e-12
    assert set(result["test_cases"]).isdisjoint(result["fit_cases"])
    assert (tmp_path / "fats_ablation_psnr_nfe.png").stat().st_size > 0
    assert (tmp_path / "fats_ablation_slices.png").stat().st_size > 0
