"""Checkpoints: trained-model files (pipeline outputs) and resume states (survive an interrupted run).

A model file holds the weights *and* how to rebuild the network (registry name, classes, image
size, overrides), so evaluation and distillation need nothing else. A resume state holds
everything that decides the rest of a run — weights, optimiser, scheduler, scaler, epoch,
history, best-so-far — plus a fingerprint of the inputs it is valid for (no RNG state: the
training loop seeds each epoch's draws from (seed, rank, epoch)). Everything is
written atomically and read back with ``weights_only=True``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hdkd.infra.torch_io import load_torch, save_torch
from hdkd.models import create_model, list_models

log = logging.getLogger(__name__)

MODEL_FORMAT = "hdkd-model/1"
CHECKPOINT_KEYS = ("model_name", "classes", "image_size")  # what an exported or logged model must carry


def unwrap(model: nn.Module) -> nn.Module:
    """The bare network inside DDP and ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "module"):  # DistributedDataParallel
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def save_model(path: str | Path, model: nn.Module, name: str, classes: list[str], image_size: int,
               overrides: dict[str, Any], metrics: dict[str, Any] | None = None,
               history: list[dict[str, float]] | None = None) -> None:
    """A trained network with what rebuilds it (registry name, classes, image size, overrides),
    its selection metrics and its per-epoch training history."""
    save_torch(path, {
        "format": MODEL_FORMAT, "model_name": name, "classes": list(classes), "image_size": image_size,
        "overrides": dict(overrides), "metrics": dict(metrics or {}), "history": list(history or []),
        "state_dict": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
    })


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a network saved by :func:`save_model`; returns ``(model, metadata)``."""
    blob = load_torch(path, map_location)
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} is not an hdkd model file (expected format {MODEL_FORMAT!r}); "
                         "official checkpoints load through hdkd.models.compat.load_official_checkpoint")
    missing = [k for k in (*CHECKPOINT_KEYS, "overrides", "state_dict") if k not in blob]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(map(repr, missing))}: it is a damaged or hand-made model file; "
                         "re-run the training stage that writes it")
    name = blob["model_name"]
    try:
        model = create_model(name, len(blob["classes"]), blob["image_size"], **blob["overrides"])
    except KeyError:  # the registry's: an unknown name
        raise ValueError(f"{path} names the network {name!r}, which this version of hdkd does not build (known: "
                         f"{', '.join(list_models())}, and timm:<name>): it was written by another version or "
                         "edited; re-run the training stage that writes it") from None
    except Exception as e:  # noqa: BLE001 - a timm name timm lacks, overrides the constructor refuses
        raise ValueError(f"{path}: its network {name!r} cannot be built with its overrides "
                         f"{blob['overrides']} ({type(e).__name__}: {_first_line(e)}); re-run the training stage "
                         "that writes it") from None
    try:
        model.load_state_dict(blob["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as e:  # torch's message lists every key, over many lines
        raise ValueError(f"{path} holds weights that do not fit its network {name} ({_first_line(e)}): it is "
                         "damaged or was edited; re-run the training stage that writes it") from None
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    return model, meta


def _first_line(error: BaseException) -> str:
    """An error's message up to its first details: torch lists every mismatched key on lines of their own."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[0].rstrip(":") + (f": {lines[1]}" if len(lines) > 1 else "") + (" ..." if len(lines) > 2 else "")


def load_trained(path: str | Path, classes: Sequence[str], image_size: int,
                 map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """:func:`load_model` of a trained model that must match the data it is run on: its classes (in
    label order) and image size; otherwise a ``ValueError`` naming the file and the stages to rerun."""
    model, meta = load_model(path, map_location)
    if list(meta["classes"]) != list(classes):
        raise ValueError(f"{path} was trained on classes {meta['classes']}, the test split has "
                         f"{list(classes)}: rerun the training stages on this data")
    if meta["image_size"] != image_size:
        raise ValueError(f"{path} was trained on {meta['image_size']}px images, data.image_size is "
                         f"{image_size}: rerun the training stages with these params")
    return model, meta


def resume_paths(resume_dir: str | Path) -> tuple[Path, Path]:
    """The resume state's two files in ``resume_dir``: ``last.pt`` (the last finished epoch) and
    ``best.pt`` (the best-so-far weights)."""
    return Path(resume_dir) / "last.pt", Path(resume_dir) / "best.pt"


def load_resume_state(resume_dir: str | Path, fingerprint: str,
                      map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The resume state in ``resume_dir`` (``last.pt``, with the best-so-far weights of ``best.pt``
    under ``"best_state"``) if it exists, every file reads and it belongs to the same inputs;
    ``None`` otherwise (says why). A partly unreadable state is discarded whole: resuming without
    the best weights would lose the epoch selection made before the interruption."""
    last_path, best_path = resume_paths(resume_dir)
    if not last_path.is_file():
        return None
    try:
        state = load_torch(last_path)
        if state.get("fingerprint") != fingerprint:
            log.info("resume state %s belongs to other params or data; starting afresh", last_path)
            return None
        # best.pt is written before last.pt, so it exists whenever last.pt does (unless removed).
        state["best_state"] = load_torch(best_path, map_location)
    except (ValueError, FileNotFoundError) as e:
        log.warning("ignoring unreadable resume state in %s (%s); starting afresh", resume_dir, e)
        return None
    return state
