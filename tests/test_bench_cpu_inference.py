"""Smoke run of benchmarks/bench_cpu_inference.py on a tiny model: the record schema the issue asks
for, and the baseline is itself at 1x."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_cpu_inference_quick(tmp_path):
    out = tmp_path / "cpu_inference.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_cpu_inference.py"), "--quick", "--rounds", "1",
                           "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["variant"]: r for r in json.loads(out.read_text())["records"]}
    # openvino_bf16 appears only where the optional openvino package is installed
    assert set(records) - {"openvino_bf16"} == {"eager_bf16_fp32_groupnorm", "eager_bf16", "compiled_bf16",
                                                "channels_last_bf16"}
    for rec in records.values():
        for key in ("dtype", "seconds_per_nfe", "speedup_vs_eager_bf16", "max_abs_diff_vs_eager",
                    "seconds_per_volume_default_budget"):
            assert key in rec
        assert rec["seconds_per_volume_default_budget"] == 4 * rec["seconds_per_nfe"]
    assert records["eager_bf16_fp32_groupnorm"]["speedup_vs_eager_bf16"] == 1.0
    assert records["eager_bf16"]["max_abs_diff_vs_eager"] == 0.0
    assert records["compiled_bf16"]["max_abs_diff_vs_eager"] < 0.1  # bf16 rounding, not a different function
    assert records["compiled_bf16"]["first_call_s"] > 0
