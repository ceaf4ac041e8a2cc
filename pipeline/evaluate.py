"""DVC stage `evaluate`: every trained model (teacher, student, HDKD, baselines) on the test split, once -> reports/.

Metrics (with bootstrap CIs), efficiency (params, MACs, latency), the results bundle and DVC
plots data. Options: `python -m pipeline.evaluate --help`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from hdkd.config import load_params
from hdkd.evaluate import evaluate_stage


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/prepared"), help="packed test split")
    parser.add_argument("--models", type=Path, default=Path("models"), help="<dir>/<model>/model.pt")
    parser.add_argument("--out", type=Path, default=Path("reports"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return evaluate_stage(load_params(args.params), args.data, args.models, args.out)


if __name__ == "__main__":
    main()
