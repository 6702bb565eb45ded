"""How much of a demo target is unpredictable from the other three modalities.

For a test case with target x and N oracle draws y^1..y^N (exact samples of p(x | conditions),
all on the network grid, preprocessed as ``bratsloader.load_case`` does):

* **ideal-regressor floor**: the oracle mean ybar approximates E[x | conditions]; since x and the
  draws are independent given the conditions, E (ybar - x)^2 = sigma^2 (1 + 1/N), so the floor is
  ``mean((ybar - x)^2) * N / (N + 1)``, over the brain and over the tumour (``seg > 0``);
* **R_b / E_b** per Haar band b (``DWT_IDWT.to_subbands``): R_b the conditional variance (unbiased
  variance over the N draws, averaged over positions), E_b the draws' mean energy in the band.

Two sources of draws: a v2 dataset on disk (``test/<case>/oracle/``, ``floors_from_dataset``),
or re-simulation in memory (``simulated_floors``): v2 through ``demo_data_v2``, and v1 through
v1's own ``demo_data.simulate_case`` with only the target's random numbers re-drawn
(``TargetRng``), so its conditions stay byte-identical to the v1 case.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from DWT_IDWT import BAND_NAMES, to_subbands
from guided_diffusion import demo_data, demo_data_v2
from guided_diffusion.bratsloader import (
    CaseError, Geometry, discover_cases, common_geometry, load_case, normalize_intensity, to_network_grid,
)
from guided_diffusion.constants import MODALITIES
from guided_diffusion.seeding import case_seed_words

logger = logging.getLogger(__name__)

V1_CALLS_PER_MODALITY = 4  # demo_data.simulate_case draws bias field, scale, noise sd, noise per modality
_V1_CALLS: dict[tuple[int, ...], int] = {}  # grid -> calls demo_data.simulate_case makes on its generator


def case_floors(target: torch.Tensor, draws: torch.Tensor, brain: torch.Tensor, tumour: torch.Tensor) -> dict:
    """Floors of one case and target modality.

    Args:
        target: (X, Y, Z) the case's own target (an independent draw), network grid.
        draws: (N, X, Y, Z) oracle draws, N >= 2, same grid and preprocessing.
        brain, tumour: (X, Y, Z) bool masks.

    Returns:
        ``mse_brain``, ``mse_tumor`` (NaN without tumour), ``psnr_*`` (range 1), and
        ``band_ratio``: Haar band name -> R_b / E_b.
    """
    n = draws.shape[0]
    if n < 2:
        raise ValueError(f"demo_floors.py: need at least 2 oracle draws, got {n}")
    target, draws = target.double(), draws.double()
    error = (draws.mean(0) - target) ** 2 * (n / (n + 1))
    mse = {name: float(error[mask].mean()) if mask.any() else math.nan
           for name, mask in (("mse_brain", brain), ("mse_tumor", tumour))}
    bands = to_subbands(draws[:, None])  # (N, 8, X/2, Y/2, Z/2)
    variance = bands.var(0, unbiased=True).mean((1, 2, 3))
    energy = bands.pow(2).mean((0, 2, 3, 4))
    return {**mse, "psnr_brain": _psnr(mse["mse_brain"]), "psnr_tumor": _psnr(mse["mse_tumor"]),
            "band_ratio": {b: float(r / e) for b, r, e in zip(BAND_NAMES, variance, energy)}}


def _psnr(mse: float) -> float:
    return 10 * math.log10(1 / mse) if mse > 0 else math.nan if math.isnan(mse) else math.inf


def summarize(per_case: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """Mean over cases per modality (``per_case[case][modality]`` as ``case_floors``); PSNR from the mean MSE."""
    summary = {}
    for modality in MODALITIES:
        rows = [floors[modality] for floors in per_case.values() if modality in floors]
        if not rows:
            continue
        mse = {k: float(np.nanmean([r[k] for r in rows])) for k in ("mse_brain", "mse_tumor")}
        summary[modality] = {**mse, "psnr_brain": _psnr(mse["mse_brain"]), "psnr_tumor": _psnr(mse["mse_tumor"]),
                             "band_ratio": {b: float(np.mean([r["band_ratio"][b] for r in rows])) for b in BAND_NAMES},
                             "n_cases": len(rows)}
    return summary


def _network(volume: np.ndarray, geometry: Geometry) -> torch.Tensor:
    """A raw (*original_shape) volume as ``load_case`` preprocesses it: (*network_shape) float32."""
    return torch.from_numpy(to_network_grid(normalize_intensity(volume), geometry))


def floors_from_dataset(test_dir: str | Path, modalities: tuple[str, ...] = MODALITIES
                        ) -> tuple[dict[str, dict], list[CaseError]]:
    """Floors of every v2 test case under ``test_dir`` (``<case>/oracle/`` beside each case).

    Returns ``(per_case, errors)``: case id -> modality -> ``case_floors``; bad cases are skipped
    and returned as ``CaseError``s.
    """
    cases, errors = discover_cases(test_dir, mode="train", geometry=None)
    geometry, cases, off_grid = common_geometry(cases)
    errors += off_grid
    per_case = {}
    for case in cases:
        try:
            data = load_case(case, geometry)
            if data.seg is None:
                raise CaseError(case.folder, "no segmentation; the tumour floor needs <case>-seg.nii.gz")
            brain, tumour = torch.from_numpy(data.brain_mask), torch.from_numpy(data.seg > 0)
            per_case[case.case_id] = {
                m: case_floors(torch.from_numpy(data.volumes[MODALITIES.index(m)]),
                               demo_data_v2.oracle_network_grid(case.folder, m, geometry), brain, tumour)
                for m in modalities}
        except (CaseError, ValueError) as err:  # ValueError: too few draws, a constant volume
            errors.append(err if isinstance(err, CaseError) else CaseError(case.folder, str(err)))
            logger.error("skipping case: %s", errors[-1])
    return per_case, errors


class TargetRng:
    """A numpy Generator for ``demo_data.simulate_case`` whose calls number ``window`` come from
    ``alternative`` instead; the main generator still makes every call, so later calls (the other
    modalities) get exactly the numbers they would have got."""

    def __init__(self, main: np.random.Generator, alternative: np.random.Generator | None = None,
                 window: range = range(0)):
        self.main, self.alternative, self.window, self.calls = main, alternative, window, 0

    def __getattr__(self, name: str):
        method = getattr(self.main, name)

        def call(*args, **kwargs):
            index, self.calls = self.calls, self.calls + 1
            out = method(*args, **kwargs)
            return getattr(self.alternative, name)(*args, **kwargs) if index in self.window else out
        return call


def v1_case(template: demo_data.Template, seed: int, case_id: str, modality: str | None = None, draw: int = 0
            ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """v1's case ``case_id`` (``demo_data.simulate_case``, byte-identical for ``draw`` 0); draw n > 0
    re-draws ``modality``'s own random numbers (bias, scale, noise) from a stream of its own."""
    words = case_seed_words(seed, case_id)
    if draw == 0:
        return demo_data.simulate_case(template, np.random.default_rng(words))
    if template.world.shape not in _V1_CALLS:  # how many numbers v1 draws: fixed by its code, not by them
        counter = TargetRng(np.random.default_rng(words))
        demo_data.simulate_case(template, counter)
        _V1_CALLS[template.world.shape] = counter.calls
    first = _V1_CALLS[template.world.shape] - V1_CALLS_PER_MODALITY * (len(MODALITIES) - MODALITIES.index(modality))
    rng = TargetRng(np.random.default_rng(words),
                    np.random.default_rng(words + [1 + MODALITIES.index(modality), draw]),
                    range(first, first + V1_CALLS_PER_MODALITY))
    return demo_data.simulate_case(template, rng)


def simulated_floors(version: int, geometry: Geometry, *, seed: int, n_cases: int, oracle_draws: int,
                     modalities: tuple[str, ...] = MODALITIES) -> dict[str, dict]:
    """Floors by re-simulation in memory: case id -> modality -> ``case_floors``.

    v2: the test anatomies ``BraTS-DEMO-3xxxx-000`` as ``make_demo_dataset_v2`` writes them;
    v1: v1's held-out pseudo-validation cases ``BraTS-DEMO-2xxxx-000`` (``v1_case``).
    """
    if version not in (1, 2):
        raise ValueError(f"demo_floors.py: version must be 1 or 2, got {version}")
    template = demo_data.load_template(geometry)
    code = demo_data_v2.TEST_SPLIT_CODE if version == 2 else demo_data.SPLIT_CODE[demo_data.PSEUDO]
    per_case = {}
    for i in range(n_cases):
        case_id = demo_data.CASE_ID.format(code * demo_data.MAX_CASES_PER_SPLIT + i)
        if version == 2:
            volumes, seg = demo_data_v2.simulate_case_v2(template, seed, case_id, 0)
        else:
            volumes, seg = v1_case(template, seed, case_id)
        brain = to_network_grid(torch.from_numpy(np.any([v > 0 for v in volumes.values()], axis=0)), geometry)
        tumour = to_network_grid(torch.from_numpy(seg > 0), geometry)
        per_case[case_id] = {}
        for m in modalities:
            if version == 2:
                raw = demo_data_v2.oracle_volumes(template, seed, case_id, m, oracle_draws)
            else:
                raw = [v1_case(template, seed, case_id, m, n)[0][m] for n in range(1, oracle_draws + 1)]
            draws = torch.stack([_network(d, geometry) for d in raw])
            per_case[case_id][m] = case_floors(_network(volumes[m], geometry), draws, brain, tumour)
    return per_case
