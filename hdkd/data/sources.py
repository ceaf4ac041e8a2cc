"""The dataset registry: one :class:`Source` per ``data.dataset`` value, one interface.

A source knows where its raw files come from and how they are laid out:

- ``fetch(cfg)`` makes the raw data available under ``source.directory(cfg)`` and verified
  (download + MD5, generation, or validation of an existing tree) and returns what identifies
  it (checksums, a content digest): the download stage records that, so ``prepare`` re-runs
  exactly when the data changed.
- ``catalog(cfg)`` lists the images, labels, groups and official splits (:class:`Catalog`).

============== ================================================ =====================================
dataset        raw data                                         verified by
============== ================================================ =====================================
synthetic      generated under ``root/synthetic_<layout>``      its settings; same readers as the real
imagefolder    ``root/{train,test}/<class>/<image>`` as is      content digest of the tree
ham10000       Harvard Dataverse zips + csv, ``root/ham10000``  MD5 of each file
               or a copy ``root`` holds, read in place          metadata MD5 (or rows), every image
brain_tumor... Kaggle (kagglehub / API) or Zenodo zip           image counts per split and class
               or a copy ``root`` holds, read in place          image counts per split and class
dermamnist     Zenodo npz, ``root/dermamnist``                  MD5
============== ================================================ =====================================

A copy already on disk (the Dataverse's or Kaggle's layouts, zipped or extracted) is found at the top
of ``data.root`` and used where it is, without network access: see :mod:`hdkd.data.copies`.
"""

from __future__ import annotations

import abc
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from PIL import Image

from hdkd.config import DataConfig
from hdkd.data.copies import (
    HamRelease,
    brain_copy_catalog,
    brain_copy_counts,
    brain_copy_record,
    find_brain_copy,
    find_ham_copy,
    ham_copy_catalog,
    is_ham_copy,
    verify_ham_copy,
)
from hdkd.data.download import download_file, extract_archive
from hdkd.data.errors import DataError
from hdkd.data.formats import (
    BRAIN_CLASSES,
    BRAIN_COUNTS,
    BRAIN_SPLIT_DIRS,
    HAM_CLASSES,
    HAM_COUNTS,
    IMAGEFOLDER_SPLIT_DIRS,
    Catalog,
    count_class_tree,
    read_class_tree,
    read_ham_tree,
)
from hdkd.data.synthetic import generate
from hdkd.infra.io import atomic_dir, dvc_md5, remove_stale_temporaries, write_json

log = logging.getLogger(__name__)

SOURCE_RECORD = "source.json"  # written by the download stage, read by prepare


@dataclass(frozen=True)
class RemoteFile:
    """A file a source downloads; ``md5``/``size`` are checked when known."""

    name: str
    url: str
    md5: str | None = None
    size: int | None = None

    def fetch(self, cfg: DataConfig, directory: Path) -> Path:
        """Download to ``directory/name`` (``data.urls[name]`` overrides the URL)."""
        if self.md5 is None or self.size is None:
            log.warning(
                "%s: no MD5 and size pinned in hdkd.data.sources: the file is used without being verified "
                "(a truncated or substituted archive is caught, if at all, only after extraction)", self.name
            )
        return download_file(
            cfg.urls.get(self.name, self.url), directory / self.name, md5=self.md5, size=self.size
        )


class Source(abc.ABC):
    """One dataset: where its raw files live, how to get them, how to list its images."""

    name: ClassVar[str]

    def directory(self, cfg: DataConfig) -> Path:
        """Where this source keeps its raw files: its own folder under ``data.root``."""
        return cfg.root / self.name

    def remote_files(self, cfg: DataConfig) -> tuple[RemoteFile, ...]:
        return ()

    def scratch_dirs(self, cfg: DataConfig) -> tuple[Path, ...]:
        """Where :meth:`fetch` writes (atomically, through temporaries a kill can leave behind)."""
        return (cfg.root, self.directory(cfg))

    def fetch(self, cfg: DataConfig) -> dict[str, Any]:
        """Make the raw data available and verified; return what identifies it (checksums, digest).

        ``data.urls`` may only name files of :meth:`remote_files`; that is checked first.
        """
        known = {f.name for f in self.remote_files(cfg)}
        unknown = sorted(set(cfg.urls) - known)
        if unknown:
            raise DataError(
                f"data.urls names file(s) {unknown} that dataset {self.name!r} does not use; "
                f"its files are {sorted(known) or 'none (nothing is downloaded)'}"
            )
        return self._fetch(cfg)

    @abc.abstractmethod
    def _fetch(self, cfg: DataConfig) -> dict[str, Any]:
        """:meth:`fetch` once ``data.urls`` is checked."""

    @abc.abstractmethod
    def catalog(self, cfg: DataConfig) -> Catalog:
        """List the images, labels, groups and official splits of the fetched data."""


class Synthetic(Source):
    """The embedded default: generated in a real dataset's format, then read by that format's reader."""

    name = "synthetic"

    def directory(self, cfg: DataConfig) -> Path:
        return cfg.root / f"synthetic_{cfg.synthetic.layout}"

    def _fetch(self, cfg: DataConfig) -> dict[str, Any]:
        directory = generate(cfg.synthetic, self.directory(cfg))
        return {"layout": cfg.synthetic.layout, "tree_digest": dvc_md5(directory)}

    def catalog(self, cfg: DataConfig) -> Catalog:
        directory = self.directory(cfg)
        if cfg.synthetic.layout == "ham10000":
            return read_ham_tree(directory)
        return read_class_tree(directory, BRAIN_SPLIT_DIRS, BRAIN_CLASSES)


class ImageFolder(Source):
    """An existing tree ``data.root/{train,test}/<class>/<image>`` (optionally ``val/``), read in place."""

    name = "imagefolder"

    def directory(self, cfg: DataConfig) -> Path:
        return cfg.root

    def scratch_dirs(self, cfg: DataConfig) -> tuple[Path, ...]:
        return ()  # the tree is read in place, never written

    def _fetch(self, cfg: DataConfig) -> dict[str, Any]:
        catalog = self.catalog(cfg)  # validates the layout and the class folders
        files = [Path(p) for p in catalog.items["ref"]]
        return {
            "classes": list(catalog.classes),
            "images": len(files),
            "tree_digest": dvc_md5(cfg.root, files),
        }

    def catalog(self, cfg: DataConfig) -> Catalog:
        if not cfg.root.is_dir():
            raise DataError(
                f"data.root {cfg.root} is not a directory; for dataset imagefolder it must hold "
                f"train/ and test/"
            )
        return read_class_tree(cfg.root, IMAGEFOLDER_SPLIT_DIRS)


HAM10000_FILES = (
    RemoteFile(
        "HAM10000_images_part_1.zip",
        "https://dataverse.harvard.edu/api/access/datafile/3172585",
        "4639bfa73ab251610530a97c898e6e46",
        1_366_522_108,
    ),
    RemoteFile(
        "HAM10000_images_part_2.zip",
        "https://dataverse.harvard.edu/api/access/datafile/3172584",
        "da43d6cc50f6613013be07e8986b384b",
        1_403_566_547,
    ),
    RemoteFile(
        "HAM10000_metadata.csv",
        "https://dataverse.harvard.edu/api/access/datafile/4338392?format=original",
        "8f85fb1aa29d80a2797247e434deb79d",
        690_218,
    ),
)


# HAM10000 as released: a copy's metadata file is checked against it (hdkd.data.copies.HamRelease).
# content_md5 (hdkd.data.copies.ham_content_md5 of the sorted image_id, lesion_id, dx rows) was computed
# from two public renderings of the metadata that agree on it: one with the Dataverse's eight columns
# (with "dataset") and one with Kaggle's seven; both have 10,015 rows, 7,470 lesions and HAM_COUNTS.
HAM_RELEASE = HamRelease(
    metadata_md5={HAM10000_FILES[2].md5: "the Harvard Dataverse's HAM10000_metadata.csv"},
    content_md5="5bc94ad7371b995879a70378bd4a2549",
    images=10_015,
    lesions=7_470,
    counts=dict(HAM_COUNTS),
)


@dataclass
class Ham10000(Source):
    """HAM10000 from Harvard Dataverse: two image zips (extracted next to them) and the metadata csv;
    or a copy ``data.root`` holds (:mod:`hdkd.data.copies`), verified against ``release`` and read in place."""

    name: ClassVar[str] = "ham10000"
    files: tuple[RemoteFile, ...] = HAM10000_FILES
    release: HamRelease = HAM_RELEASE

    def remote_files(self, cfg: DataConfig) -> tuple[RemoteFile, ...]:
        return self.files

    def directory(self, cfg: DataConfig) -> Path:
        return cfg.root if is_ham_copy(cfg.root) else super().directory(cfg)

    def scratch_dirs(self, cfg: DataConfig) -> tuple[Path, ...]:
        return () if is_ham_copy(cfg.root) else super().scratch_dirs(cfg)  # a copy is never written

    def _fetch(self, cfg: DataConfig) -> dict[str, Any]:
        if is_ham_copy(cfg.root):
            return verify_ham_copy(find_ham_copy(cfg.root), self.release)
        directory = self.directory(cfg)
        for f in self.files:
            path = f.fetch(cfg, directory)
            if path.suffix == ".zip" and not (directory / path.stem).is_dir():
                log.info("extracting %s", path)
                extract_archive(path, directory / path.stem)
        return {"files": {f.name: f.md5 for f in self.files}}

    def catalog(self, cfg: DataConfig) -> Catalog:
        if is_ham_copy(cfg.root):
            return ham_copy_catalog(find_ham_copy(cfg.root))
        return read_ham_tree(self.directory(cfg))


# The mirror archive's MD5 and size in bytes, as Zenodo lists them for record 12735702 (its page,
# and https://zenodo.org/api/records/12735702: files[].checksum "md5:<hex>" and files[].size).
# While None, the archive is fetched unverified (RemoteFile.fetch warns) and only the image counts
# check what it held.
BRAIN_ZENODO_MD5: str | None = None
BRAIN_ZENODO_SIZE: int | None = None
BRAIN_ZENODO = RemoteFile(
    "brain-tumor-mri-dataset.zip",
    "https://zenodo.org/records/12735702/files/brain-tumor-mri-dataset.zip?download=1",
    BRAIN_ZENODO_MD5,
    BRAIN_ZENODO_SIZE,
)
BRAIN_KAGGLE_HANDLE = "masoudnickparvar/brain-tumor-mri-dataset"


@dataclass
class BrainTumorMri(Source):
    """Brain Tumor MRI: Kaggle when a client is installed, else the Zenodo mirror; checked by counts."""

    name: ClassVar[str] = "brain_tumor_mri"
    mirror: RemoteFile = BRAIN_ZENODO
    kaggle_handle: str = BRAIN_KAGGLE_HANDLE
    expected_counts: dict[str, dict[str, int]] = field(default_factory=lambda: BRAIN_COUNTS)

    def remote_files(self, cfg: DataConfig) -> tuple[RemoteFile, ...]:
        return (self.mirror,)

    def directory(self, cfg: DataConfig) -> Path:
        return cfg.root if find_brain_copy(cfg.root) is not None else super().directory(cfg)

    def scratch_dirs(self, cfg: DataConfig) -> tuple[Path, ...]:
        return () if find_brain_copy(cfg.root) is not None else super().scratch_dirs(cfg)  # never written

    def _fetch(self, cfg: DataConfig) -> dict[str, Any]:
        copy = find_brain_copy(cfg.root)
        if copy is not None:
            counts = brain_copy_counts(copy)
            self._check_counts(counts, copy.where, "Restore the images, or point data.root at a complete copy.")
            log.info("%s: Brain Tumor MRI copy (%s) verified by its counts", copy.where, copy.layout)
            return {**brain_copy_record(copy), "counts": counts}
        directory = self.directory(cfg)
        if self._tree_root(directory) is None:
            extracted = directory / "dataset"
            if not _kaggle_download(self.kaggle_handle, extracted):
                archive = self.mirror.fetch(cfg, directory)
                log.info("extracting %s", archive)
                extract_archive(archive, extracted)
        root = self._tree_root(directory)
        if root is None:
            raise DataError(
                f"no Training/ and Testing/ folders found under {directory}: "
                f"the download is not the expected dataset"
            )
        counts = count_class_tree(root, BRAIN_SPLIT_DIRS)
        self._check_counts(counts, str(root), f"Delete {directory} and run the download stage again.")
        return {"counts": counts, "tree_digest": dvc_md5(root)}

    def _check_counts(self, counts: dict[str, dict[str, int]], where: str, remedy: str) -> None:
        """Every split and class holds the expected number of images; the error lists each that does not."""
        if counts == self.expected_counts:
            return
        diff = [
            f"{s}/{c}: {counts.get(s, {}).get(c, 0)} (expected {n})"
            for s, per in self.expected_counts.items()
            for c, n in per.items()
            if counts.get(s, {}).get(c, 0) != n
        ]
        extra = [
            f"{s}/{c}"
            for s, per in counts.items()
            for c in per
            if c not in self.expected_counts.get(s, {})
        ]
        raise DataError(
            f"{where} does not hold the expected images: "
            f"{'; '.join(diff + [f'unexpected {e}' for e in extra])}. {remedy}"
        )

    def catalog(self, cfg: DataConfig) -> Catalog:
        copy = find_brain_copy(cfg.root)
        if copy is not None:
            return brain_copy_catalog(copy)
        root = self._tree_root(self.directory(cfg))
        if root is None:
            raise DataError(
                f"no Training/ and Testing/ folders under {self.directory(cfg)}: run the download stage first"
            )
        return read_class_tree(root, BRAIN_SPLIT_DIRS, BRAIN_CLASSES)

    @staticmethod
    def _tree_root(directory: Path) -> Path | None:
        """The folder holding ``Training/`` and ``Testing/`` (archives nest it at various depths)."""
        if not directory.is_dir():
            return None
        for candidate in [directory, *sorted(p.parent for p in directory.glob("**/Training"))]:
            if all((candidate / d).is_dir() for d in BRAIN_SPLIT_DIRS.values()):
                return candidate
        return None


def _kaggle_download(handle: str, dest: Path) -> bool:
    """Copy the Kaggle dataset ``handle`` to ``dest``; False (after logging why) when that is not possible.

    kagglehub, or the older Kaggle API client, finds credentials where Kaggle puts them
    (``~/.kaggle/kaggle.json``, ``KAGGLE_USERNAME``/``KAGGLE_KEY``). Any failure falls back to the
    public mirror rather than stopping the stage.
    """
    client = _kaggle_client()
    if client is None:
        return False
    try:
        with atomic_dir(dest) as tmp:
            client(handle, tmp)
        return True
    except Exception as e:  # client, credential or network failure of a third-party library
        log.warning(
            "Kaggle download of %s failed (%s: %s); using the public mirror", handle, type(e).__name__, e
        )
        return False


def _kaggle_client():
    """A function ``(handle, directory)`` that downloads a Kaggle dataset into ``directory``, or None."""
    try:
        import kagglehub

        return lambda handle, directory: shutil.copytree(
            kagglehub.dataset_download(handle), directory, dirs_exist_ok=True
        )
    except ImportError:
        pass
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    if not (os.environ.get("KAGGLE_USERNAME") or (config_dir / "kaggle.json").is_file()):
        log.info("no kagglehub, and no Kaggle API credentials; using the public mirror")
        return None
    try:  # the kaggle package authenticates on import: only import it with credentials present
        from kaggle.api.kaggle_api_extended import KaggleApi
    except (ImportError, OSError) as e:
        log.info("Kaggle API client unavailable (%s); using the public mirror (pip install kagglehub)", e)
        return None

    def download(handle: str, directory: Path) -> None:
        api = KaggleApi()
        api.authenticate()
        api.dataset_download_files(handle, path=str(directory), unzip=True)

    return download


DERMAMNIST_MD5 = {
    28: "0744692d530f8e62ec473284d019b0c7",
    64: "b70a2f5635c6199aeaa28c31d7202e1f",
    128: "2defd784463fa5243564e855ed717de1",
    224: "8974907d8e169bef5f5b96bc506ae45d",
}


def dermamnist_file(size: int, md5: str) -> RemoteFile:
    name = "dermamnist.npz" if size == 28 else f"dermamnist_{size}.npz"
    return RemoteFile(name, f"https://zenodo.org/records/10519652/files/{name}?download=1", md5)


@dataclass
class DermaMnist(Source):
    """DermaMNIST (MedMNIST, from HAM10000): one npz with its own train/val/test; labels 0-6 = HAM classes."""

    name: ClassVar[str] = "dermamnist"
    md5: dict[int, str] = field(default_factory=lambda: dict(DERMAMNIST_MD5))

    def remote_files(self, cfg: DataConfig) -> tuple[RemoteFile, ...]:
        return (dermamnist_file(cfg.dermamnist_size, self.md5[cfg.dermamnist_size]),)

    def _fetch(self, cfg: DataConfig) -> dict[str, Any]:
        (f,) = self.remote_files(cfg)
        f.fetch(cfg, self.directory(cfg))
        return {"files": {f.name: f.md5}}

    def catalog(self, cfg: DataConfig) -> Catalog:
        (f,) = self.remote_files(cfg)
        path = self.directory(cfg) / f.name
        if not path.is_file():
            raise DataError(f"{path} not found: run the download stage (dvc repro download)")
        with np.load(path) as npz:
            arrays = {
                s: (npz[f"{s}_images"], npz[f"{s}_labels"].reshape(-1)) for s in ("train", "val", "test")
            }
        frames = []
        for split, (_, labels) in arrays.items():
            bad = sorted(set(np.unique(labels).tolist()) - set(range(len(HAM_CLASSES))))
            if bad:
                raise DataError(
                    f"unknown label(s) {bad} in {path} ({split}_labels); expected 0-{len(HAM_CLASSES) - 1}"
                )
            ids = [f"{split}_{i:05d}" for i in range(len(labels))]
            frames.append(
                pd.DataFrame(
                    {
                        "image_id": ids,
                        "label": labels.astype(np.int64),
                        "group": ids,
                        "split": split,
                        "ref": [(split, i) for i in range(len(labels))],
                    }
                )
            )
        return Catalog(
            HAM_CLASSES,
            pd.concat(frames, ignore_index=True),
            lambda ref: Image.fromarray(arrays[ref[0]][0][ref[1]]),
            str(path),
        )


SOURCES: dict[str, Source] = {
    s.name: s for s in (Synthetic(), ImageFolder(), Ham10000(), BrainTumorMri(), DermaMnist())
}


def get_source(name: str) -> Source:
    try:
        return SOURCES[name]
    except KeyError:
        raise DataError(f"unknown data.dataset {name!r}; choose one of {sorted(SOURCES)}") from None


def fetch_dataset(cfg: DataConfig, record_dir: str | os.PathLike) -> dict[str, Any]:
    """Fetch/generate/validate ``cfg.dataset``; write and return its record ``record_dir/source.json``.

    The record (dataset, where its files are, checksums or a content digest) changes exactly
    when the raw data does, so the prepare stage, which depends on it, re-runs exactly then,
    also for an ``imagefolder`` tree outside the repository.
    """
    source = get_source(cfg.dataset)
    # A killed run's temporaries (a half-generated tree, a half-extracted archive) would stay in
    # data/raw, a DVC output, whose hash would then never match a clean run's; .part files stay
    # (downloads resume from them).
    for directory in (Path(record_dir), *source.scratch_dirs(cfg)):
        remove_stale_temporaries(directory)
    record = {"dataset": cfg.dataset, "directory": str(source.directory(cfg)), **source.fetch(cfg)}
    write_json(Path(record_dir) / SOURCE_RECORD, record)
    return record
