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
import math
import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from DWT_IDWT import BAND_NAMES, clip_in_image_space, to_subbands

from .checkpoints import LoadedModel, save_checkpoint
from .conditioning import model_inputs, split_case
from .constants import ALL_TARGET, MODALITIES
from .config import DiffusionConfig, SampleConfig
from .diffusion import make_denoiser, randn
from .factory import build_schedule
from .fats import FatsState, LearnedTimesteps, band_energy_stats, shifts_from_energy, subband_mask, warm_start_step
from .fats_search import learn_timesteps
from .flow import FlowPath
from .schedules import NoiseSchedule
from .seeding import case_generator, case_subset
from .timesteps import plan_timesteps

logger = logging.getLogger(__name__)

DEFAULT_KAPPA = 1.0
DEFAULT_STAT_CASES = 32
DEFAULT_NFE = 4
"""The budget sampling uses by default once its learned timesteps are stored."""
FATS_NFE_BUDGETS = (1, 2, 4, 10)
"""The budgets whose timesteps training learns at the end of a FATS run."""


def measure_energy(dataset: Dataset, target: str, max_cases: int = DEFAULT_STAT_CASES, seed: int = 0, *,
                   skip_errors: tuple[type[Exception], ...] = (), skipped: list | None = None,
                   estimate: Callable[[dict], torch.Tensor] | None = None) -> dict:
    """Per-band energy statistics of the normalised target subbands inside the brain, on the
    seeded subset ``seeding.case_subset(len(dataset), max_cases, seed)`` (each case read once).
    ``estimate`` (residual mode, FATS v2): ``item -> x0_hat`` (1, 8, d, h, w) target subbands of a
    regression estimate (e.g. :func:`last_step_estimate`); the statistics are then those of the
    residual ``x0 - x0_hat`` (``label="residual"``: its ``energy`` is R_b), single-modality targets only.
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
            bands = to_subbands(target_volume)
            yield (bands if estimate is None else bands - estimate(item).to(bands)), item["brain_mask"][None]

    if estimate is not None and target == ALL_TARGET:
        raise ValueError("measure_energy: residual energies are measured for one target modality, not 'all'")
    # One read per case: band_energy_stats zips the two views, so the tee buffers at most one case.
    bands, masks = itertools.tee(bands_and_masks())
    stats = band_energy_stats((b for b, _ in bands), (m for _, m in masks),
                              label="target" if estimate is None else "residual")
    stats.update({"target_modality": target, "case_indices": idx, "case_ids": case_ids, "seed": seed,
                  "max_cases": max_cases})
    return stats


def with_band_sigma_data(cfg: DiffusionConfig, stats: dict) -> DiffusionConfig:
    """FATS design step 4 (docs/prediction.md): a ``v``-predicting FATS model preconditions each band
    with its own data scale, ``sigma_data_b = sqrt(E_b)`` (the band's RMS in the brain, from the
    energy statistics), unless the config already gives one; an x0 model is returned unchanged."""
    if cfg.prediction != "v" or cfg.sigma_data:
        return cfg
    sigma = tuple(round(max(math.sqrt(stats["energy"][b]), MIN_SIGMA_DATA), 6) for b in BAND_NAMES)
    logger.info("per-band preconditioning: sigma_data %s", ", ".join(f"{b} {s:.3g}" for b, s in zip(BAND_NAMES, sigma)))
    return replace(cfg, sigma_data=sigma)


MIN_SIGMA_DATA = 1e-3
"""Floor of a band's sigma_data (a band with no energy in the data would otherwise get c_in = 1 / 0)."""


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
    cfg = with_band_sigma_data(cfg, stats)
    state = FatsState(energy_stats=stats, band_shifts=cfg.band_shifts, kappa=kappa, default_nfe=DEFAULT_NFE)
    return cfg, build_schedule(cfg), state.into_extra({})


def last_step_estimate(loaded: LoadedModel, target: str, seed: int = 0,
                       clip: bool = True) -> Callable[[dict], torch.Tensor]:
    """``item -> x0_hat`` (1, 8, d, h, w) on the CPU: a model's x0 prediction at the last step of its
    schedule from the case's own noise (``seeding.case_generator(seed, case_id)``), clipped as
    sampling clips. From pure noise this is the regression estimate E[x0 | cond] (exactly what a
    ``train_timesteps="last"`` model is trained for; any diffusion model's 1-NFE output)."""
    if loaded.all_modality or isinstance(loaded.schedule, FlowPath):
        raise ValueError(f"{loaded.source}: residual energies are measured with a single-modality diffusion model "
                         f"(e.g. preset regression), not an all-modality or flow model")
    device = next(loaded.model.parameters()).device
    last = loaded.schedule.num_steps - 1
    loaded.model.eval()

    @torch.no_grad()
    def estimate(item: dict) -> torch.Tensor:
        _, cond_volume = split_case(item["volumes"][None], target)
        cond = to_subbands(cond_volume.to(device).float())
        denoiser = make_denoiser(loaded.model, loaded.schedule, cond)
        x_T = randn((1, loaded.schedule.n_bands, *cond.shape[2:]), case_generator(seed, item["case_id"]), device)
        pred = denoiser(x_T, torch.full((1,), last, dtype=torch.long, device=device))
        return (clip_in_image_space(pred) if clip else pred).cpu()

    return estimate


def prepare_fats_v2_schedule(cfg: DiffusionConfig, dataset: Dataset, target: str, regression: LoadedModel,
                             sample: SampleConfig, seed: int = 0, kappa: float = DEFAULT_KAPPA,
                             max_cases: int = DEFAULT_STAT_CASES, source: str = ""
                             ) -> tuple[DiffusionConfig, NoiseSchedule, dict]:
    """FATS v2 before training (docs/fats_v2.md): shifts from the residual energies R_b of
    ``regression``'s last-step estimate (:func:`last_step_estimate`) instead of the raw energies E_b;
    the per-band warm start step t* where each band's noise level best matches its residual
    (:func:`~guided_diffusion.fats.warm_start_step`); and the planned sampling steps
    ``[T - 1, t*, ...]`` (``timesteps.plan_timesteps``, ``sample.nfe`` evaluations, at most t* + 2),
    stored as the FATS state's default learned steps and as its ``train_timesteps`` (what a
    ``train_timesteps="sampled"`` run trains on).

    Returns the config (shifts filled in unless given), its schedule, and the checkpoint ``extra``
    holding the :class:`FatsState` (version 3) and ``sample``: ``sample`` with ``warm_start_t`` = t*
    and that NFE, so ``sample.py`` / ``sample_auto.py`` sample it with no flags.
    """
    raw = measure_energy(dataset, target, max_cases, seed)
    residual = measure_energy(dataset, target, max_cases, seed, estimate=last_step_estimate(regression, target, seed))
    residual["regression_model"] = source
    if not cfg.band_shifts:
        shifts = shifts_from_energy(residual, kappa=kappa, max_shift=cfg.max_shift)
        cfg = replace(cfg, band_shifts=tuple(round(s, 6) for s in shifts))
        logger.info("FATS v2 shifts from residual energies (kappa %.2f): %s", kappa,
                    ", ".join(f"{s:+.2f}" for s in cfg.band_shifts))
    cfg = with_band_sigma_data(cfg, raw)
    schedule = build_schedule(cfg)
    t_star = warm_start_step(schedule.log_snr, [residual["energy"][b] for b in BAND_NAMES])
    nfe = min(sample.nfe or DEFAULT_NFE, t_star + 2)
    steps, origin = plan_timesteps(schedule, None, nfe, t_star)
    logger.info("FATS v2: per-band warm start at step %d; sampling and training steps %s (%s)", t_star, steps, origin)
    state = FatsState(energy_stats=raw, residual_stats=residual, band_shifts=cfg.band_shifts, kappa=kappa,
                      learned={nfe: LearnedTimesteps(tuple(steps))}, default_nfe=nfe, train_timesteps=tuple(steps))
    return cfg, schedule, state.into_extra({"sample": replace(sample, nfe=nfe, warm_start_t=t_star).to_dict()})


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
                       clip: bool = True, seed: int = 0, reference: str = "target", score: str = "mse",
                       precision: str = "fp32", progress: Callable[[dict], None] | None = None) -> dict[int, dict]:
    """Learned DDIM timesteps for each budget in ``nfes`` (any model, any schedule): NFE ->
    ``fats_search.learn_timesteps`` result.

    ``reference``: ``"target"`` fits the real x0 (paired data); ``"teacher"`` fits the same noise's
    sample over every step (avoids the one-step-regression optimum the target objective favours).
    ``score``: ``"mse"`` or ``"crps"`` (``fats_search.learn_timesteps``: the fair CRPS of 2 samples
    against the target, a proper score, FATS v2).
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
                                 reference=reference, score=score, callback=lambda state: report(
                                     {"event": "improved", **state, "evaluations": state["nfe"], **where}))
        report({"event": "done", **where, "result": result})
        logger.info("NFE=%d: learned timesteps %s, held-out error %.5g (uniform %s: %.5g)", nfe, result["steps"],
                    result["error"], result["uniform_steps"], result["uniform_error"])
        results[int(nfe)] = result
    return results


def fit_and_store_timesteps(model: torch.nn.Module, schedule: NoiseSchedule, cases: list[dict], nfes: Sequence[int],
                            checkpoints: Sequence[tuple[dict, str | Path]], *, default_nfe: int = DEFAULT_NFE,
                            seed: int = 0, precision: str = "fp32", score: str = "mse",
                            progress: Callable[[dict], None] | None = None) -> dict[int, dict]:
    """Learn the timesteps of each budget in ``nfes`` (:func:`fit_sampling_steps`) and store them:
    each ``(checkpoint dict, path)`` of ``checkpoints`` is saved to ``path`` with its FATS state
    extended by the learned timesteps and ``default_nfe`` (the smallest budget when ``default_nfe``
    was not fitted). ``progress``: see :func:`fit_sampling_steps`. Returns NFE -> ``learn_timesteps`` result.
    """
    with torch.no_grad():
        results = fit_sampling_steps(model, schedule, cases, nfes, seed=seed, precision=precision, score=score,
                                     progress=progress)
    for checkpoint, path in checkpoints:
        extra = checkpoint.get("extra") or {}
        state = (FatsState.from_extra(extra) or FatsState()).with_learned(results, default_nfe)
        save_checkpoint(path, {**checkpoint, "extra": state.into_extra(extra)})
    return results
