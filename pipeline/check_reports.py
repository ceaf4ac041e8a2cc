"""Compare fresh reports with the committed ones; exit 1 on a mismatch (:mod:`hdkd.report.check`).

    dvc repro && python -m pipeline.check_reports            # reports/ vs reports/ at HEAD
    python -m pipeline.check_reports --tolerance --rtol 1e-2 --committed old/  # or --exact, --statistical
"""

import argparse
from pathlib import Path

from pipeline import start


def main(argv: list[str] | None = None) -> int:
    from hdkd.report.check import DEFAULT_ALPHA, DEFAULT_ATOL, DEFAULT_IGNORE, DEFAULT_RTOL, Tolerance, check

    p = argparse.ArgumentParser(prog="python -m pipeline.check_reports", description=__doc__.split("\n")[0])
    p.add_argument("--fresh", type=Path, default=Path("reports"), help="freshly produced reports")
    p.add_argument("--committed", type=Path, help="committed reports as a directory (default: --prefix at --rev)")
    p.add_argument("--rev", default="HEAD", help="git revision holding the committed reports")
    p.add_argument("--prefix", default="reports", help="reports directory inside the repository")
    p.add_argument("--repo", type=Path, default=Path("."), help="git repository root")
    p.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help=f"relative tolerance (default {DEFAULT_RTOL:g})")
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL, help=f"absolute tolerance (default {DEFAULT_ATOL:g})")
    p.add_argument("--ignore", action="append", default=[], metavar="GLOB",
                   help=f"also skip locations matching GLOB; always skipped: {' '.join(DEFAULT_IGNORE)}")
    kind = p.add_mutually_exclusive_group()  # default: as the results bundles say the runs were made
    for mode, what in [("exact", "every printed character and figure pixel (default: both runs reproducible, same "
                        "kind of CPU)"), ("tolerance", "numbers within --rtol/--atol, figures by presence (default: "
                        "both reproducible, other CPUs)"), ("statistical", "numbers by Welch's t-test over the seeds")]:
        kind.add_argument(f"--{mode}", dest="mode", action="store_const", const=mode, help=what)
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help=f"statistical level (default {DEFAULT_ALPHA:g})")
    args = p.parse_args(argv)
    args.mode = args.mode or "auto"
    tol = Tolerance(args.rtol, args.atol, DEFAULT_IGNORE + tuple(args.ignore))
    return check(args.fresh, args.committed, args.rev, args.repo, args.prefix, tol, args.mode, args.alpha)


if __name__ == "__main__":
    start()
    raise SystemExit(main())
