"""Measure FATS wavelet energy statistics of one target modality (design step 1).

For each selected case: the target volume on the network grid -> its 8 normalised Haar
subbands (LLL / 3) -> mean energy per band inside the brain mask (max-pooled 2x2x2 to the
subband grid). Writes a JSON with the statistics and, for reference, the energy-equalising
shifts at kappa = 1 (``delta_b = -log(E_b / mean E)``, capped at 4).

It runs ``fats_training.measure_energy``, the function FATS training runs: the same cases, seed
and --max_cases (training's default: 32) give exactly the statistics a training run stored in its
checkpoint (``extra["fats"]["energy_stats"]``). Training measures its training cases, i.e. the
data folder without the validation cases it held out.

Example (from the repo root):
    python scripts/fats_stats.py --data_dir data/demo/training --target t2f --out runs/fats_stats_t2f.json
"""
from __future__ import annotations

import logging
import time

from guided_diffusion import cli
from guided_diffusion.bratsloader import BratsDataset, CaseError
from guided_diffusion.fats import shifts_from_energy
from guided_diffusion.fats_training import DEFAULT_STAT_CASES, measure_energy
from guided_diffusion.fileio import save_json

logger = logging.getLogger("fats_stats")


def parse_args(argv: list[str] | None = None):
    parser = cli.ArgumentParser(description=__doc__)
    add = parser.add_argument
    add("--data_dir", required=True, help="BraTS-layout training folder (one sub-folder per case, all four modalities)")
    cli.add_target_argument(parser, "target modality whose subbands are measured", required=True)
    add("--out", required=True, help="output JSON file")
    add("--max_cases", type=int, default=DEFAULT_STAT_CASES,
        help="measure a seeded sample of at most this many cases (0: all; default %(default)s, as training)")
    add("--seed", type=int, default=0, help="seed of the case sample (training uses its --seed; default 0)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.max_cases < 0:
        return cli.fatal(f"--max_cases must be >= 0, got {args.max_cases}")
    cases, errors, geometry = cli.find_cases(args.data_dir, "train", check_data=False)
    failures = list(errors)
    start = time.perf_counter()
    try:
        stats = measure_energy(BratsDataset(cases, geometry), args.target, args.max_cases, args.seed,
                               skip_errors=(CaseError,), skipped=failures)
    except ValueError:
        if len(failures) > len(errors):  # every selected case failed to read
            return cli.fatal(f"no readable case among those selected in {args.data_dir}: {failures[len(errors)]}")
        raise
    stats.update({
        "data_dir": str(args.data_dir), "network_shape": list(geometry.network_shape),
        "shifts_kappa1_mean": list(shifts_from_energy(stats, kappa=1.0, reference="mean")),
    })
    save_json(stats, args.out)
    logger.info("measured %d cases in %.1f s -> %s; energy per band: %s", stats["n_volumes"],
                time.perf_counter() - start, args.out, ", ".join(f"{b} {e:.3g}" for b, e in stats["energy"].items()))
    return cli.report_failures(failures, "cases")


def run() -> None:
    """Console entry point ``fast-cwdm-fats-stats`` (and ``python scripts/fats_stats.py``)."""
    cli.main_guard(main)
