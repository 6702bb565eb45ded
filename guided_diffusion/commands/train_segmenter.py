r"""Train the downstream tumour segmenter (MONAI SegResNet) on the real four modalities of BraTS cases.

    python scripts/train_segmenter.py --data_dir demo_data/training --out runs/demo/segmenter/segmenter.pt \
        --preset demo --device cpu

(installed: ``fast-cwdm-train-segmenter``). Needs the ``seg`` extra (MONAI). Every case needs its
``-seg`` file. Writes the checkpoint (weights loadable with ``weights_only=True``) and its config as
``<out minus .pt>.json`` beside it: settings, channel order, regions (WT/TC/ET of the BraTS 2023 labels),
grid, training cases and the losses. ``scripts/sample.py --segmenter <out>`` then reports Dice / HD95
of the syntheses (docs/segmentation.md).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from tqdm import tqdm

from guided_diffusion import cli
from guided_diffusion.provenance import data_fingerprint
from guided_diffusion.runinfo import run_info
from guided_diffusion.segmentation import SEGMENTER_PRESETS, save_segmenter, segmenter_config, train_segmenter

logger = logging.getLogger("train_segmenter")


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--data_dir", required=True, help="BraTS-layout folder of training cases (four modalities + seg)")
    p.add_argument("--out", required=True, help="checkpoint to write (.pt; never replaced unless --overwrite)")
    p.add_argument("--preset", choices=sorted(SEGMENTER_PRESETS), default="demo",
                   help="demo: small network, 300 steps (the CPU demo); brats: wider, 20000 steps (full-size data, "
                        "GPU); tiny: 2 steps of a 2-level network (tests)")
    p.add_argument("--max_steps", type=int, default=None, help="optimizer steps (default: the preset's)")
    p.add_argument("--seed", type=int, default=None, help="seed of the weights, batches and flips (default: the preset's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out checkpoint")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it or choose another --out")
    cli.check_output_dir(out.parent, input_dir=args.data_dir)
    device = cli.default_device(args.device)
    cfg = cli.override(SEGMENTER_PRESETS[args.preset], max_steps=args.max_steps, seed=args.seed)
    cases, failures, geometry = cli.find_cases(args.data_dir, "train", check_data=False)
    logger.info("training the %s segmenter on %d cases of %s (grid %s), %d steps on %s", args.preset, len(cases),
                args.data_dir, geometry.network_shape, cfg.max_steps, device)
    bar = tqdm(total=cfg.max_steps, desc="train segmenter", dynamic_ncols=True)

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")

    start = time.perf_counter()
    model, losses = train_segmenter(cases, geometry, cfg, device, callback=on_step)
    bar.close()
    seconds = time.perf_counter() - start
    config = segmenter_config(cfg, geometry, preset=args.preset, data=data_fingerprint(cases),
                              data_dir=str(args.data_dir), losses=losses, train_seconds=seconds, device=str(device),
                              run=run_info())
    save_segmenter(out, model, config, overwrite=args.overwrite)
    print(f"trained the segmenter in {seconds:.0f} s (final loss {losses[-1]:.4f}); wrote {out} and "
          f"{out.with_suffix('.json')}")
    return cli.report_failures(failures, "training cases")


def run() -> None:
    """Console entry point ``fast-cwdm-train-segmenter`` (and ``python scripts/train_segmenter.py``)."""
    cli.main_guard(main)
