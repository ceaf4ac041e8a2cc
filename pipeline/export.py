"""DVC stage `export`: each trained network -> models/<name>/model.onnx, checked and timed -> reports/export.json.

ONNX Runtime must match PyTorch on every test image (max |Δ probability| <= 1e-4, same top-1) or the
stage fails; CPU latency of both runtimes at evaluate.latency_batch_sizes (see hdkd.export).
"""

import argparse
import logging
from pathlib import Path

from hdkd.config import load_params
from hdkd.export import export_stage


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/prepared"), help="packed test split")
    parser.add_argument("--models", type=Path, default=Path("models"), help="<dir>/<model>/model.pt")
    parser.add_argument("--out", type=Path, default=Path("reports/export.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return export_stage(load_params(args.params), args.data, args.models, args.out)


if __name__ == "__main__":
    main()
