"""Torch files: checkpoints written atomically with reproducible bytes, and read safely (``weights_only=True``).

Apart from :mod:`hdkd.infra.io` so that the torch-free wings (evidence, report) that write JSON and CSV never
import torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from hdkd.infra.io import atomic_path


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` ``obj`` atomically; the same tensors and metadata give the same bytes.

    torch.save to a path names the zip archive's root folder after the file (here the random
    temporary name), so equal weights gave different bytes and DVC hashes; to a file object the root
    is always ``archive`` (the entries carry no timestamps), and nothing is held in memory.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def load_torch(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint safely: tensors and plain containers only (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or unsafe files
        raise ValueError(f"cannot load checkpoint {path}: {e}") from e
