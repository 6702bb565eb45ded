"""BraTS 2023/2024 case discovery, checks, preprocessing and its inverse.

A case is a folder ``<case>/`` holding ``<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz``
(any cohort prefix: GLI, MEN, MET, PED, SSA, GoAT ...). Volumes are indexed the
nibabel way, ``(X, Y, Z)``: BraTS stores (240, 240, 155) at 1 mm.

Preprocessing follows cWDM: clip each volume to its 0.1 / 99.9 percentiles,
min-max scale to [0, 1], pad the last axis with zeros at its end (155 -> 160)
and crop 8 voxels off each in-plane side (240 -> 224). ``to_original_grid`` undoes
the crop and the padding so outputs can be written on the input grid with the
input's affine and header (``save_volume``).

Discovery checks headers (readable NIfTI, 3D, expected shape, agreeing affines)
and, with ``check_data=True``, the voxels too; ``load_case`` always checks the
voxels it reads. Every problem is a ``CaseError(path, problem)``.
"""

from __future__ import annotations

import errno
import gzip
import logging
import os
import stat
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import Dataset

from guided_diffusion.constants import MODALITIES
from guided_diffusion.fileio import atomic_write

logger = logging.getLogger(__name__)

SEG = "seg"
SEG_LABELS = (0, 1, 2, 3)  # BraTS 2023: background, necrotic core, oedema, enhancing
NIFTI_SUFFIX = ".nii.gz"
ORACLE_FOLDER = "oracle"  # sub-folder of a synthetic test case with exact target draws (demo_data_v2); skipped
BRATS_ORIGINAL_SHAPE = (240, 240, 155)
BRATS_CROP = 8  # voxels removed from each in-plane side
BRATS_PADDED_DEPTH = 160
CLIP_QUANTILES = (0.001, 0.999)  # cWDM's intensity clipping
AFFINE_ATOL_MM = 1e-3  # modalities of one case must agree to this tolerance
GZIP_MAX_RATIO = 1032  # deflate never compresses better than this (RFC 1951's longest match); a file
# whose header claims more voxels than its compressed size can hold is rejected before any read
TRAILING_SLACK_BYTES = 1 << 16  # bytes a writer may leave after the voxel data (zero padding ...)
GZIP_MAGIC = b"\x1f\x8b"
NIFTI_MAGICS = (b"n+1\0", b"ni1\0", b"n+2\0")
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError)

Mode = Literal["train", "auto"]


class CaseError(ValueError):
    """A problem with one input file or case folder; ``str`` is ``"<path>: <problem>"``."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Geometry:
    """Original grid and network grid of a dataset.

    Attributes:
        original_shape: (X, Y, Z) of the input files.
        crop: voxels removed from each side of the two in-plane axes (X, Y).
        padded_depth: Z after zero-padding at the end of the last axis.
    """

    original_shape: tuple[int, int, int] = BRATS_ORIGINAL_SHAPE
    crop: int = BRATS_CROP
    padded_depth: int = BRATS_PADDED_DEPTH

    def __post_init__(self) -> None:
        if len(self.original_shape) != 3 or min(self.original_shape) < 1:
            raise ValueError(f"bratsloader.py: bad original_shape {self.original_shape}")
        object.__setattr__(self, "original_shape", tuple(int(s) for s in self.original_shape))
        x, y, z = self.original_shape
        if self.crop < 0 or 2 * self.crop >= min(x, y):
            raise ValueError(f"bratsloader.py: crop {self.crop} too large for in-plane {(x, y)}")
        if self.padded_depth < z:
            raise ValueError(f"bratsloader.py: padded_depth {self.padded_depth} < depth {z}")

    @property
    def network_shape(self) -> tuple[int, int, int]:
        """(X - 2 crop, Y - 2 crop, padded_depth): the grid the network sees."""
        x, y, _ = self.original_shape
        return (x - 2 * self.crop, y - 2 * self.crop, self.padded_depth)

    @classmethod
    def scaled(cls, factor: float) -> "Geometry":
        """BraTS geometry with every size multiplied by ``factor`` and rounded.

        ``Geometry.scaled(0.25)``: original (60, 60, 39), network (56, 56, 40).
        """
        if not 0 < factor <= 1:
            raise ValueError(f"bratsloader.py: scale factor must be in (0, 1], got {factor}")
        x, y, z = (int(round(s * factor)) for s in BRATS_ORIGINAL_SHAPE)
        depth = max(int(round(BRATS_PADDED_DEPTH * factor)), z)
        return cls((x, y, z), int(round(BRATS_CROP * factor)), depth)

    @classmethod
    def from_original_shape(cls, shape: tuple[int, int, int]) -> "Geometry":
        """The BraTS geometry or the ``scaled`` one whose original shape is ``shape``."""
        shape = tuple(int(s) for s in shape)
        if len(shape) == 3 and shape[0] >= 1:
            geometry = cls.scaled(shape[0] / BRATS_ORIGINAL_SHAPE[0]) if shape[0] <= 240 else None
            if geometry is not None and geometry.original_shape == shape:
                return geometry
        raise ValueError(
            f"bratsloader.py: shape {shape} is neither BraTS {BRATS_ORIGINAL_SHAPE} nor a "
            "Geometry.scaled() version of it; build a Geometry explicitly"
        )

    def check_divisible(self, levels: int) -> None:
        """Raise ValueError unless every network axis is divisible by ``2**levels``."""
        multiple = 2**levels
        if any(s % multiple for s in self.network_shape):
            raise ValueError(
                f"bratsloader.py: network shape {self.network_shape} is not divisible by "
                f"2**{levels} = {multiple}; choose another size or fewer levels"
            )


BRATS_GEOMETRY = Geometry()


def _zeros_like(vol, shape):
    if isinstance(vol, torch.Tensor):
        return torch.zeros(shape, dtype=vol.dtype, device=vol.device)
    return np.zeros(shape, dtype=vol.dtype)


def to_network_grid(vol, geometry: Geometry = BRATS_GEOMETRY):
    """Pad the last axis at its end and crop the in-plane axes.

    Args:
        vol: numpy array or torch tensor (..., *geometry.original_shape).

    Returns:
        Same type, dtype and device, shape (..., *geometry.network_shape).
    """
    x, y, z = geometry.original_shape
    if tuple(vol.shape[-3:]) != geometry.original_shape:
        raise ValueError(
            f"bratsloader.py: to_network_grid expects (..., {x}, {y}, {z}), got {tuple(vol.shape)}"
        )
    c = geometry.crop
    padded = _zeros_like(vol, tuple(vol.shape[:-3]) + (x, y, geometry.padded_depth))
    padded[..., :z] = vol
    return padded[..., c : x - c, c : y - c, :]


def to_original_grid(vol, geometry: Geometry = BRATS_GEOMETRY):
    """Inverse of ``to_network_grid``: un-crop with zeros, drop the depth padding.

    Args:
        vol: numpy array or torch tensor (..., *geometry.network_shape).

    Returns:
        Same type, dtype and device, shape (..., *geometry.original_shape).
    """
    if tuple(vol.shape[-3:]) != geometry.network_shape:
        raise ValueError(
            f"bratsloader.py: to_original_grid expects (..., {geometry.network_shape}), "
            f"got {tuple(vol.shape)}"
        )
    x, y, z = geometry.original_shape
    c = geometry.crop
    out = _zeros_like(vol, tuple(vol.shape[:-3]) + geometry.original_shape)
    out[..., c : x - c, c : y - c, :] = vol[..., :z]
    return out


def normalize_intensity(vol: np.ndarray) -> np.ndarray:
    """Clip to the 0.1 / 99.9 percentiles and min-max scale to [0, 1] (cWDM).

    Args:
        vol: (X, Y, Z) array of finite values.

    Returns:
        float32 array of the same shape with values in [0, 1].
    """
    low, high = np.quantile(vol, CLIP_QUANTILES)
    if not high > low:
        raise ValueError(f"volume is constant after percentile clipping ({low:g}); cannot scale")
    clipped = np.clip(vol.astype(np.float64), low, high)
    return ((clipped - low) / (high - low)).astype(np.float32)


# --------------------------------------------------------------------------- file checks


def _open_header(path: Path, geometry: Geometry | None) -> nib.Nifti1Image:
    """Load a NIfTI header lazily and check everything the header says before any voxel is read.

    Checks: readable NIfTI (with the real problem named: empty file, uncompressed NIfTI under a
    ``.gz`` name), real scalar voxels (no RGB, complex ...), 3D (a trailing axis of length 1, as
    some converters write, is dropped: the image returned is 3D), a finite affine, a shape no larger
    than BraTS (and ``geometry``'s unless None), and a file large enough for the voxels it claims.
    """
    try:
        image = nib.load(path)
    except nib.filebasedimages.ImageFileError as exc:
        raise CaseError(path, _why_not_nifti(path)) from exc
    except _READ_ERRORS as exc:
        raise CaseError(path, f"cannot read as NIfTI ({_error_text(exc, path)})") from exc
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise CaseError(path, f"not a NIfTI image ({type(image).__name__})")
    dtype = image.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "biuf":
        name = "/".join(dtype.names) if dtype.names else str(dtype)  # RGB volumes: "R/G/B"
        kind = "colour" if dtype.names else {"c": "complex"}.get(dtype.kind, "not numeric")
        raise CaseError(path, f"unsupported voxel data type {name} ({kind}); expected one real value per voxel "
                              "(integer or floating point)")
    if len(image.shape) == 4 and image.shape[3] == 1:  # (X, Y, Z, 1): a 3D volume, read lazily as one
        image = type(image)(image.dataobj.reshape(image.shape[:3]), image.affine, image.header)
    if len(image.shape) != 3:
        raise CaseError(path, f"expected a 3D volume, got {len(image.shape)}D shape {image.shape}")
    if not np.isfinite(image.affine).all():
        raise CaseError(path, "the header's affine (voxel-to-world mapping, sform/qform) contains NaN or Inf")
    if geometry is not None and tuple(image.shape) != geometry.original_shape:
        raise CaseError(path, f"shape {image.shape} != expected {geometry.original_shape}")
    if any(s > b for s, b in zip(image.shape, BRATS_ORIGINAL_SHAPE)):
        raise CaseError(path, f"header claims shape {image.shape}, larger than the BraTS grid {BRATS_ORIGINAL_SHAPE} "
                              "on some axis; refusing to read it")
    _check_file_size(path, image)
    return image


def _why_not_nifti(path: Path) -> str:
    """What is wrong with a file nibabel cannot identify as an image (read: at most 348 bytes)."""
    try:  # nibabel reports an unreadable file (permissions, I/O error) as an unknown file type
        with open(path, "rb") as fh:
            head = fh.read(348)
    except OSError as os_error:
        return f"cannot read: {os_error.strerror or os_error}"
    if not head:
        return "empty file (0 bytes)"
    if path.name.endswith(".gz") and not head.startswith(GZIP_MAGIC) and head[344:348] in NIFTI_MAGICS:
        return ("an uncompressed NIfTI file under a .nii.gz name (it is not gzip-compressed); "
                "compress it (gzip) or rename it to .nii")
    return "cannot read as NIfTI: not a NIfTI image, or its header is truncated (nibabel cannot work out the file type)"


def _voxel_bytes(image: nib.Nifti1Image) -> int:
    """Bytes the header says the file holds: the voxel offset plus the voxel data."""
    offset = max(int(getattr(image.dataobj, "offset", 0)), int(image.header.get_data_offset()))  # the proxy knows
    return offset + int(np.prod(image.shape, dtype=np.int64)) * image.get_data_dtype().itemsize


def _check_file_size(path: Path, image: nib.Nifti1Image) -> None:
    """Refuse a file too small to hold what its header claims (without reading the voxels)."""
    expected, size = _voxel_bytes(image), path.stat().st_size
    if path.name.endswith(".gz"):
        if size * GZIP_MAX_RATIO < expected:
            raise CaseError(path, f"header claims shape {image.shape} of {image.get_data_dtype()} ({expected} bytes), "
                                  f"more than a {size}-byte gzip file can hold; the file is truncated or its "
                                  "header is wrong")
    elif size < expected:
        raise CaseError(path, f"file truncated: {size} bytes, the header's shape {image.shape} of "
                              f"{image.get_data_dtype()} needs {expected}")


def _gunzip_bounded(path: Path, limit: int) -> bytes:
    """The decompressed content of a gzip file (every member, CRCs checked), read in a streaming
    way and never more than ``limit`` bytes: a longer stream raises CaseError (decompression bomb)."""
    with gzip.open(path, "rb") as fh:
        data = fh.read(limit)
        if fh.read(1):
            raise CaseError(path, f"decompresses to more than {limit} bytes although its header implies "
                                  f"{limit - TRAILING_SLACK_BYTES} (trailing data or a decompression bomb); "
                                  "refusing to read further")
    return data


def _error_text(exc: BaseException, path: Path) -> str:
    """An exception's message without the full path the CaseError already names."""
    return str(exc).replace(str(path), path.name) or type(exc).__name__


def _read_voxels(path: Path, image: nib.Nifti1Image) -> np.ndarray:
    """All voxels as float64 (X, Y, Z); truncated or corrupt data -> CaseError.

    ``image`` is the checked header of ``_open_header``. A ``.gz`` file is decompressed to its end
    so that its CRC is checked (nibabel alone stops after the bytes it needs and would return
    garbage from a corrupted stream without an error), streaming and bounded by the size the
    header implies: peak memory is the raw voxels plus their float64 copy, whatever the file holds.
    """
    shape = image.shape
    try:
        if path.name.endswith(".gz"):
            raw = _gunzip_bounded(path, _voxel_bytes(image) + TRAILING_SLACK_BYTES)
            image = type(image).from_bytes(raw)
            del raw
        data = np.asarray(image.get_fdata(dtype=np.float64)).reshape(shape)
    except CaseError:
        raise
    except _READ_ERRORS as exc:
        raise CaseError(path, f"cannot read voxel data, file truncated or corrupt "
                              f"({_error_text(exc, path)})") from exc
    if not np.isfinite(data).all():
        n_nan, n_inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
        found = ", ".join(f"{n} {kind}" for n, kind in ((n_nan, "NaN"), (n_inf, "Inf")) if n)
        raise CaseError(path, f"{n_nan + n_inf} voxel{'s are' if n_nan + n_inf > 1 else ' is'} NaN or Inf ({found})")
    return data


def _check_modality(path: Path, data: np.ndarray) -> None:
    if not data.any():
        raise CaseError(path, "volume is all zero")
    if data.min() == data.max():
        raise CaseError(path, f"volume is constant ({data.min():g})")


def _check_seg(path: Path, data: np.ndarray) -> None:
    bad = ~np.isin(data, SEG_LABELS)
    if bad.any():
        labels = [int(v) if float(v).is_integer() else float(v) for v in np.unique(data[bad])[:10]]
        raise CaseError(path, f"segmentation labels {labels} outside {SEG_LABELS} (BraTS 2023)")


# --------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class Case:
    """One case folder: the files found in it and, in auto mode, the missing modality."""

    case_id: str
    folder: Path
    files: dict[str, Path] = field(hash=False)  # modality or "seg" -> path
    missing: str | None = None

    @property
    def seg_path(self) -> Path | None:
        return self.files.get(SEG)

    @property
    def reference_path(self) -> Path:
        """First present modality: its affine and header are the case's grid."""
        return next(self.files[m] for m in MODALITIES if m in self.files)


def expected_path(folder: Path, name: str) -> Path:
    """``<folder>/<folder name>-<name>.nii.gz``."""
    return folder / f"{folder.name}-{name}{NIFTI_SUFFIX}"


def _scan_folder(folder: Path, mode: Mode) -> Case:
    """Match the folder's files to BraTS names; check presence for ``mode``."""
    wanted = {expected_path(folder, n).name: n for n in (*MODALITIES, SEG)}
    files = {}
    try:
        entries = sorted(e for e in folder.iterdir() if not e.name.startswith(".")
                         and not (e.name == ORACLE_FOLDER and e.is_dir()))
    except OSError as exc:
        raise CaseError(folder, f"cannot list the case folder ({exc.strerror or exc})") from exc
    for entry in entries:
        if entry.name in wanted and not entry.is_file():
            raise CaseError(entry, _not_a_file(entry))
        if entry.name in wanted and entry.stat().st_size == 0:
            raise CaseError(entry, "empty file (0 bytes); if it stands for a missing modality, delete it so that "
                                   "the modality counts as missing")
        if entry.name not in wanted:
            raise CaseError(
                entry,
                f"unexpected file; a case folder holds only "
                f"{folder.name}-{{{','.join((*MODALITIES, SEG))}}}{NIFTI_SUFFIX}",
            )
        files[wanted[entry.name]] = entry
    absent = [m for m in MODALITIES if m not in files]
    empty = "; the case folder is empty" if not entries else ""
    if mode == "train" and absent:
        raise CaseError(expected_path(folder, absent[0]),
                        f"missing modality {', '.join(absent)} (training needs all four){empty}")
    if mode == "auto" and len(absent) != 1:
        problem = "no modality is missing" if not absent else \
            f"{len(absent)} modalities missing ({', '.join(absent)})"
        raise CaseError(folder, f"{problem}; auto mode needs exactly one of {MODALITIES} missing{empty}")
    return Case(folder.name, folder, files, absent[0] if mode == "auto" else None)


def _not_a_file(path: Path) -> str:
    """Why an entry with a BraTS file name cannot be read as a file."""
    if path.is_symlink() and not path.exists():
        return f"cannot read: broken symbolic link to {os.readlink(path)} (target does not exist)"
    mode = path.stat().st_mode
    kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISBLK(mode) or stat.S_ISCHR(mode)
            else "not a regular file")
    return f"cannot read: {kind}, not a regular file"


def check_case(
    case: Case, geometry: Geometry | None = BRATS_GEOMETRY, *, check_data: bool = False
) -> None:
    """Header checks for every file of ``case`` (voxel checks too with ``check_data``).

    With ``geometry=None`` the files must agree with each other but may have any shape. When
    they do not, the file blamed is one that disagrees with the file most others agree with.
    """
    images = {name: _open_header(path, geometry) for name, path in case.files.items()}

    def same_grid(a: nib.Nifti1Image, b: nib.Nifti1Image) -> bool:
        return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=AFFINE_ATOL_MM)

    agreeing = {n: sum(same_grid(img, other) for other in images.values()) for n, img in images.items()}
    ref_name = max(images, key=lambda n: agreeing[n])  # first of the largest agreeing group
    reference, ref_path = images[ref_name], case.files[ref_name]
    for name, image in images.items():
        path = case.files[name]
        if image.shape != reference.shape:
            raise CaseError(path, f"shape {image.shape} differs from {ref_path.name} {reference.shape}")
        if not np.allclose(image.affine, reference.affine, atol=AFFINE_ATOL_MM):
            diff = float(np.abs(image.affine - reference.affine).max())
            raise CaseError(path, f"affine differs from {ref_path.name} by up to {diff:.3g} mm (tolerance "
                                  f"{AFFINE_ATOL_MM} mm); the modalities are not on one grid")
    if check_data:
        for name, image in images.items():
            path = case.files[name]
            data = _read_voxels(path, image)
            (_check_seg if name == SEG else _check_modality)(path, data)


def discover_cases(
    root: str | os.PathLike,
    *,
    mode: Mode = "train",
    geometry: Geometry | None = BRATS_GEOMETRY,
    check_data: bool = False,
) -> tuple[list[Case], list[CaseError]]:
    """Find BraTS cases under ``root`` (one sub-folder per case, sorted by name).

    Args:
        root: dataset folder; files directly in it (e.g. ``missing_modalities.json``)
            and hidden entries are ignored.
        mode: ``"train"``: all four modalities present (seg optional);
            ``"auto"``: exactly one of the four missing (``Case.missing``).
        geometry: expected original shape of every file (None: any shape, but the
            files of one case must agree).
        check_data: also read every voxel (NaN/Inf, all-zero, seg labels, truncated
            gzip); slow on the full BraTS set, otherwise done by ``load_case``.

    Returns:
        ``(cases, errors)``: the good cases and one ``CaseError`` per bad case.
    """
    if mode not in ("train", "auto"):
        raise ValueError(f"bratsloader.py: mode must be 'train' or 'auto', got {mode!r}")
    root = Path(root)
    if not root.is_dir():
        raise CaseError(root, "dataset folder does not exist or is not a folder")
    cases, errors = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            case = _scan_folder(folder, mode)
            check_case(case, geometry, check_data=check_data)
        except CaseError as err:
            logger.warning("skipping case: %s", err)
            errors.append(err)
        else:
            cases.append(case)
    logger.info("%s: %d good cases, %d bad (mode %s)", root, len(cases), len(errors), mode)
    return cases, errors


def common_geometry(cases: list[Case]) -> tuple[Geometry | None, list[Case], list[CaseError]]:
    """The dataset's geometry, the cases on it, and one ``CaseError`` per case that is not.

    The geometry is the most common file shape among ``cases`` that is BraTS or a
    ``Geometry.scaled`` version of it (ties: the first case in order), so one odd case cannot
    decide it. Returns ``(None, [], errors)`` when no case has such a shape.
    """
    shapes = [(case, tuple(int(s) for s in nib.load(case.reference_path).shape)) for case in cases]
    geometry = None
    for shape, _ in Counter(shape for _, shape in shapes).most_common():
        try:
            geometry = Geometry.from_original_shape(shape)
            break
        except ValueError:
            continue
    good, errors = [], []
    for case, shape in shapes:
        if geometry is not None and shape == geometry.original_shape:
            good.append(case)
            continue
        problem = (f"shape {shape} differs from the dataset's {geometry.original_shape}" if geometry else
                   f"shape {shape} is neither BraTS {BRATS_ORIGINAL_SHAPE} nor a scaled version of it")
        errors.append(CaseError(case.reference_path, problem))
        logger.warning("skipping case: %s", errors[-1])
    return geometry, good, errors


# --------------------------------------------------------------------------- loading


@dataclass
class CaseData:
    """A case on the network grid.

    Attributes:
        volumes: (4, *network_shape) float32 in [0, 1], ``MODALITIES`` order; the
            channel of a missing modality is zero.
        available: (4,) bool, False for the missing modality.
        brain_mask: (*network_shape) bool, voxel > 0 in any present input modality.
        seg: (*network_shape) uint8 labels in ``SEG_LABELS``, or None.
        reference: header-only image whose affine and header outputs must reuse.
    """

    case: Case
    volumes: np.ndarray
    available: np.ndarray
    brain_mask: np.ndarray
    seg: np.ndarray | None
    reference: nib.Nifti1Image


def load_case(case: Case, geometry: Geometry = BRATS_GEOMETRY) -> CaseData:
    """Read, check and preprocess one case; any problem raises ``CaseError``."""
    network = geometry.network_shape
    volumes = np.zeros((len(MODALITIES), *network), dtype=np.float32)
    available = np.array([m in case.files for m in MODALITIES])
    brain = np.zeros(geometry.original_shape, dtype=bool)
    for i, modality in enumerate(MODALITIES):
        if not available[i]:
            continue
        path = case.files[modality]
        data = _read_voxels(path, _open_header(path, geometry))
        _check_modality(path, data)
        brain |= data > 0
        try:
            volumes[i] = to_network_grid(normalize_intensity(data), geometry)
        except ValueError as exc:
            raise CaseError(path, str(exc)) from exc
    seg = None
    if case.seg_path is not None:
        data = _read_voxels(case.seg_path, _open_header(case.seg_path, geometry))
        _check_seg(case.seg_path, data)
        seg = to_network_grid(data.astype(np.uint8), geometry)
    return CaseData(case, volumes, available, to_network_grid(brain, geometry), seg,
                    load_reference(case, geometry))


def load_reference(case: Case, geometry: Geometry = BRATS_GEOMETRY) -> nib.Nifti1Image:
    """Header-only image of the case's first present modality (affine + header)."""
    return _open_header(case.reference_path, geometry)


class BratsDataset(Dataset):
    """Cases as dicts of tensors on the network grid.

    Each item: ``volumes`` (4, *network_shape) float32, ``available`` (4,) bool,
    ``brain_mask`` (*network_shape) bool, ``case_id`` str, and ``seg``
    (*network_shape) uint8 when every case of the dataset has a segmentation
    (so that batches always have the same keys).
    """

    def __init__(self, cases: list[Case], geometry: Geometry = BRATS_GEOMETRY):
        if not cases:
            raise ValueError("bratsloader.py: BratsDataset needs at least one case")
        self.cases = list(cases)
        self.geometry = geometry
        self.has_seg = all(c.seg_path is not None for c in self.cases)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict:
        data = load_case(self.cases[index], self.geometry)
        item = {
            "volumes": torch.from_numpy(data.volumes),
            "available": torch.from_numpy(data.available),
            "brain_mask": torch.from_numpy(data.brain_mask),
            "case_id": data.case.case_id,
        }
        if self.has_seg:
            item["seg"] = torch.from_numpy(data.seg)
        return item


# --------------------------------------------------------------------------- writing


def write_nifti(
    path: str | os.PathLike, image: nib.Nifti1Image, *, overwrite: bool = False
) -> Path:
    """Save ``image`` atomically (``fileio.atomic_write``; the temporary name keeps the NIfTI suffix).

    Without ``overwrite`` an existing ``path`` is never replaced, not even one that appears while
    the file is being written (``FileExistsError``, naming it).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(errno.EEXIST, "exists; pass overwrite=True to replace it", str(path))
    return atomic_write(path, lambda tmp: nib.save(image, tmp), suffix=NIFTI_SUFFIX, replace=overwrite)


DESCRIP_BYTES = 80  # the NIfTI-1 header's description field


def synthesis_description(target: str, method: str, nfe: int, checkpoint_sha256: str) -> str:
    """The header description of a synthesised volume: what it is and how it was made, e.g.
    ``"SYNTHETIC t2f: Fast-cWDM ddim 4 NFE, checkpoint sha256 1a2b3c4d5e6f"`` (the checkpoint by its
    content, so the same weights give the same file wherever they came from; cut to the 80 bytes the
    header holds)."""
    text = f"SYNTHETIC {target}: Fast-cWDM {method} {nfe} NFE, checkpoint sha256 {checkpoint_sha256[:12]}"
    return text.encode("ascii", "replace")[:DESCRIP_BYTES].decode("ascii")


def save_volume(
    path: str | os.PathLike,
    vol,
    reference: nib.Nifti1Image,
    *,
    overwrite: bool = False,
    dtype=np.float32,
    description: str = "SYNTHETIC: Fast-cWDM",
) -> Path:
    """Write a synthesised ``vol`` (values in [0, 1]) on the reference's grid with its affine and header.

    Args:
        vol: (X, Y, Z) numpy array or tensor on the original grid (``to_original_grid``).
        reference: image of the case (``load_reference``). Its grid (affine, codes, units) is kept;
            what describes the reference's own values is reset: data type, scaling, display range
            (``cal_min/cal_max`` = 0/1), intent (none: not a label map or statistic), auxiliary
            file, and ``description`` (see :func:`synthesis_description`).
    """
    if isinstance(vol, torch.Tensor):
        vol = vol.detach().cpu().numpy()
    if tuple(vol.shape) != tuple(reference.shape):
        raise ValueError(
            f"bratsloader.py: cannot save {path}: volume shape {vol.shape} != reference "
            f"shape {reference.shape} (map it back with to_original_grid first)"
        )
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(None, None)
    header.set_intent("none", (), name="")
    header["cal_min"], header["cal_max"] = 0.0, 1.0
    header["aux_file"] = b""
    header["descrip"] = description.encode("ascii", "replace")[:DESCRIP_BYTES]
    image = type(reference)(np.asarray(vol, dtype=dtype), reference.affine, header=header)
    return write_nifti(path, image, overwrite=overwrite)
