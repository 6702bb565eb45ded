"""Time the project's 3D Haar DWT + IDWT against a dense-matrix implementation of the same transform.

The baseline is what cWDM does: build the per-axis analysis matrices (n x n) on every call and
apply them with matrix products. Run: ``python benchmarks/bench_dwt.py [--repeats 5]``.
Writes benchmarks/results/dwt.json.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import add_output_arguments, median_seconds, output_path, write_result  # noqa: E402
from DWT_IDWT import dwt3, idwt3  # noqa: E402


def haar_halves(n: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (n/2, n) low-pass and high-pass analysis matrices of one axis (built on every call, as cWDM does)."""
    low = torch.zeros(n // 2, n, dtype=dtype)
    high = torch.zeros(n // 2, n, dtype=dtype)
    r = torch.arange(n // 2)
    low[r, 2 * r] = low[r, 2 * r + 1] = high[r, 2 * r] = 1 / math.sqrt(2)
    high[r, 2 * r + 1] = -1 / math.sqrt(2)
    return low.to(device), high.to(device)


def _apply(matrix: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """Multiply ``matrix`` (m, n) into spatial ``axis`` (2, 3 or 4) of x."""
    return torch.movedim(torch.tensordot(matrix, torch.movedim(x, axis, 0), dims=1), 0, axis)


def dense_dwt(x: torch.Tensor) -> list[torch.Tensor]:
    """cWDM-style DWT: per-axis dense matrices, one product per partial band (2 + 4 + 8)."""
    bands = [x]
    for axis in (2, 3, 4):
        low, high = haar_halves(x.shape[axis], x.dtype, x.device)
        bands = [_apply(m, b, axis) for b in bands for m in (low, high)]
    return bands


def dense_idwt(bands: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`dense_dwt` with the transposed matrices."""
    for axis in (4, 3, 2):
        low, high = haar_halves(2 * bands[0].shape[axis], bands[0].dtype, bands[0].device)
        bands = [_apply(low.T, lo, axis) + _apply(high.T, hi, axis) for lo, hi in zip(bands[0::2], bands[1::2])]
    return bands[0]


def dense_dwt_idwt(x: torch.Tensor) -> torch.Tensor:
    return dense_idwt(dense_dwt(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, nargs=5, default=[1, 1, 224, 224, 160], help="input shape B C D H W")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (median reported)")
    add_output_arguments(parser, "dwt.json")
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = {}
    for device in devices:
        x = torch.rand(args.shape, device=device, generator=torch.Generator(device).manual_seed(0))
        with torch.no_grad():
            err = (idwt3(dwt3(x)) - x).abs().max().item()
            err_dense = (dense_dwt_idwt(x) - x).abs().max().item()
            ours, ours_all = median_seconds(lambda: idwt3(dwt3(x)), args.repeats)
            dense, dense_all = median_seconds(lambda: dense_dwt_idwt(x), args.repeats)
        results[device] = {
            "shape": args.shape, "dtype": "float32", "repeats": args.repeats,
            "project_dwt_idwt_median_s": ours, "dense_matrix_dwt_idwt_median_s": dense,
            "speedup_vs_dense": dense / ours, "project_round_trip_max_abs_error": err,
            "dense_round_trip_max_abs_error": err_dense, "project_times_s": ours_all, "dense_times_s": dense_all,
        }
        print(f"{device}: project {ours * 1e3:.1f} ms, dense {dense * 1e3:.1f} ms, speed-up {dense / ours:.1f}x")
    path = write_result(output_path(args, "dwt.json").resolve(), {"results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
