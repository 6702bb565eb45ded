"""Downstream tumour segmentation, BraSyn's second metric: does a synthesis segment like the real scan?

A small MONAI ``SegResNet`` is trained on the REAL four modalities of the training cases
(``MODALITIES`` order, preprocessed by ``bratsloader.load_case``: clipped to the 0.1 / 99.9
percentiles, scaled to [0, 1], on the network grid). To score a synthesis of modality ``m``, the
segmenter sees the case with its real ``m`` replaced by the synthesis file (read and preprocessed
the same way) and, as the upper bound, the case with all real modalities; both predictions are
compared with the case's ``-seg`` file.

Regions (BraTS 2023 labels 1 = necrotic core, 2 = oedema, 3 = enhancing tumour):
WT = {1, 2, 3}, TC = {1, 3}, ET = {3}. The network has one sigmoid output per region (multi-label,
the BraTS convention: the regions overlap, so no softmax); a voxel belongs to a region where its
probability is > 0.5. Trained with MONAI's ``DiceCELoss(sigmoid=True)`` (Dice + binary cross-entropy).

Scores (MONAI ``DiceMetric`` and ``HausdorffDistanceMetric(percentile=95)``, whole volume, per
region, HD95 in mm from the voxel size of the case's header). Empty regions follow the BraTS
convention: Dice is 1 when the prediction and the truth are both empty and 0 when only one is;
HD95 is 0 when both are empty and NaN (undefined, ``null`` in JSON) when only one is.

Checkpoint (``torch.save``, loadable with ``weights_only=True``)::

    {"format": "fast-cwdm-segmenter/1", "model": state_dict, "config": {...}}

``config`` (also written as ``<checkpoint>.json`` beside it) records the network settings, the
channel order, the regions and the label set it was trained on, the grid and the training data.
:func:`load_segmenter` refuses a checkpoint whose channels, regions or grid differ from what this
code feeds it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .bratsloader import SEG_LABELS, Case, CaseData, CaseError, Geometry, check_case, load_case
from .checkpoints import read_checkpoint
from .constants import MODALITIES
from .extras import import_extra
from .fileio import atomic_write, save_json

logger = logging.getLogger(__name__)

FORMAT = "fast-cwdm-segmenter/1"
EXTRA = "seg"  # the pyproject extra that installs MONAI
REGIONS: dict[str, tuple[int, ...]] = {"wt": (1, 2, 3), "tc": (1, 3), "et": (3,)}  # BraTS 2023 labels
THRESHOLD = 0.5  # sigmoid probability above which a voxel is in a region
HD_PERCENTILE = 95
PRELOAD_LIMIT_BYTES = 4 << 30  # training data up to this size is read once and kept in memory
OUTPUT_NOTE = "one sigmoid per region (multi-label, regions overlap), voxel in region where p > 0.5"
SCORE_KEYS: tuple[str, ...] = tuple(f"{m}_{r}" for m in ("dice", "hd95") for r in REGIONS)
"""Scores of the segmentation with the synthesis in place of the real target modality."""
REAL_SUFFIX = "_real"
SEG_METRIC_KEYS: tuple[str, ...] = SCORE_KEYS + tuple(k + REAL_SUFFIX for k in SCORE_KEYS)
"""Every key :func:`score_synthesis` returns: synthesis scores, then the real-target upper bound."""
SEG_METRICS_NOTE = ("dice_* / hd95_* (mm): the segmenter's WT / TC / ET regions with the synthesis in place of the "
                    "real target modality, against the case's seg; *_real: the same with the real target (the upper "
                    "bound). Both empty: Dice 1, HD95 0; one empty: Dice 0, HD95 null (docs/segmentation.md)")


class SegmenterError(ValueError):
    """A segmenter checkpoint is missing, unreadable or does not fit; the message names the file."""


@dataclass(frozen=True)
class SegmenterConfig:
    """Network and training settings of the segmenter (saved in its checkpoint).

    ``init_filters`` / ``blocks_down`` / ``blocks_up``: MONAI SegResNet widths and depth (the network
    grid must be divisible by ``2 ** (len(blocks_down) - 1)``); ``max_steps`` optimizer updates of
    ``batch_size`` cases, AdamW at ``lr``; random flips on each axis with probability 0.5.
    """

    init_filters: int = 8
    blocks_down: tuple[int, ...] = (1, 2, 2, 4)
    blocks_up: tuple[int, ...] = (1, 1, 1)
    max_steps: int = 300
    batch_size: int = 2
    lr: float = 2e-3
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks_down", tuple(int(b) for b in self.blocks_down))
        object.__setattr__(self, "blocks_up", tuple(int(b) for b in self.blocks_up))
        if self.init_filters < 1 or self.max_steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"segmentation.py: bad segmenter settings {self}")
        if len(self.blocks_up) != len(self.blocks_down) - 1:
            raise ValueError(f"segmentation.py: blocks_up {self.blocks_up} needs len(blocks_down) - 1 entries")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SEGMENTER_PRESETS: dict[str, SegmenterConfig] = {
    "demo": SegmenterConfig(),  # the reduced-size demo data on the CPU
    "brats": SegmenterConfig(init_filters=16, max_steps=20_000, batch_size=1, lr=1e-3),  # full-size, one GPU
    "tiny": SegmenterConfig(init_filters=8, blocks_down=(1, 1), blocks_up=(1,), max_steps=2, batch_size=1),  # tests
}


def _monai(module: str):
    return import_extra(module, EXTRA, "the downstream segmenter (Dice / HD95 of syntheses)")


def build_segmenter(cfg: SegmenterConfig) -> torch.nn.Module:
    """SegResNet: (B, 4, X, Y, Z) -> (B, 3, X, Y, Z) region logits (WT, TC, ET)."""
    nets = _monai("monai.networks.nets")
    return nets.SegResNet(spatial_dims=3, in_channels=len(MODALITIES), out_channels=len(REGIONS),
                          init_filters=cfg.init_filters, blocks_down=cfg.blocks_down, blocks_up=cfg.blocks_up)


def label_regions(seg) -> np.ndarray:
    """BraTS 2023 labels (X, Y, Z) -> (3, X, Y, Z) bool masks in ``REGIONS`` order (WT, TC, ET)."""
    seg = np.asarray(seg)
    return np.stack([np.isin(seg, labels) for labels in REGIONS.values()])


# --------------------------------------------------------------------------- scores


def region_scores(pred, truth, spacing=(1.0, 1.0, 1.0)) -> dict[str, float]:
    """Dice and HD95 per region.

    Args:
        pred, truth: (3, X, Y, Z) bool region masks (``label_regions`` order).
        spacing: voxel size in mm along X, Y, Z (HD95 is in these units).

    Returns:
        ``{"dice_wt", "dice_tc", "dice_et", "hd95_wt", "hd95_tc", "hd95_et"}`` (see the module
        docstring for empty regions).
    """
    metrics = _monai("monai.metrics")
    pred_t = torch.as_tensor(np.asarray(pred, dtype=bool), dtype=torch.float32)[None]
    truth_t = torch.as_tensor(np.asarray(truth, dtype=bool), dtype=torch.float32)[None]
    if pred_t.shape != truth_t.shape or pred_t.shape[1] != len(REGIONS):
        raise ValueError(f"segmentation.py: region masks must both be (3, X, Y, Z), got {tuple(pred_t.shape[1:])} "
                         f"and {tuple(truth_t.shape[1:])}")
    dice = metrics.DiceMetric(include_background=True, reduction="none", ignore_empty=False)(pred_t, truth_t)[0]
    hausdorff = metrics.HausdorffDistanceMetric(include_background=True, percentile=HD_PERCENTILE, reduction="none")
    out = {}
    for i, region in enumerate(REGIONS):
        out[f"dice_{region}"] = float(dice[i])
        p_any, t_any = bool(pred_t[0, i].any()), bool(truth_t[0, i].any())
        if not (p_any or t_any):
            out[f"hd95_{region}"] = 0.0
        elif not (p_any and t_any):
            out[f"hd95_{region}"] = float("nan")
        else:
            with warnings.catch_warnings():  # MONAI 1.5+ warns about one of its own deprecated arguments
                warnings.simplefilter("ignore", FutureWarning)
                value = hausdorff(pred_t[:, i : i + 1], truth_t[:, i : i + 1], spacing=[float(s) for s in spacing])
            out[f"hd95_{region}"] = float(value[0, 0])
    return out


# --------------------------------------------------------------------------- training


def _flip(volumes: torch.Tensor, regions: torch.Tensor, generator: torch.Generator):
    """Flip each spatial axis of the batch (B, C, X, Y, Z) with probability 0.5 (same for both)."""
    axes = [2 + a for a in range(3) if torch.rand((), generator=generator) < 0.5]
    return (volumes.flip(axes), regions.flip(axes)) if axes else (volumes, regions)


def train_segmenter(
    cases: list[Case],
    geometry: Geometry,
    cfg: SegmenterConfig,
    device: torch.device,
    *,
    callback: Callable[[int, float], None] | None = None,
) -> tuple[torch.nn.Module, list[float]]:
    """Train a segmenter on the real four modalities and the ``-seg`` files of ``cases``.

    When all cases fit in :data:`PRELOAD_LIMIT_BYTES` as (4, *network_shape) float32 plus
    (3, *network_shape) bool regions (demo data: ~2 MB a case; full-size BraTS: ~150 MB a case),
    each is read once (``load_case``) and kept in memory; otherwise the cases of each step are read
    when drawn (slower: about 1.5 s per full-size case on a CPU).

    Returns:
        ``(model, losses)``: the trained network (eval mode) and the loss of every step.
    """
    losses_mod = _monai("monai.losses")
    geometry.check_divisible(len(cfg.blocks_down) - 1)  # SegResNet halves the grid per level
    unlabelled = [c for c in cases if c.seg_path is None]
    if unlabelled:
        raise CaseError(unlabelled[0].folder, f"no segmentation file; training the segmenter needs one in every "
                                              f"case ({len(unlabelled)} cases lack it)")
    def read(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
        data = load_case(case, geometry)
        return torch.from_numpy(data.volumes), torch.from_numpy(label_regions(data.seg))

    case_bytes = (4 * len(MODALITIES) + len(REGIONS)) * int(np.prod(geometry.network_shape))
    preloaded = [read(c) for c in cases] if case_bytes * len(cases) <= PRELOAD_LIMIT_BYTES else None
    torch.manual_seed(cfg.seed)
    model = build_segmenter(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    loss_fn = losses_mod.DiceCELoss(sigmoid=True)
    generator = torch.Generator().manual_seed(cfg.seed)
    losses = []
    model.train()
    for step in range(cfg.max_steps):
        pick = torch.randint(len(cases), (cfg.batch_size,), generator=generator).tolist()
        batch = [preloaded[i] if preloaded else read(cases[i]) for i in pick]
        x = torch.stack([volumes for volumes, _ in batch])
        y = torch.stack([regions for _, regions in batch]).float()
        x, y = _flip(x, y, generator)
        loss = loss_fn(model(x.to(device)), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if callback is not None:
            callback(step + 1, losses[-1])
    return model.eval(), losses


def segmenter_config(cfg: SegmenterConfig, geometry: Geometry, **record) -> dict:
    """What a segmenter checkpoint records besides its weights (``record``: e.g. the training data)."""
    return {"segmenter": cfg.to_dict(), "channels": list(MODALITIES), "regions": {k: list(v) for k, v in REGIONS.items()},
            "label_set": list(SEG_LABELS), "output": OUTPUT_NOTE,
            "original_shape": list(geometry.original_shape), "network_shape": list(geometry.network_shape),
            "preprocessing": "bratsloader.load_case: clip to 0.1/99.9 percentiles, scale to [0, 1], network grid",
            **record}


def save_segmenter(path: str | os.PathLike, model: torch.nn.Module, config: dict, *, overwrite: bool = False) -> Path:
    """Write the checkpoint atomically (never replacing one unless ``overwrite``) and its config as
    ``<path minus suffix>.json`` beside it."""
    checkpoint = {"format": FORMAT, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                  "config": config}
    path = atomic_write(path, lambda tmp: torch.save(checkpoint, tmp), replace=overwrite)
    save_json(config, Path(path).with_suffix(".json"))
    return path


# --------------------------------------------------------------------------- inference and scoring


@dataclass
class Segmenter:
    """A loaded segmenter: ``model`` on ``device``, the ``config`` of its checkpoint, its ``path``."""

    model: torch.nn.Module
    config: dict
    path: Path
    device: torch.device

    def check_grid(self, geometry: Geometry) -> None:
        """Refuse data on another grid than the one the segmenter was trained on (SegmenterError)."""
        trained = tuple(self.config["original_shape"])
        if trained != geometry.original_shape:
            raise SegmenterError(f"{self.path}: trained on cases of shape {trained}, these are "
                                 f"{geometry.original_shape}; train a segmenter on data of this grid")

    @torch.no_grad()
    def predict(self, volumes: np.ndarray) -> np.ndarray:
        """(4, *network_shape) float32 modalities in ``MODALITIES`` order -> (3, ...) bool regions."""
        x = torch.from_numpy(np.ascontiguousarray(volumes, dtype=np.float32))[None].to(self.device)
        return (torch.sigmoid(self.model(x))[0] > THRESHOLD).cpu().numpy()


def load_segmenter(path: str | os.PathLike, device: torch.device | str = "cpu",
                   geometry: Geometry | None = None) -> Segmenter:
    """Load and check a segmenter checkpoint (weights only, no code is unpickled).

    Raises SegmenterError naming the file when it is missing, not a segmenter, trained on another
    channel order or other regions / labels than this code uses, or (``geometry`` given) on
    another grid.
    """
    path = Path(path)
    if not path.is_file():
        raise SegmenterError(f"{path}: segmenter checkpoint not found (train one with scripts/train_segmenter.py)")
    data = read_checkpoint(path)
    if data.get("format") != FORMAT:
        raise SegmenterError(f"{path}: not a segmenter checkpoint (format {data.get('format')!r}, expected {FORMAT!r}); "
                             "train one with scripts/train_segmenter.py")
    config = data.get("config") or {}
    channels = config.get("channels")
    if channels != list(MODALITIES):
        raise SegmenterError(f"{path}: trained on the input channels {channels} in that order; this code feeds "
                             f"{list(MODALITIES)}; retrain the segmenter")
    regions = {k: list(v) for k, v in (config.get("regions") or {}).items()}
    expected = {k: list(v) for k, v in REGIONS.items()}
    if regions != expected or config.get("label_set") != list(SEG_LABELS):
        raise SegmenterError(f"{path}: trained on regions {regions} of labels {config.get('label_set')}; this code "
                             f"scores the BraTS 2023 regions {expected} of labels {list(SEG_LABELS)}; retrain it")
    try:
        cfg = SegmenterConfig(**config["segmenter"])
        model = build_segmenter(cfg)
        model.load_state_dict(data["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise SegmenterError(f"{path}: the weights do not fit the settings it records "
                             f"({type(err).__name__}: {str(err).splitlines()[0]})") from None
    device = torch.device(device)
    segmenter = Segmenter(model.to(device).eval(), config, path, device)
    if geometry is not None:
        segmenter.check_grid(geometry)
    return segmenter


def score_synthesis(segmenter: Segmenter, data: CaseData, target: str, synthesis_path: str | os.PathLike,
                    geometry: Geometry) -> dict[str, float]:
    """Dice / HD95 of one case with its real ``target`` replaced by a synthesis file, and with the
    real target (the ``_real`` keys: the upper bound).

    Args:
        data: the case as ``load_case`` returns it (all four modalities and a segmentation).
        synthesis_path: ``<case>-<target>.nii.gz`` on the case's grid (sample.py's output).

    Returns:
        :data:`SEG_METRIC_KEYS` -> float. CaseError (naming the file) for a case without a
        segmentation or a synthesis that is missing, unreadable or on another grid.
    """
    case = data.case
    if data.seg is None:
        raise CaseError(case.folder, "no segmentation (<case>-seg.nii.gz); Dice and HD95 need one")
    synthesis_path = Path(synthesis_path)
    if not synthesis_path.is_file():
        raise CaseError(synthesis_path, f"synthesis of {target} not found")
    swapped_case = Case(case.case_id, synthesis_path.parent, {**case.files, target: synthesis_path})
    check_case(swapped_case, geometry)  # the synthesis is on the case's grid (shape and affine)
    synthesis = load_case(Case(case.case_id, synthesis_path.parent, {target: synthesis_path}), geometry)
    index = MODALITIES.index(target)
    swapped = data.volumes.copy()
    swapped[index] = synthesis.volumes[index]
    truth = label_regions(data.seg)
    spacing = data.reference.header.get_zooms()[:3]
    scores = region_scores(segmenter.predict(swapped), truth, spacing)
    real = region_scores(segmenter.predict(data.volumes), truth, spacing)
    return {**scores, **{k + REAL_SUFFIX: v for k, v in real.items()}}
