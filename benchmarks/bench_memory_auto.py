"""Memory of one ``sample_auto.py`` run over many cases: peak RSS at N cases and RSS after each case.

A long auto-mode run must keep its memory flat: nothing may accumulate per case (volumes, graphs,
figures, log records). For each case count N, this builds N demo cases with one modality missing
(``make_demo_dataset``; default grid 48 x 48 x 31, network grid 44 x 44 x 32), writes one untrained
checkpoint per modality (the ``tiny`` preset by default), and runs ``scripts/sample_auto.py`` in a
fresh process through its ``main_guard``. That process records its resident set size (``VmRSS``
from /proc/self/status) after every case it writes and its peak (``VmHWM``) at the end. Reported:
the peak at each N, the peak's growth from the smallest to the largest N, and the slope of RSS
over the cases of the largest run after the first two (which still allocate caches and pools),
by least squares.

glibc's malloc keeps freed memory of large blocks and moves its mmap threshold as it goes, which
makes RSS swing by tens of MiB from case to case without any leak. The child therefore runs with
``MALLOC_MMAP_THRESHOLD_=65536`` and ``MALLOC_TRIM_THRESHOLD_=0`` (unless set already): blocks of
64 KiB and more are mapped and unmapped directly, so RSS follows the memory actually held.

Run:
  python benchmarks/bench_memory_auto.py                        # 10 and 50 cases
  python benchmarks/bench_memory_auto.py --cases 10 50 --size 0.25 --preset demo
Writes benchmarks/results/local/memory_auto.json (--update_results: the committed file; --out).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from benchmarks.common import add_output_arguments, output_path, write_result  # noqa: E402

KIB = 1024
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}  # see the module docstring
WARMUP_CASES = 2  # cases excluded from the slope: the first ones still fill caches and allocator pools


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def make_inputs(work: Path, n_cases: int, size: float, preset_name: str) -> tuple[Path, Path]:
    """N auto-mode demo cases and one checkpoint per modality (``<model_dir>/<m>.pt``)."""
    import torch

    from guided_diffusion.bratsloader import Geometry
    from guided_diffusion.checkpoints import save_checkpoint
    from guided_diffusion.conditioning import MODALITIES
    from guided_diffusion.factory import build_model, build_schedule
    from guided_diffusion.demo_data import PSEUDO, make_demo_dataset
    from guided_diffusion.presets import get_preset

    make_demo_dataset(work / "data", geometry=Geometry.scaled(size), seed=0, n_train=0, n_val=0, n_pseudo=n_cases)
    preset = get_preset(preset_name)
    torch.manual_seed(0)
    state = build_model(preset.model).state_dict()
    for m in MODALITIES:
        train = {**preset.train.to_dict(), "target_modality": m}
        save_checkpoint(work / "models" / f"{m}.pt", {
            "model": state, "ema": state, "optimizer": None, "step": 0,
            "config": {"model": preset.model.to_dict(), "diffusion": preset.diffusion.to_dict(), "train": train},
            "schedule": build_schedule(preset.diffusion).state_dict(), "extra": {"sample": preset.sample.to_dict()}})
    return work / "data" / PSEUDO, work / "models"


def child(argv: list[str], report: Path) -> None:
    """Run sample_auto.py's main here, recording RSS after every case it writes."""
    from guided_diffusion.cli import main_guard
    from guided_diffusion.commands import sample_auto

    rss_after_case: list[int] = []
    save_volume = sample_auto.save_volume

    def save_and_measure(*args, **kwargs):
        out = save_volume(*args, **kwargs)
        rss_after_case.append(status_kib("VmRSS"))
        return out

    sample_auto.save_volume = save_and_measure
    start_rss = status_kib("VmRSS")
    code = None
    try:
        main_guard(lambda: sample_auto.main(argv))
    except SystemExit as done:
        code = done.code
    finally:
        report.write_text(json.dumps({"exit_code": code, "rss_before_main_kib": start_rss,
                                      "rss_after_case_kib": rss_after_case, "peak_rss_kib": status_kib("VmHWM")}))


def measure(case_counts: list[int], *, nfe: int, size: float, preset: str, threads: int,
            parallel: bool = False) -> list[dict]:
    """One fresh sample_auto.py process per case count (all at once with ``parallel``: each
    measures only its own memory)."""
    with tempfile.TemporaryDirectory(prefix="bench_memory_auto_") as tmp:
        jobs = []
        for n_cases in case_counts:
            work = Path(tmp) / str(n_cases)
            data, models = make_inputs(work, n_cases, size, preset)
            argv = ["--data_dir", str(data), "--model_dir", str(models), "--out_dir", str(work / "out"),
                    "--nfe", str(nfe), "--device", "cpu"]
            env = {**MALLOC_ENV, **os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO_ROOT)}
            cmd = [sys.executable, __file__, "--child", str(work / "report.json"), "--", *argv]
            jobs.append((n_cases, work, cmd, env))
        procs = {}
        for n_cases, work, cmd, env in jobs:
            procs[n_cases] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                              text=True, cwd=REPO_ROOT)
            if not parallel:
                procs[n_cases].wait()
        return [_collect(n_cases, work, procs[n_cases]) for n_cases, work, _, _ in jobs]


def _collect(n_cases: int, work: Path, proc: subprocess.Popen) -> dict:
    _, stderr = proc.communicate()
    report = work / "report.json"
    if not report.is_file():
        raise RuntimeError(f"sample_auto.py child failed:\n{stderr[-3000:]}")
    result = json.loads(report.read_text())
    written = len(list((work / "out").rglob("*.nii.gz")))
    per_case = result["rss_after_case_kib"]
    if result["exit_code"] != 0 or written != n_cases or len(per_case) != n_cases:
        raise RuntimeError(f"sample_auto.py wrote {written} of {n_cases} cases (exit {result['exit_code']}):\n"
                           f"{stderr[-3000:]}")
    return {"cases": n_cases, "peak_rss_mib": result["peak_rss_kib"] / KIB,
            "rss_before_main_mib": result["rss_before_main_kib"] / KIB,
            "rss_after_case_mib": [round(r / KIB, 2) for r in per_case],
            "rss_slope_kib_per_case": slope(per_case[WARMUP_CASES:])}


def slope(values: list[float]) -> float:
    """Least-squares slope of ``values`` against their index (0 for fewer than two values)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    return num / sum((i - mean_x) ** 2 for i in range(n))


DEFAULT_SIZE = 48 / 240  # files (48, 48, 31), network grid (44, 44, 32): divisible by the tiny model's 4


def run(case_counts: list[int], *, nfe: int = 2, size: float = DEFAULT_SIZE, preset: str = "tiny",
        threads: int = 1, parallel: bool = False) -> dict:
    runs = measure(sorted(case_counts), nfe=nfe, size=size, preset=preset, threads=threads, parallel=parallel)
    small, large = runs[0], runs[-1]
    return {"settings": {"case_counts": sorted(case_counts), "nfe": nfe, "size": size, "preset": preset,
                         "threads": threads, "warmup_cases_excluded_from_slope": WARMUP_CASES,
                         "malloc": {k: os.environ.get(k, v) for k, v in MALLOC_ENV.items()}},
            "runs": runs, "peak_growth_mib": large["peak_rss_mib"] - small["peak_rss_mib"],
            "peak_growth_mib_per_case": (large["peak_rss_mib"] - small["peak_rss_mib"])
            / max(large["cases"] - small["cases"], 1)}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[3:], Path(argv[1]))  # --child <report> -- <sample_auto args>
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, nargs="+", default=[10, 50], help="case counts, one run each")
    parser.add_argument("--nfe", type=int, default=2, help="network evaluations per case")
    parser.add_argument("--size", type=float, default=DEFAULT_SIZE, help="BraTS geometry scale of the demo cases")
    parser.add_argument("--preset", default="tiny", help="MODEL preset of the (untrained) checkpoints")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the sample_auto.py process")
    add_output_arguments(parser, "memory_auto.json")
    args = parser.parse_args(argv)
    result = run(args.cases, nfe=args.nfe, size=args.size, preset=args.preset, threads=args.threads)
    for r in result["runs"]:
        print(f"{r['cases']:4d} cases: peak RSS {r['peak_rss_mib']:.1f} MiB, RSS after the last case "
              f"{r['rss_after_case_mib'][-1]:.1f} MiB, slope {r['rss_slope_kib_per_case']:.1f} KiB/case")
    print(f"peak growth {result['peak_growth_mib']:.2f} MiB ({result['peak_growth_mib_per_case'] * KIB:.1f} KiB/case)")
    out = output_path(args, "memory_auto.json").resolve()
    write_result(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
