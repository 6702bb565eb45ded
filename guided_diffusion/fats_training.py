"""FATS in the pipeline: schedules from measured statistics, and learned timesteps stored in checkpoints.

* :func:`measure_energy` / :func:`prepare_fats_schedule`: before training, measure the target
  subbands' energy per band on (a seeded sample of) the training set and derive the shifts; the
  ``fats_stats`` command calls the same :func:`measure_energy`, so it reproduces what training
  measured for the same cases and seed.
* :func:`fit_and_store_timesteps`: after training (or for any checkpoint, cWDM's included), learn
  the DDIM timesteps of each NFE budget on held-out cases (:func:`fit_sampling_steps`) and store
  them in checkpoints (their :class:`~guided_diffusion.fats.FatsState`), so that sampling uses them
  by default. The ``train`` and ``fats_fit_steps`` commands both call it.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from DWT_IDWT import clip_in_image_space, to_subbands

from .checkpoints import save_checkpoint
from .conditioning import model_inputs, split_case
from .constants import ALL_TARGET, MODALITIES
from .config import DiffusionConfig
from .diffusion import make_denoiser
from .factory import build_schedule
from .fats import FatsState, band_energy_stats, shifts_from_energy, subband_mask
from .fats_search import learn_timesteps
from .schedules import NoiseSchedule
from .seeding import case_subset

logger = logging.getLogger(__name__)

DEFAULT_KAPPA = 1.0
DEFAULT_STAT_CASES = 32
DEFAULT_NFE = 4
"""The budget sampling uses by default once its learned timesteps are stored."""
FATS_NFE_BUDGETS = (1, 2, 4, 10)
"""The budgets whose timesteps training learns at the end of a FATS run."""


def measure_energy(dataset: Dataset, target: str, max_cases: int = DEFAULT_STAT_CASES, seed: int = 0, *,
                   skip_errors: tuple[type[Exception], ...] = (), skipped: list | None = None) -> dict:
    """Per-band energy statistics of the normalised target subbands inside the brain, on the
    seeded subset ``seeding.case_subset(len(dataset), max_cases, seed)`` (each case read once).
    ``target`` ``ALL_TARGET`` (an all-modality model) pools the four modalities: every case
    contributes each of its four volumes, so the energy is the mean over modalities and
    ``case_energy`` holds four entries per case, in ``MODALITIES`` order.

    ``dataset`` items carry ``volumes`` (4, X, Y, Z), ``brain_mask`` (X, Y, Z) and ``case_id``.
    Items raising one of ``skip_errors`` are left out (appended to ``skipped`` when given).
    Returns :func:`~guided_diffusion.fats.band_energy_stats`'s dict plus ``target_modality``,
    ``case_indices`` (the subset), ``case_ids`` (the cases measured), ``seed`` and ``max_cases``.
    """
    idx = case_subset(len(dataset), max_cases, seed)
    case_ids: list[str] = []

    def bands_and_masks():
        for i in idx:
            try:
                item = dataset[i]
            except skip_errors as err:
                if skipped is not None:
                    skipped.append(err)
                continue
            volumes = item["volumes"]
            target_volume = volumes[:, None] if target == ALL_TARGET else split_case(volumes[None], target)[0]
            case_ids.append(item["case_id"])
            yield to_subbands(target_volume), item["brain_mask"][None]

    # One read per case: band_energy_stats zips the two views, so the tee buffers at most one case.
    bands, masks = itertools.tee(bands_and_masks())
    stats = band_energy_stats((b for b, _ in bands), (m for _, m in masks))
    stats.update({"target_modality": target, "case_indices": idx, "case_ids": case_ids, "seed": seed,
                  "max_cases": max_cases})
    return stats


def prepare_fats_schedule(cfg: DiffusionConfig, dataset: Dataset, target: str, seed: int = 0,
                          kappa: float = DEFAULT_KAPPA, max_cases: int = DEFAULT_STAT_CASES
                          ) -> tuple[DiffusionConfig, NoiseSchedule, dict]:
    """The FATS config (shifts filled in from the energy statistics unless already given), its
    schedule, and the checkpoint ``extra`` dict holding the :class:`FatsState` (statistics, shifts,
    kappa, default NFE)."""
    stats = measure_energy(dataset, target, max_cases, seed)
    if not cfg.band_shifts:
        shifts = shifts_from_energy(stats, kappa=kappa, max_shift=cfg.max_shift)
        cfg = replace(cfg, band_shifts=tuple(round(s, 6) for s in shifts))
        logger.info("FATS shifts from energy statistics (kappa %.2f): %s", kappa,
                    ", ".join(f"{s:+.2f}" for s in cfg.band_shifts))
    state = FatsState(energy_stats=stats, band_shifts=cfg.band_shifts, kappa=kappa, default_nfe=DEFAULT_NFE)
    return cfg, build_schedule(cfg), state.into_extra({})


def held_out_cases(dataset: Dataset, target: str, device, max_cases: int = 4, seed: int = 0) -> list[dict]:
    """Held-out cases in the form :func:`learn_timesteps` expects (x0, cond, mask, case_id, label).
    ``target`` ``ALL_TARGET`` (an all-modality model): each case once per modality, with its label
    (4 x ``max_cases`` entries, the timesteps fitted for every target); ``label`` is None otherwise."""
    cases = []
    for i in case_subset(len(dataset), max_cases, seed):
        item = dataset[i]
        for name in (MODALITIES if target == ALL_TARGET else (target,)):
            target_volume, cond, label = model_inputs(item["volumes"][None].to(device), name, target == ALL_TARGET)
            cases.append({"x0": to_subbands(target_volume), "cond": to_subbands(cond),
                          "mask": subband_mask(item["brain_mask"][None]).to(device), "case_id": item["case_id"],
                          "label": label})
    return cases


def fit_sampling_steps(model: torch.nn.Module, schedule: NoiseSchedule, cases: list[dict], nfes: Sequence[int], *,
                       clip: bool = True, seed: int = 0, reference: str = "target",
                       precision: str = "fp32", progress: Callable[[dict], None] | None = None) -> dict[int, dict]:
    """Learned DDIM timesteps for each budget in ``nfes`` (any model, any schedule): NFE ->
    ``fats_search.learn_timesteps`` result.

    ``reference``: ``"target"`` fits the real x0 (paired data); ``"teacher"`` fits the same noise's
    sample over every step (avoids the one-step-regression optimum the target objective favours).
    ``precision``: the network's precision (``diffusion.make_denoiser``), as it will be sampled.
    ``progress``: called with ``{"event": "start" | "improved" | "done", "nfe", "index", "budgets"}``
    (``index`` of the budget, of ``budgets`` in all), plus the search's state for ``"improved"``
    (``sweep``, ``position``, ``steps``, ``error``, ``evaluations`` so far) and the ``result`` for
    ``"done"``.
    """
    model.eval()
    results = {}
    report = progress or (lambda event: None)
    for index, nfe in enumerate(nfes):
        where = {"nfe": int(nfe), "index": index, "budgets": len(nfes)}
        report({"event": "start", **where})
        result = learn_timesteps(lambda case: make_denoiser(model, schedule, case["cond"], label=case.get("label"),
                                                            precision=precision),
                                 schedule, cases, int(nfe), clip=clip_in_image_space if clip else None, seed=seed,
                                 reference=reference, callback=lambda state: report(
                                     {"event": "improved", **state, "evaluations": state["nfe"], **where}))
        report({"event": "done", **where, "result": result})
        logger.info("NFE=%d: learned timesteps %s, held-out error %.5g (uniform %s: %.5g)", nfe, result["steps"],
                    result["error"], result["uniform_steps"], result["uniform_error"])
        results[int(nfe)] = result
    return results


def fit_and_store_timesteps(model: torch.nn.Module, schedule: NoiseSchedule, cases: list[dict], nfes: Sequence[int],
                            checkpoints: Sequence[tuple[dict, str | Path]], *, default_nfe: int = DEFAULT_NFE,
                            seed: int = 0, precision: str = "fp32",
                            progress: Callable[[dict], None] | None = None) -> dict[int, dict]:
    """Learn the timesteps of each budget in ``nfes`` (:func:`fit_sampling_steps`) and store them:
    each ``(checkpoint dict, path)`` of ``checkpoints`` is saved to ``path`` with its FATS state
    extended by the learned timesteps and ``default_nfe`` (the smallest budget when ``default_nfe``
    was not fitted). ``progress``: see :func:`fit_sampling_steps`. Returns NFE -> ``learn_timesteps`` result.
    """
    with torch.no_grad():
        results = fit_sampling_steps(model, schedule, cases, nfes, seed=seed, precision=precision, progress=progress)
    for checkpoint, path in checkpoints:
        extra = checkpoint.get("extra") or {}
        state = (FatsState.from_extra(extra) or FatsState()).with_learned(results, default_nfe)
        save_checkpoint(path, {**checkpoint, "extra": state.into_extra(extra)})
    return results
