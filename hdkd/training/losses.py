"""HDKD losses (SPEC §3): logit distillation through the distillation token, feature distillation; and the
losses of the methods HDKD claims to beat: DeiT's (``LogitDistillationLoss("hard", 0.5)``), logit-only
distillation (λ = 0) and feature distillation through alignment layers (:class:`AlignedFeatureDistillationLoss`).

Losses see logits and feature lists, never models: each network runs once per step and hands its
stage maps from that single pass (the official code re-runs stage prefixes once per stage).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

Logits = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class LossParts(NamedTuple):
    """The total loss and its parts (``total = logit + lambda * feature``), for logging."""

    total: torch.Tensor
    logit: torch.Tensor  # L_logit = (1-α)·CE + α·KD (or plain CE)
    ce: torch.Tensor  # cross-entropy of the class head with the labels
    logit_kd: torch.Tensor  # the distillation-head term (0 for type "none")
    feature: torch.Tensor  # L_F, before the λ weight (0 without feature distillation)
    # The weighted terms whose sum is ``total``: ``ce``, ``kd`` (distillation only) and
    # ``feature_stage<k>`` (λ·(i+1)^β·MSE of stage k) — what the training diagnostics log and probe.
    terms: dict[str, torch.Tensor]


class LogitDistillationLoss(nn.Module):
    """DeiT-style distillation: CE on the class head, KD on the distillation head.

    ``none``: CE(z_cls, y). ``soft``: (1-α)·CE + α·τ²·KL(p_t ‖ p_s) with the KL summed and divided by
    ``z_dist.numel()`` (``reduction="numel"``, the official/DeiT normalisation) or by the batch size
    (``"batch"``, the textbook KL). ``hard``: (1-α)·CE + α·CE(z_dist, argmax t).
    """

    def __init__(self, kind: Literal["none", "soft", "hard"] = "soft", alpha: float = 0.5, tau: float = 1.0,
                 reduction: Literal["numel", "batch"] = "numel"):
        super().__init__()
        if kind not in ("none", "soft", "hard"):
            raise ValueError(f"distillation type must be none, soft or hard, got {kind!r}")
        if not 0.0 <= alpha <= 1.0 or tau <= 0:
            raise ValueError(f"need 0 <= alpha <= 1 and tau > 0, got alpha={alpha}, tau={tau}")
        if reduction not in ("numel", "batch"):
            raise ValueError(f"reduction must be numel or batch, got {reduction!r}")
        self.kind, self.alpha, self.tau, self.reduction = kind, alpha, tau, reduction

    def forward(self, outputs: Logits, labels: torch.Tensor,
                teacher_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(loss, ce, kd)``; ``outputs`` is ``z_cls`` or ``(z_cls, z_dist)``."""
        z_cls, z_dist = outputs if isinstance(outputs, tuple) else (outputs, None)
        ce = F.cross_entropy(z_cls, labels)
        if self.kind == "none":
            return ce, ce, ce.new_zeros(())
        if z_dist is None or teacher_logits is None:
            raise ValueError(f"'{self.kind}' distillation needs the student's (cls, dist) logits and teacher logits")
        teacher_logits = teacher_logits.detach()
        if self.kind == "soft":
            t = self.tau
            kl = F.kl_div(F.log_softmax(z_dist / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                          reduction="sum", log_target=True)
            kd = kl * (t * t) / (z_dist.numel() if self.reduction == "numel" else z_dist.shape[0])
        else:
            kd = F.cross_entropy(z_dist, teacher_logits.argmax(dim=1))
        return (1 - self.alpha) * ce + self.alpha * kd, ce, kd


class FeatureDistillationLoss(nn.Module):
    """``L_F = Σ_i (i+1)^β · MSE(student[s_i], teacher[s_i])`` over the chosen stages.

    Stages are 1-based (1, 2, 3); ``i`` is the stage's position in the list, as in the official code.
    """

    def __init__(self, stages: Sequence[int] = (1, 2, 3), beta: float = 1.0):
        super().__init__()
        if not stages:
            raise ValueError("feature distillation needs at least one stage")
        self.stages = list(stages)
        self.weights = [(i + 1) ** beta for i in range(len(self.stages))]

    def stage_losses(self, student_feats: Sequence[torch.Tensor],
                     teacher_feats: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
        """Stage -> its weighted term ``(i+1)^β · MSE``; :meth:`forward` is their sum."""
        losses = {}
        for w, s in zip(self.weights, self.stages):
            fs, ft = student_feats[s - 1], teacher_feats[s - 1]
            if fs.shape != ft.shape:
                raise ValueError(f"feature distillation needs equal shapes: student stage {s} is "
                                 f"{tuple(fs.shape)}, teacher stage {s} is {tuple(ft.shape)}")
            losses[s] = w * F.mse_loss(fs, ft.detach())
        return losses

    def forward(self, student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]) -> torch.Tensor:
        loss = student_feats[0].new_zeros(())
        for term in self.stage_losses(student_feats, teacher_feats).values():
            loss = loss + term
        return loss


class AlignedFeatureDistillationLoss(FeatureDistillationLoss):
    """Feature distillation through alignment layers (FitNets' regressors), the operation HDKD does without:
    each distilled student map passes through a learned 1×1 convolution before the same weighted MSE. The
    projectors train with the student (they are this loss's parameters) and are dropped after training.
    ``channels``: the widths of the three stages (teacher and student share them)."""

    def __init__(self, channels: Sequence[int], stages: Sequence[int] = (1, 2, 3), beta: float = 1.0):
        super().__init__(stages, beta)
        self.projectors = nn.ModuleDict({str(s): nn.Conv2d(channels[s - 1], channels[s - 1], 1) for s in self.stages})

    def stage_losses(self, student_feats: Sequence[torch.Tensor],
                     teacher_feats: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
        projected = [self.projectors[str(k)](f) if str(k) in self.projectors else f
                     for k, f in enumerate(student_feats, 1)]
        return super().stage_losses(projected, teacher_feats)


class HDKDLoss(nn.Module):
    """``L = L_logit + λ·L_F`` from one student pass and one (no-grad) teacher pass."""

    def __init__(self, logit: LogitDistillationLoss, feature: FeatureDistillationLoss | None = None,
                 lambda_: float = 10.0):
        super().__init__()
        self.logit, self.feature, self.lambda_ = logit, feature, lambda_

    @property
    def needs_features(self) -> bool:
        return self.feature is not None and self.lambda_ > 0

    def forward(self, outputs: Logits, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                student_feats: Sequence[torch.Tensor] | None = None,
                teacher_feats: Sequence[torch.Tensor] | None = None) -> LossParts:
        logit, ce, kd = self.logit(outputs, labels, teacher_logits)
        if self.logit.kind == "none":
            terms = {"ce": logit}
        else:
            terms = {"ce": (1 - self.logit.alpha) * ce, "kd": self.logit.alpha * kd}
        feature = logit.new_zeros(())
        if self.needs_features:
            for stage, term in self.feature.stage_losses(student_feats, teacher_feats).items():
                feature = feature + term
                terms[f"feature_stage{stage}"] = self.lambda_ * term
        return LossParts(logit + self.lambda_ * feature, logit, ce, kd, feature, terms)
