"""Checkpoints: atomic save, safe load (never unpickles code), cWDM weights, safetensors, hub.

A Fast-cWDM checkpoint is a ``torch.save`` dict of tensors and plain types only (loadable
with ``weights_only=True``)::

    {"format": "fast-cwdm/1", "model": state_dict, "ema": state_dict | None,
     "optimizer": state_dict | None, "step": int, "config": {"model": ..., "diffusion": ...,
     "train": ...}, "schedule": NoiseSchedule.state_dict(), "extra": {...}}

cWDM's published checkpoints are bare UNet state dicts; :func:`load_model` recognises them and
infers the model configuration from the tensor shapes (with cWDM's linear 1000-step schedule).
"""
from __future__ import annotations

import json
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .conditioning import network_in_channels
from .config import ConfigError, DiffusionConfig, ModelConfig, SampleConfig
from .constants import ALL_TARGET, MODALITIES
from .factory import build_model, build_schedule
from .fats import FatsState
from .fileio import atomic_write, save_json
from .schedules import NoiseSchedule

logger = logging.getLogger(__name__)

FORMAT = "fast-cwdm/1"
MAX_SCHEDULE_STEPS = 100_000  # a stored num_train_steps above this is a corrupt or hostile config
CWDM_NUM_GROUPS = 32  # GroupNorm groups of cWDM's published models (not recoverable from shapes)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit; the message names the file and the problem."""


class ModelKindError(CheckpointError):
    """An all-modality model where a single-modality one is expected, or the reverse."""


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> Path:
    """Atomically save a checkpoint dict and write its resolved config as JSON next to it."""
    checkpoint = {"format": FORMAT, **checkpoint}
    path = atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))
    save_json(checkpoint.get("config", {}), path.with_suffix(".json"))
    return path


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a ``.pt`` / ``.safetensors`` file without executing code.

    Raises CheckpointError naming the file for a missing or corrupt file and for one that
    carries pickled objects (which ``weights_only`` refuses to run).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        return _read_safetensors(path, map_location)
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to load: the file contains pickled Python objects, which could run code "
            f"(only tensors and plain types are accepted; details: {str(err).splitlines()[0]})") from None
    except Exception as err:  # zip errors, truncation, wrong format
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    return data


def export_safetensors(checkpoint: dict[str, Any], path: str | Path, use_ema: bool = True) -> Path:
    """Inference weights as .safetensors, the resolved config and schedule in the metadata."""
    from safetensors.torch import save_file

    weights = checkpoint["ema"] if use_ema and checkpoint.get("ema") else checkpoint["model"]
    tensors = {k: v.contiguous() for k, v in weights.items()}
    meta = {"format": FORMAT, "config": json.dumps(checkpoint.get("config", {})), "step": str(checkpoint.get("step", 0))}
    if "schedule" in checkpoint:
        meta["schedule"] = json.dumps({k: (v.tolist() if torch.is_tensor(v) else v)
                                       for k, v in checkpoint["schedule"].items()})
    if "extra" in checkpoint:
        meta["extra"] = json.dumps(checkpoint["extra"])
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _read_safetensors(path: Path, map_location) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as fh:
            meta = fh.metadata() or {}
            weights = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    if meta.get("format") != FORMAT:
        return weights  # a bare state dict (e.g. cWDM weights converted to safetensors)
    out: dict[str, Any] = {"format": FORMAT, "model": weights, "ema": None, "step": int(meta.get("step", 0)),
                           "config": json.loads(meta["config"]), "extra": json.loads(meta.get("extra", "{}"))}
    if "schedule" in meta:
        sched = json.loads(meta["schedule"])
        out["schedule"] = {k: (torch.tensor(v, dtype=torch.float64) if isinstance(v, list) else v)
                           for k, v in sched.items()}
    return out


def is_bare_state_dict(data: dict[str, Any]) -> bool:
    return "format" not in data and all(torch.is_tensor(v) for v in data.values())


def infer_cwdm_model_config(state: dict[str, torch.Tensor], num_groups: int = CWDM_NUM_GROUPS) -> ModelConfig:
    """Recover the UNet configuration of a bare cWDM state dict from its parameter shapes."""
    try:
        ch = state["time_embed.0.weight"].shape[1]
        in_ch = state["input_blocks.0.0.weight"].shape[1]
        out_ch = state["out.2.weight"].shape[0]
    except KeyError as err:
        raise CheckpointError(f"not a cWDM UNet state dict (missing {err})") from None
    n_out = len({k.split(".")[1] for k in state if k.startswith("output_blocks.")})
    group_problem = ""
    for n_res in range(1, 5):
        if n_out % (n_res + 1):
            continue
        levels = n_out // (n_res + 1)
        try:
            mult = tuple(state[f"input_blocks.{1 + lvl * (n_res + 1)}.0.in_layers.2.weight"].shape[0] // ch
                         for lvl in range(levels))
            cfg = ModelConfig(num_channels=ch, channel_mult=mult, num_res_blocks=n_res,
                              num_groups=num_groups, in_channels=in_ch, out_channels=out_ch)
        except KeyError:
            continue
        except ValueError as err:  # e.g. widths not divisible by the assumed GroupNorm group count
            group_problem = group_problem or (
                f"; {err} (assumed {num_groups} GroupNorm groups, as in cWDM's published models: state the "
                "arguments the weights were trained with, num_groups included, in --cwdm_args FILE or a "
                "<weights>.json beside them)")
            continue
        if parameter_shapes(cfg) == {k: tuple(v.shape) for k, v in state.items()}:
            return cfg
    raise CheckpointError(f"state dict does not match any cWDM UNet layout (1-4 res blocks per level){group_problem}")


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


def read_cwdm_args(path: str | Path) -> dict[str, Any]:
    """cWDM's training arguments from a JSON file (a dict of its argparse names and values)."""
    path = Path(path)
    try:
        args = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read cWDM's training arguments ({err})") from None
    if not isinstance(args, dict):
        raise CheckpointError(f"{path}: expected a JSON object of cWDM's training arguments")
    return args


def cwdm_model_config(state: dict[str, torch.Tensor], path: Path,
                      cwdm_args: dict[str, Any] | None = None) -> tuple[ModelConfig, str]:
    """The configuration of bare cWDM weights and how it is known (stored as ``config_origin``).

    Stated: ``cwdm_args`` (the ``--cwdm_args`` flag) or ``<weights>.json`` beside the weights,
    cWDM's training arguments (:func:`model_config_from_cwdm_args`). Otherwise inferred from the
    shapes (:func:`infer_cwdm_model_config`) with the GroupNorm group count, which the shapes do
    not hold, assumed to be :data:`CWDM_NUM_GROUPS`; that assumption is logged, never silent.
    """
    where = "--cwdm_args"
    if cwdm_args is None and path.with_suffix(".json").is_file():
        where = str(path.with_suffix(".json"))
        cwdm_args = read_cwdm_args(where)
    if cwdm_args is None:
        cfg = infer_cwdm_model_config(state)
        logger.warning("%s: cWDM weights without their training arguments: configuration inferred from the shapes, "
                       "GroupNorm groups assumed to be %d (cWDM's published models); if they were trained with "
                       "another count, pass --cwdm_args FILE (or put <weights>.json beside them)", path, cfg.num_groups)
        return cfg, f"inferred from the weight shapes, num_groups={cfg.num_groups} assumed"
    for key, supported in (("diffusion_steps", 1000), ("noise_schedule", "linear"), ("predict_xstart", True)):
        if cwdm_args.get(key, supported) != supported:
            raise CheckpointError(f"trained with {key}={cwdm_args[key]!r} ({where}); only cWDM's "
                                  f"{key}={supported!r} is supported")
    try:
        cfg = model_config_from_cwdm_args(cwdm_args)
    except (ConfigError, ValueError, TypeError) as err:
        raise CheckpointError(f"cWDM training arguments from {where} do not describe a model here ({err})") \
            from None
    return cfg, f"stated ({where})"


def describe_config_difference(expected: dict, found: dict) -> list[str]:
    """Human-readable differences between two config dicts (``key: expected -> found``)."""
    keys = sorted(set(expected) | set(found))
    return [f"{k}: {expected.get(k, '<absent>')!r} -> {found.get(k, '<absent>')!r}"
            for k in keys if expected.get(k) != found.get(k)]


@dataclass
class LoadedModel:
    """A model ready for sampling, with everything that was stored beside it."""

    model: torch.nn.Module
    model_config: ModelConfig
    diffusion_config: DiffusionConfig
    schedule: NoiseSchedule
    source: str
    step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    target_modality: str | None = None  # the modality it was trained to synthesise (None: unknown, e.g. cWDM;
    # ALL_TARGET: an all-modality model)

    @property
    def all_modality(self) -> bool:
        """One network for every modality (the target as a label, four conditioning slots);
        :func:`check_all_modality` made sure that the config, the target and ``extra`` agree."""
        return self.model_config.num_modality_labels > 0

    @property
    def fats_state(self) -> FatsState | None:
        """The FATS state stored in ``extra`` (statistics, shifts, learned timesteps), if any."""
        return FatsState.from_extra(self.extra)


def load_model(path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True,
               expected_model_config: ModelConfig | None = None,
               cwdm_args: dict[str, Any] | None = None) -> LoadedModel:
    """Build the model a checkpoint describes and load its weights (EMA when present).

    Accepts Fast-cWDM checkpoints (.pt or .safetensors) and cWDM's bare state dicts (their
    configuration from ``cwdm_args``, cWDM's training arguments, else as :func:`cwdm_model_config`
    says). With ``expected_model_config``, refuses a checkpoint whose config differs and says what
    differs.
    """
    path = Path(path)
    data = read_checkpoint(path)
    if is_bare_state_dict(data):
        try:
            model_cfg, config_origin = cwdm_model_config(data, path, cwdm_args)
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from None
        diff_cfg, weights, step, schedule = DiffusionConfig(), data, 0, None
        extra = {"origin": "cwdm", "config_origin": config_origin}
        target = None
    elif data.get("format") == FORMAT:
        try:
            model_cfg = ModelConfig.from_dict(data["config"]["model"])
            diff_cfg = DiffusionConfig.from_dict(data["config"]["diffusion"])
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{path}: invalid or missing config in checkpoint ({err})") from None
        try:
            weights = data["ema"] if use_ema and data.get("ema") else data["model"]
            step, extra = int(data.get("step", 0)), dict(data.get("extra") or {})
            target = (data["config"].get("train") or {}).get("target_modality")
            # a flow's path is a function of its config (factory.build_schedule); a schedule is stored
            stored = "schedule" in data and diff_cfg.kind != "flow"
            schedule = NoiseSchedule.from_state_dict(data["schedule"]) if stored else None
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{path}: malformed checkpoint field ({type(err).__name__}: {err})") from None
    else:
        raise CheckpointError(f"{path}: unknown checkpoint format {data.get('format')!r}")
    if expected_model_config is not None and expected_model_config != model_cfg:
        diff = describe_config_difference(expected_model_config.to_dict(), model_cfg.to_dict())
        raise CheckpointError(f"{path}: model config differs from the expected one: " + "; ".join(diff))
    if diff_cfg.num_train_steps > MAX_SCHEDULE_STEPS:
        raise CheckpointError(f"{path}: diffusion config asks for num_train_steps={diff_cfg.num_train_steps} "
                              f"(more than {MAX_SCHEDULE_STEPS}); refusing to build that schedule")
    check_all_modality(path, model_cfg, target, extra)
    check_weights_fit(path, model_cfg, weights)
    schedule = schedule or build_schedule(diff_cfg)
    if (diff_cfg.prediction == "v") != (getattr(schedule, "sigma_data", None) is not None):
        raise CheckpointError(f"{path}: the config says prediction {diff_cfg.prediction!r} but the stored schedule "
                              f"{'has no' if diff_cfg.prediction == 'v' else 'has a'} preconditioning (sigma_data); "
                              "the checkpoint is inconsistent")
    check_stored_settings(path, extra, schedule.num_steps)
    model = build_model(model_cfg)  # materialised only now that every weight is known to fit
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the model ({str(err).splitlines()[0]} ...)") from None
    model.to(device).eval()
    return LoadedModel(model, model_cfg, diff_cfg, schedule, str(path), step, extra, target)


def all_modality_extra() -> dict[str, Any]:
    """What an all-modality checkpoint stores in ``extra``: its label -> modality mapping
    (``modality_labels``, the label being the index), read back by :func:`check_all_modality`."""
    return {"modality_labels": list(MODALITIES)}


def check_all_modality(path: str | Path, model_cfg: ModelConfig, target: str | None, extra: dict) -> None:
    """An all-modality checkpoint says so three times, and they must agree: the model config
    (``num_modality_labels`` = 4 and the four-slot input, ``in_channels`` 40), the trained target
    (``ALL_TARGET``) and ``extra["modality_labels"]`` (the labels' modalities, ``MODALITIES``).
    A single-modality checkpoint has none of them."""
    labelled = model_cfg.num_modality_labels > 0
    if not labelled and target != ALL_TARGET and "modality_labels" not in extra:
        return
    problems = []
    if model_cfg.num_modality_labels != len(MODALITIES):
        problems.append(f"num_modality_labels={model_cfg.num_modality_labels} (an all-modality model has "
                        f"{len(MODALITIES)})")
    if labelled and model_cfg.in_channels != network_in_channels(True, model_cfg.out_channels):
        problems.append(f"in_channels={model_cfg.in_channels} (the four-slot input has "
                        f"{network_in_channels(True, model_cfg.out_channels)})")
    if target != ALL_TARGET:
        problems.append(f"trained target {target!r} (an all-modality model's is {ALL_TARGET!r})")
    if extra.get("modality_labels") != list(MODALITIES):
        problems.append(f"modality_labels={extra.get('modality_labels')!r} (expected {list(MODALITIES)})")
    if problems:
        raise CheckpointError(f"{path}: inconsistent all-modality checkpoint: " + "; ".join(problems))


def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every weight of the UNet ``cfg`` describes, built on the meta device (no
    memory is allocated, whatever size the config asks for)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}


def check_weights_fit(path: str | Path, model_cfg: ModelConfig, weights: Any) -> None:
    """Build the model on the meta device (no memory) and compare every parameter's shape with the
    stored weights, so that a small file whose config asks for a huge model allocates nothing."""
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        raise CheckpointError(f"{path}: the stored weights are not a dict of tensors")
    try:
        expected = parameter_shapes(model_cfg)
    except (ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: its model config cannot be built ({err})") from None
    found = {k: tuple(v.shape) for k, v in weights.items()}
    if expected == found:
        return
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    wrong = [f"{k}: stored {found[k]}, config {expected[k]}" for k in expected if k in found and found[k] != expected[k]]
    parts = ([f"{len(wrong)} shapes differ (first {wrong[0]})"] if wrong else []) + \
            ([f"{len(missing)} missing (first {missing[0]})"] if missing else []) + \
            ([f"{len(unexpected)} unexpected (first {unexpected[0]})"] if unexpected else [])
    raise CheckpointError(f"{path}: weights do not fit the model its config describes: " + "; ".join(parts))


def check_stored_settings(path: str | Path, extra: dict, num_steps: int) -> None:
    """Validate what a checkpoint stores beside the weights: the sampling settings (sampler name,
    NFE ...) and the FATS state (its learned timesteps must be valid indices of the schedule)."""
    try:
        SampleConfig.from_dict(extra.get("sample") or {})
        state = FatsState.from_extra(extra)
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: malformed metadata in extra ({type(err).__name__}: {err})") from None
    if state is None:
        return
    for nfe, entry in state.learned.items():
        steps = list(entry.timesteps)
        if any(not 0 <= t < num_steps for t in steps) or any(a <= b for a, b in zip(steps, steps[1:])):
            raise CheckpointError(f"{path}: learned timesteps for NFE={nfe} {steps} are not strictly decreasing "
                                  f"indices in [0, {num_steps}) of its schedule")


HUB_PREFIX = "hf://"


def resolve_model_source(source: str, cache_dir: str | Path | None = None) -> Path:
    """A local checkpoint path, or ``hf://<org>/<repo>/<filename>[@revision]`` fetched through
    huggingface_hub (its cache; ``HF_HUB_OFFLINE=1`` respected). Returns a local file path."""
    if not source.startswith(HUB_PREFIX):
        path = Path(source).expanduser()
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint not found")
        return path
    spec = source[len(HUB_PREFIX):]
    spec, _, revision = spec.partition("@")
    parts = spec.split("/")
    if len(parts) < 3:
        raise CheckpointError(f"{source}: expected hf://<org>/<repo>/<filename>[@revision]")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision or None,
                                    cache_dir=str(cache_dir) if cache_dir else None))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{source}: not in the local Hugging Face cache and the hub cannot be reached "
            f"(offline: HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}); download it on a "
            "connected machine or pass a local checkpoint path") from None
    except Exception as err:
        raise CheckpointError(f"{source}: download failed ({type(err).__name__}: {err})") from None


def check_resume(path: str | Path, data: dict[str, Any], model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig,
                 target: str) -> None:
    """Refuse to resume a run from a checkpoint whose weights mean something else: another target
    modality, another noise schedule (kind, length, betas, FATS shifts ...) or another network.
    The message names the checkpoint, what differs, and both values (checkpoint -> this run)."""
    config = data.get("config") if isinstance(data, dict) else None
    if not isinstance(config, dict) or "model" not in config:
        raise CheckpointError(f"{path}: not a Fast-cWDM training checkpoint (no config)")
    problems = []
    stored_target = (config.get("train") or {}).get("target_modality")
    if stored_target != target:
        problems.append(f"target modality: {stored_target!r} -> {target!r}")
    try:
        stored_model = ModelConfig.from_dict(config["model"]).to_dict()
        stored_diffusion = DiffusionConfig.from_dict(config.get("diffusion") or {}).to_dict()
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: invalid config in checkpoint ({err})") from None
    problems += [f"diffusion {d}" for d in describe_config_difference(stored_diffusion, diffusion_cfg.to_dict())]
    problems += [f"model {d}" for d in describe_config_difference(stored_model, model_cfg.to_dict())]
    if problems:
        raise CheckpointError(f"{path}: cannot resume this run from it, it was trained differently "
                              f"(checkpoint -> this run): " + "; ".join(problems))
