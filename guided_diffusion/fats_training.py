"""FATS in the pipeline: schedules from measured statistics, and learned steps stored in checkpoints.

* :func:`measure_energy` / :func:`prepare_fats_schedule`: before training, measure the target
  subbands' energy per band on (a seeded sample of) the training set and derive the shifts.
* :func:`fit_sampling_steps`: after training (or for any checkpoint, cWDM's included), learn the
  K-step DDIM timesteps on held-out cases; :func:`with_learned_steps` stores them in a checkpoint
  dict so that ``sample.py`` / ``sample_auto.py`` use them by default.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Sequence

import torch
from torch.utils.data import Dataset

from DWT_IDWT import clip_in_image_space, to_subbands

from .conditioning import split_case
from .config import DiffusionConfig
from .diffusion import make_denoiser
from .factory import build_schedule
from .fats import band_energy_stats, fats_state_dict, shifts_from_energy, subband_mask
from .fats_search import learn_timesteps
from .schedules import NoiseSchedule
from .seeding import case_subset

logger = logging.getLogger(__name__)

DEFAULT_KAPPA = 1.0
DEFAULT_STAT_CASES = 32
DEFAULT_K = 4


def measure_energy(dataset: Dataset, target: str, max_cases: int = DEFAULT_STAT_CASES, seed: int = 0) -> dict:
    """Per-band energy statistics of the normalised target subbands inside the brain.

    ``dataset`` items carry ``volumes`` (4, X, Y, Z) and ``brain_mask`` (X, Y, Z).
    """
    idx = case_subset(len(dataset), max_cases, seed)

    def bands():
        for i in idx:
            item = dataset[i]
            target_volume, _ = split_case(item["volumes"][None], target)
            yield to_subbands(target_volume)

    def masks():
        for i in idx:
            yield dataset[i]["brain_mask"][None]

    stats = band_energy_stats(bands(), masks())
    stats.update({"target_modality": target, "case_indices": idx, "seed": seed})
    return stats


def prepare_fats_schedule(cfg: DiffusionConfig, dataset: Dataset, target: str, seed: int = 0,
                          kappa: float = DEFAULT_KAPPA, max_cases: int = DEFAULT_STAT_CASES
                          ) -> tuple[DiffusionConfig, NoiseSchedule, dict]:
    """The FATS config (shifts filled in from the energy statistics unless already given), its
    schedule, and the checkpoint ``extra`` entry recording the statistics and shifts."""
    stats = measure_energy(dataset, target, max_cases, seed)
    if not cfg.band_shifts:
        shifts = shifts_from_energy(stats, kappa=kappa, max_shift=cfg.max_shift)
        cfg = replace(cfg, band_shifts=tuple(round(s, 6) for s in shifts))
        logger.info("FATS shifts from energy statistics (kappa %.2f): %s", kappa,
                    ", ".join(f"{s:+.2f}" for s in cfg.band_shifts))
    extra = {"fats": {**fats_state_dict(energy_stats=stats, band_shifts=cfg.band_shifts, kappa=kappa),
                      "default_k": DEFAULT_K}}
    return cfg, build_schedule(cfg), extra


def held_out_cases(dataset: Dataset, target: str, device, max_cases: int = 4, seed: int = 0) -> list[dict]:
    """Held-out cases in the form :func:`learn_timesteps` expects (x0, cond, mask, case_id)."""
    cases = []
    for i in case_subset(len(dataset), max_cases, seed):
        item = dataset[i]
        target_volume, cond = split_case(item["volumes"][None].to(device), target)
        cases.append({"x0": to_subbands(target_volume), "cond": to_subbands(cond),
                      "mask": subband_mask(item["brain_mask"][None]).to(device), "case_id": item["case_id"]})
    return cases


def fit_sampling_steps(model: torch.nn.Module, schedule: NoiseSchedule, cases: list[dict], ks: Sequence[int],
                       clip: bool = True, seed: int = 0, reference: str = "target") -> dict[int, dict]:
    """Learned K-step DDIM timesteps for each K in ``ks`` (any model, any schedule).

    ``reference``: ``"target"`` fits the real x0 (paired data); ``"teacher"`` fits the same noise's
    sample over every step (avoids the one-step-regression optimum the target objective favours).
    """
    model.eval()
    results = {}
    for k in ks:
        result = learn_timesteps(lambda case: make_denoiser(model, schedule, case["cond"]), schedule, cases, int(k),
                                 clip=clip_in_image_space if clip else None, seed=seed, reference=reference)
        logger.info("K=%d: learned steps %s, held-out error %.5g (uniform %s: %.5g)", k, result["steps"],
                    result["error"], result["uniform_steps"], result["uniform_error"])
        results[int(k)] = result
    return results


def with_learned_steps(checkpoint: dict, results: dict[int, dict], default_k: int = DEFAULT_K) -> dict:
    """A copy of a checkpoint dict with learned timesteps recorded under ``extra["fats"]``."""
    extra = dict(checkpoint.get("extra", {}))
    fats = dict(extra.get("fats") or fats_state_dict())
    table = dict(fats.get("timesteps") or {})
    for k, result in results.items():
        table[str(k)] = {key: result[key] for key in ("steps", "error", "uniform_steps", "uniform_error")}
    fats["timesteps"] = table
    fats["default_k"] = default_k if str(default_k) in table else int(min(results))
    extra["fats"] = fats
    return {**checkpoint, "extra": extra}
