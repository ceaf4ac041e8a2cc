"""Packed splits -> training samples: the API the training engine calls.

::

    from hdkd.data.augment import eval_transform, train_transform
    from hdkd.data.loader import PackedDataset
    from hdkd.data.packed import load_split

    train = load_split("data/balanced", "train", image_size=params.data.image_size)
    val = load_split("data/prepared", "val", image_size=params.data.image_size)
    train_ds = PackedDataset(train, train_transform(params.augment), seed=params.seed)
    val_ds = PackedDataset(val, eval_transform())
    for epoch in range(epochs):
        train_ds.set_epoch(epoch)          # before iterating, like DistributedSampler.set_epoch
        for images, labels in DataLoader(train_ds, batch_size, shuffle=True, num_workers=n): ...

- ``load_split(root, name, image_size=None) -> PackedSplit``: ``images`` (memory-mapped uint8
  N x S x S x 3), ``labels`` (int64), ``ids``, ``classes``; pickles as a reference.
- ``PackedDataset(split, transform=None, seed=0)``: item ``i`` is ``(transform(uint8 3 x S x S),
  int64 label)``; with ``transform=None`` the raw ``uint8`` tensor (for :func:`augment_batch` on
  the training device, then :func:`normalize`). A random transform is called as ``transform(image,
  generator)`` with a generator seeded from (seed, epoch, i) alone: the augmentation of a sample
  is the same for any ``num_workers``, batch size or order.
- ``train_transform(cfg)``, ``eval_transform()``, ``normalize(uint8)``, ``augment_image``,
  ``augment_batch(uint8 B x 3 x H x W, cfg, generator)``: see :mod:`hdkd.data.augment`.

With ``augment.batched`` (the default), augment whole batches on the training device instead::

    train_ds = PackedDataset(train)                      # uint8 3 x S x S items
    generator = torch.Generator().manual_seed(params.seed)
    for images, labels in DataLoader(train_ds, ...):
        images = augment_batch(images.to(device, non_blocking=True), params.augment, generator)
        images = normalize(images)
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from hdkd.data.packed import PackedSplit, load_split
from hdkd.data.seeding import derive_seed

__all__ = ["PackedDataset", "PackedSplit", "load_split"]


class PackedDataset(Dataset):
    """A packed split as a map-style dataset of ``(image tensor, int64 label)``."""

    def __init__(
        self, split: PackedSplit, transform: Callable[..., torch.Tensor] | None = None, seed: int = 0
    ):
        self.split = split
        self.transform = transform
        self.seed = seed
        # Shared memory: set_epoch reaches DataLoader workers, persistent ones included.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch``; call before iterating over the epoch."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch.fill_(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = operator.index(index)
        if index < 0:
            index += len(self)
        image = torch.from_numpy(self.split.images[index]).permute(2, 0, 1)  # a view of the mapped file
        if self.transform is not None and getattr(self.transform, "random", True):
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, index))
            image = self.transform(image, generator)
        elif self.transform is not None:
            image = self.transform(image)
        return image, torch.tensor(self.split.labels[index], dtype=torch.int64)
