"""Seconds per case of an ensemble (``--num_samples M``) against one sample (issue 11).

Times what ``sample.py`` runs for one case: M = 1 is ``synthesis.synthesize`` (the single-sample
path), M > 1 is ``ensembles.case_ensemble`` (the M samples in one sampler call, zeroed outside the
head, mean and std). The model is the config's network with random weights (the time does not
depend on them) and the DDPM sampler over ``--nfe`` uniform steps of the linear schedule; the
case is random conditioning volumes of the config's network grid. The values of M alternate
within each repeat so they see the same machine load; the median is reported, with the peak CUDA
memory per M on a GPU.

Run:
  python benchmarks/bench_ensembles.py --config demo --device cpu --threads 1 --repeats 3 --nfe 4
Results are merged into benchmarks/results/ensembles.json under the key "<config>/<device>"
(with --update_results; by default a git-ignored local file).
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import benchmark_parser, command_line, machine, preset, save_entry, sync  # noqa: E402
from guided_diffusion.checkpoints import load_model, save_checkpoint  # noqa: E402
from guided_diffusion.config import DiffusionConfig, SampleConfig, TrainConfig  # noqa: E402
from guided_diffusion.ensembles import case_ensemble  # noqa: E402
from guided_diffusion.factory import build_model, build_schedule  # noqa: E402
from guided_diffusion.synthesis import synthesize  # noqa: E402


def main(argv=None) -> int:
    parser = benchmark_parser(__doc__, "ensembles.json", repeats=3, what="cases per M")
    parser.add_argument("--num_samples", type=int, nargs="+", default=[1, 2, 4], help="the values of M")
    parser.add_argument("--nfe", type=int, default=4, help="network evaluations per sample")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_cfg, shape = preset(args.config)
    diffusion = DiffusionConfig()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        state = build_model(model_cfg).state_dict()
        path = save_checkpoint(Path(tmp) / "model.pt", {
            "model": state, "ema": state, "optimizer": None, "step": 0,
            "config": {"model": model_cfg.to_dict(), "diffusion": diffusion.to_dict(),
                       "train": TrainConfig().to_dict()},
            "schedule": build_schedule(diffusion).state_dict(), "extra": {}})
        loaded = load_model(path, device=args.device)
    cfg = SampleConfig(sampler="ddpm", nfe=args.nfe, seed=0)
    volumes = torch.rand((1, 4, *shape), generator=torch.Generator().manual_seed(0))
    device = torch.device(args.device)

    def one_case(m: int) -> float:
        sync(device)
        start = time.perf_counter()
        if m == 1:
            synthesize(loaded, volumes, "t2f", cfg, ["case"])
        else:
            case_ensemble(loaded, volumes, "t2f", cfg, "case", m)
        sync(device)
        return time.perf_counter() - start

    seconds = {m: [] for m in args.num_samples}
    peak = {}
    for repeat in range(args.warmup + args.repeats):
        for m in args.num_samples:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            elapsed = one_case(m)
            if repeat >= args.warmup:
                seconds[m].append(elapsed)
            if device.type == "cuda":
                peak[m] = torch.cuda.max_memory_allocated()
    rows = {str(m): {"seconds_per_case": statistics.median(t), "seconds": t,
                     "vs_one_sample": statistics.median(t) / statistics.median(seconds[args.num_samples[0]]),
                     **({"peak_cuda_bytes": peak[m]} if m in peak else {})} for m, t in seconds.items()}
    for m, row in rows.items():
        print(f"M={m}: {row['seconds_per_case']:.3f} s per case ({row['vs_one_sample']:.2f}x M={args.num_samples[0]})")
    save_entry(args, {"command": command_line(), "machine": machine(), "nfe": args.nfe, "sampler": "ddpm",
                      "network_grid": list(shape), "num_samples": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
