"""How much a trained denoiser's x0 estimate follows its noisy input x_t, step by step
(docs/prediction.md; the diagnosis of benchmark v2's failed gate).

For each case of ``--data`` and each step t, two noisings of the real target x0 with independent
noise give x_t^1, x_t^2; the denoiser's estimates are compared with how far apart the inputs say
the clean images could be:

    follow(t) = ||x0_hat(x_t^1) - x0_hat(x_t^2)|| / ||(x_t^1 - x_t^2) / sqrt(alpha_bar_t)||

per band (norms over the voxels of a band). An ideal denoiser follows its input where x_t pins
the image down (follow -> 1 as t -> 0, its posterior narrowing onto the input) and ignores it
where x_t is pure noise (follow -> 0 at t = T - 1). A network that answers with its regression
estimate everywhere has follow ~ 0 at every t: DDPM then ends every sample on that estimate,
and an ensemble has no spread.

    python experiments/x_t_sensitivity.py --checkpoint RUN/t1c/latest.pt --data DEMO_V2/test --target t1c
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from DWT_IDWT import BAND_NAMES, to_subbands  # noqa: E402
from guided_diffusion.bratsloader import common_geometry, discover_cases, load_case  # noqa: E402
from guided_diffusion.checkpoints import load_model  # noqa: E402
from guided_diffusion.conditioning import model_inputs  # noqa: E402
from guided_diffusion.constants import MODALITIES  # noqa: E402
from guided_diffusion.diffusion import make_denoiser, q_sample  # noqa: E402
from guided_diffusion.fileio import save_json  # noqa: E402

DEFAULT_STEPS = (0, 2, 10, 50, 200, 500, 999)


def follow(denoiser, schedule, x0: torch.Tensor, t: int, generator: torch.Generator) -> torch.Tensor:
    """follow(t) per band, (n_bands,), for one case: x0 (1, C, d, h, w) subbands."""
    tt = torch.full((1,), t, dtype=torch.long)
    noise = [torch.randn(x0.shape, generator=generator) for _ in range(2)]
    x_t = [q_sample(schedule, x0, tt, n) for n in noise]
    with torch.no_grad():
        est = [denoiser(x, tt) for x in x_t]
    root = schedule.alpha_bar_at(tt).sqrt().float().view(1, -1, 1, 1, 1)
    num = (est[0] - est[1]).flatten(2).norm(dim=2)[0]
    den = ((x_t[0] - x_t[1]) / root).flatten(2).norm(dim=2)[0]
    return num / den


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--data", required=True, help="folder of cases with all four modalities")
    p.add_argument("--target", choices=MODALITIES, required=True)
    p.add_argument("--steps", type=int, nargs="+", default=list(DEFAULT_STEPS))
    p.add_argument("--max_cases", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON file for the table")
    args = p.parse_args(argv)
    loaded = load_model(args.checkpoint)
    found, _ = discover_cases(args.data, mode="train", geometry=None)
    geometry, cases, _ = common_geometry(found)
    if not cases:
        p.error(f"--data {args.data}: no case with all four modalities")
    generator = torch.Generator().manual_seed(args.seed)
    steps = [t for t in args.steps if t < loaded.schedule.num_steps]
    table = {t: [] for t in steps}
    for case in cases[:args.max_cases]:
        volumes = torch.from_numpy(load_case(case, geometry).volumes)[None]
        target, cond, label = model_inputs(volumes, args.target, loaded.all_modality)
        denoiser = make_denoiser(loaded.model, loaded.schedule, to_subbands(cond), label=label)
        x0 = to_subbands(target)
        for t in steps:
            table[t].append(follow(denoiser, loaded.schedule, x0, t, generator))
    rows = {t: torch.stack(v).mean(0).tolist() for t, v in table.items()}
    print(f"follow(t) = ||x0_hat(x_t^1) - x0_hat(x_t^2)|| / ||(x_t^1 - x_t^2) / sqrt(alpha_bar)||, "
          f"{args.checkpoint} (prediction {loaded.diffusion_config.prediction}), mean of {len(cases[:args.max_cases])} cases")
    print("t      " + " ".join(f"{b:>6}" for b in BAND_NAMES))
    for t, vals in rows.items():
        print(f"{t:<6} " + " ".join(f"{v:6.3f}" for v in vals))
    if args.out:
        save_json({"checkpoint": str(args.checkpoint), "prediction": loaded.diffusion_config.prediction,
                   "bands": list(BAND_NAMES), "follow": {str(t): v for t, v in rows.items()},
                   "cases": [c.case_id for c in cases[:args.max_cases]]}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
