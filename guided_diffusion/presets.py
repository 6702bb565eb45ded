"""Presets: the one place where each named model's hyperparameters are chosen.

``run.sh --preset NAME`` and ``scripts/train.py --preset NAME`` pick one by name; command-line
flags of the scripts override fields.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .conditioning import network_in_channels
from .config import DiffusionConfig, ModelConfig, SampleConfig, TrainConfig
from .constants import MODALITIES


@dataclass(frozen=True)
class Preset:
    model: ModelConfig
    diffusion: DiffusionConfig
    train: TrainConfig
    sample: SampleConfig
    description: str


FULL_TRAIN = TrainConfig(lr=1e-5, batch_size=1, max_steps=400_000, save_interval=5_000, val_interval=5_000)
"""Training of the full-size presets (cWDM's AdamW settings); only ``unet`` trains longer."""
DEMO_MODEL = ModelConfig(num_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, num_groups=8)
TINY_MODEL = ModelConfig(num_channels=8, channel_mult=(1, 2), num_res_blocks=1, num_groups=4)  # inputs divisible by 4
DEMO_TRAIN = TrainConfig(lr=5e-4, batch_size=2, max_steps=1_500, save_interval=500, log_interval=50, val_interval=500,
                         val_cases=2, image_interval=500, ema_rate=0.99, num_workers=1)
WFM_SOURCE_NOISE = 0.5  # sigma_src of the noisy-start flow presets (docs/flow_matching.md: a first choice, untuned)
ALL_MODALITY = dict(in_channels=network_in_channels(True), num_modality_labels=len(MODALITIES))
"""An all-modality network (docs/all_modality.md): four conditioning slots (40 input channels), the
target as a label. Its presets train ``len(MODALITIES)`` times the steps of the single-modality one
they replace: one model, the training budget of the four it replaces."""
CTRL_LAST_MASS = 0.1
"""Ctrl's extra probability at the last step: about the share Fast-DDPM's 10 sampled steps give it
(1 of 11), the weight v1's better models put where x_t carries no information."""
FATS2_SNR_GAMMA = 5.0  # Hang et al. 2023's gamma for the per-band min-SNR weights (diffusion.snr_weights)
WFM_SOURCE_NOISE = 0.5  # sigma_src of the noisy-start flow presets (docs/flow_matching.md: a first choice, untuned)
DEMO_SIZE = 0.25  # demo volumes: BraTS geometry scaled by 1/4 -> (60, 60, 39) files, (56, 56, 40) network grid

PRESETS: dict[str, Preset] = {
    "unet": Preset(
        ModelConfig(), DiffusionConfig(kind="linear", num_train_steps=1000),
        replace(FULL_TRAIN, max_steps=1_200_000),
        SampleConfig(sampler="ddpm", nfe=0),
        "cWDM: 64 channels, mult 1,2,2,4,4, two res blocks, linear 1000-step schedule, 1000-step DDPM sampling"),
    "fast": Preset(
        ModelConfig(), DiffusionConfig(kind="fast_sampled", fast_intervals=10),
        FULL_TRAIN,
        SampleConfig(sampler="ddpm", nfe=0),
        "Fast-cWDM: cWDM's network trained and sampled on 10 steps of the linear curve (11 evaluations)"),
    "fats": Preset(
        ModelConfig(), DiffusionConfig(kind="fats", num_train_steps=1000),
        FULL_TRAIN,
        SampleConfig(sampler="ddim", nfe=4),
        "FATS: per-band log-SNR shifts from wavelet energy statistics, learned 4-step sampling schedule"),
    "demo": Preset(
        DEMO_MODEL, DiffusionConfig(kind="fast_sampled", fast_intervals=10),
        DEMO_TRAIN,
        SampleConfig(sampler="ddpm", nfe=0),
        "a small network on the reduced-size demo data (trains on a 2-core CPU in minutes)"),
    "demo_fats": Preset(
        DEMO_MODEL, DiffusionConfig(kind="fats", num_train_steps=1000),
        DEMO_TRAIN,
        SampleConfig(sampler="ddim", nfe=4),
        "the demo network with FATS schedules and learned 4-step sampling (CPU)"),
    "demo_cwdm": Preset(
        DEMO_MODEL, DiffusionConfig(kind="linear", num_train_steps=1000),
        DEMO_TRAIN,
        SampleConfig(sampler="ddpm", nfe=0),
        "the demo network on cWDM's linear 1000-step schedule, 1000-step DDPM sampling (benchmark v2's C)"),
    "demo_fats10": Preset(
        DEMO_MODEL, DiffusionConfig(kind="fats", num_train_steps=10),
        DEMO_TRAIN,
        SampleConfig(sampler="ddim", nfe=4),
        "FATS shifts on the 10-step linear schedule (Fast-cWDM direct): trained on the steps it samples, "
        "learned 4-step sampling (benchmark v2's S10)"),
    "wfm": Preset(
        ModelConfig(), DiffusionConfig(kind="flow", num_train_steps=1000),
        FULL_TRAIN,
        SampleConfig(sampler="euler", nfe=1),
        "WFM-style flow matching from the mean of the conditions (deterministic start), 1 Euler step"),
    "wfm_noisy": Preset(
        ModelConfig(), DiffusionConfig(kind="flow", num_train_steps=1000, source_noise=WFM_SOURCE_NOISE),
        FULL_TRAIN,
        SampleConfig(sampler="euler", nfe=2),
        f"flow matching from the mean of the conditions plus {WFM_SOURCE_NOISE:g} x Gaussian noise (a sampler), "
        "2 Euler steps"),
    "demo_wfm": Preset(
        DEMO_MODEL, DiffusionConfig(kind="flow", num_train_steps=1000),
        DEMO_TRAIN,
        SampleConfig(sampler="euler", nfe=1),
        "the demo network with WFM-style flow matching from the condition mean, 1 Euler step (CPU)"),
    "demo_wfm_noisy": Preset(
        DEMO_MODEL, DiffusionConfig(kind="flow", num_train_steps=1000, source_noise=WFM_SOURCE_NOISE),
        DEMO_TRAIN,
        SampleConfig(sampler="euler", nfe=2),
        "the demo network with flow matching from the condition mean plus noise, 2 Euler steps (CPU)"),
    "fats_all": Preset(
        replace(ModelConfig(), **ALL_MODALITY), DiffusionConfig(kind="fats", num_train_steps=1000),
        replace(FULL_TRAIN, max_steps=len(MODALITIES) * FULL_TRAIN.max_steps),
        SampleConfig(sampler="ddim", nfe=4),
        "FATS with ONE network for all four modalities (target as a label; shifts from energy pooled over "
        "the modalities); train with --target all"),
    "demo_all": Preset(
        replace(DEMO_MODEL, **ALL_MODALITY), DiffusionConfig(kind="fast_sampled", fast_intervals=10),
        replace(DEMO_TRAIN, max_steps=len(MODALITIES) * DEMO_TRAIN.max_steps),
        SampleConfig(sampler="ddpm", nfe=0),
        "the demo network as ONE model for all four modalities (target as a label); train with --target all"),
    # Benchmark v2 variants (../shared/design/BENCHMARK_V2.md, docs/fats_v2.md). P is not a preset: it is
    # a sampling setting of any model trained on every t, e.g. --sampler ddim --warm_start_t 3 --nfe 3.
    "regression": Preset(
        ModelConfig(), DiffusionConfig(kind="linear", num_train_steps=1000),
        replace(FULL_TRAIN, max_steps=1_200_000, train_timesteps="last"),
        SampleConfig(sampler="ddim", nfe=1),
        "R: cWDM's network trained only at the last step (x_T pure noise: regression of E[x0 | cond]), 1 NFE"),
    "demo_regression": Preset(
        DEMO_MODEL, DiffusionConfig(kind="linear", num_train_steps=1000),
        replace(DEMO_TRAIN, train_timesteps="last"),
        SampleConfig(sampler="ddim", nfe=1),
        "R on the demo network: trained only at the last step, sampled with 1 NFE (CPU)"),
    "ctrl": Preset(
        ModelConfig(), DiffusionConfig(kind="linear", num_train_steps=1000),
        replace(FULL_TRAIN, max_steps=1_200_000, train_timesteps=f"last_mass:{CTRL_LAST_MASS}"),
        SampleConfig(sampler="ddpm", nfe=0),
        "Ctrl: cWDM (linear 1000, as preset unet) with extra training probability at the last step"),
    "demo_ctrl": Preset(
        DEMO_MODEL, DiffusionConfig(kind="linear", num_train_steps=1000),
        replace(DEMO_TRAIN, train_timesteps=f"last_mass:{CTRL_LAST_MASS}"),
        SampleConfig(sampler="ddim", nfe=10),
        "Ctrl on the demo network: linear 1000 with extra training probability at the last step; DDIM 10"),
    "fats2": Preset(
        ModelConfig(), DiffusionConfig(kind="fats", num_train_steps=1000),
        replace(FULL_TRAIN, train_timesteps="sampled", min_snr_gamma=FATS2_SNR_GAMMA),
        SampleConfig(sampler="ddim", nfe=4),
        "FATS v2: residual-energy shifts, per-band warm start, trained on its 4 sampling steps with min-SNR "
        "band weights; train with --residual_from <regression checkpoint>"),
    "demo_fats2": Preset(
        DEMO_MODEL, DiffusionConfig(kind="fats", num_train_steps=1000),
        replace(DEMO_TRAIN, train_timesteps="sampled", min_snr_gamma=FATS2_SNR_GAMMA),
        SampleConfig(sampler="ddim", nfe=4),
        "FATS v2 on the demo network (CPU); train with --residual_from <demo_regression checkpoint>"),
    "tiny": Preset(
        TINY_MODEL, DiffusionConfig(kind="fast_sampled", fast_intervals=10),
        TrainConfig(lr=5e-4, batch_size=1, max_steps=20, save_interval=10, log_interval=1, val_interval=0,
                    val_cases=0, image_interval=0, ema_rate=0.9, num_workers=0),
        SampleConfig(sampler="ddim", nfe=2),
        "a minimal network for tests and smoke runs on tiny volumes, e.g. Geometry.scaled(18 / 240) (seconds)"),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
