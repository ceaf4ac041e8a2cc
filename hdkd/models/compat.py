"""Checkpoints of the official HDKD implementation: load them into these models, save them back.

The official code names modules after how they were built (``stage2.0.conv.fn.6`` for the CBAM of
a block); these models name them after what they are (``stages.1.0.attn``). The translation is a
table of child renames per module class: a key is translated by walking the model's own module
tree, so it holds for any configuration (depths, widths, block type) and for bare blocks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hdkd.infra.torch_io import load_torch, save_torch
from hdkd.models.blocks import CBAM, ChannelAttention, InvertedResidual, SpatialAttention, SqueezeExcite, StemBlock
from hdkd.models.networks import HybridStudent, Stages, TeacherCNN
from hdkd.models.transformer import DFLT, Attention, FeedForward, PatchEmbed, TransformerLayer

# Child name here -> path in the official code ("" drops the level).
OFFICIAL_NAMES: dict[type, dict[str, str]] = {
    TeacherCNN: {"stages": "", "fc": "fn1"},
    HybridStudent: {"stages": "", "transformer": "DFLT_module", "head": "head_cls", "head_dist": "head_distill"},
    Stages: {"0": "stage1", "1": "stage2", "2": "stage3"},
    StemBlock: {"conv": "0", "bn": "1"},
    InvertedResidual: {"norm": "conv.norm", "conv_pw": "conv.fn.0", "bn1": "conv.fn.1", "conv_dw": "conv.fn.3",
                       "bn2": "conv.fn.4", "attn": "conv.fn.6", "conv_pwl": "conv.fn.7", "bn3": "conv.fn.8"},
    CBAM: {"channel": "channel_attention", "spatial": "spatial_attention"},
    ChannelAttention: {"fc1": "fc.0", "fc2": "fc.2"},
    SpatialAttention: {"conv": "conv1"},
    SqueezeExcite: {"fc1": "fc.0", "fc2": "fc.2"},
    DFLT: {"patch_embed": "to_patch_embedding", "pos_embed": "pos_embedding", "dist_token": "distill_token",
           "layers": "transformer.layers", "norm": "transformer.norm"},
    PatchEmbed: {"norm_in": "1", "proj": "2", "norm_out": "3"},
    TransformerLayer: {"attn": "0", "mlp": "1"},
    Attention: {"qkv": "to_qkv", "proj": "to_out"},
    FeedForward: {"fc1": "net.0", "fc2": "net.3"},
}


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model; the message lists every missing, unexpected or mis-shaped key."""


def official_key(model: nn.Module, key: str) -> str:
    """Translate one of ``model.state_dict()``'s keys to the official implementation's name."""
    module, out = model, []
    for part in key.split("."):
        renamed = OFFICIAL_NAMES.get(type(module), {}).get(part, part)
        if renamed:
            out.append(renamed)
        module = module._modules.get(part) if module is not None else None
    return ".".join(out)


def to_official(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict under the official key names."""
    return {official_key(model, k): v for k, v in model.state_dict().items()}


def load_official_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load an official-format state dict into ``model``; any key or shape difference is an error."""
    state = {k.removeprefix("module."): v for k, v in state.items()}  # DataParallel / DDP saves
    ours = model.state_dict()
    names = {official_key(model, k): k for k in ours}
    missing = sorted(set(names) - set(state))
    unexpected = sorted(set(state) - set(names))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(ours[names[k]].shape)}"
              for k in sorted(set(names) & set(state)) if state[k].shape != ours[names[k]].shape]
    if missing or unexpected or shapes:
        lines = [f"checkpoint does not fit {type(model).__name__}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                more = " ..." if len(items) > 20 else ""
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + more)
        raise CheckpointMismatchError("\n".join(lines))
    model.load_state_dict({names[k]: v for k, v in state.items()})
    return model


def load_official_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a ``.pth`` saved by the official code (``torch.save(model.state_dict())``), safely."""
    state = load_torch(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointMismatchError(f"{path} is not a state dict of tensors")
    return load_official_state_dict(model, state)


def save_official_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Save ``model`` so that the official code's ``load_state_dict`` accepts it."""
    save_torch(path, to_official(model))
