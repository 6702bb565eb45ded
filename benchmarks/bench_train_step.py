"""Seconds per training step and peak memory of ``Trainer.train_step``, per mode.

One step is exactly what training runs: ``Trainer.train_step`` on one in-memory case (DWT of a
random 4-modality case into target and conditioning subbands, the step's seeded t and noise,
the x0 loss through the denoiser, backward, gradient clipping, AdamW, EMA update). No data
loading. The Trainer is built from the benchmark preset's model config, the linear schedule and
``TrainConfig`` defaults (batch size 1, target t2f).

Modes (each timed against ``fp32`` in the same run), all chosen through the configs users set:
  fp32        ``TrainConfig(precision="fp32")`` (on CUDA, cuDNN convolutions use TF32 as PyTorch
              does by default)
  bf16        ``TrainConfig(precision="bf16")``: the denoiser's bf16 autocast
  checkpoint  ``ModelConfig(use_checkpoint=True)``: activation checkpointing of every residual block

Peak memory: see benchmarks/common.py; each mode runs in a fresh worker process
(``--no-isolate`` runs in-process) and counts from before the Trainer is built.

Run:
  python benchmarks/bench_train_step.py --config demo --device cpu --repeats 5 --rounds 2
  python benchmarks/bench_train_step.py --config full --device cuda --repeats 10
Results are merged into benchmarks/results/train_step.json under the key "<config>/<device>".
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    GIB, PeakMemory, benchmark_parser, command_line, default_cpu_memory_limit, machine, preset, proc_status_bytes,
    run_isolated, save_entry, setup_worker, skip_reason, time_calls, warm_runtime,
)
from guided_diffusion.config import DiffusionConfig, ModelConfig, TrainConfig  # noqa: E402
from guided_diffusion.factory import build_model  # noqa: E402
from guided_diffusion.train_util import DistInfo, Trainer  # noqa: E402

MODES = ("fp32", "bf16", "checkpoint")
TARGET_MODALITY = "t2f"


def make_trainer(cfg: ModelConfig, shape: tuple[int, int, int], device: torch.device, mode: str, run_dir: str,
                 seed: int = 0) -> tuple[Trainer, dict]:
    """A Trainer for ``mode`` and one seeded random case as a batch {"volumes": (1, 4, X, Y, Z)}."""
    if mode not in MODES:
        raise ValueError(f"bench_train_step.py: unknown mode {mode!r}; choose one of {MODES}")
    model_cfg = dataclasses.replace(cfg, use_checkpoint=mode == "checkpoint")
    train_cfg = TrainConfig(run_dir=run_dir, target_modality=TARGET_MODALITY, num_workers=0, seed=seed,
                            precision="bf16" if mode == "bf16" else "fp32")
    volumes = torch.rand((1, 4, *shape), generator=torch.Generator().manual_seed(seed))
    trainer = Trainer(model_cfg, DiffusionConfig(), train_cfg, [{"volumes": volumes[0]}],
                      dist_info=DistInfo(device=device))
    return trainer, {"volumes": volumes}


def measure_mode(spec: dict) -> dict:
    """Time ``spec["repeats"]`` train steps of one mode after warm-up; peak memory. Runs in a worker."""
    device, cfg, shape = setup_worker(spec)
    mode = spec["mode"]
    warm_runtime(device)
    memory = PeakMemory(device).start()
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            trainer, batch = make_trainer(cfg, shape, device, mode, run_dir, spec.get("seed", 0))
            warmup_times, times = time_calls(lambda: trainer.train_step(batch), device, spec["repeats"],
                                                 spec["warmup"])
    except Exception as err:  # noqa: BLE001 - a mode that cannot run here is recorded, not fatal
        return {"mode": mode, "skipped": True, "reason": skip_reason(err)}
    result = {"mode": mode, "skipped": False, "times_s": times, "warmup_times_s": warmup_times,
              "peak_memory_bytes": memory.peak_bytes(), "peak_memory_method": memory.method,
              "steps": trainer.step}
    if device.type == "cpu":
        result["peak_rss_bytes"] = proc_status_bytes("VmHWM")["VmHWM"]
    return result


def _summarise(runs: list[dict]) -> dict:
    """One mode's entry from its runs (one per round)."""
    ok = [o for o in runs if not o.get("skipped")]
    if not ok:
        return {"skipped": True, "reason": runs[0]["reason"]}
    times = [t for o in ok for t in o["times_s"]]
    entry = {"skipped": False, "median_s": statistics.median(times) if times else None, "times_s": times,
             "warmup_times_s": [t for o in ok for t in o["warmup_times_s"]],
             "peak_memory_bytes": max(o["peak_memory_bytes"] for o in ok), "runs": len(ok)}
    if "peak_rss_bytes" in ok[0]:
        entry["peak_rss_bytes"] = ok[0]["peak_rss_bytes"]
    return entry


def run_train_benchmark(config: str = "demo", device: str = "cpu", modes=MODES, repeats: int = 5,
                        warmup: int = 1, rounds: int = 1, isolate: bool = True,
                        cpu_memory_limit_gb: float | None = None, threads: int = 0,
                        log=print) -> dict:
    """Measure every mode (``rounds`` times, interleaved) and return the result entry."""
    cfg, shape = preset(config)
    modes = tuple(dict.fromkeys(("fp32", *modes)))
    limit = default_cpu_memory_limit(device, cpu_memory_limit_gb)
    load_start = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(rounds):
        for mode in modes:
            spec = {"config": config, "device": device, "mode": mode, "repeats": repeats, "warmup": warmup,
                    "threads": threads or torch.get_num_threads(), "cpu_memory_limit_bytes": limit, "seed": 0}
            out = run_isolated(measure_mode, spec, isolate)
            runs[mode].append(out)
            if out.get("skipped"):
                log(f"[round {r}] {mode}: skipped: {out['reason']}")
            else:
                log(f"[round {r}] {mode}: median {statistics.median(out['times_s']):.3f} s/step, "
                    f"peak {out['peak_memory_bytes'] / GIB:.2f} GiB")
    per_mode = {mode: _summarise(runs[mode]) for mode in modes}
    base = per_mode["fp32"]
    for entry in per_mode.values():
        if not entry.get("skipped") and not base.get("skipped") and entry["median_s"] and base["median_s"]:
            entry["time_ratio_vs_fp32"] = entry["median_s"] / base["median_s"]
            entry["speedup_vs_fp32"] = base["median_s"] / entry["median_s"]
            entry["memory_ratio_vs_fp32"] = entry["peak_memory_bytes"] / base["peak_memory_bytes"]
    memory = PeakMemory(torch.device(device))
    return {
        "command": command_line(), "machine": machine(),
        "config": config, "device": device, "model_config": cfg.to_dict(),
        "parameters": sum(p.numel() for p in build_model(cfg).parameters()),
        "volume_shape": [1, 4, *shape], "network_input_shape": [1, cfg.in_channels, *(s // 2 for s in shape)],
        "worker_threads": threads or torch.get_num_threads(), "batch_size": 1, "repeats": repeats,
        "warmup": warmup, "rounds": rounds, "isolated_processes": isolate,
        "load_average_1m": [load_start, os.getloadavg()[0]],
        "step": "Trainer.train_step: DWT + loss through the denoiser + backward + grad clip + AdamW + EMA",
        "peak_memory_method": memory.method + (", one process per mode" if isolate else ", all modes in one process"),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32 if memory.device.type == "cuda" else None,
        "modes": per_mode,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = benchmark_parser(__doc__, "train_step.json", repeats=5, what="steps per mode and round")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="modes to measure (fp32 always)")
    parser.add_argument("--rounds", type=int, default=1, help="run all modes this many times, interleaved")
    args = parser.parse_args(argv)
    entry = run_train_benchmark(args.config, args.device, args.modes, args.repeats, args.warmup, args.rounds,
                                args.isolate, args.cpu_memory_limit_gb, args.threads)
    for mode, m in entry["modes"].items():
        if m.get("skipped"):
            print(f"{mode:>14}: skipped ({m['reason']})")
        else:
            print(f"{mode:>14}: {m['median_s']:.3f} s/step ({m.get('speedup_vs_fp32', 1):.2f}x fp32 speed), "
                  f"peak {m['peak_memory_bytes'] / GIB:.2f} GiB ({m.get('memory_ratio_vs_fp32', 1):.2f}x fp32)")
    save_entry(args, entry)
    return entry


if __name__ == "__main__":
    main()
