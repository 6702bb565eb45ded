"""Bad-input corpus: tiny BraTS-layout folders, one defect per case, generated on the fly.

Nothing here is committed as a binary: every file is written with nibabel (or byte surgery on a
file nibabel wrote). The volumes use ``GEOMETRY`` (BraTS scaled to 18 x 18 x 12 voxels; network
grid 16 x 16 x 12, which the ``tiny`` preset's model accepts).

    python tests/bad_input_corpus.py --out /tmp/corpus   # build the corpus and a tiny checkpoint
    python tests/bad_input_corpus.py --table             # run every entry point, print docs/bad_input.md

``run_entry_points`` runs ``train.py``, ``sample.py`` (synthesis + evaluation), ``sample_auto.py``
and ``drop_modality.py`` over the corpus as subprocesses, as a user runs them, and returns per entry
point its exit code, stderr and the summary lines naming each bad case; ``fatal_messages`` runs
them in this process on an empty and on a missing dataset folder. ``tests/test_bad_input.py``
asserts on both and ``docs/bad_input.md`` is their table.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from guided_diffusion.bratsloader import Geometry, expected_path  # noqa: E402
from guided_diffusion.conditioning import MODALITIES  # noqa: E402

GEOMETRY = Geometry.scaled(18 / 240)  # files (18, 18, 12), network grid (16, 16, 12)
AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])
AFFINE[:3, 3] = (9.0, 9.0, -6.0)
DEFECT_FILE = "t1c"  # the modality that carries a file defect
AUTO_MISSING = "t2f"  # the modality auto-mode cases lack
N_GOOD = 2
SCRIPTS = REPO_ROOT / "scripts"
ENTRY_POINTS = ("train.py", "sample.py", "sample_auto.py", "drop_modality.py")


# --------------------------------------------------------------------------- good volumes


def brain_volume(seed: int, shape=GEOMETRY.original_shape) -> np.ndarray:
    """A positive ellipsoidal 'brain' with smooth texture in a zero background, float32."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    inside = (grid**2).sum(0) < 0.8
    texture = 50 + 10 * np.sin(3 * grid[0] + rng.uniform(0, 6)) + rng.uniform(0, 20, shape)
    return (texture * inside).astype(np.float32)


def seg_volume(seed: int, shape=GEOMETRY.original_shape) -> np.ndarray:
    seg = np.zeros(shape, dtype=np.uint8)
    c = [s // 2 for s in shape]
    seg[c[0] - 2 : c[0] + 2, c[1] - 2 : c[1] + 2, c[2] - 2 : c[2] + 2] = 2
    seg[c[0] - 1 : c[0] + 1, c[1] - 1 : c[1] + 1, c[2] - 1 : c[2] + 1] = 1 + seed % 3
    return seg


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, path)
    return path


def write_case(root: Path, case_id: str, *, seed: int = 0, skip=(), seg: bool = True,
               shape=GEOMETRY.original_shape) -> Path:
    """A good case folder with the modalities not in ``skip`` (and a segmentation)."""
    folder = root / case_id
    folder.mkdir(parents=True)
    for i, m in enumerate(MODALITIES):
        if m not in skip:
            save_nifti(expected_path(folder, m), brain_volume(seed * 10 + i, shape))
    if seg:
        save_nifti(expected_path(folder, "seg"), seg_volume(seed, shape))
    return folder


# --------------------------------------------------------------------------- defects


def _truncate(path: Path, keep_fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


def _gzip_payload(path: Path, payload: bytes) -> None:
    with gzip.open(path, "wb") as fh:
        fh.write(payload)


def _voxels(path: Path, edit: Callable[[np.ndarray], np.ndarray], shape=None) -> None:
    data = brain_volume(7) if shape is None else brain_volume(7, shape)
    save_nifti(path, edit(data))


def _with_nan(d):
    d[5, 5, 5] = d[6, 6, 6] = np.nan
    return d


def _with_inf(d):
    d[5, 5, 5] = np.inf
    return d


def _dangling_symlink(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.parent / "no-such-target.nii.gz")


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _unreadable(path: Path) -> str | None:
    path.chmod(0)
    if os.access(path, os.R_OK):  # root (CAP_DAC_OVERRIDE) reads it anyway
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)
        return ("running as root: chmod 000 does not stop root from reading, so the file is readable; "
                "the dangling-symlink and FIFO cases cover files that cannot be read")
    return None


@dataclass
class Defect:
    """One bad case.

    ``build(path)`` spoils ``path`` (the case's ``target`` file) in place and returns a skip reason
    (str) when the defect cannot be produced here; ``build_case(root, case_id, mode)`` instead
    writes the whole case folder. ``expect`` is what the message must say: the path it names,
    relative to the dataset folder (``{case}`` = the case id), and a phrase of the problem;
    ``expect_auto`` overrides it for auto mode.
    """

    name: str
    description: str
    build: Callable[[Path], object] | None = None
    build_case: Callable[[Path, str, str], None] | None = None
    expect: tuple[str, str] = ("{case}/{case}-t1c.nii.gz", "")
    expect_auto: tuple[str, str] | None = None
    modes: tuple[str, ...] = ("train", "auto")
    target: str = DEFECT_FILE  # file the defect is put into (seg for label defects)
    skip_reason: dict[str, str] = field(default_factory=dict)  # mode -> reason, filled by build

    def case_id(self) -> str:
        return f"bad-{self.name.replace('_', '-')}"

    def expected(self, mode: str) -> tuple[str, str]:
        path, problem = self.expect_auto if mode == "auto" and self.expect_auto else self.expect
        return path.format(case=self.case_id()), problem


def _uncompressed_under_gz_name(path: Path) -> None:
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(data)


def _complex_voxels(path: Path) -> None:
    save_nifti(path, brain_volume(7).astype(np.complex64) + 1j)


RGB = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])


def _rgb_voxels(path: Path) -> None:
    rgb = np.zeros(GEOMETRY.original_shape, dtype=RGB)
    rgb["R"] = brain_volume(7).astype(np.uint8)
    save_nifti(path, rgb)


def _nan_affine(path: Path) -> None:
    image = nib.Nifti1Image(brain_volume(7), AFFINE)
    srow = AFFINE.copy()
    srow[0, 3] = np.nan
    image.header.set_sform(srow, code=1)  # set_sform stores the rows as given (no decomposition)
    image.header.set_qform(None, code=0)
    image.update_header = lambda: None  # nib.save must keep the NaN sform instead of recomputing it
    nib.save(image, path)


HUGE_CLAIM = (1200, 1200, 1200)  # float32: 6.9 GB of voxels


def _header_claims_huge(path: Path) -> None:
    """A ~100-byte gzip file: a bare NIfTI header claiming ``HUGE_CLAIM`` float32 voxels, no data."""
    header = nib.Nifti1Header()
    header.set_data_shape(HUGE_CLAIM)
    header.set_data_dtype(np.float32)
    header.set_sform(AFFINE, code=1)
    header["vox_offset"] = 352
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4, mtime=0))


BOMB_BYTES = 64 << 20  # the trailing member inflates to 64 MiB from ~64 kB (the bound test uses more)


def gzip_bomb(path: Path, size: int = BOMB_BYTES) -> None:
    """Append a gzip member of ``size`` zero bytes to a valid ``.nii.gz`` (gzip readers concatenate
    members, so the file inflates to the volume plus ``size`` bytes)."""
    import zlib

    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = b"\0" * (1 << 20)
    with open(path, "ab") as fh:
        for _ in range(size // len(chunk)):
            fh.write(comp.compress(chunk))
        fh.write(comp.flush())


def _seg_unknown_labels(path: Path) -> None:
    seg = seg_volume(0)
    seg[seg == 2] = 7
    seg[0, 0, 0] = 5
    save_nifti(path, seg)


def _shape_mismatch(path: Path) -> None:
    _voxels(path, lambda d: d, shape=(18, 18, 13))


def _affine_mismatch(path: Path) -> None:
    shifted = AFFINE.copy()
    shifted[:3, 3] += (4.0, 0.0, 0.0)
    save_nifti(path, brain_volume(7), shifted)


def _wrong_inplane_case(root: Path, case_id: str, mode: str) -> None:
    folder = root / case_id
    folder.mkdir(parents=True)
    for i, m in enumerate(MODALITIES):
        if mode == "train" or m != AUTO_MISSING:
            save_nifti(expected_path(folder, m), brain_volume(i, (20, 18, 12)))


def _empty_case(root: Path, case_id: str, mode: str) -> None:
    (root / case_id).mkdir(parents=True)


def _unexpected_name_case(root: Path, case_id: str, mode: str) -> None:
    folder = write_case(root, case_id, seed=5, skip=(AUTO_MISSING,) if mode == "auto" else (), seg=mode == "train")
    os.replace(expected_path(folder, "t1n"), folder / f"{case_id}-T1.nii.gz")


def _extra_file_case(root: Path, case_id: str, mode: str) -> None:
    folder = write_case(root, case_id, seed=6, skip=(AUTO_MISSING,) if mode == "auto" else (), seg=mode == "train")
    (folder / "notes.txt").write_text("scanner notes\n")


def _none_missing_case(root: Path, case_id: str, mode: str) -> None:
    write_case(root, case_id, seed=8, seg=False)


def _two_missing_case(root: Path, case_id: str, mode: str) -> None:
    write_case(root, case_id, seed=9, skip=("t1n", AUTO_MISSING), seg=False)


T1C = "{case}/{case}-t1c.nii.gz"
DEFECTS: list[Defect] = [
    Defect("truncated_gzip", "truncated `.nii.gz` (cut at 60 %, inside the voxel data)", lambda p: _truncate(p, 0.6),
           expect=(T1C, "cannot read voxel data, file truncated or corrupt")),
    Defect("truncated_header", "truncated `.nii.gz` (cut at 100 bytes, inside the header)",
           lambda p: p.write_bytes(p.read_bytes()[:100]), expect=(T1C, "or its header is truncated")),
    Defect("corrupt_gzip", "corrupt `.nii.gz` (64 bytes of the compressed stream zeroed)",
           lambda p: p.write_bytes(p.read_bytes()[:200] + b"\x00" * 64 + p.read_bytes()[264:]),
           expect=(T1C, "CRC check failed")),
    Defect("text_not_nifti", "a text file with a NIfTI name (not gzip)",
           lambda p: p.write_text("this is not an image\n"), expect=(T1C, "cannot read as NIfTI")),
    Defect("gzip_not_nifti", "gzip-compressed text with a NIfTI name",
           lambda p: _gzip_payload(p, b"this is not an image either\n" * 20), expect=(T1C, "not a NIfTI image")),
    Defect("volume_2d", "2D volume", lambda p: save_nifti(p, brain_volume(7)[:, :, 6]),
           expect=(T1C, "expected a 3D volume, got 2D")),
    Defect("volume_4d", "4D volume", lambda p: save_nifti(p, np.stack([brain_volume(7)] * 2, -1)),
           expect=(T1C, "expected a 3D volume, got 4D")),
    Defect("wrong_inplane_size", "wrong in-plane size (every file 20 x 18 x 12, dataset 18 x 18 x 12)",
           build_case=_wrong_inplane_case,
           expect=("{case}/{case}-t1n.nii.gz", "shape (20, 18, 12) differs from the dataset's (18, 18, 12)")),
    Defect("nan_voxels", "NaN voxels", lambda p: _voxels(p, _with_nan), expect=(T1C, "2 voxels are NaN or Inf")),
    Defect("inf_voxels", "Inf voxel", lambda p: _voxels(p, _with_inf), expect=(T1C, "1 voxel is NaN or Inf")),
    Defect("all_zero", "all-zero volume", lambda p: _voxels(p, np.zeros_like), expect=(T1C, "all zero")),
    Defect("shape_mismatch", "modalities whose shapes disagree (18 x 18 x 13 vs 18 x 18 x 12)", _shape_mismatch,
           expect=(T1C, "shape (18, 18, 13) differs from")),
    Defect("affine_mismatch", "modalities whose affines disagree (4 mm shift)", _affine_mismatch,
           expect=(T1C, "affine differs from")),
    Defect("none_missing", "auto mode: no modality missing", build_case=_none_missing_case, modes=("auto",),
           expect=("{case}", "no modality is missing")),
    Defect("two_missing", "auto mode: two modalities missing", build_case=_two_missing_case, modes=("auto",),
           expect=("{case}", "2 modalities missing (t1n, t2f)")),
    Defect("misnamed_file", "unexpected file name (`<case>-T1.nii.gz` instead of `<case>-t1n.nii.gz`)",
           build_case=_unexpected_name_case, expect=("{case}/{case}-T1.nii.gz", "unexpected file")),
    Defect("extra_file", "unexpected extra file (`notes.txt`) in a case folder", build_case=_extra_file_case,
           expect=("{case}/notes.txt", "unexpected file")),
    Defect("empty_case_folder", "empty case folder", build_case=_empty_case,
           expect=("{case}/{case}-t1n.nii.gz", "the case folder is empty"),
           expect_auto=("{case}", "the case folder is empty")),
    Defect("dangling_symlink", "unreadable file: dangling symbolic link", _dangling_symlink,
           expect=(T1C, "broken symbolic link")),
    Defect("fifo", "unreadable file: a FIFO (named pipe) instead of a file", _fifo, expect=(T1C, "FIFO")),
    Defect("unreadable_chmod000", "unreadable file: permissions 000", _unreadable,
           expect=(T1C, "cannot read: Permission denied")),
    Defect("uncompressed_nifti", "an uncompressed NIfTI file under a `.nii.gz` name", _uncompressed_under_gz_name,
           expect=(T1C, "an uncompressed NIfTI file under a .nii.gz name")),
    Defect("empty_placeholder", "0-byte placeholder file for a modality", lambda p: p.write_bytes(b""),
           expect=(T1C, "empty file (0 bytes)")),
    Defect("complex_voxels", "complex-valued voxels (complex64)", _complex_voxels,
           expect=(T1C, "unsupported voxel data type complex64")),
    Defect("rgb_voxels", "RGB voxels", _rgb_voxels, expect=(T1C, "unsupported voxel data type R/G/B (colour)")),
    Defect("nan_affine", "affine with NaN (sform translation)", _nan_affine, expect=(T1C, "contains NaN or Inf")),
    Defect("header_claims_huge", "a 100-byte `.nii.gz` whose header claims 1200^3 float32 voxels",
           _header_claims_huge, expect=(T1C, "larger than the BraTS grid")),
    Defect("gzip_bomb", "decompression bomb: a valid `.nii.gz` plus a gzip member inflating to 64 MiB", gzip_bomb,
           expect=(T1C, "decompresses to more than")),
    Defect("seg_unknown_labels", "segmentation with unknown labels (5 and 7)", _seg_unknown_labels, target="seg",
           expect=("{case}/{case}-seg.nii.gz", "segmentation labels [5, 7] outside (0, 1, 2, 3)")),
]
ENVIRONMENT_DEPENDENT = {"unreadable_chmod000"}  # its row depends on whether the tests run as root
DATASET_DEFECTS = {  # whole-dataset problems: fatal (exit code 2)
    "empty_dataset": "empty dataset folder",
    "missing_dataset": "dataset folder does not exist",
}


def build_corpus(root: Path, modes=("train", "auto")) -> dict[str, Path]:
    """Write ``root/<mode>/`` for each mode: ``N_GOOD`` good cases and every applicable defect.

    Train-mode cases have four modalities and a segmentation; auto-mode cases lack ``AUTO_MISSING``
    and the segmentation (except the seg-label defect). Returns mode -> dataset folder.
    """
    folders = {}
    for mode in modes:
        data = root / mode
        auto = mode == "auto"
        for i in range(N_GOOD):
            write_case(data, f"good-{i:03d}", seed=i, skip=(AUTO_MISSING,) if auto else (), seg=not auto)
        for defect in DEFECTS:
            if mode not in defect.modes:
                continue
            case_id = defect.case_id()
            if defect.build_case is not None:
                defect.build_case(data, case_id, mode)
                continue
            with_seg = not auto or defect.target == "seg"
            folder = write_case(data, case_id, seed=3, skip=(AUTO_MISSING,) if auto else (), seg=with_seg)
            reason = defect.build(expected_path(folder, defect.target))
            if isinstance(reason, str):
                defect.skip_reason[mode] = reason
        folders[mode] = data
    return folders


def write_tiny_checkpoint(path: Path) -> Path:
    """An (untrained) checkpoint of the ``tiny`` preset, as train.py would save it."""
    import torch

    from guided_diffusion.checkpoints import save_checkpoint
    from guided_diffusion.factory import build_model, build_schedule
    from guided_diffusion.presets import get_preset

    preset = get_preset("tiny")
    torch.manual_seed(0)
    state = build_model(preset.model).state_dict()
    return save_checkpoint(path, {
        "model": state, "ema": state, "optimizer": None, "step": 0,
        "config": {"model": preset.model.to_dict(), "diffusion": preset.diffusion.to_dict(),
                   "train": preset.train.to_dict()},
        "schedule": build_schedule(preset.diffusion).state_dict(), "extra": {"sample": preset.sample.to_dict()}})


# --------------------------------------------------------------------------- running the entry points


def tree_digest(root: Path) -> dict[str, str]:
    """Path -> content hash (regular files), link target (symlinks) or file type (others)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            st = path.lstat()
            key = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[key] = f"symlink -> {os.readlink(path)}"
            elif stat.S_ISREG(st.st_mode):
                try:
                    digest = hashlib.sha256(path.read_bytes()).hexdigest()
                except PermissionError:
                    digest = "unreadable"
                out[key] = f"file {stat.filemode(st.st_mode)} {st.st_size} {digest}"
            else:
                out[key] = f"{stat.filemode(st.st_mode)} {st.st_mtime_ns}"
    return out


def entry_point_commands(corpus: dict[str, Path], checkpoint: Path, work: Path) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "train.py": [py, str(SCRIPTS / "train.py"), "--preset", "tiny", "--data_dir", str(corpus["train"]),
                     "--run_dir", str(work / "run"), "--max_steps", "1", "--cpu"],
        "sample.py": [py, str(SCRIPTS / "sample.py"), "--checkpoint", str(checkpoint), "--data_dir",
                      str(corpus["train"]), "--target", "t2f", "--out_dir", str(work / "sample"), "--nfe", "2",
                      "--device", "cpu"],
        "sample_auto.py": [py, str(SCRIPTS / "sample_auto.py"), "--data_dir", str(corpus["auto"]), "--checkpoint",
                           f"{AUTO_MISSING}={checkpoint}", "--out_dir", str(work / "auto"), "--nfe", "2",
                           "--device", "cpu"],
        "drop_modality.py": [py, str(SCRIPTS / "drop_modality.py"), "--input", str(corpus["train"]),
                             "--output", str(work / "dropped")],
    }


SUMMARY_MARK = "failed:"  # cli.report_failures: "<n> <what> failed:" then one "  <error>" per line


def summary_lines(stderr: str) -> list[str]:
    """The per-failure lines of the summary report_failures logs at the end."""
    lines = stderr.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].rstrip().endswith(SUMMARY_MARK):
            return [line.split(": ", 1)[1].strip() for line in lines[i + 1 :] if ":   " in line]
    return []


def message_for(case_id: str, lines: list[str]) -> list[str]:
    return [line for line in lines if f"/{case_id}/" in line or line.split(":")[0].endswith(f"/{case_id}")]


@dataclass
class EntryPointRun:
    name: str
    returncode: int
    stderr: str
    stdout: str
    messages: dict[str, list[str]]  # case id -> summary lines naming it
    inputs_unchanged: bool


def run_entry_points(corpus: dict[str, Path], checkpoint: Path, work: Path,
                     names=ENTRY_POINTS) -> dict[str, EntryPointRun]:
    """Run the entry points over the corpus (two at a time); check the inputs stay unchanged."""
    commands = entry_point_commands(corpus, checkpoint, work)
    before = {mode: tree_digest(folder) for mode, folder in corpus.items()}
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("FASTCWDM_DEBUG", None)
    runs = {}
    pending = list(names)
    while pending:
        batch, pending = pending[:2], pending[2:]
        procs = {n: subprocess.Popen(commands[n], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env, cwd=REPO_ROOT) for n in batch}
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=300)
            lines = summary_lines(stderr)
            mode = "auto" if name == "sample_auto.py" else "train"
            messages = {d.case_id(): message_for(d.case_id(), lines) for d in DEFECTS if mode in d.modes}
            runs[name] = EntryPointRun(name, proc.returncode, stderr, stdout, messages, True)
    after = {mode: tree_digest(folder) for mode, folder in corpus.items()}
    for run in runs.values():
        run.inputs_unchanged = before == after
    return runs


def relative(message: str, roots: list[Path]) -> str:
    for root in roots:
        message = message.replace(str(root) + "/", "")
    return message


def markdown_table(corpus: dict[str, Path], runs: dict[str, EntryPointRun],
                   fatal: dict[str, dict[str, str]]) -> str:
    roots = sorted(corpus.values(), key=lambda p: -len(str(p)))
    lines = [
        "# Bad input: what each entry point says",
        "",
        "Generated by `python tests/bad_input_corpus.py --table > docs/bad_input.md` from the messages the",
        "scripts actually print; `tests/test_bad_input.py` checks that they still do. Each bad case gets one",
        "message naming the file and the problem, logged when it is skipped and repeated in the summary at",
        "the end; the other cases are processed and the command exits with 1 (2 when nothing is usable).",
        "No message is a traceback (set `FASTCWDM_DEBUG=1` to get one). Inputs are never modified.",
        "",
        f"The corpus: tiny volumes {GEOMETRY.original_shape}, {N_GOOD} good cases plus one case per defect; the",
        f"defect is in the `{DEFECT_FILE}` file unless stated; auto-mode cases lack `{AUTO_MISSING}`. Paths are",
        "relative to the dataset folder. Entry points: train.py (reads every voxel up front), sample.py",
        "(synthesis and evaluation), sample_auto.py (auto mode), drop_modality.py.",
        "",
        "Memory: every header is checked (shape no larger than BraTS, real scalar voxels, finite affine, a file",
        "large enough for what it claims) before a voxel is read, and a `.nii.gz` is decompressed streaming and",
        "never beyond the size its header implies, so a small hostile file cannot allocate more than a valid",
        "volume needs; checkpoints are compared with their config on the meta device before the model is built",
        "(tests/test_reliability.py measures peak memory for each). A `(X, Y, Z, 1)` volume is read as 3D.",
        "",
        "Outputs: never replaced unless `--overwrite` (published with `os.link`, so a file that appears while a",
        "case is synthesised is kept and the case reported), never inside the input dataset, created with the",
        "umask's permissions; SIGTERM is handled like Ctrl-C (temporary file removed, report written, exit 143).",
        "Per-case errors of any kind (full disk, read-only output, malformed checkpoint metadata ...) are one",
        "line; run-level ones (no CUDA, unwritable output folder, a grid the model cannot halve, a missing",
        "`--model_dir`) are one line before any work. A synthesis's header says what it is (description, display",
        "range 0-1, no intent code); `metrics.json` is strict JSON (null, with the reason, for undefined values).",
        "",
        "| case | entry points | message |",
        "| --- | --- | --- |",
    ]
    for defect in DEFECTS:
        by_message: dict[str, list[str]] = {}
        for name, run in runs.items():
            mode = "auto" if name == "sample_auto.py" else "train"
            if mode not in defect.modes:
                continue
            if mode in defect.skip_reason:
                msg = (f"(not run here: {defect.skip_reason[mode]}; for a user without the permission the message "
                       f"names `{defect.expected(mode)[0]}` and says `{defect.expected(mode)[1]}`, which "
                       "tests/test_bad_input.py checks in a process that drops to uid 65534)")
            else:
                found = run.messages.get(defect.case_id(), [])
                msg = relative(found[0], roots) if len(found) == 1 else f"UNEXPECTED: {found}"
            by_message.setdefault(msg.replace("|", "\\|"), []).append(name)
        for msg, names in by_message.items():
            lines.append(f"| {defect.description} | {', '.join(names)} | `{msg}` |" if not msg.startswith("(")
                         else f"| {defect.description} | {', '.join(names)} | {msg} |")
    for key, description in DATASET_DEFECTS.items():
        by_message = {}
        for name, msg in fatal.get(key, {}).items():
            by_message.setdefault(msg, []).append(name)
        for msg, names in by_message.items():
            lines.append(f"| {description} (fatal, exit 2) | {', '.join(names)} | `{msg}` |")
    return "\n".join(lines) + "\n"


def run_in_process(cmd: list[str]) -> tuple[int, list[logging.LogRecord]]:
    """``python scripts/<name>.py args`` run in this process through its ``main_guard`` (the same
    error handling as on the command line): (exit code, the log records it emitted). An exception
    that ``main_guard`` does not turn into a message propagates (the would-be traceback)."""
    import importlib

    from guided_diffusion.cli import main_guard

    module = importlib.import_module(f"guided_diffusion.commands.{Path(cmd[1]).stem}")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    root = logging.getLogger()
    root.addHandler(handler)  # also makes the script's logging.basicConfig a no-op
    try:
        main_guard(lambda: module.main(cmd[2:]))
    except SystemExit as done:
        return int(done.code or 0), records
    finally:
        root.removeHandler(handler)
    raise AssertionError(f"{cmd[1]} returned without sys.exit")


def fatal_messages(work: Path, checkpoint: Path) -> dict[str, dict[str, tuple[int, list[str], str]]]:
    """Each entry point on an empty and on a missing dataset folder, run in this process (they stop
    before any work): (exit code, its ERROR messages, the last one with the folder as <data_dir>)."""
    empty = work / "empty_dataset"
    empty.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict[str, tuple[int, list[str], str]]] = {}
    for key, folder in (("empty_dataset", empty), ("missing_dataset", work / "no_such_folder")):
        commands = entry_point_commands({"train": folder, "auto": folder}, checkpoint, work / f"out_{key}")
        out[key] = {}
        for name, cmd in commands.items():
            code, records = run_in_process(cmd)
            errors = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
            message = errors[-1] if errors else ""
            out[key][name] = (code, errors, message.replace(str(folder), "<data_dir>"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="build the corpus here (default: a temporary folder)")
    parser.add_argument("--table", action="store_true", help="run every entry point and print the markdown table")
    args = parser.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="bad_input_"))
    try:
        corpus = build_corpus(work / "corpus")
        checkpoint = write_tiny_checkpoint(work / "tiny.pt")
        if not args.table:
            print(f"corpus in {work / 'corpus'}, checkpoint {checkpoint}")
            return
        runs = run_entry_points(corpus, checkpoint, work / "out")
        fatal = {k: {n: m for n, (_, _, m) in v.items()} for k, v in fatal_messages(work / "fatal", checkpoint).items()}
        sys.stdout.write(markdown_table(corpus, runs, fatal))
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
