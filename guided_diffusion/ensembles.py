"""Ensembles of syntheses: M samples of one case, their mean and per-voxel standard deviation.

``--num_samples M`` (``sample``, ``sample_auto``, ``run.sh``; docs/uncertainty.md). Sample m of a
case starts from its own noise, ``seeding.sample_generator(seed, case id, m)``, so an ensemble is
a pure function of (seed, case id, M). The M samples of a case go through ONE sampler call
(:func:`~guided_diffusion.synthesis.synthesize` with ``sample_indices``): batched kernels round
differently for different batch sizes, so an ensemble is reproducible for a given M, but sample 0
of M = 4 need not equal the single synthesis (M = 1) bit for bit. M = 1 never comes here: the
commands keep their single-sample path, unchanged.

Files beside the synthesis ``<case>-<mod>.nii.gz`` (which holds the ensemble mean):
``<case>-<mod>_std.nii.gz`` (the std map) and, if asked, ``<case>-<mod>_sample<m>.nii.gz``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .bratsloader import Geometry, expected_path, save_volume, to_original_grid
from .checkpoints import LoadedModel
from .conditioning import zero_outside_head
from .config import SampleConfig
from .synthesis import synthesize


@dataclass(frozen=True)
class Ensemble:
    """One case's ensemble on the network grid (float32, CPU): ``samples`` (M, X, Y, Z), their
    per-voxel ``mean`` and ``std`` (X, Y, Z) (:func:`ensemble_mean_std`)."""

    samples: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def synthesize_ensemble(loaded: LoadedModel, volumes: torch.Tensor, target: str, cfg: SampleConfig, case_id: str,
                        num_samples: int, timesteps: Sequence[int] | None = None,
                        callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """``num_samples`` syntheses of one case, sampled together in one sampler call.

    Args:
        volumes: (1, 4, X, Y, Z) the case's network-grid volumes (as for ``synthesize``).
        num_samples: M >= 1; sample m's noise is ``seeding.sample_generator(cfg.seed, case_id, m)``.
        timesteps, callback: as for ``synthesize``.
    Returns:
        (M, X, Y, Z) float32 samples in [0, 1] on the CPU.

    Memory: the sampler works on a batch of M (its activations grow with M, like any batch); the
    result holds one volume per sample.
    """
    if num_samples < 1:
        raise ValueError(f"synthesize_ensemble: num_samples must be at least 1, got {num_samples}")
    if volumes.shape[0] != 1:
        raise ValueError(f"synthesize_ensemble: one case at a time, got a batch of {volumes.shape[0]}")
    batch = volumes.expand(num_samples, *volumes.shape[1:])
    return synthesize(loaded, batch, target, cfg, [case_id] * num_samples, timesteps, callback,
                      sample_indices=list(range(num_samples)))


def ensemble_mean_std(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-voxel mean and standard deviation (unbiased, M - 1 in the denominator: ``torch.std``'s
    default) of (M, ...) samples, M >= 2: two (...) tensors of the samples' dtype (no wider copy of
    the M samples is made)."""
    if samples.shape[0] < 2:
        raise ValueError(f"ensemble_mean_std: need at least 2 samples for a std, got {samples.shape[0]}")
    return samples.mean(dim=0), samples.std(dim=0)


def case_ensemble(loaded: LoadedModel, volumes: torch.Tensor, target: str, cfg: SampleConfig, case_id: str,
                  num_samples: int, timesteps: Sequence[int] | None = None, *, keep_background: bool = False,
                  callback: Callable[[dict], None] | None = None) -> Ensemble:
    """What ``sample`` and ``sample_auto`` write for one case with ``--num_samples`` M >= 2:
    :func:`synthesize_ensemble`, each sample zeroed outside the head unless ``keep_background``
    (``conditioning.zero_outside_head``, as a single synthesis is), then mean and std.

    Args:
        volumes: (1, 4, X, Y, Z) the case's network-grid volumes.
    """
    samples = synthesize_ensemble(loaded, volumes, target, cfg, case_id, num_samples, timesteps, callback)
    if not keep_background:
        samples = zero_outside_head(samples, volumes.expand(num_samples, *volumes.shape[1:]), target)
    return Ensemble(samples, *ensemble_mean_std(samples))


def std_path(out_path: Path, target: str) -> Path:
    """``<case>/<case>-<target>_std.nii.gz`` beside the synthesis ``out_path``."""
    return expected_path(out_path.parent, f"{target}_std")


def sample_path(out_path: Path, target: str, index: int) -> Path:
    """``<case>/<case>-<target>_sample<index>.nii.gz`` beside the synthesis ``out_path``."""
    return expected_path(out_path.parent, f"{target}_sample{index}")


def ensemble_description(description: str, what: str) -> str:
    """``what`` (e.g. ``"STD MAP of 4"``) in front of a synthesis header description, so the part a
    full 80-byte header cuts is the end of the checkpoint hash, never what the file is."""
    return f"{what} {description}"


def save_ensemble(out_path: Path, target: str, ensemble: Ensemble, geometry: Geometry, reference, description: str,
                  *, overwrite: bool = False, save_samples: bool = False) -> list[Path]:
    """Write an ensemble on the case's original grid (``to_original_grid``) with the reference's
    affine and header (``bratsloader.save_volume``, atomic): the samples (if ``save_samples``), the
    std map, and the mean at ``out_path`` LAST, so an existing synthesis means its companions are
    complete.

    Args:
        out_path: the synthesis ``<case>/<case>-<target>.nii.gz``.
        description: the synthesis header description (``bratsloader.synthesis_description``).
    Returns:
        the paths written, the synthesis last.
    """
    m = ensemble.samples.shape[0]
    files = [(sample_path(out_path, target, i), ensemble.samples[i], f"SAMPLE {i} of {m}")
             for i in range(m) if save_samples]
    files += [(std_path(out_path, target), ensemble.std, f"STD MAP of {m}"), (out_path, ensemble.mean, f"MEAN of {m}")]
    return [save_volume(path, to_original_grid(volume.numpy(), geometry), reference, overwrite=overwrite,
                        description=ensemble_description(description, what)) for path, volume, what in files]
