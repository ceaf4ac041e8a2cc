"""``hdkd predict`` throughput on the CPU, and ONNX Runtime's latency against PyTorch's.

- Throughput: ``hdkd predict --batch-size 32`` (in process, from file listing to the written CSV:
  decoding, resizing, normalising, the network, the output) over ``--images`` HAM-like 600x450
  JPEGs, with the tiny HDKD student at ``--size`` (random weights: speed does not depend on them),
  through ``model.pt`` and through its ONNX export.
- Latency: one batch of zeros through PyTorch and through ONNX Runtime (the export stage's
  :func:`hdkd.use.export.compare_latency`, same thread count) at batch 1 and 32.

PyTorch runs on ``--threads`` threads (default 1: figures per core, which stay meaningful on a shared
machine, where PyTorch's OpenMP threads stall each other); ONNX Runtime in the latency comparison on
as many; ``hdkd predict`` through ONNX uses ONNX Runtime's default (every core).

The last line printed is a JSON object with the figures. Usage::

    python benchmarks/predict.py [--images 512] [--size 64] [--iters 20] [--threads 1] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from hdkd.data.formats import HAM_CLASSES
from hdkd.models import create_model
from hdkd.models.checkpoint import load_model, save_model
from hdkd.use.cli import main as hdkd
from hdkd.use.export import compare_latency, export_onnx
from hdkd.use.inference import OnnxClassifier


def write_images(folder: Path, n: int) -> None:
    """``n`` smooth random 600x450 JPEGs (quality 90, as camera images): decoding costs what real ones do."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        small = rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)
        Image.fromarray(small).resize((600, 450), Image.Resampling.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)


def throughput(model: Path, images: Path, out: Path, n: int) -> float:
    start = time.perf_counter()
    code = hdkd(["predict", "--model", str(model), "--batch-size", "32", "--device", "cpu", "--out", str(out),
                 str(images)])
    seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"hdkd predict exited with {code}")
    return n / seconds


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        pt = root / "model.pt"
        save_model(pt, create_model("hdkd_tiny", len(HAM_CLASSES), args.size), "hdkd_tiny", list(HAM_CLASSES),
                   args.size, {})
        model, meta = load_model(pt)
        model.eval()
        onnx_path = root / "model.onnx"
        export_onnx(model, meta, onnx_path)
        write_images(root / "images", args.images)
        hdkd(["predict", "--model", str(pt), "--out", str(root / "warm.csv"), str(root / "images" / "00000.jpg")])
        result = {
            "images": args.images, "image_size": args.size, "threads": torch.get_num_threads(),
            "predict_images_per_s_bs32": {
                "model.pt": throughput(pt, root / "images", root / "pt.csv", args.images),
                "model.onnx": throughput(onnx_path, root / "images", root / "onnx.csv", args.images),
            },
            "latency_cpu": {
                f"bs{b}": compare_latency(model, OnnxClassifier(onnx_path, threads=torch.get_num_threads()),
                                          args.size, b, warmup=3, iters=args.iters)
                for b in (1, 32)
            },
        }
    for name, ips in result["predict_images_per_s_bs32"].items():
        print(f"hdkd predict, batch 32, {name}: {ips:.0f} images/s")
    for key, t in result["latency_cpu"].items():
        print(f"{key}: PyTorch {t['pytorch_ms_per_image']:.3f} ms/image, ONNX Runtime "
              f"{t['onnxruntime_ms_per_image']:.3f} ms/image, ratio ONNX Runtime / PyTorch "
              f"{t['onnxruntime_over_pytorch']:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
