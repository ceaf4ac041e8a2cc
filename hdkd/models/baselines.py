"""Comparison baselines: standard timm architectures trained from scratch under the HDKD protocol.

A baseline is a timm model name plus constructor keyword arguments (``params.yaml``'s ``baselines``
section, validated by :mod:`hdkd.config`). The pipeline fills in ``num_classes``, and ``img_size``
where the architecture takes one (vision transformers do; ResNets and EfficientNets do not).
Weights are always initialised at random: ``pretrained`` is forced off and only bare architecture
names are accepted (no ``.pretrained_tag``, no ``hf-hub:`` prefix), so timm never touches the network.

In the model registry and in model files a baseline is named ``timm:<architecture>`` with its
keyword arguments as the overrides, so :func:`hdkd.checkpoint.load_model` rebuilds it like any model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hdkd.config import build_timm, timm_spec_problem


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


def create_baseline(arch: str, num_classes: int, image_size: int, **kwargs: Any) -> TimmClassifier:
    """A randomly initialised timm ``arch`` for ``num_classes`` classes and ``image_size``² RGB inputs."""
    problem = timm_spec_problem(arch, kwargs)
    if problem:
        raise ValueError(f"baseline {arch!r}, {problem[0]}: {problem[1]}")
    return TimmClassifier(build_timm(arch, num_classes, image_size, kwargs))
