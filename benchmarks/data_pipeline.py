"""Data pipeline benchmark: the official loading path against packed arrays, and SMOTE's memory.

- Loading, single process, one thread (images/s per core), on HAM10000-like 600x450 JPEGs:
  * official: an image-folder tree decoded and resized to 224 by PIL every epoch, then the
    official torchvision v1 transforms (Resize -> RandomRotation(180) -> flips -> ColorJitter ->
    RandomAdjustSharpness(2) -> GaussianBlur(3) -> ToTensor -> Normalize);
  * packed: the same images prepared once into a uint8 array, read through
    ``hdkd.data.loader.PackedDataset`` with ``train_transform`` (torchvision v2 on uint8);
  * both with and without augmentation (without: decode + resize + normalise vs. read + normalise).
- SMOTE at the HAM10000 shape (10,015 x 224 x 224 x 3, every class raised to 6,705) through the
  balance stage, in a child process whose peak RSS is reported.

The last line printed is a JSON object with the figures. Usage::

    python benchmarks/data_pipeline.py [--images 48] [--seconds 4] [--workdir DIR] [--only-smote]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing
PARAMS = ROOT / "params.yaml"  # the settings the pipeline runs with (augmentation, SMOTE neighbours)

HAM_SHAPE = (10_015, 224, 224, 3)


# ------------------------------------------------------------------------------------- SMOTE
def smote_child(workdir: Path) -> None:
    """Run in a fresh process: write a HAM-shaped prepared split, balance it with SMOTE, report."""
    import pandas as pd

    from hdkd.config import load_params
    from hdkd.data.balance import balance_training_split
    from hdkd.data.formats import HAM_CLASSES, HAM_COUNTS
    from hdkd.data.packed import IMAGES, LABELS, MANIFEST, NpyWriter, write_labels_and_index
    from hdkd.infra.io import write_json

    prepared = workdir / "prepared"
    (prepared / "train").mkdir(parents=True)
    labels = np.repeat(np.arange(len(HAM_CLASSES)), [HAM_COUNTS[c] for c in HAM_CLASSES])
    rng = np.random.default_rng(0)
    rng.shuffle(labels)
    # Class-dependent low-rank images plus noise, generated in chunks (never the whole array in memory).
    basis = rng.integers(0, 256, (len(HAM_CLASSES), 4, *HAM_SHAPE[1:]), dtype=np.uint8)
    with NpyWriter(prepared / "train" / IMAGES, len(labels), HAM_SHAPE[1:]) as out:
        for start in range(0, len(labels), 128):
            chunk = labels[start : start + 128]
            pick = rng.integers(0, 4, len(chunk))
            noise = rng.integers(0, 24, (len(chunk), *HAM_SHAPE[1:]), dtype=np.uint8)
            out.write(basis[chunk, pick] // 2 + noise)
    ids, groups = [f"img{i}" for i in range(len(labels))], [f"g{i}" for i in range(len(labels))]
    write_labels_and_index(prepared / "train", labels, pd.DataFrame({"image_id": ids, "group": groups}))
    write_json(
        prepared / MANIFEST,
        {"classes": list(HAM_CLASSES), "dataset": "benchmark", "layout": "ham10000", "image_size": 224},
    )

    params = load_params(PARAMS)
    start = time.perf_counter()
    manifest = balance_training_split(
        params.balance.model_copy(update={"method": "smote"}), params.augment, 0, prepared, workdir / "balanced"
    )
    seconds = time.perf_counter() - start
    rows = int(np.load(workdir / "balanced/train" / LABELS).shape[0])
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    print(
        json.dumps(
            {
                "rows": rows,
                "seconds": seconds,
                "peak_rss_kb": peak_kb,
                "counts_after": manifest["counts_after"],
            }
        )
    )


def run_smote(workdir: Path) -> dict:
    """Run :func:`smote_child` in a child process; its peak RSS is the figure."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run(
        [sys.executable, __file__, "--smote-child", str(workdir)], capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(f"SMOTE child failed:\n{out.stderr[-3000:]}")
    child = json.loads(out.stdout.strip().splitlines()[-1])
    children_peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    peak_kb = max(child["peak_rss_kb"], children_peak_kb if children_peak_kb > before else 0)
    return {
        "smote_peak_rss_gb": round(peak_kb / 1024**2, 3),
        "smote_seconds": round(child["seconds"], 1),
        "smote_rows_written": child["rows"],
        "smote_input_gb": round(np.prod(HAM_SHAPE) / 1024**3, 2),
        "smote_output_gb": round(child["rows"] * np.prod(HAM_SHAPE[1:]) / 1024**3, 2),
        # what SMOTE().fit_resample on the flattened float64 set needs for the input and the result alone
        "official_smote_estimate_gb": round(
            (HAM_SHAPE[0] + child["rows"]) * np.prod(HAM_SHAPE[1:]) * 8 / 1024**3, 1
        ),
    }


# ------------------------------------------------------------------------------------ speed
def make_tree(directory: Path, n: int) -> list[Path]:
    """``n`` HAM10000-like 600x450 JPEGs in an image-folder tree."""
    from PIL import Image

    from hdkd.data.formats import HAM_CLASSES
    from hdkd.data.synthetic import render_ham_image

    paths = []
    for i in range(n):
        dx = HAM_CLASSES[i % len(HAM_CLASSES)]
        path = directory / "train" / dx / f"ISIC_{i:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(render_ham_image(dx, i, i + 10_000, 450, 600)).save(path, quality=95)
        paths.append(path)
    return paths


def official_transform(augment: bool):
    """The official code's torchvision v1 pipeline on PIL images."""
    from torchvision import transforms as T

    steps = [T.Resize((224, 224))]
    if augment:
        steps += [
            T.RandomRotation(180),
            T.RandomHorizontalFlip(),
            T.RandomVerticalFlip(),
            T.ColorJitter(brightness=0.3, contrast=0.3),
            T.RandomAdjustSharpness(2),
            T.GaussianBlur(3),
        ]
    steps += [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    return T.Compose(steps)


def rate(step, n: int, seconds: float) -> float:
    """Images per second of ``step(i)`` over indices cycling through ``n``, for about ``seconds``."""
    for i in range(min(n, 4)):  # warm-up
        step(i)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step(done % n)
        done += 1
    return done / (time.perf_counter() - start)


def run_speed(workdir: Path, n_images: int, seconds: float) -> dict:
    import pandas as pd
    import torch
    from PIL import Image

    from hdkd.config import load_params
    from hdkd.data.augment import (
        augment_batch,
        eval_transform,
        native_cpu_convolution,
        normalize,
        train_transform,
    )
    from hdkd.data.images import decode_resized
    from hdkd.data.loader import PackedDataset
    from hdkd.data.packed import IMAGES, MANIFEST, NpyWriter, load_split, write_labels_and_index
    from hdkd.infra.io import write_json

    torch.set_num_threads(1)  # per core
    augment = load_params(PARAMS).augment
    paths = make_tree(workdir / "tree", n_images)

    def official(transform):
        def step(i):
            with Image.open(paths[i]) as img:
                return transform(img.convert("RGB"))

        return step

    # The packed form of the same images, as the prepare stage writes it.
    packed = workdir / "packed"
    (packed / "train").mkdir(parents=True)
    with NpyWriter(packed / "train" / IMAGES, len(paths), (224, 224, 3)) as out:
        for p in paths:
            out.write(decode_resized(lambda p=p: Image.open(p), 224, str(p))[0][None])
    write_labels_and_index(
        packed / "train", np.zeros(len(paths), np.int64), pd.DataFrame({"image_id": [p.stem for p in paths]})
    )
    write_json(packed / MANIFEST, {"classes": ["x"]})
    split = load_split(packed, "train")
    packed_aug = PackedDataset(split, train_transform(augment), seed=0)
    packed_plain = PackedDataset(split, eval_transform())

    r = {
        "official_aug_img_s": rate(official(official_transform(True)), len(paths), seconds),
        "official_noaug_img_s": rate(official(official_transform(False)), len(paths), seconds),
        "packed_aug_img_s": rate(packed_aug.__getitem__, len(paths), seconds),
        "packed_noaug_img_s": rate(packed_plain.__getitem__, len(paths), seconds),
    }
    # For transparency: part of the gain is the oneDNN workaround, which the official path lacks.
    with native_cpu_convolution():
        r["official_aug_no_onednn_img_s"] = rate(official(official_transform(True)), len(paths), seconds)
    # The batched form (augment.batched, the training default), here on the CPU: uint8 batches of 32.
    batch = (
        torch.from_numpy(np.ascontiguousarray(split.images[: min(32, len(split))]))
        .permute(0, 3, 1, 2)
        .contiguous()
    )
    generator = torch.Generator().manual_seed(0)
    r["batched_aug_cpu_img_s"] = len(batch) * rate(
        lambda i: normalize(augment_batch(batch, augment, generator)), 1, seconds
    )
    r = {k: round(v, 1) for k, v in r.items()}
    r["loader_speedup"] = round(r["packed_aug_img_s"] / r["official_aug_img_s"], 2)
    r["decode_speedup"] = round(r["packed_noaug_img_s"] / r["official_noaug_img_s"], 2)
    return r


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=48, help="600x450 JPEGs in the speed test")
    parser.add_argument("--seconds", type=float, default=4.0, help="timing window per measurement")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="scratch directory (default: a temporary one)"
    )
    parser.add_argument("--only-smote", action="store_true", help="skip the speed measurements")
    parser.add_argument("--smote-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smote_child:
        smote_child(args.smote_child)
        return

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        (tmp / "smote").mkdir()
        result = run_smote(tmp / "smote")  # first: no other child has run yet
        if not args.only_smote:
            (tmp / "speed").mkdir()
            result.update(run_speed(tmp / "speed", args.images, args.seconds))

    rows = [
        (
            "SMOTE, HAM10000 shape -> 6,705 per class",
            "peak RSS",
            f"{result['smote_peak_rss_gb']:.2f} GB (target <= 2)",
        ),
        (
            "",
            "time / output",
            f"{result['smote_seconds']:.0f} s / {result['smote_output_gb']:.1f} GB written",
        ),
        ("", "fit_resample in float64 needs", f">= {result['official_smote_estimate_gb']:.0f} GB"),
    ]
    if not args.only_smote:
        rows += [
            (
                "official: JPEG + PIL + v1 transforms",
                "with augmentation",
                f"{result['official_aug_img_s']:.0f} img/s",
            ),
            ("", "decode + resize + normalise", f"{result['official_noaug_img_s']:.0f} img/s"),
            ("", "augmentation, oneDNN off", f"{result['official_aug_no_onednn_img_s']:.0f} img/s"),
            ("packed uint8 + v2 transforms", "with augmentation", f"{result['packed_aug_img_s']:.0f} img/s"),
            ("", "read + normalise", f"{result['packed_noaug_img_s']:.0f} img/s"),
            (
                "augment_batch (GPU path) on the CPU",
                "batches of 32",
                f"{result['batched_aug_cpu_img_s']:.0f} img/s",
            ),
            ("speed-up", "loader (augmentation)", f"{result['loader_speedup']:.2f}x (target >= 2)"),
            ("", "decode", f"{result['decode_speedup']:.1f}x (target >= 20)"),
        ]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    print("single process, one thread; images/s per core\n")
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, width)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
