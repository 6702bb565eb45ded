"""The FATS ablation (the paper's table): every variant trained with the same network, seed and
number of steps on the demo data, then sampled on held-out cases at several step budgets.

Variants (trained models in brackets):
  cwdm                 [linear 1000]   1000-step DDPM; DDIM and respaced DDPM at K uniform steps
  fast_direct          [linear rescaled to 10 steps]   all 10 steps (DDPM)
  fast_sampled         [10 points of the 1000-step curve, incl. t = 0]   all 11 steps (DDPM)
  fats                 [per-band shifts from energy statistics]   learned K-step DDIM timesteps
  fats_no_learned      [the fats model]   uniform K-step DDIM (ablation: no learned timesteps)
  fats_no_shift        [the cwdm model]   learned K-step DDIM timesteps (ablation: no per-band shifts)
  regression           [one step: x0 from pure noise at the last step]   one network evaluation

Data: a fresh seeded demo dataset. Training cases train every model; ``--n_fit`` further cases
(never trained on) fit the learned timesteps; the ``--n_test`` pseudo-validation cases (never
used for anything else) are scored with the BraSyn metrics on the network grid.

    python experiments/fats_ablation.py                 # the full run (CPU, about half an hour)
    python experiments/fats_ablation.py --quick --out /tmp/abl   # a smoke run in seconds

Every test case is synthesised by ``guided_diffusion.synthesis.synthesize_volumes`` (the
pipeline ``sample.py`` runs), with the variant's sampler, timesteps (``timesteps.plan_timesteps``)
and precision.

Writes <out>/fats_ablation.json (one record per variant and K), fats_ablation_psnr_nfe.png and
fats_ablation_slices.png. Default out: benchmarks/results.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import LOCAL_RESULTS_DIR, RESULTS_DIR, machine  # noqa: E402
from guided_diffusion.bratsloader import BratsDataset, Geometry, discover_cases  # noqa: E402
from guided_diffusion.conditioning import cond_modalities, modality_index  # noqa: E402
from guided_diffusion.constants import MODALITIES, PRECISIONS  # noqa: E402
from guided_diffusion.config import DiffusionConfig, SampleConfig, TrainConfig  # noqa: E402
from guided_diffusion.fileio import save_json  # noqa: E402
from guided_diffusion.demo_data import make_demo_dataset  # noqa: E402
from guided_diffusion.fats import FatsState  # noqa: E402
from guided_diffusion.fats_training import (FATS_NFE_BUDGETS, fit_sampling_steps, held_out_cases,  # noqa: E402
                                            prepare_fats_schedule)
from guided_diffusion.figures import slice_figure  # noqa: E402
from guided_diffusion.metrics import evaluate_case  # noqa: E402
from guided_diffusion.presets import DEMO_MODEL, TINY_MODEL  # noqa: E402
from guided_diffusion.schedules import NoiseSchedule, linear  # noqa: E402
from guided_diffusion.synthesis import synthesize_volumes  # noqa: E402
from guided_diffusion.timesteps import plan_timesteps  # noqa: E402
from guided_diffusion.train_util import Trainer  # noqa: E402

logger = logging.getLogger("fats_ablation")


def regression_schedule() -> NoiseSchedule:
    """A one-step schedule: the last step of the linear curve (x_T is pure noise), so the network
    learns to regress x0 from the conditioning alone."""
    base = linear()
    return NoiseSchedule(base.alpha_bar[:, -1:].clone(), base.model_times[-1:].clone(), "regression")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny data, tiny model, a few steps: a smoke run")
    p.add_argument("--train_steps", type=int, default=1500, help="training steps of every variant")
    p.add_argument("--batch_size", type=int, default=2, help="training batch size")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate")
    p.add_argument("--size", type=float, default=0.25, help="demo data scale of the BraTS grid")
    p.add_argument("--n_train", type=int, default=14, help="training cases")
    p.add_argument("--n_fit", type=int, default=2, help="held-out training cases for fitting learned timesteps")
    p.add_argument("--n_test", type=int, default=4, help="held-out test cases (scored)")
    p.add_argument("--nfe", type=int, nargs="+", default=list(FATS_NFE_BUDGETS),
                   help="NFE budgets K (default %(default)s)")
    p.add_argument("--target", choices=MODALITIES, default="t2f", help="the modality synthesised (default t2f)")
    p.add_argument("--precision", choices=PRECISIONS, default="bf16",
                   help="network precision for training, timestep fitting and sampling of every variant "
                        "(bf16 is ~5x faster on AMX CPUs)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, weights, noise")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", default=None,
                   help="output folder (default: benchmarks/results/local, git-ignored; with --update_results the "
                        "committed benchmarks/results)")
    p.add_argument("--update_results", action="store_true", help="write into the committed benchmarks/results")
    p.add_argument("--work_dir", default=None, help="where data and checkpoints go (default: a temporary folder)")
    p.add_argument("--reuse", action="store_true",
                   help="reuse the models already trained in --work_dir (same settings) instead of training again")
    p.add_argument("--timestep_reference", choices=["target", "teacher"], default="target",
                   help="learned timesteps minimise the error to the real target (paired data) or to the same noise's "
                        "1000-step DDIM sample (LD3-style teacher)")
    p.add_argument("--name", default="fats_ablation", help="stem of the output files")
    return p.parse_args(argv)


def train_variant(name: str, diffusion_cfg: DiffusionConfig, schedule, train_set, args, model_cfg, run_dir: Path):
    cfg = TrainConfig(run_dir=str(run_dir / name), target_modality=args.target, batch_size=args.batch_size, lr=args.lr,
                      max_steps=args.train_steps, save_interval=args.train_steps, log_interval=max(args.train_steps // 5, 1),
                      val_interval=0, image_interval=0, ema_rate=0.99 if not args.quick else 0.5, num_workers=0,
                      seed=args.seed, precision=args.precision)
    trainer = Trainer(model_cfg, diffusion_cfg, cfg, train_set, schedule=schedule)
    latest = run_dir / name / "latest.pt"
    if args.reuse and latest.is_file():
        trainer.resume(latest)
        if trainer.step != args.train_steps:
            raise RuntimeError(f"{latest}: trained {trainer.step} steps, not {args.train_steps}; cannot reuse")
        logger.info("%s: reusing the model trained for %d steps in %s", name, trainer.step, latest)
        return trainer.ema.eval(), trainer.target_schedule, {"train_seconds": None, "train_losses": [], "reused": True}
    start = time.perf_counter()
    losses = []
    trainer.run(lambda r: losses.append(r.loss))
    seconds = time.perf_counter() - start
    logger.info("%s: trained %d steps in %.0f s, last logged loss %.4g", name, trainer.step, seconds, losses[-1])
    return trainer.ema.eval(), trainer.target_schedule, {"train_seconds": seconds, "train_losses": losses}


class Sampler:
    """Synthesises the test cases with one model and scores them."""

    def __init__(self, test_items, args):
        self.items, self.args = test_items, args

    def run(self, model, schedule, timesteps, sampler: str) -> dict:
        cfg = SampleConfig(sampler=sampler, eta=0.0, seed=self.args.seed, precision=self.args.precision)
        metrics, seconds, preds = [], [], []
        for item in self.items:
            start = time.perf_counter()
            pred = synthesize_volumes(model, schedule, item["volumes"][None], self.args.target, cfg, [item["case_id"]],
                                      timesteps)[0].cpu().numpy()
            seconds.append(time.perf_counter() - start)
            gt = item["volumes"][modality_index(self.args.target)].numpy()
            metrics.append(evaluate_case(pred, gt, item["brain_mask"].numpy(), item["seg"].numpy(),
                                         kernel_size=self._kernel(gt.shape)))
            preds.append(pred)
        out = {key: float(np.nanmean([m[key] for m in metrics])) for key in metrics[0]}
        out["seconds_per_volume"] = statistics.median(seconds)
        return out, preds[0]

    @staticmethod
    def _kernel(shape) -> int:
        k = min(11, min(shape))
        return k if k % 2 else k - 1


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if args.quick:
        args = argparse.Namespace(**{**vars(args), "train_steps": min(args.train_steps, 4), "size": 18 / 240,
                                     "n_train": 3, "n_fit": 1, "n_test": 1, "nfe": [1, 2], "batch_size": 1})
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model_cfg = TINY_MODEL if args.quick else DEMO_MODEL
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="fats_ablation_"))
    out_dir = Path(args.out) if args.out else (RESULTS_DIR if args.update_results else LOCAL_RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    start_all = time.perf_counter()

    # Data: training + fitting cases from the training split, test cases from pseudo_validation_gt.
    geometry = Geometry.scaled(args.size)
    data_dir = work / "data"
    if not (data_dir / "training").is_dir():
        make_demo_dataset(data_dir, geometry=geometry, seed=args.seed, n_train=args.n_train + args.n_fit, n_val=0,
                          n_pseudo=args.n_test)
    cases, errors = discover_cases(data_dir / "training", mode="train", geometry=geometry)
    test_cases, test_errors = discover_cases(data_dir / "pseudo_validation_gt", mode="train", geometry=geometry)
    if errors or test_errors:
        raise RuntimeError(f"demo data has bad cases: {errors + test_errors}")
    train_set = BratsDataset(cases[: args.n_train], geometry)
    fit_set = BratsDataset(cases[args.n_train:], geometry)
    test_items = [BratsDataset(test_cases, geometry)[i] for i in range(len(test_cases))]
    sampler = Sampler(test_items, args)
    run_dir = work / "runs"

    # Train every model with the same budget.
    trained = {}
    for name, cfg in [("cwdm", DiffusionConfig(kind="linear", num_train_steps=1000)),
                      ("fast_direct", DiffusionConfig(kind="fast_direct", num_train_steps=10)),
                      ("fast_sampled", DiffusionConfig(kind="fast_sampled", fast_intervals=10)),
                      ("fats", DiffusionConfig(kind="fats", num_train_steps=1000)),
                      ("regression", DiffusionConfig(kind="linear", num_train_steps=1000))]:
        schedule, extra = None, {}
        if name == "fats":
            cfg, schedule, extra = prepare_fats_schedule(cfg, train_set, args.target, seed=args.seed)
        if name == "regression":
            schedule = regression_schedule()
        model, schedule, info = train_variant(name, cfg, schedule, train_set, args, model_cfg, run_dir)
        trained[name] = {"model": model, "schedule": schedule, "cfg": cfg, "info": info, "extra": extra}

    # Learned timesteps on the fitting cases (never the test cases).
    fit_cases = held_out_cases(fit_set, args.target, "cpu", max_cases=len(fit_set), seed=args.seed)
    learned = {}
    for name in ("fats", "cwdm"):
        t0 = time.perf_counter()
        learned[name] = fit_sampling_steps(trained[name]["model"], trained[name]["schedule"], fit_cases, args.nfe,
                                           seed=args.seed, reference=args.timestep_reference, precision=args.precision)
        logger.info("%s: learned timesteps for NFE=%s in %.0f s", name, args.nfe, time.perf_counter() - t0)

    # Sample the test cases.
    # Every variant's timesteps come from the one policy (plan_timesteps): the learned ones through
    # a FatsState holding them, uniform ones without; NFE 0 = every step of the schedule.
    states = {name: FatsState().with_learned(learned[name], min(args.nfe)) for name in learned}
    plan = [("cwdm", "cwdm", "ddpm", None, 0)]
    for k in args.nfe:
        plan.append(("cwdm", "cwdm_ddim", "ddim", None, k))
        plan.append(("cwdm", "cwdm_respaced", "ddpm", None, k))
        plan.append(("fats", "fats", "ddim", states["fats"], k))
        plan.append(("fats", "fats_no_learned", "ddim", None, k))
        plan.append(("cwdm", "fats_no_shift", "ddim", states["cwdm"], k))
    plan += [("fast_direct", "fast_direct", "ddpm", None, 0),
             ("fast_sampled", "fast_sampled", "ddpm", None, 0),
             ("regression", "regression", "ddim", None, 0)]
    records, slices = [], {}
    for model_name, variant, kind, state, nfe in plan:
        entry = trained[model_name]
        timesteps, origin = plan_timesteps(entry["schedule"], state, nfe)
        scores, pred = sampler.run(entry["model"], entry["schedule"], timesteps, kind)
        record = {"variant": variant, "train_schedule": entry["schedule"].name, "K": len(timesteps),
                  "nfe": len(timesteps), "sampler": kind, "timesteps": timesteps, "timesteps_origin": origin,
                  "psnr": scores["psnr"], "ssim": scores["ssim"],
                  "mse": scores["mse"], "psnr_tumor": scores["psnr_tumor"], "ssim_tumor": scores["ssim_tumor"],
                  "ssim_rest": scores["ssim_rest"], "seconds_per_volume": scores["seconds_per_volume"],
                  "train_steps": args.train_steps, "seed": args.seed}
        records.append(record)
        slices.setdefault(variant if variant != "cwdm_ddim" else f"cwdm_ddim", pred)
        logger.info("%-16s K=%-4d PSNR %.3f  SSIM %.4f  tumour PSNR %.3f  (%.2f s/volume)", variant, len(timesteps),
                    record["psnr"], record["ssim"], record["psnr_tumor"], record["seconds_per_volume"])

    payload = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(), "args": vars(args),
        "model_config": model_cfg.to_dict(), "records": records,
        "training": {n: {**t["info"], "diffusion": t["cfg"].to_dict()} for n, t in trained.items()},
        "fats_energy_stats": FatsState.from_extra(trained["fats"]["extra"]).energy_stats["energy"],
        "learned_timesteps": {n: {str(k): {kk: r[kk] for kk in ("steps", "error", "uniform_steps", "uniform_error")}
                                  for k, r in res.items()} for n, res in learned.items()},
        "learned_timesteps_reference": {"target": "brain-masked MSE to the real target subbands (paired data)",
                                        "teacher": "brain-masked MSE to the same noise's 1000-step DDIM sample"}[
                                            args.timestep_reference],
        "metrics_grid": "network grid (cropped/padded), BraSyn percentile normalisation, mean over test cases",
        "test_cases": [c.case_id for c in test_cases], "fit_cases": [c.case_id for c in cases[args.n_train:]],
        "total_seconds": time.perf_counter() - start_all,
    }
    save_json(payload, out_dir / f"{args.name}.json")
    plot(records, out_dir / f"{args.name}_psnr_nfe.png")
    item = test_items[0]
    panels = [(m, item["volumes"][modality_index(m)].numpy()) for m in cond_modalities(args.target)]
    panels.append((f"{args.target} truth", item["volumes"][modality_index(args.target)].numpy()))
    panels += [(name, vol) for name, vol in slices.items()]
    slice_figure(out_dir / f"{args.name}_slices.png", panels, title=f"{item['case_id']}: one slice per variant")
    print(table(records))
    print(f"wrote {out_dir / (args.name + '.json')}")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def table(records) -> str:
    lines = [f"| variant | trained on | K | NFE | PSNR | SSIM | MSE | PSNR tumour | SSIM tumour | s/volume |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['variant']} | {r['train_schedule']} | {r['K']} | {r['nfe']} | {r['psnr']:.3f} | "
                     f"{r['ssim']:.4f} | {r['mse']:.5f} | {r['psnr_tumor']:.3f} | {r['ssim_tumor']:.4f} | "
                     f"{r['seconds_per_volume']:.2f} |")
    return "\n".join(lines)


def plot(records, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from guided_diffusion.fileio import atomic_write

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for variant in dict.fromkeys(r["variant"] for r in records):
        pts = sorted((r["nfe"], r["psnr"]) for r in records if r["variant"] == variant)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=variant)
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per volume (NFE)")
    ax.set_ylabel("PSNR in the brain (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
