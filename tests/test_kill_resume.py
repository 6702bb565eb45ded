"""Kill test: SIGKILL a tiny training run at seeded random moments, ten times, some of them in the
middle of a checkpoint save (``--save_interval 1``: a save after every step), and resume it with
``--resume auto`` each time. Every resume must start from the last complete checkpoint, and the
run must end bit for bit where an uninterrupted run ends: weights, EMA, optimizer state, step and
the losses of the steps after the last resume (read back from TensorBoard).

CPU, one thread, ``num_workers=0`` (the ``tiny`` preset): the Trainer derives data order,
timesteps and noise from (seed, step, rank), so nothing else may differ.
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bad_input_corpus import REPO_ROOT, write_case
from fixtures_data import assert_same_tree
from guided_diffusion.checkpoints import read_checkpoint

MAX_STEPS = 60  # far more than ten kills use up: every run must be killed before it ends
N_KILLS = 10
KILL_SEED = 6
RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")


def _train_cmd(data: Path, run_dir: Path) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "scripts" / "train.py"), "--preset", "tiny", "--data_dir", str(data),
            "--run_dir", str(run_dir), "--max_steps", str(MAX_STEPS), "--save_interval", "1", "--log_interval", "1",
            "--cpu", "--resume", "auto"]


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("FASTCWDM_DEBUG", None)
    return env


def _tb_losses(run_dir: Path) -> dict[int, list[float]]:
    """step -> every ``loss/total`` value logged at that step, over all event files of the run."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    losses: dict[int, list[float]] = {}
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "loss/total":
                    number = value.simple_value if value.HasField("simple_value") else \
                        float(torch.tensor(list(value.tensor.float_val))[0])
                    losses.setdefault(event.step, []).append(number)
    return losses


def _partial_saves(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob(".*.tmp")) if run_dir.is_dir() else []


def _saving_latest(run_dir: Path) -> bool:
    """A save of latest.pt is under way: its temporary file exists (fileio.atomic_write)."""
    try:
        return any(e.name.startswith(".latest.pt.") and e.name.endswith(".tmp") for e in os.scandir(run_dir))
    except FileNotFoundError:
        return False


def _kill_when(proc: subprocess.Popen, run_dir: Path, during_save: bool, delay: float, deadline: float) -> str:
    """Wait for the run to save at least once more, then SIGKILL it: as soon as a partial checkpoint
    file appears (``during_save``) or after ``delay`` seconds. Returns how it was killed."""
    latest = run_dir / "latest.pt"
    start_mtime = latest.stat().st_mtime_ns if latest.exists() else 0
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.exists() and latest.stat().st_mtime_ns != start_mtime:
            break
        time.sleep(0.005)
    how = "after-progress"
    if during_save:  # a save takes tens of ms (fsync) after every step: poll without sleeping
        give_up = min(deadline, time.monotonic() + 2.0)
        while time.monotonic() < give_up and proc.poll() is None:
            if _saving_latest(run_dir):
                how = "during-save"
                break
    else:
        time.sleep(delay)
    if proc.poll() is not None:
        return "finished"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return how


@pytest.mark.slow
def test_sigkill_ten_times_then_resume_matches_uninterrupted_run(tmp_path):
    data = tmp_path / "data"
    for i in range(3):
        write_case(data, f"good-{i:03d}", seed=i)
    reference = subprocess.Popen(_train_cmd(data, tmp_path / "reference"), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO_ROOT)  # meanwhile
    ref_dir = tmp_path / "reference" / "t2f"

    run_root = tmp_path / "killed"
    run_dir = run_root / "t2f"
    rng = random.Random(KILL_SEED)
    kills, last_step, log = [], 0, []
    for k in range(N_KILLS):
        proc = subprocess.Popen(_train_cmd(data, run_root), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env=_env(), cwd=REPO_ROOT)
        how = _kill_when(proc, run_dir, during_save=k % 2 == 0, delay=rng.uniform(0.0, 0.6),
                         deadline=time.monotonic() + 120)
        stderr = proc.stderr.read()
        assert "Traceback" not in stderr, stderr[-3000:]
        assert how != "finished", f"kill {k}: the run finished before it could be killed; raise MAX_STEPS"
        resumed = RESUMED.findall(stderr)
        if k > 0 and last_step:
            assert resumed and int(resumed[-1][1]) == last_step, (k, resumed, last_step)
        leftovers = _partial_saves(run_dir)
        ckpt = read_checkpoint(run_dir / "latest.pt")  # always complete: loads, right format
        assert ckpt["format"] == "fast-cwdm/1" and ckpt["step"] >= last_step
        last_step = int(ckpt["step"])
        kills.append((how, last_step, [p.name for p in leftovers]))
        log.append(f"kill {k}: {how}, latest.pt at step {last_step}, partial files {[p.name for p in leftovers]}")

    _, ref_stderr = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_stderr[-3000:]
    final = subprocess.run(_train_cmd(data, run_root), capture_output=True, text=True, env=_env(), cwd=REPO_ROOT,
                           timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "Traceback" not in final.stderr
    assert int(RESUMED.findall(final.stderr)[-1][1]) == last_step
    if kills[-1][2]:
        assert "left by an interrupted save" in final.stderr
    assert _partial_saves(run_dir) == []  # cleaned up on the resume, never read as checkpoints
    print("\n".join(log))

    # at least one kill landed inside a save, and that left only a partial temporary file behind
    assert sum(how == "during-save" and bool(files) for how, _, files in kills) >= 1, log
    got, want = torch.load(run_dir / "latest.pt", weights_only=True), torch.load(ref_dir / "latest.pt",
                                                                                weights_only=True)
    assert got["step"] == want["step"] == MAX_STEPS
    for key in ("model", "ema", "optimizer", "schedule", "best_val"):
        assert_same_tree(got[key], want[key], key)
    ref_losses, run_losses = _tb_losses(ref_dir), _tb_losses(run_dir)
    assert sorted(ref_losses) == list(range(1, MAX_STEPS + 1))
    after_last_resume = [s for s in run_losses if s > last_step]
    assert after_last_resume == list(range(last_step + 1, MAX_STEPS + 1))
    for step, values in run_losses.items():  # every loss that reached disk equals the uninterrupted one
        assert all(v == ref_losses[step][0] for v in values), (step, values, ref_losses[step])
