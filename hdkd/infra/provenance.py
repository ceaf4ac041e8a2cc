"""Where a result came from: the git commit, whether the code was modified, the DVC experiment,
the repository root, the hashes of a stage's dependencies and the software environment.

Thin wrappers over the ``git`` command line (no extra dependency); they return ``None`` outside a
git checkout rather than failing, because a result without provenance is still a result.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hdkd.infra.io import dvc_md5, read_yaml

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


def git_ignored(root: str | os.PathLike, names: Iterable[str]) -> set[str]:
    """Those of ``names`` (paths relative to ``root``) that git ignores there; none outside a repository."""
    names = sorted(names)
    if not names:
        return set()
    proc = subprocess.run(["git", "check-ignore", "-z", "--stdin"], cwd=root, capture_output=True,
                          input="\0".join(names).encode())
    return set(proc.stdout.decode().split("\0")) - {""} if proc.returncode == 0 else set()  # 1: none; 128: no repo


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


def repo_root(start: str | Path | None = None) -> Path:
    """The project root; from a DVC temporary experiment copy, the real repository it came from.

    DVC sets ``DVC_ROOT`` for every stage command, and for queued experiments points it at the
    repository that queued them (not the copy under ``.dvc/tmp/exps``); without it (a stage run
    by hand), the path is searched upwards.
    """
    if start is None and os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    path = Path(start or os.getcwd()).resolve()
    parts = path.parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    for candidate in (path, *path.parents):
        if (candidate / "dvc.yaml").is_file() or (candidate / ".git").exists():
            return candidate
    return path


def stage_definition(stages: dict[str, Any], stage: str) -> dict[str, Any]:
    """``dvc.yaml``'s definition of ``stage``; for a stage ``<name>@<key>`` that a ``foreach`` generates,
    its ``do`` template with ``${key}`` replaced, as DVC does."""
    name, _, key = stage.partition("@")
    definition = stages.get(name, {})
    if not key:
        return definition
    return json.loads(json.dumps(definition.get("do", {})).replace("${key}", key))


def stage_command(stage: str, root: Path) -> str | None:
    """The command ``dvc.yaml`` runs for ``stage`` (``python -m pipeline.train_hdkd``), if it declares one."""
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        return None
    stages = (read_yaml(dvc_yaml) or {}).get("stages", {})
    return stage_definition(stages, stage).get("cmd") if stage.partition("@")[0] in stages else None


def stage_dep_hashes(stage: str, root: Path) -> dict[str, str]:
    """The hashes ``dvc.lock`` records for the dependencies ``dvc.yaml`` declares for ``stage``
    (missing ones are skipped): a directory's hash leaves out what ``.dvcignore`` ignores."""
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        return {}
    from dvc.fs import localfs
    from dvc.ignore import DvcIgnoreFilter

    stages = (read_yaml(dvc_yaml) or {}).get("stages", {})
    deps = stage_definition(stages, stage).get("deps", [])
    ignore = DvcIgnoreFilter(localfs, str(root))  # DVC's own reading of every .dvcignore

    def hashed_files(path: Path) -> list[Path]:
        return [f for f in path.rglob("*") if f.is_file() and not ignore.is_ignored_file(str(f))]

    return {dep: dvc_md5(root / dep, hashed_files(root / dep)) for dep in deps if (root / dep).exists()}
