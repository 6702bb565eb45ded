"""Shared pieces of the command-line scripts: logging, presets + overrides, failure summaries."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

import nibabel as nib

from guided_diffusion.bratsloader import CaseError, Geometry, common_geometry, discover_cases
from guided_diffusion.presets import PRESETS

logger = logging.getLogger("fastcwdm")

EXIT_OK, EXIT_SOME_FAILED, EXIT_FATAL = 0, 1, 2


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def add_preset_argument(parser: argparse.ArgumentParser, default: str = "demo") -> None:
    parser.add_argument("--preset", default=default, choices=sorted(PRESETS),
                        help=f"MODEL preset that sets every hyperparameter (default {default}); flags override")


def override(cfg, **changes):
    """A copy of a frozen config with the non-None values of ``changes`` applied."""
    changes = {k: v for k, v in changes.items() if v is not None}
    return dataclasses.replace(cfg, **changes) if changes else cfg


def dataset_geometry(cases) -> Geometry:
    """Geometry of a dataset from its first case (BraTS or a scaled demo grid)."""
    shape = nib.load(cases[0].reference_path).shape
    try:
        return Geometry.from_original_shape(tuple(shape))
    except ValueError as err:
        raise CaseError(cases[0].reference_path, str(err)) from None


def find_cases(data_dir: str, mode: str, check_data: bool):
    """Discover cases; a missing folder or no usable case is fatal (CaseError)."""
    cases, errors = discover_cases(data_dir, mode=mode, geometry=None, check_data=check_data)
    geometry, cases, off_grid = common_geometry(cases)  # the most common shape decides, not the first case
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
    """Run ``main()`` and exit with its code; user-facing errors never show a traceback."""
    try:
        code = main()
    except KeyboardInterrupt:
        logger.error("interrupted")
        code = 130
    except (CaseError, ValueError, FileExistsError, FileNotFoundError, PermissionError, RuntimeError) as err:
        if env_flag("FASTCWDM_DEBUG"):
            raise
        logger.error("%s", err)
        code = EXIT_FATAL
    sys.exit(code)
