"""Demo data v2: a conditional distribution with real uncertainty (docs/demo_data_v2.md).

Keeps v1's physics (``demo_data``: MNI anatomy, warp, tumour geometry, signal equations,
Rician noise) and splits each case's randomness in two:

* the **anatomy** (drawn once per case id): warp, tissue maps, tumour geometry, relaxation
  jitter, the shared part of the texture, the probability that the tumour enhances;
* one **modality latent** per sequence (drawn per ``draw`` index): its own texture, bias
  field, scanner scale and noise, and in T1c the enhancement (whether, where, how much) and
  the contrast-filled vessels, in FLAIR the CSF-inflow artefact.

Enhancing and non-enhancing solid tumour share T1/T2/PD, so only T1c tells them apart;
label 3 (ET) is taken from the T1c latent, as BraTS defines it. Re-drawing one modality's
latent with the others fixed gives an exact sample of p(target | the other three): the
oracle.

Layout written by ``make_demo_dataset_v2`` under ``out``:

* ``training/<case>-d<k>/``: anatomy ``<case>`` (``BraTS-DEMO-0xxxx-000``), draw ``k`` of every
  modality latent (``k < draws``), four modalities + seg; read by ``bratsloader`` unchanged.
* ``test/<case>/`` (held-out anatomies ``BraTS-DEMO-3xxxx-000``, draw 0): four modalities + seg,
  and ``oracle/<case>-<modality>-draw<n>.nii.gz`` for n = 1 .. oracle_draws: the modality's latent
  re-drawn (draw n), the other three exactly the case's files. ``bratsloader`` ignores ``oracle/``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy.special import expit, logit

from guided_diffusion.bratsloader import (
    ORACLE_FOLDER, CaseError, Geometry, normalize_intensity, to_network_grid, write_nifti,
)
from guided_diffusion.constants import MODALITIES
from guided_diffusion.demo_data import (
    CASE_ID, FLAIR_TE, FLAIR_TR, INT16_MAX, MAX_CASES_PER_SPLIT, RELAXATION_JITTER, SCANNER_RANGE, SPLIT_CODE,
    T1W_TE, T1W_TR, TISSUES, TRAIN, Template, Tissue, _check_output_dir, _image, _publish,
    flair, load_template, smooth_field, spin_echo, tissue_maps, tissue_signals, write_case,
)
from guided_diffusion.seeding import case_seed_words

logger = logging.getLogger(__name__)

TEST = "test"
TEST_SPLIT_CODE = 3  # test anatomies are BraTS-DEMO-3xxxx-000 (v1 uses 0, 1, 2)
DRAW_SUFFIX = "-d{}"  # training folder of draw k of an anatomy: <case>-d<k>
ORACLE_NAME = "{case}-{modality}-draw{n}.nii.gz"
ORACLE_PATTERN = r"{case}-{modality}-draw(\d+)\.nii\.gz"
ANATOMY_STREAM = 0  # SeedSequence words: [seed, crc32(case), stream, draw]; modality i is stream 1 + i

# T1c-only enhancement (label 3 = ET comes from it).
NON_ENHANCING_FRACTION = 0.2  # P(the tumour does not enhance) at the reference necrotic fraction
NECROSIS_REFERENCE = 0.2  # necrotic core / whole tumour volume at which that probability holds
NECROSIS_LOGIT_SLOPE = 8.0  # logit P(enhance) rises by this per unit necrotic fraction (weak: 0.62-0.93)
ENHANCE_CONTROL = 6  # control points per axis of the smooth field that decides where the shell enhances
ENHANCE_QUANTILE = (0.0, 0.7)  # the field is thresholded at a uniform quantile in this range (in the shell)
ENHANCE_EDGE = 0.15  # softness (field units) of the enhancing / non-enhancing border
PEAK_UPTAKE_MM = (0.1, 1.5)  # peak gadolinium concentration (mM), log-uniform

# T1c-only vessels (dura and surface vessels; CSF in the other sequences).
VESSEL_CONTROL = 8  # control points per axis of the field that places them
VESSEL_FRACTION = 0.5  # peak share of surface CSF taken by vessels (v1's 0.5)

# Mesoscale texture: exp(amplitude * field), field with power spectrum |k|^-TEXTURE_EXPONENT.
TEXTURE_EXPONENT = 2.5
TEXTURE_NORMAL = 0.03  # sd of the log signal in normal tissue
TEXTURE_TUMOUR = 0.12  # sd of the log signal in tumour and oedema
TEXTURE_SHARED = 0.5  # share of the field's variance common to all four sequences

# FLAIR CSF inflow: a share of the CSF escapes the inversion pulse and keeps its T2 signal.
INFLOW_CONTROL = 6  # control points per axis of the field that places the inflow
INFLOW_QUANTILE = 0.8  # inflow where the field exceeds this quantile (within the brain)
INFLOW_MAX = (0.05, 0.35)  # uniform peak share of uninverted CSF

# Acquisition, stronger than v1's (bias sd 0.10, noise 1-3 %); a stronger bias would dominate the floors.
BIAS_SD = 0.12  # sd of the log bias field
BIAS_CONTROL = 3  # control points per axis of the bias field (v1's)
NOISE_RANGE = (0.015, 0.04)  # Rician noise sd as a share of the mean brain signal, uniform

SOLID = "enhancing"  # v1's tissue values of the solid tumour shell, with its gadolinium now a latent


def draw_words(seed: int, case_id: str, stream: int, draw: int) -> list[int]:
    """SeedSequence entropy of one latent: v1's case words plus ``[stream, draw]``."""
    return case_seed_words(seed, case_id) + [stream, draw]


def power_law_field(rng: np.random.Generator, shape: tuple[int, ...],
                    exponent: float = TEXTURE_EXPONENT) -> np.ndarray:
    """Zero-mean unit-sd Gaussian field (*shape) with power spectrum ~|k|^-exponent (periodic)."""
    freqs = np.meshgrid(*(np.fft.fftfreq(n) for n in shape[:-1]), np.fft.rfftfreq(shape[-1]), indexing="ij")
    k = np.sqrt(sum(f**2 for f in freqs))
    amplitude = np.where(k > 0, k, 1.0) ** (-exponent / 2) * (k > 0)
    field = np.fft.irfftn(np.fft.rfftn(rng.standard_normal(shape)) * amplitude, s=shape, axes=range(len(shape)))
    return field / field.std()


@dataclass(frozen=True)
class Anatomy:
    """What the four sequences share; arrays are (*original_shape) float64 in [0, 1].

    ``fractions``: tissue -> partial volume (``TISSUES`` names; ``enhancing`` is the solid shell,
    ``vessel`` absent: vessels are a T1c latent carved out of ``surface_csf``);
    ``tissues``: jittered relaxation times; ``lesion``: tumour + oedema zone (texture amplitude);
    ``enhance_probability``: P(the tumour enhances), from the visible necrotic fraction.
    """

    fractions: dict[str, np.ndarray]
    tissues: dict[str, Tissue]
    core: np.ndarray
    tumour: np.ndarray
    lesion: np.ndarray
    surface_csf: np.ndarray
    brain: np.ndarray
    shared_texture: np.ndarray
    enhance_probability: float

    @property
    def mask(self) -> np.ndarray:
        return self.brain > 0.5


def simulate_anatomy(template: Template, rng: np.random.Generator) -> Anatomy:
    """v1's anatomy and tumour geometry (``demo_data.tissue_maps``), plus the shared latents."""
    gm, wm, brain, csf, core, tumour, oedema_zone, normal, surface = tissue_maps(template, rng)
    fractions = {
        "necrosis": core * brain,
        SOLID: (tumour - core) * brain,
        "oedema": (gm + wm) * normal * oedema_zone,
        "gm": gm * normal * (1 - oedema_zone),
        "wm": wm * normal * (1 - oedema_zone),
        "csf": csf * normal,
    }
    tissues = {}
    for name, t in TISSUES.items():
        t1, t2 = np.array([t.t1, t.t2]) * (1 + RELAXATION_JITTER * rng.standard_normal(2))
        tissues[name] = Tissue(float(t1), float(t2), t.pd, t.gad)
    necrotic = float(core.sum() / max(tumour.sum(), 1e-9))
    p_enhance = float(expit(logit(1 - NON_ENHANCING_FRACTION) + NECROSIS_LOGIT_SLOPE * (necrotic - NECROSIS_REFERENCE)))
    return Anatomy(fractions, tissues, core, tumour, np.maximum(oedema_zone, tumour), surface * csf * normal,
                   brain, power_law_field(rng, brain.shape), p_enhance)


def _enhancement(anatomy: Anatomy, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """The T1c enhancement latent: ``(enhancing, peak)``, the enhancing share (*shape, in [0, 1]) of
    the solid shell's tissue (all zero for a non-enhancing tumour) and its gadolinium (mM)."""
    shape = anatomy.brain.shape
    field = smooth_field(rng, shape, control=ENHANCE_CONTROL)
    quantile = rng.uniform(*ENHANCE_QUANTILE)
    peak = float(np.exp(rng.uniform(*np.log(PEAK_UPTAKE_MM))))
    if rng.uniform() >= anatomy.enhance_probability:
        return np.zeros(shape), peak
    shell = anatomy.fractions[SOLID] >= 0.5
    threshold = np.quantile(field[shell], quantile) if shell.any() else field.min()
    return expit((field - threshold) / ENHANCE_EDGE), peak


def _signal(anatomy: Anatomy, modality: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Noise-free signal (*shape) of one modality with its latent drawn from ``rng``; T1c also
    returns the enhancing share of the solid shell (``_enhancement``), the other sequences None."""
    shape = anatomy.brain.shape
    fractions = dict(anatomy.fractions)
    signals = {name: tissue_signals(t)[modality] for name, t in anatomy.tissues.items()}
    enhancing = None
    if modality == "t1c":
        enhancing, peak = _enhancement(anatomy, rng)
        solid = anatomy.tissues[SOLID]
        signals[SOLID] = spin_echo(Tissue(solid.t1, solid.t2, solid.pd, peak * enhancing), T1W_TR, T1W_TE,
                                   gad_on=True)
        vessel = VESSEL_FRACTION * anatomy.surface_csf * (1 + np.tanh(smooth_field(rng, shape, VESSEL_CONTROL)))
        fractions["csf"] = fractions["csf"] - vessel
        fractions["vessel"] = vessel
    elif modality == "t2f":
        field = smooth_field(rng, shape, control=INFLOW_CONTROL)
        inflow = rng.uniform(*INFLOW_MAX) * expit((field - np.quantile(field[anatomy.mask], INFLOW_QUANTILE)) / 0.1)
        csf = anatomy.tissues["csf"]
        signals["csf"] = (1 - inflow) * flair(csf) + inflow * spin_echo(csf, FLAIR_TR, FLAIR_TE)
    signal = sum(fractions[name] * signals[name] for name in fractions)
    texture = np.sqrt(TEXTURE_SHARED) * anatomy.shared_texture + \
        np.sqrt(1 - TEXTURE_SHARED) * power_law_field(rng, shape)
    amplitude = TEXTURE_NORMAL + (TEXTURE_TUMOUR - TEXTURE_NORMAL) * anatomy.lesion
    return signal * np.exp(amplitude * texture), enhancing


def simulate_modality(anatomy: Anatomy, modality: str, rng: np.random.Generator
                      ) -> tuple[np.ndarray, np.ndarray | None]:
    """One sequence: ``(volume, enhancing)``, volume (*shape) int16 scanner units with a zero
    background (bias, scale and Rician noise as v1, stronger); enhancing as ``_signal``."""
    mask = anatomy.mask
    signal, enhancing = _signal(anatomy, modality, rng)
    signal = signal * np.exp(BIAS_SD * smooth_field(rng, signal.shape, control=BIAS_CONTROL))
    signal *= rng.uniform(*SCANNER_RANGE) / signal[mask].mean()
    sd = rng.uniform(*NOISE_RANGE) * signal[mask].mean()
    real, imaginary = sd * rng.standard_normal((2, *signal.shape))
    noisy = np.hypot(signal + real, imaginary)  # Rician magnitude
    return np.clip(np.rint(noisy * mask), 1 * mask, INT16_MAX).astype(np.int16), enhancing


def segmentation(anatomy: Anatomy, enhancing: np.ndarray) -> np.ndarray:
    """(*shape) uint8 BraTS 2023 labels: 1 necrotic or non-enhancing core, 2 oedema, 3 enhancing
    (solid tumour whose enhancing share, the T1c latent, is at least 0.5)."""
    mask, brain = anatomy.mask, anatomy.brain
    seg = np.zeros(brain.shape, np.uint8)
    seg[mask & (anatomy.fractions["oedema"] >= 0.5 * brain)] = 2
    seg[mask & (anatomy.tumour >= 0.5)] = 1
    seg[mask & (anatomy.tumour >= 0.5) & (enhancing >= 0.5)] = 3
    seg[mask & (anatomy.core >= 0.5)] = 1
    return seg


def simulate_case_v2(template: Template, seed: int, case_id: str, draws: dict[str, int] | int = 0
                     ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Case ``case_id`` with modality ``m``'s latent at draw ``draws[m]`` (an int: every modality).

    Returns ``(volumes, seg)`` as ``demo_data.simulate_case``: modality -> (*original_shape) int16,
    and uint8 labels whose ET comes from the T1c draw.
    """
    draws = {m: draws for m in MODALITIES} if isinstance(draws, int) else draws
    anatomy = simulate_anatomy(template, np.random.default_rng(draw_words(seed, case_id, ANATOMY_STREAM, 0)))
    volumes, enhancing = {}, None
    for i, modality in enumerate(MODALITIES):
        rng = np.random.default_rng(draw_words(seed, case_id, 1 + i, draws[modality]))
        volumes[modality], extra = simulate_modality(anatomy, modality, rng)
        enhancing = extra if extra is not None else enhancing
    return volumes, segmentation(anatomy, enhancing)


def oracle_volumes(template: Template, seed: int, case_id: str, modality: str, n_draws: int
                   ) -> list[np.ndarray]:
    """Draws 1 .. n_draws of ``modality`` for ``case_id`` with the anatomy (and so the other three
    modalities at draw 0) fixed: (*original_shape) int16 each."""
    anatomy = simulate_anatomy(template, np.random.default_rng(draw_words(seed, case_id, ANATOMY_STREAM, 0)))
    stream = 1 + MODALITIES.index(modality)
    return [simulate_modality(anatomy, modality, np.random.default_rng(draw_words(seed, case_id, stream, n)))[0]
            for n in range(1, n_draws + 1)]


# --------------------------------------------------------------------------- writing and reading


def oracle_path(case_dir: Path, modality: str, n: int) -> Path:
    """``<case_dir>/oracle/<case>-<modality>-draw<n>.nii.gz``."""
    return case_dir / ORACLE_FOLDER / ORACLE_NAME.format(case=case_dir.name, modality=modality, n=n)


def make_demo_dataset_v2(
    out: str | os.PathLike,
    *,
    geometry: Geometry,
    seed: int,
    n_train: int,
    n_test: int,
    draws: int = 4,
    oracle_draws: int = 8,
    overwrite: bool = False,
    train_target: str | None = None,
) -> dict[str, list[str]]:
    """Write the v2 layout (module docstring) under ``out``; staged, then moved into place.

    ``train_target``: None re-draws every modality's latents in each training draw (the conditions
    change with the target, so a network can tell the draws apart and memorise each pair); a modality
    re-draws only that one, the other three staying byte-identical across an anatomy's draws (the
    same conditions with ``draws`` different targets: nothing to memorise, for a model of that target).

    Returns:
        split name -> case folder names written.
    """
    if any(not 0 <= n < MAX_CASES_PER_SPLIT for n in (n_train, n_test)):
        raise ValueError(f"demo_data_v2.py: case counts must be in [0, {MAX_CASES_PER_SPLIT}), "
                         f"got n_train={n_train}, n_test={n_test}")
    if train_target is not None and train_target not in MODALITIES:
        raise ValueError(f"demo_data_v2.py: train_target must be one of {MODALITIES}, got {train_target!r}")
    if draws < 1 or oracle_draws < 0:
        raise ValueError(f"demo_data_v2.py: --draws must be >= 1 and --oracle_draws >= 0, "
                         f"got {draws} and {oracle_draws}")
    out = Path(out)
    _check_output_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    template = load_template(geometry)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".staging-"))
    written = {TRAIN: [], TEST: []}
    try:
        (staging / TRAIN).mkdir()
        (staging / TEST).mkdir()
        for i in range(n_train):
            case_id = CASE_ID.format(SPLIT_CODE[TRAIN] * MAX_CASES_PER_SPLIT + i)
            for k in range(draws):
                name = case_id + DRAW_SUFFIX.format(k)
                which = k if train_target is None else {m: k if m == train_target else 0 for m in MODALITIES}
                volumes, seg = simulate_case_v2(template, seed, case_id, which)
                write_case(staging / TRAIN / name, volumes, seg, template.affine)
                written[TRAIN].append(name)
        for i in range(n_test):
            case_id = CASE_ID.format(TEST_SPLIT_CODE * MAX_CASES_PER_SPLIT + i)
            folder = staging / TEST / case_id
            volumes, seg = simulate_case_v2(template, seed, case_id, 0)
            write_case(folder, volumes, seg, template.affine)
            if oracle_draws:
                (folder / ORACLE_FOLDER).mkdir()
            for modality in MODALITIES if oracle_draws else ():
                for n, draw in enumerate(oracle_volumes(template, seed, case_id, modality, oracle_draws), 1):
                    write_nifti(oracle_path(folder, modality, n), _image(draw, template.affine))
            written[TEST].append(case_id)
        for name in (TRAIN, TEST):
            _publish(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("demo data v2 in %s: %d training folders (%d draws each), %d test cases (%d oracle draws)",
                out, len(written[TRAIN]), draws, n_test, oracle_draws)
    return written


def _oracle_files(case_dir: Path, modality: str) -> list[Path]:
    folder = case_dir / ORACLE_FOLDER
    pattern = re.compile(ORACLE_PATTERN.format(case=re.escape(case_dir.name), modality=re.escape(modality)))
    found = sorted(((int(m.group(1)), p) for p in (folder.iterdir() if folder.is_dir() else ())
                    if (m := pattern.fullmatch(p.name))))
    if not found:
        raise CaseError(folder, f"no oracle draws of {modality} ({ORACLE_NAME.format(case=case_dir.name, modality=modality, n='<n>')}); "
                                "build the data with make_demo_data --version 2 (--oracle_draws > 0)")
    return [p for _, p in found]


def load_oracle(case_dir: str | os.PathLike, modality: str) -> np.ndarray:
    """The oracle draws of ``modality`` beside a v2 test case: (N, X, Y, Z) float32 scanner units
    on the original grid, in draw order. Raises ``CaseError`` naming the folder when there are none."""
    if modality not in MODALITIES:
        raise ValueError(f"demo_data_v2.py: modality must be one of {MODALITIES}, got {modality!r}")
    draws = []
    for path in _oracle_files(Path(case_dir), modality):
        try:
            draws.append(np.asarray(nib.load(path).dataobj, dtype=np.float32))
        except Exception as exc:  # nibabel raises several types for a bad file
            raise CaseError(path, f"cannot read the oracle draw ({exc})") from exc
        if draws[-1].shape != draws[0].shape:
            raise CaseError(path, f"shape {draws[-1].shape} differs from the first draw's {draws[0].shape}")
    return np.stack(draws)


def oracle_network_grid(case_dir: str | os.PathLike, modality: str, geometry: Geometry | None = None
                        ) -> torch.Tensor:
    """``load_oracle`` preprocessed as ``bratsloader.load_case`` preprocesses a volume (percentile
    clip and min-max to [0, 1] per draw, then ``to_network_grid``): (N, *network_shape) float32."""
    raw = load_oracle(case_dir, modality)
    geometry = geometry or Geometry.from_original_shape(raw.shape[1:])
    return torch.from_numpy(np.stack([to_network_grid(normalize_intensity(d), geometry) for d in raw]))
