"""Sampling at scale (issue 13): the split of the cases over torchrun ranks, rank 0's merge, and
``--resume`` (guided_diffusion.case_runner, wired into sample.py and sample_auto.py).

* one process and two gloo processes (torchrun on the CPU) write the same files, bit for bit,
  and the same per-case metrics / report entries;
* an interrupted ``--resume`` run, re-run, skips exactly the cases it finished (their files are
  not touched), synthesises the rest and ends with the files of an uninterrupted run; an output
  without a completion record, one that changed, or one from other settings is reported, never
  counted.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures_data import one_thread  # noqa: F401 (a fixture)
from fixtures_data import REPO_ROOT, digest, run_main
from guided_diffusion import case_runner
from guided_diffusion.bratsloader import expected_path
from guided_diffusion.case_runner import RECORDS_DIR, CaseJournal, Ranks, merge_reports, ranks_from_env, split_cases

EXIT_OK, EXIT_SOME_FAILED, EXIT_INTERRUPTED = 0, 1, 130
pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- the pieces

class _Case:
    def __init__(self, case_id: str):
        self.case_id = case_id


def test_split_deals_sorted_ids_round_robin_whatever_the_input_order():
    ids = ["c", "a", "e", "b", "d"]
    shares = [[c.case_id for c in split_cases([_Case(i) for i in ids], Ranks(r, 2))] for r in range(2)]
    assert shares == [["a", "c", "e"], ["b", "d"]]  # written out by hand
    assert [c.case_id for c in split_cases([_Case(i) for i in reversed(ids)], Ranks(1, 2))] == ["b", "d"]
    assert [[c.case_id for c in split_cases([_Case(i) for i in ids], Ranks(r, 3))] for r in range(3)] == \
        [["a", "d"], ["b", "e"], ["c"]]
    assert split_cases([_Case("x")], Ranks(1, 2)) == []  # more ranks than cases: an empty share
    with pytest.raises(ValueError, match="share an id"):
        split_cases([_Case("a"), _Case("a")], Ranks(0, 1))


def test_ranks_come_from_the_torchrun_environment():
    assert ranks_from_env({}) == Ranks(0, 1, 0)  # plain python: rank 0 of 1, no process group
    assert ranks_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Ranks(3, 4, 1)
    with pytest.raises(ValueError, match="RANK=4, WORLD_SIZE=4"):
        ranks_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        ranks_from_env({"WORLD_SIZE": "two"})
    assert case_runner.gather_reports(Ranks(), {"x": 1}) == [{"x": 1}]  # one process: no group needed


def test_merge_follows_the_global_case_order_and_keeps_every_failure():
    reports = [{"records": [{"case_id": "c"}, {"case_id": "a"}], "failures": ["x: bad"]},
               {"records": [{"case_id": "b"}], "failures": ["y: worse"]}]
    merged = merge_reports(reports, ["records"], ["a", "b", "c"])
    assert merged == {"records": [{"case_id": "a"}, {"case_id": "b"}, {"case_id": "c"}],
                      "failures": ["x: bad", "y: worse"]}


# --------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def models(tiny_demo_dir, tmp_path_factory) -> Path:
    """One tiny model per modality (2 training steps)."""
    root = tmp_path_factory.mktemp("scale_models")
    assert run_main("train", ["--preset", "tiny", "--data_dir", tiny_demo_dir / "training", "--run_dir", root,
                              "--target", "all", "--max_steps", 2, "--val_cases", 0, "--cpu"]) == EXIT_OK
    return root


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "FASTCWDM_DEBUG"):
        env.pop(name, None)
    return env


def _launch(processes: int, script: str, args: list, cwd: Path) -> subprocess.CompletedProcess:
    """``python scripts/<script>.py`` (1 process) or torchrun with ``processes`` gloo workers."""
    launcher = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    argv = [*launcher, str(REPO_ROOT / "scripts" / f"{script}.py"), *[str(a) for a in args]]
    return subprocess.run(argv, capture_output=True, text=True, env=_env(), cwd=cwd, timeout=300)


def _errors(result: subprocess.CompletedProcess) -> str:
    """The logged errors of every rank, then the end of stderr (torchrun's summary)."""
    return "\n".join(line for line in result.stderr.splitlines() if " ERROR " in line) + result.stderr[-2000:]


def _volumes(root: Path) -> dict[str, str]:
    return {k: v for k, v in digest(root).items() if k.endswith(".nii.gz")}


def _without_seconds(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_one_and_two_processes_write_the_same_bytes(models, tiny_demo_dir, tmp_path):
    data_dir = tiny_demo_dir / "training"  # 3 cases: the two ranks get 2 and 1
    case_ids = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
    assert len(case_ids) == 3
    outs = {}
    for n in (1, 2):
        outs[n] = tmp_path / f"sample_{n}"
        result = _launch(n, "sample", ["--checkpoint", models / "t2f" / "latest.pt", "--data_dir", data_dir,
                                       "--target", "t2f", "--out_dir", outs[n], "--nfe", 2, "--device", "cpu"], tmp_path)
        assert result.returncode == EXIT_OK, _errors(result)
    volumes = {n: _volumes(out) for n, out in outs.items()}
    assert sorted(volumes[1]) == sorted(str(expected_path(Path(c), "t2f")) for c in case_ids)
    assert volumes[1] == volumes[2]  # SHA-256 of every file
    metrics = {n: json.loads((out / "metrics.json").read_text()) for n, out in outs.items()}
    assert [r["case_id"] for r in metrics[2]["cases"]] == case_ids  # one merged file, in case order
    assert _without_seconds(metrics[1]["cases"]) == _without_seconds(metrics[2]["cases"])
    assert metrics[1]["summary"] == metrics[2]["summary"]
    rows = {n: list(csv.DictReader(open(out / "metrics.csv", newline=""))) for n, out in outs.items()}
    assert _without_seconds(rows[1]) == _without_seconds(rows[2]) and len(rows[2]) == 3
    assert (outs[1] / "slice.png").read_bytes() == (outs[2] / "slice.png").read_bytes()
    assert not (outs[2] / RECORDS_DIR).exists()  # records only with --resume

    auto = {}
    for n in (1, 2):
        auto[n] = tmp_path / f"auto_{n}"
        result = _launch(n, "sample_auto", ["--data_dir", tiny_demo_dir / "pseudo_validation", "--model_dir", models,
                                            "--out_dir", auto[n], "--nfe", 2, "--device", "cpu"], tmp_path)
        assert result.returncode == EXIT_OK, _errors(result)
    assert _volumes(auto[1]) == _volumes(auto[2]) and len(_volumes(auto[2])) == 2
    reports = {n: json.loads((out / "completion_report.json").read_text())["completed"] for n, out in auto.items()}
    assert [{k: v for k, v in r.items() if k != "output"} for r in reports[1]] == \
        [{k: v for k, v in r.items() if k != "output"} for r in reports[2]]
    assert sorted(p.name for p in auto[2].iterdir()) == sorted([*(r["case_id"] for r in reports[2]),
                                                               "completion_report.json"])  # one report


class _Interrupting:
    """Stands in for ``synthesize``: counts the calls; raises KeyboardInterrupt (what Ctrl-C and
    a scheduler's SIGTERM end in) at call number ``stop_at``."""

    def __init__(self, real, stop_at: int | None = None):
        self.real, self.stop_at, self.calls = real, stop_at, []

    def __call__(self, loaded, volumes, target, cfg, case_ids, *args, **kwargs):
        self.calls.append(case_ids[0])
        if len(self.calls) == self.stop_at:
            raise KeyboardInterrupt
        return self.real(loaded, volumes, target, cfg, case_ids, *args, **kwargs)


def _sample(module, monkeypatch, argv, stop_at=None) -> tuple[int, list[str]]:
    fake = _Interrupting(module.synthesize, stop_at)
    monkeypatch.setattr(module, "synthesize", fake)
    code = run_main(module.__name__.rsplit(".", 1)[1], argv)
    monkeypatch.setattr(module, "synthesize", fake.real)
    return code, fake.calls


def test_an_interrupted_resume_run_finishes_like_an_uninterrupted_one(models, tiny_demo_dir, tmp_path, monkeypatch):
    from guided_diffusion.commands import sample

    data_dir = tiny_demo_dir / "training"
    case_ids = sorted(p.name for p in data_dir.iterdir() if p.is_dir())

    def argv(out):
        return ["--checkpoint", models / "t2f" / "latest.pt", "--data_dir", data_dir, "--target", "t2f",
                "--out_dir", out, "--nfe", 2, "--device", "cpu", "--resume"]

    straight = tmp_path / "straight"
    assert _sample(sample, monkeypatch, argv(straight)) == (EXIT_OK, case_ids)
    out = tmp_path / "resumed"
    assert _sample(sample, monkeypatch, argv(out), stop_at=2) == (EXIT_INTERRUPTED, case_ids[:2])
    first = expected_path(out / case_ids[0], "t2f")
    assert sorted(_volumes(out)) == [str(first.relative_to(out))]  # only the finished case
    inode = first.stat().st_ino

    assert _sample(sample, monkeypatch, argv(out)) == (EXIT_OK, case_ids[1:])  # the first case is skipped
    assert first.stat().st_ino == inode  # ... and its file not rewritten
    assert _volumes(out) == _volumes(straight)
    metrics = {d: json.loads((d / "metrics.json").read_text())["cases"] for d in (out, straight)}
    assert _without_seconds(metrics[out]) == _without_seconds(metrics[straight])
    assert (out / "slice.png").read_bytes() == (straight / "slice.png").read_bytes()

    # a complete run re-run: nothing to synthesise, the same results
    assert _sample(sample, monkeypatch, argv(out)) == (EXIT_OK, [])
    assert json.loads((out / "metrics.json").read_text())["cases"] == metrics[out]


def test_resume_never_counts_an_unverified_output(models, tiny_demo_dir, tmp_path, monkeypatch):
    from guided_diffusion.commands import sample

    data_dir = tiny_demo_dir / "training"
    a, b, c = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
    out = tmp_path / "out"
    argv = ["--checkpoint", models / "t2f" / "latest.pt", "--data_dir", data_dir, "--target", "t2f",
            "--out_dir", out, "--nfe", 2, "--device", "cpu", "--resume"]
    assert _sample(sample, monkeypatch, argv)[0] == EXIT_OK
    complete = _volumes(out)
    journal = CaseJournal(out)
    path = {cid: expected_path(out / cid, "t2f") for cid in (a, b, c)}
    path[a].write_bytes(path[a].read_bytes()[:-100])  # a truncated (half-written) output under its record
    journal.record_path(path[b]).unlink()  # an output without a completion record
    path[c].unlink()  # a record whose output is gone: redone
    code, calls = _sample(sample, monkeypatch, argv)
    assert code == EXIT_SOME_FAILED and calls == [c]
    assert _volumes(out)[str(path[c].relative_to(out))] == complete[str(path[c].relative_to(out))]
    assert [r["case_id"] for r in json.loads((out / "metrics.json").read_text())["cases"]] == [c]

    # other settings (another NFE) never pass for this run's results
    path[a].unlink()
    code, calls = _sample(sample, monkeypatch, [*argv[:-5], "--nfe", 1, "--device", "cpu", "--resume"])
    assert code == EXIT_SOME_FAILED and calls == [a]  # b: no record; c: recorded with --nfe 2
    assert [r["case_id"] for r in json.loads((out / "metrics.json").read_text())["cases"]] == [a]


def test_sample_auto_resumes_into_one_report(models, tiny_demo_dir, tmp_path, monkeypatch):
    from guided_diffusion.commands import sample_auto

    data_dir = tiny_demo_dir / "pseudo_validation"
    out = tmp_path / "completed"
    argv = ["--data_dir", data_dir, "--model_dir", models, "--out_dir", out, "--nfe", 2, "--resume"]
    code, calls = _sample(sample_auto, monkeypatch, argv, stop_at=2)
    assert code == EXIT_INTERRUPTED and len(_volumes(out)) == 1
    code, again = _sample(sample_auto, monkeypatch, argv)
    assert code == EXIT_OK and again == calls[1:]
    report = json.loads(sorted(out.glob("completion_report*.json"))[-1].read_text())  # the newest covers all
    missing = json.loads((data_dir / "missing_modalities.json").read_text())
    assert {r["case_id"]: r["missing"] for r in report["completed"]} == missing and report["failures"] == []
