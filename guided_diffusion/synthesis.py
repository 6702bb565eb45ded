"""Volume-level synthesis: a case's conditioning volumes in, the missing modality out.

This ties the layers together (see the README's data flow): network-grid volumes ->
conditioning subbands -> sampler with the model's schedule -> IDWT -> [0, 1] volume.
"""
from __future__ import annotations

import weakref
from functools import partial
from typing import Callable, Sequence

import torch

from DWT_IDWT import clip_in_image_space, from_subbands, to_subbands

from .backends import inference_network
from .checkpoints import LoadedModel
from .conditioning import model_inputs
from .config import SampleConfig
from .diffusion import make_denoiser, randn
from .flow import FlowPath
from .samplers import check_sampler_fits, get_sampler, warm_start_sample
from .schedules import NoiseSchedule
from .seeding import case_generator, sample_generator
from .timesteps import plan_timesteps


_COMPILED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def compile_once(model: torch.nn.Module) -> None:
    """``model.compile()`` (torch.compile of its forward, in place), once per model object.
    The first evaluation compiles (tens of seconds for the full UNet); the compiled bf16 network is
    about 2.6x faster per evaluation on an H100 (``benchmarks/results/gpu_suite.json``)."""
    if model not in _COMPILED:
        model.compile()
        _COMPILED.add(model)


@torch.no_grad()
def synthesize_volumes(model: torch.nn.Module, schedule: NoiseSchedule, volumes: torch.Tensor, target: str,
                       cfg: SampleConfig, case_ids: Sequence[str], timesteps: Sequence[int],
                       callback: Callable[[dict], None] | None = None,
                       sample_indices: Sequence[int] | None = None) -> torch.Tensor:
    """The synthesis pipeline on tensors: conditioning DWT (once), x_T from each case's generator,
    the sampler ``cfg.sampler`` (with ``cfg.eta``, ``cfg.precision``, cWDM's clipping when
    ``cfg.clip_denoised``) over ``timesteps``, IDWT, clamp to [0, 1]. The network runs where
    ``cfg.backend`` says (``guided_diffusion.backends``: PyTorch, or OpenVINO on the CPU).

    Args:
        model: the x0-predicting network, its device is where the work runs.
        volumes: (B, 4, X, Y, Z) network-grid volumes in MODALITIES order (the target channel is
            ignored and may be zero).
        case_ids: B ids; each case's noise comes from its own generator (``cfg.seed``, case id).
        timesteps: strictly decreasing schedule step indices (one network evaluation each).
        callback: the sampler's per-step callback, called for every case.
        sample_indices: B ensemble sample indices (``guided_diffusion.ensembles``): item i's noise
            is sample ``sample_indices[i]`` of its case (``seeding.sample_generator``; sample 0 is the
            case's own noise) and the whole batch goes through ONE sampler call.
    Returns:
        (B, X, Y, Z) float32 synthesis in [0, 1] on the network grid, on the model's device.

    The cases are sampled one at a time: batched kernels (oneDNN convolutions, GEMMs) round
    differently for different batch sizes, so only this makes a case's result independent of the
    batch it is in bit for bit (its noise already is). With ``sample_indices`` the batch is one
    sampler call, so a sample's bits depend on the batch size (reproducible for the same batch).
    """
    if len(case_ids) != volumes.shape[0]:
        raise ValueError(f"synthesize: {len(case_ids)} case ids for a batch of {volumes.shape[0]}")
    if sample_indices is not None and len(sample_indices) != len(case_ids):
        raise ValueError(f"synthesize: {len(sample_indices)} sample indices for {len(case_ids)} case ids")
    if volumes.shape[0] > 1 and sample_indices is None:
        return torch.cat([synthesize_volumes(model, schedule, volumes[i : i + 1], target, cfg, case_ids[i : i + 1],
                                             timesteps, callback) for i in range(volumes.shape[0])])
    device = next(model.parameters()).device
    # only the conditioning travels to the device; an all-modality model (its UNet3D config has labels)
    # gets the four-slot stack and the target's label (conditioning.model_inputs)
    all_modality = getattr(getattr(model, "cfg", None), "num_modality_labels", 0) > 0
    _, cond_volumes, label = model_inputs(volumes, target, all_modality)
    cond = to_subbands(cond_volumes.to(device).float())  # computed once, outside the sampling loop
    if cfg.compile:
        compile_once(model)
    # cfg.backend "openvino": the network converted once per weights (cached on disk), compiled per shape
    network = inference_network(model, cfg.backend, cfg.precision)
    denoiser = make_denoiser(network, schedule, cond, label=None if label is None else label.to(device),
                             precision=cfg.precision)
    # On a GPU the generators live there too (no host-to-device copy of noise per step): a case's
    # sample is reproducible for each device type, and the CPU's is the same as ever.
    generator_device = device if device.type == "cuda" else "cpu"
    generators = ([case_generator(cfg.seed, cid, generator_device) for cid in case_ids] if sample_indices is None else
                  [sample_generator(cfg.seed, cid, m, generator_device) for cid, m in zip(case_ids, sample_indices)])
    x_T = randn((volumes.shape[0], schedule.n_bands, *cond.shape[2:]), generators, device)
    check_sampler_fits(cfg.sampler, schedule)
    if isinstance(schedule, FlowPath):  # a flow starts at the condition mean (+ sigma_src x_T), not at noise
        x_T = schedule.start(cond, x_T)
    options = {"eta": cfg.eta} if cfg.sampler == "ddim" else {}
    sampler = get_sampler(cfg.sampler)
    if cfg.warm_start_t:  # the regression estimate at T - 1, noised to t* = timesteps[1], refined from there
        if list(timesteps[1:2]) != [cfg.warm_start_t]:
            raise ValueError(f"synthesize: warm_start_t={cfg.warm_start_t} needs timesteps [T - 1, "
                             f"{cfg.warm_start_t}, ...] (timesteps.plan_timesteps), got {list(timesteps)}")
        sampler = partial(warm_start_sample, sampler)
    x0 = sampler(denoiser, schedule, x_T, timesteps, generator=generators,
                 clip=clip_in_image_space if cfg.clip_denoised else None, callback=callback, **options)
    return from_subbands(x0).clamp(0.0, 1.0)[:, 0].float()


def synthesize(loaded: LoadedModel, volumes: torch.Tensor, target: str, cfg: SampleConfig,
               case_ids: Sequence[str], timesteps: Sequence[int] | None = None,
               callback: Callable[[dict], None] | None = None,
               sample_indices: Sequence[int] | None = None) -> torch.Tensor:
    """:func:`synthesize_volumes` with a loaded checkpoint's model and schedule; the timesteps are
    :func:`~guided_diffusion.timesteps.plan_timesteps` of ``cfg.nfe`` and the stored FATS state
    unless given. Returns (B, X, Y, Z) float32 in [0, 1] on the CPU."""
    if timesteps is None:
        timesteps, _ = plan_timesteps(loaded.schedule, loaded.fats_state, cfg.nfe, cfg.warm_start_t)
    return synthesize_volumes(loaded.model, loaded.schedule, volumes, target, cfg, case_ids, timesteps,
                              callback, sample_indices).cpu()
