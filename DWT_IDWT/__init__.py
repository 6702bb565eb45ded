"""Exact 3D orthonormal Haar wavelet transforms and cWDM's subband layout.

Two layers:

* :func:`dwt3` / :func:`idwt3` are the plain one-level transform: any batch, channel count
  and even spatial shape, device and dtype taken from the input, differentiable.
* :func:`to_subbands` / :func:`from_subbands` are the one place that maps a volume to
  cWDM's 8 network channels per volume and back (LLL divided by :data:`LLL_SCALE`).
"""
from .haar import BAND_NAMES, dwt3, idwt3
from .subbands import LLL_SCALE, N_BANDS, clip_in_image_space, from_subbands, to_subbands

__all__ = [
    "BAND_NAMES", "LLL_SCALE", "N_BANDS", "clip_in_image_space", "dwt3", "from_subbands",
    "idwt3", "to_subbands",
]
