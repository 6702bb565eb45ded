"""Issue 14, point 1: runs never mix silently. A run records which data it was trained on
(``data_fingerprint``: sorted case ids and a cheap content digest); ``train --resume auto`` (what
run.sh passes) refuses to continue a run on other data and says what differs and how to start
fresh; results record the checkpoint they came from (file hash, step, configuration)."""
from __future__ import annotations

import hashlib
import json
import shutil
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from fixtures_data import one_thread  # noqa: F401 (a fixture)
from fixtures_data import digest, run_main
from guided_diffusion.bratsloader import discover_cases, expected_path
from guided_diffusion.provenance import data_fingerprint, fingerprint_difference, hub_commit

EXIT_OK, EXIT_FATAL = 0, 2
pytestmark = pytest.mark.usefixtures("one_thread")


def cases_of(folder):
    cases, errors = discover_cases(folder, mode="train", geometry=None, check_data=False)
    assert not errors
    return cases


def change_one_voxel(path):
    image = nib.load(path)
    data = np.asarray(image.dataobj).copy()
    index = tuple(s // 2 for s in data.shape)
    data[index] = data[index] + 1
    nib.save(nib.Nifti1Image(data, image.affine, image.header), path)


@pytest.fixture(scope="module")
def datasets(tiny_demo_dir, tmp_path_factory):
    """Copies of the tiny training split: ``same`` (identical, elsewhere), ``edited`` (one voxel of
    one file changed), ``fewer`` (one case removed)."""
    root = tmp_path_factory.mktemp("datasets")
    source = tiny_demo_dir / "training"
    out = {}
    for name in ("same", "edited", "fewer"):
        out[name] = root / name / "training"
        shutil.copytree(source, out[name])
    first, last = sorted(p.name for p in source.iterdir() if p.is_dir())[0], \
        sorted(p.name for p in source.iterdir() if p.is_dir())[-1]
    change_one_voxel(expected_path(out["edited"] / first, "t1c"))
    shutil.rmtree(out["fewer"] / last)
    return SimpleNamespace(source=source, first=first, last=last, **out)


def test_fingerprint_follows_the_content_not_the_folder(datasets):
    original = data_fingerprint(cases_of(datasets.source))
    assert data_fingerprint(cases_of(datasets.same)) == original  # moved / copied: the same data
    edited = data_fingerprint(cases_of(datasets.edited))
    assert edited["case_ids"] == original["case_ids"] and edited["digest"] != original["digest"]
    assert fingerprint_difference(original, edited) == [f"the same {original['n_cases']} case ids with different "
                                                        "file contents"]
    fewer = data_fingerprint(cases_of(datasets.fewer))
    assert fewer["n_cases"] == original["n_cases"] - 1
    assert fingerprint_difference(original, fewer) == [f"1 cases gone ({datasets.last})"]
    assert fingerprint_difference(original, original) == []


def test_hub_commit_is_read_from_the_cache_path(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert hub_commit(tmp_path / "models--org--repo" / "snapshots" / commit / "sub" / "t1n.pt") == commit
    assert hub_commit(tmp_path / "t1n.pt") is None


def train(data_dir, run_dir, steps, *extra):
    return run_main("train", ["--preset", "tiny", "--data_dir", data_dir, "--run_dir", run_dir, "--target", "t2f",
                              "--val_cases", 0, "--max_steps", steps, "--cpu", "--resume", "auto", *extra])


def test_resume_auto_refuses_a_run_on_other_data_and_continues_on_the_same(datasets, tmp_path, caplog):
    run_dir = tmp_path / "runs"
    assert train(datasets.source, run_dir, 1) == EXIT_OK
    record = json.loads((run_dir / "t2f" / "run_config.json").read_text())
    assert record["data"]["train"]["case_ids"] == sorted(p.name for p in datasets.source.iterdir() if p.is_dir())
    before = digest(run_dir)
    for other, says in ((datasets.edited, "different file contents"), (datasets.fewer, f"cases gone ({datasets.last})")):
        caplog.clear()
        assert train(other, run_dir, 2) == EXIT_FATAL
        assert "trained on other data" in caplog.text and says in caplog.text
        assert "--run_dir" in caplog.text  # how to start fresh
        assert digest(run_dir) == before  # nothing of the old run touched
    assert train(datasets.same, run_dir, 2) == EXIT_OK  # the same data in another folder: resumed
    checkpoint_meta = json.loads((run_dir / "t2f" / "latest.json").read_text())
    assert checkpoint_meta["train"]["max_steps"] == 2
    assert json.loads((run_dir / "t2f" / "run_config.json").read_text())["data"] == record["data"]


def test_sample_records_the_checkpoint_it_used(datasets, tiny_demo_dir, tmp_path):
    run_dir = tmp_path / "runs"
    assert train(datasets.source, run_dir, 1) == EXIT_OK
    checkpoint = run_dir / "t2f" / "latest.pt"
    out = tmp_path / "out"
    assert run_main("sample", ["--checkpoint", checkpoint, "--data_dir", tiny_demo_dir / "pseudo_validation_gt",
                               "--target", "t2f", "--out_dir", out, "--nfe", 1, "--max_cases", 1]) == EXIT_OK
    model = json.loads((out / "metrics.json").read_text())["model"]
    assert model["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert model["step"] == 1 and model["format"] == "fast-cwdm" and model["sample_config"]["nfe"] == 1
    trained_on = data_fingerprint(cases_of(datasets.source))
    assert model["trained_on"]["train"] == {"n_cases": trained_on["n_cases"], "digest": trained_on["digest"]}


def test_train_init_from_accepts_a_hub_source(datasets, tmp_path, monkeypatch):
    """Issue 14, point 6: every model source works everywhere (train --init_from hf://...)."""
    import huggingface_hub.constants

    from fixtures_data import populate_hf_cache
    from guided_diffusion.checkpoints import read_checkpoint

    assert train(datasets.source, tmp_path / "a", 1) == EXIT_OK
    cache, source = tmp_path / "hf_cache", "hf://org/models/t2f/latest.pt@v1"
    populate_hf_cache(cache, "org/models", {"t2f/latest.pt": tmp_path / "a" / "t2f" / "latest.pt"}, "c0ffee" * 6 + "0123",
                      refs=("v1",))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert train(datasets.source, tmp_path / "b", 1, "--init_from", source) == EXIT_OK
    assert read_checkpoint(tmp_path / "b" / "t2f" / "latest.pt")["extra"]["init_from"] == {"path": source, "step": 1}


def test_sample_held_out_of_scores_only_the_cases_training_held_out(datasets, tmp_path, caplog):
    """Issue 14, point 2: run.sh's train-then-sample scores a model on the cases it did not train on."""
    run_dir = tmp_path / "runs"
    assert run_main("train", ["--preset", "tiny", "--data_dir", datasets.source, "--run_dir", run_dir, "--target",
                              "t2f", "--val_cases", 1, "--val_interval", 1, "--max_steps", 1, "--cpu"]) == EXIT_OK
    held_out = json.loads((run_dir / "t2f" / "run_config.json").read_text())["val_cases"]
    assert held_out == [datasets.last]  # the trainer holds out the last case
    out = tmp_path / "out"
    assert run_main("sample", ["--checkpoint", run_dir / "t2f" / "latest.pt", "--data_dir", datasets.source,
                               "--target", "t2f", "--out_dir", out, "--nfe", 1, "--held_out_of",
                               run_dir / "t2f"]) == EXIT_OK
    metrics = json.loads((out / "metrics.json").read_text())
    assert [c["case_id"] for c in metrics["cases"]] == held_out and "held out" in metrics["evaluated_on"]
    assert run_main("train", ["--preset", "tiny", "--data_dir", datasets.source, "--run_dir", tmp_path / "none",
                              "--target", "t2f", "--val_cases", 0, "--max_steps", 1, "--cpu"]) == EXIT_OK
    caplog.clear()
    assert run_main("sample", ["--checkpoint", tmp_path / "none" / "t2f" / "latest.pt", "--data_dir",
                               datasets.source, "--target", "t2f", "--out_dir", tmp_path / "out2", "--held_out_of",
                               tmp_path / "none" / "t2f" / "run_config.json"]) == EXIT_FATAL
    assert "held out no validation cases" in caplog.text
