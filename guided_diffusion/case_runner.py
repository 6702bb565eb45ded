"""Sampling a dataset over several processes (``torchrun``), resumably (layer 4).

``sample.py`` and ``sample_auto.py`` run the same program on every rank:

* :func:`ranks_from_env` reads rank and world size from torchrun's environment (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``); a plain ``python`` start is rank 0 of 1 and needs no process
  group. :func:`rank_device` gives each rank its own GPU (``cuda`` -> ``cuda:<LOCAL_RANK>``).
* :func:`split_cases` deals the cases, sorted by id, round robin over the ranks: the split
  depends only on the case ids and the world size. A case's synthesis depends only on the seed,
  the model and the case (``seeding.case_generator``), so the files do not depend on the split.
* :func:`gather_reports` brings every rank's partial report to rank 0 (a ``gloo`` process group,
  made on first use when ``WORLD_SIZE`` > 1, also across nodes); rank 0 merges them with
  :func:`merge_reports` and writes the one ``metrics.json`` / ``completion_report.json``;
  :func:`finish` holds the other ranks until it has (torchrun stops every worker as soon as one
  exits with an error). Each rank's per-case failures are in the merged report; a rank that dies
  (an unexpected error, a killed node) makes torchrun stop the job with that rank's error and no
  merged report is written: nothing claims success, and a re-run with ``--resume`` finishes it.
* :class:`CaseJournal` (``--resume``): after a case's output is published, a completion record
  ``<out_dir>/.sampling_records/<output name>.json`` holds the output's SHA-256, the settings
  digest and the case's report entry. A re-run skips a case only when its record exists, the
  settings agree and the output's SHA-256 matches; an output without a record is never counted
  as done.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import torch
import torch.distributed as dist

from .bratsloader import CaseError
from .fileio import save_json
from .provenance import file_sha256

logger = logging.getLogger(__name__)

T = TypeVar("T")
RECORDS_DIR = ".sampling_records"  # hidden: case discovery skips it (also with sample_auto --in_place)
RECORD_VERSION = 1
# A rank that finished its share waits for the slowest one; the gloo default (30 min) is far
# shorter than one share of a large dataset at cWDM's budget.
GATHER_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ranks_from_env(environ: Mapping[str, str] | None = None) -> Ranks:
    """:class:`Ranks` from ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (each defaults to 0, 1, 0);
    ``ValueError`` naming the variable when one is not an integer or out of range."""
    env = os.environ if environ is None else environ
    values = {}
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        text = env.get(name, "")
        try:
            values[name] = int(text) if text.strip() else default
        except ValueError:
            raise ValueError(f"case_runner.py: environment variable {name}={text!r} is not an integer") from None
    rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"case_runner.py: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}: "
                         "need WORLD_SIZE >= 1 and 0 <= RANK < WORLD_SIZE")
    return Ranks(rank, world, local)


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """``cuda`` without an index becomes ``cuda:<local_rank>`` (one GPU per process, made current);
    any other device is kept."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", ranks.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def split_cases(cases: Sequence[T], ranks: Ranks, key: Callable[[T], str] = lambda c: c.case_id) -> list[T]:
    """This rank's share: the cases sorted by ``key`` (the case id), every ``world``-th from
    position ``rank``. Every case goes to exactly one rank; the order of ``cases`` does not matter."""
    ordered = sorted(cases, key=key)
    ids = [key(c) for c in ordered]
    if len(set(ids)) != len(ids):
        raise ValueError("case_runner.py: two cases share an id; the split needs unique ids")
    return ordered[ranks.rank::ranks.world]


def _ensure_group() -> bool:
    """Make the gloo process group from torchrun's environment unless one exists; True if made here."""
    if dist.is_initialized():
        return False
    dist.init_process_group(backend="gloo", timeout=GATHER_TIMEOUT)
    return True


_MADE_GROUP = False


def gather_reports(ranks: Ranks, report: dict) -> list[dict] | None:
    """Every rank's ``report`` (picklable; plain data) on rank 0, in rank order; None on the other
    ranks. One process: ``[report]`` without any process group."""
    global _MADE_GROUP
    if ranks.world == 1:
        return [report]
    _MADE_GROUP = _ensure_group() or _MADE_GROUP
    out: list[Any] | None = [None] * ranks.world if ranks.is_main else None
    dist.gather_object(report, out, dst=0)
    return out


def meet(ranks: Ranks) -> None:
    """All ranks wait here (a barrier; nothing for one process): after the run-level checks of the
    output folder, so no rank's first output is mistaken by a slower rank for an earlier run's.
    A rank that failed its checks has exited, and torchrun stops the others."""
    global _MADE_GROUP
    if ranks.world == 1:
        return
    _MADE_GROUP = _ensure_group() or _MADE_GROUP
    dist.barrier()


def finish(ranks: Ranks) -> None:
    """After rank 0 has written the merged files: all ranks meet, then the group made by
    :func:`gather_reports` is closed. Nothing to do for one process."""
    global _MADE_GROUP
    if ranks.world == 1 or not dist.is_initialized():
        return
    dist.barrier()
    if _MADE_GROUP:
        dist.destroy_process_group()
        _MADE_GROUP = False


def merge_reports(reports: Sequence[dict], list_keys: Sequence[str], order: Sequence[str],
                  key: str = "case_id") -> dict:
    """One report from the ranks' partial reports (rank 0 only).

    Args:
        reports: one per rank, in rank order; each with lists under ``list_keys`` (entries carrying
            ``key``) and ``failures`` (strings).
        order: every case id in the global order; merged entries follow it (ids not in it last).
    Returns:
        ``{k: merged list for k in list_keys, "failures": every rank's failures, in rank order}``.
    """
    position = {cid: i for i, cid in enumerate(order)}
    merged: dict[str, Any] = {k: [] for k in list_keys}
    failures: list[str] = []
    for rep in reports:
        for k in list_keys:
            merged[k].extend(rep.get(k, []))
        failures.extend(rep.get("failures", []))
    for k in list_keys:
        merged[k].sort(key=lambda entry: position.get(entry[key], len(position)))
    merged["failures"] = failures
    return merged


def collect(ranks: Ranks, items: list, failures: list, key: str, order: Sequence[str]) -> bool:
    """Gather every rank's ``items`` (the ``key`` list of its report) and ``failures``; on rank 0
    both lists are replaced in place by all ranks' (:func:`merge_reports`, case ``order``) and True
    is returned; the other ranks return False once rank 0 is done (:func:`finish`). Rank 0 calls
    :func:`finish` after it has written the merged files."""
    reports = gather_reports(ranks, {key: list(items), "failures": [str(f) for f in failures]})
    if not ranks.is_main:
        finish(ranks)
        return False
    merged = merge_reports(reports, [key], order)
    items[:], failures[:] = merged[key], merged["failures"]
    return True


def settings_digest(settings: Mapping[str, Any]) -> str:
    """SHA-256 of ``settings`` as canonical JSON (sorted keys): what makes a case's output bytes
    (the model file's hash, the target, the sampling settings and timesteps)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


class CaseJournal:
    """Completion records of one output folder (``<out_dir>/.sampling_records``).

    A record is written only after its output is published (atomically, by ``save_volume``), and
    holds the output's SHA-256: a file without a record, or with another hash, is never counted
    as done.
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.folder = self.out_dir / RECORDS_DIR

    def record_path(self, output: Path) -> Path:
        """``.sampling_records/<output file name>.json`` (output names hold the case id)."""
        return self.folder / f"{Path(output).name}.json"

    def completed(self, output: Path, digest: str) -> dict | None:
        """The stored report entry when ``output`` is complete and verified for these settings;
        None when there is nothing to resume (no record, or a record whose output is gone).

        Raises:
            CaseError: a record from other settings, an output that differs from its record, or
                an unreadable record (the case is reported, never counted).
        """
        path, output = self.record_path(output), Path(output)
        try:
            stored = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise CaseError(path, f"unreadable completion record ({err}); delete it and {output.name} to redo "
                                  "the case") from None
        if not output.exists():
            return None
        if stored.get("settings_digest") != digest:
            raise CaseError(output, f"written by a run with other settings (model, target or sampling flags; "
                                    f"record {path}); use another --out_dir or delete it to redo the case")
        if file_sha256(output) != stored.get("sha256"):
            raise CaseError(output, f"differs from what this run wrote (SHA-256 does not match {path}); "
                                    "delete it to redo the case")
        return stored["entry"]

    def record(self, output: Path, digest: str, entry: dict) -> Path:
        """Record the published ``output`` (its SHA-256 now) with the case's report ``entry``."""
        return save_json({"version": RECORD_VERSION, "output": str(Path(output).relative_to(self.out_dir)),
                          "sha256": file_sha256(output), "settings_digest": digest, "entry": entry},
                         self.record_path(output))
