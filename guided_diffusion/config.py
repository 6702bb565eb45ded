"""Typed, validated configs (one per concern) and their JSON round trip: pure data.

Layer 1: imports only :mod:`guided_diffusion.constants`. Building a model or a schedule from
these configs is :mod:`guided_diffusion.factory`'s job.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .constants import (ALL_TARGET, BACKENDS, FATS_BASES, MODALITIES, PRECISIONS, REFERENCE_STEPS, SAMPLERS,
                        SCHEDULE_KINDS)
from .constants import FLOW_SOURCES, PREDICTIONS

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration value is invalid."""


class _JsonConfig:
    """Mixin: ``to_dict`` / ``from_dict`` / ``to_json`` / ``from_json`` with unknown-key checks.

    ``retired_keys``: fields that older versions wrote and nothing reads any more; ``from_dict``
    accepts and drops them, so configs stored in old checkpoints still load. Renamed fields are
    mapped by :meth:`_upgrade` (with a logged deprecation note).
    """

    retired_keys: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def _upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Old spellings -> current field names (the identity unless a config renamed a field)."""
        return data

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        data = cls._upgrade({key: value for key, value in data.items() if key not in cls.retired_keys})
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown keys {unknown}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                value = data[f.name]
                kwargs[f.name] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _renamed(cls_name: str, data: dict[str, Any], old: str, new: str, meaning: str) -> dict[str, Any]:
    """``data`` with key ``old`` moved to ``new`` (refusing both at once), logging a deprecation note."""
    if old not in data:
        return data
    if new in data:
        raise ConfigError(f"{cls_name}: both the old key {old!r} and its new name {new!r} are given")
    logger.warning("%s: the key %r is deprecated, read as %r (%s)", cls_name, old, new, meaning)
    data = dict(data)
    data[new] = data.pop(old)
    return data


@dataclass(frozen=True)
class ModelConfig(_JsonConfig):
    """The 3D UNet. Defaults are cWDM's published configuration (81.5 M parameters)."""

    num_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    num_groups: int = 32
    in_channels: int = 32  # 8 noisy target subbands + 3 x 8 conditioning subbands
    out_channels: int = 8
    dropout: float = 0.0
    use_checkpoint: bool = False  # activation checkpointing of every residual block
    num_modality_labels: int = 0  # > 0 adds a target-modality label embedding (all-modality model)

    def __post_init__(self):
        if self.num_channels < 1 or self.num_res_blocks < 1:
            raise ConfigError(f"ModelConfig: num_channels and num_res_blocks must be >= 1: {self}")
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ConfigError(f"ModelConfig: channel_mult must be positive integers, got {self.channel_mult}")
        for m in self.channel_mult:
            if (m * self.num_channels) % self.num_groups:
                raise ConfigError(
                    f"ModelConfig: {m * self.num_channels} channels not divisible by num_groups={self.num_groups}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"ModelConfig: dropout must be in [0, 1), got {self.dropout}")
        if self.in_channels < 1 or self.out_channels < 1 or self.num_modality_labels < 0:
            raise ConfigError(f"ModelConfig: invalid channel or label counts: {self}")

    @property
    def spatial_divisor(self) -> int:
        """Network-input spatial sizes must be divisible by this."""
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class DiffusionConfig(_JsonConfig):
    """The noise schedule and its training / sampling conventions.

    ``num_train_steps`` is T, the length of the schedule's base curve (1000 for cWDM).
    kind: ``linear`` (cWDM, ``num_train_steps`` = 1000 only), ``cosine``, ``fast_direct`` (the
    linear schedule rescaled to ``num_train_steps``), ``fast_sampled`` (Fast-DDPM's uniform choice:
    ``fast_intervals`` + 1 points of the ``num_train_steps``-long linear curve, t = 0 included;
    the only kind that takes ``fast_intervals``), ``fats`` (per-band shifts of ``fats_base``),
    ``flow`` (flow matching from the mean of the conditions on a ``num_train_steps``-point time
    grid, starting at ``flow_source`` plus ``source_noise`` (sigma_src) times Gaussian noise; the
    only kind that takes ``source_noise``; docs/flow_matching.md).

    Old configs spelled ``num_train_steps`` as ``steps`` (and, for ``fast_sampled``, meant
    ``fast_intervals`` by it); :meth:`from_dict` maps them with a deprecation note.
    """

    retired_keys: ClassVar[frozenset[str]] = frozenset({"clip_denoised"})  # clipping is SampleConfig's

    kind: str = "linear"
    num_train_steps: int = REFERENCE_STEPS
    fast_intervals: int = 0  # kind fast_sampled only: the number of intervals (NFE = fast_intervals + 1)
    beta_start: float = 1e-4
    beta_end: float = 0.02
    n_bands: int = 8
    band_shifts: tuple[float, ...] = field(default_factory=tuple)  # FATS log-SNR shifts, one per band
    max_shift: float = 4.0
    fats_base: str = "linear"  # FATS base log-SNR curve: "linear" (with beta_start/end) or "cosine"
    flow_source: str = "cond_mean"  # kind flow: where the flow starts (constants.FLOW_SOURCES)
    source_noise: float = 0.0  # kind flow: sigma_src, 0 = the deterministic start
    prediction: str = "x0"  # the network's output: "x0" (cWDM) or "v" (preconditioned; docs/prediction.md)
    sigma_data: tuple[float, ...] = field(default_factory=tuple)  # prediction "v": per-band data scale (empty: 1)

    @classmethod
    def _upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        if data.get("kind") == "fast_sampled" and "steps" in data:
            return _renamed(cls.__name__, data, "steps", "fast_intervals",
                            "Fast-DDPM's interval count; the curve keeps num_train_steps")
        return _renamed(cls.__name__, data, "steps", "num_train_steps", "the schedule's length T")

    def __post_init__(self):
        if self.kind not in SCHEDULE_KINDS:
            raise ConfigError(f"DiffusionConfig: kind must be one of {SCHEDULE_KINDS}, got {self.kind!r}")
        if self.kind == "linear" and self.num_train_steps != REFERENCE_STEPS:
            raise ConfigError(f"DiffusionConfig: kind 'linear' is the {REFERENCE_STEPS}-step schedule, got "
                              f"num_train_steps={self.num_train_steps}; use kind 'fast_direct' for the linear "
                              f"schedule rescaled to {self.num_train_steps} steps")
        if self.num_train_steps < 1:
            raise ConfigError(f"DiffusionConfig: num_train_steps must be >= 1, got {self.num_train_steps}")
        if self.kind == "fast_sampled" and not 1 <= self.fast_intervals < self.num_train_steps:
            raise ConfigError(f"DiffusionConfig: kind 'fast_sampled' needs 1 <= fast_intervals < num_train_steps="
                              f"{self.num_train_steps}, got fast_intervals={self.fast_intervals}")
        if self.kind != "fast_sampled" and self.fast_intervals:
            raise ConfigError(f"DiffusionConfig: fast_intervals is only used with kind 'fast_sampled', got "
                              f"{self.fast_intervals} with kind {self.kind!r}")
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise ConfigError(f"DiffusionConfig: need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if self.n_bands < 1:
            raise ConfigError(f"DiffusionConfig: n_bands must be >= 1, got {self.n_bands}")
        if self.band_shifts and len(self.band_shifts) != self.n_bands:
            raise ConfigError(f"DiffusionConfig: band_shifts needs {self.n_bands} values, got {len(self.band_shifts)}")
        if self.band_shifts and self.kind != "fats":
            raise ConfigError("DiffusionConfig: band_shifts are only used with kind='fats'")
        if any(abs(s) > self.max_shift for s in self.band_shifts):
            raise ConfigError(f"DiffusionConfig: |band_shifts| must be <= max_shift={self.max_shift}: {self.band_shifts}")
        if self.fats_base not in FATS_BASES:
            raise ConfigError(f"DiffusionConfig: fats_base must be one of {FATS_BASES}, got {self.fats_base!r}")
        if self.flow_source not in FLOW_SOURCES:
            raise ConfigError(f"DiffusionConfig: flow_source must be one of {FLOW_SOURCES}, got {self.flow_source!r}")
        if not (isinstance(self.source_noise, (int, float)) and 0.0 <= self.source_noise < float("inf")):
            raise ConfigError(f"DiffusionConfig: source_noise (sigma_src) must be a finite number >= 0, got "
                              f"{self.source_noise!r}")
        if self.prediction not in PREDICTIONS:
            raise ConfigError(f"DiffusionConfig: prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.prediction != "x0" and self.kind == "flow":
            raise ConfigError("DiffusionConfig: a flow model (kind 'flow') predicts its velocity; prediction "
                              f"{self.prediction!r} is for noise schedules")
        if self.sigma_data and self.prediction != "v":
            raise ConfigError("DiffusionConfig: sigma_data is only used with prediction 'v'")
        if self.sigma_data and (len(self.sigma_data) != self.n_bands
                                or not all(0.0 < float(s) < float("inf") for s in self.sigma_data)):
            raise ConfigError(f"DiffusionConfig: sigma_data needs {self.n_bands} finite values > 0, got "
                              f"{self.sigma_data}")
        if self.source_noise and self.kind != "flow":
            raise ConfigError(f"DiffusionConfig: source_noise is only used with kind 'flow', got {self.source_noise} "
                              f"with kind {self.kind!r}")


@dataclass(frozen=True)
class TrainConfig(_JsonConfig):
    """One training run of one target modality.

    ``max_steps`` counts training steps: optimizer updates (one batch each), not schedule steps.
    """

    data_dir: str = ""
    run_dir: str = "runs/train"
    target_modality: str = "t2f"  # or ALL_TARGET ("all"): one all-modality model (ModelConfig.num_modality_labels)
    batch_size: int = 1  # per process
    lr: float = 1e-5  # cWDM's AdamW learning rate
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm (0 disables)
    ema_rate: float = 0.9999
    max_steps: int = 100_000
    save_interval: int = 5_000
    log_interval: int = 100
    val_interval: int = 5_000  # also where the best checkpoint is chosen (0: no validation)
    val_cases: int = 4  # cases held out of data_dir for validation when no val_dir is given
    val_dir: str = ""
    image_interval: int = 5_000  # TensorBoard image slices (0 disables)
    precision: str = "fp32"
    num_workers: int = 2
    seed: int = 0
    band_weights: tuple[float, ...] = field(default_factory=tuple)  # per-band loss weights (empty: uniform)
    shift_ramp_steps: int = 0  # FATS fine-tuning from a shared-schedule checkpoint: ramp shifts in
    init_from: str = ""  # start from these weights (e.g. cWDM's), not a resume
    compile: bool = False  # torch.compile the network for the training steps (GPU: see benchmarks/gpu_suite.py)
    cache_dir: str = ""  # cache of preprocessed cases (volume_cache.CachedBratsDataset); "" reads the NIfTI files
    # which schedule steps training draws t from: parse_train_timesteps (docs/fats_v2.md)
    train_timesteps: str = "uniform"
    min_snr_gamma: float = 0.0  # > 0: per-band x0-loss weights clamp(SNR_b(t), 1, gamma) (diffusion.snr_weights)
    residual_from: str = ""  # FATS v2: shift by the residual energy of this regression checkpoint's estimate

    def __post_init__(self):
        if self.target_modality not in (*MODALITIES, ALL_TARGET):  # ALL_TARGET: an all-modality model
            raise ConfigError(f"TrainConfig: target_modality must be one of {(*MODALITIES, ALL_TARGET)}, "
                              f"got {self.target_modality!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"TrainConfig: precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("batch_size", "max_steps", "save_interval", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or not 0.0 <= self.ema_rate < 1.0:
            raise ConfigError(f"TrainConfig: need lr > 0 and 0 <= ema_rate < 1, got {self.lr}, {self.ema_rate}")
        if min(self.val_interval, self.image_interval, self.val_cases, self.num_workers, self.shift_ramp_steps) < 0:
            raise ConfigError("TrainConfig: intervals and counts must be >= 0")
        if self.band_weights and (len(self.band_weights) != 8 or min(self.band_weights) < 0):
            raise ConfigError(f"TrainConfig: band_weights needs 8 non-negative values, got {self.band_weights}")
        parse_train_timesteps(self.train_timesteps)
        if self.min_snr_gamma < 0:
            raise ConfigError(f"TrainConfig: min_snr_gamma must be >= 0 (0 = off), got {self.min_snr_gamma}")


@dataclass(frozen=True)
class SampleConfig(_JsonConfig):
    """How to synthesise: sampler, NFE budget, clipping, seed, precision.

    ``nfe``: network evaluations per volume; 0 = the checkpoint's default (see
    :func:`guided_diffusion.timesteps.plan_timesteps`). Old configs call it ``steps`` (mapped by
    :meth:`from_dict` with a deprecation note).
    """

    retired_keys: ClassVar[frozenset[str]] = frozenset({"batch_size"})  # was never read

    sampler: str = "ddim"
    nfe: int = 0
    eta: float = 0.0
    clip_denoised: bool = True  # cWDM: IDWT -> clamp to [0, 1] -> DWT of every x0 prediction
    seed: int = 0
    precision: str = "fp32"
    compile: bool = False  # torch.compile the network once per loaded model (first call compiles)
    warm_start_t: int = 0  # > 0: 1 NFE at the last step, its x0 noised to this step, the rest of nfe from there
    backend: str = "pytorch"  # where the network runs: pytorch, or openvino on the CPU (guided_diffusion.backends)

    @classmethod
    def _upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        return _renamed(cls.__name__, data, "steps", "nfe", "network evaluations per volume")

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"SampleConfig: sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.nfe < 0 or self.eta < 0 or self.warm_start_t < 0:
            raise ConfigError(f"SampleConfig: need nfe >= 0 and eta >= 0: {self}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"SampleConfig: precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"SampleConfig: backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.compile and self.backend != "pytorch":
            raise ConfigError(f"SampleConfig: compile is torch.compile, for backend 'pytorch' only (got backend "
                              f"{self.backend!r})")


TRAIN_TIMESTEP_KINDS: tuple[str, ...] = ("uniform", "last", "last_mass", "sampled")


def parse_train_timesteps(spec: str) -> tuple[str, float]:
    """``TrainConfig.train_timesteps`` -> (kind, p): the distribution training draws t from.

    ``"uniform"``: every step of the schedule equally likely (cWDM, the default);
    ``"last"``: only the last step T - 1 (x_T is pure noise: regression of E[x0 | cond], variant R);
    ``"last_mass:<p>"``: uniform, plus extra probability p in (0, 1] at T - 1 (variant Ctrl);
    ``"sampled"``: uniform over the steps the sampler will visit (FATS v2, stored in the FATS state).
    p is 0 except for ``last_mass``.
    """
    kind, _, value = str(spec).partition(":")
    if kind not in TRAIN_TIMESTEP_KINDS or bool(value) != (kind == "last_mass"):
        raise ConfigError(f"TrainConfig: train_timesteps must be 'uniform', 'last', 'last_mass:<p>' or 'sampled', "
                          f"got {spec!r}")
    if kind != "last_mass":
        return kind, 0.0
    try:
        p = float(value)
    except ValueError:
        raise ConfigError(f"TrainConfig: train_timesteps {spec!r}: {value!r} is not a number") from None
    if not 0.0 < p <= 1.0:
        raise ConfigError(f"TrainConfig: train_timesteps {spec!r}: the extra mass must be in (0, 1]")
    return kind, p
