"""Measure how unpredictable each demo target is: the ideal-regressor floor and R_b/E_b per Haar band.

Examples (from the repo root):
    python scripts/demo_floors.py --data data/demo_v2/test --json results/demo_floors_v2.json
    python scripts/demo_floors.py --simulate 1 --n_cases 4 --json results/demo_floors_v1.json

--data reads a v2 test folder (make_demo_data --version 2): each case's own target against its
oracle/ draws, preprocessed as the training loader preprocesses volumes. --simulate 1|2 re-simulates
in memory instead (v1: v1's held-out cases with only the target's own random numbers re-drawn).
Per modality: brain and tumour (seg > 0) MSE of the oracle mean against the case's own target,
times N/(N+1) (the finite-N correction), its PSNR, and per band R_b/E_b (conditional variance over
energy). Printed as a table and written to --json with the resolved settings and every case.
"""
from __future__ import annotations

import logging
import time

from DWT_IDWT import BAND_NAMES
from guided_diffusion import cli
from guided_diffusion.bratsloader import Geometry
from guided_diffusion.constants import MODALITIES
from guided_diffusion.demo_floors import floors_from_dataset, simulated_floors, summarize
from guided_diffusion.fileio import save_json

logger = logging.getLogger("demo_floors")


def parse_args(argv: list[str] | None = None):
    p = cli.ArgumentParser(description=__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="a v2 test folder (<case>/ with oracle/ inside each case)")
    source.add_argument("--simulate", type=int, choices=(1, 2),
                        help="re-simulate demo version 1 or 2 in memory instead of reading --data")
    p.add_argument("--json", required=True, help="where to write the floors (JSON)")
    p.add_argument("--modalities", nargs="+", choices=MODALITIES, default=list(MODALITIES),
                   help="target modalities to measure (default all four)")
    p.add_argument("--size", type=float, default=0.25, help="--simulate: scale of the BraTS grid (default 0.25)")
    p.add_argument("--seed", type=int, default=0, help="--simulate: the dataset seed (default 0)")
    p.add_argument("--n_cases", type=int, default=4, help="--simulate: held-out cases (default 4)")
    p.add_argument("--oracle_draws", type=int, default=8, help="--simulate: draws per modality (default 8)")
    args = p.parse_args(argv)
    if args.data is not None:
        simulate_only = [f for f, d in (("size", 0.25), ("seed", 0), ("n_cases", 4), ("oracle_draws", 8))
                         if getattr(args, f) != d]
        if simulate_only:
            p.error(f"{', '.join('--' + f for f in simulate_only)} only apply to --simulate")
    elif args.n_cases < 1 or args.oracle_draws < 2:
        p.error("--n_cases must be >= 1 and --oracle_draws >= 2")
    return args


def table(summary: dict[str, dict]) -> str:
    """One line per modality: floors and R_b/E_b per band."""
    lines = [f"{'target':6} {'MSE brain':>10} {'MSE tumour':>10} {'PSNR b/t dB':>12}  R_b/E_b "
             + " ".join(f"{b:>5}" for b in BAND_NAMES)]
    for modality, row in summary.items():
        lines.append(f"{modality:6} {row['mse_brain']:10.5f} {row['mse_tumor']:10.5f} "
                     f"{row['psnr_brain']:5.1f}/{row['psnr_tumor']:<5.1f}          "
                     + " ".join(f"{row['band_ratio'][b]:5.3f}" for b in BAND_NAMES))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modalities = tuple(m for m in MODALITIES if m in args.modalities)
    start = time.perf_counter()
    errors = []
    if args.data is not None:
        per_case, errors = floors_from_dataset(args.data, modalities)
        if not per_case:
            return cli.fatal(f"{args.data}: no test case with oracle draws could be measured")
        settings = {"data": args.data, "modalities": list(modalities)}
    else:
        geometry = Geometry.scaled(args.size)
        per_case = simulated_floors(args.simulate, geometry, seed=args.seed, n_cases=args.n_cases,
                                    oracle_draws=args.oracle_draws, modalities=modalities)
        settings = {"simulate": args.simulate, "size": args.size, "seed": args.seed, "n_cases": args.n_cases,
                    "oracle_draws": args.oracle_draws, "modalities": list(modalities)}
    summary = summarize(per_case)
    save_json({"settings": settings, "summary": summary, "cases": per_case}, args.json)
    print(table(summary))
    logger.info("%d cases in %.1f s; written to %s", len(per_case), time.perf_counter() - start, args.json)
    return cli.report_failures(errors, "test cases")


def run() -> None:
    """Console entry point ``fast-cwdm-demo-floors`` (and ``python scripts/demo_floors.py``)."""
    cli.main_guard(main)
