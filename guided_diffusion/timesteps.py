"""The one timestep policy: which schedule steps a sampler visits for a requested NFE.

Layer 2 (imports ``schedules`` and ``fats``). :func:`plan_timesteps` is what every caller uses
(synthesis, the sample commands, benchmarks, experiments); the spacings it and the FATS timestep
search build on are :func:`uniform_timesteps` and :func:`power_timesteps`.

Vocabulary: a *timestep list* is a strictly decreasing sequence of schedule step indices in
[0, T - 1] (T = ``schedule.num_steps``); the sampler makes one network evaluation per entry, so
its length is the NFE.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .config import parse_train_timesteps
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


def plan_timesteps(schedule: NoiseSchedule, fats_state: FatsState | None, nfe: int | None,
                   warm_start_t: int = 0) -> tuple[list[int], str]:
    """The timestep list to sample ``schedule`` with, and a label saying where it came from.

    ``nfe`` None or 0: the checkpoint's default, i.e. the learned FATS timesteps of
    ``fats_state.default_nfe`` when stored, else every step. ``nfe = K``: the learned timesteps for
    K when ``fats_state`` holds them, else K evenly spaced steps (:func:`uniform_timesteps`).
    ``warm_start_t`` > 0 (``SampleConfig.warm_start_t``): see :func:`plan_warm_start`.
    """
    total = schedule.num_steps
    if isinstance(schedule, FlowPath):  # a flow model: K Euler steps at t = 0, 1/K, ...; 0 = every grid time
        if warm_start_t:
            raise ValueError("plan_timesteps: a warm start (warm_start_t) needs a noise schedule; a flow-matching "
                             "model starts at its own source, the condition mean")
        return flow_timesteps(schedule, nfe or total), f"uniform flow times (NFE={nfe or total})"
    if warm_start_t:
        return plan_warm_start(schedule, fats_state, nfe, warm_start_t)
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


def plan_warm_start(schedule: NoiseSchedule, fats_state: FatsState | None, nfe: int | None,
                    warm_start_t: int) -> tuple[list[int], str]:
    """Warm-start timesteps ``[T - 1, warm_start_t, ...]`` (``samplers.warm_start_sample``): one
    evaluation at the last step (the regression estimate), then ``nfe - 1`` steps from
    ``warm_start_t`` down to 0, so NFE = ``nfe`` counts the regression evaluation too.

    The stored FATS timesteps of that NFE (``nfe`` 0: of the default NFE) are used when they start
    with ``[T - 1, warm_start_t]`` (FATS v2 stores such plans); otherwise ``nfe - 1`` evenly spaced
    steps from ``warm_start_t`` to 0 (``nfe`` 0: every one of them).
    """
    total = schedule.num_steps
    if isinstance(schedule, FlowPath):
        raise ValueError("warm start: a flow model has no noise schedule to re-noise its estimate on; sample it "
                         "without --warm_start_t (a flow starts from the condition mean already)")
    if not 1 <= warm_start_t < total - 1:
        raise ValueError(f"warm start: warm_start_t must be a schedule step in 1 .. {total - 2} (the schedule has "
                         f"{total} steps), got {warm_start_t}")
    budget = nfe or (None if fats_state is None else fats_state.default_nfe)
    learned = None if (fats_state is None or budget is None) else fats_state.learned_timesteps(budget)
    if learned and learned[:2] == [total - 1, warm_start_t]:
        return learned, f"learned warm start from step {warm_start_t} (NFE={len(learned)})"
    if not nfe:
        return [total - 1] + all_timesteps(warm_start_t + 1), f"warm start from step {warm_start_t}, every step " \
                                                              f"(NFE={warm_start_t + 2})"
    if not 2 <= nfe <= warm_start_t + 2:
        raise ValueError(f"warm start: NFE {nfe} must be in 2 .. {warm_start_t + 2} (1 evaluation at the last step "
                         f"plus 1 .. {warm_start_t + 1} steps from step {warm_start_t} down)")
    return ([total - 1] + uniform_timesteps(warm_start_t + 1, nfe - 1),
            f"warm start from step {warm_start_t}, uniform (NFE={nfe})")


def draw_training_timesteps(spec: str, num_steps: int, batch: int, generator: torch.Generator, device,
                            sampled: Sequence[int] | None = None) -> torch.Tensor:
    """(batch,) long step indices for one training step, drawn as ``TrainConfig.train_timesteps``
    says (:func:`guided_diffusion.config.parse_train_timesteps`).

    ``"uniform"`` is ``torch.randint(0, num_steps)`` on ``generator`` (the draws of every earlier
    version, bit for bit); ``"last_mass:p"`` draws that, then one ``torch.rand`` per element, and
    puts the elements below p at T - 1; ``"last"`` draws nothing; ``"sampled"`` draws uniformly
    from ``sampled`` (the FATS state's ``train_timesteps``).
    """
    kind, p = parse_train_timesteps(spec)
    if kind == "last":
        return torch.full((batch,), num_steps - 1, dtype=torch.long, device=device)
    if kind == "sampled":
        if not sampled:
            raise ValueError("train_timesteps 'sampled' needs the planned sampling steps (FatsState.train_timesteps); "
                             "a FATS v2 run plans them from --residual_from")
        table = torch.tensor([int(s) for s in sampled], dtype=torch.long, device=device)
        if bool((table < 0).any()) or bool((table >= num_steps).any()):
            raise ValueError(f"train_timesteps 'sampled': steps {table.tolist()} outside 0 .. {num_steps - 1}")
        return table[torch.randint(0, len(table), (batch,), generator=generator, device=device)]
    t = torch.randint(0, num_steps, (batch,), generator=generator, device=device)
    if kind == "last_mass":
        extra = torch.rand((batch,), generator=generator, device=device) < p
        t = torch.where(extra, torch.full_like(t, num_steps - 1), t)
    return t
