"""Where a run's data and a result's model came from.

* :func:`data_fingerprint`: which dataset a run was trained on (sorted case ids and a cheap
  content digest), stored in ``run_config.json`` and in the checkpoints' ``extra["data"]``;
  :func:`check_resume_data` refuses to continue a run on other data.
* :func:`model_provenance`: the checkpoint behind a result (file, content hash, training step,
  hub commit, the configuration and whether it was stored, stated or inferred), written into
  ``metrics.json`` / ``sample_config.json`` and ``completion_report.json``.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger(__name__)

FINGERPRINT_VERSION = 1
EDGE_BYTES = 4096  # bytes read from each end of a file for the cheap content digest
RUN_CONFIG = "run_config.json"


class RunMismatch(RuntimeError):
    """An existing run folder holds a run on other data; the message says what differs and how to start fresh."""


def file_signature(path: str | Path) -> str:
    """A cheap content digest of one file: its size and the SHA-256 of its first and last
    ``EDGE_BYTES`` bytes. For ``.nii.gz`` files the last 8 bytes are gzip's CRC-32 and length of
    the whole uncompressed volume, so any voxel change shows; the NIfTI header is in the first
    bytes. Independent of the file's name, folder and modification time."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as fh:
        h.update(fh.read(EDGE_BYTES))
        if size > EDGE_BYTES:
            fh.seek(max(EDGE_BYTES, size - EDGE_BYTES))
            h.update(fh.read())
    return h.hexdigest()


def data_fingerprint(cases: Sequence) -> dict[str, Any]:
    """Which data a list of cases is: ``{"version", "n_cases", "case_ids" (sorted), "digest"}``.

    ``cases``: objects with ``case_id`` and ``files`` (name -> path), e.g. ``bratsloader.Case``.
    The digest covers every case id, file role (modality / seg) and :func:`file_signature`; it
    does not depend on where the folder lies, so a moved or copied dataset keeps its fingerprint.
    """
    h = hashlib.sha256()
    for case in sorted(cases, key=lambda c: c.case_id):
        for role in sorted(case.files):
            h.update(f"{case.case_id}\0{role}\0{file_signature(case.files[role])}\n".encode())
    ids = sorted(c.case_id for c in cases)
    return {"version": FINGERPRINT_VERSION, "n_cases": len(ids), "case_ids": ids, "digest": h.hexdigest()}


def _names(ids: list[str], limit: int = 3) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def fingerprint_difference(stored: dict, current: dict) -> list[str]:
    """What differs between two :func:`data_fingerprint` results, in words (empty: the same data)."""
    if stored.get("digest") == current.get("digest") and stored.get("case_ids") == current.get("case_ids"):
        return []
    before, now = set(stored.get("case_ids", [])), set(current.get("case_ids", []))
    out = []
    if now - before:
        out.append(f"{len(now - before)} new cases ({_names(sorted(now - before))})")
    if before - now:
        out.append(f"{len(before - now)} cases gone ({_names(sorted(before - now))})")
    if not out:
        out.append(f"the same {len(now)} case ids with different file contents")
    return out


def check_resume_data(run_dir: str | Path, data: dict[str, dict]) -> None:
    """Refuse (:class:`RunMismatch`) to resume the run in ``run_dir`` on other data.

    ``data``: ``{"train": fingerprint, "val": fingerprint}`` of this start. The run's own record
    is ``run_dir/run_config.json``'s ``"data"`` (older runs: its ``train_cases`` / ``val_cases``
    lists, compared by id only, with a warning). A run without a record resumes with a warning.
    """
    run_dir = Path(run_dir)
    path = run_dir / RUN_CONFIG
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        logger.warning("%s: no record of the data this run was trained on; resuming without checking it", path)
        return
    except (OSError, ValueError) as err:
        raise RunMismatch(f"{path}: unreadable ({err}); cannot check that the run used this data") from None
    differences = []
    for split in ("train", "val"):
        if "data" in stored:
            diff = fingerprint_difference(stored["data"].get(split, {}), data[split])
        else:
            logger.warning("%s: written by an older version (case ids only): file contents not checked", path)
            ids = stored.get(f"{split}_cases", [])
            diff = fingerprint_difference({"case_ids": sorted(ids)}, {"case_ids": data[split]["case_ids"]})
        differences += [f"{split}: {d}" for d in diff]
    if differences:
        was = (stored.get("train") or {}).get("data_dir", "?")
        raise RunMismatch(
            f"{run_dir} holds a run trained on other data ({was}); refusing to resume it: "
            + "; ".join(differences)
            + f". To start a new run, choose another folder (train.py --run_dir DIR, or bash run.sh --run_dir DIR) "
              f"or move {run_dir} away; to continue this one, pass the data it was trained on.")


def held_out_case_ids(run_config: str | Path) -> list[str]:
    """The validation cases a training run held out (``run_config.json``'s ``val_cases``), for
    scoring a model on cases it was not trained on. RunMismatch when there are none."""
    path = Path(run_config)
    if path.is_dir():
        path = path / RUN_CONFIG
    try:
        ids = json.loads(path.read_text()).get("val_cases") or []
    except (OSError, ValueError) as err:
        raise RunMismatch(f"{path}: cannot read the run's held-out cases ({err})") from None
    if not ids:
        raise RunMismatch(f"{path}: the run held out no validation cases (trained with --val_cases 0?); "
                          "score the model on a separate folder (--data_dir) instead of its training data")
    return list(ids)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a whole file (the content hash of a checkpoint)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def hub_commit(path: str | Path) -> str | None:
    """The commit a file from the Hugging Face cache belongs to (``.../snapshots/<commit>/<file>``)."""
    parts = Path(path).parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "snapshots":
            return parts[i + 1]
    return None


def model_provenance(loaded, source: str, path: str | Path, sample_config=None) -> dict[str, Any]:
    """Where a loaded model came from: ``source`` as given, the local ``file``, its ``sha256``,
    the training ``step``, ``format`` (``fast-cwdm`` or ``cwdm``), how its configuration is known
    (``config_origin``), the model and diffusion configs, the data it was trained on (when its
    checkpoint records it), for ``hf://`` sources the resolved ``hub_commit``, and the sampling
    settings used (``sample_config``, when given)."""
    extra = loaded.extra or {}
    cwdm = extra.get("origin") == "cwdm"
    out: dict[str, Any] = {
        "source": source, "file": str(path), "sha256": file_sha256(path), "step": loaded.step,
        "format": "cwdm" if cwdm else "fast-cwdm",
        "config_origin": extra.get("config_origin", "stored in the checkpoint"),
        "model_config": loaded.model_config.to_dict(), "diffusion_config": loaded.diffusion_config.to_dict(),
    }
    if "data" in extra:
        out["trained_on"] = {split: {k: fp.get(k) for k in ("n_cases", "digest")}
                             for split, fp in extra["data"].items()}
    if source.startswith("hf://"):
        out["hub_commit"] = hub_commit(path)
    if sample_config is not None:
        out["sample_config"] = sample_config.to_dict()
    return out
