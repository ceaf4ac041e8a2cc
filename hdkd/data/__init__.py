"""The data layer: sources, download, prepare, balance, and loading for training.

Stages (each called by a thin ``pipeline/<stage>.py``):

- :func:`hdkd.data.sources.fetch_dataset` (download): make ``data.dataset``'s raw data available
  and verified, record what identifies it in ``<record_dir>/source.json``.
- :func:`hdkd.data.prepare.prepare_dataset` (prepare): decode, split, pack -> ``data/prepared``.
- :func:`hdkd.data.balance.balance_training_split` (balance): oversample the training split ->
  ``data/balanced``.

Training: :func:`hdkd.data.packed.load_split`, :class:`hdkd.data.loader.PackedDataset` and the
transforms of :mod:`hdkd.data.augment`.

Callers import the submodules they use: only ``loader`` and ``augment`` import torch, so the
download, prepare and SMOTE paths never load it (importing it costs ~0.7 GB of resident memory, a
third of SMOTE's 2 GB budget).

May import: :mod:`hdkd.infra` and the top-level modules.
"""
