"""Comparison baselines: standard timm architectures trained from scratch under the HDKD protocol.

A baseline is a timm model name plus constructor keyword arguments (``params.yaml``'s ``baselines``
section, validated by :mod:`hdkd.config` and, against timm, by :func:`check_baselines`). The pipeline fills in
``num_classes``, and ``img_size``
where the architecture takes one (vision transformers do; ResNets and EfficientNets do not).
Weights are always initialised at random: ``pretrained`` is forced off and only bare architecture
names are accepted (no ``.pretrained_tag``, no ``hf-hub:`` prefix), so timm never touches the network.

In the model registry and in model files a baseline is named ``timm:<architecture>`` with its
keyword arguments as the overrides, so :func:`hdkd.models.checkpoint.load_model` rebuilds it like any model.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from torch import nn

from hdkd.config import BaselineConfig, ConfigError, KDConfig, Params


class TimmClassifier(nn.Module):
    """A timm classifier with the HDKD networks' interface, for the training engine and evaluation.

    ``model(x)`` gives the logits; ``model(x, return_features=True)`` gives ``(logits, [])``: a
    baseline trains on cross-entropy alone, so it hands no stage maps to a feature loss.

    A network with a distillation token (timm's ``VisionTransformerDistilled``, DeiT's layout: the ``kd``
    method ``deit``) answers as the HDKD student does: ``(cls_logits, dist_logits)`` in training mode, their
    average in eval mode (DeiT's inference rule).
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        if hasattr(net, "set_distilled_training"):
            net.set_distilled_training(True)  # timm averages the heads in eval mode all the same

    def forward(self, x: torch.Tensor, return_features: bool = False):
        logits = self.net(x)
        return (logits, []) if return_features else logits


def create_baseline(arch: str, num_classes: int, image_size: int, **kwargs: Any) -> TimmClassifier:
    """A randomly initialised timm ``arch`` for ``num_classes`` classes and ``image_size``² RGB inputs."""
    problem = timm_spec_problem(arch, kwargs)
    if problem:
        raise ValueError(f"baseline {arch!r}, {problem[0]}: {problem[1]}")
    return TimmClassifier(build_timm(arch, num_classes, image_size, kwargs))


# Set by the pipeline (classes and input from the data; weights never downloaded), or changing what
# the model returns: not for params.yaml.
RESERVED_KWARGS = ("num_classes", "img_size", "in_chans", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                   "checkpoint_path", "cache_dir", "features_only")
_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")


def build_timm(arch: str, num_classes: int, image_size: int, kwargs: dict[str, Any]):
    """``timm.create_model`` from scratch (never pretrained), with ``img_size`` where the architecture takes it."""
    import timm

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


def timm_spec_problem(arch: str, kwargs: dict[str, Any]) -> tuple[str, str] | None:
    """``(key, message)`` if ``arch`` is not a bare timm architecture or ``kwargs`` holds a reserved key."""
    import difflib

    import timm

    known = timm.list_models()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=3)
        hint = f"; close matches: {', '.join(close)}" if close else " (see timm.list_models())"
        return "timm", f"unknown timm architecture {arch!r} (a bare name, no pretrained tag or hub prefix){hint}"
    for key in kwargs:
        if key in RESERVED_KWARGS:
            return f"kwargs.{key}", ("set by the pipeline (classes and input size come from the data; weights are "
                                     "never downloaded), not in params.yaml")
    return None


def baseline_problem(spec: BaselineConfig | KDConfig, image_size: int) -> tuple[str, str] | None:
    """``(key, message)`` for the first problem with a baseline, the key relative to it; ``None`` if it builds.

    The model is built on the meta device (no memory, no initialisation); a constructor that needs
    real values (``.item()``) fails there, so a failure is confirmed by a CPU build before it is reported.
    """
    problem = timm_spec_problem(spec.timm, spec.kwargs)
    if problem:
        return problem
    try:
        with torch.device("meta"):
            build_timm(spec.timm, 2, image_size, spec.kwargs)
        return None
    except Exception:  # noqa: BLE001 - any constructor error is confirmed (and reported) below
        pass
    try:
        build_timm(spec.timm, 2, image_size, spec.kwargs)
    except TypeError as e:
        name = _unexpected_keyword(e)
        if name in spec.kwargs:
            return f"kwargs.{name}", f"{spec.timm} takes no argument {name!r}"
        return "kwargs", f"timm rejects these kwargs for {spec.timm}: {e}"
    except Exception as e:  # noqa: BLE001 - timm validates with asserts, ValueErrors, RuntimeErrors...
        return "kwargs", (f"timm rejects these kwargs for {spec.timm} at image size {image_size}: "
                          f"{type(e).__name__}: {e}")
    return None


def distilled_problem(spec: KDConfig, image_size: int) -> tuple[str, str] | None:
    """``(key, message)`` if a kd method's timm network does not build or has no distillation token."""
    problem = baseline_problem(spec, image_size)
    if problem:
        return problem
    with torch.device("meta"):
        net = build_timm(spec.timm, 2, image_size, spec.kwargs)
    if not hasattr(net, "set_distilled_training"):
        return "timm", (f"{spec.timm} has no distillation token (method deit needs timm's VisionTransformerDistilled: "
                        "a deit_*_distilled_* architecture)")
    return None


def check_baselines(params: Params, source: str | os.PathLike | None = None) -> None:
    """Each baseline (and each kd method's ViT) is a known timm architecture whose constructor accepts its kwargs
    (built on the meta device: no weights are allocated); else :class:`ConfigError` naming the key. The download
    stage calls it, so a bad baseline fails before the pipeline does any work, and so does each baseline's stage."""
    problems = [(f"baselines.{name}.{p[0]}", p[1]) for name, spec in params.baselines.items()
                if (p := baseline_problem(spec, params.data.image_size))]
    problems += [(f"kd.{name}.{p[0]}", p[1]) for name, spec in params.kd.items()
                 if spec.timm and (p := distilled_problem(spec, params.data.image_size))]
    if problems:
        where = f" in {source}" if source else ""
        raise ConfigError(f"invalid params{where}:\n" + "\n".join(f"  {key}: {msg}" for key, msg in problems))
