"""PNG figures: one axial slice of the conditions, the ground truth, the synthesis and the error
(and, for an ensemble, its per-voxel std beside the error)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .extras import import_extra
from .fileio import atomic_write

ERROR_VMAX = 0.5  # |error| colour scale [0, ERROR_VMAX] of every figure, so figures compare (volumes are in [0, 1])


def figure_slice(depth: int, seg: np.ndarray | None = None) -> int:
    """The axial slice a figure shows: the one with the most tumour voxels (``seg`` > 0) when the
    case has a segmentation with tumour, else the middle one.

    Args:
        depth: the number of axial slices (the last axis); seg: (X, Y, depth) labels or None.
    """
    if seg is not None:
        per_slice = (np.asarray(seg) > 0).reshape(-1, depth).sum(axis=0)
        if per_slice.any():
            return int(per_slice.argmax())
    return depth // 2


def slice_figure(path: str | Path, panels: Sequence[tuple[str, np.ndarray]], title: str = "",
                 error_pair: tuple[int, int] | None = None, seg: np.ndarray | None = None,
                 uncertainty: tuple[str, np.ndarray] | None = None) -> Path:
    """Save a row of axial slices, upright: the slice with the most tumour (``seg``), else the middle.

    Args:
        panels: (label, (X, Y, Z) volume in [0, 1]) in display order.
        error_pair: indices of (ground truth, synthesis) panels; adds |difference| as the last panel,
            on the fixed scale [0, ERROR_VMAX] with a colour bar (the same in every figure).
        seg: (X, Y, Z) tumour labels of the case, or None (see :func:`figure_slice`).
        uncertainty: (label, (X, Y, Z) per-voxel std of an ensemble) or None; drawn last, beside
            the error, on the error's scale [0, ERROR_VMAX] with a colour bar, so the two compare.
    """
    import_extra("matplotlib", "figures", "writing PNG figures").use("Agg")
    plt = import_extra("matplotlib.pyplot", "figures", "writing PNG figures")

    volumes = [np.asarray(v, dtype=np.float32) for _, v in panels]
    z = figure_slice(volumes[0].shape[-1], seg)
    labels = [label for label, _ in panels]
    images = [v[..., z] for v in volumes]
    if error_pair is not None:
        labels.append("|error|")
        images.append(np.abs(volumes[error_pair[0]][..., z] - volumes[error_pair[1]][..., z]))
    maps = {"|error|"}  # drawn on the error scale with a colour bar
    if uncertainty is not None:
        labels.append(uncertainty[0])
        images.append(np.asarray(uncertainty[1], dtype=np.float32)[..., z])
        maps.add(uncertainty[0])
    fig, axes = plt.subplots(1, len(images), figsize=(2.4 * len(images), 2.8))
    for ax, label, image in zip(np.atleast_1d(axes), labels, images):
        cmap, vmax = ("magma", ERROR_VMAX) if label in maps else ("gray", 1.0)
        shown = ax.imshow(np.rot90(image), cmap=cmap, vmin=0.0, vmax=vmax)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
        if label in maps:
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"{title}{', ' if title else ''}axial slice {z}", fontsize=10)
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out
