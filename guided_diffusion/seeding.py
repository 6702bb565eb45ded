"""Every seed derivation of the project, side by side (layer 0: imports nothing from the package).

Randomness is a pure function of the run seed and *what* is drawn (a training step, a case id,
a held-out case index), never of the order things are processed in. Each formula below is kept
exactly as it was first published, because changing one would change every number a seed
reproduces (the golden and reproducibility tests pin them):

* :func:`derive_seed` mixes integers (the training loop: batch order, timesteps, noise, weights);
* :func:`case_seed` / :func:`case_generator`: the sampling noise of one case, keyed by its id, so a
  case's synthesis does not depend on its batch or on the other cases;
* :func:`sample_seed` / :func:`sample_generator`: the noise of sample ``m`` of a case's ensemble
  (``--num_samples``); sample 0 is the case's own :func:`case_seed`;
* :func:`case_seed_words`: the numpy ``SeedSequence`` entropy of one demo case (demo data,
  dropped modalities);
* :func:`indexed_generator`: the starting noise of the i-th held-out case in the FATS timestep
  search;
* :func:`case_subset`: the seeded sample of cases the FATS statistics and step fitting use.
"""
from __future__ import annotations

import zlib

import torch

_GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # 2^64 / golden ratio, the usual hash-mixing constant
_MASK_63 = 0x7FFFFFFFFFFFFFFF
_CASE_MULTIPLIER = 1_000_003  # a prime, so (seed, case) pairs rarely collide


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixing the integers ``parts`` (stable across runs, machines and Python versions).

    >>> derive_seed(0, 5) == derive_seed(0, 5) != derive_seed(5, 0)
    True
    """
    h = _GOLDEN_GAMMA
    for p in parts:
        h = (h ^ (p + _GOLDEN_GAMMA + (h << 6) + (h >> 2))) & _MASK_63
    return h


def case_seed(seed: int, case_id: str) -> int:
    """The 63-bit sampling seed of one case: ``(seed * 1000003 + crc32(case_id)) mod 2^63``."""
    return (seed * _CASE_MULTIPLIER + zlib.crc32(case_id.encode())) % (2 ** 63)


def case_generator(seed: int, case_id: str, device: str | torch.device = "cpu") -> torch.Generator:
    """One generator per case on ``device``, seeded with :func:`case_seed` (batch-independent)."""
    return torch.Generator(device).manual_seed(case_seed(seed, case_id))


def sample_seed(seed: int, case_id: str, index: int) -> int:
    """The 63-bit seed of sample ``index`` of one case's ensemble: :func:`case_seed` for sample 0
    (the single-sample noise), ``derive_seed(case_seed(seed, case_id), index)`` for the others."""
    if index < 0:
        raise ValueError(f"sample_seed: sample index {index} is negative")
    base = case_seed(seed, case_id)
    return base if index == 0 else derive_seed(base, index)


def sample_generator(seed: int, case_id: str, index: int, device: str | torch.device = "cpu") -> torch.Generator:
    """One generator per (case, sample index) on ``device``, seeded with :func:`sample_seed`."""
    return torch.Generator(device).manual_seed(sample_seed(seed, case_id, index))


def case_seed_words(seed: int, case_id: str) -> list[int]:
    """``[seed, crc32(case_id)]``: the entropy of ``numpy.random.default_rng`` for one demo case."""
    return [seed, zlib.crc32(case_id.encode())]


def indexed_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator seeded ``seed + index`` (the i-th held-out case of the timestep search)."""
    return torch.Generator().manual_seed(seed + index)


def case_subset(n: int, max_cases: int, seed: int) -> list[int]:
    """A seeded sample of ``max_cases`` of the indices 0 .. n-1, sorted; all of them when
    ``max_cases`` <= 0 or >= n. The first ``max_cases`` of ``randperm(n)`` seeded ``seed``."""
    if max_cases <= 0 or max_cases >= n:
        return list(range(n))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_cases].tolist())
