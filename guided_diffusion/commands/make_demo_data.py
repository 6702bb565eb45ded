"""Write a small synthetic BraTS-layout dataset (see guided_diffusion/demo_data.py).

Example (from the repo root):
    python scripts/make_demo_data.py --out data/demo --size 0.25 --seed 0
    python scripts/make_demo_data.py --version 2 --out data/demo_v2 --n_train 16 --n_test 4

--version 1 (default) writes training/, validation/, pseudo_validation/, pseudo_validation_gt/.
--version 2 (docs/demo_data_v2.md) writes training/<case>-d<k>/ (--draws draws of every modality's own
latents per anatomy) and test/<case>/ with oracle/<case>-<modality>-draw<n>.nii.gz (--oracle_draws
exact draws of each modality with the other three fixed); scripts/demo_floors.py measures its floors.

``--size`` scales the BraTS grid: 1.0 is 240 x 240 x 155 at 1 mm (network grid
224 x 224 x 160); 0.25 is 60 x 60 x 39 at 4 mm (network grid 56 x 56 x 40).
Generation takes about 0.2 s per case at 0.25 (11 s per case at 1.0).
"""
from __future__ import annotations

import logging
import time

from guided_diffusion import cli
from guided_diffusion.bratsloader import Geometry
from guided_diffusion.demo_data import make_demo_dataset
from guided_diffusion.demo_data_v2 import make_demo_dataset_v2

V1_DEFAULTS = {"n_val": 2, "n_pseudo": 4}
V2_DEFAULTS = {"n_test": 4, "draws": 4, "oracle_draws": 8}

logger = logging.getLogger("make_demo_data")


def parse_args(argv: list[str] | None = None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--version", type=int, choices=(1, 2), default=1,
                   help="1 (default): the v1 demo, unchanged; 2: modality-specific latents, training draws and "
                        "test oracles (docs/demo_data_v2.md)")
    p.add_argument("--out", required=True,
                   help="output folder; v1: training/, validation/, pseudo_validation/, pseudo_validation_gt/; "
                        "v2: training/ and test/")
    p.add_argument("--size", type=float, default=0.25,
                   help="scale of the BraTS 240x240x155 grid, in (0, 1] (default 0.25: 60x60x39 with 4 mm voxels)")
    p.add_argument("--levels", type=int, default=3,
                   help="the network grid must be divisible by 2**levels (default 3: DWT + 2 UNet downsamplings)")
    p.add_argument("--seed", type=int, default=0, help="random seed; a case depends only on seed and id")
    p.add_argument("--n_train", type=int, default=8, help="training cases, with seg (default 8)")
    p.add_argument("--n_val", type=int, default=None, help="v1: validation cases, no seg (default 2)")
    p.add_argument("--n_pseudo", type=int, default=None,
                   help="v1: pseudo-validation cases, one modality dropped; complete copies in pseudo_validation_gt/ "
                        "(default 4)")
    p.add_argument("--n_test", type=int, default=None,
                   help="v2: held-out test anatomies, with seg and oracle draws (default 4)")
    p.add_argument("--draws", type=int, default=None,
                   help="v2: training folders per anatomy, every modality's own latents re-drawn (default 4)")
    p.add_argument("--oracle_draws", type=int, default=None,
                   help="v2: oracle draws of each modality per test case (default 8; 0: none)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the split folders of a non-empty --out (anything else in it is kept)")
    args = p.parse_args(argv)
    mine, other = (V1_DEFAULTS, V2_DEFAULTS) if args.version == 1 else (V2_DEFAULTS, V1_DEFAULTS)
    given = [f"--{name}" for name in other if getattr(args, name) is not None]
    if given:
        p.error(f"{', '.join(given)} only apply to --version {2 if args.version == 1 else 1}")
    for name, default in mine.items():
        setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    geometry = Geometry.scaled(args.size)
    geometry.check_divisible(args.levels)
    start = time.perf_counter()
    if args.version == 1:
        written = make_demo_dataset(args.out, geometry=geometry, seed=args.seed, n_train=args.n_train,
                                    n_val=args.n_val, n_pseudo=args.n_pseudo, overwrite=args.overwrite)
    else:
        written = make_demo_dataset_v2(args.out, geometry=geometry, seed=args.seed, n_train=args.n_train,
                                       n_test=args.n_test, draws=args.draws, oracle_draws=args.oracle_draws,
                                       overwrite=args.overwrite)
    logger.info("wrote %d cases in %.1f s: original grid %s, network grid %s",
                sum(len(v) for v in written.values()), time.perf_counter() - start,
                geometry.original_shape, geometry.network_shape)
    return cli.EXIT_OK


def run() -> None:
    """Console entry point ``fast-cwdm-make-demo-data`` (and ``python scripts/make_demo_data.py``)."""
    cli.main_guard(main)
