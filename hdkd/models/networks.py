"""The CNN teacher and the hybrid student (SPEC §2).

Both share the same three convolutional stages (stem blocks, then MBCSA or MBConv blocks), so
their stage maps have identical shapes and can be distilled with a plain MSE. ``forward(x,
return_features=True)`` returns the logits *and* the three stage maps of that same pass.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

import torch
from torch import nn

from hdkd.geometry import image_size_step
from hdkd.models.blocks import make_stage
from hdkd.models.transformer import DFLT, TransformerSpec

Logits = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class Stages(nn.ModuleList):
    """The three convolutional stages, in order."""


@dataclass(frozen=True)
class StageSpec:
    """The three convolutional stages (the trunk teacher and student share, map for map): blocks and channels
    per stage, the block type of stages 2 and 3, the stem's stride and the input channels."""

    depths: Sequence[int] = (6, 6, 9)
    widths: Sequence[int] = (64, 96, 192)
    block: Literal["mbcsa", "mbconv"] = "mbcsa"
    stem_stride: int = 2
    in_chans: int = 3


class StagedNetwork(nn.Module):
    """Three convolutional stages and a head; subclasses define :meth:`forward_head`."""

    def __init__(self, image_size: int, spec: StageSpec):
        super().__init__()
        depths, widths, block, stem_stride = spec.depths, spec.widths, spec.block, spec.stem_stride
        if len(depths) != 3 or len(widths) != 3:
            raise ValueError(f"need 3 stage depths and widths, got depths={list(depths)} widths={list(widths)}")
        if block not in ("mbcsa", "mbconv"):
            raise ValueError(f"block must be 'mbcsa' or 'mbconv', got {block!r}")
        if stem_stride not in (2, 4):
            raise ValueError(f"stem_stride must be 2 or 4, got {stem_stride}")
        if image_size % image_size_step(stem_stride):
            raise ValueError(f"image_size {image_size} must be a multiple of {image_size_step(stem_stride)} "
                             f"(three stride-2 stages with stem stride {stem_stride})")
        self.stages = Stages([
            make_stage("stem", spec.in_chans, widths[0], depths[0], first_stride=stem_stride),
            make_stage(block, widths[0], widths[1], depths[1]),
            make_stage(block, widths[1], widths[2], depths[2]),
        ])
        side = image_size // stem_stride
        self.feature_shapes = [(widths[0], side, side), (widths[1], side // 2, side // 2),
                               (widths[2], side // 4, side // 4)]

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The stage-1/2/3 maps, in order."""
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def forward_head(self, x: torch.Tensor) -> Logits:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, return_features: bool = False):
        feats = self.forward_features(x)
        logits = self.forward_head(feats[-1])
        return (logits, feats) if return_features else logits


class TeacherCNN(StagedNetwork):
    """Stages → global average pool → Linear(C3, 128) → Linear(128, classes), no activation between."""

    def __init__(self, num_classes: int, image_size: int = 224, stages: StageSpec = StageSpec(), hidden: int = 128,
                 dropout: float = 0.0):
        super().__init__(image_size, stages)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(stages.widths[2], hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fc(self.drop(x.mean((2, 3)))))


class HybridStudent(StagedNetwork):
    """Stages → DFLT transformer → linear head(s) on the class (and distillation) token.

    With ``distillation=True`` (HDKD) training mode returns ``(cls_logits, dist_logits)`` and eval
    mode returns their average — the inference rule of the paper and DeiT.
    """

    def __init__(self, num_classes: int, image_size: int = 224, stages: StageSpec = StageSpec(depths=(2, 2, 3)),
                 transformer: TransformerSpec = TransformerSpec(), distillation: bool = True, dropout: float = 0.0):
        super().__init__(image_size, stages)
        channels, resolution, _ = self.feature_shapes[-1]
        self.transformer = DFLT(channels, resolution, transformer, distillation, dropout)
        self.head = nn.Linear(transformer.dim, num_classes)
        self.head_dist = nn.Linear(transformer.dim, num_classes) if distillation else None

    def forward_head(self, x: torch.Tensor) -> Logits:
        tokens = self.transformer(x)
        cls = self.head(tokens[:, 0])
        if self.head_dist is None:
            return cls
        dist = self.head_dist(tokens[:, 1])
        return (cls, dist) if self.training else (cls + dist) / 2


def build_network(cls: type[StagedNetwork], num_classes: int, image_size: int, **kwargs) -> StagedNetwork:
    """``cls`` from flat keyword arguments, as params and model files give them (``depths``, ``block``, ``dim``,
    ``distillation``, ...): each one goes to the spec that holds it, the rest to the constructor."""
    specs = {"stages": StageSpec, "transformer": TransformerSpec}
    for name, spec in specs.items():
        if name in inspect.signature(cls).parameters:
            keys = {f.name for f in fields(spec)}
            kwargs[name] = spec(**{k: kwargs.pop(k) for k in list(kwargs) if k in keys})
    return cls(num_classes, image_size, **kwargs)
