"""DVC stage `evaluate`: every trained model (teacher, student, HDKD, baselines) on the test split, once -> reports/.

Metrics (with bootstrap CIs), efficiency (params, MACs, latency), the results bundle and DVC
plots data. Options: `python -m pipeline.evaluate --help`.
"""

from __future__ import annotations

from typing import Any

from hdkd.evaluation.evaluate import evaluate_stage
from pipeline import _models


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, params = _models.parse("pipeline.evaluate", __doc__, "reports", argv)
    return evaluate_stage(params, args.data, args.models, args.out)


if __name__ == "__main__":
    main()
