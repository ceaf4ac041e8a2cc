"""``hdkd predict``: class probabilities of image files from a trained model.

::

    hdkd predict --model models/hdkd/model.pt [--out FILE] [--top-k K] INPUT...

``--model`` is a model file (``models/<role>/model.pt``), an ONNX export (``exports/<role>/model.onnx``) or an MLflow
model URI (see :mod:`hdkd.use.inference`). An INPUT is an image file, a folder (every file under it, hidden
ones left out) or a glob pattern (``'scans/**/*.png'``, quoted so that the shell leaves it alone).
Images are decoded, resized and normalised exactly as for evaluation, in batches of ``--batch-size``,
on the GPU when there is one (``--device``).

Output (``--out FILE``, else stdout), CSV unless ``--format json`` or ``FILE`` ends in ``.json``:

- CSV: columns ``path, predicted, probability, top_k, error``; ``top_k`` is a JSON list of
  ``{"class", "probability"}``, most probable first. Inputs that could not be read come after the
  predictions, as rows with only ``path`` and ``error`` filled.
- JSON: ``{"model", "classes", "predictions": [{path, predicted, probability, top_k}], "errors":
  [{path, error}]}``, one value per line, indented by two spaces a level (to read and to diff).

Every input that could not be read is also reported on stderr. Exit status: 0 when at least one
image got a prediction, 2 when none did, 1 on an error that stops everything (the model cannot be
loaded, or its classes differ from ``--label-file``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from hdkd.data.errors import UnreadableImage
from hdkd.infra.distributed import device_type
from hdkd.infra.io import csv_text, write_text
from hdkd.use.inference import Classifier, check_classes, load_classifier, read_image, to_batch

HELP = "predict the classes of image files with a trained model"
CSV_COLUMNS = ("path", "predicted", "probability", "top_k", "error")
GLOB_CHARACTERS = "*?["


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="models/<role>/model.pt, an exported model.onnx, "
                             "or an MLflow model URI (models:/..., runs:/...)")
    parser.add_argument("--out", type=Path, help="output file (default: stdout)")
    parser.add_argument("--format", choices=("csv", "json"), help="default: json if --out ends in .json, else csv")
    parser.add_argument("--top-k", type=_positive, default=3, help="classes listed per image (default 3)")
    parser.add_argument("--batch-size", type=_positive, default=32, help="images per batch (default 32)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="default auto: the GPU when there is one")
    parser.add_argument("--label-file", type=Path,
                        help="class names, one a line, in label order: fail unless the model's classes are these")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but no CUDA device is available; use --device auto or cpu")
    classifier = load_classifier(args.model, device_type(args.device))
    if args.label_file:
        check_classes(classifier, args.label_file)
    files, errors = expand_inputs(args.inputs)
    predictions, unreadable = predict_files(classifier, files, args.batch_size, args.top_k)
    errors += unreadable
    for e in errors:
        print(f"hdkd predict: skipped {e['path']}: {e['error']}", file=sys.stderr)
    fmt = args.format or ("json" if args.out and args.out.suffix.lower() == ".json" else "csv")
    text = render(fmt, classifier, predictions, errors)
    if args.out:
        write_text(args.out, text)
    else:
        sys.stdout.write(text)
    return 0 if predictions else 2


def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[dict[str, str]]]:
    """The files the inputs name, in order, each once; and an error for each input that names none."""
    files: list[Path] = []
    errors = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(f for f in path.rglob("*")
                           if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts))
            files += found
            if not found:
                errors.append({"path": item, "error": "folder holds no files"})
        elif path.is_file():
            files.append(path)
        elif any(c in item for c in GLOB_CHARACTERS):
            found = sorted(_glob(item))
            files += found
            if not found:
                errors.append({"path": item, "error": "no file matches this pattern"})
        else:
            errors.append({"path": item, "error": "no such file or folder"})
    return _each_once(files), errors


def _glob(pattern: str) -> list[Path]:
    """The files a pattern matches (``**``: any depth), hidden ones left out unless the pattern names them.

    ``**`` does not descend into symlinked directories (``glob.glob`` does: a link to ``.`` matched every
    image again at each of 40 depths, two such links never ended).
    """
    parts = Path(pattern).parts
    first = next(i for i, part in enumerate(parts) if any(c in part for c in GLOB_CHARACTERS))
    base, rest = Path(*parts[:first]) if first else Path(), parts[first:]
    if rest[-1] == "**":  # as glob.glob: every file at any depth (pathlib's ** alone yields folders)
        rest = (*rest, "*")
    if not base.is_dir():
        return []
    hidden_asked = any(part.startswith(".") for part in rest)
    return [m for m in base.glob("/".join(rest))  # pathlib's ** never follows a symlinked directory
            if m.is_file() and (hidden_asked or not any(p.startswith(".") for p in m.relative_to(base).parts))]


def _each_once(files: Sequence[Path]) -> list[Path]:
    """``files`` in order, each file once: a later path to the same file (through a link) is dropped."""
    seen, out = set(), []
    for f in files:
        key = os.path.realpath(f)
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def predict_files(classifier: Classifier, files: Sequence[Path], batch_size: int,
                  top_k: int) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Predictions of the readable files, in order; an error (path, reason) for each unreadable one."""
    predictions, errors = [], []
    with tqdm(total=len(files), desc="predict", unit="img", disable=len(files) <= 4 * batch_size) as bar:
        for batch, decoded in _decoded_batches(files, batch_size, classifier.image_size):
            good = [(path, image) for path, image in zip(batch, decoded) if not isinstance(image, UnreadableImage)]
            errors += [{"path": str(path), "error": image.reason}
                       for path, image in zip(batch, decoded) if isinstance(image, UnreadableImage)]
            if good:
                probs = classifier.predict_proba(to_batch([image for _, image in good]))
                predictions += [prediction(str(path), p, classifier.classes, top_k)
                                for (path, _), p in zip(good, probs)]
            bar.update(len(batch))
    return predictions, errors


def _decoded_batches(files: Sequence[Path], batch_size: int,
                     image_size: int) -> Iterator[tuple[Sequence[Path], list[np.ndarray | UnreadableImage]]]:
    """Batches of files with their decoded images (or why not), decoding the next batch on threads
    while the caller runs the model on this one."""

    def read(path: Path) -> np.ndarray | UnreadableImage:
        try:
            return read_image(path, image_size)
        except UnreadableImage as e:
            return e

    batches = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        ahead: list[Future] = [pool.submit(read, p) for p in batches[0]] if batches else []
        for i, batch in enumerate(batches):
            current = ahead
            ahead = [pool.submit(read, p) for p in batches[i + 1]] if i + 1 < len(batches) else []
            yield batch, [f.result() for f in current]


def prediction(path: str, probs: np.ndarray, classes: Sequence[str], top_k: int) -> dict[str, Any]:
    """One output record: the most probable class and the ``top_k`` most probable with their probabilities."""
    order = np.argsort(-probs, kind="stable")[:top_k]  # ties: the lower label first, as argmax
    return {"path": path, "predicted": classes[order[0]], "probability": float(probs[order[0]]),
            "top_k": [{"class": classes[j], "probability": float(probs[j])} for j in order]}


def render(fmt: str, classifier: Classifier, predictions: Sequence[dict[str, Any]],
           errors: Sequence[dict[str, str]]) -> str:
    """The output file's text (see the module docstring)."""
    if fmt == "json":
        return json.dumps({"model": classifier.source, "classes": list(classifier.classes),
                           "predictions": list(predictions), "errors": list(errors)}, indent=2) + "\n"
    rows = [CSV_COLUMNS]
    rows += [(p["path"], p["predicted"], p["probability"], json.dumps(p["top_k"]), "") for p in predictions]
    rows += [(e["path"], "", "", "", e["error"]) for e in errors]
    return csv_text(rows)
