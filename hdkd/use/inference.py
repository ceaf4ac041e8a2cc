"""Trained classifiers behind one interface, whatever file they come from, with evaluation's preprocessing.

:func:`load_classifier` opens

- a model file written by the training stages (``models/<role>/model.pt``, :mod:`hdkd.models.checkpoint`);
- an ONNX export (``exports/<role>/model.onnx``, :mod:`hdkd.use.export`), run with ONNX Runtime; the file
  carries the class names and input size in its ``metadata_props`` (:data:`ONNX_METADATA`);
- an MLflow model URI (``models:/<name>/<version>``, ``runs:/<run id>/<path>``, ...) of the PyTorch
  flavour, logged in eval mode with ``metadata={k: meta[k] for k in CHECKPOINT_KEYS}`` (``meta`` being
  what :func:`hdkd.models.checkpoint.load_model` returns), in either serialisation: ``pt2`` (MLflow's
  default, a ``torch.export`` graph; give an ``input_example`` batch of 2 or more) or ``pickle``
  (unpickles the whole module: load only models you trust).

Every backend maps a batch of normalised images to float64 softmax probabilities, as
:func:`hdkd.evaluation.evaluate.predict_proba` does. :func:`read_image` decodes and resizes a file exactly as the
prepare stage packs it, and :func:`to_batch` normalises as :func:`hdkd.data.eval_transform` does, so a
prediction on an image file equals evaluate's on the same image in the packed test split.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from hdkd.data.augment import eval_transform
from hdkd.data.images import load_resized
from hdkd.infra.mlflow_store import check_server_reachable
from hdkd.models.checkpoint import CHECKPOINT_KEYS, load_model

ONNX_METADATA = {key: f"hdkd.{key}" for key in CHECKPOINT_KEYS}  # metadata_props names, values JSON
ONNX_INPUT, ONNX_OUTPUT = "images", "logits"
MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


class Classifier:
    """Images (float32 N x 3 x S x S, normalised) -> softmax probabilities (float64 N x C)."""

    classes: tuple[str, ...]
    image_size: int
    source: str  # what was loaded, for messages

    def predict_proba(self, images: torch.Tensor) -> np.ndarray:
        raise NotImplementedError


class TorchClassifier(Classifier):
    """A PyTorch network on ``device``, given in eval mode (a ``torch.export`` graph cannot switch modes)."""

    def __init__(self, model: nn.Module, classes: Sequence[str], image_size: int, source: str,
                 device: torch.device | str = "cpu"):
        self.model = model.to(device)
        self.device = torch.device(device)
        self.classes, self.image_size, self.source = tuple(classes), int(image_size), source

    @torch.inference_mode()
    def predict_proba(self, images: torch.Tensor) -> np.ndarray:
        logits = self.model(images.to(self.device, non_blocking=True))
        if not isinstance(logits, torch.Tensor) or logits.shape != (len(images), len(self.classes)):
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"{self.source} must return logits (B={len(images)}, C={len(self.classes)}) "
                             f"in eval mode, got {got}")
        return torch.softmax(logits.double(), dim=1).cpu().numpy()


class OnnxClassifier(Classifier):
    """An ONNX export run by ONNX Runtime (CUDA provider first when ``device`` is CUDA and it is installed)."""

    def __init__(self, path: str | os.PathLike, device: torch.device | str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        self.source = str(path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        if not Path(path).is_file():
            raise FileNotFoundError(f"ONNX model not found: {path}")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise ValueError(f"{path} is not a loadable ONNX model: {e}") from e
        props = self.session.get_modelmeta().custom_metadata_map
        missing = [name for name in ONNX_METADATA.values() if name not in props]
        if missing:
            raise ValueError(f"{path} is not an hdkd ONNX export: its metadata_props lack {missing} "
                             "(export it with `python -m pipeline.export`)")
        meta = {key: json.loads(props[name]) for key, name in ONNX_METADATA.items()}
        self.classes, self.image_size = tuple(meta["classes"]), int(meta["image_size"])

    def predict_proba(self, images: torch.Tensor) -> np.ndarray:
        (logits,) = self.session.run([ONNX_OUTPUT], {ONNX_INPUT: images.cpu().numpy()})
        return torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()


def is_mlflow_uri(ref: str) -> bool:
    return ref.startswith(MLFLOW_SCHEMES)


def load_classifier(ref: str | os.PathLike, device: torch.device | str = "cpu") -> Classifier:
    """The classifier of a model file (``.pt``), an ONNX export (``.onnx``) or an MLflow model URI.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming it for anything that is
    not such a model.
    """
    ref = str(ref)
    if is_mlflow_uri(ref):
        return _load_mlflow(ref, device)
    if Path(ref).suffix.lower() == ".onnx":
        return OnnxClassifier(ref, device)
    model, meta = load_model(ref, device)
    return TorchClassifier(model.eval(), meta["classes"], meta["image_size"], ref, device)


def _load_mlflow(uri: str, device: torch.device | str) -> Classifier:
    import mlflow
    import mlflow.models
    import mlflow.pytorch

    try:
        # A tracking server that is down or hung would cost minutes of MLflow's retries (120 s a request).
        for store in dict.fromkeys((mlflow.get_registry_uri(), mlflow.get_tracking_uri())):
            check_server_reachable(store, advice="start it, or point MLFLOW_TRACKING_URI (and MLFLOW_REGISTRY_URI) "
                                                 "at the server that holds the model")
        info = mlflow.models.get_model_info(uri)
    except Exception as e:  # MLflow raises MlflowException, OSError, ... for unknown URIs
        raise ValueError(f"cannot open MLflow model {uri}: {e}") from e
    if "pytorch" not in info.flavors:
        raise ValueError(f"MLflow model {uri} has flavours {sorted(info.flavors)}, not 'pytorch'")
    meta = info.metadata or {}
    missing = [k for k in CHECKPOINT_KEYS if k not in meta]
    if missing:
        raise ValueError(f"MLflow model {uri} lacks metadata {missing}: log it with mlflow.pytorch.log_model("
                         "..., metadata={k: meta[k] for k in hdkd.models.checkpoint.CHECKPOINT_KEYS})")
    model = mlflow.pytorch.load_model(uri, map_location=torch.device(device))
    if not isinstance(model, torch.fx.GraphModule):  # a "pt2" (torch.export) model keeps its logged mode
        model.eval()
    return TorchClassifier(model, meta["classes"], meta["image_size"], uri, device)


def read_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """``uint8`` S x S x 3 RGB, decoded and resized as prepare packs images; raises
    :class:`hdkd.data.errors.UnreadableImage` (with the reason) for a file that is not a readable image."""
    return load_resized(lambda: Image.open(path), image_size, str(path))


def to_batch(images: Sequence[np.ndarray]) -> torch.Tensor:
    """Decoded ``uint8`` H x W x 3 images -> the float32 batch evaluation feeds the network."""
    # eval_transform is elementwise: on the stacked batch it gives each image what it gives it alone.
    return eval_transform()(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))


def check_classes(classifier: Classifier, label_file: str | os.PathLike) -> None:
    """Fail unless ``label_file`` (one class name a line) lists the classifier's classes in order."""
    names = [line.strip() for line in Path(label_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    if names != list(classifier.classes):
        raise ValueError(f"{classifier.source} was trained on classes {list(classifier.classes)}, "
                         f"but the label file {label_file} lists {names}")

