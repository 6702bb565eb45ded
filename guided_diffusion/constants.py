"""The project's vocabularies, defined once (layer 0: imports nothing from the package).

Configs validate against these names; the modules that implement them (the schedule registry
in :mod:`guided_diffusion.factory`, the sampler registry in :mod:`guided_diffusion.samplers`)
register exactly these names, which ``tests/test_layering.py`` checks. The subband names
live with the wavelet transform (``DWT_IDWT.BAND_NAMES``).
"""
from __future__ import annotations

MODALITIES: tuple[str, ...] = ("t1n", "t1c", "t2w", "t2f")
"""BraTS 2023 modalities: native T1, contrast-enhanced T1, T2-weighted, T2-FLAIR. Every case
tensor holds them in this order along its channel axis."""

ALL_TARGET = "all"
"""The target of an all-modality model: one network that synthesises any of ``MODALITIES``, told
which by a class label (its index in ``MODALITIES``); see ``conditioning.split_case_all``."""

PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
"""Network precisions: float32, or bfloat16 autocast of the network (the denoiser decides)."""

BACKENDS: tuple[str, ...] = ("pytorch", "openvino")
"""Where the network runs at inference (``guided_diffusion.backends``): PyTorch, or OpenVINO on the
CPU (the ``openvino`` extra)."""

SAMPLERS: tuple[str, ...] = ("ddpm", "ddim", "euler")
"""Sampler names (ancestral DDPM, DDIM with eta; Euler integration of a flow, kind ``flow`` only)."""

SCHEDULE_KINDS: tuple[str, ...] = ("linear", "cosine", "fast_direct", "fast_sampled", "fats", "flow")
"""Noise schedule kinds a ``DiffusionConfig`` may name (built by ``factory.build_schedule``); ``flow`` is
flow matching from the mean of the conditions (``flow.FlowPath``, docs/flow_matching.md)."""

FLOW_SOURCES: tuple[str, ...] = ("cond_mean",)
"""Where a flow starts (``DiffusionConfig.flow_source``): ``cond_mean``, the mean of the conditioning
modalities' subbands (``flow.cond_mean_source``)."""

PREDICTIONS: tuple[str, ...] = ("x0", "v")
"""What the network's output means (``DiffusionConfig.prediction``): ``x0`` the clean subbands
(cWDM's ``predict_xstart``; published weights), ``v`` the preconditioned output of
``schedules.NoiseSchedule.preconditioning`` (v-prediction, per band; docs/prediction.md)."""

FATS_BASES: tuple[str, ...] = ("linear", "cosine")
"""Base log-SNR curves a FATS schedule shifts per band."""

REFERENCE_STEPS = 1000
"""Length of DDPM's / cWDM's linear schedule; the time scale the network's embedding is trained on."""
