"""Forward process, the x0-predicting denoiser, and the training loss (cWDM's, per band).

Shapes: x0, x_t, noise are (B, C, d, h, w) target subbands (C = the schedule's n_bands,
8 for one volume); cond is (B, C_cond, d, h, w) conditioning subbands; t is (B,) step
indices into the schedule.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .schedules import NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``denoiser(x_t, t) -> pred_x0``: the network with its conditioning bound."""

Generators = torch.Generator | Sequence[torch.Generator] | None


def append_dims(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, C) per-band coefficients -> (B, C, 1, 1, 1) in ``like``'s dtype and device."""
    return coef.to(device=like.device, dtype=like.dtype).reshape(*coef.shape, *([1] * (like.ndim - coef.ndim)))


def randn(shape: Sequence[int], generator: Generators, device, dtype=torch.float32) -> torch.Tensor:
    """Gaussian noise; with one generator per batch element, each element's noise depends only
    on its own generator (so a sample is independent of the batch it is in)."""
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"randn: {len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype)
                        for g in generator]).to(device)


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I), per band."""
    ab = schedule.alpha_bar_at(t)
    return append_dims(ab.sqrt(), x0) * x0 + append_dims((1.0 - ab).sqrt(), x0) * noise


def make_denoiser(model: nn.Module, schedule: NoiseSchedule, cond: torch.Tensor,
                  label: torch.Tensor | None = None) -> Denoiser:
    """Bind the conditioning: the one place where the network input is built (i2i mode).

    The network sees ``cat([x_t, cond], dim=1)`` and the schedule's model time of step t,
    and predicts x0 (cWDM's ``predict_xstart``).
    """
    model_times = schedule.model_times.to(device=cond.device, dtype=torch.float32)

    def denoiser(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        time = model_times[t.to(cond.device).long()]
        kwargs = {} if label is None else {"label": label}
        return model(torch.cat([x_t, cond.to(x_t.dtype)], dim=1), time, **kwargs).to(x_t.dtype)

    return denoiser


def sample_timesteps(schedule: NoiseSchedule, batch: int, generator: torch.Generator | None = None,
                     device=None) -> torch.Tensor:
    """Uniform training step indices (B,)."""
    t = torch.randint(0, schedule.num_steps, (batch,), generator=generator,
                      device=generator.device if generator is not None else "cpu")
    return t.to(device) if device is not None else t


def training_losses(model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, cond: torch.Tensor,
                    t: torch.Tensor, noise: torch.Tensor, label: torch.Tensor | None = None,
                    band_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """cWDM's loss: MSE of the x0 prediction, reported per band.

    Noise is drawn in wavelet space (equivalent to image space for an orthonormal transform).
    Returns ``loss`` (B,) (band-weighted mean, uniform weights by default), ``per_band`` (B, C)
    and ``pred_x0`` (B, C, d, h, w).
    """
    x_t = q_sample(schedule, x0, t, noise)
    pred_x0 = make_denoiser(model, schedule, cond, label)(x_t, t)
    per_band = ((pred_x0.float() - x0.float()) ** 2).mean(dim=(2, 3, 4))
    if band_weights is None:
        loss = per_band.mean(dim=1)
    else:
        w = band_weights.to(per_band)
        loss = (per_band * w).sum(dim=1) / w.sum()
    return {"loss": loss, "per_band": per_band, "pred_x0": pred_x0}


VARIANCE_KINDS = ("large", "small")


def reverse_step_mean_variance(schedule: NoiseSchedule, denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor,
                               s: torch.Tensor | None = None,
                               clip: Callable[[torch.Tensor], torch.Tensor] | None = None,
                               variance: str = "large") -> dict[str, torch.Tensor]:
    """Mean and variance of p(x_s | x_t) from the (optionally clipped) x0 prediction.

    s defaults to t - 1 (DDPM). ``variance="large"`` is cWDM's fixed-large choice (the step's
    beta, 1 - alpha_bar_t / alpha_bar_s); ``"small"`` is the true posterior variance. At the
    last step (s = -1) no noise is added; its (log) variance is reported as DDPM does, from the
    posterior variance of the step 1 -> 0, so it stays finite.
    Returns ``pred_x0``, ``mean`` (B, C, d, h, w), ``variance``, ``log_variance`` (B, C, 1, 1, 1).
    """
    if variance not in VARIANCE_KINDS:
        raise ValueError(f"variance must be one of {VARIANCE_KINDS}, got {variance!r}")
    s = t - 1 if s is None else s
    pred_x0 = denoiser(x_t, t)
    if clip is not None:
        pred_x0 = clip(pred_x0)
    coef_x0, coef_xt, post_var = schedule.posterior(t, s)
    mean = append_dims(coef_x0, x_t) * pred_x0 + append_dims(coef_xt, x_t) * x_t
    var = post_var if variance == "small" else 1.0 - schedule.alpha_bar_at(t) / schedule.alpha_bar_at(s)
    final = (s < 0).cpu()
    if bool(final.any()) and schedule.num_steps > 1:
        one = torch.ones_like(t)
        _, _, first_var = schedule.posterior(one, one - 1)
        var = torch.where(final[:, None], first_var, var)
    return {"pred_x0": pred_x0, "mean": mean, "variance": append_dims(var, x_t),
            "log_variance": append_dims(torch.log(var), x_t)}
