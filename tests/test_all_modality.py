"""One model for all four modalities (issue 11, part 2; docs/all_modality.md): the four-slot
conditioning with the target's slot a placeholder, per-element labels from the seed, checkpoints
that say they are all-modality, sample / sample_auto with such a model, and the mismatch errors."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from fixtures_data import one_thread  # noqa: F401 (a fixture)
from fixtures_data import run_main
from test_run_sh import run_sh  # noqa: F401 (a fixture)
from guided_diffusion.checkpoints import CheckpointError, load_model, read_checkpoint, save_checkpoint
from guided_diffusion.cli import EXIT_FATAL, EXIT_OK
from guided_diffusion.commands import train
from guided_diffusion.conditioning import model_inputs, split_case_all
from guided_diffusion.config import ConfigError, TrainConfig
from guided_diffusion.constants import MODALITIES
from guided_diffusion.presets import ALL_MODALITY, PRESETS, get_preset
from guided_diffusion.train_util import Trainer
from DWT_IDWT import to_subbands

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_all_preset():
    tiny = get_preset("tiny")
    return replace(tiny, model=replace(tiny.model, **ALL_MODALITY))


class Cases(torch.utils.data.Dataset):
    """``n`` cases of (4, 8, 8, 8) volumes: channel k of case i is a random field + 10 k (so the
    modalities are told apart by their values)."""

    def __init__(self, n: int = 4, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.volumes = torch.rand(n, 4, 8, 8, 8, generator=gen) + 10 * torch.arange(4.0).view(1, 4, 1, 1, 1)

    def __len__(self):
        return len(self.volumes)

    def __getitem__(self, i):
        return {"volumes": self.volumes[i], "case_id": f"c{i}"}


def make_trainer(tmp_path, target="all", seed=0, batch_size=4, preset=None):
    preset = preset or tiny_all_preset()
    cfg = replace(preset.train, run_dir=str(tmp_path / target), target_modality=target, seed=seed,
                  batch_size=batch_size, max_steps=3)
    return Trainer(preset.model, preset.diffusion, cfg, Cases())


# ---------------------------------------------------------------- conditioning

def test_the_target_slot_holds_the_placeholder_and_never_the_target():
    volumes = torch.randn(5, 4, 4, 4, 4)
    labels = torch.tensor([0, 3, 1, 2, 3])
    target, cond = split_case_all(volumes, labels)
    for b in range(5):  # the expected stack built slot by slot, independently
        assert torch.equal(target[b, 0], volumes[b, int(labels[b])])
        for k in range(4):
            expected = torch.zeros(4, 4, 4) if k == labels[b] else volumes[b, k]
            assert torch.equal(cond[b, k], expected), (b, k)
    # a NaN-poisoned target never reaches the conditioning: its 8 subbands are exact zeros
    poisoned = volumes.clone()
    poisoned[torch.arange(5), labels] = float("nan")
    _, cond, label = model_inputs(poisoned, labels, True)
    bands = to_subbands(cond)
    assert torch.isfinite(bands).all() and torch.equal(label, labels)
    for b in range(5):
        k = int(labels[b])
        assert torch.equal(bands[b, 8 * k: 8 * k + 8], torch.zeros(8, 2, 2, 2))


def test_single_modality_conditioning_is_unchanged():
    volumes = torch.randn(2, 4, 4, 4, 4)
    for target, rest in (("t1n", [1, 2, 3]), ("t1c", [0, 2, 3]), ("t2w", [0, 1, 3]), ("t2f", [0, 1, 2])):
        x0, cond, label = model_inputs(volumes, target, False)
        assert label is None
        assert torch.equal(cond, torch.stack([volumes[:, k] for k in rest], dim=1))
        assert torch.equal(x0[:, 0], volumes[:, MODALITIES.index(target)])


def test_a_trainer_builds_the_same_stack_and_leaks_no_nan_target(tmp_path):
    trainer = make_trainer(tmp_path)
    volumes = Cases().volumes
    labels = torch.tensor([2, 0, 3, 1])
    poisoned = volumes.clone()
    poisoned[torch.arange(4), labels] = float("nan")
    x0, cond = trainer._batch_to_subbands({"volumes": poisoned}, labels)
    assert torch.isfinite(cond).all() and cond.shape == (4, 32, 4, 4, 4)
    clean = volumes.clone()
    clean[torch.arange(4), labels] = 0.0
    assert torch.equal(cond, to_subbands(clean))


# ---------------------------------------------------------------- training

def labels_of_steps(trainer, steps=3):
    """The labels the network was called with in ``steps`` training steps (a forward pre-hook)."""
    seen = []
    trainer.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["label"].tolist()),
                                            with_kwargs=True)
    batch = {"volumes": Cases().volumes}
    for _ in range(steps):
        trainer.train_step(batch)
    return seen


def test_labels_differ_per_batch_element_and_follow_the_seed(tmp_path):
    a = labels_of_steps(make_trainer(tmp_path / "a", batch_size=4))
    b = labels_of_steps(make_trainer(tmp_path / "b", batch_size=4))
    c = labels_of_steps(make_trainer(tmp_path / "c", batch_size=4, seed=7))
    assert len(a) == 3 and all(len(step) == 4 for step in a)
    assert a == b  # the same seed: the same targets
    assert a != c  # another seed: other targets
    assert any(len(set(step)) > 1 for step in a)  # a batch mixes targets
    assert all(0 <= k < 4 for step in a + c for k in step)


def test_target_and_model_kind_must_agree(tmp_path):
    tiny = get_preset("tiny")
    with pytest.raises(ConfigError, match="all-modality"):
        make_trainer(tmp_path, target="all", preset=tiny)
    with pytest.raises(ConfigError, match="single-modality"):
        make_trainer(tmp_path, target="t1c")
    with pytest.raises(ConfigError):
        TrainConfig(target_modality="flair")


def test_checkpoint_round_trip_records_all_modality(tmp_path):
    trainer = make_trainer(tmp_path)
    path = trainer.save()
    loaded = load_model(path)
    assert loaded.all_modality and loaded.target_modality == "all"
    assert loaded.model_config.num_modality_labels == 4 and loaded.model_config.in_channels == 40
    assert loaded.extra["modality_labels"] == list(MODALITIES)
    single = load_model(make_trainer(tmp_path, target="t2f", preset=get_preset("tiny")).save())
    assert not single.all_modality and "modality_labels" not in single.extra
    # the three records must agree: a labelled network stored as a t1c model is refused
    data = read_checkpoint(path)
    data["config"]["train"]["target_modality"] = "t1c"
    save_checkpoint(tmp_path / "bad.pt", data)
    with pytest.raises(CheckpointError, match=r"bad\.pt: inconsistent all-modality checkpoint.*trained target 't1c'"):
        load_model(tmp_path / "bad.pt")


def test_presets_named_all_are_exactly_the_all_modality_ones():
    for name, preset in PRESETS.items():  # run.sh finds the one model's folder by the name
        assert name.endswith("_all") == (preset.model.num_modality_labels > 0), name
    assert PRESETS["demo_all"].train.max_steps == 4 * PRESETS["demo"].train.max_steps
    assert PRESETS["fats_all"].model.in_channels == 40


# ---------------------------------------------------------------- commands

@pytest.fixture(scope="module")
def trained_all(tiny_demo_dir, tmp_path_factory):
    """train.py --preset demo_all --target all (the tiny network in its place): ONE run folder."""
    run_dir = tmp_path_factory.mktemp("all_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "get_preset", lambda name: tiny_all_preset())
        code = run_main("train", ["--preset", "demo_all", "--data_dir", tiny_demo_dir / "training", "--run_dir",
                                  run_dir, "--target", "all", "--val_cases", 1, "--val_interval", 2, "--max_steps", 2,
                                  "--cpu"])
    assert code == EXIT_OK
    return run_dir


def test_train_with_an_all_preset_trains_one_model(trained_all, tiny_demo_dir, tmp_path, monkeypatch):
    assert sorted(p.name for p in trained_all.iterdir() if p.is_dir()) == ["all"]
    loaded = load_model(trained_all / "all" / "best.pt")
    assert loaded.all_modality and loaded.step == 2
    monkeypatch.setattr(train, "get_preset", lambda name: tiny_all_preset())
    assert run_main("train", ["--preset", "demo_all", "--data_dir", tiny_demo_dir / "training", "--run_dir",
                              tmp_path / "r", "--target", "t1c", "--max_steps", 1, "--cpu"]) == EXIT_FATAL
    assert not (tmp_path / "r").exists()


def test_sample_synthesises_one_target_with_the_all_model(trained_all, tiny_demo_dir, tmp_path):
    out = {}
    for target in ("t1c", "t2f"):
        assert run_main("sample", ["--checkpoint", trained_all / "all" / "best.pt", "--data_dir",
                                   tiny_demo_dir / "pseudo_validation_gt", "--target", target, "--out_dir",
                                   tmp_path / target, "--device", "cpu", "--nfe", 2]) == EXIT_OK
        out[target] = json.loads((tmp_path / target / "metrics.json").read_text())["cases"]
    assert [c["case_id"] for c in out["t1c"]] == [c["case_id"] for c in out["t2f"]]
    assert out["t1c"][0]["psnr"] != out["t2f"][0]["psnr"]  # the label (and the slot) change the synthesis


def missing_modalities(folder):
    return {case.name: next(m for m in MODALITIES if not (case / f"{case.name}-{m}.nii.gz").exists())
            for case in sorted(folder.iterdir()) if case.is_dir()}


@pytest.mark.parametrize("how", ["checkpoint", "model_dir"])
def test_sample_auto_completes_every_missing_modality_with_the_one_model(trained_all, tiny_demo_dir, tmp_path, how):
    missing = missing_modalities(tiny_demo_dir / "pseudo_validation")
    assert len(set(missing.values())) == len(missing) > 1  # the cases miss different modalities
    models = (["--checkpoint", f"all={trained_all / 'all' / 'best.pt'}"] if how == "checkpoint"
              else ["--model_dir", trained_all])
    out = tmp_path / "completed"
    assert run_main("sample_auto", ["--data_dir", tiny_demo_dir / "pseudo_validation", *models, "--out_dir", out,
                                    "--device", "cpu", "--nfe", 2]) == EXIT_OK
    for case, mod in missing.items():
        assert (out / case / f"{case}-{mod}.nii.gz").is_file()
    report = json.loads((out / "completion_report.json").read_text())
    assert sorted(c["missing"] for c in report["completed"]) == sorted(missing.values())


def test_mismatched_model_kinds_fail_with_one_message_and_write_nothing(trained_all, tiny_demo_dir, tmp_path,
                                                                          caplog):
    all_model = trained_all / "all" / "best.pt"
    single_model = make_trainer(tmp_path, target="t2f", preset=get_preset("tiny")).save()
    mod = next(iter(missing_modalities(tiny_demo_dir / "pseudo_validation").values()))
    for spec, problem in ((f"{mod}={all_model}", "is an all-modality model"),
                          (f"all={single_model}", "is a single-modality model")):
        out = tmp_path / f"out_{spec[:3]}"
        caplog.clear()
        assert run_main("sample_auto", ["--data_dir", tiny_demo_dir / "pseudo_validation", "--checkpoint", spec,
                                        "--out_dir", out, "--device", "cpu", "--nfe", 1]) == EXIT_FATAL
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and problem in errors[0] and str(spec.split("=", 1)[1]) in errors[0], errors
        assert not out.exists()


def test_a_model_dir_all_entry_that_is_single_modality_is_refused(tiny_demo_dir, tmp_path, caplog):
    folder = tmp_path / "models" / "all"
    folder.mkdir(parents=True)
    single = make_trainer(tmp_path, target="t2f", preset=get_preset("tiny")).save()
    shutil.copy(single, folder / "best.pt")
    assert run_main("sample_auto", ["--data_dir", tiny_demo_dir / "pseudo_validation", "--model_dir",
                                    tmp_path / "models", "--out_dir", tmp_path / "out", "--device", "cpu"]) == EXIT_FATAL
    assert not (tmp_path / "out").exists()
    assert any(str(folder / "best.pt") in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


def test_run_sh_trains_one_model_and_samples_every_modality_with_it(run_sh):
    result, calls = run_sh("--preset", "demo_all", "--target", "all", "--gpus", "0")  # train, then score
    assert result.returncode == 0, result.stderr
    trains = [c for c in calls if c[0] == "scripts/train.py"]
    samples = [c for c in calls if c[0] == "scripts/sample.py"]
    assert len(trains) == 1 and trains[0][trains[0].index("--target") + 1] == "all"
    assert [c[c.index("--target") + 1] for c in samples] == list(MODALITIES)
    for c in samples:  # the one model, scored on the cases its training held out
        assert c[c.index("--checkpoint") + 1] == "runs/demo_all/all/best.pt"
        assert c[c.index("--held_out_of") + 1] == "runs/demo_all/all/run_config.json"
    _, calls = run_sh("--mode", "sample", "--preset", "demo", "--target", "t1c", "--gpus", "0")
    assert calls[0][calls[0].index("--checkpoint") + 1] == "runs/demo/t1c/best.pt"  # single-modality: unchanged


def test_fats_statistics_and_held_out_cases_of_an_all_model(tiny_demo_dir):
    from fixtures_data import TINY_GEOMETRY
    from guided_diffusion.bratsloader import BratsDataset, discover_cases
    from guided_diffusion.fats_training import held_out_cases, measure_energy

    cases, errors = discover_cases(tiny_demo_dir / "training", mode="train", geometry=TINY_GEOMETRY)
    dataset = BratsDataset(cases, TINY_GEOMETRY)
    pooled = measure_energy(dataset, "all")
    per_modality = [measure_energy(dataset, m) for m in MODALITIES]
    for band, energy in pooled["energy"].items():  # the same brain voxels per modality: the plain mean
        assert energy == pytest.approx(sum(s["energy"][band] for s in per_modality) / 4, rel=1e-9)
        assert len(pooled["case_energy"][band]) == 4 * len(per_modality[0]["case_energy"][band])
    held = held_out_cases(dataset, "all", "cpu", max_cases=2)
    assert [int(c["label"]) for c in held] == [0, 1, 2, 3] * 2
    for case in held:  # each target once, its slot the placeholder
        k = int(case["label"])
        assert case["cond"].shape[1] == 32 and not case["cond"][:, 8 * k: 8 * k + 8].any()
        assert case["cond"][:, [c for c in range(32) if not 8 * k <= c < 8 * k + 8]].any()


def test_all_vs_single_experiment_gives_both_arms_the_same_total_budget(tmp_path):
    from experiments import all_vs_single

    assert all_vs_single.main(["--quick", "--out", str(tmp_path), "--threads", "1"]) == 0
    result = json.loads((tmp_path / "all_vs_single.json").read_text())
    assert sorted((r["target"], r["arm"]) for r in result["records"]) == sorted(
        (m, arm) for m in MODALITIES for arm in ("single", "all"))
    steps = {name: t["steps"] for name, t in result["training"].items()}
    assert steps["all"] == sum(steps[m] for m in MODALITIES) == 4 * steps["t1n"]
    assert result["parameters"]["all_modality"] < result["parameters"]["singles_total"]
    # the downstream Dice columns: every arm and modality, the real-target upper bound, the means
    dice = ("dice_wt", "dice_tc", "dice_et")
    for row in result["records"] + list(result["real_target"].values()) + list(result["mean"].values()):
        assert all(0.0 <= row[k] <= 1.0 for k in dice), row
    assert sorted(result["real_target"]) == sorted(MODALITIES) and set(result["mean"]) == {"single", "all", "real"}
    assert result["segmentation"]["trained_here"] and result["segmentation"]["preset"] == "tiny"


class TruthWhereTargetIsBright(torch.nn.Module):
    """A stand-in segmenter that knows the truth: region r is predicted where the truth has r AND
    the target channel is > 0 (so what it predicts depends on the target channel alone)."""

    def __init__(self, regions, index: int):
        super().__init__()
        self.regions, self.index = torch.as_tensor(regions), index

    def forward(self, x):  # (1, 4, X, Y, Z) -> (1, 3, X, Y, Z) logits
        return torch.where(self.regions[None] & (x[:, self.index : self.index + 1] > 0), 100.0, -100.0)


@pytest.mark.parametrize("target", ["t1c", "t2f"])
def test_all_vs_single_dice_sees_the_synthesis_in_place_of_the_real_target(tiny_demo_dir, tmp_path, target):
    """Substituting a synthesis without the tumour (the real target, tumour voxels zeroed) must drop
    every region's Dice from the upper bound to 0; the real target as its own synthesis must not."""
    from experiments.all_vs_single import segment_scores, write_synthesis
    from guided_diffusion.bratsloader import discover_cases, load_case
    from guided_diffusion.segmentation import Segmenter, label_regions
    from fixtures_data import TINY_GEOMETRY

    cases, _ = discover_cases(tiny_demo_dir / "pseudo_validation_gt", geometry=TINY_GEOMETRY)
    data = [load_case(c, TINY_GEOMETRY) for c in cases]
    index = MODALITIES.index(target)
    assert all(label_regions(d.seg).any(axis=(1, 2, 3)).all() for d in data)  # every region is present
    for d in data:  # one stand-in per case (it knows that case's truth)
        segmenter = Segmenter(TruthWhereTargetIsBright(label_regions(d.seg), index), {}, tmp_path / "oracle.pt",
                              torch.device("cpu"))
        v = torch.from_numpy(d.volumes[index])
        same_path = write_synthesis(tmp_path / "same", d, target, v, TINY_GEOMETRY)
        no_tumour = torch.where(torch.from_numpy(d.seg > 0), torch.zeros(()), v)
        cut_path = write_synthesis(tmp_path / "cut", d, target, no_tumour, TINY_GEOMETRY)
        same, upper = segment_scores(segmenter, [d], target, [same_path], TINY_GEOMETRY)
        cut, upper_again = segment_scores(segmenter, [d], target, [cut_path], TINY_GEOMETRY)
        assert upper == upper_again
        for region in ("wt", "tc", "et"):
            assert upper[f"dice_{region}"] == pytest.approx(1.0)  # the tumour is > 0 in the real target
            assert same[f"dice_{region}"] == pytest.approx(1.0)
            assert cut[f"dice_{region}"] == 0.0
            assert cut[f"hd95_{region}"] is None and cut[f"hd95_{region}_n"] == 0  # nothing predicted
