"""Sampling throughput over processes: ``scripts/sample.py`` as users run it, by 1 process and by
torchrun with N processes (guided_diffusion.case_runner splits the cases), on the same cases.

Setup (not timed): the demo dataset at ``--size`` (run.sh's demo: 0.25, files (60, 60, 39)) with
``--cases`` held-out cases with ground truth, and a demo-preset checkpoint (one training step:
the weights' values do not change the cost).

Each configuration runs the whole command (``python scripts/sample.py ...`` or
``python -m torch.distributed.run --standalone --nproc_per_node N scripts/sample.py ...``) and
reports:
  wall_s                  the command's wall time (start-up, model loading, every case, the merge);
  cases_per_hour          cases * 3600 / wall_s (all processes together);
  cases_per_hour_per_process   that divided by the process count;
  synthesis_s_per_case    mean of metrics.json's per-case ``seconds`` (the synthesis only);
and ``same_bytes``: every configuration wrote the same files (SHA-256) as the first one. The
scaling is the cases per hour of each configuration over that of 1 process with 1 thread.
Threads per process: ``OMP_NUM_THREADS`` (torch's intra-op threads) as listed.

Run:
  python benchmarks/bench_sampling_scale.py                      # CPU: 1x1, 1x2 and 2x1 (processes x threads)
  python benchmarks/bench_sampling_scale.py --device cuda --configs 1x8 2x8   # one process per GPU
Results: benchmarks/results/local/sampling_scale.json (--update_results: the committed file), under the key "<device>/size<size>/nfe<nfe>".
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import add_output_arguments, merge_result, output_path  # noqa: E402
from guided_diffusion.bratsloader import Geometry  # noqa: E402
from guided_diffusion.demo_data import make_demo_dataset  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=float, default=0.25, help="demo dataset scale (0.25: run.sh's demo)")
    p.add_argument("--cases", type=int, default=8, help="held-out cases sampled by every configuration")
    p.add_argument("--nfe", type=int, default=4, help="network evaluations per case")
    p.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per process)")
    p.add_argument("--configs", nargs="+", default=["1x1", "1x2", "2x1"],
                   help="PROCESSESxTHREADS configurations; the first one is the reference for same_bytes")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo data")
    add_output_arguments(p, "sampling_scale.json")
    return p.parse_args(argv)


def _env(threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO_ROOT)}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _run(argv: list[str], threads: int) -> float:
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, env=_env(threads), timeout=3600)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"bench_sampling_scale.py: {' '.join(argv[:6])}... exited {result.returncode}:\n"
                           f"{result.stderr[-3000:]}")
    return seconds


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.nii.gz"))}


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        tmp = Path(tmp)
        make_demo_dataset(tmp / "data", geometry=Geometry.scaled(args.size), seed=args.seed, n_train=2, n_val=0,
                          n_pseudo=args.cases)
        _run([sys.executable, str(REPO_ROOT / "scripts" / "train.py"), "--preset", "demo", "--data_dir",
              str(tmp / "data" / "training"), "--run_dir", str(tmp / "run"), "--target", "t2f", "--max_steps", "1",
              "--val_cases", "0", "--cpu"], threads=1)
        sample = [str(REPO_ROOT / "scripts" / "sample.py"), "--checkpoint", str(tmp / "run" / "t2f" / "latest.pt"),
                  "--data_dir", str(tmp / "data" / "pseudo_validation_gt"), "--target", "t2f", "--nfe",
                  str(args.nfe), "--device", args.device]
        rows, reference = {}, None
        for config in args.configs:
            processes, threads = (int(x) for x in config.split("x"))
            out = tmp / f"out_{config}"
            launcher = [sys.executable] if processes == 1 else \
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
            wall = _run([*launcher, *sample, "--out_dir", str(out)], threads)
            cases = json.loads((out / "metrics.json").read_text())["cases"]
            files = _digest(out)
            reference = files if reference is None else reference
            rows[config] = {"processes": processes, "threads_per_process": threads, "cases": len(cases),
                            "wall_s": wall, "cases_per_hour": len(cases) * 3600 / wall,
                            "cases_per_hour_per_process": len(cases) * 3600 / wall / processes,
                            "synthesis_s_per_case": sum(c["seconds"] for c in cases) / len(cases),
                            "same_bytes": files == reference and len(files) == args.cases}
            print(f"{config}: {wall:.1f} s, {rows[config]['cases_per_hour']:.0f} cases/h "
                  f"({rows[config]['cases_per_hour_per_process']:.0f} per process), same bytes: "
                  f"{rows[config]['same_bytes']}")
    base = rows.get("1x1")
    if base:
        for row in rows.values():
            row["scaling_vs_1x1"] = row["cases_per_hour"] / base["cases_per_hour"]
    entry = {"size": args.size, "nfe": args.nfe, "device": args.device, "cases": args.cases,
             "includes": "the whole sample.py command: start-up, model loading, loading and writing every case, "
                         "metrics, the merged report", "configs": rows}
    path = merge_result(output_path(args, "sampling_scale.json"), f"{args.device}/size{args.size}/nfe{args.nfe}", entry)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
