r"""Synthesise one modality for cases with ground truth, write NIfTI on the input grid, score it.

    python scripts/sample.py --checkpoint runs/demo/t2f/best.pt --data_dir data/demo/training --target t2f \
        --out_dir results/demo_t2f [--sampler ddim --nfe 4]

(installed: ``fast-cwdm-sample`` with the same flags). Writes <out_dir>/<case>/<case>-<target>.nii.gz,
metrics.json, metrics.csv, sample_config.json and a PNG slice figure of the first case (needs the
``figures`` extra; skipped with a warning without it). Bad cases are skipped and reported at the
end (exit code 1). ``--num_samples M`` > 1: the synthesis is the mean of M samples, with a std map
<case>-<target>_std.nii.gz and ensemble metrics (CRPS, spread/error, calibration; docs/uncertainty.md).
"""
from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from guided_diffusion import case_runner, cli
from guided_diffusion.bratsloader import (CaseError, expected_path, load_case, save_volume, synthesis_description,
                                         to_original_grid)
from guided_diffusion.checkpoints import load_model, resolve_model_source
from guided_diffusion.conditioning import cond_modalities, modality_index, zero_outside_head
from guided_diffusion.ensembles import case_ensemble, save_ensemble
from guided_diffusion.extras import MissingExtraError
from guided_diffusion.figures import slice_figure
from guided_diffusion.fileio import atomic_write, save_json
from guided_diffusion.metrics import METRIC_KEYS, MISSING_VALUE_NOTE, evaluate_case, strict_json, summarize
from guided_diffusion.prob_metrics import ENSEMBLE_METRIC_KEYS, ensemble_metrics
from guided_diffusion.provenance import held_out_case_ids, model_provenance
from guided_diffusion.runinfo import run_info
from guided_diffusion.segmentation import SEG_METRIC_KEYS, SEG_METRICS_NOTE, load_segmenter, score_synthesis
from guided_diffusion.synthesis import synthesize
from guided_diffusion.timesteps import plan_timesteps

logger = logging.getLogger("sample")
RESULT_FILES = ("sample_config.json", "metrics.json", "metrics.csv", "slice.png")  # one set per --out_dir
ENSEMBLE_METRICS_NOTE = ("--num_samples > 1: the PSNR/SSIM keys score the ensemble mean; crps_*, spread_error_*, "
                         "std_error_spearman and top10_std_error_ratio (prob_metrics.ensemble_metrics) score the "
                         "samples on the same network grid, brain mask and tumour mask (seg > 0), intensities as "
                         "sampled and as loaded ([0, 1]), without the per-volume percentile normalisation "
                         "(docs/uncertainty.md)")


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", required=True, help="model: a .pt/.safetensors path or hf://<org>/<repo>/<file>[@rev]")
    p.add_argument("--data_dir", required=True, help="BraTS-layout folder of cases with all four modalities")
    cli.add_target_argument(p, "modality to synthesise", required=True)
    p.add_argument("--hf_cache", default=None, help="Hugging Face cache folder for hf:// models (default: the hub's own)")
    p.add_argument("--out_dir", required=True, help="output folder (created; existing outputs are not overwritten)")
    p.add_argument("--max_cases", type=cli.nonnegative_int, default=0, help="only the first N cases (0 = all)")
    p.add_argument("--held_out_of", default=None, metavar="RUN_CONFIG",
                   help="only the validation cases a training run held out (its run_config.json, or the folder "
                        "holding it): score a model on cases it was not trained on")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out_dir")
    p.add_argument("--resume", action="store_true",
                   help="record each finished case; a re-run skips the cases whose outputs are complete and "
                        "verified (SHA-256) and writes the results of all of them (start the job with it too)")
    p.add_argument("--segmenter", default=None, metavar="CHECKPOINT",
                   help="a scripts/train_segmenter.py checkpoint: also report tumour Dice / HD95 (WT, TC, ET) with "
                        "the synthesis in place of the real target, and with the real target (docs/segmentation.md)")
    cli.add_sampling_arguments(p)
    cli.add_ensemble_arguments(p)
    return p.parse_args(argv)


def write_metrics(out_dir: Path, records: list[dict], meta: dict, keys=METRIC_KEYS) -> dict:
    summary = summarize(records, keys)
    save_json(strict_json({"cases": records, "summary": summary, "missing_values": MISSING_VALUE_NOTE, **meta}),
              out_dir / "metrics.json")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["case_id", *keys, "seconds"])
    writer.writeheader()
    for rec in records:
        writer.writerow({k: rec.get(k) for k in writer.fieldnames})
    atomic_write(out_dir / "metrics.csv", lambda tmp: Path(tmp).write_text(buf.getvalue()))
    return summary


def format_table(summary: dict) -> str:
    lines = [f"{'metric':<12}{'mean':>10}{'std':>10}{'median':>10}"]
    for key, stats in summary.items():
        lines.append(f"{key:<12}{stats['mean']:>10.4f}{stats['std']:>10.4f}{stats['median']:>10.4f}")
    return "\n".join(lines)


def write_figure(path: Path, case_id: str, volumes, pred, target: str, nfe: int, seg=None, std=None,
                 num_samples: int = 1) -> Path | None:
    """One axial slice of the conditions, the truth, the synthesis and the error (and the std map
    of an ensemble) as a PNG; None (with a warning) when the ``figures`` extra is not installed.

    Args:
        volumes: (4, X, Y, Z) the case's modalities; pred: (X, Y, Z) the synthesis of ``target``;
        seg: (X, Y, Z) tumour labels or None (the figure shows the slice with the most tumour);
        std: (X, Y, Z) the per-voxel std of ``num_samples`` samples, or None.
    """
    panels = [(m, volumes[modality_index(m)]) for m in cond_modalities(target)]
    panels += [(f"{target} (truth)", volumes[modality_index(target)]), (f"{target} (synthesis)", pred)]
    try:
        title = f"{case_id}: {target}, {nfe} NFE" + (f", mean of {num_samples} samples" if std is not None else "")
        uncertainty = (f"std ({num_samples} samples)", std) if std is not None else None
        return slice_figure(path, panels, title=title, error_pair=(3, 4), seg=seg, uncertainty=uncertainty)
    except MissingExtraError as err:
        logger.warning("no slice figure: %s", err)
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    cli.check_ensemble_arguments(args)
    ranks = case_runner.ranks_from_env()  # torchrun: each rank samples its share, rank 0 writes the results
    device = case_runner.rank_device(cli.default_device(args.device), ranks)
    model_path = resolve_model_source(args.checkpoint, args.hf_cache)
    loaded = load_model(model_path, device=device, cwdm_args=args.cwdm_args)
    cli.check_model_target(loaded, args.target, args.checkpoint)
    cfg = cli.sample_config_from_args(args, cli.checkpoint_sample_defaults(loaded))
    cli.check_sampler(cfg, loaded, args.checkpoint)
    timesteps, timesteps_origin = plan_timesteps(loaded.schedule, loaded.fats_state, cfg.nfe, cfg.warm_start_t)
    cases, failures, geometry = cli.find_cases(args.data_dir, "train", check_data=False)
    cli.check_fits_model(geometry, loaded, args.checkpoint, args.data_dir)
    segmenter = load_segmenter(args.segmenter, device, geometry) if args.segmenter else None
    evaluated_on = f"every case of {args.data_dir}"
    if args.held_out_of:
        held_out = set(held_out_case_ids(args.held_out_of))
        absent = sorted(held_out - {c.case_id for c in cases})
        if absent:
            raise CaseError(Path(args.data_dir), f"{len(absent)} held-out cases of {args.held_out_of} are not here "
                                                 f"(e.g. {absent[0]})")
        cases = [c for c in cases if c.case_id in held_out]
        evaluated_on = f"the {len(cases)} cases held out by the training run ({args.held_out_of})"
    if args.max_cases:
        cases = cases[: args.max_cases]
    logger.info("scoring on %s", evaluated_on)
    out_dir = Path(args.out_dir)
    earlier = [name for name in RESULT_FILES if (out_dir / name).exists()]
    if earlier and not (args.overwrite or args.resume):
        raise FileExistsError(f"{out_dir} already holds the results of an earlier run ({', '.join(earlier)}); "
                              "pass --overwrite to replace them or choose another --out_dir")
    cli.check_output_dir(out_dir, [p for c in cases for p in c.files.values()], input_dir=args.data_dir)
    case_runner.meet(ranks)  # every rank has checked the folder before any rank writes into it
    logger.info("synthesising %s for %d cases with %s, %d network evaluations (%s), on %s", args.target, len(cases),
                cfg.sampler, len(timesteps), timesteps_origin, device)
    order, share = [c.case_id for c in cases], case_runner.split_cases(cases, ranks)
    failures = failures if ranks.is_main else []  # every rank found the same bad cases: rank 0 reports them
    journal = case_runner.CaseJournal(out_dir) if args.resume else None
    model_record = model_provenance(loaded, args.checkpoint, model_path, cfg)  # hashes the checkpoint once
    settings = case_runner.settings_digest({
        "model_sha256": model_record["sha256"] if journal else None, "target": args.target,
        "sample_config": cfg.to_dict(), "timesteps": timesteps, "keep_background": args.keep_background,
        **({"num_samples": args.num_samples, "save_samples": args.save_samples} if args.num_samples > 1 else {}),
        **({"segmenter": args.segmenter} if segmenter else {})})
    records, figure, interrupted = [], None, None
    description = synthesis_description(args.target, cfg.sampler, len(timesteps), model_record["sha256"])
    figure_wanted = ranks.is_main and not (args.resume and (out_dir / "slice.png").exists())
    target_idx = modality_index(args.target)
    for case in tqdm(share, desc=f"sample {args.target}", dynamic_ncols=True):
        out_path = expected_path(out_dir / case.case_id, args.target)
        try:
            done = journal.completed(out_path, settings) if journal else None
            if done is not None:  # finished by an earlier, interrupted run
                records.append(done)
                continue
            if out_path.exists() and not args.overwrite:
                raise CaseError(out_path, "output exists; pass --overwrite to replace it")
            data = load_case(case, geometry)
            start = time.perf_counter()
            volumes = torch.from_numpy(data.volumes)[None]
            progress = cli.step_progress(len(timesteps), f"{case.case_id} {args.target}")
            if args.num_samples > 1:  # an ensemble: its mean is the synthesis, plus the std map
                ensemble = case_ensemble(loaded, volumes, args.target, cfg, case.case_id, args.num_samples, timesteps,
                                         keep_background=args.keep_background, callback=progress)
                samples, pred, std = ensemble.samples, ensemble.mean, ensemble.std
                seconds = time.perf_counter() - start
                save_ensemble(out_path, args.target, ensemble, geometry, data.reference, description,
                              overwrite=args.overwrite, save_samples=args.save_samples)
            else:
                samples = std = None
                pred = synthesize(loaded, volumes, args.target, cfg, [case.case_id], timesteps, callback=progress)
                pred = (pred if args.keep_background else zero_outside_head(pred, volumes, args.target))[0]
                seconds = time.perf_counter() - start
                save_volume(out_path, to_original_grid(pred.numpy(), geometry), data.reference,
                            overwrite=args.overwrite, description=description)
            gt = data.volumes[target_idx]
            try:
                metrics = evaluate_case(pred.numpy(), gt, data.brain_mask, data.seg)
                if samples is not None:  # on the same grid and masks as PSNR / SSIM
                    metrics.update(ensemble_metrics(samples.numpy(), gt, data.brain_mask,
                                                    None if data.seg is None else data.seg > 0))
            except ValueError as err:  # the volume is written; the case still counts as failed
                raise CaseError(case.files[args.target], f"cannot evaluate the synthesis against it: {err}") from None
            if segmenter:  # reads the synthesis file just written, as a downstream user would
                metrics.update(score_synthesis(segmenter, data, args.target, out_path, geometry))
            record = {"case_id": case.case_id, "seconds": seconds, **metrics}
            records.append(record)
            if journal:
                journal.record(out_path, settings, record)
            if figure_wanted:
                figure_wanted = False
                figure = write_figure(out_dir / "slice.png", case.case_id, data.volumes, pred.numpy(), args.target,
                                      len(timesteps), data.seg, None if std is None else std.numpy(),
                                      args.num_samples)
        except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: the temporary file is gone; report what was done
            interrupted = err
            failures.append(CaseError(out_path, f"not done: {err or 'interrupted'}"))
            break
        except Exception as err:  # any problem of one case is one line; the batch goes on
            failures.append(cli.case_error(err, out_path, log=logger))
    if not case_runner.collect(ranks, records, failures, "records", order):  # rank 0 writes the results
        return cli.EXIT_OK  # and returns the exit code of all ranks
    meta = {"checkpoint": args.checkpoint, "target_modality": args.target, "sample_config": cfg.to_dict(),
            "timesteps": timesteps, "nfe": len(timesteps), "timesteps_origin": timesteps_origin, "device": str(device),
            "model_config": loaded.model_config.to_dict(), "diffusion_config": loaded.diffusion_config.to_dict(),
            "metrics_grid": "network grid (cropped/padded), BraSyn normalisation", "evaluated_on": evaluated_on,
            "num_samples": args.num_samples,
            **({"segmenter": args.segmenter, "segmentation_metrics": SEG_METRICS_NOTE} if segmenter else {}),
            **({"ensemble_metrics": ENSEMBLE_METRICS_NOTE} if args.num_samples > 1 else {}),
            "background": cli.background_note(args.keep_background),
            "model": model_record, "run": run_info()}
    save_json(meta, out_dir / "sample_config.json")
    if records:
        summary = write_metrics(out_dir, records, meta,
                                [*METRIC_KEYS, *(ENSEMBLE_METRIC_KEYS if args.num_samples > 1 else ()),
                                 *(SEG_METRIC_KEYS if segmenter else ())])
        print(format_table(summary))
        print(f"wrote {len(records)} volumes, {out_dir / 'metrics.json'}, {out_dir / 'metrics.csv'}"
              + (f", {figure}" if figure else ""))
    case_runner.finish(ranks)
    code = cli.report_failures(failures, "cases")
    return cli.interrupt_exit_code(interrupted) if interrupted else code


def run() -> None:
    """Console entry point ``fast-cwdm-sample`` (and ``python scripts/sample.py``)."""
    cli.main_guard(main)
