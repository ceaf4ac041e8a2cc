"""Convolutional building blocks (SPEC §1): stem block, CBAM / squeeze-excitation, MBCSA / MBConv.

MBCSA and MBConv are one inverted-residual block that differs only in its attention module, so
they are one class here (:class:`InvertedResidual`) with ``attention="cbam" | "se"``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Attention = Literal["cbam", "se"]


class StemBlock(nn.Module):
    """Conv 3×3 (no bias) → BatchNorm → GELU."""

    def __init__(self, inp: int, oup: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(inp, oup, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(oup)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class ChannelAttention(nn.Module):
    """Shared 1×1-conv MLP over global average- and max-pooled descriptors, summed, sigmoid."""

    def __init__(self, channels: int, ratio: int = 16):
        super().__init__()
        hidden = channels // ratio
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        mx = self.fc2(self.act(self.fc1(x.amax((2, 3), keepdim=True))))
        return torch.sigmoid(avg + mx)


class SpatialAttention(nn.Module):
    """7×7 conv over [mean over channels, max over channels], sigmoid."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))


class CBAM(nn.Module):
    """Channel then spatial attention, with the official code's residual around both."""

    def __init__(self, channels: int):
        super().__init__()
        self.channel = ChannelAttention(channels)
        self.spatial = SpatialAttention(7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * self.channel(x)
        y = y * self.spatial(y)
        return y + x


class SqueezeExcite(nn.Module):
    """Squeeze-excitation: avg-pool → Linear → GELU → Linear → sigmoid → scale."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.fc2(self.act(self.fc1(x.mean((2, 3))))))
        return x * w[:, :, None, None]


class InvertedResidual(nn.Module):
    """MBCSA (``attention="cbam"``) or MBConv (``attention="se"``) block.

    Residual branch: pre-norm BN → 1×1 expand (stride 2 when downsampling) → BN → GELU →
    depthwise 3×3 → BN → GELU → attention → 1×1 project → BN. Shortcut: identity, or
    max-pool(3, 2, 1) → 1×1 conv in a downsampling block.
    """

    def __init__(self, inp: int, oup: int, downsample: bool = False, attention: Attention = "cbam",
                 expansion: int = 4, kernel_size: int = 3):
        super().__init__()
        if not downsample and inp != oup:
            raise ValueError(f"a non-downsampling block needs inp == oup, got {inp} -> {oup}")
        hidden = inp * expansion
        self.downsample = downsample
        if downsample:
            self.pool = nn.MaxPool2d(3, 2, 1)
            self.proj = nn.Conv2d(inp, oup, 1, bias=False)
        self.norm = nn.BatchNorm2d(inp)
        self.conv_pw = nn.Conv2d(inp, hidden, 1, 2 if downsample else 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv_dw = nn.Conv2d(hidden, hidden, kernel_size, 1, kernel_size // 2, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.act = nn.GELU()
        # The official SE squeezes to inp/4 (of the block input), not hidden/4.
        self.attn = CBAM(hidden) if attention == "cbam" else SqueezeExcite(hidden, inp // 4)
        self.conv_pwl = nn.Conv2d(hidden, oup, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(oup)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv_pw(self.norm(x))))
        y = self.act(self.bn2(self.conv_dw(y)))
        y = self.bn3(self.conv_pwl(self.attn(y)))
        shortcut = self.proj(self.pool(x)) if self.downsample else x
        return shortcut + y


def make_stage(kind: Literal["stem", "mbcsa", "mbconv"], inp: int, oup: int, depth: int,
               first_stride: int = 2) -> nn.Sequential:
    """A stage of ``depth`` blocks; the first one changes width and downsamples."""
    if depth < 1:
        raise ValueError(f"a stage needs at least one block, got depth={depth}")
    if kind == "stem":
        return nn.Sequential(*(StemBlock(inp if i == 0 else oup, oup, first_stride if i == 0 else 1)
                               for i in range(depth)))
    attention: Attention = "cbam" if kind == "mbcsa" else "se"
    return nn.Sequential(*(InvertedResidual(inp if i == 0 else oup, oup, downsample=i == 0, attention=attention)
                           for i in range(depth)))
