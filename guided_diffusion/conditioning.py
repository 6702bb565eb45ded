"""Which modality is synthesised and which ones condition it.

This is the one place that maps a target modality to its conditioning stack.
Every case tensor in the project holds the four BraTS modalities in
``MODALITIES`` order along its channel axis.
"""

from __future__ import annotations

import torch

from .constants import ALL_TARGET, MODALITIES

__all__ = ["ALL_TARGET", "MODALITIES", "TARGET_PLACEHOLDER", "cond_modalities", "head_mask", "model_inputs",
           "modality_index", "modality_labels", "network_in_channels", "split_case", "split_case_all",
           "zero_outside_head"]

TARGET_PLACEHOLDER = 0.0
"""What an all-modality model sees in its target's conditioning slot instead of the image: zeros.
Set in volume space before the DWT, which is linear, so the slot's 8 subbands are exactly zero too
(and a NaN in the target's channel cannot reach them: the slot is replaced, not multiplied)."""


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


def modality_labels(targets: str | list[str] | tuple[str, ...], batch: int | None = None) -> torch.Tensor:
    """Class labels of target modalities: their index in ``MODALITIES``, (B,) int64.

    ``targets``: one name per batch element, or one name for all ``batch`` elements.
    """
    if isinstance(targets, str):
        if batch is None:
            raise ValueError("conditioning.py: modality_labels needs the batch size for a single target name")
        targets = [targets] * batch
    return torch.tensor([modality_index(t) for t in targets], dtype=torch.long)


def split_case_all(volumes: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An all-modality model's split: each case's target and the fixed four-slot conditioning stack.

    Args:
        volumes: (B, 4, *spatial), channels in ``MODALITIES`` order.
        labels: (B,) int, each case's target as its index in ``MODALITIES`` (cases may differ).
    Returns:
        ``(target_volume, cond)`` with shapes (B, 1, *spatial) and (B, 4, *spatial): ``cond`` keeps
        every modality in its ``MODALITIES`` slot, except the target's slot, which holds
        :data:`TARGET_PLACEHOLDER` and never the target's image.
    """
    if volumes.ndim < 3 or volumes.shape[1] != len(MODALITIES):
        raise ValueError(
            "conditioning.py: split_case_all expects volumes of shape "
            f"(B, {len(MODALITIES)}, *spatial), got {tuple(volumes.shape)}"
        )
    labels = torch.as_tensor(labels, device=volumes.device)
    if labels.shape != (volumes.shape[0],) or labels.dtype.is_floating_point:
        raise ValueError(f"conditioning.py: split_case_all expects ({volumes.shape[0]},) integer labels, "
                         f"got {tuple(labels.shape)} {labels.dtype}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(MODALITIES)):
        raise ValueError(f"conditioning.py: labels must lie in [0, {len(MODALITIES)}), got {labels.tolist()}")
    slots = torch.arange(len(MODALITIES), device=volumes.device)
    is_target = (slots[None] == labels[:, None]).view(*labels.shape, len(MODALITIES), *([1] * (volumes.ndim - 2)))
    index = labels.view(-1, 1, *([1] * (volumes.ndim - 2))).expand(-1, 1, *volumes.shape[2:])
    target = torch.gather(volumes, 1, index)
    cond = torch.where(is_target, torch.full((), TARGET_PLACEHOLDER, dtype=volumes.dtype, device=volumes.device),
                       volumes)
    return target, cond


def model_inputs(volumes: torch.Tensor, target: str | torch.Tensor, all_modality: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The one split every caller uses: ``(target_volume, cond, label)`` for the model's layout.

    A single-modality model (``all_modality=False``): :func:`split_case` (3 conditioning slots,
    ``cond_modalities(target)``), label None. An all-modality model: :func:`split_case_all`
    (4 slots, the target's a placeholder) with the label (B,) of ``target``, a modality name for
    every case or already a (B,) label tensor.
    """
    if not all_modality:
        if not isinstance(target, str):
            raise ValueError("conditioning.py: a single-modality model takes one target name, not labels")
        return (*split_case(volumes, target), None)
    labels = modality_labels(target, volumes.shape[0]) if isinstance(target, str) else target
    labels = labels.to(volumes.device)
    return (*split_case_all(volumes, labels), labels)


def network_in_channels(all_modality: bool, bands: int = 8) -> int:
    """The network's input channels: the noisy target's ``bands`` subbands plus ``bands`` per
    conditioning slot (3 slots for a single-modality model, 4 for an all-modality one): 32 or 40."""
    slots = len(MODALITIES) if all_modality else len(MODALITIES) - 1
    return bands * (1 + slots)


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
