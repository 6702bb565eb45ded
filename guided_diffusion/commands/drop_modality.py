r"""Build a pseudo-validation set: copy BraTS cases, dropping one modality per case.

Example (from the repo root):
    python scripts/drop_modality.py --input data/BraTS/validation \
        --output data/BraTS/pseudo_validation --seed 0

The dropped modality (seeded per case id) is recorded in
``<output>/missing_modalities.json`` as ``{case_id: modality}``. Files are copied
byte for byte; the input is only read. Incomplete, unreadable or corrupt input cases
(every voxel is read unless --skip_data_check) are skipped and listed at the end (exit code 1).
"""
from __future__ import annotations

import logging
from collections import Counter

from guided_diffusion import cli
from guided_diffusion.demo_data import drop_modalities

logger = logging.getLogger("drop_modality")


def parse_args(argv: list[str] | None = None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--input", required=True, help="BraTS-layout folder of complete cases (only read)")
    p.add_argument("--output", required=True, help="folder to create with the reduced cases")
    p.add_argument("--seed", type=int, default=0, help="random seed of the dropped modalities (default 0)")
    p.add_argument("--keep_seg", action="store_true",
                   help="also copy the segmentations (BraSyn validation has none; default off)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    p.add_argument("--skip_data_check", action="store_true",
                   help="check headers only, not every voxel (faster; a corrupt file would then be copied as it is)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing, errors = drop_modalities(args.input, args.output, seed=args.seed, keep_seg=args.keep_seg,
                                      overwrite=args.overwrite, check_data=not args.skip_data_check)
    logger.info("wrote %d cases to %s, dropped: %s", len(missing), args.output,
                dict(sorted(Counter(missing.values()).items())))
    return cli.report_failures(errors, "input cases")


def run() -> None:
    """Console entry point ``fast-cwdm-drop-modality`` (and ``python scripts/drop_modality.py``)."""
    cli.main_guard(main)
