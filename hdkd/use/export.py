"""ONNX export of the trained networks, checked against PyTorch with ONNX Runtime, and timed on the CPU.

:func:`export_onnx` writes a network in eval mode — for the HDKD student, the average of its class and
distillation heads, the paper's inference rule — with a dynamic batch axis (input ``images``
float32 N x 3 x S x S, normalised as for evaluation; output ``logits`` N x C), through PyTorch's
``torch.export``-based exporter (``dynamo=True``, the default since PyTorch 2.9; the TorchScript one
is deprecated). The file's ``metadata_props`` carry the registry name, classes and image size
(:data:`hdkd.use.inference.ONNX_METADATA`), so ``hdkd predict`` needs nothing else.

:func:`export_models` (the export stage) exports every trained model, requires on every test image
max |Δ probability| <= ``tolerance`` and the same top-1 class as PyTorch, and times both runtimes
the same way in the same process: one batch of zeros, ``warmup`` untimed runs then the median of
``iters`` timed ones, with as many threads for ONNX Runtime as PyTorch uses. ``reports/export.json``::

    {"exporter", "tolerance",
     "timing_environment": {"threads", "torch", "onnxruntime"},
     "models": {"<name>": {"onnx": path, "opset": int,
                           "parity": {"n_images", "max_abs_diff_probability", "top1_agreement", "top1_mismatches"},
                           "timing_cpu": {"bs<B>": {"batch_size", "pytorch_ms_per_image",
                                                     "onnxruntime_ms_per_image", "pytorch_images_per_s",
                                                     "onnxruntime_images_per_s", "onnxruntime_over_pytorch"}}}}}

Everything machine-dependent sits under a ``timing*`` key, which the reports check
(:mod:`hdkd.report.check`) skips.

``onnxruntime_over_pytorch`` is ONNX Runtime's latency over PyTorch's (below 1: ONNX Runtime is faster).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hdkd.config import EvaluateConfig, Params
from hdkd.data.augment import eval_transform
from hdkd.data.loader import PackedDataset
from hdkd.data.packed import load_split
from hdkd.evaluation.efficiency import median_seconds
from hdkd.infra.io import output_set, write_bytes, write_json
from hdkd.models.checkpoint import load_trained
from hdkd.roster import model_files
from hdkd.use.inference import ONNX_INPUT, ONNX_METADATA, ONNX_OUTPUT, Classifier, OnnxClassifier, TorchClassifier

log = logging.getLogger(__name__)

EXPORTER = "torch.onnx.export(dynamo=True)"
TOLERANCE = 1e-4  # max |Δ probability| allowed between ONNX Runtime and PyTorch


class ParityError(ValueError):
    """An ONNX export disagrees with its PyTorch network on the test split."""


def export_onnx(model: nn.Module, meta: Mapping[str, Any], path: str | Path) -> int:
    """Write ``model`` (CPU, eval mode) as ONNX to ``path`` with ``meta``'s classes, image size and
    registry name in its ``metadata_props``; return the opset."""
    size = int(meta["image_size"])
    model = model.cpu().eval()
    # Batch 2 in the example: torch.export specialises a dimension of size 1 to a constant.
    program = torch.onnx.export(
        model, (torch.zeros(2, 3, size, size),), input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
        dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
    )
    proto = program.model_proto
    _drop_stack_traces(proto)
    for key, name in ONNX_METADATA.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = name, json.dumps(meta[key])
    write_bytes(path, proto.SerializeToString())
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _drop_stack_traces(proto: Any) -> None:
    """Remove the exporter's per-node Python stack traces: they hold absolute source paths, so the same
    network exported from two clones gave two files (and DVC hashes), and they leak the build machine's paths."""
    graphs = [proto.graph, *(f for f in proto.functions)]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            kept = [p for p in node.metadata_props if not p.key.endswith("stack_trace")]
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
            graphs += [a.g for a in node.attribute if a.HasField("g")] + [g for a in node.attribute for g in a.graphs]


def parity(reference: Classifier, candidate: Classifier, loader: DataLoader) -> dict[str, Any]:
    """Largest |Δ probability| and top-1 agreement of two classifiers over every image of ``loader``."""
    max_diff, agree, n = 0.0, 0, 0
    for images, _ in loader:
        p, q = reference.predict_proba(images), candidate.predict_proba(images)
        max_diff = max(max_diff, float(np.abs(p - q).max()))
        agree += int((p.argmax(1) == q.argmax(1)).sum())
        n += len(p)
    if n == 0:
        raise ValueError("parity check on an empty test split")
    return {"n_images": n, "max_abs_diff_probability": max_diff, "top1_agreement": agree / n,
            "top1_mismatches": n - agree}


def compare_latency(model: nn.Module, onnx: OnnxClassifier, image_size: int, batch_size: int,
                    warmup: int, iters: int) -> dict[str, Any]:
    """CPU forward time of one batch of zeros through PyTorch and through ONNX Runtime."""
    x = torch.zeros(batch_size, 3, image_size, image_size)
    feed = {ONNX_INPUT: x.numpy()}
    with torch.inference_mode():
        torch_s = median_seconds(lambda: model(x), warmup, iters)
    onnx_s = median_seconds(lambda: onnx.session.run([ONNX_OUTPUT], feed), warmup, iters)
    return {
        "batch_size": batch_size,
        "pytorch_ms_per_image": torch_s * 1e3 / batch_size,
        "onnxruntime_ms_per_image": onnx_s * 1e3 / batch_size,
        "pytorch_images_per_s": batch_size / torch_s,
        "onnxruntime_images_per_s": batch_size / onnx_s,
        "onnxruntime_over_pytorch": onnx_s / torch_s,
    }


def export_models(models: Mapping[str, str | Path], test_set: Dataset, class_names: Sequence[str],
                  exports_dir: str | Path, *, image_size: int, batch_size: int, latency: EvaluateConfig,
                  tolerance: float = TOLERANCE) -> dict[str, Any]:
    """The export stage: each ``models[name]`` (a ``model.pt``) -> ``<exports_dir>/<name>/model.onnx``,
    checked on ``test_set`` and timed (``latency``: the ``evaluate.latency_*`` settings); returns the report
    (module docstring). Raises
    :class:`ParityError`, naming every failing model, after all were checked. (Not beside the
    ``model.pt``: ``models/`` holds what the training stages write, which evaluate depends on.)"""
    import onnxruntime

    loader = DataLoader(test_set, batch_size=batch_size, shuffle=False)
    threads = torch.get_num_threads()
    report: dict[str, Any] = {
        "exporter": EXPORTER, "tolerance": tolerance, "models": {},
        "timing_environment": {"threads": threads, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
    }
    failures = []
    for name, path in models.items():
        path = Path(path)
        model, meta = load_trained(path, class_names, image_size)
        model.eval()
        onnx_path = Path(exports_dir) / name / "model.onnx"
        opset = export_onnx(model, meta, onnx_path)
        exported = OnnxClassifier(onnx_path, threads=threads)
        check = parity(TorchClassifier(model, meta["classes"], meta["image_size"], str(path)), exported, loader)
        if check["max_abs_diff_probability"] > tolerance or check["top1_mismatches"]:
            failures.append(f"{onnx_path}: max |Δ probability| {check['max_abs_diff_probability']:.3g} "
                            f"(allowed {tolerance:g}), top-1 differs on {check['top1_mismatches']} of "
                            f"{check['n_images']} test images")
        report["models"][name] = {
            "onnx": str(onnx_path), "opset": opset, "parity": check,
            "timing_cpu": {f"bs{b}": compare_latency(model, exported, meta["image_size"], b, latency.latency_warmup,
                                                     latency.latency_iters) for b in latency.latency_batch_sizes},
        }
    if failures:
        raise ParityError("ONNX export disagrees with PyTorch: " + "; ".join(failures))
    return report


def export_stage(params: Params, data_dir: str | os.PathLike, models_dir: str | os.PathLike,
                 exports_dir: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """The export stage: the paper's three trained models -> ONNX in ``exports_dir``, checked and timed on the
    test split -> ``out`` (the baselines are timm models, used for comparison only, and are not exported)."""
    models = model_files(models_dir)
    test = load_split(data_dir, "test", image_size=params.data.image_size)
    with output_set() as outputs:  # the ONNX files and their checks together, or neither
        staged = outputs.dir(exports_dir)
        report = export_models(models, PackedDataset(test, eval_transform()), list(test.classes), staged,
                               image_size=params.data.image_size, batch_size=params.train.eval_batch_size,
                               latency=params.evaluate)
        for entry in report["models"].values():  # where the files will be, not where they were checked
            entry["onnx"] = str(Path(exports_dir) / Path(entry["onnx"]).relative_to(staged))
        write_json(outputs.file(out), report)
    for name, entry in report["models"].items():
        log.info("%s: %s, max |Δp| %.2g, top-1 agreement %.4f, ONNX Runtime / PyTorch latency %s", name,
                 entry["onnx"], entry["parity"]["max_abs_diff_probability"], entry["parity"]["top1_agreement"],
                 ", ".join(f"{k} {v['onnxruntime_over_pytorch']:.2f}" for k, v in entry["timing_cpu"].items()))
    return report
