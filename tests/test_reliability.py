"""Issue 12: "never overwrites" under races, bounded memory on hostile files, every failure a message.

One test (at least) per class of input; the memory tests run the read in a child process under an
address-space cap (``RLIMIT_AS``: the child's size after its imports plus a headroom) and also
report its peak-RSS growth, so reading everything the file inflates to or allocating what its
header / config claims fails them.
"""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bad_input_corpus import (AFFINE, AUTO_MISSING, GEOMETRY, REPO_ROOT, SCRIPTS, brain_volume, gzip_bomb,
                              run_in_process, save_nifti, tree_digest, write_case, write_tiny_checkpoint)
from fixtures_data import one_thread  # noqa: F401 (a fixture)
from guided_diffusion import cli, fileio
from guided_diffusion.bratsloader import CaseError, discover_cases, expected_path, load_case, save_volume
from guided_diffusion.checkpoints import CheckpointError, check_resume, load_model, read_checkpoint, save_checkpoint
from guided_diffusion.config import DiffusionConfig
from guided_diffusion.metrics import strict_json
from guided_diffusion.presets import get_preset
from guided_diffusion.runlock import RunLocked, hold_run_lock

pytestmark = pytest.mark.usefixtures("one_thread")
EXIT_SOME_FAILED, EXIT_FATAL, EXIT_TERMINATED = 1, 2, 143
MiB = 1 << 20


# --------------------------------------------------------------------------- memory caps

CAPPED = """
import json, resource, sys
sys.path[:0] = [{repo!r}, {tests!r}]
import numpy, nibabel, torch
from guided_diffusion import bratsloader, checkpoints
from pathlib import Path

def vm_size():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024

cap = vm_size() + {headroom}
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
{body}
    outcome = "ok"
except (bratsloader.CaseError, checkpoints.CheckpointError) as err:
    outcome = "refused: " + str(err)
except MemoryError as err:
    outcome = "MemoryError"
except RuntimeError as err:
    outcome = "RuntimeError: " + str(err)[:200]
growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({{"outcome": outcome, "rss_growth_mib": growth / 1024}}))
"""


def run_capped(body: str, headroom_mib: int = 256) -> dict:
    """Run ``body`` (statements; may use bratsloader, checkpoints, Path) in a child capped at its
    imported size + ``headroom_mib``; returns its outcome and peak-RSS growth in MiB."""
    code = CAPPED.format(repo=str(REPO_ROOT), tests=str(REPO_ROOT / "tests"), headroom=headroom_mib * MiB,
                         body=textwrap.indent(textwrap.dedent(body), " " * 4))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _case_with(root: Path, spoil) -> Path:
    folder = write_case(root, "case-a")
    spoil(expected_path(folder, "t1c"))
    return folder


def test_a_decompression_bomb_is_refused_in_bounded_memory(tmp_path):
    """A valid volume plus a trailing gzip member inflating to 512 MiB (the file: ~0.5 MB)."""
    _case_with(tmp_path, lambda p: gzip_bomb(p, 512 * MiB))
    assert (tmp_path / "case-a" / "case-a-t1c.nii.gz").stat().st_size < 1 * MiB
    result = run_capped(f"""
        cases, errors = bratsloader.discover_cases({str(tmp_path)!r}, geometry=None, check_data=True)
        assert not cases and len(errors) == 1, errors
        raise errors[0]
    """)
    assert result["outcome"].startswith("refused: ") and "decompresses to more than" in result["outcome"], result
    assert result["rss_growth_mib"] < 64, result


def test_header_claims_are_checked_before_any_voxel_is_read(tmp_path):
    """Every file of the case is a ~100-byte gzip holding only a header: one claims 1200^3 float32
    (6.9 GB), the others the BraTS grid in float64 (71 MB each) that the file cannot hold."""
    folder = write_case(tmp_path, "case-a", seg=False)
    for i, modality in enumerate(("t1n", "t1c", "t2w", "t2f")):
        header = nib.Nifti1Header()
        header.set_data_shape((1200, 1200, 1200) if modality == "t1c" else (240, 240, 155))
        header.set_data_dtype(np.float32 if modality == "t1c" else np.float64)
        header.set_sform(AFFINE, code=1)
        header["vox_offset"] = 352
        expected_path(folder, modality).write_bytes(gzip.compress(header.binaryblock + b"\0" * 4, mtime=0))
    messages = {}
    for modality in ("t1c", "t2w"):
        path = expected_path(folder, modality)
        result = run_capped(f"""
            path = Path({str(path)!r})
            bratsloader._read_voxels(path, bratsloader._open_header(path, None))
        """, headroom_mib=128)
        assert result["rss_growth_mib"] < 32, result
        messages[modality] = result["outcome"]
    assert "header claims shape (1200, 1200, 1200), larger than the BraTS grid" in messages["t1c"], messages
    assert "more than a" in messages["t2w"] and "gzip file can hold" in messages["t2w"], messages


def test_a_checkpoint_config_asking_for_a_huge_model_allocates_nothing(tmp_path):
    """The tiny preset's weights (~50 kB) under a config asking for 512 channels (a ~1 GB model)."""
    source = write_tiny_checkpoint(tmp_path / "tiny.pt")
    data = read_checkpoint(source)
    data["config"]["model"]["num_channels"] = 512
    data.pop("format")
    hostile = save_checkpoint(tmp_path / "hostile.pt", data)
    assert hostile.stat().st_size < 2 * MiB
    result = run_capped(f"checkpoints.load_model({str(hostile)!r})", headroom_mib=256)
    assert result["outcome"].startswith(f"refused: {hostile}: weights do not fit the model its config"), result
    assert "shapes differ" in result["outcome"] and result["rss_growth_mib"] < 64, result


# --------------------------------------------------------------------------- checkpoint metadata


@pytest.mark.parametrize("field, value, phrase", [
    (("extra", "sample", "sampler"), "lms", "sampler must be one of"),
    (("extra", "sample", "nfe"), "four", "malformed metadata in extra"),
    (("config", "diffusion", "kind"), "sigmoid", "kind must be one of"),
    (("config", "model", "num_channels"), [8], "invalid or missing config"),
    (("extra", "fats"), {"version": 2, "learned": {"2": {"timesteps": [5000, 3]}}}, "not strictly decreasing"),
    (("step",), "x", "malformed checkpoint field"),
])
def test_malformed_checkpoint_metadata_is_one_message_naming_the_file(tmp_path, field, value, phrase):
    data = read_checkpoint(write_tiny_checkpoint(tmp_path / "tiny.pt"))
    node = data
    for key in field[:-1]:
        node = node.setdefault(key, {})
    node[field[-1]] = value
    data.pop("format")
    path = save_checkpoint(tmp_path / "bad.pt", data)
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    assert str(info.value).startswith(f"{path}: ") and phrase in str(info.value), str(info.value)


def test_resume_refuses_a_checkpoint_of_another_target_or_schedule(tmp_path):
    preset = get_preset("tiny")
    data = read_checkpoint(write_tiny_checkpoint(tmp_path / "tiny.pt"))
    data["config"]["train"]["target_modality"] = "t1c"
    check_resume("ckpt.pt", data, preset.model, preset.diffusion, "t1c")  # the same run: accepted
    with pytest.raises(CheckpointError, match=r"ckpt.pt: cannot resume .*target modality: 't1c' -> 't2f'"):
        check_resume("ckpt.pt", data, preset.model, preset.diffusion, "t2f")
    other = DiffusionConfig(kind="cosine", num_train_steps=preset.diffusion.num_train_steps)
    assert preset.diffusion.kind != "cosine"
    with pytest.raises(CheckpointError, match=rf"diffusion kind: '{preset.diffusion.kind}' -> 'cosine'"):
        check_resume("ckpt.pt", data, preset.model, other, "t1c")


# --------------------------------------------------------------------------- run folder lock

HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from guided_diffusion.runlock import hold_run_lock
    with hold_run_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(60)
""")


def test_one_training_per_run_folder_and_stale_locks_are_taken_over(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(repo=str(REPO_ROOT)), str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=rf"{tmp_path}: another training .*pid {holder.pid} on"):
            with hold_run_lock(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: the lock file still names it
        holder.wait()
    assert f"pid={holder.pid}" in (tmp_path / ".lock").read_text()
    with hold_run_lock(tmp_path):
        assert f"pid={os.getpid()}" in (tmp_path / ".lock").read_text()
    assert f"stale lock of pid {holder.pid}" in caplog.text
    assert (tmp_path / ".lock").read_text() == ""  # released cleanly: nothing stale left


# --------------------------------------------------------------------------- publishing


def test_publishing_never_replaces_a_file_that_appears_during_the_write(tmp_path):
    target = tmp_path / "case-t2f.nii.gz"

    def write_while_someone_copies_a_scan_in(tmp):
        Path(tmp).write_bytes(b"synthesis")
        target.write_bytes(b"real scan")  # appears after any exists() check

    with pytest.raises(FileExistsError) as info:
        fileio.atomic_write(target, write_while_someone_copies_a_scan_in, replace=False)
    assert info.value.filename == str(target)
    assert target.read_bytes() == b"real scan" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    fileio.atomic_write(tmp_path / "new.bin", lambda tmp: Path(tmp).write_bytes(b"x"), replace=False)
    assert (tmp_path / "new.bin").read_bytes() == b"x"


def test_publishing_without_hard_links_still_never_replaces(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")  # e.g. some FUSE and SMB mounts

    monkeypatch.setattr(fileio.os, "link", no_links)
    (tmp_path / "old").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        fileio.atomic_write(tmp_path / "old", lambda tmp: Path(tmp).write_bytes(b"new"), replace=False)
    fileio.atomic_write(tmp_path / "fresh", lambda tmp: Path(tmp).write_bytes(b"new"), replace=False)
    assert (tmp_path / "old").read_bytes() == b"old" and (tmp_path / "fresh").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "old"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_written_files_get_the_permissions_of_an_ordinary_write(tmp_path, umask):
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain", "w") as fh:  # the oracle: what the OS gives a normal file
            fh.write("x")
        written = fileio.save_json({"a": 1}, tmp_path / "atomic.json")
    finally:
        os.umask(old)
    assert (tmp_path / "plain").stat().st_mode & 0o777 == 0o666 & ~umask
    assert written.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777


def _auto_dataset(root: Path, n: int) -> Path:
    for i in range(n):
        write_case(root, f"case-{i:03d}", seed=i, skip=(AUTO_MISSING,), seg=False)
    return root


def test_sample_auto_keeps_a_file_that_appears_while_synthesising(tmp_path, monkeypatch):
    """--in_place: a real scan copied into the case folder during the synthesis is kept byte for
    byte; the case is reported as skipped, the other case is written, exit 1."""
    from guided_diffusion.commands import sample_auto

    data = _auto_dataset(tmp_path / "data", 2)
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.pt")
    real = expected_path(data / "case-000", AUTO_MISSING)
    real_synthesize = sample_auto.synthesize

    def synthesize_while_a_scan_arrives(loaded, volumes, target, cfg, case_ids, *args, **kwargs):
        if list(case_ids) == ["case-000"]:
            real.write_bytes(b"the real scan")
        return real_synthesize(loaded, volumes, target, cfg, case_ids, *args, **kwargs)

    monkeypatch.setattr(sample_auto, "synthesize", synthesize_while_a_scan_arrives)
    code, records = run_in_process([sys.executable, str(SCRIPTS / "sample_auto.py"), "--data_dir", str(data),
                                    "--checkpoint", f"{AUTO_MISSING}={checkpoint}", "--in_place", "--nfe", "1",
                                    "--device", "cpu"])
    assert code == EXIT_SOME_FAILED
    assert real.read_bytes() == b"the real scan"
    assert nib.load(expected_path(data / "case-001", AUTO_MISSING)).shape == GEOMETRY.original_shape
    errors = [r.getMessage() for r in records if r.levelname == "ERROR"]
    assert f"{real}: appeared while this case was processed; refusing to overwrite it (case skipped)" in errors
    assert not [p for p in data.rglob(".*") if p.name != ".sampling_records"]  # no temporary file left


def test_sigterm_removes_the_temporary_file_writes_the_report_and_exits_143(tmp_path):
    data = _auto_dataset(tmp_path / "data", 40)
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.pt")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "sample_auto.py"), "--data_dir", str(data), "--checkpoint",
                             f"{AUTO_MISSING}={checkpoint}", "--out_dir", str(out), "--nfe", "2", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not any(out.glob(f"*/*-{AUTO_MISSING}.nii.gz")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_TERMINATED, stderr[-3000:]
    assert "Traceback" not in stderr
    written = sorted(out.glob(f"*/*-{AUTO_MISSING}.nii.gz"))
    assert 1 <= len(written) < 40
    assert not list(out.rglob(".*.tmp")) and not list(out.rglob(".*.nii.gz"))
    report = json.loads((out / "completion_report.json").read_text())
    assert "SIGTERM" in report["interrupted"]
    assert sorted(Path(c["output"]) for c in report["completed"]) == written


# --------------------------------------------------------------------------- outputs vs inputs


def test_sample_never_writes_into_its_own_dataset_even_with_overwrite(tmp_path):
    for i in range(2):
        write_case(tmp_path / "data", f"case-{i}", seed=i)
    (tmp_path / "link").symlink_to(tmp_path / "data")
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.pt")
    before = tree_digest(tmp_path / "data")
    for out in (tmp_path / "data", tmp_path / "link", tmp_path / "data" / "results"):
        code, records = run_in_process([sys.executable, str(SCRIPTS / "sample.py"), "--checkpoint", str(checkpoint),
                                        "--data_dir", str(tmp_path / "data"), "--target", "t2f", "--out_dir", str(out),
                                        "--nfe", "1", "--device", "cpu", "--overwrite"])
        errors = [r.getMessage() for r in records if r.levelname == "ERROR"]
        assert code == EXIT_FATAL and "overlaps the input dataset" in errors[-1], errors
    assert tree_digest(tmp_path / "data") == before


def test_a_full_disk_is_one_line_per_case_and_the_batch_goes_on(tmp_path, monkeypatch):
    import errno

    from guided_diffusion import bratsloader

    data = _auto_dataset(tmp_path / "data", 2)
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.pt")
    real_save = bratsloader.nib.save

    def disk_full_for_case_000(image, path):
        if "case-000" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(image, path)

    monkeypatch.setattr(bratsloader.nib, "save", disk_full_for_case_000)
    code, records = run_in_process([sys.executable, str(SCRIPTS / "sample_auto.py"), "--data_dir", str(data),
                                    "--checkpoint", f"{AUTO_MISSING}={checkpoint}", "--out_dir",
                                    str(tmp_path / "out"), "--nfe", "1", "--device", "cpu"])
    assert code == EXIT_SOME_FAILED
    errors = [r.getMessage() for r in records if r.levelname == "ERROR"]
    assert sum("No space left on device (ENOSPC)" in e for e in errors) == 2, errors  # logged + summary
    assert expected_path(tmp_path / "out" / "case-001", AUTO_MISSING).is_file()
    assert not list((tmp_path / "out").rglob(".*.nii.gz"))
    report = json.loads((tmp_path / "out" / "completion_report.json").read_text())
    assert [c["case_id"] for c in report["completed"]] == ["case-001"] and len(report["failures"]) == 1


def test_output_below_a_regular_file_is_refused_before_any_work(tmp_path):
    data = _auto_dataset(tmp_path / "data", 1)
    (tmp_path / "afile").write_text("x")
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.pt")
    code, records = run_in_process([sys.executable, str(SCRIPTS / "sample_auto.py"), "--data_dir", str(data),
                                    "--checkpoint", f"{AUTO_MISSING}={checkpoint}", "--out_dir",
                                    str(tmp_path / "afile" / "out"), "--nfe", "1", "--device", "cpu"])
    errors = [r.getMessage() for r in records if r.levelname == "ERROR"]
    assert code == EXIT_FATAL and errors == [f"{tmp_path / 'afile' / 'out'}: cannot create the output folder "
                                             "(Not a directory: " + str(tmp_path / "afile") + " is a file)"], errors


# --------------------------------------------------------------------------- run-level messages


def test_run_level_mistakes_are_one_line_naming_the_real_problem(tmp_path):
    data = _auto_dataset(tmp_path / "data", 1)
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.pt")
    auto = [sys.executable, str(SCRIPTS / "sample_auto.py"), "--data_dir", str(data), "--nfe", "1"]
    code, records = run_in_process(auto + ["--model_dir", str(tmp_path / "no_such_runs"), "--device", "cpu"])
    errors = [r.getMessage() for r in records if r.levelname == "ERROR"]
    assert code == EXIT_FATAL and errors == [f"--model_dir {tmp_path / 'no_such_runs'}: folder does not exist or "
                                             "is not a folder"], errors
    if not torch.cuda.is_available():
        code, records = run_in_process(auto + ["--checkpoint", f"{AUTO_MISSING}={checkpoint}", "--device", "cuda"])
        errors = [r.getMessage() for r in records if r.levelname == "ERROR"]
        assert code == EXIT_FATAL and len(errors) == 1 and "--device cuda: CUDA is not available" in errors[0]
        assert not (tmp_path / "data_completed").exists()  # refused before any work


def test_a_grid_the_model_cannot_halve_is_refused_by_every_sampling_command(tmp_path):
    """(19, 19, 12) files are a valid scaled BraTS grid, network grid (17, 17, 12): not divisible by 4."""
    from guided_diffusion.bratsloader import Geometry

    geometry = Geometry.scaled(19 / 240)
    assert geometry.network_shape[0] % 4
    for i in range(2):
        write_case(tmp_path / "auto", f"case-{i}", seed=i, skip=(AUTO_MISSING,), seg=False,
                   shape=geometry.original_shape)
        write_case(tmp_path / "full", f"case-{i}", seed=i, shape=geometry.original_shape)
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.pt")
    for cmd in ([str(SCRIPTS / "sample_auto.py"), "--data_dir", str(tmp_path / "auto"), "--checkpoint",
                 f"{AUTO_MISSING}={checkpoint}", "--out_dir", str(tmp_path / "out"), "--device", "cpu"],
                [str(SCRIPTS / "fats_fit_steps.py"), "--checkpoint", str(checkpoint), "--data_dir",
                 str(tmp_path / "full"), "--target", AUTO_MISSING, "--out", str(tmp_path / "fit.pt"), "--nfe", "1",
                 "--device", "cpu"]):
        code, records = run_in_process([sys.executable, *cmd])
        errors = [r.getMessage() for r in records if r.levelname == "ERROR"]
        assert code == EXIT_FATAL and "do not fit the model" in errors[-1] and "not divisible" in errors[-1], errors


def test_fats_fit_steps_checks_its_output_location_before_fitting(tmp_path, monkeypatch):
    from guided_diffusion.commands import fats_fit_steps

    for i in range(2):
        write_case(tmp_path / "data", f"case-{i}", seed=i)
    (tmp_path / "afile").write_text("x")
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.pt")
    monkeypatch.setattr(fats_fit_steps, "fit_and_store_timesteps",
                        lambda *a, **k: pytest.fail("fitted before checking where to write"))
    code, records = run_in_process([sys.executable, str(SCRIPTS / "fats_fit_steps.py"), "--checkpoint",
                                    str(checkpoint), "--data_dir", str(tmp_path / "data"), "--target", "t2f",
                                    "--out", str(tmp_path / "afile" / "fit.pt"), "--nfe", "1", "--device", "cpu"])
    errors = [r.getMessage() for r in records if r.levelname == "ERROR"]
    assert code == EXIT_FATAL and "cannot create the output folder" in errors[-1], errors


def test_negative_max_cases_is_an_argument_error(capsys):
    from guided_diffusion.commands import sample

    with pytest.raises(SystemExit) as done:
        sample.parse_args(["--checkpoint", "x.pt", "--data_dir", "d", "--target", "t2f", "--out_dir", "o",
                           "--max_cases", "-1"])
    assert done.value.code == 2 and "--max_cases: -1 is negative (0 means all)" in capsys.readouterr().err


def test_run_sh_option_without_value_names_the_option():
    for args in (["--mode"], ["--mode", "--preset", "demo"], ["--data_dir"]):
        done = subprocess.run(["bash", str(REPO_ROOT / "run.sh"), *args], capture_output=True, text=True,
                              cwd=REPO_ROOT, timeout=60)
        assert done.returncode == 2 and done.stderr == f"run.sh: {args[0]} needs a value (see bash run.sh --help)\n"


# --------------------------------------------------------------------------- outputs a user can trust


def test_a_synthesis_header_says_what_it_is(tmp_path):
    header = nib.Nifti1Header()
    header.set_intent("label")
    header["cal_min"], header["cal_max"], header["descrip"] = 0, 4000, b"T2-FLAIR 3D"
    reference = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), AFFINE, header)
    reference.header.set_slope_inter(2.0, 10.0)
    out = save_volume(tmp_path / "s.nii.gz", np.full((4, 5, 6), 0.25, np.float32), reference,
                      description="SYNTHETIC t2f: Fast-cWDM ddim 4 NFE, best.pt")
    image = nib.load(out)
    assert image.header.get_intent()[0] == "none"
    assert (float(image.header["cal_min"]), float(image.header["cal_max"])) == (0.0, 1.0)
    assert image.header["descrip"].tobytes().rstrip(b"\0") == b"SYNTHETIC t2f: Fast-cWDM ddim 4 NFE, best.pt"
    assert np.allclose(image.get_fdata(), 0.25) and np.allclose(image.affine, AFFINE)


def test_a_volume_with_a_trailing_axis_of_one_is_read_as_3d(tmp_path):
    folder = write_case(tmp_path, "case-a")
    volume = brain_volume(3)
    save_nifti(expected_path(folder, "t1c"), volume[..., None])
    cases, errors = discover_cases(tmp_path, geometry=None, check_data=True)
    assert not errors and [c.case_id for c in cases] == ["case-a"]
    data = load_case(cases[0], GEOMETRY)
    c = GEOMETRY.crop
    expected = (volume - np.quantile(volume, 0.001)) / (np.quantile(volume, 0.999) - np.quantile(volume, 0.001))
    np.testing.assert_allclose(data.volumes[1][:, :, : volume.shape[2]],
                               np.clip(expected, 0, 1)[c:-c, c:-c], atol=1e-6)


def test_metrics_json_is_strict_json_with_null_for_missing_values(tmp_path):
    for i in range(2):
        write_case(tmp_path / "data", f"case-{i}", seed=i, seg=False)  # no segmentation: tumour metrics undefined
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.pt")
    code, _ = run_in_process([sys.executable, str(SCRIPTS / "sample.py"), "--checkpoint", str(checkpoint),
                              "--data_dir", str(tmp_path / "data"), "--target", "t2f", "--out_dir",
                              str(tmp_path / "out"), "--nfe", "1", "--device", "cpu"])
    assert code == 0

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text(), parse_constant=refuse)
    assert metrics["summary"]["psnr_tumor"]["mean"] is None and metrics["summary"]["psnr_tumor"]["n"] == 0
    assert metrics["summary"]["psnr"]["n"] == 2 and isinstance(metrics["summary"]["psnr"]["mean"], float)
    assert all(case["psnr_tumor"] is None for case in metrics["cases"]) and "null" in metrics["missing_values"]
    assert strict_json({"a": [float("inf"), np.float32("nan"), 1.5, torch.tensor(2.0)]}) == {"a": [None, None, 1.5,
                                                                                                  2.0]}
