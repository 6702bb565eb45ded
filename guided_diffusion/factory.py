"""Construction from configs: the one place a model or a noise schedule is built (layer 3).

Configs (:mod:`guided_diffusion.config`) are pure data and the building blocks
(:mod:`guided_diffusion.unet`, :mod:`guided_diffusion.schedules`) read no config; this module
joins them. Schedule kinds are a registry, :data:`SCHEDULE_BUILDERS` (kind name -> builder), whose
names are exactly ``constants.SCHEDULE_KINDS``, the names ``DiffusionConfig`` accepts.
"""
from __future__ import annotations

from typing import Callable

from .config import DiffusionConfig, ModelConfig
from .constants import FATS_BASES
from .flow import FlowPath
from .schedules import NoiseSchedule, cosine, fast_sampled, linear, per_band_schedule
from .unet import UNet3D

ScheduleBuilder = Callable[[DiffusionConfig], NoiseSchedule | FlowPath]


def build_model(cfg: ModelConfig) -> UNet3D:
    """The UNet a model config describes (freshly initialised; on the default device)."""
    return UNet3D(cfg)


def build_schedule(cfg: DiffusionConfig) -> NoiseSchedule | FlowPath:
    """The noise schedule a diffusion config describes, built by its kind's registered builder
    (for kind ``flow`` the flow's path, :class:`~guided_diffusion.flow.FlowPath`); with prediction
    ``v`` it carries the per-band ``sigma_data`` of the network's preconditioning (1 when not given)."""
    try:
        builder = SCHEDULE_BUILDERS[cfg.kind]
    except KeyError:
        raise ValueError(f"factory.py: no builder for schedule kind {cfg.kind!r}; "
                         f"registered: {sorted(SCHEDULE_BUILDERS)}") from None
    schedule = builder(cfg)
    if cfg.prediction == "v":  # the network's preconditioning travels with the schedule (docs/prediction.md)
        schedule = schedule.with_sigma_data(cfg.sigma_data or (1.0,) * schedule.n_bands)
    return schedule


def _linear_schedule(cfg: DiffusionConfig) -> NoiseSchedule:
    """``linear`` (1000 steps, cWDM) and ``fast_direct`` (the betas rescaled to ``cfg.num_train_steps``)."""
    return linear(cfg.num_train_steps, cfg.beta_start, cfg.beta_end, cfg.n_bands)


def _cosine_schedule(cfg: DiffusionConfig) -> NoiseSchedule:
    return cosine(cfg.num_train_steps, cfg.n_bands)


def _fast_sampled_schedule(cfg: DiffusionConfig) -> NoiseSchedule:
    return fast_sampled(cfg.fast_intervals, cfg.num_train_steps, cfg.beta_start, cfg.beta_end, cfg.n_bands)


_FATS_BASE_CURVES: dict[str, ScheduleBuilder] = {
    "linear": lambda cfg: linear(cfg.num_train_steps, cfg.beta_start, cfg.beta_end, n_bands=1),
    "cosine": lambda cfg: cosine(cfg.num_train_steps, n_bands=1),
}


def fats_schedule(cfg: DiffusionConfig) -> NoiseSchedule:
    """The FATS schedule of a config: the base curve (``cfg.fats_base`` with ``cfg.num_train_steps``) with
    ``cfg.band_shifts`` (all zero when empty) applied per band and capped at ``cfg.max_shift``."""
    if cfg.fats_base not in _FATS_BASE_CURVES:
        raise ValueError(f"fats_schedule: unknown base curve {cfg.fats_base!r}; expected one of {FATS_BASES}")
    base = _FATS_BASE_CURVES[cfg.fats_base](cfg)
    shifts = cfg.band_shifts or (0.0,) * cfg.n_bands
    if len(shifts) != cfg.n_bands:
        raise ValueError(f"fats_schedule: {len(shifts)} shifts for {cfg.n_bands} bands")
    return per_band_schedule(base, shifts, cfg.max_shift)


def _flow_path(cfg: DiffusionConfig) -> FlowPath:
    """Kind ``flow``: the path from ``cfg.flow_source`` (+ ``cfg.source_noise`` noise) to the target."""
    return FlowPath(cfg.num_train_steps, float(cfg.source_noise), cfg.flow_source, cfg.n_bands)


SCHEDULE_BUILDERS: dict[str, ScheduleBuilder] = {
    "linear": _linear_schedule,
    "cosine": _cosine_schedule,
    "fast_direct": _linear_schedule,
    "fast_sampled": _fast_sampled_schedule,
    "fats": fats_schedule,
    "flow": _flow_path,
}
"""Schedule kind -> builder; the keys are exactly ``constants.SCHEDULE_KINDS`` (tested)."""
