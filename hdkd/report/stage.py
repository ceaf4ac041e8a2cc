"""The report stage and the report's maintenance commands as plain functions; their command lines are
``pipeline/report.py`` (the DVC stage), ``pipeline/revision_report.py`` and ``pipeline/ablations.py``.

Tables and figures come from results bundles, without retraining: the working tree's bundle and
collected ablations, or a revision's (:mod:`hdkd.report.revisions`), plus any other runs named.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hdkd.config import Params, ReportConfig, TrackingConfig
from hdkd.evidence.bundle import load_bundle
from hdkd.infra.io import read_json
from hdkd.infra.mlflow_store import experiment_name, resolve_tracking_uri
from hdkd.infra.provenance import repo_root
from hdkd.report.ablations import collect_ablations, queue_commands, split_reference, summary
from hdkd.report.build import Explanations, build_report
from hdkd.report.revisions import (
    ablations_for_revision,
    bundle_for_revision,
    export_for_revision,
    params_for_revision,
)


def collect(reference_path: str | os.PathLike, ablations_dir: str | os.PathLike, tracking: TrackingConfig,
            uri: str | None = None) -> str:
    """Fill ``ablations_dir`` with the ablation runs of the bundle at ``reference_path`` found in MLflow (at
    ``uri``, default ``tracking.uri``); the summary."""
    reference = load_bundle(reference_path)
    uri = uri or resolve_tracking_uri(tracking.uri, repo_root(Path(".")))
    experiment = experiment_name(tracking, reference["params"]["data"]["dataset"])
    return summary(collect_ablations(reference, uri, experiment, ablations_dir), reference)


def queue_ablations(names: Sequence[str], echo: Callable[[list[str]], None], dry_run: bool = False) -> None:
    """Queue every variant of the named ablations (all when none) as a DVC experiment, each command echoed
    first; all are checked before the first is queued."""
    for command in queue_commands(names):
        echo(command)
        if not dry_run:
            subprocess.run(command, check=True)


Inputs = tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any] | None]  # bundle, ablation runs, their reference


def working_tree_inputs(bundle_path: str | os.PathLike, ablations_dir: str | os.PathLike) -> Inputs:
    """The bundle at ``bundle_path``, the ablation runs of ``ablations_dir`` (every ``*.json``, by file name)
    and their reference (its ``reference.json``, or ``None``)."""
    reference, runs = split_reference({p.stem: load_bundle(p) for p in Path(ablations_dir).glob("*.json")})
    return load_bundle(bundle_path), runs, reference


def stage_extras(export_path: str | os.PathLike, explain_dir: str | os.PathLike, out_dir: str | os.PathLike
                 ) -> tuple[dict[str, Any] | None, Explanations | None]:
    """The export stage's report and the explain stage's results, where those stages have run."""
    export_path, explain_dir = Path(export_path), Path(explain_dir)
    export = read_json(export_path) if export_path.is_file() else None
    explain = None
    if (explain_dir / "explain.json").is_file():
        figure = Path(os.path.relpath(explain_dir / "explanations.png", out_dir)).as_posix()
        explain = Explanations(read_json(explain_dir / "explain.json"), figure)
    return export, explain


def revision_inputs(rev: str, uri: str, repo: str | os.PathLike) -> Inputs:
    """The bundle of ``rev``, and the ablation runs and their reference committed at that revision."""
    bundle = bundle_for_revision(rev, uri, repo)
    ablations = ablations_for_revision(rev, repo)
    if ablations is None:
        print(f"note: git knows no commit or experiment {rev!r}, so not its ablation bundles "
              "(add them with --ablation)", file=sys.stderr)
    reference, runs = split_reference(ablations or {})
    return bundle, runs, reference


def revision_report_config(bundle: dict[str, Any], fallback: ReportConfig, rev: str | None = None,
                           repo: str | os.PathLike = ".") -> ReportConfig:
    """The report settings the revision ran with: its committed params.yaml's (the report stage reads
    them, and they may have changed after the evaluation), else its bundle's params, else ``fallback``."""
    committed = params_for_revision(rev, repo) if rev else None
    for source in (committed, bundle["params"]):
        try:
            return ReportConfig.model_validate(source["report"])
        except (KeyError, TypeError, ValueError):  # none, or of an older params schema
            continue
    return fallback


def other_runs(paths_or_revs: Iterable[str], uri: str, repo: str | os.PathLike) -> list[dict[str, Any]]:
    """A bundle per entry: the file it names, else the revision's bundle."""
    return [load_bundle(a) if Path(a).is_file() else bundle_for_revision(a, uri, repo) for a in paths_or_revs]



def report_stage(bundle_path: str | os.PathLike, ablations_dir: str | os.PathLike, out: str | os.PathLike,
                 cfg: ReportConfig, extra_runs: Sequence[dict[str, Any]] = ()) -> list[Path]:
    """The report stage: the bundle at ``bundle_path`` with the ablation runs of ``ablations_dir`` (and
    ``extra_runs``), the export and explain stages' results beside the bundle where they ran -> ``out``; then
    the study's report where a study left its bundle (``study/`` beside the bundle). The files written."""
    bundle_path = Path(bundle_path)
    bundle, ablations, reference = working_tree_inputs(bundle_path, ablations_dir)
    export, explain = stage_extras(bundle_path.parent / "export.json", bundle_path.parent / "explain", out)
    written = build_report(bundle, out, cfg, [*ablations, *extra_runs], export, explain, reference)
    study = bundle_path.parent / "study"
    if (study / "bundle.json").is_file():  # the study's report, from its committed bundle
        written += build_study_report(study)
    return written


def revision_report(rev: str, out: str | os.PathLike, params: Params, tracking_uri: str | None = None,
                    repo: str | os.PathLike = ".", others: Sequence[str] = ()) -> list[Path]:
    """The report of a git commit or DVC experiment ``rev`` -> ``out``: its bundle (from MLflow at
    ``tracking_uri``, default the params', else the commit's), the ablation runs committed at that revision and
    ``others`` (bundle files or revisions), with the report settings it ran with (else ``params.report``)."""
    uri = tracking_uri or resolve_tracking_uri(params.tracking.uri, repo_root(repo))
    bundle, ablations, reference = revision_inputs(rev, uri, repo)
    cfg = revision_report_config(bundle, params.report, rev, repo)
    export = export_for_revision(rev, repo)  # its explanations figure is not in ``out``
    return build_report(bundle, out, cfg, [*ablations, *other_runs(others, uri, repo)], export, None, reference)


def build_study_report(study_dir: str | os.PathLike) -> list[Path]:
    """The tables, figures and README of a study (``pipeline/study.py``) from the bundle it left in
    ``study_dir``, with the study's own report settings (its comparisons name its models)."""
    bundle = load_bundle(Path(study_dir) / "bundle.json")
    return build_report(bundle, study_dir, study_report_config(bundle))


def study_report_config(bundle: Mapping[str, Any]) -> ReportConfig:
    """A study's report settings: its bundle's own (a bundle older than report.claims declared none)."""
    return ReportConfig.model_validate({"claims": [], **bundle["params"]["report"]})
