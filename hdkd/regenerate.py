"""Find the results bundle of a git commit or a DVC experiment, to rebuild its report without retraining.

Lookup order for ``rev`` (a full or abbreviated commit hash, anything git resolves to a commit,
or a DVC experiment name):

1. MLflow: runs tagged ``hdkd.git_commit`` == the full commit hash (or, when git does not know
   the commit, starting with ``rev``), or ``hdkd.dvc_exp_name`` == ``rev``, that carry the artifact
   ``results_bundle.json`` (logged by the evaluate stage). The most recent run wins; runs made by
   plain ``dvc repro`` (no experiment tag) win over experiments of the same commit, since every
   experiment shares its baseline's commit.
2. git: ``reports/bundle.json`` as committed at ``rev`` (or at the DVC experiment ref
   ``refs/exps/.../<rev>``).

Nothing found: :class:`RevisionNotFound`, listing the revisions that are available.
This module only reads MLflow; :mod:`hdkd.tracking` writes it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from hdkd.evaluate import validate_bundle
from hdkd.provenance import GitError, git, git_show, resolve_commit

BUNDLE_ARTIFACT = "results_bundle.json"
BUNDLE_PATH = "reports/bundle.json"
COMMIT_TAG = "hdkd.git_commit"
EXP_TAG = "hdkd.dvc_exp_name"
HEX = re.compile(r"[0-9a-f]{4,40}")


class RevisionNotFound(LookupError):
    """No results bundle for a revision; the message lists the revisions that have one."""


def bundle_for_revision(
    rev: str, tracking_uri: str | None = None, repo_root: str | os.PathLike = "."
) -> dict[str, Any]:
    """The results bundle of ``rev``, from MLflow when possible, else from git (see module doc)."""
    commit = resolve_commit(rev, repo_root)
    if tracking_uri and _mlflow_store_exists(tracking_uri):
        run = _find_mlflow_run(rev, commit, tracking_uri)
        if run is not None:
            return validate_bundle(_download_bundle(run, tracking_uri))
    ref = commit or _exp_refs(repo_root).get(rev)
    if ref is not None:
        try:
            return validate_bundle(json.loads(git_show(ref, BUNDLE_PATH, repo_root)))
        except GitError:
            pass  # the commit exists but has no committed bundle
    raise RevisionNotFound(available_revisions_message(rev, tracking_uri, repo_root))


# ------------------------------------------------------------------------------------------ MLflow
def _mlflow_store_exists(tracking_uri: str) -> bool:
    """False for a ``sqlite:///`` file that does not exist (MLflow would create an empty one)."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///")).is_file()
    return True


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient  # heavy import; only when a revision is looked up

    return MlflowClient(tracking_uri)


def _search(tracking_uri: str, filter_string: str) -> list:
    client = _client(tracking_uri)
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return []
    return client.search_runs(experiment_ids, filter_string, order_by=["attributes.start_time DESC"],
                              max_results=1000)


def _artifact_path(client, run_id: str, path: str | None = None) -> str | None:
    """Where ``results_bundle.json`` lies in a run's artifacts (at any depth), or ``None``."""
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            found = _artifact_path(client, run_id, item.path)
            if found:
                return found
        elif Path(item.path).name == BUNDLE_ARTIFACT:
            return item.path
    return None


def _find_mlflow_run(rev: str, commit: str | None, tracking_uri: str) -> tuple[str, str] | None:
    """``(run id, artifact path)`` of the bundle of ``rev``, or ``None``; ambiguous matches raise."""
    if "'" in rev:  # never inside an MLflow filter string
        return None
    if commit:
        by_commit = _search(tracking_uri, f"tags.`{COMMIT_TAG}` = '{commit}'")
    elif HEX.fullmatch(rev.lower()):  # an abbreviated hash this clone does not know
        by_commit = _search(tracking_uri, f"tags.`{COMMIT_TAG}` LIKE '{rev.lower()}%'")
    else:
        by_commit = []
    by_exp = _search(tracking_uri, f"tags.`{EXP_TAG}` = '{rev}'")
    commits = {r.data.tags[COMMIT_TAG] for r in by_commit}
    if len(commits) > 1:
        raise RevisionNotFound(f"revision {rev!r} is ambiguous in MLflow: commits {sorted(commits)}")
    # Plain `dvc repro` runs first, then experiments; newest first within each (sorted() is stable).
    client = _client(tracking_uri)
    for run in by_exp + sorted(by_commit, key=lambda r: EXP_TAG in r.data.tags):
        path = _artifact_path(client, run.info.run_id)
        if path is None:
            continue
        if not by_exp and EXP_TAG in run.data.tags:
            exps = sorted({r.data.tags[EXP_TAG] for r in by_commit if EXP_TAG in r.data.tags})
            if len(exps) > 1:
                raise RevisionNotFound(
                    f"commit {rev!r} only has DVC experiment runs in MLflow ({', '.join(exps)}); name one of them")
        return run.info.run_id, path
    return None


def _download_bundle(run: tuple[str, str], tracking_uri: str) -> dict[str, Any]:
    run_id, path = run
    with tempfile.TemporaryDirectory() as tmp:
        local = _client(tracking_uri).download_artifacts(run_id, path, tmp)
        return json.loads(Path(local).read_text(encoding="utf-8"))


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
    if tracking_uri and _mlflow_store_exists(tracking_uri):
        runs = [r.data.tags for r in _search(tracking_uri, "")]
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
