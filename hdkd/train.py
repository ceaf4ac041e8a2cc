"""Training engine: one loop for the teacher, the student and HDKD."""

from __future__ import annotations

import torch
from torch import nn

from hdkd.losses import HDKDLoss, LossParts


def forward_loss(student: nn.Module, criterion: HDKDLoss, images: torch.Tensor, labels: torch.Tensor,
                 teacher: nn.Module | None = None) -> LossParts:
    """One student pass (and one no-grad teacher pass) → the loss and its parts.

    Both networks return their stage maps from the same pass that produced the logits, so the
    feature loss costs no extra forward.
    """
    teacher_logits = teacher_feats = None
    if teacher is not None:
        teacher_logits, teacher_feats = teacher(images)
    outputs, student_feats = student(images, return_features=True)
    return criterion(outputs, labels, teacher_logits, student_feats, teacher_feats)
