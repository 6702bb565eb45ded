"""Issue 11: ensembles (``--num_samples M``) and uncertainty maps, with the ``tiny`` preset (CPU, seconds).

M = 1 writes exactly what the commands wrote before; M > 1 writes the mean as the synthesis, the
per-voxel std (``_std``) and, with ``--save_samples``, each sample, all on the input's grid; the
metrics gain the ensemble scores. The std and mean are checked against the saved samples with an
independent computation, the CRPS against its textbook pairwise formula."""
from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bad_input_corpus import write_tiny_checkpoint
from fixtures_data import one_thread  # noqa: F401 (a fixture)
from fixtures_data import TINY_GEOMETRY, digest, run_main
from guided_diffusion.bratsloader import expected_path, load_case, to_network_grid
from guided_diffusion.cli import find_cases
from guided_diffusion.checkpoints import load_model, read_checkpoint, save_checkpoint
from guided_diffusion.config import SampleConfig
from guided_diffusion.ensembles import ensemble_mean_std, synthesize_ensemble
from guided_diffusion.metrics import METRIC_KEYS
from guided_diffusion.prob_metrics import ENSEMBLE_METRIC_KEYS
from guided_diffusion.synthesis import synthesize

EXIT_OK, EXIT_FATAL = 0, 2
M = 3
# written anew for every synthesis (data type, scaling) or describing its values (bratsloader.save_volume)
HEADER_KEYS_OF_THE_VALUES = {"datatype", "bitpix", "scl_slope", "scl_inter", "vox_offset", "cal_min", "cal_max",
                             "intent_code", "intent_p1", "intent_p2", "intent_p3", "intent_name", "aux_file",
                             "descrip"}
pytestmark = pytest.mark.usefixtures("one_thread")


def _random_checkpoint(path: Path, target: str) -> Path:
    """The tiny preset's checkpoint for ``target`` with random non-zero weights (its output conv
    starts at zero, which would make every sample the same)."""
    data = read_checkpoint(write_tiny_checkpoint(path))
    g = torch.Generator().manual_seed(0)
    weights = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in data["model"].items()}
    data.update(model=weights, ema=weights)
    data["config"]["train"]["target_modality"] = target
    return save_checkpoint(path, {k: v for k, v in data.items() if k != "format"})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _random_checkpoint(tmp_path_factory.mktemp("model") / "t2f.pt", "t2f")


def _sample(checkpoint, data_dir, out_dir, *extra) -> int:
    return run_main("sample", ["--checkpoint", checkpoint, "--data_dir", data_dir, "--target", "t2f",
                               "--out_dir", out_dir, "--sampler", "ddpm", "--nfe", 3, "--seed", 4, "--device", "cpu",
                               *extra])


def _voxels_and_header(path: Path) -> bytes:
    """The uncompressed NIfTI bytes (the gzip wrapper carries a time stamp)."""
    return gzip.decompress(path.read_bytes())


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


@pytest.fixture(scope="module")
def ensemble_run(checkpoint, tiny_demo_dir, tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("ensemble") / "out"
    assert _sample(checkpoint, tiny_demo_dir / "pseudo_validation_gt", out_dir, "--num_samples", M,
                   "--save_samples") == EXIT_OK
    return out_dir


def _case_ids(data_dir: Path) -> list[str]:
    return sorted(p.name for p in data_dir.iterdir() if p.is_dir())


def test_one_sample_writes_exactly_what_the_command_wrote_before(checkpoint, tiny_demo_dir, tmp_path):
    data_dir = tiny_demo_dir / "pseudo_validation_gt"
    assert _sample(checkpoint, data_dir, tmp_path / "plain") == EXIT_OK
    assert _sample(checkpoint, data_dir, tmp_path / "m1", "--num_samples", 1) == EXIT_OK
    for case_id in _case_ids(data_dir):
        plain, m1 = (expected_path(tmp_path / o / case_id, "t2f") for o in ("plain", "m1"))
        assert _voxels_and_header(plain) == _voxels_and_header(m1)
        assert sorted(p.name for p in (tmp_path / "m1" / case_id).iterdir()) == [m1.name]
    metrics = json.loads((tmp_path / "m1" / "metrics.json").read_text())
    assert set(metrics["summary"]) == set(METRIC_KEYS)  # no ensemble keys with one sample
    assert not set(ENSEMBLE_METRIC_KEYS) & set(metrics["cases"][0])


def test_sample_index_0_is_the_single_synthesis_and_other_indices_differ(checkpoint, tiny_demo_dir):
    loaded = load_model(checkpoint)
    cases, _, geometry = find_cases(str(tiny_demo_dir / "pseudo_validation_gt"), "train", check_data=False)
    data = load_case(cases[0], geometry)
    volumes = torch.from_numpy(data.volumes)[None]
    cfg = SampleConfig(sampler="ddpm", nfe=3, seed=4)
    single = synthesize(loaded, volumes, "t2f", cfg, [cases[0].case_id])
    assert torch.equal(synthesize(loaded, volumes, "t2f", cfg, [cases[0].case_id], sample_indices=[0]), single)
    assert torch.equal(synthesize_ensemble(loaded, volumes, "t2f", cfg, cases[0].case_id, 1), single)
    samples = synthesize_ensemble(loaded, volumes, "t2f", cfg, cases[0].case_id, M)
    assert samples.shape == (M, *TINY_GEOMETRY.network_shape)
    assert torch.equal(samples, synthesize_ensemble(loaded, volumes, "t2f", cfg, cases[0].case_id, M))  # same bits
    for i in range(M):
        for j in range(i + 1, M):
            assert (samples[i] - samples[j]).abs().max() > 1e-3, (i, j)  # independent noise per sample
    torch.testing.assert_close(samples[0], single[0], atol=1e-4, rtol=0)  # the same noise, batched kernels
    with pytest.raises(ValueError, match="sample indices"):
        synthesize(loaded, volumes.expand(2, -1, -1, -1, -1), "t2f", cfg, ["a", "b"], sample_indices=[0])


def test_mean_and_std_are_those_of_numpy():
    samples = torch.rand((4, 3, 5, 2), generator=torch.Generator().manual_seed(0))
    mean, std = ensemble_mean_std(samples)
    a = samples.numpy().astype(np.float64)
    np.testing.assert_allclose(mean.numpy(), a.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(std.numpy(), a.std(axis=0, ddof=1), rtol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        ensemble_mean_std(samples[:1])


def test_ensemble_files_are_the_mean_std_and_samples_on_the_input_grid(ensemble_run, tiny_demo_dir):
    data_dir = tiny_demo_dir / "pseudo_validation_gt"
    for case_id in _case_ids(data_dir):
        folder, reference = ensemble_run / case_id, nib.load(expected_path(data_dir / case_id, "t2f"))
        names = {"mean": expected_path(folder, "t2f"), "std": expected_path(folder, "t2f_std"),
                 **{f"sample{m}": expected_path(folder, f"t2f_sample{m}") for m in range(M)}}
        assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in names.values())
        for what, path in names.items():
            image = nib.load(path)
            assert image.shape == reference.shape and np.array_equal(image.affine, reference.affine), what
            for key in reference.header.keys():
                if key not in HEADER_KEYS_OF_THE_VALUES:
                    assert np.array_equal(image.header[key], reference.header[key]), (what, key)
            assert image.get_data_dtype() == np.float32
        descriptions = {what: nib.load(p).header["descrip"].tobytes().rstrip(b"\0") for what, p in names.items()}
        assert descriptions["std"].startswith(b"STD MAP of 3 SYNTHETIC t2f:")
        assert descriptions["mean"].startswith(b"MEAN of 3 SYNTHETIC t2f:")
        assert descriptions["sample1"].startswith(b"SAMPLE 1 of 3 SYNTHETIC t2f:")

        samples = torch.from_numpy(np.stack([_load(names[f"sample{m}"]) for m in range(M)])).double()
        std, mean = _load(names["std"]), _load(names["mean"])
        np.testing.assert_allclose(std, torch.std(samples, dim=0).numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(mean, samples.mean(dim=0).numpy(), rtol=1e-5, atol=1e-7)
        assert std.max() > 1e-3  # the samples differ
        head = np.any([_load(expected_path(data_dir / case_id, m)) > 0 for m in ("t1n", "t1c", "t2w")], axis=0)
        assert not std[~head].any() and std[head].any()  # every sample is zeroed outside the head


def test_ensemble_metrics_score_the_samples_on_the_grid_and_masks_of_psnr(ensemble_run, tiny_demo_dir):
    data_dir = tiny_demo_dir / "pseudo_validation_gt"
    metrics = json.loads((ensemble_run / "metrics.json").read_text())
    assert set(metrics["summary"]) == set(METRIC_KEYS) | set(ENSEMBLE_METRIC_KEYS)
    assert metrics["num_samples"] == M and "ensemble_metrics" in metrics
    with open(ensemble_run / "metrics.csv", newline="") as fh:
        assert list(next(csv.DictReader(fh))) == ["case_id", *METRIC_KEYS, *ENSEMBLE_METRIC_KEYS, "seconds"]
    cases, _, geometry = find_cases(str(data_dir), "train", check_data=False)
    for case, record in zip(cases, metrics["cases"]):
        assert record["case_id"] == case.case_id and set(ENSEMBLE_METRIC_KEYS) <= set(record)
        data = load_case(case, geometry)
        samples = np.stack([to_network_grid(_load(expected_path(ensemble_run / case.case_id, f"t2f_sample{m}")),
                                            geometry) for m in range(M)]).astype(np.float64)
        truth = data.volumes[3].astype(np.float64)
        for mask, key in ((data.brain_mask, "crps_brain"), (data.seg > 0, "crps_tumor")):
            x, y = samples[:, mask], truth[mask]  # the fair CRPS, written out pair by pair
            pairs = sum(np.abs(x[i] - x[j]) for i in range(M) for j in range(M))
            expected = (np.abs(x - y).mean(axis=0) - pairs / (2 * M * (M - 1))).mean()
            assert record[key] == pytest.approx(expected, rel=1e-5), key
        assert -1 <= record["std_error_spearman"] <= 1 and record["spread_error_brain"] > 0
    assert (ensemble_run / "slice.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ensembles_repeat_bit_for_bit(checkpoint, ensemble_run, tiny_demo_dir, tmp_path):
    assert _sample(checkpoint, tiny_demo_dir / "pseudo_validation_gt", tmp_path / "again", "--num_samples", M,
                   "--save_samples") == EXIT_OK
    first = sorted(ensemble_run.rglob("*.nii.gz"))
    assert first and [p.relative_to(ensemble_run) for p in first] == \
        [p.relative_to(tmp_path / "again") for p in sorted((tmp_path / "again").rglob("*.nii.gz"))]
    for path in first:
        assert _voxels_and_header(path) == _voxels_and_header(tmp_path / "again" / path.relative_to(ensemble_run))


@pytest.mark.parametrize("argv, message", [(["--num_samples", "0"], "--num_samples"),
                                           (["--num_samples", "-2"], "--num_samples"),
                                           (["--save_samples"], "--save_samples needs --num_samples")])
def test_bad_ensemble_flags_are_refused_before_anything_is_written(checkpoint, tiny_demo_dir, tmp_path, capsys,
                                                                   caplog, argv, message):
    assert _sample(checkpoint, tiny_demo_dir / "pseudo_validation_gt", tmp_path / "out", *argv) == EXIT_FATAL
    assert message in capsys.readouterr().err + caplog.text
    assert not (tmp_path / "out").exists()


def test_sample_auto_writes_the_std_map_beside_the_completed_modality(tiny_demo_dir, tmp_path):
    data_dir = tmp_path / "pseudo_validation"
    shutil.copytree(tiny_demo_dir / "pseudo_validation", data_dir)
    missing = json.loads((data_dir / "missing_modalities.json").read_text())
    before = digest(data_dir)
    checkpoints = [f"--checkpoint={m}={_random_checkpoint(tmp_path / f'{m}.pt', m)}" for m in set(missing.values())]
    assert run_main("sample_auto", ["--data_dir", data_dir, *checkpoints, "--nfe", 2, "--sampler", "ddpm",
                                    "--num_samples", M]) == EXIT_OK
    out_dir = tmp_path / "pseudo_validation_completed"
    written = sorted(digest(out_dir))
    expected = [str(expected_path(Path(c), n)) for c, m in missing.items() for n in (m, f"{m}_std")]
    assert written == sorted([*expected, "completion_report.json"])
    for case_id, modality in missing.items():
        reference = nib.load(expected_path(data_dir / case_id, next(m for m in ("t1n", "t1c") if m != modality)))
        assert np.asarray(nib.load(expected_path(out_dir / case_id, modality)).dataobj).any()
        std = nib.load(expected_path(out_dir / case_id, f"{modality}_std"))
        assert std.shape == reference.shape and np.array_equal(std.affine, reference.affine)
        assert std.header["descrip"].tobytes().startswith(f"STD MAP of {M} SYNTHETIC {modality}".encode())
        assert np.asarray(std.dataobj).max() > 1e-3
    report = json.loads((out_dir / "completion_report.json").read_text())
    assert all(r["num_samples"] == M for r in report["completed"])
    assert digest(data_dir) == before


@pytest.mark.parametrize("mode, script", [("sample", "scripts/sample.py"), ("auto", "scripts/sample_auto.py")])
def test_run_sh_passes_num_samples_to_the_sampling_scripts(tmp_path, mode, script):
    from test_run_sh import REPO_ROOT, RUN_SH_VARIABLES, SEP, make_stub

    (tmp_path / "brats" / "case1").mkdir(parents=True)
    (tmp_path / "brats" / "case1" / "case1-t1n.nii.gz").write_bytes(b"")  # run.sh only looks for the names
    env = {k: v for k, v in os.environ.items() if k not in (*RUN_SH_VARIABLES, "NUM_SAMPLES")}
    env.update(PYTHON=str(make_stub(tmp_path / "python")), STUB_LOG=str(tmp_path / "calls.log"),
               DATA_DIR=str(tmp_path / "brats"))
    for how, extra_env in ((["--num_samples", "4"], {}), ([], {"NUM_SAMPLES": "4"})):
        (tmp_path / "calls.log").unlink(missing_ok=True)
        result = subprocess.run(["bash", str(REPO_ROOT / "run.sh"), "--mode", mode, "--preset", "fast", "--gpus", "1",
                                 *how], env={**env, **extra_env}, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        (call,) = [line.split(SEP) for line in (tmp_path / "calls.log").read_text().splitlines()]
        assert call[0] == script and call[call.index("--num_samples") + 1] == "4", call
    result = subprocess.run(["bash", str(REPO_ROOT / "run.sh"), "--mode", mode, "--num_samples"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--num_samples needs a value" in result.stderr
    assert "--num_samples M" in subprocess.run(["bash", str(REPO_ROOT / "run.sh"), "--help"], capture_output=True,
                                               text=True, timeout=60).stdout


def test_the_figure_draws_the_std_map_beside_the_error_on_the_error_scale(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib import colormaps
    from matplotlib.image import imread

    from guided_diffusion.figures import ERROR_VMAX, slice_figure

    truth = np.zeros((24, 24, 4), dtype=np.float32)  # no error: only the std panel can hold the colour
    std = truth.copy()
    std[4:20, 4:20] = 0.3
    colour = np.array(colormaps["magma"](0.3 / ERROR_VMAX)[:3])
    counts = []
    for uncertainty in (None, ("std (4 samples)", std)):
        path = slice_figure(tmp_path / f"{uncertainty is None}.png", [("truth", truth), ("synthesis", truth)],
                            error_pair=(0, 1), uncertainty=uncertainty)
        counts.append((np.abs(imread(path)[..., :3] - colour).max(axis=-1) < 0.02).sum())
    assert counts[0] < 200 < 1000 < counts[1], counts  # (the colour bars hold a sliver of it)


def test_the_ensemble_benchmark_runs_and_records_every_m(tmp_path):
    from benchmarks import bench_ensembles

    out = tmp_path / "ensembles.json"
    assert bench_ensembles.main(["--config", "tiny", "--device", "cpu", "--repeats", "1", "--warmup", "0",
                                 "--nfe", "2", "--num_samples", "1", "3", "--out", str(out)]) == 0
    entry = json.loads(out.read_text())["results"]["tiny/cpu"]
    assert set(entry["num_samples"]) == {"1", "3"} and entry["nfe"] == 2
    assert all(row["seconds_per_case"] > 0 for row in entry["num_samples"].values())
