"""Export completed BraTS cases as an nnU-Net v2 raw test set (``imagesTs`` + ``dataset.json``).

Layout written (nnU-Net v2 "raw dataset" format)::

    <out>/imagesTs/<case>_0000.nii.gz   t1n   (T1, native)
    <out>/imagesTs/<case>_0001.nii.gz   t1c   (T1, contrast-enhanced)
    <out>/imagesTs/<case>_0002.nii.gz   t2w   (T2)
    <out>/imagesTs/<case>_0003.nii.gz   t2f   (T2-FLAIR)
    <out>/dataset.json                  channel_names, labels, numTest, file_ending

The channel order is the one of nnU-Net's own BraTS conversion script,
``nnunetv2/dataset_conversion/Dataset137_BraTS21.py`` in MIC-DKFZ/nnUNet (read at commit
017de4adbc55709423ac569c51191df8a6af7ee5): ``_t1 -> _0000``, ``_t1ce -> _0001``, ``_t2 -> _0002``,
``_flair -> _0003``, ``channel_names={0: 'T1', 1: 'T1ce', 2: 'T2', 3: 'Flair'}``; BraTS 2023 renamed
the files t1n, t1c, t2w, t2f, so the same order reads t1n, t1c, t2w, t2f (and equals ``MODALITIES``).
A model trained with another order must be fed in its own order: check its ``dataset.json``.

``labels`` lists the BraTS 2023 label values (0 background, 1 necrotic core, 2 oedema, 3 enhancing);
nnU-Net predicts with the ``dataset.json`` stored with the trained model, so this one only describes
the export. Files are copied byte for byte (the input is only read); the export is built in a
staging folder and moved into place at the end, into a folder that must not exist or be empty.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from .bratsloader import NIFTI_SUFFIX, SEG, SEG_LABELS, Case, CaseError, check_case, expected_path
from .constants import MODALITIES
from .fileio import save_json

logger = logging.getLogger(__name__)

NNUNET_CHANNELS: dict[str, int] = {"t1n": 0, "t1c": 1, "t2w": 2, "t2f": 3}  # Dataset137_BraTS21.py order
CHANNEL_NAMES = {"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"}  # the names that script gives them
LABELS = {"background": 0, "necrotic tumour core": 1, "peritumoural oedema": 2, "enhancing tumour": 3}
IMAGES_TS = "imagesTs"


def channel_file(images_dir: Path, case_id: str, modality: str) -> Path:
    """``<images_dir>/<case>_000<k>.nii.gz`` of ``modality``."""
    return images_dir / f"{case_id}_{NNUNET_CHANNELS[modality]:04d}{NIFTI_SUFFIX}"


def complete_case(case: Case, synth_dir: Path | None) -> Case:
    """``case`` with its missing modalities taken from ``<synth_dir>/<case>/<case>-<mod>.nii.gz``;
    CaseError naming the first modality found in neither place."""
    files = dict(case.files)
    for modality in MODALITIES:
        if modality not in files and synth_dir is not None:
            candidate = expected_path(synth_dir / case.case_id, modality)
            if candidate.is_file():
                files[modality] = candidate
        if modality not in files:
            where = f" nor in {synth_dir / case.case_id}" if synth_dir is not None else ""
            raise CaseError(expected_path(case.folder, modality), f"{modality} is missing here{where}; "
                                                                  "an nnU-Net export needs all four modalities")
    return Case(case.case_id, case.folder, files)


def export_nnunet(data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  synth_dir: str | os.PathLike | None = None) -> tuple[list[str], list[CaseError]]:
    """Write the cases of ``data_dir`` (missing modalities from ``synth_dir``) as an nnU-Net test set.

    Args:
        data_dir: BraTS-layout folder; cases may lack modalities that ``synth_dir`` holds (e.g. a
            pseudo-validation folder and the ``sample_auto.py`` output for it).
        out_dir: a folder that does not exist or is empty (anything else: FileExistsError).
        synth_dir: folder of ``<case>/<case>-<mod>.nii.gz`` syntheses, or None.

    Returns:
        ``(case_ids exported, errors)``: a case that is incomplete or whose files disagree (shape,
        affine) is skipped and reported, never exported.
    """
    data_dir, out = Path(data_dir), Path(out_dir)
    synth = Path(synth_dir) if synth_dir is not None else None
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: the output folder exists and is not empty; an nnU-Net export is written "
                              "into a new or empty folder only (nothing was written)")
    resolved = out.resolve()
    for source in filter(None, (data_dir, synth)):
        src = source.resolve()
        if resolved == src or src in resolved.parents or resolved in src.parents:
            raise ValueError(f"{out}: the output folder overlaps the input {source}; choose one outside it")
    if not data_dir.is_dir():
        raise CaseError(data_dir, "dataset folder does not exist or is not a folder")
    cases, errors = [], []
    for folder in sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        present = {n: expected_path(folder, n) for n in (*MODALITIES, SEG)}
        case = Case(folder.name, folder, {n: p for n, p in present.items() if p.is_file()})
        try:
            case = complete_case(case, synth)
            check_case(case, geometry=None)
            cases.append(case)
        except CaseError as err:
            logger.warning("skipping case: %s", err)
            errors.append(err)
    if not cases:
        raise CaseError(data_dir, "no case with all four modalities to export" +
                        (f" (first problem: {errors[0]})" if errors else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))
    try:
        images = staging / IMAGES_TS
        images.mkdir()
        for case in cases:
            for modality in MODALITIES:
                shutil.copyfile(case.files[modality], channel_file(images, case.case_id, modality))
        save_json({"channel_names": CHANNEL_NAMES, "labels": LABELS, "numTraining": 0, "numTest": len(cases),
                   "file_ending": NIFTI_SUFFIX, "label_set": list(SEG_LABELS),
                   "modality_of_channel": {str(k): m for m, k in NNUNET_CHANNELS.items()},
                   "description": "BraTS 2023 cases exported by Fast-cWDM (synthesised modalities included)"},
                  staging / "dataset.json")
        if out.exists():
            out.rmdir()  # empty (checked above); os.replace needs the name free or an empty folder
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("%s: %d cases in nnU-Net v2 layout", out, len(cases))
    return [c.case_id for c in cases], errors
