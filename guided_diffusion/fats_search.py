"""FATS searches over the few-step sampler: learned timesteps and shift refinement.

* :func:`learn_timesteps` (design step 4): K strictly decreasing step indices, starting at
  T - 1, that minimise the deterministic K-step DDIM sampler's error on held-out cases.
  A direct search on the true unrolled sampler: the best of a few parametric spacings, then
  coordinate descent over the free indices (coarse grid between the neighbours, then a
  shrinking local search), reusing the unchanged prefix of the trajectory so that moving
  step j costs K - j network evaluations per case.
* :func:`search_kappa` / :func:`refine_group_shifts` (design step 3): the shift strength
  kappa, then per-group shifts, chosen by a user-supplied evaluation (typically: train or
  fine-tune with those shifts, learn the K-step timesteps, return the held-out error).

Every function is deterministic given its inputs: the noise x_T of each case is drawn once
from its own seeded generator, so candidate step lists are compared on the same noise.

Chosen over the design's alternatives: no dynamic programme on an additive proxy cost (the
deterministic sampler's error is not additive over steps, and the direct search finds the
brute-force optimum on the Gaussian toy of tests/test_fats.py), no gradient through the sampler
(LD3) and no per-band effective times, no joint (VDM-style) learning of the shifts. Measured on
that toy: with ``reference="target"`` (MSE to the real x0) the optimum crowds every step next to
T - 1, i.e. it turns the sampler into one-step regression of the posterior mean (docs/fats.md,
"Metric trap"); ``reference="teacher"`` (distance to a many-step sample from the same noise)
does not have that bias.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from DWT_IDWT import BAND_NAMES

from .diffusion import Denoiser, ddim_step, randn
from .samplers import Clip, ddim_sample
from .schedules import NoiseSchedule
from .seeding import indexed_generator
from .timesteps import power_timesteps, uniform_timesteps

BAND_GROUPS: tuple[tuple[str, ...], ...] = (
    ("LLL",), ("LLH", "LHL", "HLL"), ("LHH", "HLH", "HHL"), ("HHH",),
)
"""The design's four band groups: approximation, single-high, double-high, triple-high."""

REFERENCES = ("target", "teacher")
SCORES = ("mse", "crps")
"""What :func:`learn_timesteps` minimises: brain-masked MSE, or the fair CRPS of an ensemble."""
CRPS_MEMBERS = 2
LossFn = Callable[[torch.Tensor, torch.Tensor, dict], float]


def masked_mse(sample: torch.Tensor, reference: torch.Tensor, case: dict) -> float:
    """MSE over the brain: ``case["mask"]`` (broadcastable to the sample, subband resolution,
    e.g. (B, 1, d, h, w) from :func:`guided_diffusion.fats.subband_mask`) or every coefficient."""
    err = (sample.double() - reference.double()) ** 2
    mask = case.get("mask")
    if mask is None:
        return float(err.mean())
    weight = mask.to(device=err.device, dtype=err.dtype).expand_as(err)
    return float((err * weight).sum() / weight.sum().clamp_min(1.0))


def fair_crps(samples: torch.Tensor, reference: torch.Tensor, case: dict, members: int = CRPS_MEMBERS) -> float:
    """Fair ensemble CRPS over the brain (a proper score; FATS v2 step 5, BENCHMARK_V2.md metric 4):
    ``mean_m |x^m - x| - sum_{m != m'} |x^m - x^m'| / (2 M (M - 1))``, averaged over coefficients.

    samples: (M * B, C, d, h, w), member m of element b at row ``m * B + b``; reference: (B, C, d, h, w).
    The conditional mean does not minimise it (MSE's optimum does); one deterministic output scores its MAE.
    ``case["mask"]`` as in :func:`masked_mse`.
    """
    if members < 2 or samples.shape[0] != members * reference.shape[0]:
        raise ValueError(f"fair_crps: need M >= 2 members of {reference.shape[0]} elements, got {samples.shape[0]} "
                         f"rows for M={members}")
    x = samples.double().reshape(members, *reference.shape)
    ref = reference.double()
    skill = (x - ref).abs().mean(dim=0)
    spread = sum((x[m] - x[n]).abs() for m in range(members) for n in range(members) if m != n)
    score = skill - spread / (2 * members * (members - 1))
    mask = case.get("mask")
    if mask is None:
        return float(score.mean())
    weight = mask.to(device=score.device, dtype=score.dtype).expand_as(score)
    return float((score * weight).sum() / weight.sum().clamp_min(1.0))


def _ensemble_case(data: dict, members: int) -> dict:
    """A case whose denoiser sees ``members`` copies of its batch (conditioning and label repeated)."""
    out = dict(data)
    for key in ("cond", "label"):
        if torch.is_tensor(out.get(key)):
            out[key] = out[key].repeat(members, *([1] * (out[key].ndim - 1)))
    return out


def _ddim_to(schedule: NoiseSchedule, x: torch.Tensor, pred_x0: torch.Tensor, t: int, s: int) -> torch.Tensor:
    """Deterministic :func:`~guided_diffusion.diffusion.ddim_step` from step t to step s >= 0."""
    b = x.shape[0]
    ab_t = schedule.alpha_bar_at(torch.full((b,), t, dtype=torch.long))
    ab_s = schedule.alpha_bar_at(torch.full((b,), s, dtype=torch.long))
    return ddim_step(x, pred_x0, ab_t, ab_s)


class _Case:
    """One held-out case: its denoiser, noise, reference, and the trajectory of the current steps."""

    def __init__(self, data: dict, denoiser: Denoiser, x_T: torch.Tensor, reference: torch.Tensor):
        self.data, self.denoiser, self.x_T, self.reference = data, denoiser, x_T, reference
        self.xs: list[torch.Tensor] = []  # x entering each step of the current list
        self.preds: list[torch.Tensor] = []  # (clipped) x0 prediction at each step


class _Search:
    def __init__(self, schedule: NoiseSchedule, cases: list[_Case], clip: Clip | None, loss_fn: LossFn):
        self.schedule, self.cases, self.clip, self.loss_fn = schedule, cases, clip, loss_fn
        self.nfe = 0

    def rollout(self, case: _Case, x: torch.Tensor, steps: Sequence[int]):
        """Run DDIM from x (at steps[0]) through ``steps``; returns (x0 sample, xs, preds)."""
        xs, preds = [], []
        for i, t in enumerate(steps):
            pred = case.denoiser(x, torch.full((x.shape[0],), t, dtype=torch.long))
            self.nfe += 1
            if self.clip is not None:
                pred = self.clip(pred)
            xs.append(x)
            preds.append(pred)
            x = _ddim_to(self.schedule, x, pred, t, steps[i + 1]) if i + 1 < len(steps) else pred
        return x, xs, preds

    def evaluate(self, steps: list[int], j: int = 0):
        """Mean loss of ``steps`` when only positions >= j differ from the cached trajectory.

        Returns (error, tails) where tails[c] = (xs, preds) from position j on, per case.
        """
        total, tails = 0.0, []
        for case in self.cases:
            if j == 0:
                x = case.x_T
            else:
                x = _ddim_to(self.schedule, case.xs[j - 1], case.preds[j - 1], steps[j - 1], steps[j])
            out, xs, preds = self.rollout(case, x, steps[j:])
            total += self.loss_fn(out, case.reference, case.data)
            tails.append((xs, preds))
        return total / len(self.cases), tails

    def accept(self, j: int, tails) -> None:
        for case, (xs, preds) in zip(self.cases, tails):
            case.xs[j:] = xs
            case.preds[j:] = preds

    def search_position(self, steps: list[int], j: int, error: float, grid: int):
        """Best index for position j (others fixed): coarse grid, then shrinking local search.

        Only the trajectory tails of the best trial so far are kept (not those of every trial):
        at full size a tail is K - j steps x 2 volumes x cases, and keeping all ~20 trials' tails
        took tens of GB for K = 10. Ties keep the current index, then the earliest trial.
        """
        lo = steps[j + 1] + 1 if j + 1 < len(steps) else 0
        hi = steps[j - 1] - 1
        errors = {steps[j]: error}
        best_trial: list = [None, math.inf, None]  # index, error, tails of the best trial (not the current index)

        def trial(c: int) -> None:
            if lo <= c <= hi and c not in errors:
                candidate = steps[:j] + [c] + steps[j + 1:]
                err, tails = self.evaluate(candidate, j)
                errors[c] = err
                if err < best_trial[1]:
                    best_trial[:] = [c, err, tails]

        n = min(grid, hi - lo + 1)
        for c in torch.linspace(lo, hi, n, dtype=torch.float64).round().long().tolist():
            trial(c)
        window = math.ceil((hi - lo) / max(n - 1, 1))
        while window > 1:
            window = math.ceil(window / 2)
            best = min(errors, key=errors.get)
            trial(best - window)
            trial(best + window)
        if best_trial[0] is None or not best_trial[1] < error:
            return steps[j], (error, None)
        return best_trial[0], (best_trial[1], best_trial[2])


@torch.no_grad()
def learn_timesteps(denoiser_factory: Callable[[dict], Denoiser], schedule: NoiseSchedule,
                    cases: Sequence[dict], k: int, *, reference: str = "target",
                    teacher_steps: Sequence[int] | None = None, loss_fn: LossFn | None = None,
                    clip: Clip | None = None, init_steps: Sequence[int] | None = None,
                    rhos: Sequence[float] = (0.5, 2.0, 3.0), grid: int = 16, max_sweeps: int = 3,
                    seed: int = 0, callback: Callable[[dict], None] | None = None, score: str = "mse") -> dict:
    """K sampling steps minimising the deterministic K-step DDIM sampler's error.

    Args:
        denoiser_factory: ``case -> denoiser(x_t, t) -> pred_x0`` (binds the case's conditioning).
        schedule: any schedule (shared or per-band), T = ``schedule.num_steps``.
        cases: held-out cases, dicts with ``x0`` (B, C, d, h, w) target subbands and optionally
            ``mask`` (brain mask broadcastable to x0, subband resolution) and ``x_T`` (the
            starting noise; drawn from a generator seeded ``seed + case index`` otherwise).
        k: the number of steps (= network evaluations).
        reference: ``"target"``: brain-masked MSE to the real x0 (paired data; note it rewards
            mean-seeking, smooth samples, see docs/fats.md "Metric trap"); ``"teacher"``: to the same
            noise's sample with ``teacher_steps`` (default all T steps), as LD3 does.
        loss_fn: ``(sample, reference, case) -> float`` replacing :func:`masked_mse`.
        clip: x0 clipping as in the sampler (e.g. ``clip_in_image_space``).
        init_steps: an extra starting candidate besides uniform and the ``rhos`` power spacings.
        grid: coarse grid points per position; max_sweeps: coordinate-descent passes.
        callback: called with a dict after each accepted improvement.
        score: ``"mse"`` (``loss_fn`` or :func:`masked_mse`), or ``"crps"`` (FATS v2): the
            :func:`fair_crps` of ``CRPS_MEMBERS`` = 2 samples per case (from two noises; a given
            ``x_T`` must hold both, stacked along the batch) against the real target, which the
            conditional mean does not minimise, so a sampler that keeps its spread can win.
            Needs ``reference="target"`` and no ``loss_fn``.
    Returns:
        dict: ``steps`` (K ints, strictly decreasing, steps[0] = T - 1), ``error``,
        ``uniform_steps`` (``uniform_timesteps(T, K)``), ``uniform_error``, ``init_steps``,
        ``init_error``, ``k``, ``reference``, ``score``, ``nfe`` (network evaluations per case), ``sweeps``.
    """
    T = schedule.num_steps
    if not 1 <= k <= T:
        raise ValueError(f"learn_timesteps: need 1 <= K <= T = {T}, got {k}")
    if reference not in REFERENCES:
        raise ValueError(f"learn_timesteps: reference must be one of {REFERENCES}, got {reference!r}")
    if not cases:
        raise ValueError("learn_timesteps: need at least one held-out case")
    if score not in SCORES:
        raise ValueError(f"learn_timesteps: score must be one of {SCORES}, got {score!r}")
    if score == "crps" and (reference != "target" or loss_fn is not None):
        raise ValueError("learn_timesteps: score 'crps' compares samples with the real target: reference 'target' "
                         "and no loss_fn")
    members = CRPS_MEMBERS if score == "crps" else 1
    loss_fn = loss_fn or (masked_mse if score == "mse" else fair_crps)
    prepared = []
    for i, data in enumerate(cases):
        x0 = data["x0"]
        x_T = data.get("x_T")
        if x_T is None:
            x_T = randn((members * x0.shape[0], *x0.shape[1:]), indexed_generator(seed, i), x0.device, x0.dtype)
        elif x_T.shape[0] != members * x0.shape[0]:
            raise ValueError(f"learn_timesteps: case {i}: x_T has {x_T.shape[0]} rows, need {members} x "
                             f"{x0.shape[0]} (score {score!r})")
        denoiser = denoiser_factory(_ensemble_case(data, members) if members > 1 else data)
        if reference == "target":
            ref = x0
        else:
            ref = ddim_sample(denoiser, schedule, x_T, list(teacher_steps) if teacher_steps else None, clip=clip)
        prepared.append(_Case(data, denoiser, x_T, ref))
    search = _Search(schedule, prepared, clip, loss_fn)

    uniform = uniform_timesteps(T, k)
    candidates = [uniform] + [power_timesteps(T, k, rho) for rho in rhos]
    if init_steps is not None:
        init = [int(s) for s in init_steps]
        if len(init) != k or init[0] != T - 1 or init[-1] < 0 or any(a <= b for a, b in zip(init, init[1:])):
            raise ValueError(f"learn_timesteps: init_steps must be {k} strictly decreasing indices "
                             f"from {T - 1}, got {init}")
        candidates.append(init)
    scored = []
    for cand in dict.fromkeys(tuple(c) for c in candidates):
        err, tails = search.evaluate(list(cand))
        scored.append((err, list(cand), tails))
    uniform_error = next(err for err, cand, _ in scored if cand == uniform)
    error, steps, tails = min(scored, key=lambda item: item[0])
    search.accept(0, tails)
    init_error, init = error, list(steps)

    sweeps = 0
    for sweeps in range(1, max_sweeps + 1 if k > 1 else 1):
        improved = False
        for j in range(k - 1, 0, -1):
            best, (best_error, best_tails) = search.search_position(steps, j, error, grid)
            if best != steps[j] and best_error < error:
                steps[j], error = best, best_error
                search.accept(j, best_tails)
                improved = True
                if callback is not None:
                    callback({"sweep": sweeps, "position": j, "steps": list(steps), "error": error, "nfe": search.nfe})
        if not improved:
            break
    return {"k": k, "steps": steps, "error": error, "uniform_steps": uniform, "uniform_error": uniform_error,
            "init_steps": init, "init_error": init_error, "reference": reference, "score": score, "nfe": search.nfe,
            "sweeps": sweeps}


# --------------------------------------------------------------------------- shift refinement


def search_kappa(evaluate_fn: Callable[[float], float], kappas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)) -> dict:
    """Evaluate each kappa (``evaluate_fn(kappa) -> held-out error``) and keep the best.

    Non-finite errors count as failures (infinite error); ties keep the earlier kappa.
    Returns ``best_kappa``, ``best_error`` and ``errors`` (a list of [kappa, error] pairs).
    """
    if not kappas:
        raise ValueError("search_kappa: no kappa to try")
    errors = []
    for kappa in kappas:
        err = float(evaluate_fn(float(kappa)))
        errors.append([float(kappa), err if math.isfinite(err) else math.inf])
    best_kappa, best_error = min(errors, key=lambda pair: pair[1])
    if not math.isfinite(best_error):
        raise RuntimeError(f"search_kappa: every evaluation failed: {errors}")
    return {"best_kappa": best_kappa, "best_error": best_error, "errors": errors}


def refine_group_shifts(evaluate_fn: Callable[[tuple[float, ...]], float], shifts: Sequence[float], *,
                        groups: Sequence[Sequence[str]] = BAND_GROUPS, step: float = 1.0,
                        min_step: float = 0.25, max_shift: float = 4.0, max_evals: int = 40) -> dict:
    """Pattern search on per-group shift offsets against ``evaluate_fn(shifts) -> held-out error``.

    Starting from ``shifts`` (e.g. :func:`guided_diffusion.fats.shifts_from_energy` at the best
    kappa), tries moving each group's shifts by +-``step`` (clipped to +-max_shift), keeps any
    improvement, and halves the step after a pass without one, down to ``min_step``.
    Returns ``shifts`` (tuple, BAND_NAMES order), ``error``, ``evals``, ``history``
    (list of [shifts, error]).
    """
    seen = sorted(b for g in groups for b in g)
    if seen != sorted(BAND_NAMES):
        raise ValueError(f"refine_group_shifts: groups must cover {BAND_NAMES} exactly once, got {groups}")
    if len(shifts) != len(BAND_NAMES):
        raise ValueError(f"refine_group_shifts: need {len(BAND_NAMES)} shifts, got {len(shifts)}")
    index = {b: i for i, b in enumerate(BAND_NAMES)}
    cache: dict[tuple[float, ...], float] = {}
    history = []

    def score(candidate: tuple[float, ...]) -> float:
        if candidate not in cache:
            err = float(evaluate_fn(candidate))
            cache[candidate] = err if math.isfinite(err) else math.inf
            history.append([list(candidate), cache[candidate]])
        return cache[candidate]

    best = tuple(min(max(float(s), -max_shift), max_shift) for s in shifts)
    best_error = score(best)
    while step >= min_step and len(cache) < max_evals:
        improved = False
        for group in groups:
            for sign in (1.0, -1.0):
                if len(cache) >= max_evals:
                    break
                cand = list(best)
                for b in group:
                    cand[index[b]] = min(max(cand[index[b]] + sign * step, -max_shift), max_shift)
                cand = tuple(cand)
                if cand != best and score(cand) < best_error:
                    best, best_error, improved = cand, cache[cand], True
                    break  # next group from the improved point
        if not improved:
            step /= 2
    return {"shifts": best, "error": best_error, "evals": len(cache), "history": history}
