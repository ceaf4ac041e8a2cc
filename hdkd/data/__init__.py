"""The data layer: sources, download, prepare, balance, and loading for training.

Stages (each called by a thin ``pipeline/<stage>.py``):

- :func:`fetch_dataset` (download): make ``data.dataset``'s raw data available and verified,
  record what identifies it in ``<record_dir>/source.json``.
- :func:`prepare_dataset` (prepare): decode, split, pack -> ``data/prepared``.
- :func:`balance_training_split` (balance): oversample the training split -> ``data/balanced``.

Training: :func:`load_split`, :class:`PackedDataset`, :func:`train_transform`,
:func:`eval_transform`, :func:`normalize`, :func:`augment_image`, :func:`augment_batch`,
:class:`BatchAugment`
(see :mod:`hdkd.data.loader`).

Names are imported on first use: the download, prepare and SMOTE paths never load torch
(importing it costs ~0.7 GB of resident memory, a third of SMOTE's 2 GB budget).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BatchAugment": "augment",
    "augment_batch": "augment",
    "augment_image": "augment",
    "eval_transform": "augment",
    "normalize": "augment",
    "train_transform": "augment",
    "balance_training_split": "balance",
    "resolve_targets": "balance",
    "smote_oversample": "balance",
    "download_file": "download",
    "extract_archive": "download",
    "ChecksumError": "errors",
    "DataError": "errors",
    "DownloadError": "errors",
    "UnreadableImage": "errors",
    "UnsafeArchiveError": "errors",
    "Catalog": "formats",
    "decode_resized": "images",
    "to_rgb": "images",
    "PackedDataset": "loader",
    "PackedSplit": "packed",
    "load_split": "packed",
    "prepare_dataset": "prepare",
    "SOURCE_RECORD": "sources",
    "SOURCES": "sources",
    "Source": "sources",
    "fetch_dataset": "sources",
    "get_source": "sources",
    "assign_splits": "splits",
    "carve": "splits",
    "generate_synthetic": "synthetic",
}
_RENAMED = {"generate_synthetic": "generate"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, _RENAMED.get(name, name))


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
