"""Flow matching from the mean of the conditions (WFM-style, variant W): path, loss, Euler sampler.

Layer 2 (diffusion math; imports :mod:`guided_diffusion.diffusion` for the network call). In
Haar subband space (8 target bands, LLL / 3 as everywhere, ``DWT_IDWT.to_subbands``):

* source  ``x_src = m(cond) + sigma_src * eps``, eps ~ N(0, I) per voxel and band, where
  ``m(cond)`` (:func:`cond_mean_source`) is the mean of the three conditioning modalities'
  subbands, band by band. The Haar transform and the LLL scale are linear, so ``m(cond)`` is
  exactly the subbands of the voxel-wise mean of the three conditioning volumes. sigma_src = 0
  is the deterministic start (WFM's), sigma_src > 0 the noisy start (a sampler with a spread).
* target  ``x_1`` = the target modality's subbands.
* path    ``x_t = (1 - t) x_src + t x_1``, t in [0, 1] (t = 0 the source, t = 1 the target).
* network predicts the velocity ``v = x_1 - x_src`` (WFM's choice, :func:`flow_training_losses`).
* sampler Euler from t = 0 to 1 in K steps (:func:`euler_sample`), one network evaluation each.

Time grid: the flow is trained and sampled on T = ``num_train_steps`` grid points, step index
i in [0, T - 1] meaning ``t_i = 1 - (i + 1) / T`` (index T - 1 is the source t = 0, index -1 the
target t = 1), so that the project's timestep lists (strictly decreasing indices, one network
evaluation each, NFE = their length) and its network call (:func:`diffusion.make_denoiser`, which
looks up ``model_times``) serve the flow unchanged. The network sees ``1000 (1 - t_i)``: large
far from the target, as the diffusion models' time embedding does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .constants import FLOW_SOURCES, MODALITIES, REFERENCE_STEPS
from .diffusion import Denoiser, Generators, append_dims, make_denoiser

N_CONDITIONS = len(MODALITIES) - 1
"""Conditioning modalities per case (3): the divisor of :func:`cond_mean_source`."""


def cond_mean_source(cond: torch.Tensor, n_bands: int = 8) -> torch.Tensor:
    """m(cond): the mean of the conditioning modalities' subbands, band by band.

    cond: (B, n_bands * S, d, h, w), S conditioning slots of ``n_bands`` subbands each in slot-major
    order (as ``to_subbands`` writes a (B, S, X, Y, Z) stack). S = 3 (a single-modality model) or
    S = 4 (an all-modality model, whose target slot is exactly zero): the slots are summed and
    divided by the number of conditioning modalities, 3, so both layouts give the mean of the
    three real conditions. Returns (B, n_bands, d, h, w).
    """
    slots = cond.shape[1] // n_bands
    if cond.shape[1] % n_bands or slots not in (N_CONDITIONS, N_CONDITIONS + 1):
        raise ValueError(f"flow.py: cond_mean_source needs {N_CONDITIONS} or {N_CONDITIONS + 1} slots of "
                         f"{n_bands} subbands, got {cond.shape[1]} channels")
    return cond.reshape(cond.shape[0], slots, n_bands, *cond.shape[2:]).sum(dim=1) / N_CONDITIONS


@dataclass(frozen=True)
class FlowPath:
    """The linear path from the condition mean to the target on a grid of ``num_steps`` times.

    Stands where a diffusion model has its :class:`~guided_diffusion.schedules.NoiseSchedule`
    (``num_steps``, ``n_bands``, ``model_times``, ``state_dict``), so timestep planning, the
    network call and checkpoints treat both alike; it is fully defined by its config (stored in
    the checkpoint's diffusion config), so nothing else needs to be stored.
    """

    num_steps: int = REFERENCE_STEPS
    source_noise: float = 0.0  # sigma_src
    source: str = "cond_mean"
    n_bands: int = 8

    def __post_init__(self):
        if self.num_steps < 1 or self.n_bands < 1:
            raise ValueError(f"FlowPath: need num_steps >= 1 and n_bands >= 1, got {self.num_steps}, {self.n_bands}")
        if not self.source_noise >= 0.0:
            raise ValueError(f"FlowPath: source_noise (sigma_src) must be >= 0, got {self.source_noise}")
        if self.source not in FLOW_SOURCES:
            raise ValueError(f"FlowPath: source must be one of {FLOW_SOURCES}, got {self.source!r}")

    @property
    def name(self) -> str:
        return f"flow{self.num_steps}-{self.source}-sigma{self.source_noise:g}"

    @property
    def model_times(self) -> torch.Tensor:
        """(T,) float64: the network's time at step index i, ``1000 (i + 1) / T`` = 1000 (1 - t_i)."""
        return torch.arange(1, self.num_steps + 1, dtype=torch.float64) * (REFERENCE_STEPS / self.num_steps)

    def time_at(self, index: torch.Tensor) -> torch.Tensor:
        """Flow time ``t = 1 - (i + 1) / T`` of step indices (any shape; -1 -> 1, the target), float64."""
        return 1.0 - (index.to(torch.float64) + 1.0) / self.num_steps

    def start(self, cond: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_src = m(cond) + sigma_src * noise: (B, n_bands, d, h, w), ``noise``'s shape and dtype
        (a batch of one case's conditioning serves B ensemble members; sigma_src = 0 ignores the noise)."""
        mean = cond_mean_source(cond, self.n_bands).to(noise.dtype).expand(noise.shape)
        return mean.contiguous() if self.source_noise == 0.0 else mean + self.source_noise * noise

    def state_dict(self) -> dict:
        """What a checkpoint's ``schedule`` entry holds for a flow (for reading only: the path is
        rebuilt from the diffusion config)."""
        return {"name": self.name, "model_times": self.model_times}


def interpolate(x_src: torch.Tensor, x_1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x_src + t x_1; x_src, x_1: (B, C, d, h, w), t: (B,) flow times."""
    tt = append_dims(t[:, None], x_1)
    return (1.0 - tt) * x_src + tt * x_1


def target_velocity(x_src: torch.Tensor, x_1: torch.Tensor) -> torch.Tensor:
    """The path's velocity d x_t / d t = x_1 - x_src (constant along the path)."""
    return x_1 - x_src


def flow_timesteps(path: FlowPath, nfe: int) -> list[int]:
    """K = ``nfe`` Euler steps at t = 0, 1/K, ..., (K - 1)/K: step indices ``round(T (1 - k/K)) - 1``
    (exact when K divides T; the nearest grid times otherwise), strictly decreasing."""
    total = path.num_steps
    if not 1 <= nfe <= total:
        raise ValueError(f"flow_timesteps: NFE {nfe} is outside 1 .. {total} (the flow's time grid)")
    return [round(total * (1 - k / nfe)) - 1 for k in range(nfe)]


def flow_training_losses(model: nn.Module, path: FlowPath, x_1: torch.Tensor, cond: torch.Tensor,
                         t: torch.Tensor, noise: torch.Tensor, *, label: torch.Tensor | None = None,
                         band_weights: torch.Tensor | None = None, precision: str = "fp32",
                         snr_gamma: float = 0.0) -> dict[str, torch.Tensor]:
    """Flow-matching loss: MSE of the predicted velocity against x_1 - x_src, per band.

    The same signature and outputs as :func:`guided_diffusion.diffusion.training_losses`, so the
    trainer calls either; ``snr_gamma`` (min-SNR weighting) belongs to noise schedules and must be 0. x_1: (B, C, d, h, w) target subbands; cond: conditioning subbands; t: (B,)
    step indices of ``path``; noise: (B, C, d, h, w) standard normal, the source noise eps (unused
    when sigma_src = 0). Returns ``loss`` (B,), ``per_band`` (B, C) and ``pred_x0`` (B, C, d, h, w),
    the implied target estimate x_t + (1 - t) v_hat (for the training images).
    """
    if snr_gamma:
        raise ValueError(f"flow_training_losses: min-SNR weighting (min_snr_gamma={snr_gamma}) needs a noise "
                         "schedule; a flow model trains with min_snr_gamma 0")
    x_src = path.start(cond, noise)
    time = path.time_at(t)
    x_t = interpolate(x_src, x_1, time)
    pred_v = make_denoiser(model, path, cond, label=label, precision=precision)(x_t, t)
    per_band = ((pred_v.float() - target_velocity(x_src, x_1).float()) ** 2).mean(dim=(2, 3, 4))
    if band_weights is None:
        loss = per_band.mean(dim=1)
    else:
        w = band_weights.to(per_band)
        loss = (per_band * w).sum(dim=1) / w.sum()
    pred_x1 = x_t + append_dims((1.0 - time)[:, None], x_t) * pred_v
    return {"loss": loss, "per_band": per_band, "pred_x0": pred_x1.detach()}


def euler_sample(denoiser: Denoiser, schedule: FlowPath, x_T: torch.Tensor, timesteps: Sequence[int] | None = None,
                 *, generator: Generators = None, clip: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """Euler integration of the learned velocity from the source x_T = x_src (t = 0) to the target (t = 1).

    ``denoiser(x_t, i)`` returns the velocity at step index i (the network with its conditioning,
    :func:`~guided_diffusion.diffusion.make_denoiser`). ``schedule``: the flow's path (the name
    every sampler's signature uses). ``timesteps``: strictly decreasing step indices of the path
    (:func:`flow_timesteps`; None = every grid point), one evaluation each.
    Each evaluation gives the target estimate ``x1_hat = x_t + (1 - t) v``; with ``clip``
    (cWDM's image-space clamp) that estimate is clipped and the velocity recomputed from it. Euler
    step: ``x_s = x_t + (s - t) v``; after the last evaluation the result is x1_hat itself.
    ``generator`` is unused (the flow is deterministic given x_src). Returns (B, C, d, h, w).
    """
    del generator  # deterministic given the start; kept for the sampler signature
    steps = list(range(schedule.num_steps - 1, -1, -1)) if timesteps is None else [int(s) for s in timesteps]
    if not steps or any(a <= b for a, b in zip(steps, steps[1:])) or steps[0] >= schedule.num_steps or steps[-1] < 0:
        raise ValueError(f"euler_sample: timesteps must be strictly decreasing indices in "
                         f"[0, {schedule.num_steps - 1}], got {steps}")
    x, b = x_T, x_T.shape[0]  # the sampler signature's x_T is the flow's source
    times = schedule.time_at(torch.tensor(steps + [-1])).tolist()  # flow times of the steps, then 1
    for i, step in enumerate(steps):
        t, s = times[i], times[i + 1]
        velocity = denoiser(x, torch.full((b,), step, dtype=torch.long, device=x.device))
        pred_x1 = x + (1.0 - t) * velocity
        if clip is not None:
            pred_x1 = clip(pred_x1)
            velocity = (pred_x1 - x) / (1.0 - t)
        x = pred_x1 if i + 1 == len(steps) else x + (s - t) * velocity  # Euler step
        if callback is not None:
            callback({"i": i, "t": step, "x": x, "pred_x0": pred_x1})
    return x
