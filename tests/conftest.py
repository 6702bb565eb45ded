"""Shared fixtures: tiny models and the golden-reference folder."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

torch.set_num_threads(1)  # 2-core CI machines: one thread per test process avoids oversubscription

from required_marker import (  # noqa: E402,F401  (hooks: a skipped `required` test fails the run)
    pytest_collection_modifyitems, pytest_configure, pytest_runtest_makereport)

GOLDEN_DIR = REPO_ROOT / "tests" / "golden" / "cwdm"  # shipped with the repository


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """``$FASTCWDM_GOLDEN_DIR`` (default tests/golden/cwdm, shipped); skips when absent, and a
    test using it is ``required``, so that skip fails the run."""
    path = Path(os.environ.get("FASTCWDM_GOLDEN_DIR", GOLDEN_DIR))
    if not (path / "golden.npz").is_file():
        pytest.skip(f"cWDM golden reference not found at {path} (set FASTCWDM_GOLDEN_DIR)")
    return path


@pytest.fixture
def tiny_model_config():
    from guided_diffusion.config import ModelConfig

    return ModelConfig(num_channels=8, channel_mult=(1, 2), num_res_blocks=1, num_groups=4)


@pytest.fixture(scope="session")
def tiny_demo_dir(tmp_path_factory) -> Path:
    """A tiny demo dataset made once per session (tests/fixtures_data.py); treat it as read-only
    (copy a split before running anything that writes into its input folder)."""
    from fixtures_data import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("tiny_demo"))
