"""FATS: Frequency-Adaptive Timestep Scheduling (see docs/fats.md), statistics and state.

Layer 1 (imports only ``DWT_IDWT``). This module holds the data FATS derives a schedule from:

* :func:`band_energy_stats`: per-band mean energy E_b of the normalised target subbands
  inside the brain (design step 1);
* :func:`shifts_from_energy`: energy-equalising log-SNR shifts ``delta_b = -kappa log(E_b / E_ref)``;
* :func:`ramped_shifts`: shifts ramped in from zero when fine-tuning a shared-schedule checkpoint;
* :class:`FatsState` (with :class:`LearnedTimesteps`): what FATS stores in a checkpoint, typed
  and versioned; its ``to_dict`` / ``from_dict`` are the only writer and reader of
  ``checkpoint["extra"]["fats"]``.

Elsewhere: the per-band schedule ``lambda_b(t) = lambda(t) + delta_b`` (design step 2) is
``schedules.per_band_schedule``, the FATS schedule of a config ``factory.fats_schedule``; the
searches over the *sampler* (learned timesteps, kappa / shift refinement) are in
:mod:`guided_diffusion.fats_search`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from DWT_IDWT import BAND_NAMES, LLL_SCALE

__all__ = [
    "FatsState", "LearnedTimesteps", "band_energy_stats", "ramped_shifts", "shifts_from_energy", "subband_mask",
    "warm_start_step",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- 1. energy statistics


def subband_mask(brain_mask: torch.Tensor) -> torch.Tensor:
    """Voxel brain mask -> subband-resolution mask by 2x2x2 max-pooling.

    A subband coefficient counts as brain when any of the 8 voxels it summarises is brain.
    Args:
        brain_mask: (D, H, W), (B, D, H, W) or (B, 1, D, H, W), any dtype (nonzero = brain).
    Returns:
        (B, 1, D/2, H/2, W/2) bool.
    """
    m = brain_mask
    if m.ndim == 3:
        m = m[None, None]
    elif m.ndim == 4:
        m = m[:, None]
    if m.ndim != 5 or m.shape[1] != 1:
        raise ValueError("subband_mask: expected (D, H, W), (B, D, H, W) or (B, 1, D, H, W), "
                         f"got {tuple(brain_mask.shape)}")
    return F.max_pool3d((m != 0).float(), kernel_size=2, stride=2) > 0


def band_energy_stats(target_subbands_iter: Iterable[torch.Tensor],
                      brain_masks_iter: Iterable[torch.Tensor] | None = None,
                      *, label: str = "target") -> dict:
    """Mean energy per band of normalised target subbands inside the brain (design step 1).

    Args:
        target_subbands_iter: tensors (8, d, h, w) or (B, 8, d, h, w): ``to_subbands`` output
            (LLL already divided by ``LLL_SCALE``). Pass residuals ``x0 - pred_x0`` instead
            to measure the residual energy R_b of the design's refinement (``label="residual"``).
        brain_masks_iter: matching voxel masks (D, H, W) / (B, D, H, W) / (B, 1, D, H, W) at
            twice the subband resolution, or None to use every coefficient.
        label: what was measured, stored in the result.
    Returns:
        JSON-serialisable dict: ``energy`` / ``mean`` / ``variance`` (band name -> float; energy
        is the mean of x^2 over brain coefficients of all volumes pooled), ``case_energy``
        (band name -> list, one mean energy per volume), ``count`` (brain coefficients per band),
        ``n_volumes``, ``band_names``, ``lll_scale``, ``label``.
    """
    n = len(BAND_NAMES)
    total = torch.zeros(n, dtype=torch.float64)
    total_sq = torch.zeros(n, dtype=torch.float64)
    count = 0
    case_energy: list[list[float]] = []
    masks = brain_masks_iter if brain_masks_iter is not None else _nones()
    pairs = zip(target_subbands_iter, masks, strict=brain_masks_iter is not None)
    for bands, mask in pairs:
        bands = bands if bands.ndim == 5 else bands[None]
        if bands.ndim != 5 or bands.shape[1] != n:
            raise ValueError(f"band_energy_stats: expected ({n}, d, h, w) or (B, {n}, d, h, w) subbands, "
                             f"got {tuple(bands.shape)}")
        bands = bands.detach().double().cpu()
        if mask is None:
            sub = torch.ones(bands.shape[0], 1, *bands.shape[2:], dtype=torch.bool)
        else:
            sub = subband_mask(mask.detach().cpu())
            if sub.shape[0] == 1 and bands.shape[0] > 1:
                sub = sub.expand(bands.shape[0], -1, -1, -1, -1)
            if sub.shape[0] != bands.shape[0] or sub.shape[2:] != bands.shape[2:]:
                raise ValueError(f"band_energy_stats: mask {tuple(mask.shape)} does not match subbands "
                                 f"{tuple(bands.shape)} (the mask is at voxel resolution, twice the subbands')")
        w = sub.double()
        for i in range(bands.shape[0]):
            k = int(w[i].sum())
            if k == 0:
                continue  # an empty mask carries no information about the bands
            x = bands[i] * w[i]
            total += x.sum(dim=(1, 2, 3))
            sq = (x * bands[i]).sum(dim=(1, 2, 3))
            total_sq += sq
            count += k
            case_energy.append((sq / k).tolist())
    if count == 0:
        raise ValueError("band_energy_stats: no brain coefficients seen (empty input or empty masks)")
    mean = total / count
    energy = total_sq / count
    variance = (energy - mean ** 2).clamp_min(0.0)
    return {
        "label": label,
        "band_names": list(BAND_NAMES),
        "energy": dict(zip(BAND_NAMES, energy.tolist())),
        "mean": dict(zip(BAND_NAMES, mean.tolist())),
        "variance": dict(zip(BAND_NAMES, variance.tolist())),
        "case_energy": {b: [c[j] for c in case_energy] for j, b in enumerate(BAND_NAMES)},
        "count": count,
        "n_volumes": len(case_energy),
        "lll_scale": LLL_SCALE,
    }


def _nones():
    while True:
        yield None


def shifts_from_energy(stats: dict, kappa: float = 1.0, reference: str | float = "mean",
                       max_shift: float = 4.0, groups: Sequence[Sequence[str]] | None = None,
                       key: str = "energy") -> tuple[float, ...]:
    """Energy-equalising log-SNR shifts ``delta_b = -kappa log(E_b / E_ref)``, clipped to +-max_shift.

    A band with less energy than the reference gets a positive shift (less noise at a given t),
    so that with kappa = 1 every band sees the same effective SNR ``E_b alpha_bar / (1 - alpha_bar)``;
    kappa = 0 gives cWDM's shared schedule.
    Args:
        stats: a :func:`band_energy_stats` result.
        reference: ``"mean"`` (arithmetic mean of the band energies), ``"geomean"`` (geometric
            mean: unclipped shifts sum to zero), a band name (that band keeps its curve), or a number.
        groups: optional band groups (e.g. ``fats_search.BAND_GROUPS``) sharing one energy, their mean.
        key: which per-band statistic to equalise (``"energy"`` or ``"variance"``).
    Returns:
        One shift per band, in ``BAND_NAMES`` order (ready for ``DiffusionConfig.band_shifts``).
    """
    energy = {b: float(stats[key][b]) for b in BAND_NAMES}
    if min(energy.values()) < 0 or max(energy.values()) <= 0:
        raise ValueError(f"shifts_from_energy: band {key} must be >= 0 and not all zero, got {energy}")
    if groups is not None:
        seen = [b for g in groups for b in g]
        if sorted(seen) != sorted(BAND_NAMES):
            raise ValueError(f"shifts_from_energy: groups must cover every band exactly once, got {groups}")
        for g in groups:
            e = sum(energy[b] for b in g) / len(g)
            energy.update({b: e for b in g})
    values = list(energy.values())
    if reference == "mean":
        ref = sum(values) / len(values)
    elif reference == "geomean":
        if min(values) <= 0:
            raise ValueError(f"shifts_from_energy: reference 'geomean' needs every band's {key} > 0, got {energy}")
        ref = math.exp(sum(math.log(v) for v in values) / len(values))
    elif isinstance(reference, str):
        if reference not in energy:
            raise ValueError(f"shifts_from_energy: reference must be 'mean', 'geomean', a band name "
                             f"{BAND_NAMES} or a number, got {reference!r}")
        ref = energy[reference]
    else:
        ref = float(reference)
        if ref <= 0:
            raise ValueError(f"shifts_from_energy: reference energy must be positive, got {ref}")
    if ref <= 0:
        raise ValueError(f"shifts_from_energy: the reference {key} must be positive, got {ref}")

    def shift(e: float) -> float:  # a band with zero energy (nothing left to generate): the largest shift
        return kappa * max_shift if e == 0 else -kappa * math.log(e / ref)

    return tuple(min(max(shift(energy[b]), -max_shift), max_shift) for b in BAND_NAMES)


def warm_start_step(log_snr: torch.Tensor, residual_energy: Sequence[float]) -> int:
    """FATS v2's per-band warm start: the step t* at which each band's noise best matches its residual.

    Starting from a regression estimate x0_hat whose band b is off by about R_b (mean square),
    band b should enter the reverse process where its noise variance relative to the signal,
    ``1 / SNR_b(t)``, equals R_b: ``lambda_b(t) = -log R_b``. With shifts from the residual energies
    (:func:`shifts_from_energy` of the residual statistics) the bands reach their levels at about
    one shared step; this returns the step minimising ``sum_b (lambda_b(t) + log R_b)^2`` over
    ``t < T - 1`` (bands with R_b = 0 are left out: any noise level suits them).
    Args:
        log_snr: (n_bands, T) per-band log-SNR of the schedule (``NoiseSchedule.log_snr``).
        residual_energy: (n_bands,) R_b, in the schedule's band order.
    """
    residual = torch.as_tensor(residual_energy, dtype=torch.float64).flatten()
    if log_snr.ndim != 2 or residual.numel() != log_snr.shape[0] or log_snr.shape[1] < 3:
        raise ValueError(f"warm_start_step: need (bands, T >= 3) log-SNR and one residual per band, got "
                         f"{tuple(log_snr.shape)} and {residual.numel()}")
    used = residual > 0
    if not bool(used.any()) or bool((residual < 0).any()):
        raise ValueError(f"warm_start_step: residual energies must be >= 0 and not all zero, got {residual.tolist()}")
    mismatch = ((log_snr[used, : -1].double() + residual[used].log()[:, None]) ** 2).sum(dim=0)
    return int(mismatch[1:].argmin()) + 1  # t* >= 1 (step 0 is the clean end's neighbour)


# --------------------------------------------------------------------------- 2. shift ramp


def ramped_shifts(shifts: Sequence[float], step: int, ramp_steps: int) -> tuple[float, ...]:
    """``shifts * min(1, step / ramp_steps)``: fine-tuning from a shared-schedule checkpoint
    starts at zero shift (the schedule it was trained on). ``ramp_steps <= 0``: no ramp."""
    factor = 1.0 if ramp_steps <= 0 else min(1.0, max(0, step) / ramp_steps)
    return tuple(float(s) * factor for s in shifts)


# --------------------------------------------------------------------------- 3. checkpoint state


FATS_STATE_VERSION = 3
"""Version 3 (FATS v2) adds ``residual_stats`` (the residual energies R_b the shifts came from) and
``train_timesteps`` (the planned steps a ``train_timesteps="sampled"`` run trains on). Version 2
(read: both None) has learned entries under ``timesteps``/``uniform_timesteps`` and ``default_nfe``
inside the state. Version 1 (read, never written) spelled them ``steps``/``uniform_steps`` and kept
the default budget as ``default_k`` beside the state."""

_STATE_KEYS = ("version", "energy_stats", "band_shifts", "kappa", "learned", "default_nfe", "extra",
               "residual_stats", "train_timesteps")


@dataclass(frozen=True)
class LearnedTimesteps:
    """Sampling timesteps learned for one NFE budget, with the held-out errors of the fit.

    Attributes:
        timesteps: NFE strictly decreasing schedule step indices >= 0.
        error: the fitted sampler's held-out error (None when not recorded).
        uniform_timesteps / uniform_error: the evenly spaced baseline of the same budget, if recorded.
    """

    timesteps: tuple[int, ...]
    error: float | None = None
    uniform_timesteps: tuple[int, ...] | None = None
    uniform_error: float | None = None

    def __post_init__(self):
        steps = self.timesteps
        if not steps or any(a <= b for a, b in zip(steps, steps[1:])) or steps[-1] < 0:
            raise ValueError(f"FATS state: learned timesteps must be strictly decreasing indices >= 0, "
                             f"got {list(steps)}")

    @property
    def nfe(self) -> int:
        return len(self.timesteps)

    def to_dict(self) -> dict:
        return {"timesteps": list(self.timesteps), "error": self.error,
                "uniform_timesteps": None if self.uniform_timesteps is None else list(self.uniform_timesteps),
                "uniform_error": self.uniform_error}

    @classmethod
    def from_dict(cls, entry) -> "LearnedTimesteps":
        """From a stored entry (version 2 or 1), a ``fats_search.learn_timesteps`` result, or a bare index list."""
        if not isinstance(entry, dict):
            entry = {"timesteps": entry}
        steps = entry.get("timesteps", entry.get("steps"))
        uniform = entry.get("uniform_timesteps", entry.get("uniform_steps"))
        error, uniform_error = entry.get("error"), entry.get("uniform_error")
        return cls(_int_tuple(steps), None if error is None else float(error),
                   None if uniform is None else _int_tuple(uniform),
                   None if uniform_error is None else float(uniform_error))


@dataclass(frozen=True)
class FatsState:
    """Everything FATS stores next to the weights: the one reader and writer of
    ``checkpoint["extra"]["fats"]`` (:meth:`from_extra` / :meth:`into_extra`).

    Attributes:
        energy_stats: a :func:`band_energy_stats` result (plus what measured it), or None.
        band_shifts: the per-band log-SNR shifts the model was trained with, or None.
        kappa: the kappa the shifts came from, or None.
        learned: NFE -> :class:`LearnedTimesteps` (each entry's NFE equals its key).
        default_nfe: the budget sampling uses when none is requested (its learned steps), or None.
        extra: any other JSON-serialisable notes.
        residual_stats: FATS v2: a :func:`band_energy_stats` result of residuals x0 - x0_hat of a
            regression estimate (``label="residual"``), which the shifts came from; or None.
        train_timesteps: FATS v2: the step indices a ``train_timesteps="sampled"`` run draws t from, or None.
    """

    energy_stats: dict | None = None
    band_shifts: tuple[float, ...] | None = None
    kappa: float | None = None
    learned: dict[int, LearnedTimesteps] = field(default_factory=dict)
    default_nfe: int | None = None
    extra: dict = field(default_factory=dict)
    residual_stats: dict | None = None
    train_timesteps: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.train_timesteps is not None:
            LearnedTimesteps(tuple(self.train_timesteps))  # the same validity rule: decreasing indices >= 0
        for nfe, entry in self.learned.items():
            if entry.nfe != nfe:
                raise ValueError(f"FATS state: learned timesteps for NFE={nfe} must be {nfe} indices, "
                                 f"got {list(entry.timesteps)}")

    def learned_timesteps(self, nfe: int) -> list[int] | None:
        """The learned step indices for a budget of ``nfe`` evaluations, or None."""
        entry = self.learned.get(int(nfe))
        return None if entry is None else list(entry.timesteps)

    def with_learned(self, results: dict, default_nfe: int) -> "FatsState":
        """This state plus learned timesteps (NFE -> ``learn_timesteps`` result or entry);
        ``default_nfe`` becomes the default when it has learned steps, else the smallest new budget."""
        learned = {**self.learned, **{int(k): LearnedTimesteps.from_dict(v) for k, v in results.items()}}
        default = int(default_nfe) if int(default_nfe) in learned else int(min(int(k) for k in results))
        return replace(self, learned=learned, default_nfe=default)

    def to_dict(self) -> dict:
        """Plain JSON types (weights_only-loadable), version :data:`FATS_STATE_VERSION`."""
        return {
            "version": FATS_STATE_VERSION,
            "energy_stats": self.energy_stats,
            "band_shifts": None if self.band_shifts is None else [float(s) for s in self.band_shifts],
            "kappa": None if self.kappa is None else float(self.kappa),
            "learned": {str(k): v.to_dict() for k, v in sorted(self.learned.items())},
            "default_nfe": self.default_nfe,
            "extra": dict(self.extra),
            "residual_stats": self.residual_stats,
            "train_timesteps": None if self.train_timesteps is None else list(self.train_timesteps),
        }

    @classmethod
    def from_dict(cls, state: dict) -> "FatsState":
        """Inverse of :meth:`to_dict` (also of its JSON-decoded form); also reads version 1
        (``timesteps`` with ``steps`` entries, and ``default_k`` stored beside them) and version 2
        (no residual statistics, no training steps)."""
        version = state.get("version")
        if version == 1:
            logger.warning("FATS state version 1 (written by an older Fast-cWDM): read as version %d",
                           FATS_STATE_VERSION)
            legacy = {key: value for key, value in state.items() if key not in ("timesteps", "default_k")}
            state = {**legacy, "version": FATS_STATE_VERSION, "learned": state.get("timesteps") or {},
                     "default_nfe": state.get("default_k")}
        elif version not in (2, FATS_STATE_VERSION):
            raise ValueError(f"FATS state: unsupported version {version!r} (expected {FATS_STATE_VERSION}, 2 or 1)")
        unknown = sorted(set(state) - set(_STATE_KEYS))
        if unknown:
            raise ValueError(f"FATS state: unknown keys {unknown}")
        shifts, kappa, default = state.get("band_shifts"), state.get("kappa"), state.get("default_nfe")
        return cls(
            energy_stats=state.get("energy_stats"),
            band_shifts=None if shifts is None else tuple(float(s) for s in shifts),
            kappa=None if kappa is None else float(kappa),
            learned={int(k): LearnedTimesteps.from_dict(v) for k, v in (state.get("learned") or {}).items()},
            default_nfe=None if default is None else int(default),
            extra=dict(state.get("extra") or {}),
            residual_stats=state.get("residual_stats"),
            train_timesteps=None if state.get("train_timesteps") is None else _int_tuple(state["train_timesteps"]),
        )

    @classmethod
    def from_extra(cls, extra: dict | None) -> "FatsState | None":
        """The state stored in a checkpoint's ``extra`` dict, or None when it holds none."""
        stored = (extra or {}).get("fats")
        return None if not stored else cls.from_dict(stored)

    def into_extra(self, extra: dict | None) -> dict:
        """A copy of a checkpoint's ``extra`` dict holding this state."""
        return {**(extra or {}), "fats": self.to_dict()}


def _int_tuple(steps) -> tuple[int, ...]:
    if steps is None:
        raise ValueError("FATS state: a learned entry has no timesteps")
    return tuple(int(s) for s in (steps.tolist() if isinstance(steps, torch.Tensor) else steps))
