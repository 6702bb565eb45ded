"""Benchmark v2 (../shared/design/BENCHMARK_V2.md, docs/benchmark_v2.md): can a test tell a sampler
from a regressor, and does FATS sample better at K <= 4 network evaluations?

    python benchmarks/fats_benchmark_v2.py --work_dir /tmp/bv2                # one target, one seed (~25 min, 2 CPUs)
    python benchmarks/fats_benchmark_v2.py --work_dir /tmp/bv2q --quick       # smoke run (< 3 min)
    python benchmarks/fats_benchmark_v2.py --work_dir /tmp/bv2 --reuse --variants R F --seeds 0 1

Steps, each through the library functions a user runs:
1. v2 demo data (``make_demo_data --version 2``): training cases with several target draws, held-out
   cases that fit the learned timesteps, test cases with oracle draws of the target.
2. Every variant's model trained by ``train.main`` with its preset, the same network, steps,
   batch size and seed (``--reuse`` keeps models already trained to that many steps).
3. Every (variant, sampler, K) sampled M times per test case by ``synthesis.synthesize``.
4. Scores (``prob_metrics``): BraSyn PSNR/SSIM of one sample and of the ensemble mean, fair CRPS,
   spread-skill, band energy ratios, oracle-mean distance, RAPSD distance, teacher distance,
   MS-SSIM diversity; the oracle's own draws scored the same way (the ideal sampler) and the
   oracle mean (the ideal regressor); the gate; R against the oracle-mean floor; paired bootstrap
   intervals over test cases for the primary comparisons.

Writes ``fats_v2.json`` (records, gate, oracle, floors, bootstrap, skipped), ``fats_v2_config.json``
(the resolved settings), ``fats_v2_crps_nfe.png`` and ``fats_v2_slices.png`` into
benchmarks/results/local/ (``--update_results``: the committed benchmarks/results/; ``--out DIR``).
A variant whose implementation is not in this checkout is skipped with its reason, never faked.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import LOCAL_RESULTS_DIR, RESULTS_DIR, command_line, machine  # noqa: E402
from guided_diffusion.constants import MODALITIES  # noqa: E402
from guided_diffusion.fileio import atomic_write, save_json  # noqa: E402

logger = logging.getLogger("fats_benchmark_v2")

NAME = "fats_v2"
VARIANTS = ("R", "C", "F", "S", "S10", "W", "P", "Ctrl", "FATS2")
MODEL_PRESETS = {"R": "demo_regression", "C": "demo_cwdm", "F": "demo", "S": "demo_fats", "S10": "demo_fats10",
                 "W": "demo_wfm", "Wn": "demo_wfm_noisy", "Ctrl": "demo_ctrl", "FATS2": "demo_fats2"}
"""Each trained model's preset (every one the demo network). W is two models: deterministic start
(W) and noisy start (Wn); P is a sampling setting of F's and C's models (nothing of its own)."""
MODELS_OF = {"R": ["R"], "C": ["C"], "F": ["F"], "S": ["S"], "S10": ["S10"], "W": ["W", "Wn"], "P": ["F", "C"],
             "Ctrl": ["Ctrl"], "FATS2": ["R", "FATS2"]}
"""The models a variant needs, in training order (FATS v2's shifts come from R's residual)."""
FATS_VARIANTS = ("S", "S10", "FATS2")
NO_PREDICTION_CHOICE = ("R", "W", "Wn")
"""Models that keep their preset's output (--prediction does not apply): R is trained at the last step
only, where the two parameterisations coincide up to 0.6 % of x_T; W and Wn predict a flow's velocity."""
PRIMARY_MAX_NFE = 4  # BENCHMARK_V2.md: the primary endpoint is tumour CRPS at K <= 4
GATE_SPREAD_SKILL = 0.5  # BENCHMARK_V2.md: C with DDPM-1000 must reach this tumour spread-skill
P_WARM_START = {"F": 3, "C": 300}  # P's t*: step 3 of the 11-step Fast-10 curve is t = 299 of the 1000-step one
CHECKPOINT_DEFAULT = "checkpoint"  # an option value taken from the checkpoint's stored sampling settings


@dataclass(frozen=True)
class Sampling:
    """One row of the table: a model sampled one way.

    ``variant``: the family compared in the decisions (R, C, F, S, S10, W, P, Ctrl, FATS2);
    ``label``: the row's name; ``model``: the trained model it samples; ``options``: extra
    SampleConfig fields (``CHECKPOINT_DEFAULT``: the checkpoint's stored value); ``checkpoint``:
    ``"latest"`` or ``"learned"`` (C's copy with learned timesteps); ``gate_cases_only``: sampled
    on the first ``--gate_cases`` test cases only.
    """

    variant: str
    label: str
    model: str
    sampler: str
    nfe: int
    options: dict = field(default_factory=dict)
    checkpoint: str = "latest"
    gate_cases_only: bool = False


def sampling_plan(variants: list[str], ks: tuple[int, ...], fit: tuple[int, ...], quick: bool) -> list[Sampling]:
    """Every (variant, sampler, K) the benchmark samples (BENCHMARK_V2.md's variant table); ``fit``:
    the budgets whose timesteps are learned (K = 1 is always the last step: no learned copy)."""
    small = tuple(k for k in ks if k <= PRIMARY_MAX_NFE)
    plan = []
    for v in variants:
        if v == "R":
            plan.append(Sampling("R", "R", "R", "ddim", 1))
        elif v == "C":
            # The gate's DDPM over all 1000 steps (--quick: 20 respaced DDPM steps, recorded as such).
            plan.append(Sampling("C", "C_ddpm", "C", "ddpm", 20 if quick else 0, gate_cases_only=True))
            plan.append(Sampling("C", "C_teacher_ddim", "C", "ddim", 10 if quick else 100))
            plan += [Sampling("C", "C_ddim", "C", "ddim", k) for k in ks]
            plan += [Sampling("C", "C_learned", "C", "ddim", k, checkpoint="learned") for k in fit if k > 1]
        elif v == "F":
            plan.append(Sampling("F", "F", "F", "ddpm", 0))  # all 11 points of the Fast-10 curve
            plan += [Sampling("F", "F_ddim", "F", "ddim", k) for k in small if k > 1]  # K = 1 is regression
        elif v == "S":
            plan += [Sampling("S", "S", "S", "ddim", k) for k in ks]
        elif v == "S10":
            plan += [Sampling("S10", "S10", "S10", "ddim", k) for k in (10, 4)]
        elif v == "W":
            plan += [Sampling("W", label, model, "euler", k) for model, label in (("W", "W_mean"), ("Wn", "W_noisy"))
                     for k in (1, 2)]
        elif v == "P":
            plan += [Sampling("P", f"P_{m}", m, "ddim", k, {"warm_start_t": P_WARM_START[m]})
                     for m in ("F", "C") for k in (2, 4)]
        elif v == "Ctrl":
            plan += [Sampling("Ctrl", "Ctrl_ddim", "Ctrl", "ddim", k) for k in ks if k > 1]  # vs C_ddim at equal K
        elif v == "FATS2":  # its stored plan [T - 1, t*, ...] at its default NFE; fewer steps below t* otherwise
            plan += [Sampling("FATS2", "FATS2", "FATS2", "ddim", k, {"warm_start_t": CHECKPOINT_DEFAULT})
                     for k in (2, 4)]
    return plan


# --------------------------------------------------------------------------- arguments

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", required=True, type=Path,
                   help="data and checkpoints go here; must be new or empty unless --reuse")
    p.add_argument("--reuse", action="store_true",
                   help="keep the data and the models already trained in --work_dir (trained further when short)")
    p.add_argument("--quick", action="store_true", help="tiny data and few steps, M=4 on 2 cases (< 3 min): a smoke run")
    p.add_argument("--target", choices=MODALITIES, default="t1c", help="modality synthesised (default t1c)")
    p.add_argument("--seed", type=int, default=None, help="one training/sampling seed (shorthand for --seeds N)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training/sampling seeds (default 0)")
    p.add_argument("--data_seed", type=int, default=0, help="seed of the demo data (the same for every --seeds)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   help="variants to train and sample (default all; P needs R and F, the gate needs C)")
    p.add_argument("--train_steps", type=int, default=1000, help="training steps of every model (default 1000)")
    p.add_argument("--batch_size", type=int, default=2, help="training batch size of every variant (default 2)")
    p.add_argument("--size", type=float, default=0.25,
                   help="demo data scale of the BraTS grid (default 0.25: network grid 56x56x40, the smallest the demo "
                        "network takes)")
    p.add_argument("--n_train", type=int, default=16, help="training anatomies (each with --draws target draws; default 16)")
    p.add_argument("--n_fit", type=int, default=2, help="held-out anatomies fitting learned timesteps (default 2)")
    p.add_argument("--n_test", type=int, default=5, help="test cases with oracle draws (default 5)")
    p.add_argument("--draws", type=int, default=4, help="target draws per training anatomy (default 4)")
    p.add_argument("--oracle_draws", type=int, default=8, help="oracle draws per test case (default 8)")
    p.add_argument("--samples", type=int, default=4, help="samples M per test case and sampling (default 4)")
    p.add_argument("--train_draws", choices=("target", "joint"), default="target",
                   help="training draws of an anatomy: 'target' (default) re-draws only the target, the conditions "
                        "stay identical (nothing to memorise); 'joint' re-draws every modality (a network can tell "
                        "the draws apart by their conditions and memorise each pair: the runs of fats_v2_t1c/t2f.json)")
    p.add_argument("--gate_cases", type=int, default=2, help="test cases sampled with C's DDPM-1000 (default 2)")
    p.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4, 10], help="K budgets (default 1 2 4 10)")
    p.add_argument("--fit_nfe", type=int, nargs="+", default=None,
                   help="budgets whose sampling timesteps are learned (default: those of --nfe in 2..4; minutes each "
                        "on a CPU, K = 10 the most; --quick: none)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16", help="training and sampling precision")
    p.add_argument("--prediction", choices=("x0", "v"), default="v",
                   help="what every diffusion model's network predicts (train.py --prediction; R and the flow "
                        "models W keep their own): v (default: per-band preconditioned, docs/prediction.md) or x0 "
                        "(cWDM's; at this training budget its samples collapse onto one estimate and the gate fails)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default benchmarks/results/local; --update_results: benchmarks/results)")
    p.add_argument("--update_results", action="store_true", help="write into the committed benchmarks/results")
    p.add_argument("--name", default=NAME, help=f"stem of the output files (default {NAME}; e.g. {NAME}_t2f for a "
                                                "second target, so that runs do not overwrite each other)")
    args = p.parse_args(argv)
    if args.seed is not None and args.seeds is not None:
        p.error("give --seed or --seeds, not both")
    args.seeds = args.seeds or [0 if args.seed is None else args.seed]
    if args.quick:
        args = argparse.Namespace(**{**vars(args), "train_steps": min(args.train_steps, 6),
                                     "n_train": 3, "n_fit": 1, "n_test": 2, "draws": 2, "oracle_draws": 8, "samples": 4,
                                     "gate_cases": 1, "nfe": [2, 4], "fit_nfe": [],
                                     "bootstrap": 200})
    if args.samples < 2:
        p.error("--samples must be >= 2 (spread and CRPS need an ensemble)")
    if args.oracle_draws < args.samples + 2:
        p.error(f"--oracle_draws must be >= --samples + 2 = {args.samples + 2}: the oracle record scores M draws "
                "against the variance of the others")
    for name in ("train_steps", "n_train", "n_fit", "n_test", "gate_cases", "bootstrap"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    args.gate_cases = min(args.gate_cases, args.n_test)
    args.fit_nfe = list([k for k in args.nfe if 1 < k <= PRIMARY_MAX_NFE] if args.fit_nfe is None else args.fit_nfe)
    return args


def check_work_dir(work: Path, reuse: bool) -> None:
    """Refuse an existing non-empty work dir unless ``reuse`` (its models would be silently mixed in)."""
    if work.exists() and not work.is_dir():
        raise SystemExit(f"--work_dir {work}: exists and is not a folder")
    if work.is_dir() and any(work.iterdir()) and not reuse:
        raise SystemExit(f"--work_dir {work}: exists and is not empty; pass --reuse to keep its data and models, "
                         "or choose a new folder")
    work.mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------- time plan

# Per network-grid voxel, so that they scale with --size. Training step (batch 2) and network evaluation:
# the v1 ablation on this 2-core CPU when quiet (bf16, demo network, 56x56x40: 1500 steps in ~215 s,
# 1000-step DDPM in 19.3 s per volume; benchmarks/results/fats_ablation.json). Scoring one ensemble of one
# case (2 SSIM passes, MS-SSIM pairs, band and spectral scores): 2.9 s of CPU time (4.3 s wall under a load
# of ~7), so ~2 s on the 2 quiet cores. Fitting one budget's timesteps on 2 cases: ~300 s for 8 budgets
# (K = 1, 2, 4, 10 of two models) in the v1 ablation, K = 10 the dearest.
TRAIN_STEP_S_PER_VOXEL = 0.143 / (56 * 56 * 40)
NFE_S_PER_VOXEL = 0.019 / (56 * 56 * 40)
SCORE_S_PER_VOXEL = 2.0 / (56 * 56 * 40)
FIT_S_PER_BUDGET_VOXEL = 40.0 / (56 * 56 * 40)


def estimate_seconds(args, plan: list[Sampling], trained: list[str], voxels: int) -> dict:
    """A rough time plan of one seed from the per-voxel constants above (printed at the start)."""
    train = len(trained) * args.train_steps * TRAIN_STEP_S_PER_VOXEL * voxels
    fitted = (len(args.fit_nfe) if "S" in trained else 0) + (len(args.fit_nfe) if "C" in trained else 0) + \
        (1 if "S10" in trained and 4 in args.fit_nfe else 0)
    fit = fitted * FIT_S_PER_BUDGET_VOXEL * voxels
    evaluations = 0
    scored = 0
    for s in plan:
        cases = args.gate_cases if s.gate_cases_only else args.n_test
        nfe = 1000 if (s.nfe == 0 and s.model == "C") else (11 if s.nfe == 0 else s.nfe)
        evaluations += cases * args.samples * nfe
        scored += cases
    scored += 2 * args.n_test  # the oracle and the oracle mean
    sample = evaluations * NFE_S_PER_VOXEL * voxels
    score = scored * SCORE_S_PER_VOXEL * voxels
    return {"train_s": round(train), "fit_s": round(fit), "sample_s": round(sample), "score_s": round(score),
            "total_s": round(train + fit + sample + score), "network_evaluations": evaluations}


# --------------------------------------------------------------------------- data

@dataclass
class TestCase:
    """One scored case on the network grid: the real target, its oracle draws and masks (numpy)."""

    case_id: str
    volumes: torch.Tensor  # (4, X, Y, Z) network grid, MODALITIES order
    target: np.ndarray  # (X, Y, Z)
    oracle: np.ndarray  # (N, X, Y, Z) oracle draws of the target, preprocessed like the loader
    brain: np.ndarray  # (X, Y, Z) bool
    seg: np.ndarray  # (X, Y, Z) labels

    @property
    def tumour(self) -> np.ndarray:
        return self.seg > 0


@dataclass
class Data:
    train_dir: Path
    fit_dir: Path
    test: list[TestCase]
    geometry: object
    seconds: float


def _link_cases(cases, folder: Path) -> None:
    """A folder of symlinks to ``cases``' folders (a split of the generated training cases)."""
    folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        link = folder / case.folder.name
        if not link.is_symlink():
            link.symlink_to(case.folder.resolve(), target_is_directory=True)


def anatomy_of(case_id: str) -> str:
    """The anatomy of a v2 training folder ``<case>-d<k>`` (its draws share it)."""
    return case_id.rsplit("-d", 1)[0]


def build_data(args, work: Path) -> Data:
    """The v2 demo data in ``work/data/v2`` (made once; ``--reuse`` keeps it), split by anatomy:
    the first ``n_train`` anatomies (every draw) train, the next ``n_fit`` (draw 0) fit the learned
    timesteps (``train/``, ``fit/``: folders of symlinks); the ``n_test`` test cases carry oracle draws."""
    try:
        from guided_diffusion import demo_data_v2
    except ImportError as err:
        raise SystemExit(f"the v2 demo data (guided_diffusion/demo_data_v2.py) is not in this checkout: {err}")
    from guided_diffusion.bratsloader import BratsDataset, Geometry, common_geometry, discover_cases

    start = time.perf_counter()
    raw = work / "data" / "v2"
    if not (raw / "training").is_dir():  # what make_demo_data --version 2 writes (staged, then moved in place)
        geometry = Geometry.scaled(args.size)
        geometry.check_divisible(3)  # the DWT and the demo network's two downsamplings
        demo_data_v2.make_demo_dataset_v2(raw, geometry=geometry, seed=args.data_seed, n_train=args.n_train + args.n_fit,
                                          n_test=args.n_test, draws=args.draws, oracle_draws=args.oracle_draws,
                                          train_target=None if args.train_draws == "joint" else args.target)
    cases, errors = discover_cases(raw / "training", mode="train", geometry=None)
    test_cases, test_errors = discover_cases(raw / "test", mode="train", geometry=None)
    if errors or test_errors:
        raise RuntimeError(f"{raw}: the generated data has bad cases: {errors + test_errors}")
    anatomies = list(dict.fromkeys(anatomy_of(c.case_id) for c in cases))
    if len(anatomies) < args.n_train + args.n_fit or len(test_cases) < args.n_test:
        raise RuntimeError(f"{raw}: {len(anatomies)} training anatomies / {len(test_cases)} test cases, fewer than "
                           "asked for; use a new --work_dir")
    train_ids = set(anatomies[: args.n_train])
    fit_ids = set(anatomies[args.n_train: args.n_train + args.n_fit])
    train_dir, fit_dir = work / "data" / "train", work / "data" / "fit"
    _link_cases([c for c in cases if anatomy_of(c.case_id) in train_ids], train_dir)
    _link_cases([c for c in cases if anatomy_of(c.case_id) in fit_ids and c.case_id.endswith("-d0")], fit_dir)
    test_cases = test_cases[: args.n_test]
    geometry, _, off_grid = common_geometry(test_cases)
    if off_grid:
        raise RuntimeError(f"{raw}: test cases on different grids: {off_grid}")
    dataset = BratsDataset(test_cases, geometry)
    target_index = MODALITIES.index(args.target)
    test = []
    for i, case in enumerate(test_cases):
        item = dataset[i]
        oracle = demo_data_v2.oracle_network_grid(case.folder, args.target, geometry).numpy().astype(np.float32)
        if oracle.shape[0] < args.samples + 2:
            raise RuntimeError(f"{case.folder}: {oracle.shape[0]} oracle draws; need >= --samples + 2")
        test.append(TestCase(item["case_id"], item["volumes"], item["volumes"][target_index].numpy(), oracle,
                             item["brain_mask"].numpy().astype(bool), item["seg"].numpy()))
    return Data(train_dir, fit_dir, test, geometry, time.perf_counter() - start)


# --------------------------------------------------------------------------- training

class Unavailable(Exception):
    """A variant's implementation is not in this checkout (recorded in ``skipped``, never faked)."""


def preset_or_skip(name: str):
    from guided_diffusion.presets import PRESETS

    if name not in PRESETS:
        raise Unavailable(f"preset {name!r} is not defined in guided_diffusion/presets.py")
    return PRESETS[name]


def train_model(model: str, args, seed: int, data: Data, run_root: Path, trained: dict) -> dict:
    """Train ``model``'s preset with ``train.main`` (the user's command) on the shared budget, or
    keep the model already trained to ``--train_steps`` there (``--reuse``; a shorter one is resumed).
    FATS presets learn their sampling timesteps on the fit cases at the end (``--fats_nfe``); FATS v2
    takes its residual shifts from R (``--residual_from``, R trained first).
    Returns ``{"checkpoint": Path, "train_seconds": float | None, "preset": str, "reused": bool}``."""
    from guided_diffusion.checkpoints import read_checkpoint
    from guided_diffusion.commands import train as train_cmd

    preset_name = MODEL_PRESETS[model]
    preset_or_skip(preset_name)
    run_dir = run_root / model
    if model == "FATS2" and "R" in trained:  # its shifts come from R: an R trained further is another FATS v2 run
        run_dir = run_root / f"FATS2_from_R{int(read_checkpoint(trained['R']['checkpoint']).get('step', -1))}"
    latest = run_dir / args.target / "latest.pt"
    if latest.is_file() and int(read_checkpoint(latest).get("step", -1)) == args.train_steps:
        logger.info("%s: reusing %s (%d steps)", model, latest, args.train_steps)
        return {"checkpoint": latest, "train_seconds": None, "preset": preset_name, "reused": True}
    # FATS v2 samples the steps it trained on (no fit); S10's 10 steps need no fit at K = 10.
    fit_nfe = {"S": args.fit_nfe, "S10": [k for k in args.fit_nfe if k == 4]}.get(model, [])
    argv = ["--preset", preset_name, "--data_dir", str(data.train_dir), "--val_dir", str(data.fit_dir),
            "--run_dir", str(run_dir), "--target", args.target, "--max_steps", str(args.train_steps),
            "--save_interval", str(args.train_steps), "--val_interval", "0", "--image_interval", "0",
            "--log_interval", str(max(args.train_steps // 10, 1)), "--batch_size", str(args.batch_size),
            "--precision", args.precision, "--num_workers", "0", "--seed", str(seed),
            "--threads", str(args.threads), "--cache_dir", str(args.work_dir / "cache"), "--skip_data_check"]
    argv += ["--fats_nfe", *map(str, fit_nfe)] if fit_nfe else ["--skip_fats_fit"]
    if model not in NO_PREDICTION_CHOICE:
        argv += ["--prediction", args.prediction]
    if model == "FATS2":
        if "R" not in trained:
            raise Unavailable("FATS v2 takes its shifts from R's residual, and R was not trained")
        argv += ["--residual_from", str(trained["R"]["checkpoint"])]
    if latest.is_file():
        argv += ["--resume", "auto"]
    logger.info("%s: training preset %s for %d steps", model, preset_name, args.train_steps)
    start = time.perf_counter()
    if train_cmd.main(argv) != 0:
        raise RuntimeError(f"{model}: train.py {' '.join(argv)} failed")
    seconds = time.perf_counter() - start
    return {"checkpoint": latest, "train_seconds": seconds, "preset": preset_name, "reused": False}


def learned_copy(checkpoint: Path, args, seed: int, data: Data) -> Path:
    """C's checkpoint with learned DDIM timesteps for ``--nfe`` (``fats_fit_steps``, the user's
    command; made once per training step count, kept with ``--reuse``: a model trained further
    gets a new fit, never the fit of its shorter self)."""
    from guided_diffusion.checkpoints import read_checkpoint
    from guided_diffusion.commands import fats_fit_steps

    step = int(read_checkpoint(checkpoint).get("step", -1))
    out = checkpoint.with_name(f"learned_steps_step{step}.pt")
    if out.is_file():
        return out
    argv = ["--checkpoint", str(checkpoint), "--data_dir", str(data.fit_dir), "--target", args.target,
            "--nfe", *map(str, args.fit_nfe), "--precision", args.precision, "--max_cases", str(args.n_fit),
            "--seed", str(seed), "--out", str(out), "--device", "cpu"]
    if fats_fit_steps.main(argv) != 0:
        raise RuntimeError(f"fats_fit_steps {' '.join(argv)} failed")
    return out


# --------------------------------------------------------------------------- scoring

def _ssim_kernel(shape) -> int:
    k = min(11, min(shape))
    return k if k % 2 else k - 1


def _optional(fn: Callable[[], float]) -> float | None:
    """A metric that is undefined for this case (e.g. MS-SSIM on a tumour box smaller than its window)."""
    try:
        value = fn()
    except ValueError:
        return None
    return value if value is None or isinstance(value, list) or math.isfinite(value) else None


def score_case(samples: np.ndarray, case: TestCase, oracle: np.ndarray, teacher: np.ndarray | None = None) -> dict:
    """Every per-case score of an ensemble ``samples`` (M, X, Y, Z) in [0, 1] on the network grid.

    ``oracle`` (N, X, Y, Z): the reference posterior draws (the case's oracle; for the oracle's own
    record the draws not used as samples). ``teacher``: the many-step teacher's samples from the
    same noise (C's DDIM-100), when the variant has one."""
    from guided_diffusion import prob_metrics as pm
    from guided_diffusion.metrics import evaluate_case, masked_mse, normalize_percentile, psnr_from_mse

    kernel = _ssim_kernel(case.target.shape)
    one = evaluate_case(samples[0], case.target, case.brain, case.seg, kernel_size=kernel)
    ensemble_mean = samples.mean(axis=0)
    mean = evaluate_case(ensemble_mean, case.target, case.brain, None, kernel_size=kernel)  # 1 SSIM, not 3
    tumour = case.tumour
    has_tumour = bool(tumour.any())
    # the ensemble mean's tumour MSE as evaluate_case computes it (BraSyn normalisation of each volume)
    mean["mse_tumor"] = (masked_mse(normalize_percentile(ensemble_mean), normalize_percentile(case.target), tumour)
                         if has_tumour else None)
    mean["psnr_tumor"] = psnr_from_mse(mean["mse_tumor"]) if has_tumour else None
    out = {"psnr": one["psnr"], "ssim": one["ssim"], "mse": one["mse"], "psnr_tumor": one["psnr_tumor"],
           "ssim_tumor": one["ssim_tumor"], "mse_tumor": one["mse_tumor"],
           "psnr_ensemble": mean["psnr"], "ssim_ensemble": mean["ssim"], "mse_ensemble": mean["mse"],
           "psnr_tumor_ensemble": mean["psnr_tumor"], "mse_tumor_ensemble": mean["mse_tumor"],
           "crps_brain": pm.fair_crps(samples, case.target, case.brain),
           "crps_tumor": pm.fair_crps(samples, case.target, tumour) if has_tumour else None,
           "spread_skill_brain": pm.spread_skill(samples, oracle, case.brain),
           "spread_skill_tumor": pm.spread_skill(samples, oracle, tumour) if has_tumour else None,
           "spread_error_tumor": (pm.spread_error_ratio(samples, case.target, tumour) if has_tumour else None),
           "band_energy_ratio": pm.band_energy_ratio(samples, oracle),
           "spread_skill_bands": pm.band_spread_skill(samples, oracle),
           "oracle_mean_distance": pm.oracle_mean_distance(samples, oracle, case.brain),
           "oracle_mean_distance_tumor": pm.oracle_mean_distance(samples, oracle, tumour) if has_tumour else None,
           "rapsd_distance": pm.rapsd_distance(samples, oracle, case.brain),
           "msssim_diversity": _optional(lambda: pm.msssim_diversity(samples, tumour)) if has_tumour else None,
           "teacher_distance": None if teacher is None else pm.teacher_distance(samples, teacher, case.brain)}
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def aggregate(per_case: list[dict]) -> dict:
    """Mean over cases of each score (lists element-wise; None where no case has a value), and the
    per-case CRPS the bootstrap pairs."""
    out = {}
    for key in per_case[0]:
        values = [c[key] for c in per_case if c[key] is not None]
        if not values:
            out[key] = None
        elif isinstance(values[0], list):
            out[key] = [float(np.mean(col)) for col in zip(*values)]
        else:
            out[key] = float(np.mean(values))
    out["per_case"] = {key: [c[key] for c in per_case] for key in ("crps_tumor", "crps_brain", "mse_ensemble")}
    return out


# --------------------------------------------------------------------------- sampling

class Models:
    """Loaded checkpoints (each loaded once per seed)."""

    def __init__(self):
        self._cache = {}

    def get(self, path: Path):
        from guided_diffusion.checkpoints import load_model

        if path not in self._cache:
            self._cache[path] = load_model(path, device="cpu")
        return self._cache[path]


def sample_config(s: Sampling, loaded, args, seed: int):
    """The row's SampleConfig: its sampler and NFE, eta 0, the seed and precision, its options (a
    ``CHECKPOINT_DEFAULT`` option from the checkpoint's stored sampling settings)."""
    from guided_diffusion.cli import checkpoint_sample_defaults
    from guided_diffusion.config import SampleConfig

    stored = checkpoint_sample_defaults(loaded).to_dict()
    options = {k: stored[k] if v == CHECKPOINT_DEFAULT else v for k, v in s.options.items()}
    try:
        return SampleConfig(sampler=s.sampler, nfe=s.nfe, eta=0.0, seed=seed, precision=args.precision, **options)
    except TypeError as err:
        raise Unavailable(f"SampleConfig does not take {sorted(options)} ({err})") from None


def sample_ensemble(loaded, cfg, case: TestCase, target: str, m: int) -> tuple[np.ndarray, float]:
    """``m`` samples of one case in one sampler call (``synthesize(sample_indices=...)``): (M, X, Y, Z)
    float32 in [0, 1], and the seconds per volume."""
    from guided_diffusion.synthesis import synthesize

    volumes = case.volumes[None].expand(m, *case.volumes.shape)
    start = time.perf_counter()
    out = synthesize(loaded, volumes, target, cfg, [case.case_id] * m, sample_indices=list(range(m)))
    return out.numpy().astype(np.float32), (time.perf_counter() - start) / m


def run_sampling(s: Sampling, checkpoint: Path, models: Models, args, seed: int, data: Data,
                 teachers: dict, slices: dict, train_info: dict) -> dict:
    """Sample and score one row; keeps C's teacher samples and the first case's ensemble for the figure."""
    from guided_diffusion.timesteps import plan_timesteps

    loaded = models.get(checkpoint)
    cfg = sample_config(s, loaded, args, seed)
    timesteps, origin = plan_timesteps(loaded.schedule, loaded.fats_state, cfg.nfe, cfg.warm_start_t)
    cases = data.test[: args.gate_cases] if s.gate_cases_only else data.test
    per_case, seconds = [], []
    for case in cases:
        samples, sec = sample_ensemble(loaded, cfg, case, args.target, args.samples)
        seconds.append(sec)
        if s.label == "C_teacher_ddim":
            teachers[case.case_id] = samples
        teacher = teachers.get(case.case_id) if s.label in ("C_ddim", "C_learned") else None
        per_case.append(score_case(samples, case, case.oracle, teacher))
        if case is data.test[0]:  # the figure shows each variant at the K nearest the primary budget
            k_old = slices.get(s.label, (None, None))[0]
            if k_old is None or abs(len(timesteps) - PRIMARY_MAX_NFE) < abs(k_old - PRIMARY_MAX_NFE):
                slices[s.label] = (len(timesteps), samples)
    record = {"variant": s.label, "family": s.variant, "model": s.model, "train_schedule": loaded.schedule.name,
              "K": len(timesteps),
              "nfe": len(timesteps), "sampler": s.sampler, "timesteps": [int(t) for t in timesteps],
              "timesteps_origin": origin, "options": {k: getattr(cfg, k) for k in s.options}, "seed": seed, "target": args.target,
              "samples": args.samples, "cases": [c.case_id for c in cases], "train_steps": args.train_steps,
              "train_seconds": train_info.get("train_seconds"), "preset": train_info.get("preset"),
              "seconds_per_volume": float(np.median(seconds)), **aggregate(per_case)}
    logger.info("%-16s K=%-4d CRPS tumour %s  spread-skill tumour %s  PSNR %.2f (ensemble %.2f)  %.2f s/volume",
                s.label, record["K"], _fmt(record["crps_tumor"]), _fmt(record["spread_skill_tumor"]),
                record["psnr"], record["psnr_ensemble"], record["seconds_per_volume"])
    return record


def _fmt(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def reference_records(data: Data, args) -> tuple[dict, dict]:
    """The oracle as a sampler (M draws scored against the other N - M: the ideal sampler's numbers)
    and the oracle mean of all N draws as a deterministic output (the ideal regressor; passed twice,
    i.e. zero spread)."""
    sampler, regressor = [], []
    for case in data.test:
        draws, rest = case.oracle[: args.samples], case.oracle[args.samples:]
        sampler.append(score_case(draws, case, rest))
        mean = case.oracle.mean(axis=0, keepdims=True)
        regressor.append(score_case(np.concatenate([mean, mean]), case, case.oracle))
    base = {"seed": None, "target": args.target, "train_steps": None, "train_schedule": None, "K": 0, "nfe": 0,
            "seconds_per_volume": 0.0, "cases": [c.case_id for c in data.test]}
    oracle = {**base, "variant": "oracle", "what": f"{args.samples} oracle draws per case scored as samples against "
              "the other draws: what an exact posterior sampler scores", **aggregate(sampler)}
    mean = {**base, "variant": "oracle_mean", "what": "the mean of all oracle draws as one deterministic output: "
            "the ideal regressor (the MSE floor)", **aggregate(regressor)}
    return oracle, mean


# --------------------------------------------------------------------------- decisions

def gate_record(records: list[dict], seed: int) -> dict:
    """BENCHMARK_V2.md's gate: C sampled with DDPM over all 1000 steps reaches tumour spread-skill >= 0.5."""
    c = next((r for r in records if r["variant"] == "C_ddpm" and r["seed"] == seed), None)
    if c is None:
        return {"seed": seed, "passed": None, "reason": "C was not sampled with DDPM-1000 (variant C not run)"}
    value = c["spread_skill_tumor"]
    return {"seed": seed, "variant": "C_ddpm", "nfe": c["nfe"], "cases": c["cases"], "spread_skill_tumor": value,
            "threshold": GATE_SPREAD_SKILL, "passed": value is not None and value >= GATE_SPREAD_SKILL,
            "rule": "C at 1000 DDPM steps must reach tumour spread-skill >= 0.5; below it the benchmark is still in "
                    "the regressor regime: fix the benchmark, do not conclude"}


def floors_record(records: list[dict], oracle_mean: dict, seed: int) -> dict:
    """R's end point (ensemble-mean MSE on the test cases after --train_steps) against the ideal
    regressor's (the oracle mean's): how much of R's error is model error."""
    r = next((x for x in records if x["variant"] == "R" and x["seed"] == seed), None)
    if r is None:
        return {"seed": seed, "reason": "R not run"}
    out = {"seed": seed, "train_steps": r["train_steps"]}
    for region, key in (("brain", "mse_ensemble"), ("tumor", "mse_tumor_ensemble")):
        model, floor = r[key], oracle_mean[key]
        out[f"r_mse_{region}"], out[f"floor_mse_{region}"] = model, floor
        out[f"r_over_floor_{region}"] = None if not floor or model is None else model / floor
    out["rule"] = "check first: R far above the oracle-mean floor means model error still confounds everything"
    return out


def paired_bootstrap(a: list, b: list, n_resamples: int, seed: int) -> dict:
    """Mean of a - b over the cases both have, and its 95% percentile interval from a paired
    bootstrap over cases (``scipy.stats.bootstrap``, ``paired=True``, seeded)."""
    from scipy.stats import bootstrap

    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not pairs:
        return {"n_cases": 0, "mean_difference": None, "ci_low": None, "ci_high": None}
    x, y = (np.asarray(v, dtype=np.float64) for v in zip(*pairs))
    diff = float(np.mean(x - y))
    if len(pairs) < 2 or np.ptp(x - y) == 0:
        low = high = diff  # every resample gives the same mean
    else:
        res = bootstrap((x, y), lambda u, v, axis=-1: np.mean(u - v, axis=axis), paired=True, vectorized=True,
                        n_resamples=n_resamples, confidence_level=0.95, method="percentile",
                        random_state=np.random.default_rng(seed))
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return {"n_cases": len(pairs), "mean_difference": diff, "ci_low": low, "ci_high": high,
            "excludes_zero": bool(low > 0 or high < 0)}


def bootstrap_records(records: list[dict], seed: int, n_resamples: int) -> list[dict]:
    """The primary comparisons (tumour CRPS, best FATS at K <= 4 minus the comparator; negative =
    FATS better): against F at equal NFE, against R, against P and W at no more NFE."""
    rows = [r for r in records if r["seed"] == seed and r["crps_tumor"] is not None]
    fats = [r for r in rows if r["family"] in FATS_VARIANTS and r["nfe"] <= PRIMARY_MAX_NFE]
    if not fats:
        return [{"seed": seed, "comparison": "best FATS at K <= 4", "reason": "no FATS variant sampled at K <= 4"}]
    best = min(fats, key=lambda r: r["crps_tumor"])

    def pick(family, nfe_max=None, nfe_equal=None):
        cands = [r for r in rows if r["family"] == family and (nfe_equal is None or r["nfe"] == nfe_equal)
                 and (nfe_max is None or r["nfe"] <= nfe_max)]
        return min(cands, key=lambda r: r["crps_tumor"]) if cands else None

    out = []
    for name, other in (("F_equal_nfe", pick("F", nfe_equal=best["nfe"])), ("R", pick("R")),
                        ("P_no_more_nfe", pick("P", nfe_max=best["nfe"])), ("W_no_more_nfe", pick("W", nfe_max=best["nfe"]))):
        row = {"seed": seed, "comparison": f"best FATS vs {name}", "metric": "crps_tumor (a - b; < 0: FATS better)",
               "a": {"variant": best["variant"], "nfe": best["nfe"], "crps_tumor": best["crps_tumor"]}}
        if other is None:
            out.append({**row, "b": None, "reason": f"no {name.split('_')[0]} record to compare with"})
            continue
        row["b"] = {"variant": other["variant"], "nfe": other["nfe"], "crps_tumor": other["crps_tumor"]}
        if other["cases"] != best["cases"]:
            out.append({**row, "reason": "different test cases"})
            continue
        out.append({**row, **paired_bootstrap(best["per_case"]["crps_tumor"], other["per_case"]["crps_tumor"],
                                               n_resamples, seed)})
    return out


# --------------------------------------------------------------------------- figures

def _pyplot():
    from guided_diffusion.extras import import_extra

    import_extra("matplotlib", "figures", "writing PNG figures").use("Agg")
    return import_extra("matplotlib.pyplot", "figures", "writing PNG figures")


def plot_crps_nfe(records: list[dict], references: list[dict], path: Path) -> Path:
    """Tumour CRPS against NFE, one line per variant and seed; the oracle and the oracle mean as
    horizontal references."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for key in dict.fromkeys((r["variant"], r["seed"]) for r in records):
        pts = sorted((r["nfe"], r["crps_tumor"]) for r in records
                     if (r["variant"], r["seed"]) == key and r["crps_tumor"] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]} (seed {key[1]})")
    for ref, style in zip(references, ("--", ":")):
        if ref["crps_tumor"] is not None:
            ax.axhline(ref["crps_tumor"], color="k", linestyle=style, label=ref["variant"])
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per volume (NFE)")
    ax.set_ylabel("fair CRPS in the tumour (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out


def plot_slices(slices: dict, case: TestCase, path: Path) -> Path:
    """One row per (variant, K) of the first test case: one sample, the ensemble mean and the
    per-voxel std; the first row is the oracle's (one draw, mean, std of its draws). The std
    columns share the oracle's colour scale."""
    from guided_diffusion.figures import figure_slice

    plt = _pyplot()
    rows = [("oracle", case.oracle)] + [(f"{label} K={k}", s) for label, (k, s) in slices.items()]
    z = figure_slice(case.target.shape[-1], case.seg)
    # one std scale for every row: the oracle's (larger spreads saturate, which is itself the finding)
    std_max = float(case.oracle[..., z].std(axis=0, ddof=1).max()) or 1.0
    fig, axes = plt.subplots(len(rows), 3, figsize=(6.6, 2.1 * len(rows)), squeeze=False)
    for (label, samples), ax in zip(rows, axes):
        panels = (("one sample", samples[0, ..., z], "gray", 1.0), ("mean", samples[..., z].mean(axis=0), "gray", 1.0),
                  ("std", samples[..., z].std(axis=0, ddof=1), "magma", std_max))
        for a, (title, image, cmap, vmax) in zip(ax, panels):
            a.imshow(np.rot90(image), cmap=cmap, vmin=0.0, vmax=vmax)
            a.set_title(f"{label}: {title}", fontsize=7)
            a.axis("off")
    fig.suptitle(f"{case.case_id}, axial slice {z} (std scale 0..{std_max:.3f})", fontsize=9)
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- main

def output_dir(args) -> Path:
    return args.out if args.out is not None else (RESULTS_DIR if args.update_results else LOCAL_RESULTS_DIR)


def run_seed(seed: int, args, data: Data, plan: list[Sampling], skipped: list[dict]) -> tuple[list[dict], dict, dict]:
    """Train (or reuse) every model of ``plan`` for one seed and sample + score every row."""
    torch.manual_seed(seed)
    run_root = args.work_dir / "runs" / f"seed{seed}"
    trained, records, teachers, slices = {}, [], {}, {}
    for variant in args.variants:
        for model in MODELS_OF[variant]:
            if model in trained or any(x.get("model") == model and x["seed"] == seed for x in skipped):
                continue
            try:
                trained[model] = train_model(model, args, seed, data, run_root, trained)
            except Unavailable as err:
                skipped.append({"variant": variant, "model": model, "seed": seed, "reason": str(err)})
                logger.warning("skipping model %s: %s", model, err)
    if "C" in trained and any(s.checkpoint == "learned" for s in plan):
        trained["C"]["learned"] = learned_copy(trained["C"]["checkpoint"], args, seed, data)
    models = Models()
    for s in plan:
        if s.model not in trained:
            if not any(x.get("model") == s.model and x["seed"] == seed for x in skipped):
                skipped.append({"variant": s.variant, "model": s.model, "seed": seed,
                                "reason": f"model {s.model} is not in --variants"})
            continue
        info = trained[s.model]
        checkpoint = info["learned"] if s.checkpoint == "learned" else info["checkpoint"]
        try:
            records.append(run_sampling(s, checkpoint, models, args, seed, data, teachers, slices, info))
        except Unavailable as err:
            skipped.append({"variant": s.label, "model": s.model, "seed": seed, "nfe": s.nfe, "reason": str(err)})
            logger.warning("skipping %s K=%d: %s", s.label, s.nfe, err)
    return records, trained, slices


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    check_work_dir(args.work_dir, args.reuse)
    out_dir = output_dir(args)
    start_all = time.perf_counter()
    plan = sampling_plan(args.variants, tuple(args.nfe), tuple(args.fit_nfe), args.quick)
    from guided_diffusion.bratsloader import Geometry

    voxels = math.prod(Geometry.scaled(args.size).network_shape)
    models = list(dict.fromkeys(m for v in args.variants for m in MODELS_OF[v]))
    estimate = estimate_seconds(args, plan, models, voxels)
    print(f"plan: target {args.target}, seeds {args.seeds}, variants {' '.join(args.variants)} (models "
          f"{' '.join(models)}); {args.train_steps} training steps each (batch {args.batch_size}); {args.n_train} training anatomies x {args.draws} draws, "
          f"{args.n_fit} fit, {args.n_test} test cases x {args.oracle_draws} oracle draws; M = {args.samples}; "
          f"{len(plan)} sampling rows, {estimate['network_evaluations']} network evaluations per seed; network grid "
          f"{Geometry.scaled(args.size).network_shape}; estimated {estimate['total_s'] / 60:.0f} min per seed "
          f"(train {estimate['train_s']} s, timestep fits {estimate['fit_s']} s, sample {estimate['sample_s']} s, "
          f"score {estimate['score_s']} s; data not included)", flush=True)
    data = build_data(args, args.work_dir)
    logger.info("data ready in %.0f s: %d test cases, grid %s", data.seconds, len(data.test),
                data.geometry.network_shape)
    oracle, oracle_mean = reference_records(data, args)
    records, skipped, gates, floors, boot, training = [], [], [], [], [], {}
    slices = {}
    for seed in args.seeds:
        seed_records, trained, seed_slices = run_seed(seed, args, data, plan, skipped)
        records += seed_records
        slices = slices or seed_slices
        training[str(seed)] = {v: {k: (str(x) if isinstance(x, Path) else x) for k, x in info.items()}
                               for v, info in trained.items()}
        gates.append(gate_record(records, seed))
        floors.append(floors_record(records, oracle_mean, seed))
        boot += bootstrap_records(records, seed, args.bootstrap)
    payload = {"command": command_line(), "machine": machine(), "records": records, "gate": gates,
               "oracle": oracle, "oracle_mean": oracle_mean, "floors": floors, "bootstrap": boot, "skipped": skipped,
               "training": training, "test_cases": [c.case_id for c in data.test], "estimate": estimate,
               "data_seconds": data.seconds, "total_seconds": time.perf_counter() - start_all,
               "decision_rule": DECISION_RULE}
    config = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "presets": {m: MODEL_PRESETS[m] for m in models}, "plan": [dataclasses.asdict(s) for s in plan],
              "network_shape": list(data.geometry.network_shape), "metrics_grid": "network grid, volumes in [0, 1]; "
              "PSNR/SSIM with BraSyn percentile normalisation; probabilistic scores on the unnormalised volumes"}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_json(config, out_dir / f"{args.name}_config.json")
    save_json(payload, out_dir / f"{args.name}.json")
    plot_crps_nfe(records, [oracle, oracle_mean], out_dir / f"{args.name}_crps_nfe.png")
    plot_slices(slices, data.test[0], out_dir / f"{args.name}_slices.png")
    print(table(records, [oracle, oracle_mean]))
    for g in gates:
        print(f"gate (seed {g['seed']}): {'PASSED' if g['passed'] else 'FAILED' if g['passed'] is False else 'n/a'} "
              f"(C DDPM-1000 tumour spread-skill {_fmt(g.get('spread_skill_tumor'))}, needs >= {GATE_SPREAD_SKILL})")
    for s in skipped:
        print(f"skipped {s['variant']} (seed {s['seed']}): {s['reason']}")
    print(f"wrote {out_dir / (args.name + '.json')} in {payload['total_seconds'] / 60:.1f} min")
    return 0


DECISION_RULE = (
    "Gate: C with DDPM-1000 reaches tumour spread-skill >= 0.5, else fix the benchmark and conclude nothing. "
    "Check first: R against the oracle-mean floor. Primary endpoint: fair CRPS in the tumour at K <= 4 NFE. "
    "FATS is confirmed when its best variant at K <= 4 beats F at equal NFE and R and P at no more NFE on CRPS "
    "(95% interval excluding zero, both seeds), has band energy ratio and spread-skill within 0.8-1.2 in every "
    "band, a larger gain in the detail bands than in LLL, and an ensemble mean within 0.3 dB PSNR of R; refuted "
    "when it is no better than F or P.")


def table(records: list[dict], references: list[dict]) -> str:
    lines = ["| variant | seed | K | NFE | CRPS tumour | CRPS brain | spread-skill tumour | PSNR | PSNR ens. | "
             "SSIM ens. | oracle-mean dist. | s/volume |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in [*references, *records]:
        lines.append(f"| {r['variant']} | {r['seed']} | {r['K']} | {r['nfe']} | {_fmt(r['crps_tumor'])} | "
                     f"{_fmt(r['crps_brain'])} | {_fmt(r['spread_skill_tumor'], 3)} | {_fmt(r['psnr'], 2)} | "
                     f"{_fmt(r['psnr_ensemble'], 2)} | {_fmt(r['ssim_ensemble'])} | "
                     f"{_fmt(r['oracle_mean_distance'], 5)} | {r['seconds_per_volume']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
