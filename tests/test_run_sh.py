"""run.sh's argument handling and the command lines it builds, with a stub interpreter that
records its arguments instead of running anything (PYTHON=<stub>)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_SH_VARIABLES = ("PRESET", "MODEL", "MODE", "TARGET", "CONTR", "DATA_DIR", "NFE", "STEPS", "GPUS", "RUN_DIR",
                    "OUT_DIR", "CHECKPOINT", "DEMO_DIR", "DEMO_STEPS", "PYTHON")
SEP = "\x1f"

STUB = """#!/usr/bin/env bash
# A Python stand-in: '-c' checks succeed (printing $STUB_GPUS for the GPU count), every other call is logged.
if [ "$1" = "-c" ]; then
    case "$2" in *device_count*) echo "${STUB_GPUS:-0}" ;; esac
    exit 0
fi
(IFS=$'\\x1f'; echo "$*") >> "$STUB_LOG"
"""


def make_stub(path: Path, text: str = STUB) -> Path:
    """An executable stand-in interpreter at ``path`` (``text``: its bash script)."""
    path.write_text(text)
    path.chmod(0o755)
    return path


def copy_run_sh(root: Path) -> Path:
    """run.sh and the script it sources, copied into ``root`` (runs that write next to run.sh,
    e.g. the demo's folders, then write nothing into the repository). Returns the copied run.sh."""
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "run.sh", root / "run.sh")
    shutil.copy(REPO_ROOT / "scripts" / "ensure_env.sh", root / "scripts" / "ensure_env.sh")
    return root / "run.sh"


@pytest.fixture
def run_sh(tmp_path):
    stub = make_stub(tmp_path / "python")
    data = tmp_path / "brats"
    (data / "case1").mkdir(parents=True)
    (data / "case1" / "case1-t1n.nii.gz").write_bytes(b"")  # run.sh only looks for the names
    log = tmp_path / "calls.log"

    def run(*args: str, gpus: str | None = None) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
        env = {k: v for k, v in os.environ.items() if k not in RUN_SH_VARIABLES}
        env.update(PYTHON=str(stub), STUB_LOG=str(log), DATA_DIR=str(data))
        if gpus is not None:
            env["STUB_GPUS"] = gpus
        if log.exists():
            log.unlink()
        result = subprocess.run(["bash", str(REPO_ROOT / "run.sh"), *args], env=env, capture_output=True,
                                text=True, timeout=60)
        calls = [line.split(SEP) for line in log.read_text().splitlines()] if log.exists() else []
        return result, calls

    run.data = str(data)
    return run


def test_train_on_the_cpu_with_gpus_0_and_pass_through_flags(run_sh):
    result, calls = run_sh("--mode", "train", "--preset", "fats", "--target", "t1c", "--gpus", "0",
                           "--run_dir", "r", "--", "--max_steps", "5", "--lr", "1e-4")
    assert result.returncode == 0, result.stderr
    assert calls == [["scripts/train.py", "--preset", "fats", "--data_dir", run_sh.data, "--target", "t1c",
                      "--run_dir", "r", "--resume", "auto", "--max_steps", "5", "--lr", "1e-4", "--cpu"]]


def test_several_gpus_train_through_torchrun_and_one_gpu_directly(run_sh):
    _, calls = run_sh("--mode", "train", "--gpus", "2")
    assert calls[0][:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "scripts/train.py"]
    _, calls = run_sh("--mode", "train", gpus="1")  # --gpus not given: the visible GPUs
    assert calls[0][0] == "scripts/train.py" and "--cpu" not in calls[0]
    assert calls[0][calls[0].index("--run_dir") + 1] == "runs/unet"  # the default preset's run folder


def test_sample_with_target_all_samples_every_modality_with_its_model(run_sh):
    result, calls = run_sh("--mode", "sample", "--preset", "fats", "--target", "all", "--nfe", "4", "--", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert calls == [["scripts/sample.py", "--checkpoint", f"runs/fats/{m}/best.pt", "--data_dir", run_sh.data,
                      "--target", m, "--out_dir", f"results/fats_{m}", "--nfe", "4", "--seed", "3"]
                     for m in ("t1n", "t1c", "t2w", "t2f")]


def test_auto_mode_and_old_spellings(run_sh):
    result, calls = run_sh("--mode", "auto", "--model", "fast", "--steps", "2", "--out_dir", "o")
    assert result.returncode == 0, result.stderr
    assert calls == [["scripts/sample_auto.py", "--data_dir", run_sh.data, "--model_dir", "runs/fast", "--out_dir",
                      "o", "--nfe", "2"]]
    assert "--model is deprecated, use --preset" in result.stderr


@pytest.mark.parametrize("args, message", [
    (("--bogus",), "unknown option --bogus"),
    (("--mode", "paint"), "unknown mode 'paint'"),
])
def test_bad_flags_exit_2_before_running_anything(run_sh, args, message):
    result, calls = run_sh(*args)
    assert result.returncode == 2 and message in result.stderr and calls == []


def test_sampling_splits_over_the_gpus_with_torchrun(run_sh):
    _, calls = run_sh("--mode", "auto", "--preset", "fast", "--gpus", "3")
    assert calls == [["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3", "scripts/sample_auto.py",
                      "--data_dir", run_sh.data, "--model_dir", "runs/fast"]]
    _, calls = run_sh("--mode", "sample", "--preset", "fast", gpus="2")  # --gpus not given: the visible GPUs
    assert calls[0][:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "scripts/sample.py"]
    _, calls = run_sh("--mode", "sample", "--preset", "fast", "--gpus", "0", gpus="4")
    assert calls[0][0] == "scripts/sample.py" and calls[0][-2:] == ["--device", "cpu"]
    _, calls = run_sh("--mode", "sample", "--preset", "fast", gpus="1")
    assert calls[0][0] == "scripts/sample.py" and "--device" not in calls[0]
