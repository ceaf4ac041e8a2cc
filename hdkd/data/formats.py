"""On-disk formats of the datasets, and the readers that list their images (a :class:`Catalog`).

The synthetic generator writes these same formats, and the same readers read both, so the
embedded default exercises exactly the code that reads the real datasets.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from hdkd.data.errors import DataError
from hdkd.data.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

# HAM10000 (Harvard Dataverse doi:10.7910/DVN/DBW86T). Class order: alphabetical, as the official
# code's ImageFolder and DermaMNIST's labels 0-6 have it.
HAM_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
HAM_COUNTS = {"akiec": 327, "bcc": 514, "bkl": 1099, "df": 115, "mel": 1113, "nv": 6705, "vasc": 142}
HAM_METADATA = "HAM10000_metadata.csv"
HAM_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset")
HAM_PARTS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
HAM_PART_1_SHARE = 5000 / 10015  # the first 5,000 image ids are in part 1

# Brain Tumor MRI (Kaggle masoudnickparvar/brain-tumor-mri-dataset).
BRAIN_CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
BRAIN_SPLIT_DIRS = {"train": "Training", "test": "Testing"}
BRAIN_COUNTS = {
    "Training": {"glioma": 1321, "meningioma": 1339, "notumor": 1595, "pituitary": 1457},
    "Testing": {"glioma": 300, "meningioma": 306, "notumor": 405, "pituitary": 300},
}
BRAIN_FILE_PREFIX = {"glioma": "gl", "meningioma": "me", "notumor": "no", "pituitary": "pi"}

# The layout the official code reads with ImageFolder: root/{train,test}/<class>/<image>.
IMAGEFOLDER_SPLIT_DIRS = {"train": "train", "val": "val", "test": "test"}  # val is optional


@dataclass(frozen=True)
class Catalog:
    """The images a source holds, before decoding.

    ``items`` has one row per image: ``image_id``, ``label`` (index into ``classes``), ``group``
    (images that must stay in one split, e.g. a lesion), ``split`` (the official split, or ``""``)
    and ``ref`` (what ``open_image`` opens: a file path, or a key into arrays).
    """

    classes: tuple[str, ...]
    items: pd.DataFrame
    open_image: Callable[[Any], Image.Image]
    where: str  # the directory or file read, for messages

    def __post_init__(self) -> None:
        missing = {"image_id", "label", "group", "split", "ref"} - set(self.items.columns)
        if missing:
            raise ValueError(f"catalog of {self.where} lacks columns {sorted(missing)}")
        if self.items["image_id"].duplicated().any():
            dup = self.items.loc[self.items["image_id"].duplicated(), "image_id"].head(5).tolist()
            raise DataError(f"{self.where}: image ids occur more than once, e.g. {dup}")
        counts = np.bincount(self.items["label"].to_numpy(dtype=np.int64), minlength=len(self.classes))
        empty = [c for c, n in zip(self.classes, counts) if n == 0]
        if empty:
            raise DataError(
                f"class(es) {empty} have no images in {self.where}; every class needs images "
                f"(restore the missing files, or remove the class from the dataset)"
            )


def read_ham_tree(directory: Path) -> Catalog:
    """HAM10000: ``HAM10000_metadata.csv`` plus ``ISIC_*.jpg`` anywhere below (both part folders).

    Groups are ``lesion_id``. A ``dx`` outside the seven classes, or an image listed in the
    metadata but absent, is an error naming it.
    """
    meta_path = directory / HAM_METADATA
    if not meta_path.is_file():
        raise DataError(
            f"{meta_path} not found: run the download stage (dvc repro download) or check data.root"
        )
    meta = read_ham_metadata(meta_path.read_bytes(), str(meta_path))
    files: dict[str, Path] = {}
    for p in sorted(directory.rglob("ISIC_*")):
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            files.setdefault(p.stem, p)  # some mirrors ship each part twice; the first copy is used
    absent = [i for i in meta["image_id"] if i not in files]
    if absent:
        raise DataError(
            f"{len(absent)} image(s) listed in {meta_path} are missing under {directory}, e.g. {absent[:5]}; "
            f"re-run the download stage, or restore the files"
        )
    extra = len(files) - len(meta)
    if extra > 0:
        log.warning("%s: %d image file(s) not listed in %s are ignored", directory, extra, HAM_METADATA)
    return ham_catalog(meta, {i: str(files[i]) for i in meta["image_id"]}, Image.open, str(directory))


def read_ham_metadata(raw: bytes, where: str) -> pd.DataFrame:
    """The rows of a HAM10000 metadata file (all values strings), checked for the columns the split
    needs and for diagnoses outside the seven classes.

    Comma-separated (the csv of the Harvard Dataverse and of Kaggle) or tab-separated (the Dataverse's
    ``.tab`` export, values quoted), with or without a byte-order mark. ``where`` names the file in
    messages.
    """
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{where} is not a UTF-8 text file ({e}): not a HAM10000 metadata file") from None
    header = text.split("\n", 1)[0]
    try:
        meta = pd.read_csv(
            io.StringIO(text), sep="\t" if "\t" in header else ",", dtype=str, keep_default_na=False
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(f"{where} cannot be read as a table: {e}") from None
    missing_cols = [c for c in ("lesion_id", "image_id", "dx") if c not in meta.columns]
    if missing_cols:
        raise DataError(f"{where} lacks column(s) {missing_cols}; columns are {list(meta.columns)}")
    unknown = sorted(set(meta["dx"]) - set(HAM_CLASSES))
    if unknown:
        examples = meta.loc[meta["dx"].isin(unknown), "image_id"].head(3).tolist()
        raise DataError(
            f"unknown label(s) {unknown} in column dx of {where} (e.g. images {examples}); "
            f"expected one of {list(HAM_CLASSES)}"
        )
    return meta


def ham_catalog(
    meta: pd.DataFrame, refs: Mapping[str, Any], open_image: Callable[[Any], Image.Image], where: str
) -> Catalog:
    """The catalog of HAM10000 metadata rows ``meta`` (:func:`read_ham_metadata`), in their order:
    groups are ``lesion_id``, no official split; ``refs`` maps every image id to what ``open_image`` opens."""
    return Catalog(
        HAM_CLASSES,
        pd.DataFrame(
            {
                "image_id": meta["image_id"],
                "label": meta["dx"].map({c: i for i, c in enumerate(HAM_CLASSES)}).astype(np.int64),
                "group": meta["lesion_id"],
                "split": "",
                "ref": [refs[i] for i in meta["image_id"]],
            }
        ),
        open_image,
        where,
    )


def read_class_tree(
    directory: Path, split_dirs: dict[str, str], classes: tuple[str, ...] | None = None
) -> Catalog:
    """A tree ``directory/<split dir>/<class>/<image>`` (Brain Tumor MRI, ImageFolder).

    ``split_dirs`` maps split names to folder names; a missing ``train`` or ``test`` folder is an
    error, others are optional. ``classes`` fixes the class list (a folder outside it is an unknown
    label); ``None`` takes the sorted class folders of the training split, as ImageFolder does.
    Each image is its own group.
    """
    rows = []
    for split, sub in split_dirs.items():
        split_dir = directory / sub
        if not split_dir.is_dir():
            if split in ("train", "test"):
                raise DataError(
                    f"{split_dir} not found: expected the layout {directory}/{sub}/<class>/<image> "
                    f"(check data.root and data.dataset)"
                )
            continue
        class_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if classes is None:
            if split != "train":
                raise ValueError("the train split must come first in split_dirs")
            classes = tuple(p.name for p in class_dirs)
            if not classes:
                raise DataError(f"{split_dir} has no class folders: expected {split_dir}/<class>/<image>")
        for class_dir in class_dirs:
            if class_dir.name not in classes:
                raise DataError(
                    f"unknown label {class_dir.name!r}: folder {class_dir} is not one of the "
                    f"classes {list(classes)}"
                )
            label = classes.index(class_dir.name)
            images, skipped = _image_files(class_dir)
            if skipped:
                log.warning("%s: %d file(s) without an image extension ignored", class_dir, skipped)
            for p in images:
                image_id = p.relative_to(directory).as_posix()
                rows.append((image_id, label, image_id, split, str(p)))
    items = pd.DataFrame(rows, columns=["image_id", "label", "group", "split", "ref"])
    items["label"] = items["label"].astype(np.int64)
    return Catalog(tuple(classes or ()), items, Image.open, str(directory))


def count_class_tree(directory: Path, split_dirs: dict[str, str]) -> dict[str, dict[str, int]]:
    """Images per split folder and class folder, e.g. ``{"Training": {"glioma": 1321, ...}}``."""
    counts: dict[str, dict[str, int]] = {}
    for sub in split_dirs.values():
        split_dir = directory / sub
        if split_dir.is_dir():
            counts[sub] = {
                d.name: len(_image_files(d)[0])
                for d in sorted(split_dir.iterdir())
                if d.is_dir() and not d.name.startswith(".")
            }
    return counts


def _image_files(class_dir: Path) -> tuple[list[Path], int]:
    """Image files below ``class_dir`` and the number of other files; hidden ones (macOS ``._*``) left out."""
    images, others = [], 0
    for p in sorted(class_dir.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(class_dir).parts):
            continue
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(p)
        else:
            others += 1
    return images, others
