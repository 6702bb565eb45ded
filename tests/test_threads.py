"""Issue 14, point 8: a thread count for every command (``--threads N``, cli.ArgumentParser) and
for run.sh (``--threads N`` exports OMP_NUM_THREADS to every step)."""
from __future__ import annotations

import os
import subprocess

import pytest
import torch

from guided_diffusion.commands import sample, train
from test_run_sh import copy_run_sh, make_stub


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("command", [train, sample])
def test_threads_flag_sets_torch_threads(command, restore_threads):
    required = {train: ["--data_dir", "d"], sample: ["--checkpoint", "c", "--data_dir", "d", "--target", "t2f",
                                                     "--out_dir", "o"]}[command]
    torch.set_num_threads(2)
    command.parse_args([*required, "--threads", "1"])
    assert torch.get_num_threads() == 1
    torch.set_num_threads(1)
    command.parse_args(required)  # no flag: left as it is
    assert torch.get_num_threads() == 1
    with pytest.raises(SystemExit):
        command.parse_args([*required, "--threads", "0"])


def test_run_sh_threads_reaches_every_step(tmp_path):
    run_sh = copy_run_sh(tmp_path / "repo")
    stub, log = tmp_path / "python", tmp_path / "calls.log"
    make_stub(stub, '#!/usr/bin/env bash\n[ "$1" = "-c" ] && { echo 0; exit 0; }\n'
                    'echo "$1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}" >> "$STUB_LOG"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "DATA_DIR", "PRESET", "MODE")}
    env.update(PYTHON=str(stub), STUB_LOG=str(log))
    result = subprocess.run(["bash", str(run_sh), "--threads", "3"], env=env, capture_output=True,
                            text=True, timeout=60)  # no data: the demo (make data, train, sample)
    assert result.returncode == 0, result.stderr
    lines = log.read_text().splitlines()
    assert len(lines) == 3 and all(line.endswith("OMP_NUM_THREADS=3") for line in lines), lines
