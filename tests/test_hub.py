"""Published weights, end to end: hf:// sources resolved offline from a local Hugging Face cache,
and cWDM's bare UNet state dicts (config inferred from the shapes) through sample.py and
sample_auto.py. Nothing here touches the network (HF_HUB_OFFLINE=1)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from fixtures_data import one_thread  # noqa: F401 (a fixture)
from fixtures_data import REPO_ROOT, digest, populate_hf_cache, run_main
from guided_diffusion.bratsloader import expected_path
from guided_diffusion.checkpoints import CWDM_NUM_GROUPS, CheckpointError, export_safetensors, load_model
from guided_diffusion.config import DiffusionConfig, ModelConfig, TrainConfig
from guided_diffusion.factory import build_model, build_schedule
from guided_diffusion.presets import DEMO_MODEL, get_preset

pytestmark = pytest.mark.usefixtures("one_thread")

REPO_ID = "fastcwdm-test/brats-models"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
# cWDM's loader assumes GroupNorm with CWDM_NUM_GROUPS = 32 groups (group counts are not visible in
# the shapes), so a test model in cWDM's layout needs widths divisible by 32: the smallest such
# UNet, not the published size (that one is checked below from the golden shapes file).
CWDM_TEST_MODEL = ModelConfig(num_channels=32, channel_mult=(1, 2), num_res_blocks=1, num_groups=CWDM_NUM_GROUPS)


@pytest.fixture(scope="module")
def published(tiny_demo_dir, tmp_path_factory):
    """A bare cWDM-layout state dict (as cWDM publishes them) for t1n, a Fast-cWDM safetensors
    export for t1c, both also in a hub cache under ``main``, ``v1.0`` and the commit hash."""
    root = tmp_path_factory.mktemp("published")
    torch.manual_seed(0)
    cwdm = root / "cwdm_t1n.pt"
    torch.save(build_model(CWDM_TEST_MODEL).state_dict(), cwdm)

    tiny = get_preset("tiny")
    torch.manual_seed(1)
    fast = export_safetensors({
        "model": build_model(tiny.model).state_dict(), "ema": None, "step": 7,
        "config": {"model": tiny.model.to_dict(), "diffusion": tiny.diffusion.to_dict(),
                   "train": TrainConfig(target_modality="t1c").to_dict()},
        "schedule": build_schedule(tiny.diffusion).state_dict(), "extra": {"sample": tiny.sample.to_dict()},
    }, root / "fast_t1c.safetensors")

    cache = root / "hf_cache"
    populate_hf_cache(cache, REPO_ID, {"cwdm/t1n.pt": cwdm, "fast/t1c.safetensors": fast}, COMMIT,
                      refs=("main", "v1.0"))
    missing = json.loads((tiny_demo_dir / "pseudo_validation" / "missing_modalities.json").read_text())
    assert sorted(missing.values()) == ["t1c", "t1n"]  # what the two models above are for
    return SimpleNamespace(cwdm=cwdm, fast=fast, cache=cache, missing=missing)


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 for this process (huggingface_hub reads it when imported)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_cwdm_state_dict_is_recognised_from_its_shapes(published):
    state = torch.load(published.cwdm, weights_only=True)
    assert "format" not in state and "time_embed.0.weight" in state and "out.2.weight" in state
    loaded = load_model(published.cwdm)
    assert loaded.model_config == CWDM_TEST_MODEL
    assert loaded.diffusion_config == DiffusionConfig()  # cWDM: linear, 1000 steps
    assert loaded.target_modality is None and loaded.extra["origin"] == "cwdm"


def test_cwdm_state_dict_with_another_group_count_is_explained(tmp_path):
    path = tmp_path / "demo_sized.pt"
    torch.save(build_model(DEMO_MODEL).state_dict(), path)  # 16 channels: cannot have 32 groups
    with pytest.raises(CheckpointError, match=f"{path}.*num_groups={CWDM_NUM_GROUPS}"):
        load_model(path)


def test_sample_auto_uses_hub_models_from_the_cache_offline(published, tiny_demo_dir, tmp_path, offline):
    data_dir, out_dir = tiny_demo_dir / "pseudo_validation", tmp_path / "completed"
    sources = {"t1n": f"hf://{REPO_ID}/cwdm/t1n.pt@v1.0", "t1c": f"hf://{REPO_ID}/fast/t1c.safetensors"}
    cache_before, data_before = digest(published.cache), digest(data_dir)
    argv = ["--data_dir", data_dir, "--out_dir", out_dir, "--hf_cache", published.cache, "--nfe", 2,
            *[a for m, s in sources.items() for a in ("--checkpoint", f"{m}={s}")]]
    assert run_main("sample_auto", argv) == 0
    for case_id, modality in published.missing.items():
        out = nib.load(expected_path(out_dir / case_id, modality))
        ref = nib.load(expected_path(tiny_demo_dir / "pseudo_validation_gt" / case_id, modality))
        assert out.shape == ref.shape and np.array_equal(out.affine, ref.affine)
        assert np.isfinite(out.get_fdata()).all()
    report = json.loads((out_dir / "completion_report.json").read_text())
    assert report["models"] == sources and {r["nfe"] for r in report["completed"]} == {2}
    provenance = report["model_provenance"]  # which weights, at which hub commit, sampled how
    assert {m: p["hub_commit"] for m, p in provenance.items()} == {"t1n": COMMIT, "t1c": COMMIT}
    assert provenance["t1n"]["format"] == "cwdm" and "assumed" in provenance["t1n"]["config_origin"]
    assert provenance["t1n"]["sample_config"]["sampler"] == "ddpm" and provenance["t1c"]["step"] == 7
    assert provenance["t1n"]["sha256"] == hashlib.sha256(published.cwdm.read_bytes()).hexdigest()
    assert digest(published.cache) == cache_before and digest(data_dir) == data_before


def test_sample_accepts_a_cwdm_state_dict_locally_and_from_the_hub(published, tiny_demo_dir, tmp_path, offline):
    data_dir = tiny_demo_dir / "pseudo_validation_gt"
    common = ["--data_dir", data_dir, "--target", "t1n", "--max_cases", 1, "--nfe", 2]
    assert run_main("sample", ["--checkpoint", published.cwdm, "--out_dir", tmp_path / "local", *common]) == 0
    hub = f"hf://{REPO_ID}/cwdm/t1n.pt@{COMMIT}"
    assert run_main("sample", ["--checkpoint", hub, "--hf_cache", published.cache, "--out_dir", tmp_path / "hub",
                               *common]) == 0
    config = json.loads((tmp_path / "hub" / "sample_config.json").read_text())
    assert config["model_config"] == CWDM_TEST_MODEL.to_dict()
    assert config["diffusion_config"] == DiffusionConfig().to_dict() and config["checkpoint"] == hub
    local, remote = digest(tmp_path / "local"), digest(tmp_path / "hub")
    volumes = [k for k in local if k.endswith(".nii.gz")]
    assert len(volumes) == 1 and all(local[k] == remote[k] for k in volumes)  # same weights, same seed


def test_sample_auto_refuses_a_model_for_another_modality(published, tiny_demo_dir, tmp_path, caplog, offline):
    argv = ["--data_dir", tiny_demo_dir / "pseudo_validation", "--out_dir", tmp_path / "out", "--nfe", 2,
            "--hf_cache", published.cache, "--checkpoint", f"t1n=hf://{REPO_ID}/fast/t1c.safetensors",
            "--checkpoint", f"t1c={published.fast}"]
    assert run_main("sample_auto", argv) == 1  # the t1n case fails, the t1c case is completed
    assert "trained to synthesise t1c, not t1n" in caplog.text
    assert [p.name for p in (tmp_path / "out").rglob("*.nii.gz")] == [
        expected_path(Path(c), "t1c").name for c, m in published.missing.items() if m == "t1c"]


@pytest.mark.parametrize("source", [f"hf://{REPO_ID}/cwdm/t1n.pt@v9", "hf://nobody/absent/t1n.pt"])
def test_sample_with_an_uncached_hub_model_fails_clearly(source, published, tiny_demo_dir, tmp_path, caplog,
                                                         offline):
    argv = ["--checkpoint", source, "--hf_cache", published.cache, "--data_dir", tiny_demo_dir / "pseudo_validation_gt",
            "--target", "t1n", "--out_dir", tmp_path / "out"]
    assert run_main("sample", argv) == 2
    assert source in caplog.text and "offline" in caplog.text and "HF_HUB_OFFLINE=1" in caplog.text
    assert not (tmp_path / "out").exists()


def test_sample_auto_command_line_reports_an_uncached_repo_without_traceback(published, tiny_demo_dir, tmp_path):
    source = "hf://nobody/absent/model.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("FASTCWDM_DEBUG", None)
    argv = [sys.executable, str(REPO_ROOT / "scripts" / "sample_auto.py"), "--data_dir",
            str(tiny_demo_dir / "pseudo_validation"), "--out_dir", str(tmp_path / "out"), "--hf_cache",
            str(published.cache), "--checkpoint", f"t1n={source}", "--checkpoint", f"t1c={source}"]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 1, result.stderr  # every case reported as failed
    assert "Traceback" not in result.stderr
    assert source in result.stderr and "offline" in result.stderr and "HF_HUB_OFFLINE=1" in result.stderr
    assert not (tmp_path / "out").exists()


def test_published_cwdm_layout_loads_into_the_full_configuration(golden_dir, tmp_path):
    shapes_file = golden_dir / "full_model_state_dict_shapes.json"  # shipped in tests/golden/cwdm
    shapes = json.loads(shapes_file.read_text())
    path = tmp_path / "cwdm_full.pt"
    torch.save({name: torch.zeros(shape) for name, shape in shapes.items()}, path)
    loaded = load_model(path)
    assert loaded.model_config == ModelConfig()  # cWDM's published configuration, inferred from the shapes
    state = loaded.model.state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == shapes
    assert all(not v.any() for v in state.values())
