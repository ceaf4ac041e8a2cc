"""DVC stage `report`: the paper tables and figures from results bundles, without retraining.

    python -m pipeline.report                        # reports/bundle.json + reports/ablations/*.json -> reports/
                                                     # (ablations compared with reports/ablations/reference.json)
                                                     # (and reports/study/bundle.json -> reports/study/, if there)
    python -m pipeline.report --collect-ablations    # MLflow runs -> reports/ablations/ (then `dvc repro report`)
    python -m pipeline.report --rev 1a2b3c4          # a commit's or DVC experiment's report -> runs/1a2b3c4/
    python -m pipeline.report --ablation exp-lambda-1 --ablation runs/b.json   # plus ablation runs
    python -m pipeline.report --queue-ablations lambda stages   # queue those grids as DVC experiments (all: no names)
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
from pathlib import Path

from hdkd.config import load_params
from hdkd.infra.mlflow_store import resolve_tracking_uri
from hdkd.infra.provenance import repo_root
from hdkd.report.ablations import ABLATIONS, NoTrackedRuns, UnknownAblation, queue_commands
from hdkd.report.build import build_report
from hdkd.report.revisions import RevisionNotFound, export_for_revision
from hdkd.report.stage import (
    build_study_report,
    collect,
    other_runs,
    revision_inputs,
    revision_report_config,
    stage_extras,
    working_tree_inputs,
)

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
    mode.add_argument("--queue-ablations", nargs="*", metavar="NAME",
                      help="queue the grids of these ablations (default: all) as DVC experiments; "
                           f"names: {' '.join(a.name for a in ABLATIONS)}")
    p.add_argument("--dry-run", action="store_true", help="with --queue-ablations: print the commands only")
    p.add_argument("--bundle", type=Path, default=REPORTS_DIR / "bundle.json", help="bundle file (without --rev)")
    p.add_argument("--ablation", action="append", default=[], metavar="PATH_OR_REV",
                   help="a bundle file or a revision of another run; repeatable")
    p.add_argument("--ablations-dir", type=Path, default=REPORTS_DIR / "ablations",
                   help="collected ablation bundles: every *.json is used, reference.json as the run they are "
                        "compared with (without --rev); --collect-ablations fills it")
    p.add_argument("--export", type=Path, help="the export stage's report, for ONNX Runtime latency in the efficiency "
                                               "table (default: export.json beside --bundle; without --rev)")
    p.add_argument("--explain", type=Path, help="the explain stage's output, for where the models look in README.md "
                                                "(default: explain/ beside --bundle; without --rev)")
    p.add_argument("--out", type=Path, default=REPORTS_DIR,
                   help=f"output directory (with --rev: {REVISIONS_DIR}/<rev>; "
                        f"a revision never goes over {REPORTS_DIR})")
    p.add_argument("--params", type=Path, default=Path("params.yaml"),
                   help="tracking URI and experiment, figure settings (with --rev: the revision's own, if it has them)")
    p.add_argument("--tracking-uri", help="MLflow URI to search (default: params' tracking.uri)")
    p.add_argument("--repo", type=Path, default=Path("."), help="git repository root")
    args = p.parse_args(argv)
    if args.dry_run and args.queue_ablations is None:
        p.error("--dry-run goes with --queue-ablations")
    return args


def revision_dir(rev: str) -> Path:
    """``runs/<rev>``, with characters that do not belong in a directory name replaced."""
    return REVISIONS_DIR / re.sub(r"[^A-Za-z0-9._-]+", "_", rev)


def run(args: argparse.Namespace) -> None:
    if args.queue_ablations is not None:
        for command in queue_commands(args.queue_ablations):  # all checked before the first is queued
            print(shlex.join(command), flush=True)
            if not args.dry_run:
                subprocess.run(command, check=True)
        return
    params = load_params(args.params)  # an invalid file fails here, naming the key
    uri = args.tracking_uri or resolve_tracking_uri(params.tracking.uri, repo_root(args.repo))
    if args.collect_ablations:
        print(collect(args.bundle, args.ablations_dir, params.tracking, uri))
        return
    if args.rev:
        bundle, ablations, reference = revision_inputs(args.rev, uri, args.repo)
        out = revision_dir(args.rev) if args.out == REPORTS_DIR else args.out
        cfg = revision_report_config(bundle, params.report, args.rev, args.repo)
        export, explain = export_for_revision(args.rev, args.repo), None  # its figure is not in runs/<rev>
    else:
        bundle, ablations, reference = working_tree_inputs(args.bundle, args.ablations_dir)
        out, cfg = args.out, params.report
        export, explain = stage_extras(args.export or args.bundle.parent / "export.json",
                                       args.explain or args.bundle.parent / "explain", out)
    written = build_report(bundle, out, cfg, ablations + other_runs(args.ablation, uri, args.repo), export, explain,
                           reference)
    study = args.bundle.parent / "study"
    if not args.rev and (study / "bundle.json").is_file():  # the study's report, from its committed bundle
        written += build_study_report(study)
    print("\n".join(str(p) for p in written))


def main(argv: list[str] | None = None) -> None:
    try:
        run(parse_args(argv))
    except (RevisionNotFound, NoTrackedRuns, UnknownAblation) as e:  # a plain message, no traceback
        raise SystemExit(f"error: {e}") from None
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"error: {shlex.join(e.cmd)} failed (exit {e.returncode})") from None


if __name__ == "__main__":
    main()
