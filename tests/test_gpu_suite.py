"""The GPU suite's code path on the CPU on tiny shapes (``--device cpu --quick``), so the script
that produces benchmarks/results/gpu_suite.json cannot rot between GPU sessions."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_suite_quick_on_cpu(tmp_path):
    out = tmp_path / "gpu_suite.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--device", "cpu", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["quick"] is True
    nfe = result["network_per_nfe"]
    for name in ("fp32", "bf16", "bf16_fp32_groupnorm", "bf16_compiled"):
        rec = nfe[name]
        assert "error" not in rec, (name, rec)
        assert rec["seconds_per_nfe"] > 0
    # the UNet compiles as one graph (fullgraph=True would raise on a graph break)
    assert nfe["bf16_compiled"]["backend"] == "eager"
    # fp32 is the reference itself; bf16 differs, but within bf16 accuracy of outputs of size ~1
    assert nfe["fp32"]["max_abs_diff_vs_fp32"] == 0.0
    assert 0.0 < nfe["bf16"]["max_abs_diff_vs_fp32"] < 0.1
    synth = result["synthesis"]
    for precision in ("fp32", "bf16"):
        rec = synth[precision]
        assert rec["k1_s"] > 0 and rec["k10_s"] > 0
        # the extrapolation is the line through the K = 1 and K = 10 measurements
        assert math.isclose(rec["fixed_s"] + 10 * rec["per_step_s"], rec["k10_s"], rel_tol=1e-9)
        assert math.isclose(rec["k1000_s_extrapolated"], rec["fixed_s"] + 1000 * rec["per_step_s"], rel_tol=1e-9)
    for mode in ("fp32", "bf16", "fp32_checkpointing", "bf16_checkpointing", "bf16_fp32_groupnorm"):
        assert result["train_step"][mode]["seconds_per_step"] > 0
    loader = result["loader"]
    assert loader["cases"] == 3
    assert min(loader["from_files_cases_per_s"], loader["from_cache_cases_per_s"], loader["cache_first_build_cases_per_s"]) > 0
    assert loader["cache_bytes_per_case"] > 0
    assert result["dwt"]["roundtrip_max_abs_err"] < 1e-5
    assert "skipped" in result["train_step"]["bf16_compiled"] and "skipped" in synth["bf16_compiled"]
    for sampler in ("ddim", "ddpm"):  # on the CPU nothing crosses a device boundary
        assert result["host_audit"][sampler]["copies_per_step"] == 0
