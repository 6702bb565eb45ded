"""Image-quality metrics for synthesized 3D MRI volumes (BraSyn protocol first).

All metrics operate on single volumes of shape ``(D, H, W)`` (numpy arrays or
torch tensors, any device); :func:`ssim3d` additionally accepts batches
``(N, C, D, H, W)``.

Protocol (BraSyn 2023/2024 challenge evaluation)
------------------------------------------------
1. Prediction and ground truth are *each* normalised with their own
   0.5 / 99.5 intensity percentiles (:func:`normalize_percentile`; lower bound
   clamped at 0, then scaled to ``[0, 1]``).
2. SSIM is the 3D SSIM of ``torchmetrics`` (Gaussian window, sigma 1.5,
   11 taps per axis, K1=0.01, K2=0.03) evaluated over the *whole volume*
   after zeroing everything outside the region of interest:

   * tumour: ``ssim(pred * mask, gt * mask)`` with ``mask = seg > 0``
   * rest:   ``ssim(pred * (1 - mask), gt * (1 - mask))``

   This is how the BraSyn reference script (``hongweilibran/BraSyn``,
   ``ssim.py``) builds its inputs. That script additionally constructs the
   metric with ``return_full_image=True`` and tries to index the returned
   tuple with the integer mask, which does not run as written; the
   participant copies of it call ``ssim(preds=..., target=...)`` and use the
   scalar, i.e. the mean of the SSIM map over the whole (masked) volume,
   which is what is implemented here. The reference script uses
   torchmetrics' default ``data_range=None`` (range inferred as
   ``max(pred.max()-pred.min(), gt.max()-gt.min())``); we default to a fixed
   ``data_range=1.0`` (the inputs are normalised to ``[0, 1]``), and
   ``data_range=None`` reproduces the inferred-range behaviour exactly.
3. MSE / PSNR are computed over the voxels *inside* a mask only (mean over
   the masked voxels, PSNR with data range 1).

Boundary handling of the SSIM: torchmetrics pads the volume by
``p = (kernel_size - 1) // 2`` voxels per side with *reflect* padding
(``d c b | a b c d``, scipy's ``mode='mirror'``) and filters with a "valid"
convolution, giving an SSIM map of the input's shape. What is averaged
depends on the torchmetrics version:

* torchmetrics >= 1.4.2 (Lightning-AI/torchmetrics PR #2721; checked on
  1.4.3 and 1.9.0) averages the *whole* map (no crop);
* torchmetrics <= 1.4.1 (checked on 1.2.1 and 1.4.1), i.e. what the
  BraSyn 2023/2024 leaderboards ran on, averaged the map cropped by ``p``
  voxels per side.

To be independent of the installed version, :func:`ssim3d` always asks
torchmetrics for the full map and reduces it itself: ``crop_border=False``
(default) averages the whole map (current torchmetrics),
``crop_border=True`` averages ``map[p:-p, p:-p, p:-p]`` (challenge-era
torchmetrics). On a 240x240x155 BraTS volume the crop drops ~14% of the
voxels, mostly zero background with SSIM 1, so the cropped value is
noticeably *lower*; only compare numbers computed with the same setting.
scikit-image (``gaussian_weights=True, sigma=1.5,
use_sample_covariance=False``) filters with ``mode='reflect'``
(``c b a | a b c``) and crops ``p`` voxels, so its value equals
``crop_border=True`` exactly (the interior never touches the padding).

NaN conventions
---------------
* A metric restricted to an *empty* mask (e.g. a case without tumour, or
  ``seg=None``) is ``NaN``, meaning "undefined / not applicable", never an
  exception. :func:`summarize` ignores NaNs.
* ``psnr`` is ``+inf`` when the MSE is exactly 0 (identical inputs).
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

ArrayLike = Union[np.ndarray, torch.Tensor]

__all__ = [
    "normalize_percentile",
    "ssim3d",
    "masked_mse",
    "psnr_from_mse",
    "masked_psnr",
    "ssim_tumor_rest",
    "evaluate_case",
    "summarize",
    "METRIC_KEYS",
]

#: Keys returned by :func:`evaluate_case`, in order.
METRIC_KEYS: Tuple[str, ...] = (
    "psnr",
    "ssim",
    "mse",
    "psnr_tumor",
    "ssim_tumor",
    "mse_tumor",
    "ssim_rest",
)

DEFAULT_KERNEL_SIZE = 11
DEFAULT_SIGMA = 1.5


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _to_numpy(x: ArrayLike, dtype=np.float64) -> np.ndarray:
    """Convert numpy / torch input to a numpy array of ``dtype`` (on CPU)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _to_bool_mask(mask: Optional[ArrayLike], shape: Tuple[int, ...], name: str) -> np.ndarray:
    """Return ``mask > 0`` as a numpy bool array of ``shape`` (all True if None)."""
    if mask is None:
        return np.ones(shape, dtype=bool)
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"{name} has shape {mask.shape}, expected {shape}")
    return mask > 0


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt shapes differ: {pred.shape} vs {gt.shape}")
    if pred.ndim != 3:
        raise ValueError(f"expected a single volume of shape (D, H, W), got shape {pred.shape}")


def _resolve_sigma(kernel_size: int, sigma: Optional[float]) -> float:
    """Choose / validate the Gaussian sigma for a given window size.

    torchmetrics ignores ``kernel_size`` for the Gaussian window itself and
    uses ``2 * int(3.5 * sigma + 0.5) + 1`` taps (11 for sigma 1.5), while
    the depth padding is derived from ``kernel_size``. The two must agree.
    """
    if not isinstance(kernel_size, (int, np.integer)) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size!r}")
    if sigma is None:
        sigma = DEFAULT_SIGMA if kernel_size == DEFAULT_KERNEL_SIZE else DEFAULT_SIGMA * kernel_size / DEFAULT_KERNEL_SIZE
    taps = 2 * int(3.5 * sigma + 0.5) + 1
    if taps != kernel_size:
        raise ValueError(
            f"sigma={sigma} gives a {taps}-tap Gaussian window in torchmetrics "
            f"(2*int(3.5*sigma+0.5)+1) but kernel_size={kernel_size}; pass sigma=None to "
            f"derive a matching sigma (1.5 * kernel_size / 11)"
        )
    return float(sigma)


# --------------------------------------------------------------------------- #
# normalisation
# --------------------------------------------------------------------------- #
def normalize_percentile(volume: ArrayLike, lower: float = 0.5, upper: float = 99.5) -> ArrayLike:
    """Clip a volume to its own percentiles and rescale to ``[0, 1]``.

    ``v_min, v_max = percentile(volume, [lower, upper])`` (numpy linear
    interpolation over *all* voxels, background included, as in the BraSyn
    evaluation); ``v_min`` is raised to 0 if negative; the output is
    ``(clip(volume, v_min, v_max) - v_min) / (v_max - v_min)``.
    If ``v_max <= v_min`` (e.g. a constant volume) the result is all zeros.

    Args:
        volume: array of any shape (typically ``(D, H, W)``), numpy or torch.
        lower: lower percentile in ``[0, 100]``.
        upper: upper percentile in ``[0, 100]``, ``upper >= lower``.

    Returns:
        Same shape as ``volume``: a float64 numpy array for numpy input, or a
        tensor on the input's device for torch input (input dtype if floating,
        else float32).
    """
    if not (0.0 <= lower <= upper <= 100.0):
        raise ValueError(f"need 0 <= lower <= upper <= 100, got lower={lower}, upper={upper}")
    x = _to_numpy(volume)
    if x.size == 0:
        raise ValueError("cannot normalise an empty volume")
    v_min, v_max = np.percentile(x, [lower, upper])
    v_min = max(float(v_min), 0.0)
    v_max = float(v_max)
    if v_max - v_min > 0:
        out = (np.clip(x, v_min, v_max) - v_min) / (v_max - v_min)
    else:
        out = np.zeros_like(x)
    if isinstance(volume, torch.Tensor):
        dtype = volume.dtype if volume.is_floating_point() else torch.float32
        return torch.from_numpy(out).to(device=volume.device, dtype=dtype)
    return out


# --------------------------------------------------------------------------- #
# SSIM
# --------------------------------------------------------------------------- #
def ssim3d(
    pred: ArrayLike,
    gt: ArrayLike,
    data_range: Optional[float] = 1.0,
    kernel_size: int = DEFAULT_KERNEL_SIZE,
    sigma: Optional[float] = None,
    return_full_image: bool = False,
    crop_border: bool = False,
):
    """3D SSIM with a Gaussian window, computed by torchmetrics.

    Args:
        pred: prediction, ``(D, H, W)`` or ``(N, C, D, H, W)``; numpy or torch.
        gt: ground truth, same shape as ``pred``.
        data_range: dynamic range ``L`` used in ``C1=(0.01 L)^2, C2=(0.03 L)^2``.
            ``None`` lets torchmetrics infer it as
            ``max(pred.max()-pred.min(), gt.max()-gt.min())`` (the BraSyn
            reference script's setting).
        kernel_size: Gaussian window size per axis (odd). Every spatial
            dimension must be ``>= kernel_size``; use a smaller kernel (e.g. 7)
            for small test volumes.
        sigma: Gaussian sigma; ``None`` -> 1.5 for ``kernel_size=11``, else
            ``1.5 * kernel_size / 11`` (so torchmetrics' tap count
            ``2*int(3.5*sigma+0.5)+1`` equals ``kernel_size``).
        return_full_image: also return the (uncropped) SSIM map.
        crop_border: average the map without its ``(kernel_size-1)//2``-voxel
            border (torchmetrics <= 1.4.1 / BraSyn-leaderboard behaviour, equal
            to scikit-image); default ``False`` averages the whole map
            (torchmetrics >= 1.4.2). See the module docstring.

    Returns:
        For ``(D, H, W)`` input: the whole-volume SSIM as a python ``float``
        (and the ``(D, H, W)`` SSIM map tensor if ``return_full_image``).
        For ``(N, C, D, H, W)`` input: a tensor ``(N,)`` of per-volume SSIM
        (mean over channels and voxels) and optionally the
        ``(N, C, D, H, W)`` map. numpy inputs are computed in their own
        float precision (float64 stays float64); torch inputs keep their
        dtype/device (non-float is cast to float32).

    Raises:
        ValueError: shape mismatch, wrong rank, or a spatial dim < kernel_size.
    """
    sigma = _resolve_sigma(kernel_size, sigma)

    def _as_tensor(x: ArrayLike) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            t = x.detach()
        else:
            t = torch.from_numpy(np.ascontiguousarray(x))
        if not t.is_floating_point():
            t = t.float()
        return t

    p, g = _as_tensor(pred), _as_tensor(gt)
    if p.shape != g.shape:
        raise ValueError(f"pred and gt shapes differ: {tuple(p.shape)} vs {tuple(g.shape)}")
    single = p.ndim == 3
    if single:
        p, g = p[None, None], g[None, None]
    elif p.ndim != 5:
        raise ValueError(f"expected (D, H, W) or (N, C, D, H, W) input, got shape {tuple(p.shape)}")
    if p.dtype != g.dtype:
        dtype = torch.promote_types(p.dtype, g.dtype)
        p, g = p.to(dtype), g.to(dtype)
    g = g.to(p.device)
    spatial = tuple(p.shape[-3:])
    if min(spatial) < kernel_size:
        raise ValueError(
            f"3D SSIM with a {kernel_size}-voxel window needs every spatial dimension >= "
            f"{kernel_size}, got {spatial}; pass a smaller odd kernel_size= (e.g. "
            f"{max(1, min(spatial) - (1 - min(spatial) % 2))}) for small volumes"
        )

    # Always take the full map and reduce here (the scalar torchmetrics returns
    # changed in 1.4.2, the full map did not).
    _, full = structural_similarity_index_measure(
        p,
        g,
        gaussian_kernel=True,
        sigma=sigma,
        kernel_size=kernel_size,
        reduction="none",
        data_range=data_range,
        k1=0.01,
        k2=0.03,
        return_full_image=True,
    )
    pad = (kernel_size - 1) // 2
    region = full[..., pad:-pad, pad:-pad, pad:-pad] if (crop_border and pad > 0) else full
    value = region.reshape(region.shape[0], -1).mean(-1)
    if single:
        return (float(value[0]), full[0, 0]) if return_full_image else float(value[0])
    return (value, full) if return_full_image else value


# --------------------------------------------------------------------------- #
# MSE / PSNR
# --------------------------------------------------------------------------- #
def masked_mse(pred: ArrayLike, gt: ArrayLike, mask: Optional[ArrayLike] = None) -> float:
    """Mean squared error over the voxels where ``mask > 0``.

    Args:
        pred, gt: ``(D, H, W)`` volumes (numpy or torch), computed in float64.
        mask: ``(D, H, W)``, voxels with ``mask > 0`` count; ``None`` = all.

    Returns:
        ``mean((pred - gt)[mask]**2)``; ``NaN`` if the mask is empty
        (metric undefined for this case).
    """
    p, g = _to_numpy(pred), _to_numpy(gt)
    _check_pair(p, g)
    m = _to_bool_mask(mask, p.shape, "mask")
    n = int(m.sum())
    if n == 0:
        return float("nan")
    d = p[m] - g[m]
    return float(np.dot(d, d) / n)


def psnr_from_mse(mse: float, data_range: float = 1.0) -> float:
    """PSNR in dB: ``10 * log10(data_range**2 / mse)``.

    Returns ``+inf`` for ``mse == 0`` and ``NaN`` for ``mse`` NaN.
    """
    if math.isnan(mse):
        return float("nan")
    if mse < 0:
        raise ValueError(f"mse must be >= 0, got {mse}")
    if mse == 0:
        return float("inf")
    return float(10.0 * math.log10(data_range**2 / mse))


def masked_psnr(
    pred: ArrayLike, gt: ArrayLike, mask: Optional[ArrayLike] = None, data_range: float = 1.0
) -> float:
    """PSNR (dB, data range 1 by default) from :func:`masked_mse` over ``mask > 0``.

    Shapes as in :func:`masked_mse`. ``+inf`` if identical inside the mask,
    ``NaN`` if the mask is empty.
    """
    return psnr_from_mse(masked_mse(pred, gt, mask), data_range)


# --------------------------------------------------------------------------- #
# BraSyn tumour / rest SSIM
# --------------------------------------------------------------------------- #
def ssim_tumor_rest(
    pred: ArrayLike,
    gt: ArrayLike,
    seg: ArrayLike,
    data_range: Optional[float] = 1.0,
    kernel_size: int = DEFAULT_KERNEL_SIZE,
    crop_border: bool = False,
) -> Tuple[float, float]:
    """BraSyn tumour / non-tumour SSIM on already-normalised volumes.

    ``mask = seg > 0``; ``ssim_tumor = ssim3d(pred*mask, gt*mask)`` and
    ``ssim_rest = ssim3d(pred*(1-mask), gt*(1-mask))``, each the mean SSIM
    over the whole volume.

    Args:
        pred, gt: ``(D, H, W)`` volumes, normally in ``[0, 1]``.
        seg: ``(D, H, W)`` segmentation (any labels; > 0 is tumour).
        data_range, kernel_size, crop_border: see :func:`ssim3d`.

    Returns:
        ``(ssim_tumor, ssim_rest)``. ``ssim_tumor`` is NaN if the tumour mask
        is empty; ``ssim_rest`` is NaN if the tumour fills the whole volume.
    """
    p, g = _to_numpy(pred, np.float32), _to_numpy(gt, np.float32)
    _check_pair(p, g)
    m = _to_bool_mask(seg, p.shape, "seg")
    mf = m.astype(np.float32)
    kw = dict(data_range=data_range, kernel_size=kernel_size, crop_border=crop_border)
    tumor = ssim3d(p * mf, g * mf, **kw) if m.any() else float("nan")
    rest = ssim3d(p * (1 - mf), g * (1 - mf), **kw) if not m.all() else float("nan")
    return tumor, rest


# --------------------------------------------------------------------------- #
# per case / summary
# --------------------------------------------------------------------------- #
def evaluate_case(
    pred: ArrayLike,
    gt: ArrayLike,
    brain_mask: Optional[ArrayLike],
    seg: Optional[ArrayLike] = None,
    *,
    normalize: bool = True,
    data_range: Optional[float] = 1.0,
    kernel_size: int = DEFAULT_KERNEL_SIZE,
    crop_border: bool = False,
) -> Dict[str, float]:
    """All metrics for one synthesized volume.

    Args:
        pred: synthesized volume ``(D, H, W)``, numpy or torch, any intensity
            scale.
        gt: ground-truth volume ``(D, H, W)``.
        brain_mask: ``(D, H, W)``, brain where ``> 0`` (``None`` = whole volume).
        seg: optional ``(D, H, W)`` tumour segmentation (tumour where ``> 0``).
        normalize: apply :func:`normalize_percentile` to ``pred`` and ``gt``
            independently first (the protocol). Set ``False`` only for inputs
            that are already in ``[0, 1]``.
        data_range: SSIM data range (``None`` = torchmetrics' inferred range,
            as in the BraSyn reference script). PSNR always uses range 1.
        kernel_size: SSIM window (see :func:`ssim3d`); default 11 needs every
            dimension >= 11.
        crop_border: SSIM averaging region (see :func:`ssim3d`); ``True``
            reproduces the BraSyn-leaderboard (torchmetrics <= 1.4.1) numbers.

    Returns:
        dict with float values (keys :data:`METRIC_KEYS`):

        * ``psnr``, ``mse``: inside the brain mask;
          ``ssim``: ``ssim(pred*brain, gt*brain)`` over the whole volume;
        * ``psnr_tumor``, ``mse_tumor``: inside ``seg > 0``;
          ``ssim_tumor``: ``ssim(pred*tumor, gt*tumor)`` (whole volume);
        * ``ssim_rest``: ``ssim(pred*(1-tumor), gt*(1-tumor))`` (whole volume).

        Tumour keys and ``ssim_rest`` are NaN when ``seg`` is None; tumour
        keys are NaN when ``seg`` has no tumour voxel (``ssim_rest`` is then the
        whole-volume SSIM). Brain keys are NaN for an empty brain mask.
        ``psnr*`` is ``+inf`` when the MSE is 0.

    Note:
        SSIM is computed in float32 (as the challenge does with its volumes),
        MSE/PSNR in float64. A 240x240x155 volume takes ~10 s per SSIM call
        on 2 CPU cores (3 calls per case with ``seg``). If ``pred`` is a CUDA
        tensor the SSIM runs on that device; numpy inputs run on the CPU.
    """
    p = _to_numpy(pred)
    g = _to_numpy(gt)
    _check_pair(p, g)
    brain = _to_bool_mask(brain_mask, p.shape, "brain_mask")
    if normalize:
        p = normalize_percentile(p)
        g = normalize_percentile(g)

    device = pred.device if isinstance(pred, torch.Tensor) else torch.device("cpu")
    p32 = torch.from_numpy(p.astype(np.float32)).to(device)
    g32 = torch.from_numpy(g.astype(np.float32)).to(device)

    def _ssim_masked(m: np.ndarray) -> float:
        mt = torch.from_numpy(m.astype(np.float32)).to(device)
        return ssim3d(p32 * mt, g32 * mt, data_range, kernel_size, crop_border=crop_border)

    nan = float("nan")
    out: Dict[str, float] = {}
    mse_b = masked_mse(p, g, brain)
    out["psnr"] = psnr_from_mse(mse_b)
    out["ssim"] = _ssim_masked(brain) if brain.any() else nan
    out["mse"] = mse_b

    if seg is None:
        out.update(psnr_tumor=nan, ssim_tumor=nan, mse_tumor=nan, ssim_rest=nan)
        return out

    tumor = _to_bool_mask(seg, p.shape, "seg")
    mse_t = masked_mse(p, g, tumor)
    out["psnr_tumor"] = psnr_from_mse(mse_t)
    out["ssim_tumor"] = _ssim_masked(tumor) if tumor.any() else nan
    out["mse_tumor"] = mse_t
    out["ssim_rest"] = _ssim_masked(~tumor) if not tumor.all() else nan
    return out


def summarize(
    records: Iterable[Mapping[str, object]], keys: Optional[Sequence[str]] = None
) -> Dict[str, Dict[str, float]]:
    """NaN-aware statistics over per-case metric dicts.

    Args:
        records: iterable of dicts (e.g. from :func:`evaluate_case`). Values
            that are not real numbers (ids, strings, None) are ignored; a key
            missing from a record counts as NaN for that record.
        keys: keys to summarise; default = every key with at least one
            numeric value, in first-seen order.

    Returns:
        ``{key: {"mean", "std", "median", "n", "n_nan"}}`` where mean / std
        (population, ddof=0) / median ignore NaNs, ``n`` is the number of
        non-NaN values and ``n_nan`` the number of NaN/missing ones. All-NaN
        keys give NaN statistics (no warning). ``+inf`` values (e.g. PSNR of
        an exact reconstruction) are kept and propagate to mean/std.
    """
    records = list(records)

    def _is_num(v) -> bool:
        if isinstance(v, torch.Tensor):
            return v.numel() == 1
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)

    if keys is None:
        seen: Dict[str, None] = {}
        for r in records:
            for k, v in r.items():
                if _is_num(v):
                    seen.setdefault(k, None)
        keys = list(seen)

    result: Dict[str, Dict[str, float]] = {}
    for k in keys:
        vals = []
        for r in records:
            v = r.get(k, float("nan"))
            vals.append(float(v) if _is_num(v) else float("nan"))
        a = np.asarray(vals, dtype=np.float64)
        valid = a[~np.isnan(a)]
        if valid.size == 0:
            stats = dict(mean=float("nan"), std=float("nan"), median=float("nan"))
        else:
            with warnings.catch_warnings(), np.errstate(invalid="ignore"):
                warnings.simplefilter("ignore", RuntimeWarning)
                stats = dict(
                    mean=float(np.mean(valid)),
                    std=float(np.std(valid)),
                    median=float(np.median(valid)),
                )
        stats["n"] = int(valid.size)
        stats["n_nan"] = int(a.size - valid.size)
        result[k] = stats
    return result


MISSING_VALUE_NOTE = (
    "null = no value: a metric undefined for the case (tumour metrics without a tumour in the segmentation or "
    "without a segmentation, ssim_rest when the tumour fills the volume, brain metrics with an empty brain "
    "mask) or infinite (PSNR of a synthesis identical to the truth); each summary's n is the number of cases "
    "its mean, std and median cover, n_nan the number of cases without a value")


def strict_json(obj):
    """``obj`` with every NaN / Inf float (numpy scalars and 1-element tensors included) replaced by
    None, recursively through dicts, lists and tuples: what ``json.dumps(allow_nan=False)`` accepts
    (bare ``NaN`` / ``Infinity`` are not JSON). See :data:`MISSING_VALUE_NOTE` for what null means."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        obj = obj.item()
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
