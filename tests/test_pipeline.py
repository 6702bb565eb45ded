"""End to end: train.py (checkpoint, exact resume), sample.py, sample_auto.py and drop_modality.py
on a tiny demo dataset with the ``tiny`` preset (CPU, seconds). The scripts' ``main`` runs in
this process with an argv, through the same error handling as on the command line."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from fixtures_data import one_thread  # noqa: F401 (a fixture)
from fixtures_data import TINY_GEOMETRY, assert_same_tree, digest, run_main
from guided_diffusion.bratsloader import expected_path
from guided_diffusion.conditioning import MODALITIES
from guided_diffusion.metrics import METRIC_KEYS
from guided_diffusion.presets import get_preset

EXIT_OK, EXIT_SOME_FAILED, EXIT_FATAL = 0, 1, 2
HEADER_KEYS_CHANGED_ON_WRITE = {"datatype", "bitpix", "scl_slope", "scl_inter", "vox_offset"}
# what describes the values, reset for a [0, 1] synthesis (issue 12): display range, intent, description
HEADER_KEYS_OF_A_SYNTHESIS = {"cal_min": 0.0, "cal_max": 1.0, "intent_code": 0, "intent_p1": 0.0, "intent_p2": 0.0,
                              "intent_p3": 0.0, "intent_name": b"", "aux_file": b""}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tiny_demo_dir, tmp_path_factory):
    """Run A: 2 steps, then ``--resume auto`` to step 4 (t2f). Run B: 4 uninterrupted steps for
    every modality (``--target all``); its t2f model must equal run A's."""
    root = tmp_path_factory.mktemp("runs")
    common = ["--preset", "tiny", "--data_dir", tiny_demo_dir / "training", "--val_cases", 1, "--val_interval", 2,
              "--cpu"]
    assert run_main("train", [*common, "--run_dir", root / "a", "--target", "t2f", "--max_steps", 2]) == EXIT_OK
    shutil.copytree(root / "a" / "t2f", root / "a_step2")
    assert run_main("train", [*common, "--run_dir", root / "a", "--target", "t2f", "--max_steps", 4,
                              "--resume", "auto"]) == EXIT_OK
    assert run_main("train", [*common, "--run_dir", root / "b", "--target", "all", "--max_steps", 4]) == EXIT_OK
    return SimpleNamespace(step2=root / "a_step2", resumed=root / "a" / "t2f", all=root / "b")


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_training_writes_a_weights_only_checkpoint_with_its_config(runs):
    ckpt = _load(runs.step2 / "latest.pt")  # weights_only: no pickled code anywhere
    assert ckpt["format"] == "fast-cwdm/1" and ckpt["step"] == 2
    assert {"model", "ema", "optimizer", "config", "schedule", "extra"} <= ckpt.keys()
    config = json.loads((runs.step2 / "latest.json").read_text())
    assert config == json.loads(json.dumps(ckpt["config"]))
    preset = get_preset("tiny")
    assert config["model"] == preset.model.to_dict() and config["diffusion"] == preset.diffusion.to_dict()
    assert config["train"]["target_modality"] == "t2f" and config["train"]["max_steps"] == 2
    assert (runs.step2 / "best.pt").is_file() and (runs.step2 / "best.json").is_file()
    run_config = json.loads((runs.step2 / "run_config.json").read_text())
    assert run_config["geometry"]["network_shape"] == list(TINY_GEOMETRY.network_shape)
    assert len(run_config["train_cases"]) == 2 and len(run_config["val_cases"]) == 1


def test_resume_continues_exactly_like_an_uninterrupted_run(runs):
    resumed, straight = _load(runs.resumed / "latest.pt"), _load(runs.all / "t2f" / "latest.pt")
    assert resumed["step"] == straight["step"] == 4
    for key in ("model", "ema", "optimizer", "schedule"):
        assert_same_tree(resumed[key], straight[key], key)
    step2 = _load(runs.step2 / "latest.pt")
    assert not all(torch.equal(v, step2["model"][k]) for k, v in resumed["model"].items())  # it did train on
    assert resumed["config"]["train"]["max_steps"] == 4


def test_target_all_trains_one_model_per_modality(runs):
    for modality in MODALITIES:
        ckpt = _load(runs.all / modality / "best.pt")
        assert ckpt["config"]["train"]["target_modality"] == modality


def _assert_on_input_grid(out_path: Path, reference_path: Path) -> np.ndarray:
    """Same shape, affine and header as the reference file (except the stored data type)."""
    out, ref = nib.load(out_path), nib.load(reference_path)
    assert out.shape == ref.shape == TINY_GEOMETRY.original_shape
    assert np.array_equal(out.affine, ref.affine)
    for key in out.header.keys():
        if key in HEADER_KEYS_OF_A_SYNTHESIS:
            assert out.header[key] == HEADER_KEYS_OF_A_SYNTHESIS[key], key
        elif key == "descrip":
            assert out.header[key].tobytes().startswith(b"SYNTHETIC "), out.header[key]
        elif key not in HEADER_KEYS_CHANGED_ON_WRITE:
            assert np.array_equal(out.header[key], ref.header[key]), key
    assert out.get_data_dtype() == np.float32
    data = out.get_fdata()
    assert np.isfinite(data).all() and data.min() >= 0.0 and data.max() <= 1.0
    crop = TINY_GEOMETRY.crop
    assert not data[:crop].any() and not data[:, :crop].any()  # the cropped border is restored as zeros
    return data


def test_sample_writes_volumes_metrics_figure_and_config(runs, tiny_demo_dir, tmp_path):
    data_dir, out_dir = tiny_demo_dir / "pseudo_validation_gt", tmp_path / "sampled"
    argv = ["--checkpoint", runs.all / "t2f" / "best.pt", "--data_dir", data_dir, "--target", "t2f",
            "--out_dir", out_dir, "--nfe", 2, "--device", "cpu"]
    before = digest(data_dir)
    assert run_main("sample", argv) == EXIT_OK
    case_ids = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
    for case_id in case_ids:
        _assert_on_input_grid(expected_path(out_dir / case_id, "t2f"), expected_path(data_dir / case_id, "t2f"))

    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert set(metrics["summary"]) == set(METRIC_KEYS)
    assert [r["case_id"] for r in metrics["cases"]] == case_ids
    for record in metrics["cases"]:
        assert set(METRIC_KEYS) <= record.keys() and record["seconds"] > 0
    with open(out_dir / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["case_id"] for r in rows] == case_ids and list(rows[0]) == ["case_id", *METRIC_KEYS, "seconds"]
    assert (out_dir / "slice.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out_dir / "sample_config.json").read_text())
    assert config["nfe"] == len(config["timesteps"]) == 2 and config["target_modality"] == "t2f"
    assert config["model_config"] == get_preset("tiny").model.to_dict()
    assert config["sample_config"]["sampler"] == get_preset("tiny").sample.sampler

    # a second run into the same folder is refused without --overwrite; nothing is replaced
    outputs = digest(out_dir)
    assert run_main("sample", argv) == EXIT_FATAL
    assert digest(out_dir) == outputs and digest(data_dir) == before


def test_sample_refuses_a_model_trained_for_another_modality(runs, tiny_demo_dir, tmp_path, caplog):
    argv = ["--checkpoint", runs.all / "t1n" / "best.pt", "--data_dir", tiny_demo_dir / "pseudo_validation_gt",
            "--target", "t2f", "--out_dir", tmp_path / "out", "--nfe", 2]
    assert run_main("sample", argv) == EXIT_FATAL
    assert "t1n" in caplog.text and "t2f" in caplog.text
    assert not any((tmp_path / "out").rglob("*.nii.gz"))


def _missing(folder: Path) -> dict[str, str]:
    return json.loads((folder / "missing_modalities.json").read_text())


def test_sample_auto_completes_each_case_into_a_new_folder(runs, tiny_demo_dir, tmp_path):
    data_dir = tmp_path / "pseudo_validation"
    shutil.copytree(tiny_demo_dir / "pseudo_validation", data_dir)
    missing = _missing(data_dir)
    assert len(set(missing.values())) == 2  # the fixture's seed: two different models are needed
    before = digest(data_dir)
    argv = ["--data_dir", data_dir, "--model_dir", runs.all, "--nfe", 2]
    assert run_main("sample_auto", argv) == EXIT_OK
    out_dir = tmp_path / "pseudo_validation_completed"
    assert sorted(digest(out_dir)) == sorted(
        [str(expected_path(Path(c), m)) for c, m in missing.items()] + ["completion_report.json"])
    for case_id, modality in missing.items():
        gt = expected_path(tiny_demo_dir / "pseudo_validation_gt" / case_id, modality)
        _assert_on_input_grid(expected_path(out_dir / case_id, modality), gt)
    report = json.loads((out_dir / "completion_report.json").read_text())
    assert {r["case_id"]: r["missing"] for r in report["completed"]} == missing
    assert digest(data_dir) == before

    outputs = digest(out_dir)  # a second run refuses to replace anything
    assert run_main("sample_auto", argv) == EXIT_SOME_FAILED
    assert digest(out_dir) == outputs and digest(data_dir) == before


def test_sample_auto_default_output_is_a_sibling_folder_also_for_dot(runs, tiny_demo_dir, tmp_path, monkeypatch):
    data_dir = tmp_path / "cases"
    shutil.copytree(tiny_demo_dir / "pseudo_validation", data_dir)
    monkeypatch.chdir(data_dir)
    assert run_main("sample_auto", ["--data_dir", ".", "--model_dir", runs.all, "--nfe", 1]) == EXIT_OK
    assert len(list((tmp_path / "cases_completed").rglob("*.nii.gz"))) == 2
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_sample_auto_in_place_only_adds_files(runs, tiny_demo_dir, tmp_path):
    data_dir = tmp_path / "pseudo_validation"
    shutil.copytree(tiny_demo_dir / "pseudo_validation", data_dir)
    missing = _missing(data_dir)
    (first_case, first_modality), (second_case, second_modality) = sorted(missing.items())
    original = digest(data_dir)

    # only one case's model: that case is completed, the other one reported (exit code 1)
    argv = ["--data_dir", data_dir, "--in_place", "--nfe", 2]
    assert run_main("sample_auto", [*argv, "--checkpoint", f"{first_modality}={runs.all / first_modality / 'best.pt'}"]) \
        == EXIT_SOME_FAILED
    after_first = digest(data_dir)
    assert {k: v for k, v in after_first.items() if k in original} == original
    added = set(after_first) - set(original)
    assert added == {str(expected_path(Path(first_case), first_modality)), "completion_report.json"}

    # all models: the remaining case is completed; nothing written before is replaced
    assert run_main("sample_auto", [*argv, "--model_dir", runs.all]) == EXIT_SOME_FAILED  # first case: complete
    after_second = digest(data_dir)
    assert {k: v for k, v in after_second.items() if k in after_first} == after_first
    added = set(after_second) - set(after_first)
    assert str(expected_path(Path(second_case), second_modality)) in added and len(added) == 2  # + a new report
    _assert_on_input_grid(expected_path(data_dir / second_case, second_modality),
                          expected_path(tiny_demo_dir / "pseudo_validation_gt" / second_case, second_modality))

    # nothing is missing any more: a clear fatal error, no file touched
    assert run_main("sample_auto", [*argv, "--model_dir", runs.all]) == EXIT_FATAL
    assert digest(data_dir) == after_second


def test_drop_modality_script_copies_cases_without_one_modality(tiny_demo_dir, tmp_path):
    src, dst = tiny_demo_dir / "training", tmp_path / "pseudo"
    before = digest(src)
    assert run_main("drop_modality", ["--input", src, "--output", dst, "--seed", 5]) == EXIT_OK
    missing = _missing(dst)
    assert sorted(missing) == sorted(p.name for p in src.iterdir() if p.is_dir())
    copied = digest(dst)
    for case_id, modality in missing.items():
        names = {expected_path(Path(case_id), m).as_posix() for m in MODALITIES if m != modality}
        assert {k for k in copied if k.startswith(case_id + "/")} == names  # no seg, no dropped modality
        assert all(copied[n] == before[n] for n in names)  # byte-for-byte copies
    assert digest(src) == before
    assert run_main("drop_modality", ["--input", src, "--output", dst]) == EXIT_FATAL  # not empty: refused
    assert digest(dst) == copied
