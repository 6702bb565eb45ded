"""One all-modality model against four single-modality models (issue 11; docs/all_modality.md).

Both arms: the demo network (``presets.DEMO_MODEL``; the all-modality one with the four-slot
input and the label embedding, ``presets.ALL_MODALITY``), the demo schedule (``fast_sampled``,
10 intervals, all 11 steps sampled with DDPM, as ``--preset demo``), the same learning rate, batch
size, EMA rate and seed, on the same seeded demo dataset.

Same training budget per parameter count: each single-modality model trains ``--steps`` steps;
the all-modality model, which replaces all four (a quarter of their parameters in total),
trains ``4 x --steps`` steps. Both arms thus spend the same optimizer steps, samples and compute,
and each network gets as many steps per parameter as a single model gets per its own.

Every pseudo-validation test case (never trained on) is synthesised once per modality by each
arm (``synthesis.synthesize_volumes``, the pipeline ``sample.py`` runs) and scored with the
BraSyn metrics on the network grid; the JSON has per-modality means of PSNR and SSIM.

    python experiments/all_vs_single.py                            # the demo-size run (CPU)
    python experiments/all_vs_single.py --quick --out /tmp/avs     # a smoke run in seconds

Writes <out>/all_vs_single.json (default: benchmarks/results/local; --update_results: the
committed benchmarks/results).
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import LOCAL_RESULTS_DIR, RESULTS_DIR, machine  # noqa: E402
from guided_diffusion.bratsloader import BratsDataset, Geometry, discover_cases  # noqa: E402
from guided_diffusion.conditioning import modality_index  # noqa: E402
from guided_diffusion.config import DiffusionConfig, SampleConfig, TrainConfig  # noqa: E402
from guided_diffusion.constants import ALL_TARGET, MODALITIES, PRECISIONS  # noqa: E402
from guided_diffusion.demo_data import make_demo_dataset  # noqa: E402
from guided_diffusion.fileio import save_json  # noqa: E402
from guided_diffusion.metrics import evaluate_case  # noqa: E402
from guided_diffusion.presets import ALL_MODALITY, DEMO_MODEL, TINY_MODEL  # noqa: E402
from guided_diffusion.synthesis import synthesize_volumes  # noqa: E402
from guided_diffusion.timesteps import plan_timesteps  # noqa: E402
from guided_diffusion.train_util import Trainer  # noqa: E402

logger = logging.getLogger("all_vs_single")
SCHEDULE = DiffusionConfig(kind="fast_sampled", fast_intervals=10)  # the demo preset's


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny data, tiny model, a few steps: a smoke run")
    p.add_argument("--steps", type=int, default=300,
                   help="training steps of each single-modality model; the all-modality model trains 4x this")
    p.add_argument("--batch_size", type=int, default=2, help="training batch size (both arms)")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (both arms)")
    p.add_argument("--size", type=float, default=0.25, help="demo data scale of the BraTS grid")
    p.add_argument("--n_train", type=int, default=14, help="training cases")
    p.add_argument("--n_test", type=int, default=4, help="held-out test cases (scored for every modality)")
    p.add_argument("--precision", choices=PRECISIONS, default="bf16", help="network precision (both arms)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, weights, noise")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/local)")
    p.add_argument("--update_results", action="store_true", help="write into the committed benchmarks/results")
    return p.parse_args(argv)


def train(model_cfg, target: str, steps: int, train_set, args, run_dir: Path):
    cfg = TrainConfig(run_dir=str(run_dir / target), target_modality=target, batch_size=args.batch_size, lr=args.lr,
                      max_steps=steps, save_interval=steps, log_interval=max(steps // 5, 1), val_interval=0,
                      image_interval=0, ema_rate=0.99 if not args.quick else 0.5, num_workers=0, seed=args.seed,
                      precision=args.precision)
    trainer = Trainer(model_cfg, SCHEDULE, cfg, train_set)
    start, losses = time.perf_counter(), []
    trainer.run(lambda r: losses.append(r.loss))
    seconds = time.perf_counter() - start
    logger.info("%s: %d steps in %.0f s, last logged loss %.4g", target, steps, seconds, losses[-1])
    params = sum(p.numel() for p in trainer.model.parameters())
    return trainer.ema.eval(), trainer.target_schedule, {"steps": steps, "train_seconds": seconds,
                                                         "train_losses": losses, "parameters": params}


def score(model, schedule, items, target: str, args) -> dict:
    """Mean BraSyn metrics of ``target`` synthesised for every test item."""
    cfg = SampleConfig(sampler="ddpm", nfe=0, seed=args.seed, precision=args.precision)
    timesteps, _ = plan_timesteps(schedule, None, 0)
    metrics = []
    for item in items:
        pred = synthesize_volumes(model, schedule, item["volumes"][None], target, cfg, [item["case_id"]],
                                  timesteps)[0].cpu().numpy()
        gt = item["volumes"][modality_index(target)].numpy()
        k = min(11, min(gt.shape))
        metrics.append(evaluate_case(pred, gt, item["brain_mask"].numpy(), item["seg"].numpy(),
                                     kernel_size=k if k % 2 else k - 1))
    return {key: float(np.nanmean([m[key] for m in metrics])) for key in ("psnr", "ssim", "mse")} | \
        {"nfe": len(timesteps)}


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if args.quick:
        args = argparse.Namespace(**{**vars(args), "steps": min(args.steps, 2), "size": 18 / 240, "n_train": 3,
                                     "n_test": 1, "batch_size": 1})
    torch.set_num_threads(args.threads)
    single_cfg = TINY_MODEL if args.quick else DEMO_MODEL
    all_cfg = replace(single_cfg, **ALL_MODALITY)
    out_dir = Path(args.out) if args.out else (RESULTS_DIR if args.update_results else LOCAL_RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="all_vs_single_"))
    start_all = time.perf_counter()
    try:
        geometry = Geometry.scaled(args.size)
        make_demo_dataset(work / "data", geometry=geometry, seed=args.seed, n_train=args.n_train, n_val=0,
                          n_pseudo=args.n_test)
        cases, errors = discover_cases(work / "data" / "training", mode="train", geometry=geometry)
        test_cases, test_errors = discover_cases(work / "data" / "pseudo_validation_gt", mode="train",
                                                 geometry=geometry)
        if errors or test_errors:
            raise RuntimeError(f"demo data has bad cases: {errors + test_errors}")
        train_set = BratsDataset(cases, geometry)
        items = [BratsDataset(test_cases, geometry)[i] for i in range(len(test_cases))]
        records, training = [], {}
        all_model, all_schedule, training["all"] = train(all_cfg, ALL_TARGET, len(MODALITIES) * args.steps,
                                                          train_set, args, work / "runs")
        for target in MODALITIES:
            single, schedule, training[target] = train(single_cfg, target, args.steps, train_set, args, work / "runs")
            for arm, model, sched in (("single", single, schedule), ("all", all_model, all_schedule)):
                record = {"target": target, "arm": arm, **score(model, sched, items, target, args)}
                records.append(record)
                logger.info("%s %-6s PSNR %.3f SSIM %.4f", target, arm, record["psnr"], record["ssim"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    singles = sum(training[m]["parameters"] for m in MODALITIES)
    payload = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(), "args": vars(args),
        "budget": (f"each single-modality model {args.steps} steps, the all-modality model "
                   f"{len(MODALITIES) * args.steps} steps (it replaces four): the same total steps, samples and "
                   f"compute; batch {args.batch_size}"),
        "parameters": {"all_modality": training["all"]["parameters"], "single_each": training[MODALITIES[0]]["parameters"],
                       "singles_total": singles},
        "schedule": SCHEDULE.to_dict(), "sampler": "ddpm, every step of the schedule",
        "model_config": {"single": single_cfg.to_dict(), "all": all_cfg.to_dict()},
        "records": records,
        "mean": {arm: {k: float(np.mean([r[k] for r in records if r["arm"] == arm])) for k in ("psnr", "ssim")}
                 for arm in ("single", "all")},
        "training": training, "test_cases": [c.case_id for c in test_cases],
        "metrics_grid": "network grid (cropped/padded), BraSyn percentile normalisation, mean over test cases",
        "total_seconds": time.perf_counter() - start_all,
    }
    save_json(payload, out_dir / "all_vs_single.json")
    print(f"{'target':<8}{'arm':<8}{'PSNR':>8}{'SSIM':>8}")
    for r in records:
        print(f"{r['target']:<8}{r['arm']:<8}{r['psnr']:>8.3f}{r['ssim']:>8.4f}")
    print(f"wrote {out_dir / 'all_vs_single.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
