"""The report stage's command line: build, collect ablations, rebuild a revision (``pipeline/report.py``).

Tables and figures from results bundles, without retraining::

    python -m pipeline.report                        # reports/bundle.json + reports/ablations/*.json -> reports/
    python -m pipeline.report --collect-ablations    # MLflow runs -> reports/ablations/ (then `dvc repro report`)
    python -m pipeline.report --rev 1a2b3c4          # a commit's or DVC experiment's report -> runs/1a2b3c4/
    python -m pipeline.report --ablation exp-lambda-1 --ablation runs/b.json   # plus ablation runs
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from hdkd.ablations import NoTrackedRuns, collect_ablations, summary
from hdkd.bundle import load_bundle
from hdkd.config import ReportConfig, TrackingConfig, load_params
from hdkd.regenerate import RevisionNotFound, ablations_for_revision, bundle_for_revision
from hdkd.report import build_report
from hdkd.tracking import experiment_name, repo_root, resolve_tracking_uri

REPORTS_DIR = Path("reports")
REVISIONS_DIR = Path("runs")  # git-ignored: a rebuilt revision never overwrites the working tree's reports/


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--rev", help="git commit (full or abbreviated) or DVC experiment name to rebuild, with the "
                                    "ablation bundles committed at that revision")
    mode.add_argument("--collect-ablations", action="store_true",
                      help="fetch from MLflow the runs that differ from --bundle in one ablation into --ablations-dir")
    p.add_argument("--bundle", type=Path, default=Path("reports/bundle.json"), help="bundle file (without --rev)")
    p.add_argument("--ablation", action="append", default=[], metavar="PATH_OR_REV",
                   help="a bundle file or a revision of another run; repeatable")
    p.add_argument("--ablations-dir", type=Path, default=Path("reports/ablations"),
                   help="collected ablation bundles: every *.json is used (without --rev); "
                        "--collect-ablations fills it")
    p.add_argument("--out", type=Path, default=REPORTS_DIR,
                   help=f"output directory (with --rev: {REVISIONS_DIR}/<rev>; a revision never goes over {REPORTS_DIR})")
    p.add_argument("--params", type=Path, default=Path("params.yaml"),
                   help="tracking URI and experiment, figure settings (with --rev: the revision's own)")
    p.add_argument("--tracking-uri", help="MLflow URI to search (default: params' tracking.uri)")
    p.add_argument("--repo", type=Path, default=Path("."), help="git repository root")
    return p.parse_args(argv)


def revision_dir(rev: str) -> Path:
    """``runs/<rev>``, with characters that do not belong in a directory name replaced."""
    return REVISIONS_DIR / re.sub(r"[^A-Za-z0-9._-]+", "_", rev)


def revision_report_config(bundle: dict[str, Any]) -> ReportConfig:
    """The figure settings the revision ran with (its bundle's params), else the defaults."""
    try:
        return ReportConfig.model_validate(bundle["params"].get("report", {}))
    except ValueError:  # a bundle of an older params schema
        return ReportConfig()


def collect(args: argparse.Namespace, tracking: TrackingConfig, uri: str) -> None:
    reference = load_bundle(args.bundle)
    experiment = experiment_name(tracking, reference["params"]["data"]["dataset"])
    print(summary(collect_ablations(reference, uri, experiment, args.ablations_dir), reference))


def revision_inputs(args: argparse.Namespace, uri: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The bundle of ``--rev`` and the ablation bundles committed at that revision."""
    bundle = bundle_for_revision(args.rev, uri, args.repo)
    ablations = ablations_for_revision(args.rev, args.repo)
    if ablations is None:
        print(f"note: git knows no commit or experiment {args.rev!r}, so not its ablation bundles "
              "(add them with --ablation)", file=sys.stderr)
    return bundle, ablations or []


def build(args: argparse.Namespace) -> None:
    if args.params.is_file():
        params = load_params(args.params)  # an invalid file fails here, naming the key
        cfg, tracking = params.report, params.tracking
    else:  # outside a checkout: defaults still rebuild the tables exactly
        cfg, tracking = ReportConfig(), TrackingConfig()
    uri = args.tracking_uri or resolve_tracking_uri(tracking.uri, repo_root(args.repo))
    if args.collect_ablations:
        return collect(args, tracking, uri)
    if args.rev:
        bundle, ablations = revision_inputs(args, uri)
        out = revision_dir(args.rev) if args.out == REPORTS_DIR else args.out
        cfg = revision_report_config(bundle)
    else:
        bundle = load_bundle(args.bundle)
        ablations = [load_bundle(p) for p in sorted(args.ablations_dir.glob("*.json"))]
        out = args.out
    ablations += [load_bundle(a) if Path(a).is_file() else bundle_for_revision(a, uri, args.repo)
                  for a in args.ablation]
    written = build_report(bundle, out, ablations, cfg)
    print("\n".join(str(p) for p in written))


def main(argv: list[str] | None = None) -> None:
    try:
        build(parse_args(argv))
    except (RevisionNotFound, NoTrackedRuns) as e:  # a plain message saying what is available, no traceback
        raise SystemExit(f"error: {e}") from None
