"""The study profile: the pipeline under ``params/study.yaml``, run on the committed code, into ``reports/study/``.

    python -m pipeline.study                  # params/study.yaml -> reports/study/ (about 45 minutes on 2 CPU cores)
    python -m pipeline.study --overlay params/my-study.yaml --out reports/my-study
    dvc repro report                          # rebuilds reports/study/'s tables and figures from its bundle

The study runs in a git worktree of HEAD (``--workdir``; commit first: like a queued DVC experiment it
runs the committed code, and its bundle names the commit), with the overlay applied to that worktree's
params.yaml, as `dvc repro evaluate` there: its own DVC cache, MLflow store (``mlflow.db``) and
checkpoints. An interrupted study resumes where it stopped when run again at the same commit (finished
stages and runs are kept). Its results bundle and DVC metrics are copied to ``--out``, whose tables,
figures and README the report stage then builds, as it builds ``reports/``'s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from hdkd.config import apply_overlay
from hdkd.infra.io import output_set, write_text
from hdkd.infra.provenance import git, repo_root
from hdkd.report.stage import build_study_report

STUDY_FILES = ("bundle.json", "metrics.json")  # what a study leaves in --out; the rest is built from them


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.study", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--overlay", type=Path, default=Path("params/study.yaml"), help="params overlay of the study")
    p.add_argument("--out", type=Path, default=Path("reports/study"), help="where its results and report go")
    p.add_argument("--workdir", type=Path, default=Path(".dvc/tmp/study"),
                   help="the git worktree it runs in (kept, so that an interrupted study resumes)")
    return p.parse_args(argv)


def prepare_worktree(repo: Path, workdir: Path, overlay: Path) -> str:
    """A worktree of HEAD at ``workdir`` with ``overlay`` applied to its params.yaml; its commit.

    One at another commit is replaced; one at HEAD is kept, with its finished stages and runs."""
    head = git("rev-parse", "HEAD", repo_root=repo).decode().strip()
    if workdir.exists():
        current = git("rev-parse", "HEAD", repo_root=workdir).decode().strip() if (workdir / ".git").exists() else None
        if current != head:
            subprocess.run(["git", "worktree", "remove", "--force", str(workdir)], cwd=repo, check=False)
            shutil.rmtree(workdir, ignore_errors=True)
            subprocess.run(["git", "worktree", "prune"], cwd=repo, check=True)
    if not workdir.exists():
        workdir.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(workdir), head], cwd=repo, check=True)
    subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=workdir, check=True)  # the overlay on HEAD's
    write_text(workdir / "params.yaml", apply_overlay(workdir / "params.yaml", overlay))
    return head


def run_study(repo: Path, overlay: Path, out: Path, workdir: Path) -> float:
    """Run the study; return its wall time in seconds."""
    if not overlay.is_file():
        raise SystemExit(f"error: study overlay {overlay} not found")
    prepare_worktree(repo, workdir.resolve(), overlay.resolve())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    start = time.perf_counter()
    subprocess.run(["dvc", "repro", "evaluate"], cwd=workdir, env=env, check=True)
    seconds = time.perf_counter() - start
    with output_set() as outputs:  # bundle and metrics appear together
        for name in STUDY_FILES:
            shutil.copyfile(workdir / "reports" / name, outputs.file(out / name))
    for path in build_study_report(out):
        print(path)
    return seconds


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    repo = repo_root(Path("."))
    try:
        seconds = run_study(repo, args.overlay, args.out, args.workdir)
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"error: {' '.join(map(str, e.cmd))} failed (exit {e.returncode}) in {args.workdir}; "
                         "run the study again to resume") from None
    print(f"study: {seconds:.0f} s of `dvc repro evaluate` -> {args.out}")


if __name__ == "__main__":
    main()
