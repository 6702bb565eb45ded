"""Samplers: loops over (denoiser, schedule, x_T, timesteps) built on the single steps of
:mod:`guided_diffusion.diffusion`, and the one registry that picks a loop by name.

``denoiser(x_t, t) -> pred_x0`` carries the network and its conditioning (see
:func:`guided_diffusion.diffusion.make_denoiser`). ``timesteps`` is a strictly decreasing
sequence of schedule step indices (chosen by :func:`guided_diffusion.timesteps.plan_timesteps`);
the sampler makes one network evaluation per entry (NFE = len(timesteps)) and ends on the clean
estimate. All formulas are per band, so the same code serves shared and per-band (FATS)
schedules. Every loop has the signature
``fn(denoiser, schedule, x_T, timesteps, *, generator=None, clip=None, callback=None, **options)``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .diffusion import Denoiser, Generators, ddim_step, ddpm_coefficients, ddpm_update, q_sample, randn
from .flow import FlowPath, euler_sample
from .schedules import NoiseSchedule

Callback = Callable[[dict], None]
Clip = Callable[[torch.Tensor], torch.Tensor]


def _check_timesteps(schedule: NoiseSchedule, timesteps: Sequence[int] | None) -> list[int]:
    steps = list(range(schedule.num_steps - 1, -1, -1)) if timesteps is None else [int(s) for s in timesteps]
    if not steps:
        raise ValueError("sampler: empty timestep list")
    if any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"sampler: timesteps must be strictly decreasing, got {steps}")
    if steps[0] >= schedule.num_steps or steps[-1] < 0:
        raise ValueError(f"sampler: timesteps must lie in [0, {schedule.num_steps - 1}], got {steps}")
    return steps


def _step_pairs(steps: list[int], x: torch.Tensor):
    """Yield (i, t, s) with t, s as (B,) index tensors; s = -1 after the last step."""
    b = x.shape[0]
    for i, t in enumerate(steps):
        s = steps[i + 1] if i + 1 < len(steps) else -1
        yield i, torch.full((b,), t, dtype=torch.long), torch.full((b,), s, dtype=torch.long)


def _index_tables(steps: list[int], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(K,) step indices t and the next step s (-1 after the last) on the host, and t on x's device
    (moved once: no copy per step)."""
    t_table = torch.tensor(steps, dtype=torch.long)
    return t_table, torch.tensor(steps[1:] + [-1], dtype=torch.long), t_table.to(x.device)


def _denoise(denoiser: Denoiser, clip: Clip | None, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The (clipped) x0 estimate at step t."""
    pred_x0 = denoiser(x, t)
    return clip(pred_x0) if clip is not None else pred_x0


def ddpm_sample(denoiser: Denoiser, schedule: NoiseSchedule, x_T: torch.Tensor, timesteps: Sequence[int] | None = None,
                *, generator: Generators = None, clip: Clip | None = None, callback: Callback | None = None,
                variance: str = "large") -> torch.Tensor:
    """Ancestral sampling (DDPM) with :func:`~guided_diffusion.diffusion.ddpm_step`.
    ``timesteps=None`` uses every step; a subset gives respaced DDPM.

    x_T: (B, C, d, h, w) pure noise. Returns the final x0 sample, same shape.
    """
    steps = _check_timesteps(schedule, timesteps)
    x = x_T
    # Per-step tables, moved to the device once: (K, C) coefficients and the step indices, so the
    # loop makes no host-device copy (each a synchronisation on CUDA).
    t_table, s_table, t_device = _index_tables(steps, x)
    coefs = [c.to(device=x.device, dtype=x.dtype) for c in ddpm_coefficients(schedule, t_table, s_table, variance)]
    b = x.shape[0]
    for i, t, s in _step_pairs(steps, x):
        pred_x0 = _denoise(denoiser, clip, x, t_device[i].expand(b))
        noise = randn(x.shape, generator, x.device, x.dtype) if s[0] >= 0 else None
        x = ddpm_update(x, pred_x0, *(c[i].expand(b, -1) for c in coefs), noise)
        if callback is not None:
            callback({"i": i, "t": int(t[0]), "x": x, "pred_x0": pred_x0})
    return x


def ddim_sample(denoiser: Denoiser, schedule: NoiseSchedule, x_T: torch.Tensor, timesteps: Sequence[int] | None = None,
                *, generator: Generators = None, clip: Clip | None = None, callback: Callback | None = None,
                eta: float = 0.0) -> torch.Tensor:
    """DDIM with :func:`~guided_diffusion.diffusion.ddim_step`, per band, with the conditioning in
    the denoiser; the last step returns the (clipped) x0 estimate.

    x_T: (B, C, d, h, w) pure noise. eta = 0 is deterministic; eta > 0 draws each step's noise
    from ``generator``. Returns the final x0 sample, same shape.
    """
    if eta < 0:
        raise ValueError(f"ddim_sample: eta must be >= 0, got {eta}")
    steps = _check_timesteps(schedule, timesteps)
    x = x_T
    # Per-step tables, moved to the device once (not two copies, each a sync on CUDA, per step):
    # (K, C) alpha_bar at t and at s (s = -1 after the last step), and the step indices.
    t_table, s_table, t_device = _index_tables(steps, x)
    ab_t_table = schedule.alpha_bar_at(t_table).to(device=x.device, dtype=x.dtype)
    ab_s_table = schedule.alpha_bar_at(s_table).to(device=x.device, dtype=x.dtype)
    b = x.shape[0]
    for i, t, s in _step_pairs(steps, x):
        pred_x0 = _denoise(denoiser, clip, x, t_device[i].expand(b))
        if s[0] >= 0:
            noise = randn(x.shape, generator, x.device, x.dtype) if eta > 0 else None
            x = ddim_step(x, pred_x0, ab_t_table[i].expand(b, -1), ab_s_table[i].expand(b, -1), eta=eta, noise=noise)
        else:
            x = pred_x0
        if callback is not None:
            callback({"i": i, "t": int(t[0]), "x": x, "pred_x0": pred_x0})
    return x


SamplerFn = Callable[..., torch.Tensor]
"""``fn(denoiser, schedule, x_T, timesteps, *, generator=None, clip=None, callback=None, **options)
-> x0`` (B, C, d, h, w); options are the sampler's own (``variance`` for DDPM, ``eta`` for DDIM)."""

SAMPLER_REGISTRY: dict[str, SamplerFn] = {"ddpm": ddpm_sample, "ddim": ddim_sample, "euler": euler_sample}
"""The sampler loops by name; its keys equal ``config.SAMPLERS`` (checked by a test). ``euler``
integrates a flow (:class:`~guided_diffusion.flow.FlowPath`); the others sample a noise schedule."""

FLOW_SAMPLERS: tuple[str, ...] = ("euler",)
"""The samplers of a flow model (schedule kind ``flow``); every other sampler needs a noise schedule."""


def check_sampler_fits(name: str, schedule: NoiseSchedule | FlowPath) -> None:
    """Refuse a sampler that cannot sample this model: a flow model takes only :data:`FLOW_SAMPLERS`,
    a diffusion model only the others (ValueError naming both and the fix)."""
    is_flow = isinstance(schedule, FlowPath)
    if is_flow and name not in FLOW_SAMPLERS:
        raise ValueError(f"sampler {name!r} does not fit a flow-matching model (schedule kind 'flow'); "
                         f"use --sampler {' or '.join(FLOW_SAMPLERS)}")
    if not is_flow and name in FLOW_SAMPLERS:
        others = [s for s in SAMPLER_REGISTRY if s not in FLOW_SAMPLERS]
        raise ValueError(f"sampler {name!r} integrates a flow-matching model (schedule kind 'flow'); this model has "
                         f"a noise schedule ({schedule.name}): use --sampler {' or '.join(others)}")


def warm_start_sample(sampler: SamplerFn, denoiser: Denoiser, schedule: NoiseSchedule, x_T: torch.Tensor,
                      timesteps: Sequence[int], *, generator: Generators = None, clip: Clip | None = None,
                      callback: Callback | None = None, **options) -> torch.Tensor:
    """Warm start (variant P; FATS v2's per-band warm start on a per-band schedule): one network
    evaluation at ``timesteps[0]`` (the last step: from pure noise the x0 prediction is the
    regression estimate E[x0 | cond]), that estimate noised to ``t* = timesteps[1]`` with fresh
    noise from ``generator`` (``q_sample``, per band), then ``sampler`` over ``timesteps[1:]``.

    NFE = ``len(timesteps)``: the regression evaluation counts. With a model trained on every t the
    same network gives both the estimate and the refinement. x_T: (B, C, d, h, w) pure noise.
    Returns the final x0 sample, same shape.
    """
    steps = _check_timesteps(schedule, timesteps)
    if len(steps) < 2 or steps[0] != schedule.num_steps - 1:
        raise ValueError(f"warm start: timesteps must be [T - 1 = {schedule.num_steps - 1}, t*, ...] with at least "
                         f"one refinement step, got {steps}")
    b = x_T.shape[0]
    x0_hat = _denoise(denoiser, clip, x_T, torch.full((b,), steps[0], dtype=torch.long, device=x_T.device))
    if callback is not None:
        callback({"i": 0, "t": steps[0], "x": x0_hat, "pred_x0": x0_hat})
    t_star = torch.full((b,), steps[1], dtype=torch.long)
    x = q_sample(schedule, x0_hat, t_star, randn(x_T.shape, generator, x_T.device, x_T.dtype))

    def shifted(state: dict) -> None:  # the refinement's step numbers follow the regression evaluation
        callback({**state, "i": state["i"] + 1})

    return sampler(denoiser, schedule, x, steps[1:], generator=generator, clip=clip,
                   callback=None if callback is None else shifted, **options)


def get_sampler(name: str) -> SamplerFn:
    """The sampler loop called ``name`` (a key of :data:`SAMPLER_REGISTRY`)."""
    try:
        return SAMPLER_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {tuple(SAMPLER_REGISTRY)}") from None
