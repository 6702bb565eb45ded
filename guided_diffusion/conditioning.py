"""Which modality is synthesised and which ones condition it.

This is the one place that maps a target modality to its conditioning stack.
Every case tensor in the project holds the four BraTS modalities in
``MODALITIES`` order along its channel axis.
"""

from __future__ import annotations

import torch

from .constants import MODALITIES

__all__ = ["MODALITIES", "cond_modalities", "modality_index", "split_case"]


def modality_index(modality: str) -> int:
    """Channel index of ``modality`` in ``MODALITIES``; ValueError if unknown."""
    if modality not in MODALITIES:
        raise ValueError(
            f"conditioning.py: unknown modality {modality!r}; expected one of {MODALITIES}"
        )
    return MODALITIES.index(modality)


def cond_modalities(target: str) -> tuple[str, ...]:
    """The three modalities that condition ``target``, in ``MODALITIES`` order.

    >>> cond_modalities("t1c")
    ('t1n', 't2w', 't2f')
    """
    modality_index(target)  # validates the name
    return tuple(m for m in MODALITIES if m != target)


def split_case(volumes: torch.Tensor, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a batch of cases into the target volume and its conditioning stack.

    Args:
        volumes: (B, 4, *spatial) tensor, channels in ``MODALITIES`` order.
        target: the modality to synthesise.

    Returns:
        ``(target_volume, cond)`` with shapes (B, 1, *spatial) and (B, 3, *spatial);
        the conditioning channels are ``cond_modalities(target)`` in that order.
    """
    if volumes.ndim < 3 or volumes.shape[1] != len(MODALITIES):
        raise ValueError(
            "conditioning.py: split_case expects volumes of shape "
            f"(B, {len(MODALITIES)}, *spatial), got {tuple(volumes.shape)}"
        )
    index = modality_index(target)
    cond_index = [modality_index(m) for m in cond_modalities(target)]
    return volumes[:, index : index + 1], volumes[:, cond_index]
