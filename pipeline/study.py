"""The study profile: the pipeline under ``params/study.yaml``, run on the committed code, into ``reports/study/``.

    python -m pipeline.study                  # params/study.yaml -> reports/study/ (40 minutes on 2 CPU cores)
    python -m pipeline.study --overlay params/my-study.yaml --out reports/my-study
    dvc repro report                          # rebuilds reports/study/'s tables and figures from its bundle

It runs in a git worktree of HEAD (--workdir; commit first: its bundle names the commit), and resumes when
run again at the same commit (hdkd.report.study).
"""

import argparse
import subprocess
from pathlib import Path

from pipeline import start


def main(argv: list[str] | None = None) -> None:
    from hdkd.infra.provenance import repo_root
    from hdkd.report.study import run_study

    p = argparse.ArgumentParser(prog="python -m pipeline.study", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--overlay", type=Path, default=Path("params/study.yaml"), help="params overlay of the study")
    p.add_argument("--out", type=Path, default=Path("reports/study"), help="where its results and report go")
    p.add_argument("--workdir", type=Path, default=Path(".dvc/tmp/study"), help="its git worktree (kept, to resume)")
    args = p.parse_args(argv)
    try:
        seconds = run_study(repo_root(Path(".")), args.overlay, args.out, args.workdir)
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"error: {' '.join(map(str, e.cmd))} failed (exit {e.returncode}) in {args.workdir}; "
                         "run the study again to resume") from None
    print(f"study: {seconds:.0f} s of `dvc repro evaluate` -> {args.out}")


if __name__ == "__main__":
    start()
    main()
