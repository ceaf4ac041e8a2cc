"""Bring your own copy: HAM10000 and Brain Tumor MRI read in place from a copy already on disk.

When ``data.root`` itself holds a copy of the dataset, in a layout it is distributed in, the download
stage finds it at the top level of ``data.root``, verifies it and reads it where it is, zip members
straight out of their zips: nothing is downloaded, extracted, copied, linked or written there (a
read-only copy works). Otherwise ``data.root/<dataset>`` stays the download target, as before.

HAM10000 (a copy: an entry at the top whose name starts with ``HAM10000_``, any case, or a zip there
holding one):

======================================  ==========================================================================
layout                                  at the top of ``data.root``
======================================  ==========================================================================
Harvard Dataverse, zipped               ``HAM10000_images_part_1.zip``, ``HAM10000_images_part_2.zip``,
                                        ``HAM10000_metadata.csv`` (original format) or ``HAM10000_metadata.tab``
Harvard Dataverse, extracted            the same with ``HAM10000_images_part_1/`` and ``_2/`` folders, or the
                                        ``ISIC_*.jpg`` files unzipped beside the metadata
Kaggle (skin-cancer-mnist-ham10000)     ``HAM10000_images_part_1/``, ``HAM10000_images_part_2/``,
                                        ``HAM10000_metadata.csv`` (and ``hmnist_*.csv``, ignored); the
                                        lower-case duplicate folders ``ham10000_images_part_*`` of some copies
                                        are read too, an image found twice is taken from the first folder in
                                        name order (``HAM10000_…`` before ``ham10000_…``)
Kaggle, zipped                          the one archive (``archive.zip``, ``skin-cancer-mnist-ham10000.zip``)
                                        holding all of the above
======================================  ==========================================================================

Images are the ``ISIC_*`` image files at the top, in the top folders whose name starts with
``HAM10000_images`` (any case), and in the zips at the top; extracted files are preferred to zip
members. Verified: the metadata file's MD5 against the release's (:class:`HamRelease`), or, for the
other faithful renderings of it (Kaggle's csv, the Dataverse's ``.tab``), its image ids, lesion ids
and diagnoses against the release's; then every listed image present.

Brain Tumor MRI (Kaggle masoudnickparvar): ``Training/<class>/*.jpg`` and ``Testing/<class>/*.jpg`` at
the top, or a zip at the top holding them at any depth (Kaggle's ``archive.zip``, the Zenodo mirror's
``brain-tumor-mri-dataset.zip``). Verified by the image count of every split and class.

The source record holds a digest of the images used (image id, size and CRC-32 of each): the same
images give the same digest whichever layout they came in, a zip's CRCs cost nothing to read, and
extracted files are read once per run of the download stage.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import threading
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from hdkd.data.errors import DataError
from hdkd.data.formats import (
    BRAIN_CLASSES,
    BRAIN_SPLIT_DIRS,
    HAM_CLASSES,
    Catalog,
    ham_catalog,
    read_ham_metadata,
)
from hdkd.data.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

# The names a HAM10000 metadata file goes by (compared lower-case), in order of preference.
HAM_METADATA_NAMES = ("ham10000_metadata.csv", "ham10000_metadata.tab", "ham10000_metadata")
HAM_IMAGE_FOLDERS = "ham10000_images"  # prefix (lower-case) of the folders holding the images
MAX_METADATA_BYTES = 64 << 20  # a metadata file is read whole; the real one has 0.7 MB


# ------------------------------------------------------------------------------------ files
@dataclass(frozen=True)
class Member:
    """One file of a copy: ``name`` below the copy's folder, or member ``name`` of the zip ``archive``."""

    root: Path
    name: str  # posix path: relative to ``root``, or inside ``archive``
    size: int
    archive: Path | None = None
    crc: int | None = None  # a zip member's CRC-32, as its zip's directory records it

    @property
    def ref(self) -> str:
        """What :class:`CopyOpener` opens and messages name: a path, or ``<zip>::<member>``."""
        return f"{self.archive}::{self.name}" if self.archive else str(self.root / self.name)

    @property
    def container(self) -> str:
        """Where in the copy it is, relative: ``HAM10000_images_part_1/``, ``archive.zip``, ``.`` (the top)."""
        if self.archive:
            return self.archive.name
        parent = PurePosixPath(self.name).parent
        return "." if parent == PurePosixPath(".") else f"{parent.parts[0]}/"

    def read_bytes(self) -> bytes:
        if self.archive is None:
            return (self.root / self.name).read_bytes()
        with _open_zip(self.archive) as zf:
            return zf.read(self.name)

    def crc32(self) -> int:
        if self.crc is not None:
            return self.crc
        crc = 0
        with open(self.root / self.name, "rb") as f:
            while block := f.read(1 << 20):
                crc = zlib.crc32(block, crc)
        return crc


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(
            f"{path} is not a readable zip archive ({e}): a truncated or damaged copy? Replace it with the "
            f"release's file"
        ) from None


def _hidden(parts: tuple[str, ...]) -> bool:
    """macOS leaves ``._*`` files and ``__MACOSX/`` folders in copies and zips: never data."""
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


class CopyFiles:
    """The files of a copy at ``root``: its folder's, and the members of the zips at its top level."""

    def __init__(self, root: Path):
        self.root = root
        self.top = sorted(p for p in root.iterdir() if not p.name.startswith("."))
        self.zips = [p for p in self.top if p.suffix.lower() == ".zip" and p.is_file()]
        self._members: dict[Path, list[Member]] = {}

    def folder(self, sub: str = "", recursive: bool = True) -> list[Member]:
        """The files below ``root/sub`` (only those directly in it unless ``recursive``), sorted by path."""
        base = self.root / sub
        paths = base.rglob("*") if recursive else base.iterdir()
        out = []
        for p in sorted(paths):
            rel = p.relative_to(self.root)
            if not _hidden(rel.parts) and p.is_file():
                out.append(Member(self.root, rel.as_posix(), p.stat().st_size))
        return out

    def members(self, archive: Path) -> list[Member]:
        """The files in the zip ``archive``, sorted by name."""
        if archive not in self._members:
            with _open_zip(archive) as zf:
                infos = zf.infolist()
            self._members[archive] = sorted(
                (
                    Member(self.root, i.filename, i.file_size, archive, i.CRC)
                    for i in infos
                    if not i.is_dir() and not _hidden(PurePosixPath(i.filename).parts)
                ),
                key=lambda m: PurePosixPath(m.name).parts,
            )
        return self._members[archive]


class CopyOpener:
    """``Catalog.open_image`` for a copy: a file path, or a zip member read through one zip handle
    per thread (prepare decodes on a thread pool)."""

    def __init__(self, members: list[Member]):
        self._zipped = {m.ref: m for m in members if m.archive is not None}
        self._local = threading.local()

    def __call__(self, ref: str) -> Image.Image:
        m = self._zipped.get(ref)
        if m is None:
            return Image.open(ref)
        handles: dict[Path, zipfile.ZipFile] = self._local.__dict__.setdefault("zips", {})
        if m.archive not in handles:
            handles[m.archive] = zipfile.ZipFile(m.archive)
        return Image.open(io.BytesIO(handles[m.archive].read(m.name)))  # a bad CRC raises: quarantined


def images_digest(images: dict[str, Member]) -> str:
    """MD5 over every image's id, size and CRC-32: the same images give the same digest in any layout."""
    lines = (f"{i}\t{m.size}\t{m.crc32():08x}\n" for i, m in sorted(images.items()))
    h = hashlib.md5()
    for line in lines:
        h.update(line.encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------- HAM10000
@dataclass(frozen=True)
class HamRelease:
    """What a copy of HAM10000 is checked against.

    ``metadata_md5`` maps the MD5 of a published metadata file to what that file is. A file with
    another MD5 passes when its image ids, lesion ids and diagnoses are the release's
    (``content_md5``, :func:`ham_content_md5`): Kaggle's csv and the Dataverse's ``.tab`` export hold
    the release's rows in another byte form. ``images``, ``lesions`` and ``counts`` (images per
    diagnosis) say how a file that fails differs.
    """

    metadata_md5: dict[str, str]
    content_md5: str | None
    images: int
    lesions: int
    counts: dict[str, int]

    @classmethod
    def of(cls, raw: bytes, what: str = "the metadata file") -> HamRelease:
        """The release a metadata file ``raw`` describes (for tests, and to pin a new release)."""
        meta = read_ham_metadata(raw, what)
        return cls(
            {hashlib.md5(raw).hexdigest(): what},
            ham_content_md5(meta),
            len(meta),
            meta["lesion_id"].nunique(),
            {c: int((meta["dx"] == c).sum()) for c in HAM_CLASSES},
        )


def ham_content_md5(meta: pd.DataFrame) -> str:
    """MD5 of the lines ``image_id<TAB>lesion_id<TAB>dx`` of every row, sorted: what the labels and
    the lesion-grouped split depend on, whatever the file's delimiter, quoting, column order, line
    endings, row order or other columns."""
    rows = sorted(zip(meta["image_id"], meta["lesion_id"], meta["dx"]))
    return hashlib.md5("".join(f"{i}\t{le}\t{d}\n" for i, le, d in rows).encode()).hexdigest()


def is_ham_copy(root: Path) -> bool:
    """Whether ``data.root`` itself holds a copy of HAM10000 (see the module's docstring)."""
    if not root.is_dir():
        return False
    top = [p for p in root.iterdir() if not p.name.startswith(".")]
    if any(p.name.lower().startswith("ham10000_") for p in top):
        return True
    for archive in (p for p in top if p.suffix.lower() == ".zip" and p.is_file()):
        try:
            with zipfile.ZipFile(archive) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError):
            continue  # not ours to judge unless it is a HAM file by name
        if any(part.lower().startswith("ham10000_") for n in names for part in PurePosixPath(n).parts):
            return True
    return False


@dataclass
class HamCopy:
    """A copy of HAM10000 found at ``root``: its metadata file and, per image id, the file used."""

    root: Path
    metadata: Member
    images: dict[str, Member]
    searched: list[str]  # where images were looked for, for messages
    nested: list[str]  # zips inside the zips: not read (the Dataverse's "download all" archive holds the part zips)

    @property
    def layout(self) -> str:
        used = {m.container for m in self.images.values()}
        zipped = {m.archive.name for m in self.images.values() if m.archive}
        if not zipped:
            return "extracted folders"
        if used == zipped and all(re.fullmatch(r"ham10000_images_part_\d\.zip", z.lower()) for z in zipped):
            return "Harvard Dataverse zips"
        if used == zipped and len(zipped) == 1 and self.metadata.archive is not None:
            return "one archive"
        return "zips and folders"


def find_ham_copy(root: Path) -> HamCopy:
    """List the copy of HAM10000 at ``root`` (:func:`is_ham_copy`): its metadata file, its images."""
    files = CopyFiles(root)
    candidates: list[tuple[int, int, int, str, Member]] = []  # (zipped, name preference, depth, path, file)
    images: dict[str, Member] = {}
    nested: list[str] = []
    groups: list[list[Member]] = [files.folder(recursive=False)]  # the top: metadata, unzipped images
    searched = ["the top folder"]
    for p in files.top:
        if p.is_dir() and p.name.lower().startswith(HAM_IMAGE_FOLDERS):
            groups.append(files.folder(p.name))
            searched.append(f"{p.name}/")
    for archive in files.zips:
        groups.append(files.members(archive))
        searched.append(archive.name)
    for group in groups:
        for m in group:
            path = PurePosixPath(m.name)
            if path.name.lower() in HAM_METADATA_NAMES and (m.archive or len(path.parts) == 1):
                pref = HAM_METADATA_NAMES.index(path.name.lower())
                candidates.append((int(m.archive is not None), pref, len(path.parts), m.name, m))
            elif path.name.startswith("ISIC_") and _is_image(m.name):
                images.setdefault(path.stem, m)  # extracted before zipped; then by folder / zip name
            elif m.archive is not None and path.suffix.lower() == ".zip":
                nested.append(f"{m.archive.name}::{m.name}")
    if not candidates:
        raise DataError(
            f"no HAM10000 metadata file in {root}, the copy of HAM10000 that data.root points at: "
            f"expected HAM10000_metadata.csv (or the Dataverse's HAM10000_metadata.tab) at its top or in a "
            f"zip there. Add it from the release, or point data.root elsewhere to download the dataset"
        )
    candidates.sort(key=lambda c: c[:4])
    metadata = candidates[0][-1]
    if len(candidates) > 1:
        log.info("%s: using %s of the metadata files %s", root, metadata.ref, [c[-1].ref for c in candidates])
    return HamCopy(root, metadata, images, searched, nested)


def _read_metadata(copy: HamCopy) -> tuple[bytes, pd.DataFrame]:
    if copy.metadata.size > MAX_METADATA_BYTES:
        raise DataError(
            f"{copy.metadata.ref} has {copy.metadata.size} bytes: not a HAM10000 metadata file (0.7 MB)"
        )
    raw = copy.metadata.read_bytes()
    return raw, read_ham_metadata(raw, copy.metadata.ref)


def _check_images_present(copy: HamCopy, meta: pd.DataFrame) -> None:
    absent = [i for i in meta["image_id"] if i not in copy.images]
    if absent:
        names = [f"{i}.jpg" for i in absent[:5]]
        raise DataError(
            f"{len(absent)} image(s) listed in {copy.metadata.ref} are missing from the copy in {copy.root}: "
            f"{', '.join(names)}{', ...' if len(absent) > 5 else ''} (looked in {', '.join(copy.searched)}). "
            f"Restore them from the release, or point data.root at a complete copy"
            + (
                f"; zips inside zips are not read: unzip {', '.join(sorted({n.split('::')[0] for n in copy.nested}))} "
                f"first (it holds {', '.join(n.split('::')[1] for n in copy.nested)})"
                if copy.nested
                else ""
            )
        )


def verify_ham_copy(copy: HamCopy, release: HamRelease) -> dict[str, Any]:
    """Check the copy against ``release``; return what identifies it (the download stage's record).

    The metadata file is the release's (its MD5, or its rows: :class:`HamRelease`), and every image
    it lists is present. Errors name the file, and what was expected.
    """
    raw, meta = _read_metadata(copy)
    md5 = hashlib.md5(raw).hexdigest()
    if md5 in release.metadata_md5:
        verified_by = f"MD5 of {release.metadata_md5[md5]}"
    elif release.content_md5 is not None and ham_content_md5(meta) == release.content_md5:
        verified_by = "its image ids, lesion ids and diagnoses (those of the release)"
        log.info("%s: not byte for byte a known release file, but the release's rows", copy.metadata.ref)
    else:
        raise DataError(_metadata_mismatch(copy.metadata.ref, md5, meta, release))
    _check_images_present(copy, meta)
    used = {i: copy.images[i] for i in meta["image_id"]}
    extra = len(copy.images) - len(used)
    if extra > 0:
        log.warning("%s: %d image file(s) not listed in %s are ignored", copy.root, extra, copy.metadata.ref)
    containers = pd.Series([m.container for m in used.values()]).value_counts().sort_index()
    log.info("%s: HAM10000 copy (%s) verified by %s; %d images", copy.root, copy.layout, verified_by, len(used))
    return {
        "copy": {
            "layout": copy.layout,
            "metadata": copy.metadata.ref.removeprefix(f"{copy.root}/"),
            "images_from": {k: int(v) for k, v in containers.items()},
        },
        "metadata_md5": md5,
        "verified_by": verified_by,
        "images": len(used),
        "images_digest": images_digest(used),
    }


def _metadata_mismatch(where: str, md5: str, meta: pd.DataFrame, release: HamRelease) -> str:
    known = " or ".join(f"{m} ({what})" for m, what in release.metadata_md5.items())
    diffs = []
    if len(meta) != release.images:
        diffs.append(f"{len(meta)} rows (expected {release.images})")
    lesions = meta["lesion_id"].nunique()
    if lesions != release.lesions:
        diffs.append(f"{lesions} lesions (expected {release.lesions})")
    counts = meta["dx"].value_counts()
    diffs += [
        f"{n} {c} images (expected {release.counts[c]})"
        for c in HAM_CLASSES
        if (n := int(counts.get(c, 0))) != release.counts.get(c, 0)
    ]
    dup = meta.loc[meta["image_id"].duplicated(), "image_id"].head(3).tolist()
    if dup:
        diffs.append(f"image ids listed twice: {dup}")
    detail = "; ".join(diffs) or (
        "its numbers of rows, lesions and images per diagnosis are the release's, so rows were edited "
        "(a lesion_id, image_id or dx changed)"
    )
    return (
        f"{where} is not the HAM10000 release's metadata file: its MD5 is {md5}, expected {known}; nor does it "
        f"list the release's image ids, lesion ids and diagnoses, as Kaggle's copy and the Dataverse's .tab "
        f"do: {detail}. Restore the file from the release (the lesion ids decide the split)"
    )


def ham_copy_catalog(copy: HamCopy) -> Catalog:
    """The catalog of a HAM10000 copy, read in place (metadata rows in their order, groups = lesion_id)."""
    _, meta = _read_metadata(copy)
    _check_images_present(copy, meta)
    used = [copy.images[i] for i in meta["image_id"]]
    refs = {i: m.ref for i, m in zip(meta["image_id"], used)}
    return ham_catalog(meta, refs, CopyOpener(used), str(copy.root))


# --------------------------------------------------------------------------- Brain Tumor MRI
@dataclass
class BrainCopy:
    """A copy of Brain Tumor MRI at ``root``: its files below ``Training/`` and ``Testing/``."""

    root: Path
    archive: Path | None  # the zip holding them, or None: the folders at the top
    prefix: str  # of Training/ and Testing/ in the zip ("" at its top)
    members: list[Member]

    @property
    def where(self) -> str:
        if self.archive is None:
            return str(self.root)
        return f"{self.archive}::{self.prefix}" if self.prefix else str(self.archive)

    @property
    def layout(self) -> str:
        return "extracted folders" if self.archive is None else "zip"

    def relative(self, m: Member) -> PurePosixPath:
        """``Training/<class>/<image>``: the image's path below the copy's top, the same in any layout."""
        return PurePosixPath(m.name[len(self.prefix) :])


def _split_folders() -> tuple[str, ...]:
    return tuple(BRAIN_SPLIT_DIRS.values())


def find_brain_copy(root: Path) -> BrainCopy | None:
    """The copy of Brain Tumor MRI that ``data.root`` holds at its top (see the module's docstring), or None."""
    if not root.is_dir():
        return None
    folders = _split_folders()
    if any((root / d).is_dir() for d in folders):
        files = CopyFiles(root)
        members = [m for d in folders if (root / d).is_dir() for m in files.folder(d)]
        return BrainCopy(root, None, "", members)
    files = CopyFiles(root)
    for archive in files.zips:
        try:
            members = files.members(archive)
        except DataError:
            continue
        prefixes = set()
        for m in members:
            parts = PurePosixPath(m.name).parts
            for k, part in enumerate(parts[:-1]):
                if part in folders:
                    prefixes.add("".join(f"{p}/" for p in parts[:k]))
                    break
        if prefixes:
            prefix = min(prefixes, key=lambda p: (p.count("/"), p))
            if len(prefixes) > 1:
                log.warning("%s: Training/ and Testing/ at several depths %s; using %r", archive, sorted(prefixes),
                            prefix)
            inside = [
                m for m in members
                if m.name.startswith(prefix) and PurePosixPath(m.name[len(prefix):]).parts[0] in folders
            ]
            return BrainCopy(root, archive, prefix, inside)
    return None


def _brain_images(copy: BrainCopy) -> list[tuple[PurePosixPath, Member]]:
    """``(Training/<class>/<image>, member)`` of every image file, in the order of
    :func:`hdkd.data.formats.read_class_tree`: split, class, path."""
    order = {d: k for k, d in enumerate(_split_folders())}
    out, skipped = [], 0
    for m in copy.members:
        rel = copy.relative(m)
        if len(rel.parts) < 3:
            skipped += 1  # a file directly in Training/: no class
        elif _is_image(m.name):
            out.append((rel, m))
        else:
            skipped += 1
    if skipped:
        log.warning("%s: %d file(s) that are not images in a class folder ignored", copy.where, skipped)
    return sorted(out, key=lambda e: (order[e[0].parts[0]], e[0].parts[1], e[0].parts[2:]))


def brain_copy_counts(copy: BrainCopy) -> dict[str, dict[str, int]]:
    """Images per split folder and class folder, as :func:`hdkd.data.formats.count_class_tree` counts them."""
    counts: dict[str, dict[str, int]] = {}
    for rel, _ in _brain_images(copy):
        per = counts.setdefault(rel.parts[0], {})
        per[rel.parts[1]] = per.get(rel.parts[1], 0) + 1
    return {s: dict(sorted(per.items())) for s, per in counts.items()}


def brain_copy_record(copy: BrainCopy) -> dict[str, Any]:
    """What identifies a verified copy (the download stage's record, beside its counts)."""
    images = {rel.as_posix(): m for rel, m in _brain_images(copy)}
    copy_info: dict[str, Any] = {"layout": copy.layout}
    if copy.archive is not None:
        copy_info.update(archive=copy.archive.name, prefix=copy.prefix)
    return {"copy": copy_info, "images": len(images), "images_digest": images_digest(images)}


def brain_copy_catalog(copy: BrainCopy) -> Catalog:
    """The catalog of a Brain Tumor MRI copy, read in place: image ids ``Training/<class>/<image>``
    (those the download of the dataset gives), each image its own group, the official splits."""
    split_of = {d: s for s, d in BRAIN_SPLIT_DIRS.items()}
    for s, d in BRAIN_SPLIT_DIRS.items():
        if not any(copy.relative(m).parts[0] == d for m in copy.members) and s in ("train", "test"):
            raise DataError(f"{copy.where}: no {d}/ folder: expected {d}/<class>/<image> beside "
                            f"{'Testing' if d == 'Training' else 'Training'}/")
    rows = []
    entries = _brain_images(copy)
    for rel, m in entries:
        if rel.parts[1] not in BRAIN_CLASSES:
            raise DataError(
                f"unknown label {rel.parts[1]!r}: folder {copy.where}/{rel.parts[0]}/{rel.parts[1]} is not one of "
                f"the classes {list(BRAIN_CLASSES)}"
            )
        image_id = rel.as_posix()
        rows.append((image_id, BRAIN_CLASSES.index(rel.parts[1]), image_id, split_of[rel.parts[0]], m.ref))
    items = pd.DataFrame(rows, columns=["image_id", "label", "group", "split", "ref"])
    items["label"] = items["label"].astype(np.int64)
    return Catalog(BRAIN_CLASSES, items, CopyOpener([m for _, m in entries]), copy.where)
