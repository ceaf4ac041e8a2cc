"""DVC stage `evaluate`: every trained model (teacher, student, HDKD, baselines) on the test split, once -> reports/.

Metrics (with bootstrap CIs), efficiency (params, MACs, latency), the results bundle and DVC
plots data. Options: `python -m pipeline.evaluate --help`.
"""

from __future__ import annotations

from typing import Any

from pipeline import _models, start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from hdkd.evaluation.evaluate import evaluate_stage

    args, params = _models.parse("pipeline.evaluate", __doc__, "reports", argv)
    return evaluate_stage(params, args.data, args.models, args.out)


if __name__ == "__main__":
    start()
    main()
