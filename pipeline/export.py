"""DVC stage `export`: each trained network -> models/<name>/model.onnx, checked and timed -> reports/export.json.

ONNX Runtime must match PyTorch on every test image (max |Δ probability| <= 1e-4, same top-1) or the
stage fails; CPU latency of both runtimes at evaluate.latency_batch_sizes (see hdkd.export).
"""

import argparse
import logging
from pathlib import Path

from hdkd.config import load_params
from hdkd.data import PackedDataset, eval_transform, load_split
from hdkd.export import export_models
from hdkd.io import write_json
from hdkd.roster import MODEL_NAMES

log = logging.getLogger("pipeline.export")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m pipeline.export")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/prepared"), help="packed test split")
    parser.add_argument("--models", type=Path, default=Path("models"), help="<dir>/<model>/model.pt")
    parser.add_argument("--out", type=Path, default=Path("reports/export.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = load_params(args.params)
    models = {name: args.models / name / "model.pt" for name in MODEL_NAMES}
    missing = [str(p) for p in models.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"trained models missing: {missing}; run `dvc repro distill` first")
    test = load_split(args.data, "test", image_size=params.data.image_size)
    ev = params.evaluate
    report = export_models(models, PackedDataset(test, eval_transform()), list(test.classes),
                           batch_size=params.train.eval_batch_size, latency_batch_sizes=ev.latency_batch_sizes,
                           warmup=ev.latency_warmup, iters=ev.latency_iters)
    write_json(args.out, report)
    for name, entry in report["models"].items():
        log.info("%s: %s, max |Δp| %.2g, top-1 agreement %.4f, ONNX Runtime / PyTorch latency %s", name,
                 entry["onnx"], entry["parity"]["max_abs_diff_probability"], entry["parity"]["top1_agreement"],
                 ", ".join(f"{k} {v['onnxruntime_over_pytorch']:.2f}" for k, v in entry["timing_cpu"].items()))
    return report


if __name__ == "__main__":
    main()
