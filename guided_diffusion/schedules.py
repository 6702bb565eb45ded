"""Noise schedules as objects with per-band coefficient arrays.

A schedule is the table ``alpha_bar[band, t]`` for t = 0 .. T-1 (float64, decreasing in t)
plus the time value the network is given at each step (``model_times``). Every band may be
noised differently (FATS); a shared schedule is the same row repeated, and then every formula
reduces exactly to the single-schedule one. Samplers take any decreasing subset of steps; the
posterior between two steps is computed from alpha_bar alone, so respacing needs no extra table.

Layer 1: the base curves (:func:`linear`, :func:`cosine`, :func:`fast_sampled`) and the per-band
shifting of a base curve (:func:`per_band_schedule`, FATS's schedule shape). Nothing here reads a
config: :mod:`guided_diffusion.factory` maps a ``DiffusionConfig`` to these functions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from typing import Sequence

import torch

from .constants import REFERENCE_STEPS


@dataclass(frozen=True)
class NoiseSchedule:
    """Per-band diffusion schedule.

    Attributes:
        alpha_bar: (n_bands, T) float64, in (0, 1], strictly decreasing along t.
        model_times: (T,) float64, the time value fed to the network at step t.
        name: a label for logs.
        sigma_data: None when the network predicts x0 (cWDM), else (n_bands,) float64 per-band data
            scales of its preconditioning (:meth:`preconditioning`; all ones: v-prediction).
    """

    alpha_bar: torch.Tensor
    model_times: torch.Tensor
    name: str = "custom"
    sigma_data: torch.Tensor | None = None
    # alpha_bar with a leading column of ones (step -1), per device: built once, so indexing with
    # device-resident step indices (the training loop on a GPU) never copies to or from the host.
    _padded_by_device: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        ab, times = self.alpha_bar, self.model_times
        if ab.ndim != 2 or times.ndim != 1 or ab.shape[1] != times.shape[0]:
            raise ValueError(f"NoiseSchedule: need alpha_bar (bands, T) and model_times (T,), got "
                             f"{tuple(ab.shape)} and {tuple(times.shape)}")
        if not bool(((ab > 0) & (ab <= 1)).all()):
            raise ValueError("NoiseSchedule: alpha_bar must lie in (0, 1]")
        if ab.shape[1] > 1 and not bool((ab[:, 1:] < ab[:, :-1]).all()):
            raise ValueError("NoiseSchedule: alpha_bar must be strictly decreasing in t for every band")
        sd = self.sigma_data
        if sd is not None and (sd.shape != (ab.shape[0],) or not bool((torch.isfinite(sd) & (sd > 0)).all())):
            raise ValueError(f"NoiseSchedule: sigma_data must be ({ab.shape[0]},) finite values > 0, got "
                             f"{sd.tolist() if sd.ndim else sd}")

    @property
    def num_steps(self) -> int:
        return self.alpha_bar.shape[1]

    @property
    def n_bands(self) -> int:
        return self.alpha_bar.shape[0]

    @property
    def betas(self) -> torch.Tensor:
        """(n_bands, T) per-step betas: 1 - alpha_bar[t] / alpha_bar[t-1] (alpha_bar[-1] = 1)."""
        prev = torch.cat([torch.ones_like(self.alpha_bar[:, :1]), self.alpha_bar[:, :-1]], dim=1)
        return 1.0 - self.alpha_bar / prev

    @property
    def log_snr(self) -> torch.Tensor:
        """(n_bands, T) log(alpha_bar / (1 - alpha_bar))."""
        return torch.log(self.alpha_bar) - torch.log1p(-self.alpha_bar)

    def alpha_bar_at(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar for step indices t (B,), -1 meaning "no noise" (alpha_bar = 1): (B, n_bands)."""
        padded = self._padded_by_device.get(t.device)
        if padded is None:
            padded = torch.cat([torch.ones_like(self.alpha_bar[:, :1]), self.alpha_bar], dim=1).to(t.device)
            self._padded_by_device[t.device] = padded
        return padded[:, t.long() + 1].T.contiguous()

    def preconditioning(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """EDM's preconditioning (Karras et al. 2022, table 1) in variance-preserving form, per band.

        With ``x_t = sqrt(a) x0 + sqrt(1 - a) eps`` (a = alpha_bar_t) and s the band's
        ``sigma_data``, the denoiser is ``x0_hat = c_skip * x_t + c_out * F(c_in * x_t)``:
        ``c_in = 1 / sqrt(1 - a + a s^2)``, ``c_skip = a^(1/2) s^2 / (1 - a + a s^2)``,
        ``c_out = s sqrt(1 - a) / sqrt(1 - a + a s^2)``. (EDM's coefficients on x_t / sqrt(a) with
        sigma^2 = (1 - a) / a.) With s = 1: c_in = 1, c_skip = sqrt(a), c_out = sqrt(1 - a), i.e.
        F predicts -v (Salimans & Ho 2022), and near t = 0 the estimate is x_t itself, whatever F.
        t: (B,) step indices. Returns c_in, c_skip, c_out, each (B, n_bands) float64.
        """
        if self.sigma_data is None:
            raise ValueError("preconditioning: this schedule's network predicts x0 (no sigma_data)")
        a = self.alpha_bar_at(t)
        s2 = self.sigma_data.to(a.device, torch.float64)[None] ** 2
        denom = 1.0 - a + a * s2
        return denom.rsqrt(), a.sqrt() * s2 / denom, (s2 * (1.0 - a) / denom).sqrt()

    def posterior(self, t: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Coefficients of q(x_s | x_t, x0) for step indices s < t (s = -1: the clean image).

        With a = sqrt(alpha_bar_t / alpha_bar_s) and sigma^2 = 1 - alpha_bar:
        mean = coef_xt * x_t + coef_x0 * x0, variance = (1 - a^2) sigma_s^2 / sigma_t^2.
        Returns three (B, n_bands) float64 tensors: coef_x0, coef_xt, variance. For s = t - 1
        these are DDPM's posterior_mean_coef1, posterior_mean_coef2 and posterior_variance.
        """
        if bool((s >= t).any()):
            raise ValueError(f"posterior: need s < t, got t={t.tolist()}, s={s.tolist()}")
        ab_t, ab_s = self.alpha_bar_at(t), self.alpha_bar_at(s)
        step_beta = 1.0 - ab_t / ab_s
        coef_x0 = torch.sqrt(ab_s) * step_beta / (1.0 - ab_t)
        coef_xt = torch.sqrt(ab_t / ab_s) * (1.0 - ab_s) / (1.0 - ab_t)
        variance = step_beta * (1.0 - ab_s) / (1.0 - ab_t)
        return coef_x0, coef_xt, variance

    def per_band(self, n_bands: int) -> "NoiseSchedule":
        """This schedule with its (single) row repeated for ``n_bands`` bands."""
        if self.n_bands == n_bands:
            return self
        if self.n_bands != 1:
            raise ValueError(f"per_band: cannot map {self.n_bands} bands to {n_bands}")
        sd = None if self.sigma_data is None else self.sigma_data.expand(n_bands).clone()
        return NoiseSchedule(self.alpha_bar.expand(n_bands, -1).clone(), self.model_times, self.name, sd)

    def with_sigma_data(self, sigma_data: Sequence[float] | torch.Tensor | None) -> "NoiseSchedule":
        """This schedule with the network's preconditioning set (None: x0 prediction)."""
        sd = None if sigma_data is None else torch.as_tensor(sigma_data, dtype=torch.float64).flatten().clone()
        return NoiseSchedule(self.alpha_bar, self.model_times, self.name, sd)

    def state_dict(self) -> dict[str, torch.Tensor | str]:
        state = {"alpha_bar": self.alpha_bar.clone(), "model_times": self.model_times.clone(), "name": self.name}
        if self.sigma_data is not None:
            state["sigma_data"] = self.sigma_data.clone()
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> "NoiseSchedule":
        """A schedule from :meth:`state_dict` (one without ``sigma_data``: x0 prediction, as every
        checkpoint written before the key existed)."""
        sd = state.get("sigma_data")
        return cls(state["alpha_bar"].double(), state["model_times"].double(), str(state["name"]),
                   None if sd is None else sd.double())


def _from_betas(betas: torch.Tensor, n_bands: int, model_times: torch.Tensor, name: str) -> NoiseSchedule:
    alpha_bar = torch.cumprod(1.0 - betas.double(), dim=0)
    return NoiseSchedule(alpha_bar[None].expand(n_bands, -1).clone(), model_times.double(), name)


def linear(num_train_steps: int = REFERENCE_STEPS, beta_start: float = 1e-4, beta_end: float = 0.02,
           n_bands: int = 8) -> NoiseSchedule:
    """DDPM's linear betas over T = ``num_train_steps``; with T != 1000 the betas are rescaled by
    1000 / T (guided-diffusion's convention, Fast-DDPM "direct"). The network sees t * 1000 / T so
    its time embedding covers the same range whatever T is."""
    T = num_train_steps
    scale = REFERENCE_STEPS / T
    betas = torch.linspace(beta_start * scale, min(beta_end * scale, 0.999), T, dtype=torch.float64)
    name = "linear" if T == REFERENCE_STEPS else f"fast_direct{T}"
    return _from_betas(betas, n_bands, torch.arange(T, dtype=torch.float64) * scale, name)


def cosine(num_train_steps: int = REFERENCE_STEPS, n_bands: int = 8, offset: float = 0.008) -> NoiseSchedule:
    """Nichol & Dhariwal's cosine schedule over T = ``num_train_steps`` (betas capped at 0.999)."""
    def f(u):
        return math.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2

    T = num_train_steps
    betas = torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64)
    scale = REFERENCE_STEPS / T
    return _from_betas(betas, n_bands, torch.arange(T, dtype=torch.float64) * scale, f"cosine{T}")


def fast_sampled(intervals: int = 10, num_train_steps: int = REFERENCE_STEPS, beta_start: float = 1e-4,
                 beta_end: float = 0.02, n_bands: int = 8) -> NoiseSchedule:
    """Fast-DDPM's uniform choice: the ``num_train_steps``-long linear curve at ``intervals`` + 1
    points including t = 0 (for 1000 and 10: steps [0, 99, 199, ..., 999]).

    Sampling through all of them costs ``intervals`` + 1 network evaluations. The network sees
    the base curve's time at each chosen point (the original 1000-step index for T = 1000).
    """
    base = linear(num_train_steps, beta_start, beta_end, n_bands)
    stride = num_train_steps // intervals
    idx = torch.arange(-1, num_train_steps, stride)
    idx[0] = 0
    return NoiseSchedule(base.alpha_bar[:, idx].clone(), base.model_times[idx].clone(), f"fast_sampled{intervals}")


def per_band_schedule(base: NoiseSchedule, shifts: Sequence[float] | torch.Tensor,
                      max_shift: float | None = None, name: str | None = None) -> NoiseSchedule:
    """Shift the base log-SNR per band, then re-pin each band's endpoints to the base curve's.

    ``lambda_b(t) = lambda(t) + delta_b``; ``sqrt(alpha_bar_b)`` is then mapped affinely so that
    its values at t = 0 and t = T-1 equal the base curve's (Lin et al. 2023's rescaling, but to
    the base's small positive terminal value instead of zero, since alpha_bar must stay > 0).
    So every band starts from the same pure noise and ends as clean as the base, while the
    shift holds in the middle of the schedule. A band with zero shift keeps the base row
    bit for bit, so all-zero shifts give exactly the base schedule.
    Args:
        base: a schedule whose bands all share one curve (row 0 is used).
        shifts: (n_bands,) log-SNR shifts; clipped to +-max_shift when that is given.
    """
    shifts = torch.as_tensor(shifts, dtype=torch.float64).flatten()
    if max_shift is not None:
        shifts = shifts.clamp(-max_shift, max_shift)
    if not bool(torch.isfinite(shifts).all()):
        raise ValueError(f"per_band_schedule: shifts must be finite, got {shifts.tolist()}")
    if base.n_bands > 1 and not bool((base.alpha_bar == base.alpha_bar[:1]).all()):
        raise ValueError("per_band_schedule: the base schedule must share one curve across bands")
    curve = base.alpha_bar[0]
    rows = []
    for delta in shifts.tolist():
        if delta == 0.0 or curve.numel() < 2:
            rows.append(curve.clone())
            continue
        log_snr = torch.log(curve) - torch.log1p(-curve)
        root = torch.sigmoid(log_snr + delta).sqrt()
        lo, hi = curve[-1].sqrt(), curve[0].sqrt()
        pinned = lo + (root - root[-1]) * (hi - lo) / (root[0] - root[-1])
        pinned[0], pinned[-1] = hi, lo  # exact endpoints despite rounding
        rows.append(pinned ** 2)
    alpha_bar = torch.stack(rows)
    if name is None:
        name = base.name if not bool(shifts.any()) else f"fats-{base.name}"
    return NoiseSchedule(alpha_bar, base.model_times.clone(), name)
