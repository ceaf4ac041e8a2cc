"""The study: the pipeline under a params overlay (``params/study.yaml``), run on the committed code in a git
worktree, its results bundle and metrics copied out and its report built (command line: ``pipeline/study.py``).

The worktree is of HEAD, with the overlay applied to its params.yaml, and runs ``dvc repro evaluate`` there: its own
DVC cache, MLflow store and checkpoints. An interrupted study resumes where it stopped when run again at the same
commit (finished stages and runs are kept). The overlay is checked before any worktree is made.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hdkd.config import apply_overlay
from hdkd.infra.io import output_set, read_json, write_json, write_text
from hdkd.infra.provenance import git, git_show
from hdkd.report.stage import build_study_report

STUDY_FILES = ("bundle.json", "metrics.json")  # what a study leaves in --out; the rest is built from them


def prepare_worktree(repo: Path, workdir: Path, overlay: Path) -> str:
    """A worktree of HEAD at ``workdir`` with ``overlay`` applied to its params.yaml; its commit.

    One at another commit is replaced; one at HEAD is kept, with its finished stages and runs."""
    head = git("rev-parse", "HEAD", repo_root=repo).decode().strip()
    with tempfile.TemporaryDirectory() as tmp:  # the overlay on HEAD's params, checked before any worktree exists
        base = Path(tmp) / "params.yaml"
        base.write_bytes(git_show(head, "params.yaml", repo))
        params_text = apply_overlay(base, overlay)
    if workdir.exists():
        current = git("rev-parse", "HEAD", repo_root=workdir).decode().strip() if (workdir / ".git").exists() else None
        if current != head:
            subprocess.run(["git", "worktree", "remove", "--force", str(workdir)], cwd=repo, check=False)
            shutil.rmtree(workdir, ignore_errors=True)
            subprocess.run(["git", "worktree", "prune"], cwd=repo, check=True)
    if not workdir.exists():
        workdir.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(workdir), head], cwd=repo, check=True)
    write_text(workdir / "params.yaml", params_text)
    return head


def run_study(repo: Path, overlay: Path, out: Path, workdir: Path) -> float:
    """Run the study; return its wall time in seconds."""
    if not overlay.is_file():
        raise FileNotFoundError(f"study overlay {overlay} not found")
    prepare_worktree(repo, workdir.resolve(), overlay.resolve())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    start = time.perf_counter()
    subprocess.run(["dvc", "repro", "evaluate"], cwd=workdir, env=env, check=True)
    seconds = time.perf_counter() - start
    with output_set() as outputs:  # bundle and metrics appear together
        for name in STUDY_FILES:  # on one line: a study's bundle (every run's predictions) is data, kept in git
            write_json(outputs.file(out / name), read_json(workdir / "reports" / name), indent=None)
    for path in build_study_report(out):
        print(path)
    return seconds
