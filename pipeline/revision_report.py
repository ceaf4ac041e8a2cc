"""The report of a git commit or DVC experiment, rebuilt from its results bundle without retraining -> runs/<rev>/.

    python -m pipeline.revision_report 1a2b3c4                      # with the ablation bundles committed there
    python -m pipeline.revision_report exp-lambda-1 --ablation runs/b.json --ablation 5e6f7a8   # plus other runs
    (its bundle comes from MLflow, where the evaluate stage logs it, or from the commit's reports/bundle.json)
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from pipeline import start


def main(argv: list[str] | None = None) -> None:
    from hdkd.config import load_params
    from hdkd.report.stage import revision_report

    p = argparse.ArgumentParser(prog="python -m pipeline.revision_report", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("rev", help="git commit (full or abbreviated) or DVC experiment name")
    p.add_argument("--ablation", action="append", default=[], metavar="PATH_OR_REV", help="another run; repeatable")
    p.add_argument("--out", type=Path, help="default: runs/<rev> (git-ignored: never over reports/)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="report settings, where the rev has none")
    p.add_argument("--tracking-uri", help="MLflow URI to search (default: the params' tracking.uri)")
    p.add_argument("--repo", type=Path, default=Path("."), help="git repository root")
    args = p.parse_args(argv)
    out = args.out or Path("runs") / re.sub(r"[^A-Za-z0-9._-]+", "_", args.rev)
    try:
        written = revision_report(args.rev, out, load_params(args.params), args.tracking_uri, args.repo, args.ablation)
    except LookupError as e:  # no such revision, or no bundle for it: the message says which exist
        raise SystemExit(f"error: {e}") from None
    print("\n".join(map(str, written)))


if __name__ == "__main__":
    start()
    main()
