"""Smoke run of benchmarks/bench_cpu_inference.py on a tiny model: the record schema the issue asks
for, the baseline at 1x, and each variant computing the same function (bf16 rounding apart)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_cpu_inference_quick(tmp_path):
    out = tmp_path / "cpu_inference.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_cpu_inference.py"), "--quick", "--rounds", "1",
                           "--threads", "1", "--volume", "pytorch,openvino", "--out", str(out)],
                          capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    records = {r["variant"]: r for r in result["records"]}
    has_openvino = importlib.util.find_spec("openvino") is not None
    assert set(records) == {"eager_bf16", "channels_last_bf16", *(["openvino_bf16"] if has_openvino else [])}
    assert ("openvino_bf16" in result["skipped"]) != has_openvino
    for rec in records.values():
        for key in ("dtype", "seconds_per_nfe", "speedup_vs_eager_bf16", "max_abs_diff_vs_eager",
                    "seconds_per_volume_default_budget", "first_call_s", "max_abs_diff_vs_fp32"):
            assert key in rec
        assert rec["seconds_per_volume_default_budget"] == 4 * rec["seconds_per_nfe"]
        assert rec["max_abs_diff_vs_eager"] < 0.1  # bf16 rounding, not a different function
    assert records["eager_bf16"]["speedup_vs_eager_bf16"] == 1.0
    assert records["eager_bf16"]["max_abs_diff_vs_eager"] == 0.0
    assert 0 < records["eager_bf16"]["max_abs_diff_vs_fp32"] < 0.1
    assert records["eager_bf16"]["seconds_per_volume_measured"] > 0
    if has_openvino:
        assert records["openvino_bf16"]["convert_s"] > 0 and records["openvino_bf16"]["first_call_cached_s"] > 0
        assert records["openvino_bf16"]["seconds_per_volume_measured"] > 0
