"""3D orthonormal Haar DWT as a reshape and one (8, 8) matrix product.

Band order follows cWDM (and ``pywt.dwtn(..., 'haar')`` keys aaa, aad, ..., ddd): the
first letter is the filter on the first spatial axis (dim 2). L = (x0 + x1) / sqrt(2),
H = (x0 - x1) / sqrt(2).
"""
from __future__ import annotations

import math

import torch

BAND_NAMES = ("LLL", "LLH", "LHL", "LHH", "HLL", "HLH", "HHL", "HHH")

_INV_SQRT2 = 1.0 / math.sqrt(2.0)


def _haar_bank(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(8, 2, 2, 2) filter bank: bank[k, p, q, r] is band k's weight on voxel (p, q, r).

    Band k = (a, b, c) and voxel v = (p, q, r) as 3-bit numbers: the weight is
    (-1)^(ap + bq + cr) / (2 sqrt 2) = (-1)^popcount(k & v) / (2 sqrt 2). Built on ``device``
    so that no host-to-device copy (a synchronisation on CUDA) happens per transform.
    """
    kv = torch.arange(8, device=device)[:, None] & torch.arange(8, device=device)[None, :]
    parity = (kv ^ (kv >> 1) ^ (kv >> 2)) & 1
    bank = (1 - 2 * parity).to(dtype) * (_INV_SQRT2 ** 3)
    return bank.reshape(8, 2, 2, 2)


def _check_even(shape: tuple[int, ...], what: str) -> None:
    if len(shape) != 5:
        raise ValueError(f"{what}: expected a 5D tensor (B, C, D, H, W), got shape {tuple(shape)}")
    odd = [s for s in shape[2:] if s % 2]
    if odd:
        raise ValueError(
            f"{what}: spatial shape {tuple(shape[2:])} has odd sizes; the Haar DWT needs even "
            "sizes (pad the volume first, e.g. with bratsloader.to_network_grid)"
        )


def dwt3(x: torch.Tensor) -> torch.Tensor:
    """One level of the 3D Haar DWT.

    One copy gathers each 2x2x2 block into 8 rows, one (8, 8) matrix product makes the bands,
    already in output layout.
    Args:
        x: (B, C, D, H, W) with D, H, W even.
    Returns:
        (B, 8 * C, D/2, H/2, W/2); channel ``8 * c + k`` is band ``BAND_NAMES[k]`` of channel c.
    """
    _check_even(tuple(x.shape), "dwt3")
    b, c, d, h, w = x.shape
    blocks = x.reshape(b * c, d // 2, 2, h // 2, 2, w // 2, 2).permute(0, 2, 4, 6, 1, 3, 5)
    bank = _haar_bank(x.dtype, x.device).reshape(8, 8)
    bands = torch.matmul(bank, blocks.reshape(b * c, 8, -1))
    return bands.reshape(b, 8 * c, d // 2, h // 2, w // 2)


def idwt3(bands: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dwt3` (the bank is orthogonal: its transpose inverts it).

    Args:
        bands: (B, 8 * C, d, h, w).
    Returns:
        (B, C, 2d, 2h, 2w).
    """
    if bands.ndim != 5 or bands.shape[1] % 8:
        raise ValueError(f"idwt3: expected (B, 8*C, d, h, w), got shape {tuple(bands.shape)}")
    b, c8, d, h, w = bands.shape
    c = c8 // 8
    bank = _haar_bank(bands.dtype, bands.device).reshape(8, 8)
    blocks = torch.matmul(bank.T, bands.reshape(b * c, 8, -1)).reshape(b * c, 2, 2, 2, d, h, w)
    return blocks.permute(0, 4, 1, 5, 2, 6, 3).reshape(b, c, 2 * d, 2 * h, 2 * w)
