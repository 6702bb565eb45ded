"""Downstream segmentation (issue 11 part 3): BraTS regions, Dice / HD95 against hand-computed
values, the segmenter's checkpoint and its checks, scoring a synthesis in place of the real target,
and the nnU-Net v2 export (layout, channel order, dataset.json, refusal of a non-empty folder)."""
from __future__ import annotations

import json
import math
import shutil
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from fixtures_data import one_thread  # noqa: F401 (a fixture)
from fixtures_data import TINY_GEOMETRY, digest, run_main

from guided_diffusion.bratsloader import Geometry, discover_cases, expected_path, load_case
from guided_diffusion.cli import EXIT_FATAL, EXIT_OK
from guided_diffusion.constants import MODALITIES
from guided_diffusion.extras import MissingExtraError
from guided_diffusion.nnunet_export import NNUNET_CHANNELS, export_nnunet
from guided_diffusion.segmentation import (SEG_METRIC_KEYS, SEGMENTER_PRESETS, Segmenter, SegmenterError,
                                           build_segmenter, label_regions, load_segmenter, region_scores,
                                           score_synthesis)

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- regions and scores


def test_regions_follow_the_brats_2023_labels():
    seg = np.array([0, 1, 2, 3]).reshape(1, 1, 4)  # background, necrotic core, oedema, enhancing
    wt, tc, et = label_regions(seg)
    assert wt.ravel().tolist() == [False, True, True, True]  # WT = {1, 2, 3}
    assert tc.ravel().tolist() == [False, True, False, True]  # TC = {1, 3}
    assert et.ravel().tolist() == [False, False, False, True]  # ET = {3}


def _cube(shape, start, side):
    mask = np.zeros(shape, bool)
    x, y, z = start
    mask[x : x + side, y : y + side, z : z + side] = True
    return mask


def test_perfect_segmentation_scores_dice_1_and_hd95_0():
    seg = np.zeros((12, 12, 12), np.uint8)
    seg[2:8, 2:8, 2:8] = 2
    seg[3:7, 3:7, 3:7] = 1
    seg[4:6, 4:6, 4:6] = 3
    regions = label_regions(seg)
    scores = region_scores(regions, regions)
    assert all(scores[f"dice_{r}"] == 1.0 and scores[f"hd95_{r}"] == 0.0 for r in ("wt", "tc", "et"))


def test_dice_of_a_hand_computed_overlap_and_hd95_of_a_shifted_cube():
    shape = (16, 6, 6)
    truth = np.stack([_cube(shape, (0, 2, 2), 2)] * 3)
    # WT: two 2x2x2 cubes sharing 4 of their 8 voxels -> Dice = 2 * 4 / (8 + 8) = 0.5.
    half = _cube(shape, (1, 2, 2), 2)
    # TC: the cube shifted by 10 voxels along x (x in {10, 11} vs truth {0, 1}). Every voxel of a
    # 2-voxel cube is on its surface; the nearest other voxel lies 9 (x = 10 and x = 1) or 10 (x = 11,
    # x = 0) voxels away, in equal numbers both ways: the 95th percentile of {9 x 4, 10 x 4} is 10
    # voxels, times the 2 mm voxel size along x = 20 mm. Dice 0 (no overlap).
    shifted = _cube(shape, (10, 2, 2), 2)
    pred = np.stack([half, shifted, truth[2]])
    scores = region_scores(pred, truth, spacing=(2.0, 1.0, 1.0))
    assert scores["dice_wt"] == pytest.approx(0.5)
    assert scores["dice_tc"] == 0.0 and scores["hd95_tc"] == pytest.approx(20.0)
    assert scores["hd95_wt"] == pytest.approx(2.0)  # one x layer off: 1 voxel of 2 mm
    assert scores["dice_et"] == 1.0 and scores["hd95_et"] == 0.0


def test_empty_regions_follow_the_brats_convention():
    shape = (8, 8, 8)
    empty, cube = np.zeros(shape, bool), _cube(shape, (2, 2, 2), 3)
    pred = np.stack([empty, cube, empty])  # WT: both empty; TC: truth empty; ET: prediction empty
    truth = np.stack([empty, empty, cube])
    scores = region_scores(pred, truth)
    assert scores["dice_wt"] == 1.0 and scores["hd95_wt"] == 0.0
    assert scores["dice_tc"] == 0.0 and math.isnan(scores["hd95_tc"])
    assert scores["dice_et"] == 0.0 and math.isnan(scores["hd95_et"])


# --------------------------------------------------------------------------- training and the checkpoint


@pytest.fixture(scope="module")
def trained(tiny_demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("segmenter") / "segmenter.pt"
    assert run_main("train_segmenter", ["--data_dir", tiny_demo_dir / "training", "--out", out, "--preset", "tiny",
                                        "--device", "cpu"]) == EXIT_OK
    return out


def test_train_segmenter_writes_a_weights_only_checkpoint_and_its_config(trained, tiny_demo_dir):
    checkpoint = torch.load(trained, map_location="cpu", weights_only=True)
    config = json.loads(trained.with_suffix(".json").read_text())
    assert checkpoint["format"] == "fast-cwdm-segmenter/1" and checkpoint["model"]
    assert config["channels"] == ["t1n", "t1c", "t2w", "t2f"]
    assert config["regions"] == {"wt": [1, 2, 3], "tc": [1, 3], "et": [3]} and config["label_set"] == [0, 1, 2, 3]
    assert config["original_shape"] == list(TINY_GEOMETRY.original_shape)
    assert len(config["losses"]) == 2 and config["data"]["n_cases"] == 3
    assert checkpoint["config"]["channels"] == config["channels"]
    load_segmenter(trained, geometry=TINY_GEOMETRY)  # loads back and fits the grid


def test_train_segmenter_never_replaces_a_checkpoint(trained, tiny_demo_dir):
    before = trained.read_bytes()
    assert run_main("train_segmenter", ["--data_dir", tiny_demo_dir / "training", "--out", trained,
                                        "--preset", "tiny"]) == EXIT_FATAL
    assert trained.read_bytes() == before


def test_reading_cases_per_step_trains_exactly_like_holding_them_in_memory(tiny_demo_dir, monkeypatch):
    from guided_diffusion import segmentation

    cases, _ = discover_cases(tiny_demo_dir / "training", geometry=TINY_GEOMETRY)
    cfg = SEGMENTER_PRESETS["tiny"]
    _, in_memory = segmentation.train_segmenter(cases, TINY_GEOMETRY, cfg, torch.device("cpu"))
    monkeypatch.setattr(segmentation, "PRELOAD_LIMIT_BYTES", 0)
    reads = []
    monkeypatch.setattr(segmentation, "load_case", lambda case, geometry: reads.append(case) or load_case(case, geometry))
    _, per_step = segmentation.train_segmenter(cases, TINY_GEOMETRY, cfg, torch.device("cpu"))
    assert per_step == in_memory and len(reads) == cfg.max_steps * cfg.batch_size


def _rewrite_config(src, dst, **changes):
    checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    checkpoint["config"] = {**checkpoint["config"], **changes}
    torch.save(checkpoint, dst)
    return dst


@pytest.mark.parametrize("changes, words", [
    ({"regions": {"wt": [1, 2, 4], "tc": [1, 4], "et": [4]}}, "regions"),  # BraTS 2021 labels
    ({"label_set": [0, 1, 2, 4]}, "labels"),
    ({"channels": ["t1c", "t1n", "t2w", "t2f"]}, "channels"),
    ({"format": None}, None),
])
def test_a_segmenter_of_other_labels_or_channels_is_refused(trained, tmp_path, changes, words):
    if words is None:  # a checkpoint that is not a segmenter at all
        checkpoint = torch.load(trained, map_location="cpu", weights_only=True)
        checkpoint["format"] = "fast-cwdm/1"
        torch.save(checkpoint, tmp_path / "other.pt")
        with pytest.raises(SegmenterError, match="not a segmenter checkpoint"):
            load_segmenter(tmp_path / "other.pt")
        return
    path = _rewrite_config(trained, tmp_path / "bad.pt", **changes)
    with pytest.raises(SegmenterError, match=words) as err:
        load_segmenter(path)
    assert str(path) in str(err.value)


def test_missing_segmenter_and_wrong_grid_are_refused(trained, tmp_path):
    with pytest.raises(SegmenterError, match="not found"):
        load_segmenter(tmp_path / "absent.pt")
    with pytest.raises(SegmenterError, match=r"trained on cases of shape \(18, 18, 12\)"):
        load_segmenter(trained, geometry=Geometry.scaled(0.25))


# --------------------------------------------------------------------------- scoring a synthesis


class ThresholdTarget(torch.nn.Module):
    """A stand-in segmenter whose three regions are all 'channel ``index`` > 0.5', so the prediction
    from any input is known without a trained network."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, x):  # (B, 4, X, Y, Z) -> (B, 3, X, Y, Z) logits
        return ((x[:, self.index : self.index + 1] - 0.5) * 1000).repeat(1, 3, 1, 1, 1)


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()) if a.sum() + b.sum() else 1.0


@pytest.fixture
def one_case(tiny_demo_dir):
    cases, _ = discover_cases(tiny_demo_dir / "pseudo_validation_gt", geometry=TINY_GEOMETRY)
    return load_case(cases[0], TINY_GEOMETRY)


def test_scores_with_the_synthesis_and_with_the_real_target(one_case, tiny_demo_dir, tmp_path):
    target, index = "t2f", MODALITIES.index("t2f")
    segmenter = Segmenter(ThresholdTarget(index), {}, tmp_path / "stand-in.pt", torch.device("cpu"))
    case_id = one_case.case.case_id
    synth = expected_path(tmp_path / case_id, target)
    synth.parent.mkdir()
    shutil.copyfile(one_case.case.files["t1n"], synth)  # a 'synthesis' that is really the case's t1n
    scores = score_synthesis(segmenter, one_case, target, synth, TINY_GEOMETRY)
    assert set(scores) == set(SEG_METRIC_KEYS)
    truth = label_regions(one_case.seg)
    from_real = one_case.volumes[index] > 0.5
    from_synth = one_case.volumes[MODALITIES.index("t1n")] > 0.5
    for i, region in enumerate(("wt", "tc", "et")):
        assert scores[f"dice_{region}_real"] == pytest.approx(_dice(from_real, truth[i]))
        assert scores[f"dice_{region}"] == pytest.approx(_dice(from_synth, truth[i]))
    assert scores["dice_wt"] != pytest.approx(scores["dice_wt_real"])  # the swap did change the input

    shutil.copyfile(one_case.case.files[target], synth)  # the real target as its own 'synthesis'
    same = score_synthesis(segmenter, one_case, target, synth, TINY_GEOMETRY)
    for key in ("dice_wt", "dice_tc", "dice_et", "hd95_wt"):
        assert same[key] == pytest.approx(same[key + "_real"], nan_ok=True)


def test_a_missing_or_off_grid_synthesis_is_a_case_error(one_case, tmp_path):
    segmenter = Segmenter(ThresholdTarget(3), {}, tmp_path / "stand-in.pt", torch.device("cpu"))
    synth = expected_path(tmp_path / one_case.case.case_id, "t2f")
    with pytest.raises(ValueError, match="synthesis of t2f not found"):
        score_synthesis(segmenter, one_case, "t2f", synth, TINY_GEOMETRY)
    synth.parent.mkdir()
    nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.float32), np.eye(4)), synth)
    with pytest.raises(ValueError, match=str(synth.name)):
        score_synthesis(segmenter, one_case, "t2f", synth, TINY_GEOMETRY)


def test_without_monai_the_message_names_the_seg_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "monai", None)  # import monai now fails as if it were not installed
    with pytest.raises(MissingExtraError, match=r"fast-cwdm\[seg\]"):
        build_segmenter(SEGMENTER_PRESETS["tiny"])


@pytest.fixture(scope="module")
def diffusion_model(tiny_demo_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("diffusion")
    assert run_main("train", ["--preset", "tiny", "--data_dir", tiny_demo_dir / "training", "--run_dir", run_dir,
                              "--target", "t2f", "--max_steps", 2, "--cpu"]) == EXIT_OK
    return run_dir / "t2f" / "latest.pt"


def test_sample_with_a_segmenter_adds_dice_and_hd95_to_the_metrics(diffusion_model, trained, tiny_demo_dir,
                                                                   tmp_path):
    out_dir = tmp_path / "sampled"
    argv = ["--checkpoint", diffusion_model, "--data_dir", tiny_demo_dir / "pseudo_validation_gt", "--target",
            "t2f", "--out_dir", out_dir, "--nfe", 2, "--device", "cpu"]
    assert run_main("sample", [*argv, "--segmenter", trained]) == EXIT_OK
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert set(SEG_METRIC_KEYS) <= set(metrics["summary"]) and metrics["segmenter"] == str(trained)
    for record in metrics["cases"]:
        assert set(SEG_METRIC_KEYS) <= set(record)
        assert all(0.0 <= record[k] <= 1.0 for k in SEG_METRIC_KEYS if k.startswith("dice"))
    header = (out_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert set(SEG_METRIC_KEYS) <= set(header)


def test_sample_refuses_a_wrong_segmenter_before_any_work(diffusion_model, trained, tiny_demo_dir, tmp_path):
    bad = _rewrite_config(trained, tmp_path / "brats2021.pt", regions={"wt": [1, 2, 4], "tc": [1, 4], "et": [4]})
    out_dir = tmp_path / "sampled"
    argv = ["--checkpoint", diffusion_model, "--data_dir", tiny_demo_dir / "pseudo_validation_gt", "--target",
            "t2f", "--out_dir", out_dir, "--nfe", 2, "--device", "cpu"]
    assert run_main("sample", [*argv, "--segmenter", bad]) == EXIT_FATAL
    assert run_main("sample", [*argv, "--segmenter", tmp_path / "absent.pt"]) == EXIT_FATAL
    assert not out_dir.exists()


# --------------------------------------------------------------------------- nnU-Net export


def test_export_nnunet_layout_channel_order_and_dataset_json(tiny_demo_dir, tmp_path):
    # nnU-Net's BraTS conversion (Dataset137_BraTS21.py): t1 -> 0000, t1ce -> 0001, t2 -> 0002, flair -> 0003.
    assert NNUNET_CHANNELS == {"t1n": 0, "t1c": 1, "t2w": 2, "t2f": 3}
    data_dir, synth_dir = tiny_demo_dir / "pseudo_validation", tmp_path / "completed"
    gt_dir = tiny_demo_dir / "pseudo_validation_gt"
    missing = json.loads((data_dir / "missing_modalities.json").read_text())
    for case_id, modality in missing.items():  # the 'syntheses': the ground truth of the dropped modality
        (synth_dir / case_id).mkdir(parents=True)
        shutil.copyfile(expected_path(gt_dir / case_id, modality), expected_path(synth_dir / case_id, modality))
    before = digest(data_dir)
    assert run_main("export_nnunet", ["--data_dir", data_dir, "--synth_dir", synth_dir,
                                      "--out", tmp_path / "nnunet"]) == EXIT_OK
    assert digest(data_dir) == before
    images = tmp_path / "nnunet" / "imagesTs"
    assert sorted(p.name for p in images.iterdir()) == sorted(
        f"{case_id}_{k:04d}.nii.gz" for case_id in missing for k in range(4))
    for case_id in missing:
        for k, modality in enumerate(("t1n", "t1c", "t2w", "t2f")):
            exported = nib.load(images / f"{case_id}_{k:04d}.nii.gz")
            source = nib.load(expected_path(gt_dir / case_id, modality))
            assert np.array_equal(exported.get_fdata(), source.get_fdata()), (case_id, k, modality)
            assert np.array_equal(exported.affine, source.affine)
    dataset = json.loads((tmp_path / "nnunet" / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"}
    assert dataset["numTest"] == len(missing) and dataset["file_ending"] == ".nii.gz"
    assert sorted(dataset["labels"].values()) == [0, 1, 2, 3]


def test_export_nnunet_refuses_a_non_empty_output_folder(tiny_demo_dir, tmp_path):
    out = tmp_path / "nnunet"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_nnunet(tiny_demo_dir / "pseudo_validation_gt", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    exported, errors = export_nnunet(tiny_demo_dir / "pseudo_validation_gt", tmp_path / "empty_ok")
    assert len(exported) == 2 and not errors


def test_score_segmentation_scores_a_folder_like_sample_does(diffusion_model, trained, tiny_demo_dir, tmp_path):
    data_dir, out_dir = tiny_demo_dir / "pseudo_validation_gt", tmp_path / "sampled"
    assert run_main("sample", ["--checkpoint", diffusion_model, "--data_dir", data_dir, "--target", "t2f",
                               "--out_dir", out_dir, "--nfe", 2, "--device", "cpu", "--segmenter", trained]) == EXIT_OK
    from_sample = {r["case_id"]: r for r in json.loads((out_dir / "metrics.json").read_text())["cases"]}
    first = sorted(from_sample)[0]
    shutil.rmtree(out_dir / first)  # one synthesis missing: that case fails, the others are scored
    argv = ["--segmenter", trained, "--data_dir", data_dir, "--synth_dir", out_dir, "--target", "t2f",
            "--device", "cpu"]
    assert run_main("score_segmentation", argv) == 1
    scored = json.loads((out_dir / "segmentation_metrics.json").read_text())
    assert [r["case_id"] for r in scored["cases"]] == sorted(from_sample)[1:]
    for record in scored["cases"]:
        for key in SEG_METRIC_KEYS:
            assert record[key] == from_sample[record["case_id"]][key]  # the same function on the same files
    assert run_main("score_segmentation", argv) == EXIT_FATAL  # the results file is never replaced silently


def test_export_nnunet_skips_and_reports_a_case_without_all_four_modalities(tiny_demo_dir, tmp_path):
    data_dir = tiny_demo_dir / "pseudo_validation"  # each case lacks one modality; no syntheses given
    missing = json.loads((data_dir / "missing_modalities.json").read_text())
    with pytest.raises(ValueError, match="no case with all four modalities"):
        export_nnunet(data_dir, tmp_path / "none")
    assert not (tmp_path / "none").exists()
    first, second = sorted(missing)
    synth_dir = tmp_path / "completed"  # a synthesis for the first case only
    (synth_dir / first).mkdir(parents=True)
    shutil.copyfile(expected_path(tiny_demo_dir / "pseudo_validation_gt" / first, missing[first]),
                    expected_path(synth_dir / first, missing[first]))
    exported, errors = export_nnunet(data_dir, tmp_path / "nnunet", synth_dir)
    assert exported == [first] and len(errors) == 1 and second in str(errors[0]) and missing[second] in str(errors[0])


# --------------------------------------------------------------------------- run.sh demo


@pytest.mark.parametrize("setting, has_checkpoint, trains, scores", [
    (None, False, False, False),  # default: the demo is unchanged (a one-line hint)
    ("1", False, True, True),     # opt-in: train once, then score
    (None, True, False, True),    # a segmenter from an earlier opt-in run is used
    ("1", True, False, True),     # ... and not trained again
    ("0", True, False, False),    # never
])
def test_run_sh_demo_segmenter_is_opt_in(tmp_path, setting, has_checkpoint, trains, scores):
    import os
    import subprocess

    from test_run_sh import RUN_SH_VARIABLES, SEP, copy_run_sh, make_stub

    run_sh, log = copy_run_sh(tmp_path / "repo"), tmp_path / "calls.log"
    if has_checkpoint:
        (tmp_path / "repo" / "runs" / "demo" / "segmenter").mkdir(parents=True)
        (tmp_path / "repo" / "runs" / "demo" / "segmenter" / "segmenter.pt").write_bytes(b"")
    env = {k: v for k, v in os.environ.items() if k not in (*RUN_SH_VARIABLES, "DEMO_SEGMENTER")}
    env.update(PYTHON=str(make_stub(tmp_path / "python")), STUB_LOG=str(log),
               **({"DEMO_SEGMENTER": setting} if setting is not None else {}))
    result = subprocess.run(["bash", str(run_sh)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    calls = [line.split(SEP) for line in log.read_text().splitlines()]
    assert any(c[0] == "scripts/train_segmenter.py" for c in calls) == trains
    sample = next(c for c in calls if c[0] == "scripts/sample.py")
    assert ("--segmenter" in sample) == scores
    if scores:
        assert sample[sample.index("--segmenter") + 1] == "runs/demo/segmenter/segmenter.pt"
