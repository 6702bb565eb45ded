r"""Learn the sampling timesteps of a few NFE budgets for a checkpoint on held-out cases; store them in it.

Works for any checkpoint: a FATS run (done automatically at the end of `train.py --preset fats`),
a shared-schedule Fast-cWDM checkpoint, or cWDM's published weights (only the choice of
timesteps is training-free for those).

    python scripts/fats_fit_steps.py --checkpoint runs/fats/t2f/best.pt --data_dir data/held_out \
        --target t2f --nfe 1 2 4 10 --out runs/fats/t2f/best_steps.pt

The held-out cases must not be used for anything else you report on.
"""
from __future__ import annotations

import logging
from pathlib import Path

from guided_diffusion import cli
from guided_diffusion.bratsloader import BratsDataset
from guided_diffusion.checkpoints import is_bare_state_dict, load_model, read_checkpoint, resolve_model_source
from guided_diffusion.constants import ALL_TARGET, PRECISIONS
from guided_diffusion.fats_search import SCORES
from guided_diffusion.fats_training import DEFAULT_NFE, FATS_NFE_BUDGETS, fit_and_store_timesteps, held_out_cases

logger = logging.getLogger("fats_fit_steps")


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", required=True, help="a .pt/.safetensors path or hf://<org>/<repo>/<file>[@rev]")
    p.add_argument("--data_dir", required=True, help="held-out cases with all four modalities")
    cli.add_target_argument(p, "the modality the model synthesises; 'all' for an all-modality model (the timesteps "
                               "are then fitted on every modality of each case: they serve all four)",
                            allow_all=True, required=True)
    p.add_argument("--nfe", type=int, nargs="+", default=list(FATS_NFE_BUDGETS),
                   help="NFE budgets whose timesteps are learned (default %(default)s)")
    p.add_renamed_flag("--k", "--nfe")
    p.add_argument("--default_nfe", type=int, default=DEFAULT_NFE,
                   help="budget sampling uses when no --nfe is given (default %(default)s)")
    p.add_renamed_flag("--default_k", "--default_nfe")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="network precision while fitting: the one you will sample with (default fp32)")
    p.add_argument("--max_cases", type=int, default=4, help="held-out cases used for fitting (seeded subset)")
    p.add_argument("--score", choices=SCORES, default="mse",
                   help="what the fit minimises: brain-masked MSE to the target (default; its optimum is the "
                        "conditional mean), or crps: the fair CRPS of 2 samples per case, a proper score (FATS v2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the case subset and the starting noise")
    p.add_argument("--out", required=True, help="output checkpoint (refuses to overwrite unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return p.parse_args(argv)


def checkpoint_dict_for(path: Path, loaded) -> dict:
    """The checkpoint as a Fast-cWDM dict (cWDM bare weights are wrapped with their inferred config)."""
    data = read_checkpoint(path)
    if is_bare_state_dict(data) or path.suffix == ".safetensors":
        return {"model": loaded.model.state_dict(), "ema": None, "optimizer": None, "step": loaded.step,
                "config": {"model": loaded.model_config.to_dict(), "diffusion": loaded.diffusion_config.to_dict()},
                "schedule": loaded.schedule.state_dict(), "extra": dict(loaded.extra)}
    return data


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        return cli.fatal(f"{out}: exists; pass --overwrite to replace it")
    cli.check_output_dir(out.parent)  # before the fitting, not after
    device = cli.default_device(args.device)
    source = resolve_model_source(args.checkpoint)
    loaded = load_model(source, device=device)
    if loaded.all_modality != (args.target == ALL_TARGET):
        return cli.fatal(f"{args.checkpoint}: " + ("an all-modality model: pass --target all" if loaded.all_modality
                                                   else "a single-modality model: --target all needs an all-modality "
                                                        "model (docs/all_modality.md)"))
    cases, failures, geometry = cli.find_cases(args.data_dir, "train", check_data=False)
    cli.check_fits_model(geometry, loaded, args.checkpoint, args.data_dir)
    for failure in failures:
        logger.warning("skipping %s", failure)
    held_out = held_out_cases(BratsDataset(cases, geometry), args.target, device, args.max_cases, args.seed)
    results = fit_and_store_timesteps(loaded.model, loaded.schedule, held_out, args.nfe,
                                      [(checkpoint_dict_for(source, loaded), out)], default_nfe=args.default_nfe,
                                      seed=args.seed, precision=args.precision, score=args.score,
                                      progress=cli.FitProgress(f"fit {args.target} timesteps"))
    for nfe, r in sorted(results.items()):
        print(f"NFE={nfe}: timesteps {r['steps']}  held-out error {r['error']:.5g}  (uniform {r['uniform_error']:.5g})")
    print(f"wrote {out}")
    return cli.EXIT_OK


def run() -> None:
    """Console entry point ``fast-cwdm-fats-fit-steps`` (and ``python scripts/fats_fit_steps.py``)."""
    cli.main_guard(main)
