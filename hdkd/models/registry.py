"""Named model configurations: ``create_model("hdkd", num_classes=7)``.

``teacher``/``student``/``hdkd`` are the paper's networks (224², SPEC §2); the ``*_tiny`` variants
(the official reference fixture's sizes) train in seconds on a CPU. Keyword overrides reach the
constructor, so ablations are ``create_model("hdkd", 7, block="mbconv", stem_stride=4)``.
``timm:<architecture>`` names a comparison baseline (:mod:`hdkd.models.baselines`); its overrides
are the timm constructor's keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from hdkd.models.networks import HybridStudent, StagedNetwork, TeacherCNN, build_network

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
TIMM_PREFIX = "timm:"

PAPER_TRUNK = dict(depths=(6, 6, 9), widths=(64, 96, 192))
PAPER_STUDENT = dict(depths=(2, 2, 3), widths=(64, 96, 192), dim=256, depth=3, heads=8, dim_head=32)
TINY_TRUNK = dict(depths=(2, 2, 3), widths=(16, 24, 32))
TINY_STUDENT = dict(depths=(1, 1, 2), widths=(16, 24, 32), dim=64, depth=2, heads=2, dim_head=16)


def register(name: str, cls: type[StagedNetwork], **defaults) -> None:
    def build(num_classes: int, image_size: int, **kwargs) -> nn.Module:
        return build_network(cls, num_classes, image_size, **{**defaults, **kwargs})

    _REGISTRY[name] = build


register("teacher", TeacherCNN, **PAPER_TRUNK)
register("student", HybridStudent, distillation=False, **PAPER_STUDENT)
register("hdkd", HybridStudent, distillation=True, **PAPER_STUDENT)
register("teacher_tiny", TeacherCNN, **TINY_TRUNK)
register("student_tiny", HybridStudent, distillation=False, **TINY_STUDENT)
register("hdkd_tiny", HybridStudent, distillation=True, **TINY_STUDENT)


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_name(prefix: str, size: str) -> str:
    """Registry name of a network family (a roster entry's ``registry``) at a size (``paper`` | ``tiny``)."""
    name = prefix if size == "paper" else f"{prefix}_{size}"
    if name not in _REGISTRY:
        raise KeyError(f"no model {name!r}; known: {', '.join(list_models())}")
    return name


def create_model(name: str, num_classes: int, image_size: int = 224, **overrides) -> nn.Module:
    """Build a registered model (or a ``timm:`` baseline); ``overrides`` replace any constructor argument."""
    if name.startswith(TIMM_PREFIX):
        from hdkd.models.baselines import create_baseline  # timm takes seconds to import: only when used

        return create_baseline(name.removeprefix(TIMM_PREFIX), num_classes, image_size, **overrides)
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return _REGISTRY[name](num_classes, image_size, **overrides)
