"""Issue 14, point 11: figures a person can compare. slice.png's error panel has one fixed scale
with a colour bar, the slice is the tumour's (as the docstring promises); TensorBoard images are
upright and labelled, and train.py --image_interval schedules them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures_data import one_thread  # noqa: F401 (a fixture)
from fixtures_data import run_main
from guided_diffusion.figures import figure_slice, slice_figure
from guided_diffusion.train_util import upright_pair

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_figure_shows_the_slice_with_the_most_tumour():
    seg = np.zeros((6, 6, 10), dtype=np.uint8)
    seg[1:4, 1:4, 3] = 2  # 9 voxels
    seg[2, 2, 7] = 1  # 1 voxel
    assert figure_slice(10, seg) == 3
    assert figure_slice(10, np.zeros_like(seg)) == 5 and figure_slice(10, None) == 5  # no tumour: the middle


def test_error_panels_share_one_scale(tmp_path):
    """The same error pattern at 0.02 and at 0.4 is drawn in the colours of 0.02 / ERROR_VMAX and
    0.4 / ERROR_VMAX (scaled to each figure's maximum, both would be the top colour)."""
    pytest.importorskip("matplotlib")
    from matplotlib import colormaps
    from matplotlib.image import imread

    from guided_diffusion.figures import ERROR_VMAX

    truth = np.zeros((24, 24, 4), dtype=np.float32)
    for error in (0.02, 0.4):
        synthesis = truth.copy()
        synthesis[4:20, 4:20] = error
        path = slice_figure(tmp_path / f"e{error}.png", [("truth", truth), ("synthesis", synthesis)],
                            error_pair=(0, 1))
        rgb = imread(path)[..., :3]
        colour = np.array(colormaps["magma"](error / ERROR_VMAX)[:3])
        matching = (np.abs(rgb - colour).max(axis=-1) < 0.02).sum()
        assert matching > 1000, (error, matching)  # the error square, not just a sliver of the colour bar


def test_tensorboard_slices_are_upright_side_by_side():
    gen = torch.Generator().manual_seed(0)
    target, pred = torch.rand(6, 5, 4, generator=gen), torch.rand(6, 5, 4, generator=gen)
    expected = np.concatenate([np.rot90(target[..., 2].numpy()), np.rot90(pred[..., 2].numpy())], axis=1)[None]
    assert np.array_equal(upright_pair(target, pred).numpy(), expected)


def test_train_image_interval_schedules_labelled_images(tiny_demo_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    assert run_main("train", ["--preset", "tiny", "--data_dir", tiny_demo_dir / "training", "--run_dir", run_dir,
                              "--target", "t2f", "--max_steps", 2, "--image_interval", 1, "--cpu"]) == 0
    events = EventAccumulator(str(run_dir / "t2f" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["images"]
    assert tags == ["slices/t2f: truth (left), prediction (right), middle axial"]
    assert [e.step for e in events.Images(tags[0])] == [1, 2]
