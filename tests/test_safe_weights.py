"""Safe weights: no checkpoint load can run code, exported .safetensors load back, hub downloads are
pinned to a revision, and a checkpoint whose config does not match its model is refused with the
difference spelled out."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

from bad_input_corpus import REPO_ROOT, SCRIPTS, run_in_process, write_tiny_checkpoint
from fixtures_data import one_thread  # noqa: F401 (a fixture)
from guided_diffusion.checkpoints import (CheckpointError, export_safetensors, load_model, read_checkpoint,
                                          resolve_model_source)
from guided_diffusion.config import ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")
SOURCE_DIRS = ("guided_diffusion", "scripts", "benchmarks", "tests", "DWT_IDWT")
ON_PURPOSE = "# unsafe on purpose"  # the one exception: this file's proof that the test payload is live


def _python_files() -> list[Path]:
    files = [p for d in SOURCE_DIRS for p in (REPO_ROOT / d).rglob("*.py")]
    return sorted(p for p in files if ".venv" not in p.parts)


def _unsafe_loads(path: Path) -> list[str]:
    """Calls that could unpickle code: torch.load without weights_only=True, pickle.load(s),
    numpy load with allow_pickle=True."""
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text, filename=str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        keywords = {k.arg: k.value for k in node.keywords}
        is_true = lambda v: isinstance(v, ast.Constant) and v.value is True  # noqa: E731
        where = f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
        if path == Path(__file__).resolve() and ON_PURPOSE in lines[node.lineno - 1]:
            continue
        if owner == "torch" and node.func.attr == "load" and not is_true(keywords.get("weights_only")):
            found.append(f"{where}: torch.load without weights_only=True")
        if owner in ("pickle", "cPickle", "dill") and node.func.attr in ("load", "loads"):
            found.append(f"{where}: {owner}.{node.func.attr}")
        if owner in ("np", "numpy") and node.func.attr == "load" and is_true(keywords.get("allow_pickle")):
            found.append(f"{where}: numpy load with allow_pickle=True")
    return found


def test_every_torch_load_in_the_repo_uses_weights_only():
    files = _python_files()
    calls = sum(ast.dump(ast.parse(p.read_text())).count("attr='load'") for p in files)
    assert calls >= 1  # the scan does see the loads (checkpoints.read_checkpoint at least)
    unsafe = [hit for p in files for hit in _unsafe_loads(p)]
    assert unsafe == []


class _WritesAFile:
    """Unpickling this runs ``exec``, which writes ``marker``: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def _malicious_checkpoint(path: Path, marker: Path) -> Path:
    state = ModelConfig(num_channels=8, channel_mult=(1, 2), num_res_blocks=1, num_groups=4)
    torch.save({"format": "fast-cwdm/1", "model": {}, "config": {"model": state.to_dict()},
                "payload": _WritesAFile(marker)}, path)
    return path


def test_a_checkpoint_carrying_a_pickled_object_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned.txt"
    evil = _malicious_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(evil)
    assert not marker.exists()
    message = str(info.value)
    assert message.startswith(f"{evil}: refused to load") and "pickled Python objects" in message
    with pytest.raises(CheckpointError, match="refused to load"):
        load_model(evil)
    assert not marker.exists()
    # through the command line's error handling: exit 2, the same message, nothing written
    code, records = run_in_process([sys.executable, str(SCRIPTS / "sample.py"), "--checkpoint", str(evil),
                                    "--data_dir", str(tmp_path), "--target", "t2f", "--out_dir", str(tmp_path / "o")])
    assert code == 2 and "refused to load" in records[-1].getMessage()
    assert not marker.exists() and not (tmp_path / "o").exists()
    # the payload is live: plain unpickling would have written the file
    torch.load(evil, weights_only=False)  # unsafe on purpose: proves the payload is live
    assert marker.read_text() == "pwned"


def test_safetensors_export_carries_the_config_and_loads_back(tmp_path):
    checkpoint_path = write_tiny_checkpoint(tmp_path / "tiny.pt")
    checkpoint = read_checkpoint(checkpoint_path)
    with torch.no_grad():  # distinct EMA weights, so that we see which ones were exported
        checkpoint["ema"] = {k: v + 0.5 for k, v in checkpoint["model"].items()}
    exported = export_safetensors(checkpoint, tmp_path / "tiny.safetensors")
    from safetensors import safe_open

    with safe_open(str(exported), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "fast-cwdm/1" and '"model"' in meta["config"]
    loaded, original = load_model(exported), load_model(checkpoint_path, use_ema=False)
    assert loaded.model_config == original.model_config
    assert loaded.diffusion_config == original.diffusion_config
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, checkpoint["ema"][key]), key
    assert torch.equal(loaded.schedule.alpha_bar, original.schedule.alpha_bar)
    assert loaded.extra == checkpoint["extra"]
    assert list(tmp_path.glob(".*.tmp")) == []  # written atomically, nothing left behind


@pytest.mark.parametrize("source, repo_id, filename, revision", [
    ("hf://org/repo/t2f.pt@0123abcd", "org/repo", "t2f.pt", "0123abcd"),
    ("hf://org/repo/models/t1c.safetensors@v1.0", "org/repo", "models/t1c.safetensors", "v1.0"),
    ("hf://org/repo/t2f.pt", "org/repo", "t2f.pt", None),
])
def test_hub_sources_are_pinned_to_their_revision(monkeypatch, tmp_path, source, repo_id, filename, revision):
    import huggingface_hub

    calls = []

    def fake_download(repo, file, *, revision=None, cache_dir=None, **kwargs):
        calls.append((repo, file, revision, cache_dir))
        return str(tmp_path / "downloaded.pt")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert resolve_model_source(source, cache_dir=tmp_path / "cache") == tmp_path / "downloaded.pt"
    assert calls == [(repo_id, filename, revision, str(tmp_path / "cache"))]


def test_hub_source_without_a_file_is_refused():
    with pytest.raises(CheckpointError, match="expected hf://<org>/<repo>/<filename>"):
        resolve_model_source("hf://org/repo@abc")


def test_config_mismatch_is_refused_with_the_differences(tmp_path):
    checkpoint_path = write_tiny_checkpoint(tmp_path / "tiny.pt")
    stored = load_model(checkpoint_path).model_config
    other = ModelConfig(num_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, num_groups=8)
    with pytest.raises(CheckpointError) as info:
        load_model(checkpoint_path, expected_model_config=other)
    message = str(info.value)
    assert "model config differs" in message
    assert "num_channels: 16 -> 8" in message and "channel_mult: [1, 2, 2] -> [1, 2]" in message
    assert "num_res_blocks" not in message  # only what differs
    assert load_model(checkpoint_path, expected_model_config=stored).model_config == stored


def test_weights_that_do_not_fit_their_config_are_refused(tmp_path):
    checkpoint_path = write_tiny_checkpoint(tmp_path / "tiny.pt")
    data = read_checkpoint(checkpoint_path)
    data["config"]["model"]["num_channels"] = 16
    data["config"]["model"]["num_groups"] = 8
    from guided_diffusion.checkpoints import save_checkpoint

    bad = save_checkpoint(tmp_path / "mislabelled.pt", {k: v for k, v in data.items() if k != "format"})
    with pytest.raises(CheckpointError, match=r"mislabelled.pt: weights do not fit the model"):
        load_model(bad)


def test_partial_checkpoint_files_are_never_taken_for_models(tmp_path):
    """A killed save leaves ``.<name>.<random>.tmp``; model discovery only takes the final names."""
    from guided_diffusion.commands import sample_auto

    (tmp_path / "t2f").mkdir()
    (tmp_path / "t2f" / ".best.pt.abc123.tmp").write_bytes(b"partial")
    (tmp_path / ".t1c.pt.xyz.tmp").write_bytes(b"partial")
    args = sample_auto.parse_args(["--data_dir", str(tmp_path), "--model_dir", str(tmp_path)])
    assert sample_auto.model_sources(args) == {}
