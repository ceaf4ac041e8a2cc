"""Comparison baselines: standard timm architectures trained from scratch under the HDKD protocol.

A baseline is a timm model name plus constructor keyword arguments (``params.yaml``'s ``baselines``
section). The pipeline fills in ``num_classes``, and ``img_size`` where the architecture takes one
(vision transformers do; ResNets and EfficientNets do not). Weights are always initialised at
random: ``pretrained`` is forced off and only bare architecture names are accepted (no
``.pretrained_tag``, no ``hf-hub:`` prefix), so timm never touches the network.

In the model registry and in model files a baseline is named ``timm:<architecture>`` with its
keyword arguments as the overrides, so :func:`hdkd.checkpoint.load_model` rebuilds it like any model.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import timm
import torch
from torch import nn

if TYPE_CHECKING:
    from hdkd.config import BaselineConfig

# Set by the pipeline (classes and input from the data; weights never downloaded), or changing what
# the model returns: not for params.yaml.
RESERVED_KWARGS = ("num_classes", "img_size", "in_chans", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                   "checkpoint_path", "cache_dir", "features_only")
_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")


class TimmClassifier(nn.Module):
    """A timm classifier with the HDKD networks' interface, for the training engine and evaluation.

    ``model(x)`` gives the logits; ``model(x, return_features=True)`` gives ``(logits, [])``: a
    baseline trains on cross-entropy alone, so it hands no stage maps to a feature loss.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, return_features: bool = False):
        logits = self.net(x)
        return (logits, []) if return_features else logits


def _build(arch: str, num_classes: int, image_size: int, kwargs: Mapping[str, Any]) -> nn.Module:
    """``timm.create_model`` from scratch, with ``img_size`` where the architecture takes it."""
    try:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, img_size=image_size, **kwargs)
    except TypeError as e:
        # timm's entry points pass keywords through to the model class, which names the one it lacks;
        # classes without an input size (ResNet, EfficientNet) reject img_size, and are built without.
        if _unexpected_keyword(e) != "img_size":
            raise
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)


def _unexpected_keyword(error: TypeError) -> str | None:
    match = _UNEXPECTED.search(str(error))
    return match.group(1) if match else None


def create_baseline(arch: str, num_classes: int, image_size: int, **kwargs: Any) -> TimmClassifier:
    """A randomly initialised timm ``arch`` for ``num_classes`` classes and ``image_size``² RGB inputs."""
    problem = _check_name(arch) or _check_reserved(kwargs)
    if problem:
        raise ValueError(f"baseline {arch!r}, {problem[0]}: {problem[1]}")
    return TimmClassifier(_build(arch, num_classes, image_size, kwargs))


def _check_name(arch: str) -> tuple[str, str] | None:
    known = timm.list_models()
    if arch in known:
        return None
    close = difflib.get_close_matches(arch, known, n=3)
    hint = f"; close matches: {', '.join(close)}" if close else " (see timm.list_models())"
    return "timm", f"unknown timm architecture {arch!r} (a bare name, no pretrained tag or hub prefix){hint}"


def _check_reserved(kwargs: Mapping[str, Any]) -> tuple[str, str] | None:
    for key in kwargs:
        if key in RESERVED_KWARGS:
            return f"kwargs.{key}", "set by the pipeline (classes and input size come from the data; weights are " \
                                    "never downloaded), not in params.yaml"
    return None


def check_baseline(spec: BaselineConfig, image_size: int) -> tuple[str, str] | None:
    """``(key, message)`` for the first problem with a baseline's spec, or ``None``.

    The key is relative to the baseline (``timm``, ``kwargs.depthh``, ``kwargs``). The model is
    built on the meta device (no memory, no initialisation); a constructor that needs real values
    (``.item()``) fails there, so a failure is confirmed with a CPU build before it is reported.
    """
    problem = _check_name(spec.timm) or _check_reserved(spec.kwargs)
    if problem:
        return problem
    try:
        with torch.device("meta"):
            _build(spec.timm, 2, image_size, spec.kwargs)
        return None
    except Exception:  # noqa: BLE001 - any constructor error is confirmed (and reported) below
        pass
    try:
        _build(spec.timm, 2, image_size, spec.kwargs)
    except TypeError as e:
        name = _unexpected_keyword(e)
        if name in spec.kwargs:
            return f"kwargs.{name}", f"{spec.timm} takes no argument {name!r}"
        return "kwargs", f"timm rejects these kwargs for {spec.timm}: {e}"
    except Exception as e:  # noqa: BLE001 - timm validates with asserts, ValueErrors, RuntimeErrors...
        return "kwargs", f"timm rejects these kwargs for {spec.timm} at image size {image_size}: " \
                         f"{type(e).__name__}: {e}"
    return None
