"""Packed splits: each split is one memory-mappable ``uint8`` array plus its labels and an index.

A packed directory (``data/prepared``, ``data/balanced``)::

    manifest.json          classes (in label order), counts per split and class, image size, provenance
    <split>/images.npy     uint8, N x S x S x 3 (RGB, channels last): np.load(..., mmap_mode="r")
    <split>/labels.npy     int64, N (indices into the manifest's classes)
    <split>/index.csv      one row per image: image_id, label, class, group, source, ...

Thousands of small files become three per split: reading a sample is a slice of a mapped file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd

from hdkd.data.errors import DataError
from hdkd.infra.io import read_json

IMAGES, LABELS, INDEX, MANIFEST = "images.npy", "labels.npy", "index.csv", "manifest.json"


@dataclass(frozen=True, eq=False)
class PackedSplit:
    """One split of a packed directory; ``images`` is memory-mapped copy-on-write (the file never changes)."""

    root: Path
    name: str
    images: np.ndarray  # N x S x S x 3 uint8
    labels: np.ndarray  # N int64
    ids: np.ndarray  # N str
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    def class_counts(self) -> dict[str, int]:
        return dict(zip(self.classes, np.bincount(self.labels, minlength=len(self.classes)).tolist()))

    def __reduce__(self):
        # Pickled (e.g. for DataLoader workers started with "spawn") as a reference, not as the pixels.
        return load_split, (self.root, self.name)


def load_split(root: str | os.PathLike, name: str, image_size: int | None = None) -> PackedSplit:
    """Open ``root/name`` (see the module docstring); ``image_size`` checks the packs match the params."""
    root = Path(root)
    directory = root / name
    paths = [root / MANIFEST, directory / IMAGES, directory / LABELS, directory / INDEX]
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        raise DataError(
            f"packed split {directory} is incomplete, missing {absent}: run `dvc repro` (prepare/balance)"
        )
    classes = tuple(read_json(root / MANIFEST)["classes"])
    # Copy-on-write mapping: tensors can wrap it without a copy; a write never reaches the file.
    images = np.load(directory / IMAGES, mmap_mode="c")
    labels = np.load(directory / LABELS).astype(np.int64, copy=False)
    ids = pd.read_csv(directory / INDEX, usecols=["image_id"], dtype=str, keep_default_na=False)[
        "image_id"
    ].to_numpy()
    if (
        images.dtype != np.uint8
        or images.ndim != 4
        or images.shape[-1] != 3
        or images.shape[1] != images.shape[2]
    ):
        raise DataError(
            f"{directory / IMAGES}: expected uint8 N x S x S x 3, got {images.dtype} {images.shape}"
        )
    if not len(images) == len(labels) == len(ids):
        raise DataError(
            f"{directory}: {len(images)} images, {len(labels)} labels and {len(ids)} index rows disagree"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(f"{directory / LABELS}: labels outside 0..{len(classes) - 1}")
    if image_size is not None and images.shape[1] != image_size:
        raise DataError(
            f"{directory / IMAGES} holds {images.shape[1]}px images but data.image_size is {image_size}: "
            f"run `dvc repro` to prepare the data again"
        )
    return PackedSplit(root, name, images, labels, ids, classes)


def npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of a ``.npy`` file, from its header."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, fortran_order, dtype = read_header(f)
        if fortran_order:
            raise DataError(f"{path}: Fortran-ordered arrays are not supported")
        return shape, dtype, f.tell()


def read_rows(path: Path, indices: np.ndarray) -> np.ndarray:
    """Rows ``indices`` of the ``.npy`` array at ``path``, read with plain file reads.

    Unlike indexing a memory map, this leaves no pages of the big file mapped into the process:
    memory use is the rows read, whatever the file's size.
    """
    shape, dtype, offset = npy_layout(path)
    out = np.empty((len(indices), *shape[1:]), dtype=dtype)
    row_bytes = out[0].nbytes if len(out) else 0
    with open(path, "rb", buffering=0) as f:
        for j, i in enumerate(np.asarray(indices, dtype=np.int64)):
            if not 0 <= i < shape[0]:
                raise IndexError(f"row {i} out of range for {path} with {shape[0]} rows")
            f.seek(offset + int(i) * row_bytes)
            if f.readinto(memoryview(out[j]).cast("B")) != row_bytes:
                raise DataError(f"{path} is truncated (row {i})")
    return out


class NpyWriter:
    """Write an ``(n, *row_shape)`` array to a ``.npy`` file chunk by chunk, never holding it whole."""

    def __init__(self, path: Path, n: int, row_shape: tuple[int, ...], dtype: np.typing.DTypeLike = np.uint8):
        self.path, self.n, self.row_shape, self.dtype = Path(path), n, tuple(row_shape), np.dtype(dtype)
        self.written = 0
        self._f: BinaryIO = open(self.path, "wb")
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (n, *self.row_shape),
        }
        np.lib.format.write_array_header_2_0(self._f, header)

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.row_shape or self.written + len(rows) > self.n:
            raise ValueError(
                f"{self.path}: rows {rows.shape} do not fit "
                f"({self.written}/{self.n} written, rows {self.row_shape})"
            )
        self._f.write(memoryview(rows).cast("B"))
        self.written += len(rows)

    def close(self) -> None:
        if self._f.closed:
            return
        try:
            if self.written != self.n:
                raise ValueError(f"{self.path}: {self.written} rows written, {self.n} declared")
            self._f.flush()
            os.fsync(self._f.fileno())
        finally:
            self._f.close()

    def __enter__(self) -> NpyWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._f.close()


def write_labels_and_index(directory: Path, labels: np.ndarray, index: pd.DataFrame) -> None:
    """The small files of a split: ``labels.npy`` and ``index.csv`` (the caller wrote ``images.npy``)."""
    np.save(directory / LABELS, np.asarray(labels, dtype=np.int64))
    index.to_csv(directory / INDEX, index=False)
