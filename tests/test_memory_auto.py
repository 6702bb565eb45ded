"""Load: sample_auto.py keeps its memory flat over many cases (a small version of
benchmarks/bench_memory_auto.py: 5 and 15 tiny cases, each run in a fresh process)."""
from __future__ import annotations

import sys

import pytest

if sys.platform != "linux":
    pytest.skip("reads /proc/self/status", allow_module_level=True)

from benchmarks import bench_memory_auto  # noqa: E402

# Bounds, on the benchmark's default grid (files 48 x 48 x 31, network grid 44 x 44 x 32, glibc's
# malloc told to return large blocks at once). Keeping one case's data alive per case (four
# float32 volumes of 248 KiB, the brain mask, the float64 voxels read from disk) would add about
# 1.5 MiB per case, 15 MiB over the 10 extra cases; keeping only the synthesis, 248 KiB per case.
# Allowed: 6 MiB of peak growth from 5 to 15 cases (measured 1.0 MiB) and 300 KiB/case of RSS
# slope over the 13 cases after the warm-up (measured 80-120 KiB/case: a 0.5 MiB step of the
# allocator lands somewhere in the run).
MAX_PEAK_GROWTH_MIB = 6.0
MAX_SLOPE_KIB_PER_CASE = 300.0


@pytest.mark.slow
def test_sample_auto_memory_stays_flat_from_5_to_15_cases(tmp_path):
    result = bench_memory_auto.run([5, 15], parallel=True)  # two processes, each measures itself
    small, large = result["runs"]
    assert (small["cases"], large["cases"]) == (5, 15)
    assert len(large["rss_after_case_mib"]) == 15
    assert result["peak_growth_mib"] < MAX_PEAK_GROWTH_MIB, result
    assert large["rss_slope_kib_per_case"] < MAX_SLOPE_KIB_PER_CASE, large
