"""DWT_IDWT: exactness against pywt, round trips on non-cubic inputs, energy preservation, errors."""
import numpy as np
import pytest
import pywt
import torch
import torch.nn.functional as F

from DWT_IDWT import BAND_NAMES, LLL_SCALE, clip_in_image_space, dwt3, from_subbands, idwt3, to_subbands

PYWT_KEYS = ("aaa", "aad", "ada", "add", "daa", "dad", "dda", "ddd")


@pytest.mark.parametrize("shape", [(1, 1, 4, 4, 4), (2, 3, 32, 24, 16), (1, 2, 6, 10, 2)])
def test_dwt_matches_pywt_and_round_trips(shape):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    bands = dwt3(x)
    assert bands.shape == (shape[0], 8 * shape[1], shape[2] // 2, shape[3] // 2, shape[4] // 2)
    for b in range(shape[0]):
        for c in range(shape[1]):
            ref = pywt.dwtn(x[b, c].numpy(), "haar", axes=(0, 1, 2))
            for k, key in enumerate(PYWT_KEYS):
                np.testing.assert_allclose(bands[b, 8 * c + k].numpy(), ref[key], atol=1e-12)
    torch.testing.assert_close(idwt3(bands), x, atol=1e-12, rtol=0)


def test_band_names_follow_cwdm_order():
    assert BAND_NAMES == ("LLL", "LLH", "LHL", "LHH", "HLL", "HLH", "HHL", "HHH")
    # A ramp along the last axis only has energy in LLL and LLH.
    x = torch.arange(4.0).view(1, 1, 1, 1, 4).expand(1, 1, 2, 2, 4).contiguous()
    energy = dwt3(x).pow(2).sum(dim=(2, 3, 4))[0]
    assert set(torch.nonzero(energy > 1e-9).flatten().tolist()) == {0, 1}


def test_odd_sizes_are_rejected_with_a_clear_error():
    with pytest.raises(ValueError, match="odd sizes"):
        dwt3(torch.zeros(1, 1, 5, 4, 4))
    with pytest.raises(ValueError, match="5D"):
        dwt3(torch.zeros(4, 4, 4))


def test_transform_preserves_energy():
    """Orthonormal Haar (Parseval): the subbands carry exactly the volume's energy."""
    x = torch.randn(2, 3, 16, 8, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    per_block = dwt3(x).reshape(2, 3, 8, 8, 4, 12).pow(2).sum(dim=2)  # each 2x2x2 block's 8 coefficients
    torch.testing.assert_close(per_block, F.avg_pool3d(x.pow(2), 2) * 8)
    torch.testing.assert_close(dwt3(x).pow(2).sum(), x.pow(2).sum())


def test_dtype_device_and_autograd():
    x = torch.randn(1, 2, 4, 4, 4, dtype=torch.float32, requires_grad=True)
    bands = to_subbands(x)
    assert bands.dtype == torch.float32 and bands.shape == (1, 16, 2, 2, 2)
    bands.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    x16 = torch.randn(1, 1, 4, 4, 4).to(torch.bfloat16)
    assert dwt3(x16).dtype == torch.bfloat16


def test_subbands_scale_lll_only_and_invert():
    x = torch.rand(2, 3, 8, 6, 4, dtype=torch.float64)
    bands = to_subbands(x)
    raw = dwt3(x)
    lll = torch.arange(0, 24, 8)
    torch.testing.assert_close(bands[:, lll], raw[:, lll] / LLL_SCALE)
    others = [i for i in range(24) if i % 8]
    torch.testing.assert_close(bands[:, others], raw[:, others])
    torch.testing.assert_close(from_subbands(bands), x)


def test_clip_in_image_space_clamps_the_volume():
    x = torch.rand(1, 1, 8, 8, 8, dtype=torch.float64) * 3 - 1
    clipped = from_subbands(clip_in_image_space(to_subbands(x)))
    torch.testing.assert_close(clipped, x.clamp(0, 1))
