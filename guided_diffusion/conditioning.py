"""Which modality is synthesised and which ones condition it.

This is the one place that maps a target modality to its conditioning stack.
Every case tensor in the project holds the four BraTS modalities in
``MODALITIES`` order along its channel axis.
"""

from __future__ import annotations

import torch

from .constants import MODALITIES

__all__ = ["MODALITIES", "cond_modalities", "head_mask", "modality_index", "split_case", "zero_outside_head"]


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


def head_mask(volumes: torch.Tensor, target: str) -> torch.Tensor:
    """The head as the conditioning volumes define it: voxels where any conditioning modality of
    ``target`` is above zero (skull-stripped BraTS volumes are exactly 0 outside the head, and
    intensity normalisation keeps them there).

    Args:
        volumes: (B, 4, *spatial) cases, ``MODALITIES`` order (the target channel is ignored).
    Returns:
        (B, *spatial) bool.
    """
    _, cond = split_case(volumes, target)
    return (cond > 0).any(dim=1)


def zero_outside_head(synthesis: torch.Tensor, volumes: torch.Tensor, target: str) -> torch.Tensor:
    """A copy of ``synthesis`` set to 0 outside :func:`head_mask` (the input is not modified).

    cWDM zeroes the synthesis where its first conditioning modality is 0 (``sample.py``) or where
    the synthesis is below 0.04 (``sample_auto.py``); this is the one rule of both commands here.

    Args:
        synthesis: (B, *spatial) synthesised target volumes.
        volumes: (B, 4, *spatial) the cases they were synthesised from.
    Returns:
        (B, *spatial), the dtype and device of ``synthesis``.
    """
    mask = head_mask(volumes, target).to(synthesis.device)
    if mask.shape != synthesis.shape:
        raise ValueError(f"conditioning.py: zero_outside_head: synthesis {tuple(synthesis.shape)} does not match "
                         f"the cases' head mask {tuple(mask.shape)}")
    return torch.where(mask, synthesis, torch.zeros((), dtype=synthesis.dtype, device=synthesis.device))
