"""A teacher that cannot change: no gradients, no BatchNorm statistics updates."""

from __future__ import annotations

import torch
from torch import nn


class FrozenTeacher(nn.Module):
    """Wraps a trained network for distillation: always in eval mode, run under ``no_grad``.

    ``forward`` returns ``(logits, stage_features)`` from one pass. ``train()`` is a no-op, so a
    parent's ``.train()`` can never switch the teacher's BatchNorm to batch statistics.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.model(x, return_features=True)
