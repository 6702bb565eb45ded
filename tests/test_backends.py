"""``--backend openvino`` (guided_diffusion/backends.py): the same synthesis as the PyTorch path within
the stated tolerance, the conversion cached by weights, and a clear error without the extra.

Tolerance (docs/performance.md, "CPU"): in float32 the OpenVINO network is the PyTorch network
(max |diff| < 1e-4 on the tiny model's outputs of size ~1); in bf16 the OpenVINO synthesis is as
far from the float32 PyTorch synthesis as PyTorch's own bf16 synthesis is, within a factor of 2
(max and mean absolute difference of the [0, 1] intensities). The float32 PyTorch path is the
oracle; the bf16 PyTorch path says how large bf16 rounding is.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import sys

import pytest
import torch

from fixtures_data import one_thread  # noqa: F401 (a fixture)
from fixtures_data import random_model
from guided_diffusion import backends, cli
from guided_diffusion.commands import sample, sample_auto
from guided_diffusion.config import ConfigError, DiffusionConfig, SampleConfig
from guided_diffusion.extras import MissingExtraError
from guided_diffusion.factory import build_schedule
from guided_diffusion.presets import TINY_MODEL
from guided_diffusion.synthesis import synthesize_volumes
from guided_diffusion.timesteps import uniform_timesteps

pytestmark = pytest.mark.usefixtures("one_thread")
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="the optional 'openvino' extra is not installed "
                                                             "(pip install -e '.[openvino]')")


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(backends.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino fails as if not installed
    with pytest.raises(MissingExtraError, match=r"fast-cwdm\[openvino\]"):
        backends.inference_network(random_model(), "openvino", "bf16")


def test_pytorch_backend_is_the_model_and_bad_requests_are_refused():
    model = random_model()
    assert backends.inference_network(model, "pytorch", "bf16") is model
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.inference_network(model, "onnx", "bf16")
    with pytest.raises(ValueError, match="runs the network on the CPU"):
        backends.inference_network(random_model().to("meta"), "openvino", "bf16")
    with pytest.raises(ConfigError, match="backend must be one of"):
        SampleConfig(backend="tensorrt")
    with pytest.raises(ConfigError, match="for backend 'pytorch' only"):
        SampleConfig(backend="openvino", compile=True)


def test_backend_flag_reaches_the_sample_config():
    args = sample.parse_args(["--checkpoint", "m.pt", "--data_dir", "d", "--target", "t2f", "--out_dir", "o",
                              "--backend", "openvino"])
    assert cli.sample_config_from_args(args, SampleConfig()).backend == "openvino"
    args = sample_auto.parse_args(["--data_dir", "d", "--out_dir", "o", "--backend", "openvino"])
    assert cli.sample_config_from_args(args, SampleConfig()).backend == "openvino"
    args = sample.parse_args(["--checkpoint", "m.pt", "--data_dir", "d", "--target", "t2f", "--out_dir", "o"])
    assert cli.sample_config_from_args(args, SampleConfig()).backend == "pytorch"  # the default stays PyTorch


@needs_openvino
def test_openvino_synthesis_matches_pytorch(cache):
    model = random_model()
    schedule = build_schedule(DiffusionConfig(kind="fast_sampled", fast_intervals=10))
    volumes = torch.rand(2, 4, 16, 16, 12, generator=torch.Generator().manual_seed(1))
    timesteps = uniform_timesteps(schedule.num_steps, 3)

    def run(backend, precision):
        cfg = SampleConfig(sampler="ddim", backend=backend, precision=precision)
        return synthesize_volumes(model, schedule, volumes, "t2f", cfg, ["a", "b"], timesteps)

    oracle, torch_bf16 = run("pytorch", "fp32"), run("pytorch", "bf16")
    ov_fp32, ov_bf16 = run("openvino", "fp32"), run("openvino", "bf16")
    assert oracle.std() > 0.01  # a synthesis, not a constant
    assert (ov_fp32 - oracle).abs().max() < 1e-4
    torch_error, ov_error = (torch_bf16 - oracle).abs(), (ov_bf16 - oracle).abs()
    assert torch_error.max() > 0  # bf16 really rounds (else the comparison below says nothing)
    assert ov_error.max() <= 2 * torch_error.max() and ov_error.mean() <= 2 * torch_error.mean()
    assert torch.equal(run("openvino", "bf16"), ov_bf16)  # deterministic


@needs_openvino
def test_conversion_is_cached_by_weights(cache):
    model = random_model()
    x = torch.randn(1, TINY_MODEL.in_channels, 8, 8, 6)
    t = torch.tensor([300.0])
    first = backends.OpenVINONetwork(model, "fp32")
    assert "convert" in first.seconds
    (folder,) = (cache / "openvino").iterdir()  # one published folder, no temporary leftovers
    assert sorted(p.name for p in folder.iterdir()) == ["model.bin", "model.xml", "source.json"]
    again = backends.OpenVINONetwork(model, "fp32")
    assert "convert" not in again.seconds and again.ir_path == first.ir_path
    assert torch.equal(again(x, t), first(x, t))
    other = random_model(seed=1)  # other weights: another key, another conversion, other outputs
    third = backends.OpenVINONetwork(other, "fp32")
    assert "convert" in third.seconds and third.ir_path != first.ir_path
    with torch.no_grad():
        assert (third(x, t) - other(x, t)).abs().max() < 1e-4
        assert (first(x, t) - model(x, t)).abs().max() < 1e-4


@needs_openvino
def test_label_conditioned_model(cache):
    cfg = dataclasses.replace(TINY_MODEL, num_modality_labels=4)
    model = random_model(cfg)
    x = torch.randn(2, cfg.in_channels, 8, 8, 6)
    t, label = torch.tensor([300.0, 10.0]), torch.tensor([1, 3])
    with torch.no_grad():
        expected = model(x, t, label=label)
    got = backends.inference_network(model, "openvino", "fp32")(x, t, label=label)
    assert (got - expected).abs().max() < 1e-4


@needs_openvino
def test_sample_command_with_openvino(tiny_demo_dir, tmp_path, cache):
    """scripts/sample.py --backend openvino end to end: the written syntheses equal the PyTorch
    backend's (fp32) and sample_config.json records the backend."""
    import json

    import nibabel as nib
    import numpy as np

    from fixtures_data import run_main
    from guided_diffusion.bratsloader import expected_path
    from guided_diffusion.checkpoints import save_checkpoint
    from guided_diffusion.config import TrainConfig
    from guided_diffusion.presets import get_preset

    tiny = get_preset("tiny")
    model = random_model(tiny.model)
    checkpoint = save_checkpoint(tmp_path / "t2f.pt", {
        "model": model.state_dict(), "ema": model.state_dict(), "step": 1, "optimizer": None,
        "config": {"model": tiny.model.to_dict(), "diffusion": tiny.diffusion.to_dict(),
                   "train": TrainConfig(target_modality="t2f").to_dict()},
        "schedule": build_schedule(tiny.diffusion).state_dict(), "extra": {"sample": tiny.sample.to_dict()}})
    data_dir = tiny_demo_dir / "pseudo_validation_gt"
    common = ["--checkpoint", checkpoint, "--data_dir", data_dir, "--target", "t2f", "--nfe", 2,
              "--sampler", "ddim", "--precision", "fp32", "--device", "cpu"]
    assert run_main("sample", [*common, "--out_dir", tmp_path / "pytorch"]) == 0
    assert run_main("sample", [*common, "--out_dir", tmp_path / "openvino", "--backend", "openvino"]) == 0
    written = json.loads((tmp_path / "openvino" / "sample_config.json").read_text())
    assert written["sample_config"]["backend"] == "openvino"
    cases = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
    assert cases
    for case in cases:
        a = nib.load(expected_path(tmp_path / "pytorch" / case, "t2f")).get_fdata()
        b = nib.load(expected_path(tmp_path / "openvino" / case, "t2f")).get_fdata()
        assert np.abs(a).max() > 0 and np.abs(a - b).max() < 1e-3
