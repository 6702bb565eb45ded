"""Train a Fast-cWDM model for one target modality (or each modality in turn).

Single process:   python scripts/train.py --preset demo --data_dir data/demo/training --target t2f
Several GPUs:     torchrun --nproc_per_node 4 scripts/train.py --preset unet --data_dir /data/BraTS/train
Resume:           add --resume auto (latest.pt of the run folder) or --resume path/to/latest.pt
Installed:        fast-cwdm-train with the same flags
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from guided_diffusion import cli
from guided_diffusion.bratsloader import BratsDataset, CaseError
from guided_diffusion.checkpoints import load_model, read_checkpoint, resolve_model_source
from guided_diffusion.fileio import save_json
from guided_diffusion.constants import ALL_TARGET, MODALITIES, PRECISIONS, PREDICTIONS
from guided_diffusion.fats_training import (FATS_NFE_BUDGETS, fit_and_store_timesteps, held_out_cases,
                                            prepare_fats_schedule, prepare_fats_v2_schedule)
from guided_diffusion.presets import get_preset
from guided_diffusion.provenance import check_resume_data, data_fingerprint
from guided_diffusion.runinfo import run_info
from guided_diffusion.runlock import hold_run_lock
from guided_diffusion.train_util import LATEST, Trainer, TrainingDiverged, setup_distributed
from guided_diffusion.volume_cache import CachedBratsDataset

logger = logging.getLogger("train")


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    cli.add_preset_argument(p)
    p.add_argument("--data_dir", required=True, help="BraTS-layout folder of training cases (all four modalities)")
    p.add_argument("--val_dir", default=None, help="folder of validation cases with all four modalities "
                                                   "(default: hold out --val_cases cases of --data_dir)")
    p.add_argument("--run_dir", default="runs/train", help="output folder; one sub-folder per target modality")
    cli.add_target_argument(p, "modality to synthesise, or 'all': one model per modality in turn, or with an "
                               "all-modality preset (demo_all, fats_all) its one model for every modality "
                               "(default t2f)", allow_all=True, default="t2f")
    p.add_argument("--max_steps", type=int, default=None, help="total training steps (preset default otherwise)")
    p.add_argument("--save_interval", type=int, default=None, help="steps between checkpoints (latest.pt)")
    p.add_argument("--val_interval", type=int, default=None, help="steps between validations (best.pt); 0 = never")
    p.add_argument("--val_cases", type=int, default=None, help="cases held out for validation when no --val_dir")
    p.add_argument("--log_interval", type=int, default=None, help="steps between log lines / TensorBoard scalars")
    p.add_argument("--image_interval", type=int, default=None,
                   help="steps between TensorBoard image slices (0 = none; preset default otherwise)")
    p.add_argument("--batch_size", type=int, default=None, help="batch size per process")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate")
    p.add_argument("--precision", choices=PRECISIONS, default=None, help="bf16 = autocast to bfloat16")
    p.add_argument("--use_checkpoint", action="store_true", help="activation checkpointing (less memory, slower)")
    p.add_argument("--num_workers", type=int, default=None, help="data-loading worker processes")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the network for the training steps (pays off on a GPU; see README 'Performance')")
    p.add_argument("--cache_dir", default=None,
                   help="cache the preprocessed cases here (exact float32 arrays, ~135 MB per full-size case, keyed "
                        "by the files' content): later epochs skip NIfTI decompression and percentiles")
    p.add_argument("--seed", type=int, default=None, help="random seed (weights, data order, noise)")
    p.add_argument("--resume", default=None, help="checkpoint to resume from, or 'auto' for <run_dir>/<target>/latest.pt")
    p.add_argument("--fats_nfe", type=int, nargs="+", default=list(FATS_NFE_BUDGETS), metavar="K",
                   help="FATS presets: NFE budgets whose sampling timesteps are learned after training "
                        "(default %(default)s; minutes each on a CPU, see --skip_fats_fit)")
    p.add_argument("--skip_fats_fit", action="store_true",
                   help="FATS presets: do not learn sampling timesteps after training (uniform steps are "
                        "used; scripts/fats_fit_steps.py can learn them later)")
    p.add_argument("--init_from", default=None, help="initial weights (e.g. a cWDM checkpoint); not a resume")
    p.add_argument("--residual_from", default=None, metavar="CHECKPOINT",
                   help="FATS v2 (presets fats2, demo_fats2): a regression model (preset regression) whose last-step "
                        "estimate's residual energies set the per-band shifts and the warm start (docs/fats_v2.md)")
    p.add_argument("--prediction", choices=PREDICTIONS, default=None,
                   help="what the network predicts: x0 (cWDM) or v (per-band preconditioned, passes x_t through near "
                        "t = 0; docs/prediction.md); default: the preset's")
    p.add_argument("--skip_data_check", action="store_true",
                   help="do not read every voxel before training (faster start on large datasets)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is visible")
    return p.parse_args(argv)


def train_one(args, preset, target: str, train_cases, val_cases, geometry, dist) -> Path:
    train_cfg = cli.override(
        preset.train, data_dir=str(args.data_dir), run_dir=str(Path(args.run_dir) / target), target_modality=target,
        max_steps=args.max_steps, save_interval=args.save_interval, val_interval=args.val_interval,
        log_interval=args.log_interval, image_interval=args.image_interval, batch_size=args.batch_size, lr=args.lr, precision=args.precision,
        num_workers=args.num_workers, seed=args.seed, init_from=args.init_from, val_dir=args.val_dir,
        compile=args.compile, cache_dir=args.cache_dir, residual_from=args.residual_from,
        val_cases=args.val_cases)
    model_cfg = cli.override(preset.model, use_checkpoint=True if args.use_checkpoint else None)
    geometry.check_divisible(model_cfg.spatial_divisor.bit_length())  # DWT (x2) + UNet downsamplings
    data = {"train": data_fingerprint(train_cases), "val": data_fingerprint(val_cases)}  # which data this run is
    earlier = Path(train_cfg.run_dir) / LATEST if args.resume == "auto" else args.resume
    if earlier and Path(earlier).is_file():  # never continue a run on other data (checked before any work)
        check_resume_data(Path(earlier).parent, data)
    train_set = dataset_for(train_cases, geometry, train_cfg.cache_dir)
    val_set = dataset_for(val_cases, geometry, train_cfg.cache_dir) if val_cases else None
    diffusion_cfg, schedule, extra = cli.override(preset.diffusion, prediction=args.prediction), None, {}
    check_fats_v2_settings(diffusion_cfg, train_cfg)
    if train_cfg.residual_from:  # FATS v2: residual shifts, per-band warm start, planned (and trained) steps
        regression = load_model(resolve_model_source(train_cfg.residual_from), device=dist.device)
        diffusion_cfg, schedule, extra = prepare_fats_v2_schedule(diffusion_cfg, train_set, target, regression,
                                                                  preset.sample, train_cfg.seed,
                                                                  source=train_cfg.residual_from)
    elif diffusion_cfg.kind == "fats":
        diffusion_cfg, schedule, extra = prepare_fats_schedule(diffusion_cfg, train_set, target, train_cfg.seed)
    extra = {"sample": preset.sample.to_dict(), **extra, "data": data}  # FATS v2 stores its own sample settings
    trainer = Trainer(model_cfg, diffusion_cfg, train_cfg, train_set, val_set, dist, schedule=schedule, extra=extra)
    run_dir = Path(train_cfg.run_dir)
    resume = args.resume
    if resume == "auto":
        resume = run_dir / LATEST if (run_dir / LATEST).is_file() else None
    elif resume is None and (run_dir / LATEST).exists():
        raise FileExistsError(f"{run_dir / LATEST} exists (an earlier run); pass --resume auto to continue it or "
                              "choose another --run_dir (checkpoints are never overwritten by a fresh start)")
    if dist.is_main:
        remove_partial_saves(run_dir)
    if resume:
        trainer.resume(resume)
    if dist.is_main:
        save_json({"model": model_cfg.to_dict(), "diffusion": diffusion_cfg.to_dict(), "train": train_cfg.to_dict(),
                   "geometry": {"original_shape": geometry.original_shape, "network_shape": geometry.network_shape},
                   "train_cases": [c.case_id for c in train_cases], "val_cases": [c.case_id for c in val_cases],
                   "data": data,
                   "run": run_info()}, run_dir / "run_config.json")
    bar = tqdm(total=train_cfg.max_steps, initial=trainer.step, desc=f"train {target}", disable=not dist.is_main,
               dynamic_ncols=True)

    def on_log(result):
        bar.update(result.step - bar.n)
        post = {"loss": f"{result.loss:.4g}", "it/s": f"{result.steps_per_s:.2f}"}
        if result.val_loss is not None:
            post["val"] = f"{result.val_loss:.4g}"
        bar.set_postfix(post)

    summary = trainer.run(on_log)
    bar.close()
    if train_cfg.residual_from:
        logger.info("%s: FATS v2 samples the planned steps it trained on (no timestep fit after training)", target)
    elif diffusion_cfg.kind == "fats" and val_cases and dist.is_main and not args.skip_fats_fit:
        fit_fats_steps(trainer, val_set, target, run_dir, preset.sample.precision, args.fats_nfe)
    if dist.world > 1:  # the other ranks wait here for rank 0's fitting (train_util.COLLECTIVE_TIMEOUT)
        torch.distributed.barrier()
    if dist.is_main:
        logger.info("%s: trained to step %d, best validation loss %.5g; checkpoints in %s", target, summary["step"],
                    summary["best_val"], run_dir)
    return run_dir


def check_fats_v2_settings(diffusion_cfg, train_cfg) -> None:
    """FATS v2 needs a FATS schedule for --residual_from, and --residual_from for sampled training steps."""
    if train_cfg.residual_from and diffusion_cfg.kind != "fats":
        raise ValueError(f"--residual_from sets per-band FATS shifts: it needs a FATS preset (fats2, demo_fats2), not "
                         f"schedule kind {diffusion_cfg.kind!r}")
    if train_cfg.train_timesteps == "sampled" and not train_cfg.residual_from:
        raise ValueError("this preset trains on the planned FATS v2 sampling steps (train_timesteps 'sampled'): pass "
                         "--residual_from <checkpoint of a regression model, e.g. trained with --preset regression>")


def dataset_for(cases, geometry, cache_dir: str):
    """The training cases as a dataset: read from the NIfTI files, or through the preprocessed-case
    cache in ``cache_dir`` (identical items; see ``volume_cache``)."""
    if not cache_dir:
        return BratsDataset(cases, geometry)
    return CachedBratsDataset(cases, cache_dir, geometry)


def remove_partial_saves(run_dir: Path) -> None:
    """Delete the temporary files that saves of a killed run left behind (``.<name>.<random>.tmp``,
    see ``fileio.atomic_write``); they are never taken for checkpoints, only cleaned up."""
    for tmp in sorted(run_dir.glob(".*.tmp")):
        logger.warning("removing %s, left by an interrupted save", tmp)
        tmp.unlink(missing_ok=True)


def fit_fats_steps(trainer, val_set, target: str, run_dir: Path, precision: str, nfes=FATS_NFE_BUDGETS) -> None:
    """FATS: learn the sampling timesteps of each budget in ``nfes`` (``--fats_nfe``) for the best
    checkpoint's EMA weights on the validation cases, and store them in best.pt and latest.pt."""
    source = run_dir / "best.pt" if (run_dir / "best.pt").is_file() else run_dir / LATEST
    trainer.ema.load_state_dict(read_checkpoint(source)["ema"])
    cases = held_out_cases(val_set, target, trainer.device, seed=trainer.cfg.seed)
    targets = [(read_checkpoint(run_dir / name), run_dir / name) for name in ("best.pt", LATEST)
               if (run_dir / name).is_file()]
    results = fit_and_store_timesteps(trainer.ema, trainer.target_schedule, cases, nfes, targets,
                                      seed=trainer.cfg.seed, precision=precision,
                                      progress=cli.FitProgress(f"fit {target} timesteps"))
    logger.info("stored learned sampling timesteps for NFE = %s (fitted on %s)", sorted(results), source.name)


def models_to_train(preset, preset_name: str, target: str) -> list[str]:
    """The run folders (targets) ``--target`` asks for: ``all`` is one model per modality, except
    for an all-modality preset, whose one model (folder ``all``) is the only thing it trains."""
    if preset.model.num_modality_labels:
        if target != ALL_TARGET:
            raise ValueError(f"--preset {preset_name} is one model for all modalities: train it with --target "
                             f"{ALL_TARGET} (got --target {target})")
        return [ALL_TARGET]
    return list(MODALITIES) if target == ALL_TARGET else [target]


def main(argv=None) -> int:
    args = parse_args(argv)
    preset = get_preset(args.preset)
    targets = models_to_train(preset, args.preset, args.target)
    dist = setup_distributed(prefer_cuda=not args.cpu)
    cases, failures, geometry = cli.find_cases(args.data_dir, "train", check_data=not args.skip_data_check)
    if args.val_dir:
        val_cases, val_failures, val_geometry = cli.find_cases(args.val_dir, "train",
                                                               check_data=not args.skip_data_check)
        if val_geometry != geometry:
            raise CaseError(Path(args.val_dir), f"validation cases are {val_geometry.original_shape}, training cases "
                                                f"{geometry.original_shape} ({args.data_dir})")
        failures += val_failures
        train_cases = cases
    else:
        n_val = preset.train.val_cases if args.val_cases is None else args.val_cases
        if n_val >= len(cases):
            n_val = 0
            logger.warning("only %d cases: training without validation", len(cases))
        train_cases, val_cases = cases[: len(cases) - n_val], cases[len(cases) - n_val:]
    logger.info("%d training cases, %d validation cases, network grid %s (preset %s)", len(train_cases),
                len(val_cases), geometry.network_shape, args.preset)
    for target in targets:
        lock = hold_run_lock(Path(args.run_dir) / target) if dist.is_main else contextlib.nullcontext()
        try:
            with lock:  # one training per run folder (RunLocked, one line, when another one holds it)
                train_one(args, preset, target, train_cases, val_cases, geometry, dist)
        except TrainingDiverged as err:
            failures.append(f"{target}: {err}")
            logger.error("%s: %s", target, err)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return cli.report_failures(failures, "cases or models")


def run() -> None:
    """Console entry point ``fast-cwdm-train`` (and ``python scripts/train.py``)."""
    cli.main_guard(main)
