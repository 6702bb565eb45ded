"""Issue 14, point 4: fitting learned timesteps is no longer silent or fixed. Progress events per
budget and per accepted improvement (fats_training), a bar on a terminal and log lines elsewhere
(cli.FitProgress), and train.py's budgets chosen with --fats_nfe or skipped with --skip_fats_fit."""
from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

from fixtures_data import one_thread  # noqa: F401 (a fixture)
from fixtures_data import run_main
from guided_diffusion import cli
from guided_diffusion.commands import train
from guided_diffusion.config import DiffusionConfig
from guided_diffusion.factory import build_model, build_schedule
from guided_diffusion.fats_training import fit_sampling_steps
from guided_diffusion.presets import get_preset

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fitting_reports_each_budget_and_each_improvement(tiny_model_config, caplog):
    torch.manual_seed(0)
    model = build_model(tiny_model_config)
    for p in model.parameters():  # break the zero init so the output depends on the input
        torch.nn.init.normal_(p, std=0.05)
    schedule = build_schedule(DiffusionConfig(kind="fast_direct", num_train_steps=20))
    gen = torch.Generator().manual_seed(1)
    cases = [{"x0": torch.rand(1, 8, 4, 4, 4, generator=gen), "cond": torch.rand(1, 24, 4, 4, 4, generator=gen)}]
    events = []
    progress = cli.FitProgress("fit test")

    def record(event):
        events.append(event)
        progress(event)

    with caplog.at_level(logging.INFO), torch.no_grad():
        results = fit_sampling_steps(model, schedule, cases, [1, 3], progress=record)
    kinds = [(e["event"], e["nfe"], e["index"], e["budgets"]) for e in events if e["event"] != "improved"]
    assert kinds == [("start", 1, 0, 2), ("done", 1, 0, 2), ("start", 3, 1, 2), ("done", 3, 1, 2)]
    improved = [e for e in events if e["event"] == "improved"]
    assert all(e["nfe"] == 3 and len(e["steps"]) == 3 for e in improved)  # K = 1 has nothing to search
    assert [e["result"] for e in events if e["event"] == "done"] == [results[1], results[3]]
    if improved:  # each improvement lowers the error the search reports
        assert improved[-1]["error"] == pytest.approx(results[3]["error"])
    # not a terminal (pytest captures stderr): no bar, one line per budget start and end
    assert caplog.text.count("fit test: NFE=") == 4 and "NFE=3 (2 of 2)" in caplog.text


@pytest.mark.parametrize("flags, fitted", [([], [[1, 2, 4, 10]]), (["--fats_nfe", "2", "4"], [[2, 4]]),
                                           (["--skip_fats_fit"], [])])
def test_train_fits_the_budgets_asked_for_or_none(flags, fitted, tiny_demo_dir, tmp_path, monkeypatch):
    tiny = get_preset("tiny")
    fats_tiny = replace(tiny, diffusion=DiffusionConfig(kind="fats", num_train_steps=20))
    monkeypatch.setattr(train, "get_preset", lambda name: fats_tiny)
    calls = []
    monkeypatch.setattr(train, "fit_fats_steps", lambda *args: calls.append(list(args[-1])))
    argv = ["--preset", "tiny", "--data_dir", tiny_demo_dir / "training", "--run_dir", tmp_path / "run", "--target",
            "t2f", "--val_cases", 1, "--val_interval", 1, "--max_steps", 1, "--cpu", *flags]
    assert run_main("train", argv) == 0
    assert calls == fitted


def test_long_cases_get_a_bar_over_their_network_evaluations(monkeypatch, caplog):
    assert cli.step_progress(cli.STEP_BAR_MIN - 1, "short") is None  # a few steps: the per-case bar is enough
    with caplog.at_level(logging.INFO):
        assert cli.step_progress(1000, "case t2f") is None  # not a terminal: a log line instead of a bar
    assert "case t2f: 1000 network evaluations" in caplog.text

    import io

    from tqdm import tqdm

    out = io.StringIO()  # a terminal, as far as the bar knows
    monkeypatch.setattr(cli, "tqdm", lambda *a, **k: tqdm(*a, **{**k, "file": out, "disable": False, "mininterval": 0}))
    on_step = cli.step_progress(60, "case t2f")
    for i in range(60):
        on_step({"i": i})
    assert "60/60" in out.getvalue()
