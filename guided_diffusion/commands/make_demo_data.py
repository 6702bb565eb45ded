"""Write a small synthetic BraTS-layout dataset (see guided_diffusion/demo_data.py).

Example (from the repo root):
    python scripts/make_demo_data.py --out data/demo --size 0.25 --seed 0

``--size`` scales the BraTS grid: 1.0 is 240 x 240 x 155 at 1 mm (network grid
224 x 224 x 160); 0.25 is 60 x 60 x 39 at 4 mm (network grid 56 x 56 x 40).
Generation takes about 0.2 s per case at 0.25 (11 s per case at 1.0).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cli_common as cli  # noqa: E402

from guided_diffusion.bratsloader import Geometry  # noqa: E402
from guided_diffusion.demo_data import make_demo_dataset  # noqa: E402

logger = logging.getLogger("make_demo_data")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--out", required=True, help="output folder; gets training/, validation/, "
        "pseudo_validation/ and pseudo_validation_gt/")
    add("--size", type=float, default=0.25, help="scale of the BraTS 240x240x155 grid, in "
        "(0, 1] (default 0.25: 60x60x39 with 4 mm voxels)")
    add("--levels", type=int, default=3, help="the network grid must be divisible by "
        "2**levels (default 3: DWT + 2 UNet downsamplings)")
    add("--seed", type=int, default=0, help="random seed; a case depends only on seed and id")
    add("--n_train", type=int, default=8, help="training cases, with seg (default 8)")
    add("--n_val", type=int, default=2, help="validation cases, no seg (default 2)")
    add("--n_pseudo", type=int, default=4, help="pseudo-validation cases, one modality "
        "dropped; complete copies in pseudo_validation_gt/ (default 4)")
    add("--overwrite", action="store_true", help="replace the split folders of a non-empty "
        "--out (anything else in it is kept)")
    add("--verbose", action="store_true", help="debug logging (one line per case)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup_logging(args.verbose)
    geometry = Geometry.scaled(args.size)
    geometry.check_divisible(args.levels)
    start = time.perf_counter()
    written = make_demo_dataset(
        args.out, geometry=geometry, seed=args.seed, n_train=args.n_train,
        n_val=args.n_val, n_pseudo=args.n_pseudo, overwrite=args.overwrite,
    )
    logger.info("wrote %d cases in %.1f s: original grid %s, network grid %s",
                sum(len(v) for v in written.values()), time.perf_counter() - start,
                geometry.original_shape, geometry.network_shape)
    return cli.EXIT_OK


if __name__ == "__main__":
    cli.main_guard(main)
