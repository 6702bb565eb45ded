"""Typed, validated configs (one per concern), JSON round trip, and the model/schedule factory."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEDULE_KINDS = ("linear", "cosine", "fast_direct", "fast_sampled", "fats")


class ConfigError(ValueError):
    """A configuration value is invalid."""


class _JsonConfig:
    """Mixin: ``to_dict`` / ``from_dict`` / ``to_json`` / ``from_json`` with unknown-key checks."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
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

    kind: ``linear`` (cWDM, ``steps`` = 1000), ``cosine``, ``fast_direct`` (the linear
    schedule rescaled to ``steps``), ``fast_sampled`` (``steps`` + 1 points of the 1000-step
    linear curve, Fast-DDPM's uniform choice, including t = 0), ``fats`` (per-band shifts).
    """

    kind: str = "linear"
    steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    n_bands: int = 8
    clip_denoised: bool = True  # cWDM's IDWT -> clamp [0, 1] -> DWT of every x0 prediction
    band_shifts: tuple[float, ...] = field(default_factory=tuple)  # FATS log-SNR shifts, one per band
    max_shift: float = 4.0

    def __post_init__(self):
        if self.kind not in SCHEDULE_KINDS:
            raise ConfigError(f"DiffusionConfig: kind must be one of {SCHEDULE_KINDS}, got {self.kind!r}")
        if self.steps < 1:
            raise ConfigError(f"DiffusionConfig: steps must be >= 1, got {self.steps}")
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


def save_json(obj: dict[str, Any], path: str | Path) -> None:
    """Write a JSON file atomically (temporary file in the same folder, then rename)."""
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_model(cfg: ModelConfig):
    """The UNet for a model config."""
    from .unet import UNet3D

    return UNet3D(cfg)


def build_schedule(cfg: DiffusionConfig):
    """The noise schedule object for a diffusion config."""
    from .schedules import schedule_from_config

    return schedule_from_config(cfg)


def model_config_from_cwdm_args(args: dict[str, Any]) -> ModelConfig:
    """Translate cWDM's argparse model arguments (its ``model_and_diffusion_defaults``) into a
    :class:`ModelConfig`. Parameter names need no conversion: :class:`UNet3D` keeps cWDM's.

    Refuses the cWDM options this UNet does not implement instead of silently ignoring them.
    """
    unsupported = {
        "attention_resolutions": "", "use_scale_shift_norm": False, "resblock_updown": True, "dims": 3,
        "bottleneck_attention": False, "additive_skips": False, "use_freq": False, "class_cond": False,
        "learn_sigma": False,
    }
    for key, supported in unsupported.items():
        if key in args and args[key] != supported:
            raise ConfigError(f"cWDM option {key}={args[key]!r} is not supported (only {supported!r})")
    mult = args.get("channel_mult", "1,2,2,4,4")
    mult = tuple(int(m) for m in mult.split(",")) if isinstance(mult, str) else tuple(mult)
    return ModelConfig(
        num_channels=int(args.get("num_channels", 64)), channel_mult=mult,
        num_res_blocks=int(args.get("num_res_blocks", 2)), num_groups=int(args.get("num_groups", 32)),
        in_channels=int(args.get("in_channels", 32)), out_channels=int(args.get("out_channels", 8)),
        dropout=float(args.get("dropout", 0.0)), use_checkpoint=bool(args.get("use_checkpoint", False)),
    )
