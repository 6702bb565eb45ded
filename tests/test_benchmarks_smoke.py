"""Smoke tests of the benchmarks: tiny config, one repeat, results into a temporary folder."""
import json

import pytest

from benchmarks import bench_sampling, bench_train_step
from guided_diffusion import synthesis
from guided_diffusion.train_util import Trainer


def _load(path, key):
    data = json.loads(path.read_text())
    assert {"command", "machine", "results"} <= set(data)
    return data["results"][key]


def test_train_step_benchmark_writes_modes_with_ratios(tmp_path):
    out = tmp_path / "train_step.json"
    bench_train_step.main(["--config", "tiny", "--device", "cpu", "--modes", "fp32", "checkpoint",
                           "--repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(out)])
    entry = _load(out, "tiny/cpu")
    assert entry["isolated_processes"] and entry["parameters"] > 0
    assert entry["network_input_shape"] == [1, 32, 8, 8, 8]
    for mode in ("fp32", "checkpoint"):
        m = entry["modes"][mode]
        assert not m["skipped"], m
        assert m["median_s"] > 0 and m["peak_memory_bytes"] > 0 and len(m["times_s"]) == 1
        assert m["speedup_vs_fp32"] > 0 and m["memory_ratio_vs_fp32"] > 0
    assert entry["modes"]["fp32"]["speedup_vs_fp32"] == pytest.approx(1.0)


def test_sampling_benchmark_measures_and_extrapolates(tmp_path):
    out = tmp_path / "sampling.json"
    bench_sampling.main(["--config", "tiny", "--device", "cpu", "--k", "1", "2", "10", "--max_measured_k", "2",
                         "--repeats", "1", "--warmup", "0", "--threads", "1", "--no-isolate", "--out", str(out)])
    entry = _load(out, "tiny/cpu")
    assert entry["measured_k"] == [1, 2] and entry["extrapolated_k"] == [10]
    for precision in ("fp32", "bf16"):
        rows = {r["k"]: r for r in entry["precisions"][precision]["by_k"]}
        for k in (1, 2):
            assert not rows[k]["extrapolated"] and rows[k]["nfe"] == k
            assert rows[k]["seconds_per_volume"] > 0 and rows[k]["network_seconds"] > 0
            assert 0 <= rows[k]["outside_network_fraction"] < 1 and rows[k]["nifti_write_seconds"] > 0
            assert rows[k]["peak_memory_bytes"] >= 0
        assert rows[10]["extrapolated"] and rows[10]["nfe"] == 10
        assert rows[10]["seconds_per_volume"] > 0
    assert entry["precisions"]["bf16"]["by_k"][0]["speedup_vs_fp32"] > 0
    audit = entry["constant_work_per_step"]
    assert audit["conditioning_subbands_computed_once"]
    assert audit["conditioning_volume_ops_per_step"] == 0
    assert audit["conditioning_subband_reads_per_step"] >= 1  # the torch.cat building the network input
    assert audit["ddim_device_to_host_copies_per_step"] == 0
    assert audit["ddim_host_to_device_copies_per_step"] >= 0


def test_extrapolation_uses_fixed_cost_plus_per_step_time():
    runs = [{"fixed_s": 1.0, "loop_s": 2.0, "network_s": 1.5, "nfe": 10}] * 3
    measured = [{"k": 10}]
    row = bench_sampling._extrapolate(1000, measured, runs)
    assert row["extrapolated"] and row["nfe"] == 1000
    assert row["seconds_per_volume"] == pytest.approx(1.0 + 0.2 * 1000)
    assert row["network_seconds"] == pytest.approx(0.15 * 1000)


def test_benchmarks_time_the_trainer_and_the_synthesis_users_run(tmp_path, monkeypatch):
    """In-process runs: every timed call goes through Trainer.train_step / synthesize_volumes."""
    calls = {"train_step": 0, "synthesize_volumes": 0}
    train_step, synthesize_volumes = Trainer.train_step, synthesis.synthesize_volumes
    assert bench_sampling.synthesize_volumes is synthesize_volumes

    def counted_train_step(self, batch):
        calls["train_step"] += 1
        return train_step(self, batch)

    def counted_synthesize_volumes(*args, **kwargs):
        calls["synthesize_volumes"] += 1
        return synthesize_volumes(*args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", counted_train_step)
    monkeypatch.setattr(bench_sampling, "synthesize_volumes", counted_synthesize_volumes)
    bench_train_step.main(["--config", "tiny", "--device", "cpu", "--modes", "bf16", "--repeats", "2", "--warmup",
                           "1", "--threads", "1", "--no-isolate", "--out", str(tmp_path / "train.json")])
    assert calls["train_step"] == 2 * (1 + 2)  # fp32 and bf16, warm-up + repeats
    entry = bench_sampling.main(["--config", "tiny", "--device", "cpu", "--k", "3", "--precisions", "fp32",
                                 "--repeats", "2", "--warmup", "0", "--threads", "1", "--no-isolate", "--no-audit",
                                 "--out", str(tmp_path / "sampling.json")])
    assert calls["synthesize_volumes"] == 2
    row = entry["precisions"]["fp32"]["by_k"][0]
    assert row["nfe"] == 3 and 0 < row["loop_seconds"] < row["seconds_per_volume"]
    assert row["nifti_write_seconds"] <= row["fixed_per_volume_seconds"]
