"""The command line: scripts that run from anywhere, console entry points, renamed flags that
keep working, optional extras and the declared dependencies."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import numpy as np
import pytest

from fixtures_data import REPO_ROOT, script

SCRIPTS = sorted(p for p in (REPO_ROOT / "scripts").glob("*.py") if not p.name.startswith("_"))
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def without_the_project(tmp_path: Path) -> tuple[dict[str, str], list[str]]:
    """(environment, interpreter flags) in which the dependencies import but the project does not:
    no site processing (so no editable-install hook), only site-packages on PYTHONPATH."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    return env, ["-S"]


def test_every_script_runs_from_another_folder_without_install_or_pythonpath(tmp_path):
    env, flags = without_the_project(tmp_path)
    probe = subprocess.run([sys.executable, *flags, "-c", "import guided_diffusion"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'guided_diffusion'" in probe.stderr  # the premise
    assert len(SCRIPTS) == len(PYPROJECT["project"]["scripts"]) >= 7  # every command found (no stale count)
    for path in SCRIPTS:
        result = subprocess.run([sys.executable, *flags, str(path), "--help"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{path.name}: {result.stderr[-2000:]}"
        assert result.stdout.startswith("usage:") and "--verbose" in result.stdout, path.name


def test_console_entry_points_and_scripts_call_the_same_run_functions():
    entry_points = PYPROJECT["project"]["scripts"]
    for path in SCRIPTS:
        name = path.stem
        target = f"guided_diffusion.commands.{name}:run"
        assert entry_points.pop(f"fast-cwdm-{name.replace('_', '-')}") == target
        imports = [node for node in ast.parse(path.read_text()).body if isinstance(node, ast.ImportFrom)]
        assert [(i.module, [a.name for a in i.names]) for i in imports] == [(f"guided_diffusion.commands.{name}",
                                                                            ["run"])]
        assert callable(script(name).run) and callable(script(name).main)
    assert entry_points == {}, "entry points without a script"


@pytest.mark.parametrize("name, old, new", [
    ("sample", ["--contr", "t1c", "--steps", "3"], ["--target", "t1c", "--nfe", "3"]),
    ("sample", ["--contr=t2w", "--steps=0"], ["--target=t2w", "--nfe=0"]),
])
def test_old_flag_spellings_mean_the_new_ones_with_a_note(name, old, new, capsys):
    common = ["--checkpoint", "m.pt", "--data_dir", "d", "--out_dir", "o"]
    args_old = script(name).parse_args([*common, *old])
    notes = capsys.readouterr().err
    args_new = script(name).parse_args([*common, *new])
    assert vars(args_old) == vars(args_new)
    assert "--contr is deprecated, use --target" in notes and "--steps is deprecated, use --nfe" in notes
    assert capsys.readouterr().err == ""  # the new spellings say nothing


def test_nfe_sets_the_sample_config_step_budget():
    from guided_diffusion import cli
    from guided_diffusion.config import SampleConfig

    args = script("sample").parse_args(["--checkpoint", "m.pt", "--data_dir", "d", "--out_dir", "o", "--target",
                                        "t1n", "--steps", "7"])
    assert cli.sample_config_from_args(args, SampleConfig(nfe=0)).nfe == 7


@pytest.mark.parametrize("name, argv, field, value", [
    ("train", ["--data_dir", "d", "--contr", "all"], "target", "all"),
    ("sample_auto", ["--data_dir", "d", "--model", "t1c=a.pt", "--model", "t2f=b.pt"], "checkpoint",
     ["t1c=a.pt", "t2f=b.pt"]),
    ("fats_stats", ["--data_dir", "d", "--out", "o.json", "--contr", "t2w"], "target", "t2w"),
    ("fats_fit_steps", ["--checkpoint", "c", "--data_dir", "d", "--out", "o", "--contr", "t1n"], "target", "t1n"),
    ("fats_fit_steps", ["--checkpoint", "c", "--data_dir", "d", "--out", "o", "--target", "t1n", "--k", "1", "3"],
     "nfe", [1, 3]),
    ("fats_fit_steps", ["--checkpoint", "c", "--data_dir", "d", "--out", "o", "--target", "t1n", "--default_k", "3"],
     "default_nfe", 3),
])
def test_every_command_accepts_its_old_spellings(name, argv, field, value, capsys):
    assert getattr(script(name).parse_args(argv), field) == value
    assert "is deprecated" in capsys.readouterr().err


def test_run_sh_old_names_choose_the_same_preset_target_and_nfe(tmp_path):
    """run.sh --model/--contr/--steps reach sample.py as --target/--nfe with the preset's run folder."""
    env = {k: v for k, v in os.environ.items() if k not in ("PRESET", "MODEL", "TARGET", "CONTR", "NFE", "STEPS")}
    result = subprocess.run(["bash", str(REPO_ROOT / "run.sh"), "--mode", "sample", "--model", "tiny", "--contr",
                             "t1c", "--steps", "1", "--data_dir", str(tmp_path / "none")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    for old, new in (("--model", "--preset"), ("--contr", "--target"), ("--steps", "--nfe")):
        assert f"{old} is deprecated, use {new}" in result.stderr
    assert "runs/tiny/t1c/best.pt" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------- optional extras
def extra_requirements(extra: str) -> str:
    return " ".join(PYPROJECT["project"]["optional-dependencies"][extra])


def test_figures_without_matplotlib_name_the_figures_extra(tmp_path, monkeypatch, caplog):
    from guided_diffusion.extras import MissingExtraError
    from guided_diffusion.figures import slice_figure

    assert "matplotlib" in extra_requirements("figures")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # "import matplotlib" now fails as if absent
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(MissingExtraError, match=re.escape("fast-cwdm[figures]")):
        slice_figure(tmp_path / "f.png", [("x", np.zeros((4, 4, 4)))])
    assert script("sample").write_figure(tmp_path / "f.png", "c", np.zeros((4, 4, 4, 4)), np.zeros((4, 4, 4)),
                                         "t2f", 2) is None
    assert not (tmp_path / "f.png").exists()
    assert "fast-cwdm[figures]" in caplog.text


def test_demo_data_without_nilearn_names_the_demo_extra(monkeypatch):
    from guided_diffusion import cli
    from guided_diffusion.extras import import_extra

    assert "nilearn" in extra_requirements("demo")
    monkeypatch.setitem(sys.modules, "nilearn", None)
    with pytest.raises(SystemExit) as exit_info:
        cli.main_guard(lambda: import_extra("nilearn.datasets", "demo", "building the demo dataset"))
    assert exit_info.value.code == cli.EXIT_FATAL


def test_a_missing_submodule_of_an_installed_package_is_not_blamed_on_the_extra():
    from guided_diffusion.extras import MissingExtraError, import_extra

    with pytest.raises(ModuleNotFoundError) as err:
        import_extra("numpy.no_such_module", "demo", "x")
    assert not isinstance(err.value, MissingExtraError)


# --------------------------------------------------------------------------- declared dependencies
IMPORTED_AS = {"PyWavelets": "pywt", "scikit-image": "skimage", "tensorboard": "torch.utils.tensorboard"}


def imported_modules(folders: list[str]) -> set[str]:
    """Every module named in an ``import`` / ``from ... import`` statement of the .py files."""
    names = set()
    for folder in folders:
        for path in (REPO_ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module)
    return names


def is_imported(module: str, imported: set[str]) -> bool:
    return any(name == module or name.startswith(module + ".") for name in imported)


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=\[ ;]", requirement, maxsplit=1)[0]


def test_every_core_dependency_is_imported_and_the_extras_only_through_import_extra():
    imported = imported_modules(["guided_diffusion", "DWT_IDWT"])
    core = [requirement_name(r) for r in PYPROJECT["project"]["dependencies"]]
    assert "blobfile" not in core
    for dist in core:
        assert is_imported(IMPORTED_AS.get(dist, dist), imported), f"{dist} is declared but never imported"
    for extra in ("demo", "figures"):
        for dist in map(requirement_name, PYPROJECT["project"]["optional-dependencies"][extra]):
            assert dist not in core
            assert not is_imported(IMPORTED_AS.get(dist, dist), imported), \
                f"{dist} ({extra} extra) is imported directly; use guided_diffusion.extras.import_extra"
