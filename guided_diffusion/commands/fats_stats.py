"""Measure FATS wavelet energy statistics of one target modality (design step 1).

For each training case: the target volume on the network grid -> its 8 normalised Haar
subbands (LLL / 3) -> mean energy per band inside the brain mask (max-pooled 2x2x2 to the
subband grid). Writes a JSON with the statistics and, for reference, the energy-equalising
shifts at kappa = 1 (``delta_b = -log(E_b / mean E)``, capped at 4).

Example (from the repo root):
    python scripts/fats_stats.py --data_dir data/demo/training --target t2f --out runs/fats_stats_t2f.json
"""
from __future__ import annotations

import itertools
import logging
import random
import time

from DWT_IDWT import to_subbands
from guided_diffusion import cli
from guided_diffusion.bratsloader import BratsDataset, CaseError
from guided_diffusion.conditioning import split_case
from guided_diffusion.fileio import save_json
from guided_diffusion.fats import band_energy_stats, shifts_from_energy

logger = logging.getLogger("fats_stats")


def parse_args(argv: list[str] | None = None):
    parser = cli.ArgumentParser(description=__doc__)
    add = parser.add_argument
    add("--data_dir", required=True, help="BraTS-layout training folder (one sub-folder per case, all four modalities)")
    cli.add_target_argument(parser, "target modality whose subbands are measured", required=True)
    add("--out", required=True, help="output JSON file")
    add("--max_cases", type=int, default=0, help="measure a random sample of at most this many cases (0: all)")
    add("--seed", type=int, default=0, help="seed of the case sample (default 0)")
    return parser.parse_args(argv)


def _targets(dataset: BratsDataset, indices: list[int], target: str, used: list[str], failures: list):
    """Yield (target subbands (1, 8, d, h, w), brain mask (D, H, W)) per readable case."""
    for i in indices:
        try:
            item = dataset[i]
        except CaseError as err:
            failures.append(err)
            continue
        target_volume, _ = split_case(item["volumes"][None], target)
        used.append(item["case_id"])
        logger.debug("case %s", item["case_id"])
        yield to_subbands(target_volume), item["brain_mask"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.max_cases < 0:
        return cli.fatal(f"--max_cases must be >= 0, got {args.max_cases}")
    cases, errors, geometry = cli.find_cases(args.data_dir, "train", check_data=False)
    indices = list(range(len(cases)))
    if args.max_cases and args.max_cases < len(indices):
        indices = sorted(random.Random(args.seed).sample(indices, args.max_cases))
    dataset = BratsDataset(cases, geometry)
    used, failures = [], list(errors)
    start = time.perf_counter()
    # Streamed: zip inside band_energy_stats keeps at most one case in the tee buffer.
    first, second = itertools.tee(_targets(dataset, indices, args.target, used, failures))
    try:
        stats = band_energy_stats((p[0] for p in first), (p[1] for p in second))
    except ValueError:
        if not used:
            return cli.fatal(f"no readable case among the {len(indices)} selected in {args.data_dir}: {failures[:1]}")
        raise
    stats.update({
        "target_modality": args.target, "data_dir": str(args.data_dir), "case_ids": used,
        "network_shape": list(geometry.network_shape), "seed": args.seed, "max_cases": args.max_cases,
        "shifts_kappa1_mean": list(shifts_from_energy(stats, kappa=1.0, reference="mean")),
    })
    save_json(stats, args.out)
    logger.info("measured %d cases in %.1f s -> %s; energy per band: %s", len(used), time.perf_counter() - start,
                args.out, ", ".join(f"{b} {e:.3g}" for b, e in stats["energy"].items()))
    return cli.report_failures(failures, "cases")


def run() -> None:
    """Console entry point ``fast-cwdm-fats-stats`` (and ``python scripts/fats_stats.py``)."""
    cli.main_guard(main)
