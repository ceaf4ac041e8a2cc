"""Where a result came from: the git commit, whether the code was modified, the DVC experiment.

Thin wrappers over the ``git`` command line (no extra dependency); they return ``None`` outside a
git checkout rather than failing, because a result without provenance is still a result.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

# Not code: the pipeline's own outputs change during `dvc repro`, and params.yaml is recorded in full
# (params hash, MLflow params) and changed by `dvc exp run -S`; none of them makes the code "dirty".
NOT_CODE = ("reports", "dvc.lock", "params.yaml")


class GitError(RuntimeError):
    """A git command failed; the message holds git's own."""


def git(*args: str, repo_root: str | os.PathLike = ".") -> bytes:
    proc = subprocess.run(["git", *args], cwd=repo_root, capture_output=True)
    if proc.returncode:
        raise GitError(f"git {' '.join(args)}: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def resolve_commit(rev: str, repo_root: str | os.PathLike = ".") -> str | None:
    """Full hash of a commit-ish (abbreviated hash, branch, tag, ``HEAD~1``); ``None`` if unknown."""
    try:
        return git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", repo_root=repo_root).decode().strip()
    except (GitError, FileNotFoundError):
        return None


def git_show(rev: str, path: str, repo_root: str | os.PathLike = ".") -> bytes:
    """Content of ``path`` (relative to the repository root) at ``rev``; raises :class:`GitError`."""
    return git("show", f"{rev}:{Path(path).as_posix()}", repo_root=repo_root)


def git_state(repo_root: str | os.PathLike = ".") -> dict[str, str | bool | None]:
    """``{"git_commit": full HEAD hash, "git_dirty": tracked code modified}``; ``None``s outside git."""
    commit = resolve_commit("HEAD", repo_root)
    if commit is None:
        return {"git_commit": None, "git_dirty": None}
    excludes = [f":(exclude){p}" for p in NOT_CODE]
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", *excludes, repo_root=repo_root)
    return {"git_commit": commit, "git_dirty": bool(status.strip())}


def dvc_exp_name() -> str | None:
    """The experiment name while ``dvc exp run`` executes the stage (DVC sets ``DVC_EXP_NAME``)."""
    return os.environ.get("DVC_EXP_NAME") or None
