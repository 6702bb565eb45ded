"""cWDM's network representation of a volume: 8 Haar subbands, LLL divided by 3."""
from __future__ import annotations

import torch

from .haar import dwt3, idwt3

N_BANDS = 8
# cWDM divides the LLL band by 3 so that all subbands of a [0, 1] volume lie in a similar range
# (LLL of a 2x2x2 block of ones is 2 * sqrt(2) ~ 2.83).
LLL_SCALE = 3.0


def _lll_scale_vector(n_channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    scale = torch.ones(n_channels, dtype=dtype, device=device)
    scale[::N_BANDS] = LLL_SCALE
    return scale.view(1, n_channels, 1, 1, 1)


def to_subbands(volumes: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) volumes -> (B, 8 * C, D/2, H/2, W/2) network subbands (LLL / 3)."""
    bands = dwt3(volumes)
    return bands / _lll_scale_vector(bands.shape[1], bands.dtype, bands.device)


def from_subbands(bands: torch.Tensor) -> torch.Tensor:
    """(B, 8 * C, d, h, w) network subbands -> (B, C, 2d, 2h, 2w) volumes."""
    return idwt3(bands * _lll_scale_vector(bands.shape[1], bands.dtype, bands.device))


def clip_in_image_space(bands: torch.Tensor) -> torch.Tensor:
    """cWDM's x0 clipping: back to the image, clamp to [0, 1], and into subbands again.

    Mixes bands, so a per-band sampler must recompute each band's noise from the result.
    """
    return to_subbands(from_subbands(bands).clamp(0.0, 1.0))
