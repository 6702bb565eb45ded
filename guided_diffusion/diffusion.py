"""Forward process, the x0-predicting denoiser, and the training loss (cWDM's, per band).

Shapes: x0, x_t, noise are (B, C, d, h, w) target subbands (C = the schedule's n_bands,
8 for one volume); cond is (B, C_cond, d, h, w) conditioning subbands; t is (B,) step
indices into the schedule.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .constants import PRECISIONS
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


def make_denoiser(model: nn.Module, schedule: NoiseSchedule, cond: torch.Tensor, *,
                  label: torch.Tensor | None = None, precision: str = "fp32") -> Denoiser:
    """Bind the conditioning and the precision: the one place where the network input is built
    (i2i mode) and the one place where bf16 autocast is applied.

    The network sees ``cat([x_t, cond], dim=1)`` (B, C + C_cond, d, h, w) and the schedule's model
    time of step t, and predicts x0 (cWDM's ``predict_xstart``), returned in ``x_t``'s dtype. A
    schedule with ``sigma_data`` (prediction ``v``) preconditions per band instead
    (:meth:`~guided_diffusion.schedules.NoiseSchedule.preconditioning`): the network sees
    ``c_in * x_t`` and the denoiser returns ``c_skip * x_t + c_out * output``, still an x0 estimate,
    so every sampler and loss is unchanged.
    ``precision="bf16"`` runs the network under ``torch.autocast(dtype=torch.bfloat16)`` on
    ``x_t``'s device type and casts its output back; ``"fp32"`` leaves the autocast state alone.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"make_denoiser: precision must be one of {PRECISIONS}, got {precision!r}")
    model_times = schedule.model_times.to(device=cond.device, dtype=torch.float32)
    kwargs = {} if label is None else {"label": label}

    def network(x_in: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        net_input = torch.cat([x_in, cond.to(x_in.dtype)], dim=1)
        if precision == "bf16":
            with torch.autocast(x_in.device.type, dtype=torch.bfloat16):
                return model(net_input, time, **kwargs).to(x_in.dtype)
        return model(net_input, time, **kwargs).to(x_in.dtype)

    if getattr(schedule, "sigma_data", None) is None:  # x0 prediction (cWDM), and a flow's velocity
        def denoiser(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return network(x_t, model_times[t.to(cond.device).long()])
        return denoiser

    def preconditioned(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.to(cond.device).long()
        c_in, c_skip, c_out = (append_dims(c, x_t).to(x_t.dtype) for c in schedule.preconditioning(t))
        return c_skip * x_t + c_out * network(c_in * x_t, model_times[t])

    return preconditioned


def snr_weights(schedule: NoiseSchedule, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-band x0-loss weights ``clamp(SNR_b(t), 1, gamma)``, (B, C) float32 (FATS v2, step 3).

    Min-SNR-gamma (Hang et al. 2023, arXiv 2303.09556) in x0 terms weights band b's x0 MSE by
    ``min(SNR_b, gamma)``; the floor at 1 (Salimans & Ho's truncated SNR) keeps plain x0 MSE where
    x_t carries no signal, so the last step, the regression estimate a warm start needs, stays trained.
    With per-band schedules every band gets its own weight at the same t.
    """
    if gamma < 1:
        raise ValueError(f"snr_weights: gamma must be >= 1, got {gamma}")
    ab = schedule.alpha_bar_at(t)
    return (ab / (1.0 - ab)).clamp(1.0, gamma).float()


def training_losses(model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, cond: torch.Tensor,
                    t: torch.Tensor, noise: torch.Tensor, *, label: torch.Tensor | None = None,
                    band_weights: torch.Tensor | None = None, precision: str = "fp32",
                    snr_gamma: float = 0.0) -> dict[str, torch.Tensor]:
    """cWDM's loss: MSE of the x0 prediction, reported per band.

    Noise is drawn in wavelet space (equivalent to image space for an orthonormal transform).
    The network runs through :func:`make_denoiser` (so ``precision`` means what it means there).
    ``snr_gamma`` > 0 multiplies each band's MSE by :func:`snr_weights` before the band average.
    A preconditioned network (schedule with ``sigma_data``) weights band b's x0 MSE by EDM's
    ``1 / c_out^2`` instead (the MSE of the network's own output against its target: for
    sigma_data = 1 the v-prediction loss, ``(1 + SNR)`` times the x0 MSE); ``snr_gamma`` replaces it.
    Returns ``loss`` (B,) (band-weighted mean, uniform weights by default), ``per_band`` (B, C)
    (unweighted) and ``pred_x0`` (B, C, d, h, w).
    """
    x_t = q_sample(schedule, x0, t, noise)
    pred_x0 = make_denoiser(model, schedule, cond, label=label, precision=precision)(x_t, t)
    per_band = ((pred_x0.float() - x0.float()) ** 2).mean(dim=(2, 3, 4))
    if snr_gamma:
        weighted = per_band * snr_weights(schedule, t, snr_gamma).to(per_band.device)
    elif getattr(schedule, "sigma_data", None) is not None:
        weighted = per_band / schedule.preconditioning(t)[2].to(per_band.device).float() ** 2
    else:
        weighted = per_band
    if band_weights is None:
        loss = weighted.mean(dim=1)
    else:
        w = band_weights.to(per_band)
        loss = (weighted * w).sum(dim=1) / w.sum()
    return {"loss": loss, "per_band": per_band, "pred_x0": pred_x0}


VARIANCE_KINDS = ("large", "small")


def ddpm_coefficients(schedule: NoiseSchedule, t: torch.Tensor, s: torch.Tensor,
                      variance: str = "large") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coefficients of p(x_s | x_t) = N(coef_x0 * x0_hat + coef_xt * x_t, var), per band.

    t, s: (B,) step indices, s < t (s = -1: the clean end). ``variance="large"`` is cWDM's
    fixed-large choice (the step's beta, 1 - alpha_bar_t / alpha_bar_s); ``"small"`` is the true
    posterior variance. At s = -1 no noise is added; the variance is reported as DDPM does, from the
    posterior variance of the step 1 -> 0, so it stays finite. Returns three (B, C) float64 tensors.
    Samplers compute them for all their steps at once (one table, moved to the device once).
    """
    if variance not in VARIANCE_KINDS:
        raise ValueError(f"variance must be one of {VARIANCE_KINDS}, got {variance!r}")
    coef_x0, coef_xt, post_var = schedule.posterior(t, s)
    var = post_var if variance == "small" else 1.0 - schedule.alpha_bar_at(t) / schedule.alpha_bar_at(s)
    final = (s < 0).cpu()
    if bool(final.any()) and schedule.num_steps > 1:
        one = torch.ones_like(t)
        _, _, first_var = schedule.posterior(one, one - 1)
        var = torch.where(final[:, None].to(var.device), first_var.to(var.device), var)
    return coef_x0, coef_xt, var


def ddpm_update(x_t: torch.Tensor, pred_x0: torch.Tensor, coef_x0: torch.Tensor, coef_xt: torch.Tensor,
                var: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """x_s = coef_x0 * pred_x0 + coef_xt * x_t (+ sqrt(var) * noise): the arithmetic of one DDPM step.

    x_t, pred_x0, noise: (B, C, d, h, w); coef_x0, coef_xt, var: (B, C) from
    :func:`ddpm_coefficients`. ``noise=None``: the posterior mean (the final step).
    """
    mean = append_dims(coef_x0, x_t) * pred_x0 + append_dims(coef_xt, x_t) * x_t
    return mean if noise is None else mean + append_dims(var, x_t).sqrt() * noise


def posterior_mean_variance(schedule: NoiseSchedule, x_t: torch.Tensor, pred_x0: torch.Tensor, t: torch.Tensor,
                            s: torch.Tensor, variance: str = "large") -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (B, C, d, h, w) and variance (B, C) (float64) of p(x_s | x_t) given the x0 estimate,
    per band (see :func:`ddpm_coefficients`)."""
    coef_x0, coef_xt, var = ddpm_coefficients(schedule, t, s, variance)
    return ddpm_update(x_t, pred_x0, coef_x0, coef_xt, var, None), var


def reverse_step_mean_variance(schedule: NoiseSchedule, denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor,
                               s: torch.Tensor | None = None,
                               clip: Callable[[torch.Tensor], torch.Tensor] | None = None,
                               variance: str = "large") -> dict[str, torch.Tensor]:
    """cWDM's ``p_mean_variance``: denoise x_t, clip the x0 prediction, then
    :func:`posterior_mean_variance` (s defaults to t - 1).

    Returns ``pred_x0``, ``mean`` (B, C, d, h, w), ``variance``, ``log_variance`` (B, C, 1, 1, 1).
    """
    s = t - 1 if s is None else s
    pred_x0 = denoiser(x_t, t)
    if clip is not None:
        pred_x0 = clip(pred_x0)
    mean, var = posterior_mean_variance(schedule, x_t, pred_x0, t, s, variance)
    return {"pred_x0": pred_x0, "mean": mean, "variance": append_dims(var, x_t),
            "log_variance": append_dims(torch.log(var), x_t)}


def ddpm_step(schedule: NoiseSchedule, x_t: torch.Tensor, pred_x0: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
              *, variance: str = "large", noise: torch.Tensor | None = None) -> torch.Tensor:
    """One ancestral (DDPM) step x_t -> x_s ~ N(mean, variance) of :func:`posterior_mean_variance`.

    x_t, pred_x0 (the possibly clipped x0 estimate), noise: (B, C, d, h, w); t, s: (B,) step
    indices with s < t, all equal across the batch. ``s = -1`` is the final step: it returns the
    posterior mean (the x0 estimate itself) and needs no noise; otherwise ``noise`` (standard
    normal) is required. Returns x_s, (B, C, d, h, w).
    """
    coef_x0, coef_xt, var = ddpm_coefficients(schedule, t, s, variance)
    if s[0] < 0:
        return ddpm_update(x_t, pred_x0, coef_x0, coef_xt, var, None)
    if noise is None:
        raise ValueError("ddpm_step: a step to s >= 0 needs noise")
    return ddpm_update(x_t, pred_x0, coef_x0, coef_xt, var, noise)


def ddim_step(x_t: torch.Tensor, pred_x0: torch.Tensor, alpha_bar_t: torch.Tensor, alpha_bar_s: torch.Tensor,
              *, eta: float = 0.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM step x_t -> x_s (Song et al. 2021, eq. 12), per band.

    x_t, pred_x0 (the possibly clipped x0 estimate), noise: (B, C, d, h, w); alpha_bar_t,
    alpha_bar_s: (B, C) cumulative signal fractions at t and at the target step s >= 0. The noise
    estimate is recomputed from the x0 estimate, so clipping that mixes bands stays consistent.
    eta = 0 is deterministic; eta = 1 gives DDPM's posterior variance and needs ``noise``
    (standard normal). The last step of a sampler (to the clean end) is x0 = pred_x0 itself.
    Returns x_s, (B, C, d, h, w).
    """
    if eta < 0:
        raise ValueError(f"ddim_step: eta must be >= 0, got {eta}")
    if eta > 0 and noise is None:
        raise ValueError("ddim_step: eta > 0 needs noise")
    ab_t, ab_s = append_dims(alpha_bar_t, x_t), append_dims(alpha_bar_s, x_t)
    eps = (x_t - ab_t.sqrt() * pred_x0) / (1.0 - ab_t).sqrt()
    sigma = eta * ((1 - ab_s) / (1 - ab_t)).sqrt() * (1 - ab_t / ab_s).sqrt()
    x_s = ab_s.sqrt() * pred_x0 + (1 - ab_s - sigma ** 2).clamp_min(0).sqrt() * eps
    if eta > 0:
        x_s = x_s + sigma * noise
    return x_s
