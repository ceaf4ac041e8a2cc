"""Build the paper tables and figures from results bundles, without retraining.

    python -m pipeline.report                        # from reports/bundle.json of the working tree
    python -m pipeline.report --rev 1a2b3c4          # the bundle of a commit or DVC experiment
    python -m pipeline.report --ablation exp-lambda-1 --ablation runs/b.json   # plus ablation runs
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hdkd.config import ReportConfig, load_params
from hdkd.regenerate import bundle_for_revision
from hdkd.report import build_report, load_bundle


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.split("\n")[0])
    p.add_argument("--rev", help="git commit (full or abbreviated) or DVC experiment name to rebuild")
    p.add_argument("--bundle", type=Path, default=Path("reports/bundle.json"), help="bundle file (without --rev)")
    p.add_argument("--ablation", action="append", default=[], metavar="PATH_OR_REV",
                   help="a bundle file or a revision of another run; repeatable")
    p.add_argument("--out", type=Path, default=Path("reports"), help="output directory")
    p.add_argument("--params", type=Path, default=Path("params.yaml"),
                   help="figure settings and tracking URI (defaults if the file is absent)")
    p.add_argument("--tracking-uri", help="MLflow URI to search (default: params' tracking.uri)")
    p.add_argument("--repo", type=Path, default=Path("."), help="git repository root")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.params.is_file():
        params = load_params(args.params)  # an invalid file fails here, naming the key
        cfg, uri = params.report, args.tracking_uri or params.tracking.uri
    else:  # outside a checkout: defaults still rebuild the tables exactly
        cfg, uri = ReportConfig(), args.tracking_uri

    def bundle(ref: str):
        return load_bundle(ref) if Path(ref).is_file() else bundle_for_revision(ref, uri, args.repo)

    main_bundle = bundle_for_revision(args.rev, uri, args.repo) if args.rev else load_bundle(args.bundle)
    written = build_report(main_bundle, args.out, [bundle(a) for a in args.ablation], cfg)
    print("\n".join(str(p) for p in written))


if __name__ == "__main__":
    main()
