"""The one timestep policy: which schedule steps a sampler visits for a requested NFE.

Layer 2 (imports ``schedules`` and ``fats``). :func:`plan_timesteps` is what every caller uses
(synthesis, the sample commands, benchmarks, experiments); the spacings it and the FATS timestep
search build on are :func:`uniform_timesteps` and :func:`power_timesteps`.

Vocabulary: a *timestep list* is a strictly decreasing sequence of schedule step indices in
[0, T - 1] (T = ``schedule.num_steps``); the sampler makes one network evaluation per entry, so
its length is the NFE.
"""
from __future__ import annotations

import torch

from .fats import FatsState
from .flow import FlowPath, flow_timesteps
from .schedules import NoiseSchedule


def all_timesteps(num_steps: int) -> list[int]:
    """Every step, T - 1 down to 0 (NFE = T)."""
    return list(range(num_steps - 1, -1, -1))


def uniform_timesteps(num_steps: int, nfe: int) -> list[int]:
    """``nfe`` step indices evenly spaced from the last step (T - 1) to 0, decreasing."""
    if not 1 <= nfe <= num_steps:
        raise ValueError(f"uniform_timesteps: need 1 <= NFE <= {num_steps}, got {nfe}")
    if nfe == 1:
        return [num_steps - 1]
    idx = torch.linspace(num_steps - 1, 0, nfe, dtype=torch.float64).round().long().tolist()
    return list(dict.fromkeys(idx))


def power_timesteps(num_steps: int, nfe: int, rho: float) -> list[int]:
    """``nfe`` decreasing indices ``(T-1) (1 - i/(nfe-1))^rho`` (rho = 1: uniform, > 1: denser near
    t = 0), made strictly decreasing; always starts at T - 1."""
    if not 1 <= nfe <= num_steps:
        raise ValueError(f"power_timesteps: need 1 <= NFE <= {num_steps}, got {nfe}")
    if nfe == 1:
        return [num_steps - 1]
    raw = [round((num_steps - 1) * (1 - i / (nfe - 1)) ** rho) for i in range(nfe)]
    raw[0] = num_steps - 1
    for i in range(1, nfe):  # below the previous one ...
        raw[i] = min(raw[i], raw[i - 1] - 1)
    raw[-1] = max(raw[-1], 0)
    for i in range(nfe - 2, -1, -1):  # ... and above the next one
        raw[i] = max(raw[i], raw[i + 1] + 1)
    return raw


def plan_timesteps(schedule: NoiseSchedule, fats_state: FatsState | None, nfe: int | None) -> tuple[list[int], str]:
    """The timestep list to sample ``schedule`` with, and a label saying where it came from.

    ``nfe`` None or 0: the checkpoint's default, i.e. the learned FATS timesteps of
    ``fats_state.default_nfe`` when stored, else every step. ``nfe = K``: the learned timesteps for
    K when ``fats_state`` holds them, else K evenly spaced steps (:func:`uniform_timesteps`).
    """
    total = schedule.num_steps
    if isinstance(schedule, FlowPath):  # a flow model: K Euler steps at t = 0, 1/K, ...; 0 = every grid time
        return flow_timesteps(schedule, nfe or total), f"uniform flow times (NFE={nfe or total})"
    if not nfe:
        default = None if fats_state is None else fats_state.default_nfe
        learned = None if default is None else fats_state.learned_timesteps(default)
        if learned:
            return learned, f"learned (NFE={default})"
        return all_timesteps(total), f"every step (NFE={total})"
    if nfe < 0 or nfe > total:
        raise ValueError(f"plan_timesteps: NFE {nfe} is outside 1 .. {total} (the schedule's steps)")
    learned = None if fats_state is None else fats_state.learned_timesteps(nfe)
    if learned is not None:
        return learned, f"learned (NFE={nfe})"
    return uniform_timesteps(total, nfe), f"uniform (NFE={nfe})"
