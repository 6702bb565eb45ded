"""Volume-level synthesis: a case's conditioning volumes in, the missing modality out.

This ties the layers together (see the README's data flow): network-grid volumes ->
conditioning subbands -> sampler with the model's schedule -> IDWT -> [0, 1] volume.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from DWT_IDWT import clip_in_image_space, from_subbands, to_subbands

from .checkpoints import LoadedModel
from .conditioning import split_case
from .config import SampleConfig
from .diffusion import make_denoiser, randn
from .samplers import get_sampler, respaced_steps
from .schedules import NoiseSchedule
from .seeding import case_generator


def learned_steps(loaded: LoadedModel, k: int) -> list[int] | None:
    """Learned sampling timesteps stored in a checkpoint (FATS) for a budget of K, if any."""
    table = loaded.extra.get("fats", {}).get("timesteps", {})
    steps = table.get(str(k))
    if steps is None:
        return None
    return [int(s) for s in (steps["steps"] if isinstance(steps, dict) else steps)]


def choose_steps(loaded: LoadedModel, cfg: SampleConfig) -> tuple[list[int], str]:
    """The step indices to sample with and a label saying where they came from.

    ``cfg.steps == 0``: the checkpoint's default budget (learned FATS steps when stored, else
    every step of the schedule). ``cfg.steps = K``: learned steps for K if stored, else K steps
    evenly spaced over the schedule.
    """
    total = loaded.schedule.num_steps
    k = cfg.steps
    if k == 0:
        default_k = loaded.extra.get("fats", {}).get("default_k")
        if default_k is not None and learned_steps(loaded, int(default_k)):
            return learned_steps(loaded, int(default_k)), f"learned (K={default_k})"
        return list(range(total - 1, -1, -1)), f"all {total} steps"
    if k > total:
        raise ValueError(f"--steps {k} exceeds the schedule's {total} steps")
    stored = learned_steps(loaded, k)
    if stored is not None:
        return stored, f"learned (K={k})"
    return respaced_steps(total, k), f"uniform (K={k})"


@torch.no_grad()
def synthesize_volumes(model: torch.nn.Module, schedule: NoiseSchedule, volumes: torch.Tensor, target: str,
                       cfg: SampleConfig, case_ids: Sequence[str], steps: Sequence[int],
                       callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """The synthesis pipeline on tensors: conditioning DWT (once), x_T from each case's generator,
    the sampler ``cfg.sampler`` (with ``cfg.eta``, ``cfg.precision``, cWDM's clipping when
    ``cfg.clip_denoised``) over ``steps``, IDWT, clamp to [0, 1].

    Args:
        model: the x0-predicting network, its device is where the work runs.
        volumes: (B, 4, X, Y, Z) network-grid volumes in MODALITIES order (the target channel is
            ignored and may be zero).
        case_ids: B ids; each case's noise comes from its own generator (``cfg.seed``, case id).
        steps: strictly decreasing schedule step indices (one network evaluation each).
        callback: the sampler's per-step callback, called for every case.
    Returns:
        (B, X, Y, Z) float32 synthesis in [0, 1] on the network grid, on the model's device.

    The cases are sampled one at a time: batched kernels (oneDNN convolutions, GEMMs) round
    differently for different batch sizes, so only this makes a case's result independent of the
    batch it is in bit for bit (its noise already is).
    """
    if len(case_ids) != volumes.shape[0]:
        raise ValueError(f"synthesize: {len(case_ids)} case ids for a batch of {volumes.shape[0]}")
    if volumes.shape[0] > 1:
        return torch.cat([synthesize_volumes(model, schedule, volumes[i : i + 1], target, cfg, case_ids[i : i + 1],
                                             steps, callback) for i in range(volumes.shape[0])])
    device = next(model.parameters()).device
    _, cond_volumes = split_case(volumes.to(device), target)
    cond = to_subbands(cond_volumes.float())  # computed once, outside the sampling loop
    denoiser = make_denoiser(model, schedule, cond, precision=cfg.precision)
    generators = [case_generator(cfg.seed, cid) for cid in case_ids]
    x_T = randn((volumes.shape[0], schedule.n_bands, *cond.shape[2:]), generators, device)
    options = {"eta": cfg.eta} if cfg.sampler == "ddim" else {}
    x0 = get_sampler(cfg.sampler)(denoiser, schedule, x_T, steps, generator=generators,
                                  clip=clip_in_image_space if cfg.clip_denoised else None, callback=callback,
                                  **options)
    return from_subbands(x0).clamp(0.0, 1.0)[:, 0].float()


def synthesize(loaded: LoadedModel, volumes: torch.Tensor, target: str, cfg: SampleConfig,
               case_ids: Sequence[str], steps: Sequence[int] | None = None,
               callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """:func:`synthesize_volumes` with a loaded checkpoint's model and schedule, the steps of
    :func:`choose_steps` unless given; returns (B, X, Y, Z) float32 in [0, 1] on the CPU."""
    if steps is None:
        steps, _ = choose_steps(loaded, cfg)
    return synthesize_volumes(loaded.model, loaded.schedule, volumes, target, cfg, case_ids, steps, callback).cpu()
