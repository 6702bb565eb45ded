"""Synthetic BraTS-layout data from a real brain, and pseudo-validation sets.

The anatomy is the MNI ICBM152 2009 template that nilearn ships inside its package
(grey matter, white matter and brain mask; CSF = mask - GM - WM), so nothing is
downloaded. Each case is a random smooth deformation of it with a synthetic
tumour (necrotic core = 1, oedema = 2, enhancing rim = 3: BraTS 2023 labels).
The four contrasts come from MR signal equations with 3T tissue values:

    spin echo  S = PD (1 - exp(-TR/T1)) exp(-TE/T2)                 (T1n, T1c, T2w)
    FLAIR      S = PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)  (TI nulls CSF)

and T1c shortens T1 by gadolinium: 1/T1' = 1/T1 + r1 C. Voxels mix their tissues'
signals by partial volume; then a bias field, a global scale and Rician noise are
applied per modality and the background is zeroed (skull-stripped, as in BraTS).

Layout written by ``make_demo_dataset``: ``training/`` (4 modalities + seg),
``validation/`` (4 modalities, no seg, as BraTS validation), ``pseudo_validation/``
(one modality dropped per case, no seg, ``missing_modalities.json``) and
``pseudo_validation_gt/`` (the same cases complete, with seg).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.special import expit

from guided_diffusion.bratsloader import (
    SEG, CaseError, Geometry, common_geometry, discover_cases, expected_path, write_nifti,
)
from guided_diffusion.constants import MODALITIES
from guided_diffusion.extras import import_extra
from guided_diffusion.fileio import save_json
from guided_diffusion.seeding import case_seed_words

logger = logging.getLogger(__name__)

TRAIN, VALID = "training", "validation"
PSEUDO, PSEUDO_GT = "pseudo_validation", "pseudo_validation_gt"
MISSING_JSON = "missing_modalities.json"
CASE_ID = "BraTS-DEMO-{:05d}-000"
MAX_CASES_PER_SPLIT = 10_000  # case numbers: training 0xxxx, validation 1xxxx, pseudo 2xxxx
SPLIT_CODE = {TRAIN: 0, VALID: 1, PSEUDO: 2}
BRATS_FOV_MM = 240.0  # in-plane field of view of the BraTS grid (1 mm voxels)
ANTIALIAS_SIGMA_PER_MM = 0.4  # template smoothing (1 mm voxels) per mm of output voxel
INT16_MAX = 32767
DEEP_WM = 0.8  # white-matter probability of voxels that may seed a tumour


@dataclass(frozen=True)
class Tissue:
    """Relaxation times (ms), proton density (relative) and gadolinium uptake (mM)."""

    t1: float
    t2: float
    pd: float
    gad: float = 0.0


# 3T values: WM/GM from Stanisz et al. 2005, CSF T1 from Lu et al. 2005, blood T1
# from Lu et al. 2004; tumour compartments are typical literature approximations.
TISSUES = {
    "wm": Tissue(1084, 69, 0.69),
    "gm": Tissue(1820, 99, 0.80),
    "csf": Tissue(4163, 2000, 1.00),
    "necrosis": Tissue(2800, 300, 0.90, gad=0.02),
    "oedema": Tissue(1700, 200, 0.86, gad=0.03),
    "enhancing": Tissue(1600, 110, 0.85, gad=0.5),
    "vessel": Tissue(1650, 150, 0.90, gad=1.0),  # dura and surface vessels
}
GAD_R1 = 4.0e-3  # relaxivity of Gd chelates at 3T, 1/(mM ms)
T1W_TR, T1W_TE = 500.0, 10.0
T2W_TR, T2W_TE = 5000.0, 100.0
FLAIR_TR, FLAIR_TE = 9000.0, 120.0
FLAIR_TI = -TISSUES["csf"].t1 * np.log((1 + np.exp(-FLAIR_TR / TISSUES["csf"].t1)) / 2)  # CSF null

# Per-case variation.
RELAXATION_JITTER = 0.05  # relative sd of T1 / T2 per tissue
ROTATION_DEG, SCALE_RANGE, SHIFT_MM, WARP_MM = 6.0, 0.07, 3.0, 3.0
BIAS_SD, NOISE_RANGE, SCANNER_RANGE = 0.10, (0.01, 0.03), (500.0, 3000.0)
TUMOUR_RADIUS_MM, CORE_RATIO, OEDEMA_RATIO = (12.0, 22.0), (0.45, 0.7), (1.5, 2.2)
MASS_EFFECT = 0.4  # fraction by which tissue at the tumour centre is pushed out
BOUNDARY_ROUGHNESS = 0.25


def spin_echo(t: Tissue, tr: float, te: float, gad_on: bool = False) -> float:
    """Spin-echo signal PD (1 - exp(-TR/T1)) exp(-TE/T2), T1 shortened if ``gad_on``."""
    t1 = 1.0 / (1.0 / t.t1 + GAD_R1 * t.gad) if gad_on else t.t1
    return t.pd * (1 - np.exp(-tr / t1)) * np.exp(-te / t.t2)


def flair(t: Tissue, tr: float = FLAIR_TR, te: float = FLAIR_TE, ti: float = FLAIR_TI) -> float:
    """Inversion-recovery spin echo PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)."""
    return t.pd * abs(1 - 2 * np.exp(-ti / t.t1) + np.exp(-tr / t.t1)) * np.exp(-te / t.t2)


def tissue_signals(tissue: Tissue) -> dict[str, float]:
    """Signal of one tissue in each modality (arbitrary units)."""
    return {
        "t1n": spin_echo(tissue, T1W_TR, T1W_TE),
        "t1c": spin_echo(tissue, T1W_TR, T1W_TE, gad_on=True),
        "t2w": spin_echo(tissue, T2W_TR, T2W_TE),
        "t2f": flair(tissue),
    }


# --------------------------------------------------------------------------- anatomy


@dataclass(frozen=True)
class Template:
    """Anti-aliased MNI tissue maps and the output grid they are sampled onto.

    ``maps``: (3, *template_shape) float32 GM, WM, brain mask; ``to_template``:
    world mm -> template voxel (4, 4); ``world``: (3, *original_shape) world mm of
    each output voxel; ``affine``: output affine; ``wm_centres``: (N, 3) world mm
    of deep white matter voxels (tumour seeds); ``centre``: (3,) brain centre mm.
    """

    maps: np.ndarray
    to_template: np.ndarray
    world: np.ndarray
    affine: np.ndarray
    wm_centres: np.ndarray
    centre: np.ndarray


@functools.lru_cache(maxsize=2)
def load_template(geometry: Geometry) -> Template:
    """Load nilearn's MNI152 2009 maps (package data, offline) for ``geometry``."""
    datasets = import_extra("nilearn.datasets", "demo", "building the demo dataset")  # heavy, only needed here

    images = [datasets.load_mni152_gm_template(resolution=1),
              datasets.load_mni152_wm_template(resolution=1),
              datasets.load_mni152_brain_mask(resolution=1)]
    voxel_mm = BRATS_FOV_MM / geometry.original_shape[0]
    sigma = ANTIALIAS_SIGMA_PER_MM * max(voxel_mm - 1.0, 0.0)
    maps = np.stack([ndimage.gaussian_filter(np.asarray(im.get_fdata(), np.float32), sigma)
                     for im in images])
    t_affine = images[0].affine
    inside = np.argwhere(np.asarray(images[2].get_fdata()) > 0)
    lo, hi = (nib.affines.apply_affine(t_affine, v) for v in (inside.min(0), inside.max(0)))
    centre = (lo + hi) / 2
    # BraTS-like storage (x to the right of the image = patient left): diag(-s, -s, s).
    affine = np.diag([-voxel_mm, -voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.array(geometry.original_shape) - 1) / 2)
    grid = np.indices(geometry.original_shape, dtype=np.float32).reshape(3, -1)
    world = (affine[:3, :3] @ grid + affine[:3, 3:]).reshape(3, *geometry.original_shape)
    to_template = np.linalg.inv(t_affine)
    wm = _sample(maps[1:2], to_template, world)[0]
    wm_centres = world[:, wm >= min(DEEP_WM, wm.max())].T
    logger.info("demo template on %s, %.2f mm voxels", geometry.original_shape, voxel_mm)
    return Template(maps, to_template, world, affine, wm_centres, centre)


def _sample(maps: np.ndarray, to_template: np.ndarray, world: np.ndarray) -> np.ndarray:
    """Trilinear samples of (C, *template_shape) maps at world points (3, *shape)."""
    coords = np.tensordot(to_template[:3, :3], world, axes=1) + to_template[:3, 3, None, None, None]
    return np.stack([ndimage.map_coordinates(m, coords, order=1, cval=0.0) for m in maps])


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], control: int = 4) -> np.ndarray:
    """Low-frequency field (*shape), unit-sd normal values on a control^3 grid, cubic."""
    coarse = rng.standard_normal((control,) * 3)
    wx, wy, wz = (_cubic_weights(control, n) for n in shape)
    return np.einsum("ia,jb,kc,abc->ijk", wx, wy, wz, coarse, optimize=True)


@functools.lru_cache(maxsize=32)
def _cubic_weights(control: int, n: int) -> np.ndarray:
    """(n, control) cubic-spline interpolation weights from control points to n samples."""
    at = np.linspace(0, control - 1, n)[None]
    return np.stack([ndimage.map_coordinates(np.eye(control)[j], at, order=3, mode="nearest")
                     for j in range(control)], axis=1)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """Random rotation (3, 3) with angles up to ``ROTATION_DEG`` about each axis."""
    ax, ay, az = np.deg2rad(rng.uniform(-ROTATION_DEG, ROTATION_DEG, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rx @ ry @ rz


def _warp(template: Template, rng: np.random.Generator, tumour_centre: np.ndarray, radius: float):
    """World points (3, *shape) to sample the template at: affine, smooth warp, mass effect."""
    shape = template.world.shape[1:]
    matrix = _rotation(rng) * rng.uniform(1 - SCALE_RANGE, 1 + SCALE_RANGE, 3)
    offset = template.world - template.centre[:, None, None, None]
    points = np.tensordot(matrix, offset, axes=1) + template.centre[:, None, None, None]
    points += rng.uniform(-SHIFT_MM, SHIFT_MM, 3)[:, None, None, None]
    points += WARP_MM * np.stack([smooth_field(rng, shape) for _ in range(3)])
    # Mass effect: pull sample points towards the tumour centre, pushing tissue out.
    from_centre = template.world - tumour_centre[:, None, None, None]
    falloff = np.exp(-(from_centre**2).sum(0) / (2 * (1.5 * radius) ** 2))
    return points - MASS_EFFECT * falloff * from_centre


def _tumour(template: Template, rng: np.random.Generator, centre: np.ndarray, radius: float):
    """Soft masks (*shape): necrotic core, whole tumour (core + rim), oedema zone."""
    shape = template.world.shape[1:]
    voxel_mm = abs(template.affine[0, 0])
    stretch = rng.uniform(0.8, 1.2, 3)[:, None, None, None]  # ellipsoid axes
    from_centre = (template.world - centre[:, None, None, None]) / stretch
    distance = np.sqrt((from_centre**2).sum(0))

    def soft(r: float) -> np.ndarray:
        rough = distance * (1 + BOUNDARY_ROUGHNESS * np.tanh(smooth_field(rng, shape, control=6)))
        return expit((r - rough) / (0.5 * voxel_mm))

    tumour = soft(radius)
    core = np.minimum(soft(radius * rng.uniform(*CORE_RATIO)), tumour)
    oedema = np.maximum(soft(radius * rng.uniform(*OEDEMA_RATIO)), tumour)
    return core, tumour, oedema


def tissue_maps(template: Template, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """A case's anatomy on the template's output grid: a random warp of the template and a tumour.

    Returns nine (*original_shape) float maps in [0, 1]: grey matter, white matter, brain, CSF,
    tumour core, whole tumour, oedema zone, normal tissue (1 - tumour) and the brain surface shell.
    Draws from ``rng`` in a fixed order (tumour centre, radius, warp, tumour), shared by v1 and v2.
    """
    centre = template.wm_centres[rng.integers(len(template.wm_centres))]
    radius = rng.uniform(*TUMOUR_RADIUS_MM)
    gm, wm, brain = np.clip(_sample(template.maps, template.to_template,
                                    _warp(template, rng, centre, radius)), 0, 1)
    gm, wm = np.minimum(gm, brain), np.minimum(wm, np.clip(brain - gm, 0, 1))
    csf = np.clip(brain - gm - wm, 0, 1)
    core, tumour, oedema_zone = _tumour(template, rng, centre, radius)
    normal = 1 - tumour
    surface = np.clip(brain - ndimage.gaussian_filter(brain, 1.0), 0, 1)
    return gm, wm, brain, csf, core, tumour, oedema_zone, normal, surface


def simulate_case(
    template: Template, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One synthetic case on the template's output grid.

    Returns:
        ``(volumes, seg)``: modality -> (*original_shape) int16 scanner units with a
        zero background, and (*original_shape) uint8 labels in {0, 1, 2, 3}.
    """
    gm, wm, brain, csf, core, tumour, oedema_zone, normal, surface = tissue_maps(template, rng)
    vessel = 0.5 * surface * csf * normal * (1 + np.tanh(smooth_field(rng, brain.shape, 8)))
    fractions = {
        "necrosis": core * brain,
        "enhancing": (tumour - core) * brain,
        "oedema": (gm + wm) * normal * oedema_zone,
        "gm": gm * normal * (1 - oedema_zone),
        "wm": wm * normal * (1 - oedema_zone),
        "csf": csf * normal - vessel,
        "vessel": vessel,
    }
    mask = brain > 0.5
    signals = {}  # tissue -> modality -> signal, relaxation times jittered per case
    for name, t in TISSUES.items():
        t1, t2 = np.array([t.t1, t.t2]) * (1 + RELAXATION_JITTER * rng.standard_normal(2))
        signals[name] = tissue_signals(Tissue(t1, t2, t.pd, t.gad))
    volumes = {}
    for modality in MODALITIES:
        signal = sum(fractions[name] * signals[name][modality] for name in TISSUES)
        signal *= np.exp(BIAS_SD * smooth_field(rng, brain.shape, control=3))
        signal *= rng.uniform(*SCANNER_RANGE) / signal[mask].mean()
        sd = rng.uniform(*NOISE_RANGE) * signal[mask].mean()
        real, imaginary = sd * rng.standard_normal((2, *signal.shape))
        noisy = np.hypot(signal + real, imaginary)  # Rician magnitude
        volumes[modality] = np.clip(np.rint(noisy * mask), 1 * mask, INT16_MAX).astype(np.int16)
    seg = np.zeros(brain.shape, np.uint8)
    seg[mask & (fractions["oedema"] >= 0.5 * brain)] = 2
    seg[mask & (tumour >= 0.5)] = 3
    seg[mask & (core >= 0.5)] = 1
    return volumes, seg


# --------------------------------------------------------------------------- writing


def _image(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    return image


def write_case(folder: Path, volumes: dict[str, np.ndarray], seg: np.ndarray | None,
               affine: np.ndarray) -> None:
    """Write ``<folder>/<folder name>-<modality>.nii.gz`` (and ``-seg`` unless None)."""
    folder.mkdir(parents=True, exist_ok=False)
    for name, data in volumes.items():
        write_nifti(expected_path(folder, name), _image(data, affine))
    if seg is not None:
        write_nifti(expected_path(folder, SEG), _image(seg, affine))


def _check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"demo_data.py: output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"demo_data.py: output folder {out} is not empty; pass --overwrite")


def _publish(staged: Path, final: Path) -> None:
    """Move a finished folder into place, replacing ``final`` if it exists."""
    if final.exists():
        trash = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
        os.replace(final, trash / final.name)
        os.replace(staged, final)
        shutil.rmtree(trash)
    else:
        os.replace(staged, final)


def drop_modalities(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    seed: int,
    keep_seg: bool = False,
    overwrite: bool = False,
    check_data: bool = True,
) -> tuple[dict[str, str], list[CaseError]]:
    """Copy complete cases from ``src`` to ``dst`` without one modality each.

    The dropped modality is drawn per case from ``(seed, case_id)``, so it does not
    depend on the other cases; it is recorded in ``dst/missing_modalities.json``
    (``{case_id: modality}``). Files are copied byte for byte; ``src`` is never
    modified. Segmentations are left out unless ``keep_seg`` (BraSyn validation has none).
    Input cases are checked as the training and sampling scripts check them (every voxel with
    ``check_data``; shapes against the dataset's most common one), so no bad case is copied.

    Returns:
        ``(missing, errors)``: the mapping written to the JSON file and the bad
        input cases that were skipped.
    """
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if src == dst or src in dst.parents or dst in src.parents:
        raise ValueError(f"demo_data.py: input {src} and output {dst} must not contain each other")
    cases, errors = discover_cases(src, mode="train", geometry=None, check_data=check_data)
    _, cases, off_grid = common_geometry(cases)
    errors += off_grid
    if not cases:
        raise CaseError(src, "no complete case to build a pseudo-validation set from")
    _check_output_dir(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.staging-"))
    try:
        missing = {}
        for case in cases:
            rng = np.random.default_rng(case_seed_words(seed, case.case_id))
            missing[case.case_id] = MODALITIES[rng.integers(len(MODALITIES))]
            (staging / case.case_id).mkdir()
            for name, path in case.files.items():
                if name != missing[case.case_id] and (name != SEG or keep_seg):
                    shutil.copyfile(path, staging / case.case_id / path.name)
        save_json(missing, staging / MISSING_JSON)
        _publish(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("%s: %d cases with one modality dropped", dst, len(missing))
    return missing, errors


def make_demo_dataset(
    out: str | os.PathLike,
    *,
    geometry: Geometry,
    seed: int,
    n_train: int,
    n_val: int,
    n_pseudo: int,
    overwrite: bool = False,
) -> dict[str, list[str]]:
    """Write the demo layout (see module docstring) under ``out``.

    Everything is built in a staging folder inside ``out`` and moved into place at
    the end; with ``overwrite`` only the four split folders are replaced.

    Returns:
        split name -> case ids written.
    """
    counts = {TRAIN: n_train, VALID: n_val, PSEUDO: n_pseudo}
    if any(not 0 <= n < MAX_CASES_PER_SPLIT for n in counts.values()):
        raise ValueError(
            f"demo_data.py: case counts must be in [0, {MAX_CASES_PER_SPLIT}), got {counts}"
        )
    out = Path(out)
    _check_output_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    template = load_template(geometry)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".staging-"))
    written = {}
    try:
        for split, n in counts.items():
            folder = staging / (PSEUDO_GT if split == PSEUDO else split)
            folder.mkdir()
            written[split] = []
            for i in range(n):
                case_id = CASE_ID.format(SPLIT_CODE[split] * MAX_CASES_PER_SPLIT + i)
                rng = np.random.default_rng(case_seed_words(seed, case_id))
                volumes, seg = simulate_case(template, rng)
                seg = None if split == VALID else seg  # BraTS validation has no seg
                write_case(folder / case_id, volumes, seg, template.affine)
                written[split].append(case_id)
                logger.debug("wrote %s/%s", split, case_id)
        if n_pseudo:
            drop_modalities(staging / PSEUDO_GT, staging / PSEUDO, seed=seed)
        else:
            (staging / PSEUDO).mkdir()
        for name in (TRAIN, VALID, PSEUDO, PSEUDO_GT):
            _publish(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("demo data in %s: %s", out, {k: len(v) for k, v in written.items()})
    return written

