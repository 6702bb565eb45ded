"""PNG figures: one axial slice of the conditions, the ground truth, the synthesis and the error."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .extras import import_extra
from .fileio import atomic_write


def slice_figure(path: str | Path, panels: Sequence[tuple[str, np.ndarray]], title: str = "",
                 error_pair: tuple[int, int] | None = None) -> Path:
    """Save a row of axial slices (the middle of the last axis, or the tumour centre).

    Args:
        panels: (label, (X, Y, Z) volume in [0, 1]) in display order.
        error_pair: indices of (ground truth, synthesis) panels; adds |difference| as the last panel.
    """
    import_extra("matplotlib", "figures", "writing PNG figures").use("Agg")
    plt = import_extra("matplotlib.pyplot", "figures", "writing PNG figures")

    volumes = [np.asarray(v, dtype=np.float32) for _, v in panels]
    z = volumes[0].shape[-1] // 2
    labels = [label for label, _ in panels]
    images = [v[..., z] for v in volumes]
    if error_pair is not None:
        labels.append("|error|")
        images.append(np.abs(volumes[error_pair[0]][..., z] - volumes[error_pair[1]][..., z]))
    fig, axes = plt.subplots(1, len(images), figsize=(2.4 * len(images), 2.8))
    for ax, label, image in zip(np.atleast_1d(axes), labels, images):
        cmap, vmax = ("magma", max(float(image.max()), 1e-6)) if label == "|error|" else ("gray", 1.0)
        ax.imshow(np.rot90(image), cmap=cmap, vmin=0.0, vmax=vmax)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out
