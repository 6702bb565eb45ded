"""The mutation harness (tools/mutation/): its fast subset runs here; the full run is
``python tools/mutation/harness.py`` (docs/mutation.md)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

HARNESS_DIR = Path(__file__).resolve().parents[1] / "tools" / "mutation"
sys.path.insert(0, str(HARNESS_DIR))

import harness  # noqa: E402
from mutants import MUTANTS, Mutant  # noqa: E402


def test_every_mutant_applies_to_exactly_one_place_of_the_current_code():
    root = harness.REPO_ROOT
    stale = [m.name for m in MUTANTS if (root / m.file).read_text().count(m.original) != 1]
    assert not stale, f"tools/mutation/mutants.py: snippets not found exactly once: {stale}"
    assert len({m.name for m in MUTANTS}) == len(MUTANTS)
    assert all(m.original != m.replacement and m.tests for m in MUTANTS)


def test_a_mutant_whose_snippet_is_gone_is_stale_not_a_pass(tmp_path):
    (tmp_path / "mod.py").write_text("x = 1\ny = 1\n")
    assert harness.apply(Mutant("gone", "mod.py", "z = 1", "z = 2", "", ("t",)), tmp_path) is None
    assert harness.apply(Mutant("twice", "mod.py", " = 1", " = 2", "", ("t",)), tmp_path) is None
    assert harness.apply(Mutant("once", "mod.py", "y = 1", "y = 3", "", ("t",)), tmp_path) == "x = 1\ny = 1\n"
    assert (tmp_path / "mod.py").read_text() == "x = 1\ny = 3\n"
    records = [{"name": "a", "status": "killed"}, {"name": "b", "status": "survived"},
               {"name": "c", "status": "stale"}, {"name": "d", "status": "survived"}]
    mutants = [Mutant(n, "f.py", "o", "r", n, ("t",), equivalent="same bits" if n == "d" else "") for n in "abcd"]
    report = harness.report(mutants, records, 1.0)
    assert report["score"] == 0.5 and report["stale"] == ["c"]  # d is equivalent: out of the score
    assert [s["name"] for s in report["survived"]] == ["b"] and report["equivalent"][0]["name"] == "d"


@pytest.mark.slow
def test_the_quick_subset_is_killed(tmp_path):
    out = tmp_path / "mutation.json"
    assert harness.main(["--quick", "--out", str(out), "--timeout", "240"]) == 0
    result = json.loads(out.read_text())
    assert result["score"] == 1.0 and not result["stale"] and not result["survived"]
    assert len(result["killed"]) == sum(m.quick for m in MUTANTS) >= 5
