"""Running a benchmark as the README says never overwrites the committed results (issue 14, 12)."""
from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from benchmarks.common import LOCAL_RESULTS_DIR, RESULTS_DIR, add_output_arguments, output_path

REPO = Path(__file__).resolve().parents[1]


def parse(argv):
    parser = argparse.ArgumentParser()
    add_output_arguments(parser, "x.json")
    return parser.parse_args(argv)


def test_default_is_a_local_git_ignored_file():
    path = output_path(parse([]), "x.json")
    assert path == LOCAL_RESULTS_DIR / "x.json" and path.parent != RESULTS_DIR
    ignored = subprocess.run(["git", "check-ignore", "-q", str(path.relative_to(REPO))], cwd=REPO)
    assert ignored.returncode == 0, f"{path} is not git-ignored"


def test_update_results_and_out():
    assert output_path(parse(["--update_results"]), "x.json") == RESULTS_DIR / "x.json"
    assert output_path(parse(["--out", "/tmp/y.json"]), "x.json") == Path("/tmp/y.json")
