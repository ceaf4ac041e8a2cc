"""The ablations (hdkd.report.ablations.ABLATIONS): queue their grids as DVC experiments, then collect the runs.

    python -m pipeline.ablations queue [NAME ...] [--dry-run]   # every grid, or those named; then dvc queue start
    python -m pipeline.ablations collect && dvc repro report    # their MLflow runs -> reports/ablations/ -> tables
"""

import argparse
import shlex
import subprocess
from pathlib import Path

from pipeline import start


def main(argv: list[str] | None = None) -> None:
    from hdkd.config import load_params
    from hdkd.report.stage import collect, queue_ablations

    p = argparse.ArgumentParser(prog="python -m pipeline.ablations", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("command", choices=["queue", "collect"])
    p.add_argument("names", nargs="*", help="queue: the ablations whose grids to queue (default: all)")
    p.add_argument("--dry-run", action="store_true", help="queue: print the commands only")
    p.add_argument("--bundle", type=Path, default=Path("reports/bundle.json"), help="collect: the reference run")
    p.add_argument("--ablations-dir", type=Path, default=Path("reports/ablations"), help="collect: where they go")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="collect: tracking.uri and experiment")
    p.add_argument("--tracking-uri", help="collect: MLflow URI to search (default: the params' tracking.uri)")
    args = p.parse_args(argv)
    try:
        if args.command == "queue":
            queue_ablations(args.names, lambda command: print(shlex.join(command), flush=True), args.dry_run)
        else:
            print(collect(args.bundle, args.ablations_dir, load_params(args.params).tracking, args.tracking_uri))
    except (LookupError, ValueError, subprocess.CalledProcessError) as e:  # unknown names, no runs, a failed queue
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    start()
    main()
