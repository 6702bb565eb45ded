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

Downstream segmentation (BraSyn's second metric, docs/segmentation.md): after both arms are
trained and sampled, one segmenter (MONAI SegResNet, ``segmentation.train_segmenter`` with the
demo settings, ``SEGMENTER_PRESETS["demo"]``; ``--segmenter CKPT`` uses a trained one instead) is
trained on the REAL four modalities of the same training cases. Each synthesis is written as
``sample.py`` writes it (zero outside the head, original grid, the case's header), read back and
put in place of the real target (``segmentation.score_synthesis``): Dice and HD95 of WT / TC / ET
(BraTS 2023 labels) per modality and arm, and with the real target (the upper bound, ``real``).
The segmenter is trained after the diffusion models, so PSNR / SSIM do not depend on it.

    python experiments/all_vs_single.py                            # the demo-size run (CPU)
    python experiments/all_vs_single.py --quick --out /tmp/avs     # a smoke run in seconds

Writes <out>/all_vs_single.json (default: benchmarks/results/local; --update_results: the
committed benchmarks/results).
"""
from __future__ import annotations

import argparse
import logging
import math
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
from guided_diffusion.bratsloader import (BratsDataset, CaseData, Geometry, discover_cases, load_case,  # noqa: E402
                                         save_volume, to_original_grid)
from guided_diffusion.conditioning import modality_index, zero_outside_head  # noqa: E402
from guided_diffusion.config import DiffusionConfig, SampleConfig, TrainConfig  # noqa: E402
from guided_diffusion.constants import ALL_TARGET, MODALITIES, PRECISIONS  # noqa: E402
from guided_diffusion.demo_data import make_demo_dataset  # noqa: E402
from guided_diffusion.extras import import_extra  # noqa: E402
from guided_diffusion.fileio import save_json  # noqa: E402
from guided_diffusion.metrics import evaluate_case  # noqa: E402
from guided_diffusion.presets import ALL_MODALITY, DEMO_MODEL, TINY_MODEL  # noqa: E402
from guided_diffusion.segmentation import (EXTRA, REAL_SUFFIX, SCORE_KEYS, SEG_METRICS_NOTE,  # noqa: E402
                                           SEGMENTER_PRESETS, Segmenter, load_segmenter, score_synthesis,
                                           segmenter_config, train_segmenter)
from guided_diffusion.synthesis import synthesize_volumes  # noqa: E402
from guided_diffusion.timesteps import plan_timesteps  # noqa: E402
from guided_diffusion.train_util import Trainer  # noqa: E402

logger = logging.getLogger("all_vs_single")
SCHEDULE = DiffusionConfig(kind="fast_sampled", fast_intervals=10)  # the demo preset's
ARMS = ("single", "all")
DICE_KEYS = tuple(k for k in SCORE_KEYS if k.startswith("dice_"))


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
    p.add_argument("--segmenter", default=None, metavar="CKPT",
                   help="a scripts/train_segmenter.py checkpoint trained on data of this grid for the Dice / HD95 "
                        "columns (default: train one on the training cases with the demo settings; --quick: tiny)")
    p.add_argument("--no_segmentation", action="store_true",
                   help="PSNR / SSIM only (no MONAI needed, no segmenter trained)")
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


def score(model, schedule, items, target: str, args, write=None) -> dict:
    """Mean BraSyn metrics of ``target`` synthesised for every test item.

    ``write(index, synthesis)``, when given, gets each item's (X, Y, Z) network-grid synthesis
    (for the downstream segmentation, after every arm is done)."""
    cfg = SampleConfig(sampler="ddpm", nfe=0, seed=args.seed, precision=args.precision)
    timesteps, _ = plan_timesteps(schedule, None, 0)
    metrics = []
    for index, item in enumerate(items):
        synthesis = synthesize_volumes(model, schedule, item["volumes"][None], target, cfg, [item["case_id"]],
                                       timesteps)[0].cpu()
        pred = synthesis.numpy()
        gt = item["volumes"][modality_index(target)].numpy()
        k = min(11, min(gt.shape))
        metrics.append(evaluate_case(pred, gt, item["brain_mask"].numpy(), item["seg"].numpy(),
                                     kernel_size=k if k % 2 else k - 1))
        if write is not None:
            write(index, synthesis)
    return {key: float(np.nanmean([m[key] for m in metrics])) for key in ("psnr", "ssim", "mse")} | \
        {"nfe": len(timesteps)}


def write_synthesis(folder: Path, data: CaseData, target: str, synthesis: torch.Tensor, geometry: Geometry) -> Path:
    """Write a network-grid (X, Y, Z) synthesis as ``sample.py`` does: zero outside the head, on the
    case's original grid and header, as ``<folder>/<case>/<case>-<target>.nii.gz``."""
    pred = zero_outside_head(synthesis[None], torch.from_numpy(data.volumes)[None], target)[0]
    path = folder / data.case.case_id / f"{data.case.case_id}-{target}.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_volume(path, to_original_grid(pred.numpy(), geometry), data.reference, overwrite=True,
                       description=f"SYNTHETIC {target}: experiments/all_vs_single.py")


def _mean(values) -> tuple[float | None, int]:
    """Mean over the finite values (HD95 is NaN where only one of prediction / truth is empty, a
    mean of means None where none was finite) and how many there were; None when there are none."""
    finite = [float(v) for v in values if v is not None and not math.isnan(v)]
    return (float(np.mean(finite)) if finite else None), len(finite)


def segment_scores(segmenter: Segmenter, cases: list[CaseData], target: str, paths: list[Path],
                   geometry: Geometry) -> tuple[dict, dict]:
    """Mean Dice / HD95 (WT, TC, ET) over ``cases`` with each case's real ``target`` replaced by its
    synthesis file ``paths[i]`` (``segmentation.score_synthesis``: the file is read back and
    preprocessed like any input), and the same with the real target.

    Returns:
        ``(synthesis, real)``: each ``{dice_wt, ..., hd95_et}`` means, plus ``hd95_*_n`` (the cases
        a HD95 mean covers).
    """
    per_case = [score_synthesis(segmenter, data, target, path, geometry) for data, path in zip(cases, paths, strict=True)]
    out = ({}, {})
    for key in SCORE_KEYS:
        for summary, suffix in zip(out, ("", REAL_SUFFIX)):
            summary[key], n = _mean([c[key + suffix] for c in per_case])
            if key.startswith("hd95_"):
                summary[key + "_n"] = n
    return out


def get_segmenter(args, cases, geometry: Geometry, given: Segmenter | None) -> tuple[Segmenter, dict]:
    """The segmenter of the Dice columns (``given``: loaded from ``--segmenter``; else trained here
    on the REAL four modalities of the training cases with the demo settings, ``tiny`` with
    --quick) and what it cost."""
    if given is not None:
        return given, {"checkpoint": str(args.segmenter), "settings": given.config.get("segmenter")}
    preset = "tiny" if args.quick else "demo"
    cfg, device = SEGMENTER_PRESETS[preset], torch.device("cpu")
    start = time.perf_counter()
    model, losses = train_segmenter(cases, geometry, cfg, device)
    seconds = time.perf_counter() - start
    logger.info("segmenter (%s preset): %d steps in %.0f s, final loss %.4f", preset, cfg.max_steps, seconds,
                losses[-1])
    config = segmenter_config(cfg, geometry, preset=preset)
    segmenter = Segmenter(model, config, Path(f"<segmenter trained by all_vs_single.py, {preset} preset>"), device)
    return segmenter, {"trained_here": True, "preset": preset, "settings": cfg.to_dict(), "train_seconds": seconds,
                       "final_loss": losses[-1], "training_cases": [c.case_id for c in cases],
                       "data": "the REAL four modalities and seg of the diffusion models' training cases"}


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
        given = None
        if not args.no_segmentation:  # before hours of training: MONAI is there, a --segmenter fits
            import_extra("monai", EXTRA, "the Dice / HD95 columns (or pass --no_segmentation)")
            if args.segmenter:
                with torch.random.fork_rng(devices=[]):  # building the network must not move the global RNG
                    given = load_segmenter(args.segmenter, "cpu", geometry)
        make_demo_dataset(work / "data", geometry=geometry, seed=args.seed, n_train=args.n_train, n_val=0,
                          n_pseudo=args.n_test)
        cases, errors = discover_cases(work / "data" / "training", mode="train", geometry=geometry)
        test_cases, test_errors = discover_cases(work / "data" / "pseudo_validation_gt", mode="train",
                                                 geometry=geometry)
        if errors or test_errors:
            raise RuntimeError(f"demo data has bad cases: {errors + test_errors}")
        train_set = BratsDataset(cases, geometry)
        items = [BratsDataset(test_cases, geometry)[i] for i in range(len(test_cases))]
        test_data = [load_case(c, geometry) for c in test_cases]
        paths: dict[tuple[str, str], list[Path]] = {}  # (arm, target) -> synthesis file of each test case
        records, training = [], {}
        all_model, all_schedule, training["all"] = train(all_cfg, ALL_TARGET, len(MODALITIES) * args.steps,
                                                          train_set, args, work / "runs")
        for target in MODALITIES:
            single, schedule, training[target] = train(single_cfg, target, args.steps, train_set, args, work / "runs")
            for arm, model, sched in (("single", single, schedule), ("all", all_model, all_schedule)):
                files = paths.setdefault((arm, target), [])

                def write(index, synthesis, files=files, folder=work / "syntheses" / arm, target=target):
                    files.append(write_synthesis(folder, test_data[index], target, synthesis, geometry))
                record = {"target": target, "arm": arm, **score(model, sched, items, target, args, write)}
                records.append(record)
                logger.info("%s %-6s PSNR %.3f SSIM %.4f", target, arm, record["psnr"], record["ssim"])
        segmentation, real = None, {}
        if not args.no_segmentation:  # after all diffusion training: PSNR / SSIM do not depend on it
            segmenter, segmentation = get_segmenter(args, cases, geometry, given)
            start_seg = time.perf_counter()
            for record in records:
                scores, real[record["target"]] = segment_scores(segmenter, test_data, record["target"],
                                                                paths[record["arm"], record["target"]], geometry)
                record.update(scores)
                logger.info("%s %-6s Dice WT %.3f TC %.3f ET %.3f", record["target"], record["arm"],
                            *(record[k] for k in DICE_KEYS))
            segmentation["scoring_seconds"] = time.perf_counter() - start_seg
    finally:
        shutil.rmtree(work, ignore_errors=True)
    singles = sum(training[m]["parameters"] for m in MODALITIES)
    mean_keys = ("psnr", "ssim") + (SCORE_KEYS if segmentation is not None else ())
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
        "mean": {arm: {k: _mean([r.get(k) for r in records if r["arm"] == arm])[0] for k in mean_keys}
                 for arm in ARMS},
        "training": training, "test_cases": [c.case_id for c in test_cases],
        "metrics_grid": "network grid (cropped/padded), BraSyn percentile normalisation, mean over test cases",
        "total_seconds": time.perf_counter() - start_all,
    }
    if segmentation is not None:
        payload["mean"]["real"] = {k: _mean([real[m][k] for m in MODALITIES])[0] for k in SCORE_KEYS}
        payload["real_target"] = real
        payload["segmentation"] = {**segmentation, "note": SEG_METRICS_NOTE,
                                   "real_target": "the case with its four real modalities (the upper bound; the same "
                                                  "for every target modality)",
                                   "means": "per modality: over the test cases; 'mean': over the four modalities"}
    save_json(payload, out_dir / "all_vs_single.json")
    dice = segmentation is not None
    print(f"{'target':<8}{'arm':<8}{'PSNR':>8}{'SSIM':>8}" + ("".join(f"{k:>9}" for k in DICE_KEYS) if dice else ""))
    for r in records + ([{"target": m, "arm": "real", **real[m]} for m in MODALITIES] if dice else []):
        line = (f"{r['target']:<8}{r['arm']:<8}" + (f"{r['psnr']:>8.3f}{r['ssim']:>8.4f}" if "psnr" in r else " " * 16))
        print(line + ("".join(f"{r[k]:>9.4f}" for k in DICE_KEYS) if dice else ""))
    print(f"wrote {out_dir / 'all_vs_single.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
