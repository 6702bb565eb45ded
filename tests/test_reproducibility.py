"""Reproducibility: one seed gives bit-identical samples on the CPU, a case's sample does not depend
on the batch it is in, and every run saves its resolved config and package versions."""
from __future__ import annotations

import json
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from bad_input_corpus import GEOMETRY, SCRIPTS, run_in_process, write_case, write_tiny_checkpoint
from fixtures_data import one_thread  # noqa: F401 (a fixture)
from guided_diffusion.bratsloader import expected_path
from guided_diffusion.checkpoints import load_model
from guided_diffusion.config import DiffusionConfig, ModelConfig, SampleConfig, TrainConfig
from guided_diffusion.runinfo import PACKAGES
from guided_diffusion.synthesis import synthesize

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """The tiny preset's model with random non-zero weights (its output conv starts at zero)."""
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt")
    loaded = load_model(path)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return loaded


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5)])
def test_same_seed_same_bits_whatever_the_batch(random_model, sampler, eta):
    volumes = torch.rand((3, 4, *GEOMETRY.network_shape), generator=torch.Generator().manual_seed(1))
    cfg = SampleConfig(sampler=sampler, nfe=3, eta=eta, seed=7)
    ab = synthesize(random_model, volumes[:2], "t2f", cfg, ["A", "B"])
    assert torch.equal(ab, synthesize(random_model, volumes[:2], "t2f", cfg, ["A", "B"]))  # same seed: same bits
    b_alone = synthesize(random_model, volumes[1:2], "t2f", cfg, ["B"])
    assert torch.equal(ab[1], b_alone[0])  # [A, B] vs [B]
    cba = synthesize(random_model, volumes.flip(0), "t2f", cfg, ["C", "B", "A"])
    assert torch.equal(cba[1], b_alone[0]) and torch.equal(cba[2], ab[0])  # order and company do not matter
    other_seed = synthesize(random_model, volumes[1:2], "t2f", SampleConfig(sampler=sampler, nfe=3, eta=eta,
                                                                             seed=8), ["B"])
    assert not torch.equal(other_seed, b_alone)
    assert not torch.equal(ab[0], ab[1])


def _versions_ok(run: dict) -> None:
    assert set(PACKAGES) | {"python"} <= set(run["versions"])
    assert run["versions"]["torch"] == torch.__version__.split("+")[0] or run["versions"]["torch"] == torch.__version__
    assert {"argv", "platform", "cuda"} <= set(run)


@pytest.mark.slow
def test_runs_save_their_resolved_config_and_versions_and_repeat_bit_for_bit(tmp_path):
    for i in range(2):
        write_case(tmp_path / "data", f"case-{i}", seed=i)
    code, _ = run_in_process([sys.executable, str(SCRIPTS / "train.py"), "--preset", "tiny", "--data_dir",
                              str(tmp_path / "data"), "--run_dir", str(tmp_path / "run"), "--max_steps", "2", "--cpu",
                              "--seed", "3"])
    assert code == 0
    run_config = json.loads((tmp_path / "run" / "t2f" / "run_config.json").read_text())
    assert set(run_config) >= {"model", "diffusion", "train", "geometry", "train_cases", "val_cases", "run"}
    assert ModelConfig.from_dict(run_config["model"]) and DiffusionConfig.from_dict(run_config["diffusion"])
    train = TrainConfig.from_dict(run_config["train"])  # resolved: preset values with the flags applied
    assert train.seed == 3 and train.max_steps == 2 and train.target_modality == "t2f"
    assert run_config["geometry"]["original_shape"] == list(GEOMETRY.original_shape)
    _versions_ok(run_config["run"])

    checkpoint = tmp_path / "run" / "t2f" / "latest.pt"
    outputs = []
    for name in ("a", "b"):
        out_dir = tmp_path / f"samples_{name}"
        code, _ = run_in_process([sys.executable, str(SCRIPTS / "sample.py"), "--checkpoint", str(checkpoint),
                                  "--data_dir", str(tmp_path / "data"), "--target", "t2f", "--out_dir", str(out_dir),
                                  "--nfe", "3", "--sampler", "ddpm", "--seed", "5", "--device", "cpu"])
        assert code == 0
        outputs.append(out_dir)
    sample_config = json.loads((outputs[0] / "sample_config.json").read_text())
    assert set(sample_config) >= {"checkpoint", "target_modality", "sample_config", "timesteps", "nfe",
                                  "timesteps_origin", "device", "model_config", "diffusion_config", "run"}
    cfg = SampleConfig.from_dict(sample_config["sample_config"])
    assert (cfg.sampler, cfg.seed, cfg.nfe) == ("ddpm", 5, 3) and sample_config["nfe"] == 3
    assert ModelConfig.from_dict(sample_config["model_config"]) == ModelConfig.from_dict(run_config["model"])
    _versions_ok(sample_config["run"])
    for i in range(2):
        a, b = (nib.load(expected_path(o / f"case-{i}", "t2f")).get_fdata() for o in outputs)
        assert np.array_equal(a, b) and a.any()
