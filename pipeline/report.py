"""DVC stage `report`: the paper tables and figures from the results bundle, without retraining -> reports/.

reports/bundle.json with the ablation bundles of reports/ablations/ (compared with its reference.json), the
export and explain stages' results; and reports/study/ from its bundle, where a study left one. A commit's
report: `python -m pipeline.revision_report`; the ablations: `python -m pipeline.ablations`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline import start


def main(argv: list[str] | None = None) -> None:
    from hdkd.config import load_params
    from hdkd.report.stage import report_stage

    p = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, default=Path("reports/bundle.json"), help="the evaluate stage's bundle")
    p.add_argument("--ablations-dir", type=Path, default=Path("reports/ablations"),
                   help="ablation bundles: every *.json, reference.json the run they are compared with")
    p.add_argument("--out", type=Path, default=Path("reports"))
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="the report settings (report.*)")
    args = p.parse_args(argv)
    params = load_params(args.params)  # an invalid file fails here, naming the key
    print("\n".join(map(str, report_stage(args.bundle, args.ablations_dir, args.out, params.report))))


if __name__ == "__main__":
    start()
    main()
