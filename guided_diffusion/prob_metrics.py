"""Probabilistic metrics for ensembles of synthesised 3D volumes (docs/metrics_probabilistic.md).

A sampler that draws from the posterior p(target | conditioning) is judged on more than the
distance of one sample to the truth: the spread of its samples, their fine detail and how both
compare with what an exact sampler would give. This module holds those scores (BENCHMARK_V2,
section Metrics); :mod:`guided_diffusion.metrics` keeps the BraSyn image-quality metrics.

Shapes and conventions (every function):

* ``samples``: ``(M, X, Y, Z)``, M model samples for one case;
* ``target``: ``(X, Y, Z)``, the real volume; ``oracle_draws``: ``(N, X, Y, Z)``, draws from the
  true (or reference) posterior; ``teacher_samples``: ``(M, X, Y, Z)``;
* ``mask``: ``(X, Y, Z)``, voxels with ``mask > 0`` count (``bool`` or numbers);
* inputs are numpy arrays or torch tensors (any device); they are converted once to float64
  numpy on the CPU and never modified; results are Python floats (lists of floats per band).

Bad input raises ``ValueError`` naming the argument: a wrong rank or shape, an empty mask, too
few samples for a spread (``M >= 2``, ``N >= 2`` where a variance is needed).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from scipy.stats import spearmanr
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

from DWT_IDWT import N_BANDS, to_subbands

ArrayLike = Union[np.ndarray, torch.Tensor]

__all__ = [
    "fair_crps", "spread_error_ratio", "spread_skill", "band_spread_skill", "band_energy_ratio",
    "oracle_mean_distance", "rapsd", "rapsd_distance", "teacher_distance", "msssim_diversity",
    "uncertainty_calibration", "ensemble_metrics", "ENSEMBLE_METRIC_KEYS",
]

#: Keys of :func:`ensemble_metrics`, in order.
ENSEMBLE_METRIC_KEYS: Tuple[str, ...] = (
    "crps_brain", "crps_tumor", "spread_error_brain", "spread_error_tumor",
    "std_error_spearman", "top10_std_error_ratio",
)

#: Standard MS-SSIM scale weights (Wang et al. 2003), coarsest last.
MSSSIM_BETAS: Tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
#: 3D MS-SSIM window: 7 taps per axis (11 is too wide for several scales of a brain volume);
#: sigma 1.5 * 7 / 11 keeps the window-to-sigma proportion of the standard 11-tap, sigma 1.5 one
#: and gives torchmetrics' Gaussian exactly 7 taps (2 * int(3.5 * sigma + 0.5) + 1 = 7).
MSSSIM_KERNEL_SIZE = 7
MSSSIM_SIGMA = 1.5 * MSSSIM_KERNEL_SIZE / 11

#: :func:`uncertainty_calibration` ranks at most this many voxels (an even stride over the mask).
MAX_SPEARMAN_VOXELS = 1_000_000


# --------------------------------------------------------------------------- #
# input checks
# --------------------------------------------------------------------------- #
def _array(x: ArrayLike, name: str, ndim: int) -> np.ndarray:
    """``x`` as a float64 numpy array (a copy for torch input) of rank ``ndim``."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != ndim:
        expected = "(X, Y, Z)" if ndim == 3 else "(M, X, Y, Z)"
        raise ValueError(f"{name} must have shape {expected}, got shape {a.shape}")
    return a


def _ensemble(x: ArrayLike, name: str, min_members: int = 1) -> np.ndarray:
    a = _array(x, name, 4)
    if a.shape[0] < min_members:
        raise ValueError(f"{name} has {a.shape[0]} member(s); this metric needs at least {min_members} "
                         f"(a spread needs two or more)")
    return a


def _same_volume_shape(a: np.ndarray, a_name: str, b: np.ndarray, b_name: str) -> None:
    if a.shape[-3:] != b.shape[-3:]:
        raise ValueError(f"{a_name} and {b_name} have different volume shapes: {a.shape[-3:]} vs {b.shape[-3:]}")


def _mask(mask: Optional[ArrayLike], shape: Tuple[int, ...], name: str = "mask") -> np.ndarray:
    """``mask > 0`` as bool of ``shape`` (all voxels for None); an empty mask is an error."""
    if mask is None:
        return np.ones(shape, dtype=bool)
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise ValueError(f"{name} has shape {m.shape}, expected the volume shape {tuple(shape)}")
    m = m > 0
    if not m.any():
        raise ValueError(f"{name} is empty (no voxel > 0): the metric is undefined")
    return m


def _var(members: np.ndarray) -> np.ndarray:
    """Unbiased variance across axis 0 (the members), per voxel."""
    return members.var(axis=0, ddof=1)


def _ratio(num: float, den: float) -> float:
    """num / den with IEEE semantics for a zero denominator (inf, or nan for 0 / 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(num) / np.float64(den))


# --------------------------------------------------------------------------- #
# scores against the real target
# --------------------------------------------------------------------------- #
def fair_crps(samples: ArrayLike, target: ArrayLike, mask: Optional[ArrayLike]) -> float:
    """Fair (unbiased) ensemble CRPS, averaged over the mask.

    Per voxel, with members ``x^1..x^M`` and truth ``x``::

        CRPS = mean_m |x^m - x|  -  sum_{m != m'} |x^m - x^m'| / (2 M (M - 1))

    (Ferro 2014's fair estimator: an unbiased estimate of the CRPS of the distribution the
    members are drawn from; lower is better.) ``M = 1`` gives the mean absolute error. The pair
    sum is computed from the sorted members, ``sum_{m != m'} |.| = 2 sum_i (2 i - M - 1) x_(i)``
    (``i = 1..M``), so memory is O(M V) for V mask voxels, never O(M^2 V).

    Args:
        samples: ``(M, X, Y, Z)``, ``M >= 1``.
        target: ``(X, Y, Z)``.
        mask: ``(X, Y, Z)``; ``None`` = every voxel.
    """
    x = _ensemble(samples, "samples")
    y = _array(target, "target", 3)
    _same_volume_shape(x, "samples", y, "target")
    m = _mask(mask, y.shape)
    members, truth = x[:, m], y[m]  # (M, V), (V,)
    n_members = members.shape[0]
    skill = np.abs(members - truth).mean(axis=0)
    if n_members == 1:
        return float(skill.mean())
    members.sort(axis=0)
    weights = 2.0 * np.arange(1, n_members + 1) - n_members - 1.0  # (M,)
    spread = np.tensordot(weights, members, axes=1) / (n_members * (n_members - 1))
    return float((skill - spread).mean())


def spread_error_ratio(samples: ArrayLike, target: ArrayLike, mask: Optional[ArrayLike]) -> float:
    """Ensemble spread-skill ratio against the real target (no oracle needed).

    ``sqrt((M + 1) / M * mean_mask(var_m x^m)) / sqrt(mean_mask((mean_m x^m - x)^2))`` with the
    unbiased variance across the members. For members and truth drawn independently from the
    same distribution the expected squared error of the ensemble mean is ``(M + 1) / M`` times
    the variance, so a calibrated ensemble scores ~1; < 1 is over-confident (a deterministic
    model scores 0), > 1 over-dispersed. ``inf`` if the ensemble mean equals the target.

    Args:
        samples: ``(M, X, Y, Z)``, ``M >= 2`` (ValueError otherwise).
        target: ``(X, Y, Z)``; mask: ``(X, Y, Z)`` or None.
    """
    x = _ensemble(samples, "samples", 2)
    y = _array(target, "target", 3)
    _same_volume_shape(x, "samples", y, "target")
    m = _mask(mask, y.shape)
    members, truth = x[:, m], y[m]
    n_members = members.shape[0]
    spread = math.sqrt((n_members + 1) / n_members * _var(members).mean())
    rmse = math.sqrt(np.mean((members.mean(axis=0) - truth) ** 2))
    return _ratio(spread, rmse)


# --------------------------------------------------------------------------- #
# scores against an oracle (draws from the true posterior)
# --------------------------------------------------------------------------- #
def _samples_and_oracle(samples: ArrayLike, oracle_draws: ArrayLike, min_members: int
                        ) -> Tuple[np.ndarray, np.ndarray]:
    x = _ensemble(samples, "samples", min_members)
    o = _ensemble(oracle_draws, "oracle_draws", min_members)
    _same_volume_shape(x, "samples", o, "oracle_draws")
    return x, o


def spread_skill(samples: ArrayLike, oracle_draws: ArrayLike, mask: Optional[ArrayLike]) -> float:
    """Spread relative to the oracle: ``mean_mask(var_m x^m) / mean_mask(var_n y^n)``.

    Unbiased variances across the M samples and the N oracle draws. An exact sampler scores ~1,
    the posterior mean (or any deterministic model) 0. ``inf`` / ``nan`` if the oracle has no
    spread inside the mask.

    Args:
        samples: ``(M, X, Y, Z)``, ``M >= 2``; oracle_draws: ``(N, X, Y, Z)``, ``N >= 2``;
        mask: ``(X, Y, Z)`` or None.
    """
    x, o = _samples_and_oracle(samples, oracle_draws, 2)
    m = _mask(mask, x.shape[1:])
    return _ratio(_var(x[:, m]).mean(), _var(o[:, m]).mean())


def _bands(volumes: np.ndarray, name: str) -> np.ndarray:
    """(K, X, Y, Z) -> (K, 8, X/2, Y/2, Z/2) cWDM subbands (float64), bands in ``BAND_NAMES`` order."""
    odd = [s for s in volumes.shape[1:] if s % 2]
    if odd:
        raise ValueError(f"{name}: the Haar bands need even volume dimensions, got {volumes.shape[1:]}")
    return to_subbands(torch.from_numpy(volumes)[:, None]).numpy()


def band_spread_skill(samples: ArrayLike, oracle_draws: ArrayLike) -> List[float]:
    """:func:`spread_skill` per Haar band, over the whole volume (no mask).

    The volumes go through ``DWT_IDWT.to_subbands`` (one-level orthonormal 3D Haar, LLL / 3, which
    cancels in the ratio). Returns 8 floats in ``DWT_IDWT.BAND_NAMES`` order
    (LLL, LLH, ..., HHH): ``mean(var_m band_b(x^m)) / mean(var_n band_b(y^n))``.

    Args:
        samples: ``(M, X, Y, Z)``, ``M >= 2``; oracle_draws: ``(N, X, Y, Z)``, ``N >= 2``;
        X, Y, Z even.
    """
    x, o = _samples_and_oracle(samples, oracle_draws, 2)
    bx, bo = _bands(x, "samples"), _bands(o, "oracle_draws")
    num = _var(bx).reshape(N_BANDS, -1).mean(axis=1)
    den = _var(bo).reshape(N_BANDS, -1).mean(axis=1)
    return [_ratio(a, b) for a, b in zip(num, den)]


def band_energy_ratio(samples: ArrayLike, oracle_draws: ArrayLike) -> List[float]:
    """Energy per Haar band relative to the oracle's.

    ``rho_b = mean_m sum(band_b(x^m)^2) / mean_n sum(band_b(y^n)^2)`` (whole volume, bands as in
    :func:`band_spread_skill`, 8 floats in ``BAND_NAMES`` order). An exact sampler scores ~1 in
    every band; the posterior mean scores ``1 - R_b / E_b`` (``R_b`` the band's summed posterior
    variance, ``E_b`` the oracle's expected band energy): blur shows as rho < 1 in the detail
    bands.

    Args:
        samples: ``(M, X, Y, Z)``, ``M >= 1``; oracle_draws: ``(N, X, Y, Z)``, ``N >= 1``;
        X, Y, Z even.
    """
    x, o = _samples_and_oracle(samples, oracle_draws, 1)

    def energy(bands: np.ndarray) -> np.ndarray:  # (K, 8, ...) -> (8,)
        return (bands ** 2).reshape(bands.shape[0], N_BANDS, -1).sum(axis=2).mean(axis=0)

    return [_ratio(a, b) for a, b in zip(energy(_bands(x, "samples")), energy(_bands(o, "oracle_draws")))]


def oracle_mean_distance(samples: ArrayLike, oracle_draws: ArrayLike, mask: Optional[ArrayLike]) -> float:
    """Squared distance of the ensemble mean to the oracle mean, debiased.

    ``MSE_mask(mean_m x^m, mean_n y^n) - (mean_mask(var_m x^m) / M + mean_mask(var_n y^n) / N)``
    with unbiased variances. Both means carry sampling noise, which adds ``var / M`` and
    ``var / N`` to the expected MSE; the subtraction removes it, so the result is an unbiased
    estimate of ``mean_mask((E[x] - E[y])^2)``: ~0 for an exact sampler (it can be slightly
    negative), ~0 for the posterior mean too (the metric measures the bias of the mean, not the
    spread), > 0 for a biased model.

    Args:
        samples: ``(M, X, Y, Z)``, ``M >= 2`` (for a deterministic model pass its output twice:
            zero spread); oracle_draws: ``(N, X, Y, Z)``, ``N >= 2``; mask: ``(X, Y, Z)`` or None.
    """
    x, o = _samples_and_oracle(samples, oracle_draws, 2)
    m = _mask(mask, x.shape[1:])
    xs, os_ = x[:, m], o[:, m]
    mse = np.mean((xs.mean(axis=0) - os_.mean(axis=0)) ** 2)
    bias = _var(xs).mean() / xs.shape[0] + _var(os_).mean() / os_.shape[0]
    return float(mse - bias)


# --------------------------------------------------------------------------- #
# spectra, teacher, diversity
# --------------------------------------------------------------------------- #
def _radial_spectrum(volume: np.ndarray, mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    shape = volume.shape
    power = np.abs(np.fft.fftn(np.where(mask, volume, 0.0))) ** 2 / volume.size
    step = 1.0 / min(shape)  # bin width: the coarsest frequency spacing, so no bin is empty
    grids = np.meshgrid(*[np.fft.fftfreq(n) for n in shape], indexing="ij", sparse=True)
    radius = np.sqrt(sum(g ** 2 for g in grids))
    bins = np.rint(radius / step).astype(np.int64)
    n_bins = min(shape) // 2  # up to the Nyquist sphere (0.5 cycles / voxel)
    inside = (bins >= 1) & (bins <= n_bins)
    counts = np.bincount(bins[inside], minlength=n_bins + 1)[1:]
    sums = np.bincount(bins[inside], weights=power[inside], minlength=n_bins + 1)[1:]
    return np.arange(1, n_bins + 1) * step, sums / counts


def rapsd(volume: ArrayLike, mask: Optional[ArrayLike]) -> Tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectral density of the masked volume.

    The volume is set to 0 outside the mask, 3D-FFT'd, and ``|F|^2 / (X Y Z)`` (Parseval: sums to
    the sum of squares) is averaged over spherical shells of the frequency radius
    ``sqrt(fx^2 + fy^2 + fz^2)`` (cycles / voxel). Shell ``k`` holds radii within half a bin of
    ``k / min(X, Y, Z)``, for ``k = 1 .. min(X, Y, Z) // 2`` (the DC term, the masked mean, is
    left out; the shells stop at the Nyquist radius 0.5).

    Args:
        volume: ``(X, Y, Z)``; mask: ``(X, Y, Z)`` or None (whole volume); every dim >= 2.

    Returns:
        ``(freqs, power)``: two float64 arrays of ``min(X, Y, Z) // 2`` bins.
    """
    v = _array(volume, "volume", 3)
    if min(v.shape) < 2:
        raise ValueError(f"volume needs every dimension >= 2 for a spectrum, got {v.shape}")
    return _radial_spectrum(v, _mask(mask, v.shape))


def _log_spectral_distance(power: np.ndarray, reference: np.ndarray) -> float:
    tiny = np.finfo(np.float64).tiny  # a zero bin compares as a very small power, not as NaN
    db = 10.0 * np.log10(np.maximum(power, tiny) / np.maximum(reference, tiny))
    return float(np.sqrt(np.mean(db ** 2)))


def rapsd_distance(samples: ArrayLike, reference: ArrayLike, mask: Optional[ArrayLike]) -> float:
    """Log-spectral distance (dB) between the samples' and a reference's :func:`rapsd`.

    Per sample ``sqrt(mean_bins (10 log10(P_x / P_ref))^2)``, averaged over the samples. The
    reference is one volume ``(X, Y, Z)`` (e.g. the real target) or draws ``(N, X, Y, Z)`` (e.g.
    the oracle), whose spectra are averaged first. 0 for identical spectra; too smooth samples
    lose power in the high-frequency bins.

    Args:
        samples: ``(M, X, Y, Z)``; reference: ``(X, Y, Z)`` or ``(N, X, Y, Z)``;
        mask: ``(X, Y, Z)`` or None.
    """
    x = _ensemble(samples, "samples")
    ref = reference.detach().cpu().numpy() if isinstance(reference, torch.Tensor) else np.asarray(reference)
    ref = _array(ref[None] if ref.ndim == 3 else ref, "reference", 4)
    _same_volume_shape(x, "samples", ref, "reference")
    if min(x.shape[1:]) < 2:
        raise ValueError(f"samples need every dimension >= 2 for a spectrum, got {x.shape[1:]}")
    m = _mask(mask, x.shape[1:])
    ref_power = np.mean([_radial_spectrum(r, m)[1] for r in ref], axis=0)
    return float(np.mean([_log_spectral_distance(_radial_spectrum(s, m)[1], ref_power) for s in x]))


def teacher_distance(samples: ArrayLike, teacher_samples: ArrayLike, mask: Optional[ArrayLike]) -> float:
    """Mean over m of ``RMSE_mask(x^m, t^m)``: sample m against the many-step teacher's sample m
    from the same initial noise (paired by index; LD3's criterion). 0 = the teacher reproduced.

    Args:
        samples, teacher_samples: ``(M, X, Y, Z)``, same shape; mask: ``(X, Y, Z)`` or None.
    """
    x = _ensemble(samples, "samples")
    t = _ensemble(teacher_samples, "teacher_samples")
    if x.shape != t.shape:
        raise ValueError(f"samples and teacher_samples must pair up one to one: shapes {x.shape} vs {t.shape}")
    m = _mask(mask, x.shape[1:])
    return float(np.mean(np.sqrt(np.mean((x[:, m] - t[:, m]) ** 2, axis=1))))


def _msssim_scales(shape: Tuple[int, ...]) -> int:
    """Most scales (<= 5) at which the 7-tap window still fits the coarsest level of ``shape``,
    within torchmetrics' own size checks; 0 if even one scale does not fit."""
    k = MSSSIM_KERNEL_SIZE
    for scales in range(len(MSSSIM_BETAS), 0, -1):
        fits = all(n // 2 ** (scales - 1) >= k for n in shape)
        div = max(1, scales - 1) ** 2
        torchmetrics_ok = all(n >= 2 ** scales and n // div > k - 1 for n in shape[-2:])
        if fits and torchmetrics_ok:
            return scales
    return 0


def _bounding_box(mask: np.ndarray) -> Tuple[slice, ...]:
    """The smallest box holding every True voxel of a non-empty 3D mask, as slices."""
    box = []
    for axis in range(mask.ndim):
        occupied = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(occupied[0]), int(occupied[-1]) + 1))
    return tuple(box)


def msssim_diversity(samples: ArrayLike, mask: Optional[ArrayLike] = None, *, data_range: float = 1.0) -> float:
    """Mean over pairs m < m' of ``1 - MS-SSIM(x^m, x^m')`` on the mask's bounding box (3D).

    0 for identical samples, larger for more diverse ones (compare with the oracle draws' value).
    MS-SSIM is torchmetrics' ``multiscale_structural_similarity_index_measure`` on the cropped
    box (voxels outside the mask inside the box are kept), with:

    * a 7-tap Gaussian window, sigma ``1.5 * 7 / 11`` (the standard 11 taps fit too few scales
      of a brain-sized box), K1 = 0.01, K2 = 0.03, ``data_range`` (1 for volumes in [0, 1]);
    * as many of the standard 5 scales (betas 0.0448, 0.2856, 0.3001, 0.2363, 0.1333) as the box
      allows, i.e. the coarsest level still >= 7 voxels along each axis (and torchmetrics' size
      rules hold): a 112x112x80 box gets 4 scales, a 30^3 box 3, a 7^3 box 1 (plain SSIM); the
      betas used are the first S renormalised to sum 1. A box smaller than 7 along any axis
      raises ValueError;
    * ``normalize="relu"``: negative contrast-structure terms count as 0 (otherwise a
      fractional power of a negative number is NaN for very different samples).

    Args:
        samples: ``(M, X, Y, Z)``, ``M >= 2``; mask: ``(X, Y, Z)`` or None (whole volume).
        data_range: intensity range for the SSIM constants.
    """
    x = _ensemble(samples, "samples", 2)
    m = _mask(mask, x.shape[1:])
    box = x[(slice(None), *_bounding_box(m))]
    scales = _msssim_scales(box.shape[1:])
    if scales == 0:
        raise ValueError(f"the mask's bounding box {box.shape[1:]} is smaller than the {MSSSIM_KERNEL_SIZE}-voxel "
                         "MS-SSIM window along some axis")
    betas = np.asarray(MSSSIM_BETAS[:scales]) / sum(MSSSIM_BETAS[:scales])
    volumes = torch.from_numpy(np.ascontiguousarray(box))[:, None, None]  # (M, 1, 1, x, y, z)
    dissimilarity = []
    for i in range(len(volumes)):
        for j in range(i + 1, len(volumes)):
            score = multiscale_structural_similarity_index_measure(
                volumes[i], volumes[j], gaussian_kernel=True, sigma=MSSSIM_SIGMA, kernel_size=MSSSIM_KERNEL_SIZE,
                data_range=data_range, k1=0.01, k2=0.03, betas=tuple(float(b) for b in betas), normalize="relu")
            dissimilarity.append(1.0 - float(score))
    return float(np.mean(dissimilarity))


# --------------------------------------------------------------------------- #
# uncertainty maps and the sample.py summary
# --------------------------------------------------------------------------- #
def uncertainty_calibration(samples: ArrayLike, target: ArrayLike, mask: Optional[ArrayLike]) -> Dict[str, float]:
    """Does the per-voxel spread point at the errors?

    Over the mask, with ``s`` the per-voxel standard deviation across the members (ddof 1) and
    ``e = |mean_m x^m - x|``:

    * ``spearman``: Spearman rank correlation of ``s`` and ``e`` (scipy); masks above
      :data:`MAX_SPEARMAN_VOXELS` voxels are subsampled with an even stride (deterministic).
      NaN when ``s`` or ``e`` is constant (e.g. a deterministic model);
    * ``top10_error_ratio``: mean ``e`` over the 10% of voxels with the largest ``s``
      (``ceil(0.1 V)`` voxels; ties broken by voxel order) divided by the mean ``e`` over the
      rest. 1 = uninformative, > 1 = the spread finds the errors; NaN with fewer than 2 voxels.

    Args:
        samples: ``(M, X, Y, Z)``, ``M >= 2``; target: ``(X, Y, Z)``; mask: ``(X, Y, Z)`` or None.

    Returns:
        ``{"spearman": float, "top10_error_ratio": float}``.
    """
    x = _ensemble(samples, "samples", 2)
    y = _array(target, "target", 3)
    _same_volume_shape(x, "samples", y, "target")
    m = _mask(mask, y.shape)
    members = x[:, m]
    std = members.std(axis=0, ddof=1)
    err = np.abs(members.mean(axis=0) - y[m])
    stride = max(1, math.ceil(std.size / MAX_SPEARMAN_VOXELS))
    s_sub, e_sub = std[::stride], err[::stride]
    if s_sub.size < 2 or np.ptp(s_sub) == 0 or np.ptp(e_sub) == 0:
        spearman = float("nan")
    else:
        spearman = float(spearmanr(s_sub, e_sub).statistic)
    if std.size < 2:
        return {"spearman": spearman, "top10_error_ratio": float("nan")}
    n_top = math.ceil(0.1 * std.size)
    order = np.argsort(-std, kind="stable")
    top, rest = err[order[:n_top]], err[order[n_top:]]
    return {"spearman": spearman, "top10_error_ratio": _ratio(top.mean(), rest.mean())}


def _nonempty_or_none(mask: Optional[ArrayLike], shape: Tuple[int, ...], name: str) -> Optional[np.ndarray]:
    """:func:`_mask`, but None for an empty mask (a case without tumour) instead of an error."""
    if mask is not None:
        m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        if m.shape == tuple(shape) and not (m > 0).any():
            return None
    return _mask(mask, shape, name)


def _finite_or_none(value: Optional[float]) -> Optional[float]:
    return value if value is not None and math.isfinite(value) else None


def ensemble_metrics(samples: ArrayLike, target: ArrayLike, brain_mask: Optional[ArrayLike],
                     tumour_mask: Optional[ArrayLike]) -> Dict[str, Optional[float]]:
    """The probabilistic summary of one case for ``metrics.json`` (keys :data:`ENSEMBLE_METRIC_KEYS`).

    ``crps_brain`` / ``crps_tumor``: :func:`fair_crps` over the brain / tumour; ``spread_error_brain``
    / ``spread_error_tumor``: :func:`spread_error_ratio`; ``std_error_spearman`` and
    ``top10_std_error_ratio``: :func:`uncertainty_calibration` over the brain. A value is None
    where it is undefined: the tumour keys when ``tumour_mask`` is None or empty, the brain keys
    when the brain mask is empty, the spread keys for ``M = 1``, and any NaN / inf result.

    Args:
        samples: ``(M, X, Y, Z)``; target: ``(X, Y, Z)``; brain_mask: ``(X, Y, Z)`` or None (whole
            volume); tumour_mask: ``(X, Y, Z)`` or None.
    """
    x = _ensemble(samples, "samples")
    y = _array(target, "target", 3)
    _same_volume_shape(x, "samples", y, "target")
    out: Dict[str, Optional[float]] = dict.fromkeys(ENSEMBLE_METRIC_KEYS)
    spread = x.shape[0] >= 2
    for region, mask in (("brain", brain_mask), ("tumor", tumour_mask)):
        if region == "tumor" and mask is None:
            continue
        m = _nonempty_or_none(mask, y.shape, f"{region} mask")
        if m is None:
            continue
        out[f"crps_{region}"] = _finite_or_none(fair_crps(x, y, m))
        if spread:
            out[f"spread_error_{region}"] = _finite_or_none(spread_error_ratio(x, y, m))
            if region == "brain":
                calibration = uncertainty_calibration(x, y, m)
                out["std_error_spearman"] = _finite_or_none(calibration["spearman"])
                out["top10_std_error_ratio"] = _finite_or_none(calibration["top10_error_ratio"])
    return out
