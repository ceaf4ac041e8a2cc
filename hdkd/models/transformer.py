"""DFLT: the distilled feature-level transformer on the student's stage-3 map (SPEC §2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hdkd.geometry import PATCH_SIZE


class PatchEmbed(nn.Module):
    """``b c (h p) (w p) -> b (h w) (p p c)`` → LayerNorm → Linear → LayerNorm."""

    def __init__(self, channels: int, dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        patch_dim = channels * patch_size * patch_size
        self.norm_in = nn.LayerNorm(patch_dim)
        self.proj = nn.Linear(patch_dim, dim)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        p = self.patch_size
        h, w = hh // p, ww // p
        # Token vectors are ordered (p1, p2, c), as in the official einops pattern.
        x = x.reshape(b, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, p * p * c)
        return self.norm_out(self.proj(self.norm_in(x)))


class Attention(nn.Module):
    """Pre-normed multi-head self-attention; no output projection when heads=1 and dim_head=dim."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dropout = dropout
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        project = not (heads == 1 and dim_head == dim)
        self.proj = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout)) if project else nn.Identity()

    def heads_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """Queries, keys and values per head: ``(3, B, heads, N, dim_head)``."""
        b, n, _ = x.shape
        return self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The softmax attention ``(B, heads, N, N)`` that :meth:`forward` applies (for explanations:
        the fused kernel in ``forward`` never materialises it)."""
        q, k, _ = self.heads_qkv(x)
        return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.heads_qkv(x)
        # SDPA's default scale is dim_head ** -0.5, the official one.
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    """Linear → GELU → Linear; not pre-normed (faithful to the official code)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class TransformerLayer(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.attn = Attention(dim, heads, dim_head, dropout)
        self.mlp = FeedForward(dim, dim * mlp_ratio, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(x) + x
        return self.mlp(x) + x


@dataclass(frozen=True)
class TransformerSpec:
    """The student's transformer (DFLT): token width, layers, heads, patch side on the stage-3 map, MLP ratio."""

    dim: int = 256
    depth: int = 3
    heads: int = 8
    dim_head: int = 32
    patch_size: int = PATCH_SIZE
    mlp_ratio: int = 4


class DFLT(nn.Module):
    """Patch tokens of a (C, H, W) map, class (+ distillation) token, ``depth`` layers, final LayerNorm.

    Returns all tokens ``(B, N + 1 or 2, dim)``: index 0 is the class token, index 1 the
    distillation token when ``distillation`` is on.
    """

    def __init__(self, channels: int, resolution: int, spec: TransformerSpec = TransformerSpec(),
                 distillation: bool = True, dropout: float = 0.0):
        super().__init__()
        dim, patch_size = spec.dim, spec.patch_size
        if resolution % patch_size:
            raise ValueError(f"feature map side {resolution} is not divisible by the patch size {patch_size}")
        num_patches = (resolution // patch_size) ** 2
        self.patch_embed = PatchEmbed(channels, dim, patch_size)
        # Official initialisation: standard-normal tokens and positions.
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dist_token = nn.Parameter(torch.randn(1, 1, dim)) if distillation else None
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + (2 if distillation else 1), dim))
        self.pos_drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(TransformerLayer(dim, spec.heads, spec.dim_head, spec.mlp_ratio, dropout)
                                    for _ in range(spec.depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        prefix = [self.cls_token] if self.dist_token is None else [self.cls_token, self.dist_token]
        x = torch.cat([t.expand(x.shape[0], -1, -1) for t in prefix] + [x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)
