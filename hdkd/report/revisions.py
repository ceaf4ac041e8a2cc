"""Find the results bundle of a git commit or a DVC experiment, to rebuild its report without retraining.

Lookup order for ``rev`` (a full or abbreviated commit hash, anything git resolves to a commit,
or a DVC experiment name):

1. MLflow: runs tagged ``hdkd.git_commit`` == the full commit hash (or, when git does not know
   the commit, starting with ``rev``), or ``hdkd.dvc_exp_name`` == ``rev``, that carry the artifact
   ``results_bundle.json`` (logged by the evaluate stage). The most recent run wins. A commit
   matches only runs of plain ``dvc repro`` (no experiment tag): every experiment shares its
   baseline's commit tag, and is found by its name.
2. git: ``reports/bundle.json`` as committed at ``rev`` (or at the DVC experiment ref
   ``refs/exps/.../<rev>``).

The ablation bundles of ``rev`` (:func:`ablations_for_revision`) are the ``reports/ablations/*.json``
committed at ``rev`` or in its experiment ref, their reference ``reference.json`` among them: what the
report stage of that revision read; so is its
export report (:func:`export_for_revision`), for the same efficiency table.

Nothing found: :class:`RevisionNotFound`, listing the revisions that are available.
MLflow is read through :mod:`hdkd.infra.tracking`, the only module that talks to it.
"""

from __future__ import annotations

import os
import re
from pathlib import PurePosixPath
from typing import Any

from hdkd.evidence.bundle import BUNDLE_ARTIFACT, validate_bundle
from hdkd.infra.io import parse_json
from hdkd.infra.mlflow_runs import find_artifact, find_runs, read_json_artifact
from hdkd.infra.mlflow_store import TAG, tracking_store_exists
from hdkd.infra.provenance import GitError, git, git_show, resolve_commit

BUNDLE_PATH = "reports/bundle.json"
ABLATIONS_PATH = "reports/ablations"
EXPORT_PATH = "reports/export.json"
COMMIT_TAG = f"{TAG}git_commit"  # as hdkd.infra.tracking.Tracker tags every run
EXP_TAG = f"{TAG}dvc_exp_name"
HEX = re.compile(r"[0-9a-f]{4,40}")


class RevisionNotFound(LookupError):
    """No results bundle for a revision; the message lists the revisions that have one."""


def bundle_for_revision(
    rev: str, tracking_uri: str | None = None, repo_root: str | os.PathLike = "."
) -> dict[str, Any]:
    """The results bundle of ``rev``, from MLflow when possible, else from git (see module doc)."""
    found, experiments = None, []
    if tracking_uri:
        found, experiments = _find_mlflow_bundle(rev, resolve_commit(rev, repo_root), tracking_uri)
    if found is not None:
        return found
    ref = git_ref(rev, repo_root)
    if ref is not None:
        try:
            return validate_bundle(parse_json(git_show(ref, BUNDLE_PATH, repo_root), f"{ref}:{BUNDLE_PATH}"))
        except GitError:
            pass  # the commit exists but has no committed bundle
    if experiments:
        raise RevisionNotFound(f"commit {rev!r} only has DVC experiment runs in MLflow ({', '.join(experiments)}); "
                               "name one of them")
    raise RevisionNotFound(available_revisions_message(rev, tracking_uri, repo_root))


def ablations_for_revision(rev: str, repo_root: str | os.PathLike = ".") -> dict[str, dict[str, Any]] | None:
    """The bundles committed at ``rev`` in ``reports/ablations/``, by file stem (``reference`` among them where
    the collection wrote one); ``None`` when git knows no such commit or experiment."""
    ref = git_ref(rev, repo_root)
    if ref is None:
        return None
    try:
        listing = git("ls-tree", "--name-only", ref, f"{ABLATIONS_PATH}/", repo_root=repo_root).decode()
    except GitError:
        return {}
    paths = sorted(PurePosixPath(p) for p in listing.splitlines() if PurePosixPath(p).suffix == ".json")
    return {p.stem: validate_bundle(parse_json(git_show(ref, str(p), repo_root), f"{ref}:{p}")) for p in paths}


def export_for_revision(rev: str, repo_root: str | os.PathLike = ".") -> dict[str, Any] | None:
    """The export stage's report (``reports/export.json``) committed at ``rev`` or in its experiment ref,
    for the efficiency table's ONNX Runtime columns; ``None`` where there is none."""
    ref = git_ref(rev, repo_root)
    try:
        return None if ref is None else parse_json(git_show(ref, EXPORT_PATH, repo_root), f"{ref}:{EXPORT_PATH}")
    except GitError:
        return None


def params_for_revision(rev: str, repo_root: str | os.PathLike = ".") -> dict[str, Any] | None:
    """``params.yaml`` as committed at ``rev`` (parsed, not validated); ``None`` without one."""
    import yaml

    ref = git_ref(rev, repo_root)
    try:
        return None if ref is None else yaml.safe_load(git_show(ref, "params.yaml", repo_root))
    except (GitError, yaml.YAMLError):
        return None


def git_ref(rev: str, repo_root: str | os.PathLike = ".") -> str | None:
    """The commit ``rev`` names, or the ref of the DVC experiment called ``rev``; ``None`` if neither."""
    return resolve_commit(rev, repo_root) or _exp_refs(repo_root).get(rev)


# ------------------------------------------------------------------------------------------ MLflow
def tracked_bundle(tracking_uri: str, run_id: str) -> dict[str, Any] | None:
    """The results bundle an evaluate run logged (at any artifact depth), validated; ``None`` if it has none."""
    path = find_artifact(tracking_uri, run_id, BUNDLE_ARTIFACT)
    return None if path is None else validate_bundle(read_json_artifact(tracking_uri, run_id, path))


def _find_mlflow_bundle(rev: str, commit: str | None, tracking_uri: str) -> tuple[dict[str, Any] | None, list[str]]:
    """The newest bundle of ``rev`` (or ``None``), and the DVC experiments
    of the commit ``rev`` names. An experiment's run stands for its name, never for its baseline commit:
    that commit's own results are those of a plain ``dvc repro`` (or the bundle committed there)."""
    if "'" in rev:  # never inside an MLflow filter string
        return None, []
    if commit:
        by_commit = find_runs(tracking_uri, f"tags.`{COMMIT_TAG}` = '{commit}'")
    elif HEX.fullmatch(rev.lower()):  # an abbreviated hash this clone does not know
        by_commit = find_runs(tracking_uri, f"tags.`{COMMIT_TAG}` LIKE '{rev.lower()}%'")
    else:
        by_commit = []
    commits = {r.tags[COMMIT_TAG] for r in by_commit}
    if len(commits) > 1:
        raise RevisionNotFound(f"revision {rev!r} is ambiguous in MLflow: commits {sorted(commits)}")
    plain = [r for r in by_commit if EXP_TAG not in r.tags]
    for run in find_runs(tracking_uri, f"tags.`{EXP_TAG}` = '{rev}'") + plain:  # newest first in each
        bundle = tracked_bundle(tracking_uri, run.run_id)
        if bundle is not None:
            return bundle, []
    return None, sorted({r.tags[EXP_TAG] for r in by_commit if EXP_TAG in r.tags})


# --------------------------------------------------------------------------------------------- git
def _exp_refs(repo_root: str | os.PathLike) -> dict[str, str]:
    """DVC experiment name -> git ref (``refs/exps/<baseline>/<name>``)."""
    try:
        out = git("for-each-ref", "--format=%(refname)", "refs/exps", repo_root=repo_root).decode()
    except (GitError, FileNotFoundError):
        return {}
    return {ref.rsplit("/", 1)[-1]: ref for ref in out.split() if ref.count("/") >= 4}


def _git_commits_with_bundle(repo_root: str | os.PathLike, limit: int = 10) -> list[str]:
    try:
        out = git("log", f"-n{limit}", "--format=%h %s", "--", BUNDLE_PATH, repo_root=repo_root).decode()
    except (GitError, FileNotFoundError):
        return []
    return out.splitlines()


def available_revisions_message(rev: str, tracking_uri: str | None, repo_root: str | os.PathLike) -> str:
    lines = [f"no results bundle found for revision {rev!r}. Available:"]
    if tracking_uri and tracking_store_exists(tracking_uri):
        runs = [r.tags for r in find_runs(tracking_uri)]
        labels = sorted({t.get(COMMIT_TAG, "?")[:12] + (f" (experiment {t[EXP_TAG]})" if EXP_TAG in t else "")
                         for t in runs if COMMIT_TAG in t or EXP_TAG in t})
        lines.append(f"  MLflow ({tracking_uri}), runs tagged {COMMIT_TAG} / {EXP_TAG}:")
        lines += [f"    {label}" for label in labels] or ["    (none)"]
    else:
        lines.append(f"  MLflow: no tracking store at {tracking_uri!r}")
    lines.append(f"  git, recent commits that wrote {BUNDLE_PATH}:")
    lines += [f"    {c}" for c in _git_commits_with_bundle(repo_root)] or ["    (none)"]
    exps = sorted(_exp_refs(repo_root))
    if exps:
        lines.append(f"  DVC experiments (refs/exps): {', '.join(exps)}")
    return "\n".join(lines)
