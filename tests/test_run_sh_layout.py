"""Issue 14, points 3 and 7: run.sh finds the data where cWDM's README puts it (data/BRATS/training
as well as data/BraTS/training) and says which folder it uses; ``--target all`` with ``--out_dir``
samples each modality into its own sub-folder. run.sh runs from a copy of the repository's shell
files with a stub interpreter that records its arguments (nothing is written into the repository)."""
from __future__ import annotations

import os
import subprocess

import pytest

from test_run_sh import RUN_SH_VARIABLES, SEP, copy_run_sh, make_stub


@pytest.fixture
def run_copy(tmp_path):
    """``run(*args, data=<folder under the copy>)`` -> (result, calls)."""
    root = tmp_path / "repo"
    run_sh = copy_run_sh(root)
    stub, log = make_stub(tmp_path / "python"), tmp_path / "calls.log"

    def add_case(folder: str) -> None:
        case = root / folder / "case1"
        case.mkdir(parents=True)
        (case / "case1-t1n.nii.gz").write_bytes(b"")  # run.sh only looks for the names

    def run(*args: str):
        env = {k: v for k, v in os.environ.items() if k not in RUN_SH_VARIABLES}
        env.update(PYTHON=str(stub), STUB_LOG=str(log))
        log.unlink(missing_ok=True)
        result = subprocess.run(["bash", str(run_sh), *args], env=env, capture_output=True, text=True,
                                timeout=60)
        calls = [line.split(SEP) for line in log.read_text().splitlines()] if log.exists() else []
        return result, calls

    run.add_case = add_case
    return run


def data_dirs(calls):
    return [c[c.index("--data_dir") + 1] for c in calls if "--data_dir" in c]


@pytest.mark.parametrize("folder", ["data/BraTS/training", "data/BRATS/training"])
def test_either_seed_layout_is_found_and_named(run_copy, folder):
    run_copy.add_case(folder)
    result, calls = run_copy("--mode", "train", "--preset", "unet", "--gpus", "0")
    assert result.returncode == 0, result.stderr
    assert data_dirs(calls) == [folder] and f"[run.sh] data: {folder}" in result.stdout


def test_this_projects_layout_wins_when_both_hold_cases(run_copy):
    run_copy.add_case("data/BRATS/training")
    run_copy.add_case("data/BraTS/training")
    result, calls = run_copy("--mode", "train", "--preset", "unet", "--gpus", "0")
    assert result.returncode == 0 and data_dirs(calls) == ["data/BraTS/training"]


def test_without_data_the_demo_runs_and_says_where_it_looked(run_copy):
    result, calls = run_copy()
    assert result.returncode == 0, result.stderr
    assert "no BraTS data under 'data/BraTS/training'" in result.stdout
    assert calls and calls[0][0] == "scripts/make_demo_data.py"


def test_target_all_samples_each_modality_into_its_own_folder(run_copy):
    run_copy.add_case("data/BraTS/training")
    result, calls = run_copy("--mode", "sample", "--preset", "unet", "--target", "all", "--out_dir", "out",
                             "--gpus", "0")
    assert result.returncode == 0, result.stderr
    outs = [c[c.index("--out_dir") + 1] for c in calls]
    assert outs == ["out/t1n", "out/t1c", "out/t2w", "out/t2f"]
    result, calls = run_copy("--mode", "sample", "--preset", "unet", "--target", "t2f", "--out_dir", "out",
                             "--gpus", "0")
    assert [c[c.index("--out_dir") + 1] for c in calls] == ["out"]  # one modality: the folder as given


def flags_of(call):
    return {call[i]: call[i + 1] for i in range(1, len(call) - 1) if call[i].startswith("--")}


def test_train_then_sample_separates_the_flags_and_scores_held_out_cases(run_copy):
    """Issue 14, point 2: flags after -- go to training only; --sample_flags to sampling; the model
    is scored on the cases training held out (or on --val_dir), never on its training cases."""
    run_copy.add_case("data/BraTS/training")
    result, calls = run_copy("--preset", "unet", "--gpus", "0", "--run_dir", "r", "--sample_flags",
                             "--sampler ddim --nfe 10", "--", "--max_steps", "3")
    assert result.returncode == 0, result.stderr
    train, sample = calls
    assert train[0] == "scripts/train.py" and flags_of(train)["--max_steps"] == "3"
    assert sample[0] == "scripts/sample.py" and "--max_steps" not in sample
    assert flags_of(sample)["--sampler"] == "ddim" and flags_of(sample)["--nfe"] == "10"
    assert flags_of(sample)["--held_out_of"] == "r/t2f/run_config.json"
    assert "held out" in result.stdout

    result, calls = run_copy("--preset", "unet", "--gpus", "0", "--val_dir", "val")
    train, sample = calls
    assert flags_of(train)["--val_dir"] == "val" and flags_of(sample)["--data_dir"] == "val"
    assert "--held_out_of" not in sample


def test_sample_mode_passes_the_flags_after_dashes_to_sample(run_copy):
    run_copy.add_case("data/BraTS/training")
    result, calls = run_copy("--mode", "sample", "--preset", "unet", "--gpus", "0", "--", "--max_cases", "2")
    assert result.returncode == 0, result.stderr
    assert flags_of(calls[0])["--max_cases"] == "2" and "--held_out_of" not in calls[0]


@pytest.mark.parametrize("mode, data", [("sample", "demo_data/pseudo_validation_gt"), ("auto", "demo_data/pseudo_validation"),
                                        ("train", "demo_data/training")])
def test_demo_preset_does_the_mode_asked_for(run_copy, mode, data):
    """Issue 14, point 3: --mode sample / auto with the demo preset sample or complete (the demo
    dataset, the demo run's models) instead of training."""
    run_copy.add_case("demo_data/training")  # the demo dataset exists (the stub would not make it)
    result, calls = run_copy("--mode", mode, "--preset", "demo", "--gpus", "0")
    assert result.returncode == 0, result.stderr
    assert [c[0] for c in calls] == [f"scripts/{ {'auto': 'sample_auto'}.get(mode, mode)}.py"]
    assert data_dirs(calls) == [data] and "reusing the demo dataset" in result.stdout
