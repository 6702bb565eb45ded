"""The layer rule of docs/architecture.md, checked on the source.

Every module of ``guided_diffusion`` and ``DWT_IDWT`` has a layer (the table below mirrors the
document). A module may import any module of a lower layer; inside its own layer only the
pairs listed in :data:`SAME_LAYER_IMPORTS`; never a higher layer. Imports are read with ``ast``
from the whole file, function-local ones included, so an import moved into a function to dodge
the rule is still caught. Each module must also import on its own, in a fresh interpreter.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("DWT_IDWT", "guided_diffusion")

LAYERS: dict[str, int] = {
    # 0: foundations, nothing from the package above them
    "DWT_IDWT": 0, "DWT_IDWT.haar": 0, "DWT_IDWT.subbands": 0,
    "guided_diffusion": 0, "guided_diffusion.constants": 0, "guided_diffusion.fileio": 0,
    "guided_diffusion.seeding": 0, "guided_diffusion.extras": 0, "guided_diffusion.runinfo": 0,
    "guided_diffusion.provenance": 0, "guided_diffusion.runlock": 0,
    # 1: data and building blocks
    "guided_diffusion.config": 1, "guided_diffusion.schedules": 1, "guided_diffusion.unet": 1,
    "guided_diffusion.conditioning": 1, "guided_diffusion.fats": 1, "guided_diffusion.backends": 1,
    # 2: diffusion math
    "guided_diffusion.diffusion": 2, "guided_diffusion.samplers": 2, "guided_diffusion.fats_search": 2,
    "guided_diffusion.timesteps": 2, "guided_diffusion.flow": 2,
    # 3: construction from configs
    "guided_diffusion.factory": 3,
    # 4: pipeline
    "guided_diffusion.checkpoints": 4, "guided_diffusion.synthesis": 4, "guided_diffusion.train_util": 4,
    "guided_diffusion.fats_training": 4, "guided_diffusion.bratsloader": 4, "guided_diffusion.metrics": 4,
    "guided_diffusion.demo_data": 4, "guided_diffusion.demo_data_v2": 4, "guided_diffusion.demo_floors": 4,
    "guided_diffusion.figures": 4, "guided_diffusion.presets": 4,
    "guided_diffusion.ensembles": 4,
    "guided_diffusion.volume_cache": 4, "guided_diffusion.case_runner": 4, "guided_diffusion.prob_metrics": 4,
    "guided_diffusion.segmentation": 4, "guided_diffusion.nnunet_export": 4,
    # 5: command line
    "guided_diffusion.cli": 5, "guided_diffusion.commands": 5,
}
"""Module -> layer. Every module of ``guided_diffusion.commands`` is layer 5 too."""

SAME_LAYER_IMPORTS: set[tuple[str, str]] = {
    ("DWT_IDWT", "DWT_IDWT.haar"), ("DWT_IDWT", "DWT_IDWT.subbands"), ("DWT_IDWT.subbands", "DWT_IDWT.haar"),
    ("guided_diffusion.unet", "guided_diffusion.config"),
    ("guided_diffusion.samplers", "guided_diffusion.diffusion"),
    ("guided_diffusion.flow", "guided_diffusion.diffusion"),
    ("guided_diffusion.samplers", "guided_diffusion.flow"),
    ("guided_diffusion.timesteps", "guided_diffusion.flow"),
    ("guided_diffusion.fats_search", "guided_diffusion.diffusion"),
    ("guided_diffusion.fats_search", "guided_diffusion.samplers"),
    ("guided_diffusion.fats_search", "guided_diffusion.timesteps"),
    ("guided_diffusion.synthesis", "guided_diffusion.checkpoints"),
    ("guided_diffusion.train_util", "guided_diffusion.checkpoints"),
    ("guided_diffusion.fats_training", "guided_diffusion.checkpoints"),
    ("guided_diffusion.demo_data", "guided_diffusion.bratsloader"),
    ("guided_diffusion.demo_data_v2", "guided_diffusion.demo_data"),
    ("guided_diffusion.demo_data_v2", "guided_diffusion.bratsloader"),
    ("guided_diffusion.demo_floors", "guided_diffusion.demo_data_v2"),
    ("guided_diffusion.demo_floors", "guided_diffusion.demo_data"),
    ("guided_diffusion.demo_floors", "guided_diffusion.bratsloader"),
    ("guided_diffusion.volume_cache", "guided_diffusion.bratsloader"),
    ("guided_diffusion.case_runner", "guided_diffusion.bratsloader"),
    ("guided_diffusion.segmentation", "guided_diffusion.bratsloader"),
    ("guided_diffusion.segmentation", "guided_diffusion.checkpoints"),
    ("guided_diffusion.nnunet_export", "guided_diffusion.bratsloader"),
    ("guided_diffusion.ensembles", "guided_diffusion.synthesis"),
    ("guided_diffusion.ensembles", "guided_diffusion.checkpoints"),
    ("guided_diffusion.ensembles", "guided_diffusion.bratsloader"),
}
"""(importer, imported) pairs allowed inside one layer; besides these, a command may use ``cli``
and the ``guided_diffusion`` package itself (``from guided_diffusion import cli``)."""


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def layer_of(module: str) -> int:
    if module.startswith("guided_diffusion.commands."):
        return LAYERS["guided_diffusion.commands"]
    if module not in LAYERS:
        raise KeyError(f"{module} has no layer: add it to LAYERS in tests/test_layering.py and to "
                       "docs/architecture.md")
    return LAYERS[module]


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``path`` imports anywhere in the file (top level or inside functions)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            # "import a.b.c" also imports a and a.b; take the deepest known module it names
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def is_allowed(importer: str, imported: str) -> bool:
    low, high = layer_of(imported), layer_of(importer)
    if low < high:
        return True
    if low > high:
        return False
    if importer.startswith("guided_diffusion.commands") and imported in (
            "guided_diffusion.cli", "guided_diffusion.commands"):
        return True
    return (importer, imported) in SAME_LAYER_IMPORTS


def layer_violations(files: dict[str, Path]) -> list[str]:
    known = set(files)
    problems = []
    for module, path in files.items():
        for imported in sorted(imported_modules(module, path, known)):
            if not is_allowed(module, imported):
                problems.append(f"{path.name}: {module} (layer {layer_of(module)}) imports "
                                f"{imported} (layer {layer_of(imported)})")
    return problems


def test_every_module_has_a_layer():
    missing = [m for m in module_files() if not m.startswith("guided_diffusion.commands.") and m not in LAYERS]
    assert not missing, f"modules without a layer (add them to LAYERS and docs/architecture.md): {missing}"
    stale = sorted(set(LAYERS) - set(module_files()))
    assert not stale, f"LAYERS names modules that no longer exist: {stale}"


def test_no_module_imports_a_higher_layer_or_an_unlisted_same_layer_module():
    assert layer_violations(module_files()) == []


def test_a_planted_violation_is_caught(tmp_path):
    """The check itself: a function-local import of the factory from config (layer 1 -> 3) fails."""
    files = module_files()
    planted = tmp_path / "config.py"
    planted.write_text(files["guided_diffusion.config"].read_text()
                       + "\n\ndef build():\n    from .factory import build_model\n    return build_model\n")
    files["guided_diffusion.config"] = planted
    problems = layer_violations(files)
    assert len(problems) == 1 and "guided_diffusion.config (layer 1) imports guided_diffusion.factory (layer 3)" \
        in problems[0]


def test_the_layer_table_matches_docs_architecture():
    """Every module named in the table appears in docs/architecture.md with the same layer."""
    doc = (REPO / "docs" / "architecture.md").read_text()
    rows = {}
    for line in doc.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].isdigit():
            for name in cells[1].replace("`", "").split(","):
                if name.strip():
                    rows[name.strip()] = int(cells[0])
    expected = {m.removeprefix("guided_diffusion."): layer for m, layer in LAYERS.items()
                if m not in ("guided_diffusion", "DWT_IDWT.haar", "DWT_IDWT.subbands")}
    assert rows == expected


def test_every_module_imports_on_its_own():
    """A fresh interpreter imports each module with the package modules cleared before each,
    so no module works only because another one happened to be imported first."""
    modules = sorted(module_files())
    script = (
        "import importlib, json, sys, traceback\n"
        "failures = {}\n"
        f"for name in {modules!r}:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] in ('guided_diffusion', 'DWT_IDWT')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except BaseException:\n"
        "        failures[name] = traceback.format_exc(limit=-3)\n"
        "print(json.dumps(failures))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert failures == {}, "\n".join(f"{name}:\n{tb}" for name, tb in failures.items())


@pytest.mark.parametrize("module", ["guided_diffusion.schedules", "guided_diffusion.config"])
def test_low_layers_stay_free_of_the_research_code(module):
    """The two modules the import circle ran through import only layer-0 modules."""
    files = module_files()
    imported = imported_modules(module, files[module], set(files))
    assert all(layer_of(m) == 0 for m in imported), imported
