r"""Mutation testing of the core modules: plant one plausible bug at a time, see if the tests notice.

    python tools/mutation/harness.py            # every mutant of tools/mutation/mutants.py
    python tools/mutation/harness.py --quick    # the fast subset (also run by tests/test_mutation.py)
    python tools/mutation/harness.py --only ddim_eta_sign --keep

The repository is copied once to a scratch folder (never touching the working tree); each mutant
replaces one exact snippet of one file there, runs only the tests mapped to it
(``pytest -x -q`` with a timeout) and restores the file. A mutant is *killed* when those tests
fail, *survived* when they pass, *stale* when its snippet is not found exactly once (the code
moved on: an error of the mutant list, never a pass). Mutants marked equivalent (no behaviour
change is possible) are run too but left out of the score. Before the mutants, the mapped tests
must pass on the unmutated copy, and the copy must import its own ``guided_diffusion``.

Writes ``benchmarks/results/mutation.json`` (``--out``): score = killed / (killed + survived),
the survivors and stale mutants by name, the equivalent ones with their reasons, the command and
the seconds. Exit code 0 when the score reaches ``--min_score`` and no mutant is stale, else 1.

Why not mutmut: it mutates every operator of every file and re-runs the test command per mutant;
with torch imports (~2 s per process) on a 2-core machine that is hours, and its mutants are
mostly syntactic noise. Thirty-odd hand-written mutants, each the kind of bug the issue names,
run in a few minutes.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from guided_diffusion.fileio import save_json  # noqa: E402
from mutants import MUTANTS, Mutant  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "mutation.json"  # the committed report
LOCAL_OUT = REPO_ROOT / "benchmarks" / "results" / "local" / "mutation.json"  # a run's default (git-ignored)
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "*.egg-info", "runs",
                                     "demo_data", "demo_runs", "outputs", "results")
KILLED, SURVIVED, STALE = "killed", "survived", "stale"


def apply(mutant: Mutant, root: Path) -> str | None:
    """Write ``mutant`` into ``root``'s copy of its file; returns the original text, or None when
    the snippet does not occur exactly once (stale)."""
    path = root / mutant.file
    if not path.is_file():
        return None
    text = path.read_text()
    if text.count(mutant.original) != 1:
        return None
    path.write_text(text.replace(mutant.original, mutant.replacement))
    return text


def run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, float, str]:
    """``pytest -x -q tests`` in ``root`` (its own code first on the path): (exit code, seconds, tail).
    A timeout counts as exit code 124."""
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("FASTCWDM_GOLDEN_DIR", None)  # the copy's shipped golden data
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired:
        code, output = 124, f"timed out after {timeout} s"
    return code, time.perf_counter() - start, output[-2000:]


def check_copy_imports_itself(root: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", "import guided_diffusion, DWT_IDWT; "
                          "print(guided_diffusion.__file__); print(DWT_IDWT.__file__)"],
                         cwd=root, env=env, capture_output=True, text=True, check=True).stdout.split()
    if not all(Path(p).resolve().is_relative_to(root.resolve()) for p in out):
        raise RuntimeError(f"tools/mutation/harness.py: the scratch copy imports {out}, not its own code")


def run(mutants: list[Mutant], *, timeout: float, keep: bool = False, command: str = "", log=None) -> dict:
    """Run ``mutants`` against a scratch copy of the repository; returns the report dict."""
    log = log or (lambda message: print(message, flush=True))
    start = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="fastcwdm-mutation-"))
    root = scratch / "repo"
    shutil.copytree(REPO_ROOT, root, ignore=COPY_IGNORE)
    try:
        check_copy_imports_itself(root)
        all_tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
        code, seconds, tail = run_tests(root, all_tests, timeout)
        if code != 0:
            raise RuntimeError(f"tools/mutation/harness.py: the mapped tests fail without any mutant "
                               f"(exit {code}):\n{tail}")
        log(f"baseline: {len(all_tests)} test targets pass on the unmutated copy ({seconds:.0f} s)")
        records = []
        for mutant in mutants:
            original = apply(mutant, root)
            if original is None:
                records.append({"name": mutant.name, "status": STALE, "file": mutant.file, "seconds": 0.0})
                log(f"STALE     {mutant.name}: snippet not found exactly once in {mutant.file}")
                continue
            try:
                code, seconds, tail = run_tests(root, mutant.tests, timeout)
            finally:
                (root / mutant.file).write_text(original)
            status = KILLED if code != 0 else SURVIVED
            records.append({"name": mutant.name, "status": status, "file": mutant.file, "exit_code": code,
                            "seconds": round(seconds, 1)})
            log(f"{status.upper():<9} {mutant.name} ({seconds:.0f} s)")
    finally:
        if keep:
            log(f"scratch copy kept at {root}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return report(mutants, records, time.perf_counter() - start, command)


def report(mutants: list[Mutant], records: list[dict], seconds: float, command: str = "") -> dict:
    by_name = {m.name: m for m in mutants}
    scored = [r for r in records if not by_name[r["name"]].equivalent and r["status"] != STALE]
    killed = [r["name"] for r in scored if r["status"] == KILLED]
    survived = [r["name"] for r in scored if r["status"] == SURVIVED]
    return {
        "command": command,
        "seconds": round(seconds, 1),
        "mutants": len(records),
        "score": round(len(killed) / len(scored), 4) if scored else None,
        "killed": killed,
        "survived": [{"name": n, "file": by_name[n].file, "description": by_name[n].description} for n in survived],
        "stale": [r["name"] for r in records if r["status"] == STALE],
        "equivalent": [{"name": r["name"], "outcome": r["status"], "reason": by_name[r["name"]].equivalent}
                       for r in records if by_name[r["name"]].equivalent],
        "results": [{**r, "description": by_name[r["name"]].description, "tests": list(by_name[r["name"]].tests)}
                    for r in records],
    }


def select(quick: bool, only: list[str] | None) -> list[Mutant]:
    names = {m.name for m in MUTANTS}
    unknown = sorted(set(only or ()) - names)
    if unknown:
        raise SystemExit(f"tools/mutation/harness.py: unknown mutants {unknown}")
    if only:
        return [m for m in MUTANTS if m.name in only]
    return [m for m in MUTANTS if m.quick] if quick else list(MUTANTS)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only the fast subset (mutants marked quick)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="only these mutants")
    p.add_argument("--out", type=Path, default=None,
                   help=f"report JSON (default {LOCAL_OUT}, git-ignored; --update_results: the committed {DEFAULT_OUT})")
    p.add_argument("--update_results", action="store_true", help=f"write the committed {DEFAULT_OUT}")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per test run (a timeout kills)")
    p.add_argument("--min_score", type=float, default=0.9, help="exit 1 below this score")
    p.add_argument("--keep", action="store_true", help="keep the scratch copy (its path is printed)")
    args = p.parse_args(argv)
    command = " ".join(["python", "tools/mutation/harness.py", *(sys.argv[1:] if argv is None else argv)])
    result = run(select(args.quick, args.only), timeout=args.timeout, keep=args.keep, command=command)
    out = args.out or (DEFAULT_OUT if args.update_results else LOCAL_OUT)
    save_json(result, out)
    print(f"score {result['score']}: {len(result['killed'])} killed, {len(result['survived'])} survived "
          f"{[s['name'] for s in result['survived']]}, {len(result['stale'])} stale {result['stale']}, "
          f"{len(result['equivalent'])} equivalent; {result['seconds']:.0f} s -> {out}")
    ok = not result["stale"] and result["score"] is not None and result["score"] >= args.min_score
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
