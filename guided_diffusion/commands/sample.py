"""Synthesise one modality for cases with ground truth, write NIfTI on the input grid, score it.

    python scripts/sample.py --checkpoint runs/demo/t2f/best.pt --data_dir data/demo/training --contr t2f \
        --out_dir results/demo_t2f [--sampler ddim --steps 4]

Writes <out_dir>/<case>/<case>-<contr>.nii.gz, metrics.json, metrics.csv, sample_config.json and
a PNG slice figure. Bad cases are skipped and reported at the end (exit code 1).
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cli_common as cli  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from guided_diffusion.bratsloader import CaseError, expected_path, load_case, save_volume, to_original_grid  # noqa: E402
from guided_diffusion.checkpoints import load_model, resolve_model_source, CheckpointError  # noqa: E402
from guided_diffusion.fileio import atomic_write  # noqa: E402
from guided_diffusion.conditioning import MODALITIES, cond_modalities, modality_index  # noqa: E402
from guided_diffusion.config import SAMPLERS, SampleConfig  # noqa: E402
from guided_diffusion.fileio import save_json  # noqa: E402
from guided_diffusion.figures import slice_figure  # noqa: E402
from guided_diffusion.metrics import METRIC_KEYS, evaluate_case, summarize  # noqa: E402
from guided_diffusion.runinfo import run_info  # noqa: E402
from guided_diffusion.synthesis import choose_steps, synthesize  # noqa: E402

logger = logging.getLogger("sample")
RESULT_FILES = ("sample_config.json", "metrics.json", "metrics.csv", "slice.png")  # one set per --out_dir


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="ddpm (ancestral) or ddim (deterministic with eta=0)")
    p.add_argument("--steps", type=int, default=None,
                   help="network evaluations per volume; 0 = the checkpoint's default (learned FATS steps or all steps)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (0 = deterministic)")
    p.add_argument("--no_clip", action="store_true", help="disable cWDM's x0 clipping (IDWT, clamp [0,1], DWT)")
    p.add_argument("--seed", type=int, default=None, help="seed; each case's noise depends on (seed, case id) only")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="bf16 = autocast the network")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def sample_config_from_args(args, checkpoint_default: SampleConfig) -> SampleConfig:
    return cli.override(checkpoint_default, sampler=args.sampler, steps=args.steps, eta=args.eta, seed=args.seed,
                        precision=args.precision, clip_denoised=False if args.no_clip else None)


def checkpoint_sample_defaults(loaded) -> SampleConfig:
    """The sampling settings stored with the model by its preset (SampleConfig defaults otherwise)."""
    return SampleConfig.from_dict(loaded.extra.get("sample", {}))


def check_model_target(loaded, target: str, source: str) -> None:
    """Refuse a model trained to synthesise another modality (cWDM weights do not say: accepted)."""
    trained = loaded.target_modality
    if trained and trained != target and not loaded.model_config.num_modality_labels:
        raise CheckpointError(f"{source}: this model was trained to synthesise {trained}, not {target}")


def default_device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model: a .pt/.safetensors path or hf://<org>/<repo>/<file>[@rev]")
    p.add_argument("--data_dir", required=True, help="BraTS-layout folder of cases with all four modalities")
    p.add_argument("--contr", required=True, choices=MODALITIES, help="modality to synthesise")
    p.add_argument("--hf_cache", default=None, help="Hugging Face cache folder for hf:// models (default: the hub's own)")
    p.add_argument("--out_dir", required=True, help="output folder (created; existing outputs are not overwritten)")
    p.add_argument("--max_cases", type=int, default=0, help="only the first N cases (0 = all)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out_dir")
    add_sampling_arguments(p)
    return p.parse_args(argv)


def write_metrics(out_dir: Path, records: list[dict], meta: dict) -> dict:
    summary = summarize(records, METRIC_KEYS)
    save_json({"cases": records, "summary": summary, **meta}, out_dir / "metrics.json")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["case_id", *METRIC_KEYS, "seconds"])
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


def main(argv=None) -> int:
    cli.setup_logging()
    args = parse_args(argv)
    device = default_device(args.device)
    loaded = load_model(resolve_model_source(args.checkpoint, args.hf_cache), device=device)
    check_model_target(loaded, args.contr, args.checkpoint)
    cfg = sample_config_from_args(args, checkpoint_sample_defaults(loaded))
    steps, steps_origin = choose_steps(loaded, cfg)
    cases, failures, geometry = cli.find_cases(args.data_dir, "train", check_data=False)
    try:
        geometry.check_divisible(loaded.model_config.spatial_divisor.bit_length())  # DWT (x2) + UNet downsamplings
    except ValueError as err:
        raise CaseError(Path(args.data_dir), f"the cases do not fit the model {args.checkpoint}: {err}") from None
    if args.max_cases:
        cases = cases[: args.max_cases]
    out_dir = Path(args.out_dir)
    earlier = [name for name in RESULT_FILES if (out_dir / name).exists()]
    if earlier and not args.overwrite:
        raise FileExistsError(f"{out_dir} already holds the results of an earlier run ({', '.join(earlier)}); "
                              "pass --overwrite to replace them or choose another --out_dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    logger.info("synthesising %s for %d cases with %s, %d network evaluations (%s), on %s", args.contr, len(cases),
                cfg.sampler, len(steps), steps_origin, device)
    records, figure = [], None
    target_idx = modality_index(args.contr)
    for case in tqdm(cases, desc=f"sample {args.contr}", dynamic_ncols=True):
        out_path = expected_path(out_dir / case.case_id, args.contr)
        try:
            if out_path.exists() and not args.overwrite:
                raise CaseError(out_path, "output exists; pass --overwrite to replace it")
            data = load_case(case, geometry)
            start = time.perf_counter()
            pred = synthesize(loaded, torch.from_numpy(data.volumes)[None], args.contr, cfg, [case.case_id], steps)[0]
            seconds = time.perf_counter() - start
            save_volume(out_path, to_original_grid(pred.numpy(), geometry), data.reference, overwrite=args.overwrite)
            gt = data.volumes[target_idx]
            try:
                metrics = evaluate_case(pred.numpy(), gt, data.brain_mask, data.seg)
            except ValueError as err:  # the volume is written; the case still counts as failed
                raise CaseError(case.files[args.contr], f"cannot evaluate the synthesis against it: {err}") from None
            record = {"case_id": case.case_id, "seconds": seconds, **metrics}
            records.append(record)
            if figure is None:
                panels = [(m, data.volumes[modality_index(m)]) for m in cond_modalities(args.contr)]
                panels += [(f"{args.contr} (truth)", gt), (f"{args.contr} (synthesis)", pred.numpy())]
                figure = slice_figure(out_dir / "slice.png", panels, title=f"{case.case_id}: {args.contr}, "
                                      f"{len(steps)} NFE", error_pair=(3, 4))
        except CaseError as err:
            failures.append(err)
            logger.error("%s", err)
    meta = {"checkpoint": args.checkpoint, "target_modality": args.contr, "sample_config": cfg.to_dict(),
            "steps": steps, "nfe": len(steps), "steps_origin": steps_origin, "device": str(device),
            "model_config": loaded.model_config.to_dict(), "diffusion_config": loaded.diffusion_config.to_dict(),
            "metrics_grid": "network grid (cropped/padded), BraSyn normalisation", "run": run_info()}
    save_json(meta, out_dir / "sample_config.json")
    if records:
        summary = write_metrics(out_dir, records, meta)
        print(format_table(summary))
        print(f"wrote {len(records)} volumes, {out_dir / 'metrics.json'}, {out_dir / 'metrics.csv'}"
              + (f", {figure}" if figure else ""))
    return cli.report_failures(failures, "cases")


if __name__ == "__main__":
    cli.main_guard(main)
