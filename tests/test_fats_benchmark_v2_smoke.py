"""Benchmark v2 driver (benchmarks/fats_benchmark_v2.py): the --quick run end to end, its JSON
schema and the behaviour of the scores on the toy cases; the decision helpers on hand-made inputs."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import fats_benchmark_v2 as bv2  # noqa: E402

REQUIRED = {"variant", "train_schedule", "K", "nfe", "seed", "target", "psnr", "ssim", "psnr_ensemble", "ssim_ensemble",
            "crps_brain", "crps_tumor", "spread_skill_tumor", "band_energy_ratio", "spread_skill_bands",
            "rapsd_distance", "oracle_mean_distance", "seconds_per_volume", "train_steps", "teacher_distance",
            "msssim_diversity"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bv2")
    out = root / "out"
    assert bv2.main(["--quick", "--work_dir", str(root / "work"), "--out", str(out), "--threads", "2",
                     "--variants", "R", "C", "F", "S", "W", "P"]) == 0
    return root, out, json.loads((out / "fats_v2.json").read_text())


@pytest.mark.slow
def test_quick_run_schema(quick_run):
    root, out, result = quick_run
    records = result["records"]
    assert records and all(REQUIRED <= set(r) for r in records)
    for r in records + [result["oracle"], result["oracle_mean"]]:
        assert len(r["band_energy_ratio"]) == 8 and len(r["spread_skill_bands"]) == 8
    labels = {r["variant"] for r in records}
    assert {"R", "C_ddpm", "C_teacher_ddim", "C_ddim", "F", "F_ddim", "S", "W_mean", "W_noisy", "P_F", "P_C"} <= labels
    nfe = {(r["variant"], r["nfe"]) for r in records}
    assert ("R", 1) in nfe and ("F", 11) in nfe and ("W_mean", 1) in nfe  # NFE counted from the plans
    assert all(r["nfe"] == len(r["timesteps"]) for r in records)
    assert all(r["timesteps"][0] == 10 for r in records if r["variant"] == "P_F")  # the regression evaluation first
    assert len({r["train_steps"] for r in records}) == 1  # one training budget
    assert all(r["teacher_distance"] is not None for r in records if r["variant"] == "C_ddim")
    gate = result["gate"][0]
    assert gate["variant"] == "C_ddpm" and gate["passed"] == (gate["spread_skill_tumor"] >= 0.5)
    boot = {b["comparison"]: b for b in result["bootstrap"]}
    assert {"best FATS vs F_equal_nfe", "best FATS vs R", "best FATS vs P_no_more_nfe", "best FATS vs W_no_more_nfe"} \
        == set(boot)
    for b in boot.values():
        assert b["n_cases"] == 2 and b["ci_low"] <= b["mean_difference"] <= b["ci_high"]
    floors = result["floors"][0]
    assert floors["floor_mse_brain"] == result["oracle_mean"]["mse_ensemble"]
    assert result["skipped"] == []  # every model these variants need is in the checkout
    assert json.loads((out / "fats_v2_config.json").read_text())["args"]["quick"] is True
    for png in ("fats_v2_crps_nfe.png", "fats_v2_slices.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_run_metrics_behave(quick_run):
    _, _, result = quick_run
    oracle, mean = result["oracle"], result["oracle_mean"]
    # Oracle draws scored against other draws of the same distribution: spread-skill and band energy
    # ratios are ratios of two independent estimates of one quantity. With M = 4 draws against 2 on
    # each of 2 cases the ratio's sampling spread is large (an F(3, 1)-like ratio per voxel, averaged
    # over ~10^4 correlated voxels), so only a wide band is a fair check: 0.5 .. 2 (a regressor is 0).
    assert 0.5 < oracle["spread_skill_tumor"] < 2.0
    assert all(0.5 < v < 2.0 for v in oracle["band_energy_ratio"])
    assert all(0.5 < v < 2.0 for v in oracle["spread_skill_bands"])
    # The oracle mean (one deterministic output, passed twice): zero spread exactly, CRPS = MAE > 0.
    assert mean["spread_skill_tumor"] == 0.0 and all(v == 0.0 for v in mean["spread_skill_bands"])
    assert mean["crps_tumor"] > 0
    # W with the deterministic start: M samples are identical, so its spread-skill is exactly 0.
    for r in result["records"]:
        if r["variant"] == "W_mean":
            assert r["spread_skill_tumor"] == 0.0 and r["msssim_diversity"] in (0.0, None)


def test_refuses_non_empty_work_dir(tmp_path):
    (tmp_path / "something").write_text("x")
    with pytest.raises(SystemExit, match="not empty"):
        bv2.main(["--quick", "--work_dir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_paired_bootstrap_against_hand_computed_values():
    # Constant differences: every resample has the same mean, so the interval is that point.
    same = bv2.paired_bootstrap([1.0, 2.0, 3.0], [0.5, 1.5, 2.5], 500, seed=0)
    assert same["mean_difference"] == pytest.approx(0.5) and same["ci_low"] == same["ci_high"] == pytest.approx(0.5)
    assert same["excludes_zero"] is True
    # Differences +1 and -1 on 2 cases: resampled means are -1, 0 or +1 (with probability 1/4, 1/2, 1/4),
    # so the 95% percentile interval is [-1, 1] and contains 0.
    mixed = bv2.paired_bootstrap([2.0, 0.0], [1.0, 1.0], 2000, seed=0)
    assert mixed["mean_difference"] == 0.0 and mixed["ci_low"] == -1.0 and mixed["ci_high"] == 1.0
    assert mixed["excludes_zero"] is False
    # Pairs with a missing value (a case without tumour) are left out, not compared.
    assert bv2.paired_bootstrap([1.0, None], [0.0, 5.0], 100, seed=0)["n_cases"] == 1


def test_gate_and_primary_comparisons_on_hand_made_records():
    def rec(label, family, nfe, crps, spread=None):
        return {"variant": label, "family": family, "nfe": nfe, "seed": 0, "crps_tumor": crps, "cases": ["a", "b"],
                "spread_skill_tumor": spread, "per_case": {"crps_tumor": [crps - 0.01, crps + 0.01]}}

    records = [rec("C_ddpm", "C", 1000, 0.2, spread=0.49), rec("S", "S", 4, 0.10), rec("S", "S", 10, 0.01),
               rec("F_ddim", "F", 4, 0.12), rec("F_ddim", "F", 2, 0.05), rec("R", "R", 1, 0.11),
               rec("P_F", "P", 3, 0.13), rec("P_F", "P", 5, 0.01), rec("W_mean", "W", 1, 0.2)]
    gate = bv2.gate_record(records, 0)
    assert gate["passed"] is False and gate["spread_skill_tumor"] == 0.49  # 0.49 < 0.5
    rows = {b["comparison"]: b for b in bv2.bootstrap_records(records, 0, 200)}
    # Best FATS at K <= 4 is S at 4 (S at 10 is outside the primary budget).
    assert all(b["a"] == {"variant": "S", "nfe": 4, "crps_tumor": 0.10} for b in rows.values())
    assert rows["best FATS vs F_equal_nfe"]["b"]["nfe"] == 4  # equal NFE, not F's better K = 2
    assert rows["best FATS vs P_no_more_nfe"]["b"]["nfe"] == 3  # P at 5 NFE spends more
    assert rows["best FATS vs R"]["mean_difference"] == pytest.approx(-0.01)
    assert np.isclose(rows["best FATS vs W_no_more_nfe"]["mean_difference"], -0.1)
