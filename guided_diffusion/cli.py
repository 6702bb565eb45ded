"""Command-line plumbing shared by every command (layer 5: the only layer that parses argv).

The commands themselves live in :mod:`guided_diffusion.commands` (one module each, with a
``main(argv) -> exit code`` and a ``run()`` console entry point); ``scripts/*.py`` and the
``fast-cwdm-*`` console scripts of ``pyproject.toml`` only call ``run()``.

Exit codes: 0 everything worked, 1 some cases (or models) failed and were reported,
2 nothing could be done (bad arguments, no data, unreadable model), 130 interrupted.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import errno
import os
import signal
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .bratsloader import CaseError, common_geometry, discover_cases
from .checkpoints import CheckpointError, read_cwdm_args
from .config import SampleConfig
from .constants import BACKENDS, MODALITIES, PRECISIONS, SAMPLERS
from .extras import MissingExtraError
from .presets import PRESETS
from .samplers import check_sampler_fits

logger = logging.getLogger("fastcwdm")

EXIT_OK, EXIT_SOME_FAILED, EXIT_FATAL, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, what a shell reports for a process ended by SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, Slurm, ``docker stop``), raised where the program is, like Ctrl-C's
    KeyboardInterrupt: temporary files are removed on the way out and batch commands report what
    they finished before exiting with :data:`EXIT_TERMINATED`."""


def _raise_terminated(signum, frame):
    raise Terminated(f"terminated by signal {signal.Signals(signum).name}")


def interrupt_exit_code(err: KeyboardInterrupt) -> int:
    """143 for SIGTERM, 130 for SIGINT (Ctrl-C)."""
    return EXIT_TERMINATED if isinstance(err, Terminated) else EXIT_INTERRUPTED


class ArgumentParser(argparse.ArgumentParser):
    """The parser of every command: ``--verbose``, ``--threads``, logging, and renamed flags that keep working.

    Parsing also sets up logging (INFO, or DEBUG with ``--verbose``) and torch's CPU thread count
    (``--threads N``: ``torch.set_num_threads(N)``). ``add_renamed_flag("--contr",
    "--target")`` makes ``--contr X`` (and ``--contr=X``) mean ``--target X`` and print a
    deprecation note on stderr; ``--help`` shows the new name, its help text mentions the old one.
    The description is shown as written.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.renamed_flags: dict[str, str] = {}
        self.add_argument("--verbose", action="store_true", help="debug logging")
        self.add_argument("--threads", type=int, default=None, metavar="N",
                          help="CPU threads of torch (default: $OMP_NUM_THREADS, else one per core); on a shared "
                               "machine fewer threads than cores can be several times faster")

    def add_renamed_flag(self, old: str, new: str) -> None:
        """Accept ``old`` as a deprecated spelling of the already-added option ``new``."""
        action = self._option_string_actions[new]
        action.help = f"{action.help} (old spelling {old}, deprecated)"
        self.renamed_flags[old] = new

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        namespace, extras = super().parse_known_args(self._new_spellings(args), namespace)
        setup_logging(namespace.verbose)
        if namespace.threads is not None:
            if namespace.threads < 1:
                self.error(f"--threads must be at least 1, got {namespace.threads}")
            torch.set_num_threads(namespace.threads)
        return namespace, extras

    def _new_spellings(self, args: list) -> list:
        out, noted = [], set()
        for i, arg in enumerate(args):
            if arg == "--":  # everything after it is positional
                return out + args[i:]
            flag, sep, value = arg.partition("=") if isinstance(arg, str) else (arg, "", "")
            if flag in self.renamed_flags:
                new = self.renamed_flags[flag]
                if flag not in noted:
                    noted.add(flag)
                    sys.stderr.write(f"{self.prog}: note: {flag} is deprecated, use {new} (same meaning)\n")
                arg = f"{new}{sep}{value}"
            out.append(arg)
        return out


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def add_preset_argument(parser: ArgumentParser, default: str = "demo") -> None:
    parser.add_argument("--preset", default=default, choices=sorted(PRESETS),
                        help=f"preset that sets every hyperparameter (default {default}); flags override")


def add_target_argument(parser: ArgumentParser, help: str, *, allow_all: bool = False, **kwargs) -> None:
    """``--target MOD``: the modality a model synthesises (cWDM's ``--contr`` still accepted)."""
    choices = [*MODALITIES, "all"] if allow_all else list(MODALITIES)
    parser.add_argument("--target", choices=choices, help=help, **kwargs)
    parser.add_renamed_flag("--contr", "--target")


def add_sampling_arguments(parser: ArgumentParser) -> None:
    """Flags that override the sampling settings a checkpoint carries (``SampleConfig``)."""
    p = parser
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="ddpm (ancestral) or ddim (deterministic with eta=0) for a diffusion model; euler for a "
                        "flow-matching model (schedule kind flow)")
    p.add_argument("--nfe", type=int, default=None,
                   help="network evaluations per volume; 0 = the checkpoint's default "
                        "(learned FATS steps or all steps)")
    p.add_renamed_flag("--steps", "--nfe")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (0 = deterministic)")
    p.add_argument("--warm_start_t", type=int, default=None, metavar="STEP",
                   help="warm start: 1 evaluation at the last step (the regression estimate), noised to schedule "
                        "step STEP, then the rest of --nfe from there (--nfe counts all; 0 = plain sampling from "
                        "noise; default: the checkpoint's, e.g. FATS v2's)")
    p.add_argument("--no_clip", action="store_true", help="disable cWDM's x0 clipping (IDWT, clamp [0,1], DWT)")
    p.add_argument("--seed", type=int, default=None, help="seed; each case's noise depends on (seed, case id) only")
    p.add_argument("--precision", choices=PRECISIONS, default=None, help="bf16 = autocast the network")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the network (first case compiles: ~45 s for the full UNet on an H100, then "
                        "2.6x faster per evaluation in bf16; see README 'Performance')")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="where the network runs: pytorch (default) or openvino (CPU only; the 'openvino' extra: "
                        "about 2x faster per evaluation on an x86 CPU with AMX; converted once per checkpoint and "
                        "cached, see docs/performance.md)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--keep_background", action="store_true",
                   help="write the synthesis as sampled; by default it is zeroed outside the head (where every "
                        "conditioning modality is 0), as skull-stripped BraTS volumes are")
    p.add_argument("--cwdm_args", type=_cwdm_args_file, default=None, metavar="JSON",
                   help="cWDM weights only: a JSON file of the arguments cWDM trained them with (num_channels, "
                        "channel_mult, num_res_blocks, num_groups ...; default: <weights>.json beside the weights, "
                        "else inferred from the shapes with 32 GroupNorm groups assumed)")


def add_ensemble_arguments(parser: ArgumentParser) -> None:
    """``--num_samples`` / ``--save_samples``: an ensemble per case (``guided_diffusion.ensembles``)."""
    parser.add_argument("--num_samples", type=positive_int, default=1, metavar="M",
                        help="samples per case (default 1); M > 1 writes their mean as the synthesis and "
                             "<case>-<mod>_std.nii.gz, the per-voxel std (docs/uncertainty.md)")
    parser.add_argument("--save_samples", action="store_true",
                        help="with --num_samples M > 1: also write each sample, <case>-<mod>_sample<m>.nii.gz")


def check_ensemble_arguments(args: argparse.Namespace) -> None:
    """Refuse ``--save_samples`` without an ensemble (``--num_samples`` 1 has no samples beside the synthesis)."""
    if args.save_samples and args.num_samples < 2:
        raise ValueError(f"--save_samples needs --num_samples > 1 (got --num_samples {args.num_samples})")


def background_note(keep_background: bool) -> str:
    """How the written synthesis treats the background (recorded with the results)."""
    return ("raw: as sampled (--keep_background)" if keep_background else
            "zeroed outside the head (where every conditioning modality is 0; conditioning.zero_outside_head)")


def _cwdm_args_file(path: str) -> dict:
    try:
        return read_cwdm_args(path)
    except CheckpointError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


class FitProgress:
    """The ``progress`` callback of ``fats_training.fit_and_store_timesteps``: a bar over the NFE
    budgets with the current budget, sweep, position and error on a terminal; where stderr is not
    a terminal (logs, batch jobs) the bar is off and each budget logs a line when it starts and ends."""

    def __init__(self, desc: str = "fit timesteps"):
        self.desc, self.bar = desc, None

    def __call__(self, event: dict) -> None:
        if self.bar is None:
            self.bar = tqdm(total=event["budgets"], desc=self.desc, disable=None, dynamic_ncols=True)
        post = {"nfe": event["nfe"]}
        if event["event"] == "start":
            if self.bar.disable:
                logger.info("%s: NFE=%d (%d of %d) ...", self.desc, event["nfe"], event["index"] + 1, event["budgets"])
        elif event["event"] == "improved":
            post.update(sweep=event["sweep"], position=event["position"], error=f"{event['error']:.4g}")
        else:
            self.bar.update(1)
            if self.bar.disable:
                logger.info("%s: NFE=%d done, error %.5g", self.desc, event["nfe"], event["result"]["error"])
            if event["index"] + 1 == event["budgets"]:
                self.bar.close()
        self.bar.set_postfix(post, refresh=False)


STEP_BAR_MIN = 50  # network evaluations per case from which a case gets its own progress bar


def step_progress(total: int, desc: str):
    """The ``callback`` of ``synthesis.synthesize`` for one case: a transient bar over its ``total``
    network evaluations on a terminal when there are at least :data:`STEP_BAR_MIN` (a 1000-step
    DDPM case takes minutes); elsewhere a log line says the case started. None when not needed."""
    if total < STEP_BAR_MIN:
        return None
    bar = tqdm(total=total, desc=desc, unit="eval", leave=False, disable=None, dynamic_ncols=True)
    if bar.disable:
        logger.info("%s: %d network evaluations ...", desc, total)
        return None

    def on_step(state: dict) -> None:
        bar.update(1)
        if bar.n >= total:
            bar.close()
    return on_step


def override(cfg, **changes):
    """A copy of a frozen config with the non-None values of ``changes`` applied."""
    changes = {k: v for k, v in changes.items() if v is not None}
    return dataclasses.replace(cfg, **changes) if changes else cfg


def sample_config_from_args(args: argparse.Namespace, checkpoint_default: SampleConfig) -> SampleConfig:
    """The checkpoint's sampling settings with the flags of :func:`add_sampling_arguments` applied."""
    return override(checkpoint_default, sampler=args.sampler, nfe=args.nfe, eta=args.eta,
                    warm_start_t=args.warm_start_t, seed=args.seed,
                    precision=args.precision, clip_denoised=False if args.no_clip else None, compile=args.compile,
                    backend=args.backend)


CWDM_SAMPLE = SampleConfig(sampler="ddpm", nfe=0)  # cWDM's sample.py: DDPM over all 1000 steps, fixed-large variance


def checkpoint_sample_defaults(loaded) -> SampleConfig:
    """The sampling settings stored with the model by its preset; for cWDM's bare weights, what
    cWDM published them with (:data:`CWDM_SAMPLE`, logged); SampleConfig defaults otherwise."""
    if loaded.extra.get("origin") == "cwdm" and "sample" not in loaded.extra:
        logger.info("%s: cWDM weights: sampling as cWDM does by default (DDPM, all %d steps, fixed-large "
                    "variance); --sampler ddim --nfe K samples faster", loaded.source, loaded.schedule.num_steps)
        return CWDM_SAMPLE
    return SampleConfig.from_dict(loaded.extra.get("sample", {}))


def check_model_target(loaded, target: str, source: str) -> None:
    """Refuse a model trained to synthesise another modality (cWDM weights do not say: accepted)."""
    trained = loaded.target_modality
    if trained and trained != target and not loaded.model_config.num_modality_labels:
        raise CheckpointError(f"{source}: this model was trained to synthesise {trained}, not {target}")


def check_sampler(cfg: SampleConfig, loaded, source: str) -> None:
    """Refuse, before any case, a sampler that cannot sample this model (``samplers.check_sampler_fits``:
    euler for a flow-matching model, ddpm / ddim for a diffusion model): CheckpointError naming ``source``."""
    try:
        check_sampler_fits(cfg.sampler, loaded.schedule)
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from None


def default_device(name: str | None) -> torch.device:
    """``--device`` (default cuda when available); a CUDA device that is not there is refused now,
    before any work, with one line (ValueError)."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise ValueError(f"--device {name}: not a device name ({err})") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.index is not None and device.index >= count or not count:
            raise ValueError(f"--device {name}: CUDA is not available here ({count} CUDA devices visible); "
                             "use --device cpu")
    return device


def _int_at_least(text: str, minimum: int, problem: str) -> int:
    """``int(text)``, or argparse's error when it is not an integer or below ``minimum``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} {problem}")
    return value


def positive_int(text: str) -> int:
    """argparse type of counts that must be at least 1 (``--num_samples``)."""
    return _int_at_least(text, 1, "is not a positive integer (need at least 1)")


def nonnegative_int(text: str) -> int:
    """argparse type of counts where 0 means 'all' (``--max_cases``): a negative value is an error."""
    return _int_at_least(text, 0, "is negative (0 means all)")


def check_fits_model(geometry, loaded, source: str, data_dir: str) -> None:
    """Refuse (CaseError on ``data_dir``) a dataset grid the model's downsamplings cannot halve."""
    try:
        geometry.check_divisible(loaded.model_config.spatial_divisor.bit_length())  # DWT (x2) + UNet levels
    except ValueError as err:
        raise CaseError(Path(data_dir), f"the cases do not fit the model {source}: {err}") from None


def check_output_dir(out_dir: str | os.PathLike, inputs: list[Path] = (), *, input_dir=None) -> Path:
    """Make sure results can be written to ``out_dir`` before any work is done, and that no output
    can land on an input: ``out_dir`` (symbolic links resolved) may not be ``input_dir``, lie inside
    it or contain it, and no file of ``inputs`` may lie in it; the folder, or the nearest existing
    folder above it, must be writable. Creates nothing; one-line ValueError (naming the folder and
    the problem) otherwise."""
    out = Path(out_dir)
    resolved = out.resolve()
    if input_dir is not None:
        data = Path(input_dir).resolve()
        if resolved == data or data in resolved.parents or resolved in data.parents:
            raise ValueError(f"{out}: the output folder overlaps the input dataset {input_dir} "
                             f"(resolved: {resolved} and {data}); choose an output folder outside it")
    for path in inputs:
        if resolved in Path(path).resolve().parents:
            raise ValueError(f"{out}: holds the input file {path}; choose an output folder without inputs")
    existing = next(p for p in (resolved, *resolved.parents) if p.exists())  # the folder is made when written to
    if not existing.is_dir():
        raise ValueError(f"{out}: cannot create the output folder (Not a directory: {existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):  # also False on a read-only mount, for root too
        raise ValueError(f"{out}: cannot write the results there ({existing}: no write permission or a read-only "
                         "file system)")
    return out


def case_error(err: BaseException, path: str | os.PathLike, log: logging.Logger | None = None) -> CaseError:
    """Any error of one case as a one-line :class:`CaseError` naming a file: the file an OSError
    names (e.g. the output, for ENOSPC / EROFS), else ``path``; a ``CaseError`` stays as it is.
    With ``log``, the line is also logged as an error."""
    line = _case_error(err, path)
    if log is not None:
        log.error("%s", line)
    return line


def _case_error(err: BaseException, path: str | os.PathLike) -> CaseError:
    if isinstance(err, CaseError):
        return err
    if isinstance(err, FileExistsError) and err.filename and Path(err.filename) == Path(path):
        return CaseError(path, "appeared while this case was processed; refusing to overwrite it (case skipped)")
    if isinstance(err, OSError):
        name = errno.errorcode.get(err.errno, "")
        return CaseError(err.filename or path, f"{err.strerror or err}" + (f" ({name})" if name else ""))
    return CaseError(path, f"{type(err).__name__}: {err}")


def find_cases(data_dir: str, mode: str, check_data: bool):
    """Discover cases; a missing folder or no usable case is fatal (CaseError).

    Returns (cases, per-case errors, the dataset's Geometry): the most common shape decides,
    cases of another shape are errors."""
    cases, errors = discover_cases(data_dir, mode=mode, geometry=None, check_data=check_data)
    geometry, cases, off_grid = common_geometry(cases)
    errors += off_grid
    if not cases:
        detail = f" ({len(errors)} bad cases, first: {errors[0]})" if errors else ""
        raise CaseError(Path(data_dir), f"no usable {mode}-mode BraTS cases found{detail}")
    return cases, errors, geometry


def report_failures(failures: list[CaseError | str], what: str) -> int:
    """Log a summary of per-case failures; the exit code for the batch."""
    if not failures:
        return EXIT_OK
    logger.error("%d %s failed:", len(failures), what)
    for failure in failures:
        logger.error("  %s", failure)
    return EXIT_SOME_FAILED


def fatal(message: object) -> int:
    logger.error("%s", message)
    return EXIT_FATAL


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def main_guard(main) -> None:
    """Run ``main()`` and exit with its code; user-facing errors never show a traceback
    (``FASTCWDM_DEBUG=1`` shows it)."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)  # SIGTERM behaves like Ctrl-C
    try:
        code = main()
    except KeyboardInterrupt as err:
        logger.error("%s", err if isinstance(err, Terminated) else "interrupted")
        code = interrupt_exit_code(err)
    except (CaseError, ValueError, OSError, RuntimeError, MissingExtraError) as err:  # OSError: ENOSPC, EROFS ...
        if env_flag("FASTCWDM_DEBUG"):
            raise
        logger.error("%s", err)
        code = EXIT_FATAL
    finally:
        signal.signal(signal.SIGTERM, previous)
    sys.exit(code)
