r"""Score a folder of syntheses by downstream segmentation: Dice / HD95 (WT, TC, ET) with each synthesis in place
of the real modality, next to the same scores with the real modality (the upper bound).

    python scripts/score_segmentation.py --segmenter runs/demo/segmenter/segmenter.pt \
        --data_dir demo_data/pseudo_validation_gt --synth_dir results/demo_t2f --target t2f

(installed: ``fast-cwdm-score-segmentation``). --data_dir holds the complete cases with their ``-seg`` files;
--synth_dir the syntheses ``<case>/<case>-<target>.nii.gz`` (sample.py's or sample_auto.py's output layout).
Writes ``segmentation_metrics.json`` (per case and summary; --out to choose another file; never replaced
without --overwrite). A case without a synthesis or a segmentation is skipped and listed at the end (exit code 1).
"""
from __future__ import annotations

import logging
from pathlib import Path

from guided_diffusion import cli
from guided_diffusion.bratsloader import expected_path, load_case
from guided_diffusion.fileio import save_json
from guided_diffusion.metrics import MISSING_VALUE_NOTE, strict_json, summarize
from guided_diffusion.segmentation import SEG_METRIC_KEYS, SEG_METRICS_NOTE, load_segmenter, score_synthesis

logger = logging.getLogger("score_segmentation")


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--segmenter", required=True, help="a scripts/train_segmenter.py checkpoint")
    p.add_argument("--data_dir", required=True, help="BraTS-layout folder of complete cases with segmentations")
    p.add_argument("--synth_dir", required=True, help="folder of <case>/<case>-<target>.nii.gz syntheses")
    cli.add_target_argument(p, "the synthesised modality", required=True)
    p.add_argument("--out", default=None, help="results file (default <synth_dir>/segmentation_metrics.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out) if args.out else Path(args.synth_dir) / "segmentation_metrics.json"
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it or choose another --out")
    cases, failures, geometry = cli.find_cases(args.data_dir, "train", check_data=False)
    segmenter = load_segmenter(args.segmenter, cli.default_device(args.device), geometry)
    records = []
    for case in cases:
        synthesis = expected_path(Path(args.synth_dir) / case.case_id, args.target)
        try:
            records.append({"case_id": case.case_id,
                            **score_synthesis(segmenter, load_case(case, geometry), args.target, synthesis, geometry)})
        except Exception as err:  # one line per bad case; the batch goes on
            failures.append(cli.case_error(err, synthesis, log=logger))
    summary = summarize(records, SEG_METRIC_KEYS)
    save_json(strict_json({"cases": records, "summary": summary, "segmenter": args.segmenter,
                           "target_modality": args.target, "data_dir": args.data_dir, "synth_dir": args.synth_dir,
                           "segmentation_metrics": SEG_METRICS_NOTE, "missing_values": MISSING_VALUE_NOTE}), out)
    for key in SEG_METRIC_KEYS:
        print(f"{key:<14}{summary[key]['mean']:>10.4f}  (n={summary[key]['n']})")
    print(f"scored {len(records)} cases; wrote {out}")
    return cli.report_failures(failures, "cases")


def run() -> None:
    """Console entry point ``fast-cwdm-score-segmentation`` (and ``python scripts/score_segmentation.py``)."""
    cli.main_guard(main)
