"""Bad input: every entry point that reads data, run as a user runs it (a subprocess), over the
generated corpus of tests/bad_input_corpus.py. Each bad case gets one message naming the file and
the problem, batch commands go on with the good cases and exit 1 with a summary, no traceback is
ever shown, inputs are never modified, and docs/bad_input.md is what the scripts print."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import pytest

from bad_input_corpus import (DEFECTS, ENTRY_POINTS, ENVIRONMENT_DEPENDENT, N_GOOD, REPO_ROOT, SCRIPTS,
                              build_corpus, entry_point_commands, fatal_messages, markdown_table, run_entry_points,
                              run_in_process, tree_digest, write_case, write_tiny_checkpoint)
from fixtures_data import one_thread  # noqa: F401 (a fixture)
from guided_diffusion.bratsloader import Geometry, expected_path

EXIT_SOME_FAILED, EXIT_FATAL = 1, 2
DOC = REPO_ROOT / "docs" / "bad_input.md"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus_runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("bad_input")
    corpus = build_corpus(work / "corpus")
    checkpoint = write_tiny_checkpoint(work / "tiny.pt")
    runs = run_entry_points(corpus, checkpoint, work / "out")
    fatal = fatal_messages(work / "fatal", checkpoint)
    return SimpleNamespace(work=work, corpus=corpus, checkpoint=checkpoint, runs=runs, fatal=fatal)


def _mode(entry_point: str) -> str:
    return "auto" if entry_point == "sample_auto.py" else "train"


CASES = [(e, d) for e in ENTRY_POINTS for d in DEFECTS if _mode(e) in d.modes]


@pytest.mark.slow
@pytest.mark.parametrize("entry_point, defect", CASES, ids=[f"{e}-{d.name}" for e, d in CASES])
def test_one_message_naming_the_file_and_the_problem(corpus_runs, entry_point, defect):
    mode = _mode(entry_point)
    if mode in defect.skip_reason:
        pytest.skip(defect.skip_reason[mode])
    run = corpus_runs.runs[entry_point]
    path, problem = defect.expected(mode)
    messages = run.messages[defect.case_id()]
    assert len(messages) == 1, (messages, run.stderr[-4000:])
    full_path = str(corpus_runs.corpus[mode] / path)
    assert messages[0].startswith(f"{full_path}: "), messages
    assert problem in messages[0], messages
    # logged once when the case is skipped and once in the summary, nothing more
    case_folder = str(corpus_runs.corpus[mode] / defect.case_id())
    mentions = [line for line in run.stderr.splitlines()
                if f"{case_folder}/" in line or f"{case_folder}:" in line]
    assert len(mentions) == 2, mentions


@pytest.mark.slow
@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_batch_goes_on_exits_1_without_traceback_and_leaves_inputs_alone(corpus_runs, entry_point):
    run = corpus_runs.runs[entry_point]
    assert "Traceback" not in run.stderr and "Traceback" not in run.stdout
    assert run.returncode == EXIT_SOME_FAILED, run.stderr[-3000:]
    assert run.inputs_unchanged
    n_bad = sum(1 for d in DEFECTS if _mode(entry_point) in d.modes and _mode(entry_point) not in d.skip_reason)
    summary = [line for line in run.stderr.splitlines() if line.rstrip().endswith("failed:")]
    assert summary and summary[-1].split(": ", 1)[1].startswith(f"{n_bad} "), summary
    out = corpus_runs.work / "out"
    readable_anyway = [d.case_id() for d in DEFECTS if _mode(entry_point) in d.skip_reason]  # chmod 000 as root
    good = sorted([f"good-{i:03d}" for i in range(N_GOOD)] + readable_anyway)
    if entry_point == "train.py":
        assert (out / "run" / "t2f" / "latest.pt").is_file()
        assert json.loads((out / "run" / "t2f" / "run_config.json").read_text())["train_cases"] == good
    elif entry_point == "sample.py":
        assert sorted(p.name for p in (out / "sample").iterdir() if p.is_dir()) == good
        assert [c["case_id"] for c in json.loads((out / "sample" / "metrics.json").read_text())["cases"]] == good
    elif entry_point == "sample_auto.py":
        assert sorted(p.name for p in (out / "auto").iterdir() if p.is_dir()) == good
    else:
        assert sorted(p.name for p in (out / "dropped").iterdir() if p.is_dir()) == good


@pytest.mark.slow
@pytest.mark.parametrize("problem, expected", [("empty_dataset", "no usable"), ("missing_dataset", "does not exist")])
def test_dataset_level_problems_are_fatal_with_one_message(corpus_runs, problem, expected):
    for entry_point, (code, errors, message) in corpus_runs.fatal[problem].items():
        assert code == EXIT_FATAL, (entry_point, errors)
        assert message.startswith("<data_dir>: ") and (expected in message or "no complete case" in message), message
        assert len(errors) == 1, errors


def _comparable(table: str) -> list[str]:
    skip = {d.description for d in DEFECTS if d.name in ENVIRONMENT_DEPENDENT}
    return [line for line in table.splitlines() if not any(line.startswith(f"| {s} |") for s in skip)]


@pytest.mark.slow
def test_docs_table_is_what_the_scripts_print(corpus_runs):
    fatal = {k: {n: m for n, (_, _, m) in v.items()} for k, v in corpus_runs.fatal.items()}
    table = markdown_table(corpus_runs.corpus, corpus_runs.runs, fatal)
    assert "UNEXPECTED" not in table
    assert _comparable(DOC.read_text()) == _comparable(table), (
        "docs/bad_input.md is out of date: python tests/bad_input_corpus.py --table > docs/bad_input.md")


def _discover_as_unprivileged(root: Path) -> str:
    """discover_cases over ``root`` in a process that has given up root (uid/gid 65534, 'nobody'),
    for whom chmod 000 does block reading; returns the messages it prints."""
    code = ("import os, sys\n"
            "from guided_diffusion.bratsloader import discover_cases\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "assert not os.access(sys.argv[1], os.R_OK)\n"
            "cases, errors = discover_cases(sys.argv[2], geometry=None, check_data=True)\n"
            "print([c.case_id for c in cases]); print('\\n'.join(map(str, errors)))\n")
    import subprocess

    done = subprocess.run([sys.executable, "-c", code, str(root / "case-b" / "case-b-t1c.nii.gz"), str(root)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_unreadable_file_is_reported_as_unreadable():
    """chmod 000 only blocks a user without CAP_DAC_OVERRIDE; as root the check runs in a child
    process that drops to uid 65534 first (the corpus also covers a dangling symlink and a FIFO)."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="unreadable_", dir="/tmp"))
    try:
        root.chmod(0o755)
        for case_id in ("case-a", "case-b"):
            write_case(root, case_id)
        for path in root.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        bad = expected_path(root / "case-b", "t1c")
        bad.chmod(0)
        if os.geteuid() == 0:
            if not hasattr(os, "setuid"):
                pytest.skip("running as root without a way to drop privileges")
            out = _discover_as_unprivileged(root)
        else:
            from guided_diffusion.bratsloader import discover_cases

            cases, errors = discover_cases(root, geometry=None, check_data=True)
            out = f"{[c.case_id for c in cases]}\n" + "\n".join(map(str, errors)) + "\n"
        assert out == f"['case-a']\n{bad}: cannot read: Permission denied\n"
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- nothing overwritten


@pytest.mark.slow
def test_reruns_never_overwrite_outputs(corpus_runs):
    """The same commands again (in this process): outputs exist, so each refuses (sample.py and
    drop_modality.py as a whole, sample_auto.py per case, train.py without --resume) and nothing
    under out/ or in the inputs changes."""
    out = corpus_runs.work / "out"
    before, inputs = tree_digest(out), {m: tree_digest(f) for m, f in corpus_runs.corpus.items()}
    commands = entry_point_commands(corpus_runs.corpus, corpus_runs.checkpoint, out)
    results = {}
    for name, cmd in commands.items():
        code, records = run_in_process(cmd)
        results[name] = (code, [r.getMessage() for r in records if r.levelname == "ERROR"])
    assert tree_digest(out) == before
    assert {m: tree_digest(f) for m, f in corpus_runs.corpus.items()} == inputs
    code, errors = results["train.py"]
    assert code == EXIT_FATAL and "--resume auto" in errors[-1], errors
    code, errors = results["sample.py"]
    assert code == EXIT_FATAL and "already holds the results" in errors[-1], errors
    code, errors = results["drop_modality.py"]
    assert code == EXIT_FATAL and "not empty" in errors[-1], errors
    code, errors = results["sample_auto.py"]
    n_written = N_GOOD + sum(1 for d in DEFECTS if "auto" in d.skip_reason)
    assert code == EXIT_SOME_FAILED
    assert sum("output exists; refusing to overwrite it" in e for e in errors) == 2 * n_written  # + summary


def test_sample_survives_an_evaluation_error_per_case(tmp_path):
    """Volumes too small for the SSIM window (12 x 12 x 8 < 11 voxels deep): the synthesis is still
    written, each case is reported with the file it was scored against, and the batch exits 1."""
    geometry = Geometry.scaled(12 / 240)
    assert geometry.network_shape == (12, 12, 8)
    for i in range(2):
        write_case(tmp_path / "data", f"small-{i}", seed=i, shape=geometry.original_shape)
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.pt")
    code, records = run_in_process([sys.executable, str(SCRIPTS / "sample.py"), "--checkpoint", str(checkpoint),
                                    "--data_dir", str(tmp_path / "data"), "--target", "t2f", "--out_dir",
                                    str(tmp_path / "out"), "--nfe", "1", "--device", "cpu"])
    assert code == EXIT_SOME_FAILED
    for i in range(2):
        assert nib.load(expected_path(tmp_path / "out" / f"small-{i}", "t2f")).shape == geometry.original_shape
    assert (tmp_path / "out" / "sample_config.json").is_file()
    errors = [r.getMessage() for r in records if r.levelname == "ERROR" and "cannot evaluate" in r.getMessage()]
    assert len(errors) == 4 and all("t2f.nii.gz: cannot evaluate the synthesis" in e for e in errors)  # + summary
    shutil.rmtree(tmp_path / "out")


def test_an_interrupted_write_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    """NIfTI outputs and checkpoints are written to a temporary file in the target folder and
    renamed: a write that dies half way leaves the previous file intact and nothing else."""
    import numpy as np
    import torch

    from guided_diffusion import bratsloader
    from guided_diffusion.checkpoints import read_checkpoint, save_checkpoint
    from guided_diffusion.fileio import atomic_write

    image = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    out = bratsloader.write_nifti(tmp_path / "case-t2f.nii.gz", image)
    ckpt = save_checkpoint(tmp_path / "latest.pt", {"model": {"w": torch.ones(3)}, "step": 1})
    before = tree_digest(tmp_path)

    def dies_half_way(img, path):
        Path(path).write_bytes(b"\x1f\x8b partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(bratsloader.nib, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        bratsloader.write_nifti(out, nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(ckpt, lambda tmp: dies_half_way(None, tmp))
    assert tree_digest(tmp_path) == before  # old files intact, no temporary file left
    assert nib.load(out).get_fdata().min() == 1 and read_checkpoint(ckpt)["step"] == 1
