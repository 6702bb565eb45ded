"""Issue 14, points 3, 9 and 12: the files around the code.

environment.yml installs today: conda-forge only (no `pytorch` / `nvidia` channels, no
`pytorch-cuda`, `nodefaults` so the defaults channel cannot mix in), a CUDA build of PyTorch, and
the runtime packages of pyproject.toml with the same lower bounds. The licence is stated (LICENSE
agrees with pyproject.toml and names cWDM's). Patient data under data/ is never committed by
accident (.gitignore)."""
from __future__ import annotations

import re
import shutil
import subprocess
import tomllib

import pytest

import yaml

from conftest import REPO_ROOT

CONDA_NAMES = {"torch": "pytorch"}  # PyPI name -> conda-forge name where they differ


def requirement(text: str) -> tuple[str, str]:
    """'numpy>=1.24  # comment' -> ('numpy', '>=1.24'); conda's 'numpy >=1.24' alike."""
    match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*((?:[<>=!~]=?|=)\s*[^\s,;]+)?.*", text)
    assert match, text
    return match.group(1).lower().replace("-", "_"), (match.group(2) or "").replace(" ", "")


def test_environment_file_uses_conda_forge_only_with_a_cuda_pytorch():
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge", "nodefaults"]
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    assert not [d for d in conda if "::" in d or d.startswith("pytorch-cuda") or d.startswith("cudatoolkit")]
    torch_spec = next(d for d in conda if requirement(d)[0] == "pytorch")
    assert torch_spec.split()[-1] == "cuda*"  # a CUDA build of conda-forge's pytorch
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip == ["-e .[test]"] and "pip" in conda


def test_environment_file_lists_pyproject_dependencies_with_their_bounds():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    wanted = dict(requirement(r) for r in project["dependencies"])
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    have = dict(requirement(d) for d in env["dependencies"] if isinstance(d, str))
    for name, bound in wanted.items():
        conda_name = CONDA_NAMES.get(name, name)
        assert conda_name in have, f"environment.yml lacks {conda_name} (pyproject.toml: {name}{bound})"
        assert have[conda_name] == bound, f"{conda_name}: environment.yml {have[conda_name]}, pyproject.toml {bound}"
    assert set(have) - {CONDA_NAMES.get(n, n) for n in wanted} == {"python", "pip"}  # nothing unlisted


def test_licence_file_matches_pyproject_and_names_cwdm():
    licence = (REPO_ROOT / "LICENSE").read_text()
    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["license"]["text"]
    assert declared == "MIT" and licence.startswith("MIT License")
    assert "github.com/pfriedri/cwdm" in licence  # the code it derives from, and its licence


@pytest.mark.skipif(shutil.which("git") is None or not (REPO_ROOT / ".git").exists(),
                    reason="needs git and a git checkout to ask what is ignored")
def test_data_folder_is_ignored_by_git():
    for path in ("data/BraTS/training/BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz",
                 "data/BRATS/validation/case/case-seg.nii.gz"):
        result = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO_ROOT)
        assert result.returncode == 0, f"{path} would not be ignored by git"
