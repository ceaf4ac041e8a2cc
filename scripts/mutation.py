"""Mutation testing by a tool (mutmut), one module at a time: ``make mutants MODULE=hdkd/evidence/stats.py``.

mutmut copies hdkd/ (and pyproject.toml's ``[tool.mutmut] also_copy``) into ``mutants/`` (git-ignored), mutates
the module's functions there and runs, for each mutant, those of the module's fast tests (``TESTS``: its own
and its users') that call the mutated function, fastest first (tests/helpers/fast_first.py); a failing test kills
it. Every mutant of the module is tested afresh on each run (``--resume`` goes on with a run that was stopped).
Prints the score, killed / (mutants - equivalent), and the survivors (``.venv/bin/mutmut show
<name>`` gives one's diff, from the repository root), and writes the module's row of tests/mutation-scores.md,
whose "Equivalent" list (one ``- `name`: why`` line each) names the survivors no test can kill.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCORES = ROOT / "tests" / "mutation-scores.md"

# The fast tests that can kill each module's mutants: its own tests and its users' (a bug shows where it is used).
TESTS = {
    "hdkd/evidence/stats.py": ["tests/unit/evidence/test_stats.py", "tests/unit/evidence/test_aggregate.py"],
    "hdkd/evidence/aggregate.py": ["tests/unit/evidence/test_aggregate.py", "tests/unit/report/test_model_card.py"],
    "hdkd/evaluation/metrics.py": ["tests/unit/evaluation/test_metrics.py"],
    "hdkd/data/splits.py": ["tests/unit/data/test_splits.py", "tests/unit/data/test_prepare.py"],
    "hdkd/evidence/bundle.py": ["tests/unit/evidence/test_bundle.py"],
    "hdkd/infra/provenance.py": ["tests/unit/infra/test_tracking.py", "tests/unit/report/test_revisions.py"],
    "hdkd/config.py": ["tests/unit/test_config.py", "tests/unit/test_params_bounds.py"],
    "hdkd/data/balance.py": ["tests/unit/data/test_balance.py"],
    "hdkd/data/prepare.py": ["tests/unit/data/test_prepare.py", "tests/unit/data/test_copies.py"],
    "hdkd/report/tables.py": ["tests/unit/report/test_build.py", "tests/unit/report/test_diagnostics.py"],
    # The engine's own tests: test_run.py and test_kd.py train whole runs, 70 s for each mutant that survives them
    # (over 5 h for the engine's 814 on 2 cores); run.py's mutants go through them.
    "hdkd/training/engine.py": ["tests/unit/training/test_properties.py", "tests/unit/training/test_losses.py"],
    "hdkd/training/run.py": ["tests/unit/training/test_run.py", "tests/unit/training/test_properties.py",
                             "tests/unit/training/test_stage.py", "tests/unit/training/test_stage_contract.py",
                             "tests/unit/training/test_kd.py"],
    "hdkd/training/stage.py": ["tests/unit/training/test_stage.py"],
    "hdkd/training/local_executor.py": ["tests/unit/training/test_stage.py",
                                        "tests/unit/training/test_stage_contract.py"],
    "hdkd/training/ray_executor.py": ["tests/unit/training/test_ray_executor.py"],
    "hdkd/use/predict.py": ["tests/unit/use/test_predict.py"],
    "hdkd/use/inference.py": ["tests/unit/use/test_predict.py", "tests/unit/use/test_export.py"],
}
KILLED = ("killed", "timeout", "segfault")  # a test failed, hung or crashed
HEADER = ("| Module | Mutants | Equivalent | Killed, first run | Killed | Score | Wall time (2 cores) |\n"
          "|---|---:|---:|---:|---:|---:|---:|\n")


def tests_of(module: str) -> list[str]:
    """``TESTS[module]``, and the module's contract tests (tests/unit/<wing>/test_<name>_contract.py) if any."""
    name = Path(module).stem
    contract = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob(f"test_{name}_contract.py"))
    return list(dict.fromkeys([t for t in TESTS[module] if (ROOT / t).is_file()] + contract))


def equivalent() -> set[str]:
    text = SCORES.read_text() if SCORES.is_file() else ""
    return set(re.findall(r"^- `([^`]+__mutmut_\d+)`", text, re.M))


def run(module: str, jobs: int, only: list[str] | None = None, resume: bool = False) -> dict[str, str]:
    """Every mutant of ``module`` (or those named in ``only``), tested; its status by name. ``resume``: keep the
    results of an interrupted full run (mutmut tests only the mutants without one)."""
    os.chdir(ROOT)
    if only is None and not resume:  # a fresh copy of hdkd/: mutmut would keep an earlier run's copy of the module
        shutil.rmtree(ROOT / "mutants" / "hdkd", ignore_errors=True)
    if not resume:
        # Fresh coverage: mutmut reuses its cached map of which test calls which function for every test it has
        # seen, so a module whose tests an earlier module's run listed would find none of them, and a test changed
        # since the full run (a --survivors run) would keep the functions it called then.
        (ROOT / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    (ROOT / "mutants").mkdir(exist_ok=True)
    (ROOT / "mutants" / ".gitignore").write_text("*\n")  # git, ruff and the IDEs leave the copy alone
    import mutmut.__main__ as mm
    from mutmut.configuration import config
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.stats import status_by_exit_code

    cfg = config()
    cfg.only_mutate = [module]
    cfg.pytest_add_cli_args_test_selection = tests_of(module)
    cfg.pytest_add_cli_args = [*cfg.pytest_add_cli_args, "-p", "tests.helpers.fast_first"]
    prefix = module.removesuffix(".py").replace("/", ".")
    try:
        mm._run(only or [f"{prefix}.x*"], jobs)
    except SystemExit as e:  # mutmut exits 0 after printing the per-mutant results
        if e.code:
            sys.exit(f"mutmut failed (exit {e.code}); do the tests pass unmutated? "
                     f".venv/bin/python -m pytest {' '.join(tests_of(module))}")
    data = SourceFileMutationData(path=Path(module))
    data.load()
    return {k: status_by_exit_code[v] for k, v in data.exit_code_by_key.items() if only is None or k in only}


def state_file(module: str, kind: str) -> Path:
    """``mutants/<module>.<kind>.json``: ``last``, the last full run's statuses; ``wall``, its wall time so far."""
    return ROOT / "mutants" / f"{module.replace('/', '.')}.{kind}.json"


def full_run_clock(module: str, source: str, resume: bool) -> Callable[[], float]:
    """The wall time of the module's full run so far, an interrupted run's included when ``resume``; kept in
    ``mutants/<module>.wall.json`` every 10 s, so that a run killed midway still counts what it spent."""
    path = state_file(module, "wall")
    before = json.loads(path.read_text()) if resume and path.is_file() else {}
    if resume and before.get("source") != source:
        sys.exit(f"--resume: no interrupted full run of {module} as it is now: run it without --resume")
    start, spent = time.monotonic(), before.get("wall", 0.0)

    def clock() -> float:
        return spent + time.monotonic() - start

    def keep() -> None:
        while True:
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps({"source": source, "wall": clock()}))
            time.sleep(10)

    threading.Thread(target=keep, daemon=True).start()
    return clock


def write_row(module: str, total: int, n_equivalent: int, killed: int, first_killed: int, wall: float) -> str:
    """The module's row of tests/mutation-scores.md, written; an existing row keeps its first run's kills."""
    text = SCORES.read_text() if SCORES.is_file() else "# Mutation scores\n\n" + HEADER
    rows = dict(re.findall(r"^\| `([^`]+)` (\|.*)$", text, re.M))
    first = rows[module].split("|")[3].strip() if module in rows else str(first_killed)
    score = 100 * killed / max(1, total - n_equivalent)
    row = (f"| `{module}` | {total} | {n_equivalent} | {first} | {killed} | {score:.1f} % | "
           f"{wall / 60:.1f} min |")
    if module in rows:
        text = re.sub(rf"^\| `{re.escape(module)}` \|.*$", lambda _: row, text, flags=re.M)
    else:
        text = text.replace(HEADER, HEADER + row + "\n", 1)
    SCORES.write_text(text)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("module", choices=sorted(TESTS), metavar="MODULE", help="e.g. hdkd/evidence/stats.py")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="mutants tested at once")
    parser.add_argument("--no-write", action="store_true", help="print the score only")
    parser.add_argument("--survivors", action="store_true",
                        help="retest only the survivors of the last full run (the module unchanged; tests added)")
    parser.add_argument("--resume", action="store_true",
                        help="go on with an interrupted full run (the module and its tests unchanged)")
    args = parser.parse_args(argv)

    source = hashlib.sha256((ROOT / args.module).read_bytes()).hexdigest()
    last = state_file(args.module, "last")
    previous = json.loads(last.read_text()) if last.is_file() else None
    if args.survivors and args.resume:
        parser.error("--survivors follows a finished full run, --resume an interrupted one")
    if args.survivors and (previous is None or previous["source"] != source):
        sys.exit(f"--survivors: no full run of {args.module} as it is now: run it without --survivors")
    copy = ROOT / "mutants" / args.module
    if args.survivors and (not copy.is_file() or "__mutmut_" not in copy.read_text()):
        # A later full run of another module replaced mutants/hdkd: its copy of this one holds no mutant, and every
        # survivor would "survive" again, tested unmutated.
        sys.exit(f"--survivors: mutants/ holds another module's run, not {args.module}'s: run it without "
                 "--survivors")
    start = time.monotonic()
    if args.survivors:
        status = dict(previous["status"])
        status |= run(args.module, args.jobs, [k for k, s in status.items() if s not in KILLED])
        wall = previous["wall"]  # the row keeps the full run's time
    else:
        clock = full_run_clock(args.module, source, args.resume)
        status = run(args.module, args.jobs, resume=args.resume)
        wall = clock()
    last.write_text(json.dumps({"source": source, "wall": wall, "status": status}))
    eq = equivalent()
    killed = sorted(k for k, s in status.items() if s in KILLED)
    first_killed = sum(s in KILLED for s in (previous["status"] if args.survivors else status).values())
    survivors = sorted(k for k, s in status.items() if k not in killed)
    n_equivalent = sum(k in eq for k in survivors)
    print(f"\n{args.module}: {len(status)} mutants, {len(killed)} killed, {n_equivalent} equivalent, "
          f"score {100 * len(killed) / max(1, len(status) - n_equivalent):.1f} %, "
          f"{(time.monotonic() - start) / 60:.1f} min")
    for k in survivors:
        print(f"  {status[k]:10} {k}{'  (equivalent)' if k in eq else ''}")
    if not args.no_write:
        print(write_row(args.module, len(status), n_equivalent, len(killed), first_killed, wall))
    return 0


if __name__ == "__main__":
    sys.exit(main())
