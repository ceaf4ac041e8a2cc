"""The prepare stage: decode, split and pack a dataset (see :mod:`hdkd.data.packed` for the layout).

1. The source's :class:`~hdkd.data.formats.Catalog` lists every image with its label, group and
   official split; :func:`~hdkd.data.splits.assign_splits` completes the splits from metadata
   alone, so one unreadable file never reshuffles the others.
2. Every image of a split is decoded (EXIF orientation, any mode to RGB), resized and hashed, on
   a thread pool (Pillow releases the GIL while decoding and resizing).
3. Unreadable files go to ``quarantine.csv`` (path, reason); identical images (same decoded
   pixels) are reported in ``duplicates.csv``, flagged when they cross splits; nothing is dropped
   silently.
4. Each split is written as one ``uint8`` array plus labels and index; ``manifest.json`` records
   classes, counts, sizes, source checksums, duplicates and quarantine.

The output directory appears atomically, complete or not at all.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from hdkd.config import DataConfig
from hdkd.data.errors import DataError, UnreadableImage
from hdkd.data.formats import Catalog
from hdkd.data.images import decode_resized
from hdkd.data.packed import IMAGES, MANIFEST, NpyWriter, read_rows, write_labels_and_index
from hdkd.data.sources import get_source
from hdkd.data.splits import SPLITS, assign_splits
from hdkd.infra.io import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)

QUARANTINE, DUPLICATES = "quarantine.csv", "duplicates.csv"
CHUNK = 256  # images copied per step when packing a split


def prepare_dataset(
    cfg: DataConfig, seed: int, out_dir: str | os.PathLike, source_record: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Prepare ``cfg.dataset`` into ``out_dir``; return the manifest.

    ``source_record`` is the download stage's record (``data/raw/source.json``): its checksums go
    into the manifest, and it must describe the dataset being prepared.
    """
    source = get_source(cfg.dataset)
    record = read_json(source_record) if source_record else {}
    if record and (record["dataset"], record["directory"]) != (cfg.dataset, str(source.directory(cfg))):
        raise DataError(
            f"{source_record} describes dataset {record['dataset']!r} in {record['directory']}, not "
            f"{cfg.dataset!r}: run the download stage first (dvc repro download)"
        )
    catalog = source.catalog(cfg)
    items = catalog.items.copy()
    items["split"] = assign_splits(
        items,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        seed=seed,
    )
    used = items.reset_index(drop=True)
    log.info("%s: %d images (%s)", catalog.where, len(used), used["split"].value_counts().to_dict())

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        decoded = tmp / ".decoded.npy"
        used["sha256"], used["quarantine_reason"] = _decode_all(catalog, used, cfg.image_size, decoded)
        quarantined = used[used["quarantine_reason"] != ""]
        good = used[used["quarantine_reason"] == ""]
        by_split = {split: good[good["split"] == split] for split in SPLITS}
        n_classes = len(catalog.classes)
        counts = {
            split: dict(zip(catalog.classes, np.bincount(rows["label"], minlength=n_classes).tolist()))
            for split, rows in by_split.items()
        }
        _check_split_classes(catalog, counts, quarantined)
        for split, rows in by_split.items():
            _write_split(tmp / split, decoded, rows, catalog.classes, cfg.image_size)
        decoded.unlink()

        quarantined[["split", "image_id", "ref", "quarantine_reason"]].rename(
            columns={"ref": "path", "quarantine_reason": "reason"}
        ).to_csv(tmp / QUARANTINE, index=False)
        duplicates = _duplicates(good, catalog.classes)
        duplicates.to_csv(tmp / DUPLICATES, index=False)

        manifest = {
            "dataset": cfg.dataset,
            "layout": cfg.synthetic.layout if cfg.dataset == "synthetic" else cfg.dataset,
            "classes": list(catalog.classes),
            "image_size": cfg.image_size,
            "format": {"images": "uint8 N x S x S x 3 RGB", "labels": "int64 N", "index": "csv"},
            "splits": {
                "counts": counts,
                "sizes": {s: sum(c.values()) for s, c in counts.items()},
                "val_fraction": cfg.val_fraction,
                "test_fraction": cfg.test_fraction,
                "seed": seed,
            },
            "source": {"where": catalog.where, **record},
            "duplicates": _duplicate_summary(duplicates),
            "quarantined": len(quarantined),
        }
        write_json(tmp / MANIFEST, manifest)
    _log_summary(manifest)
    return manifest


def _decode_all(catalog: Catalog, items: pd.DataFrame, size: int, path: Path) -> tuple[list[str], list[str]]:
    """Decode ``items`` into rows of the array at ``path``; return each one's hash and quarantine reason."""
    refs = items["ref"].tolist()

    def decode(ref: Any) -> tuple[np.ndarray | None, str, str]:
        try:
            pixels, digest = decode_resized(lambda: catalog.open_image(ref), size, str(ref))
            return pixels, digest, ""
        except UnreadableImage as e:
            return None, "", e.reason

    hashes, reasons = [], []
    with NpyWriter(path, len(refs), (size, size, 3)) as out, ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for pixels, digest, reason in tqdm(
            pool.map(decode, refs), total=len(refs), desc="decode", unit="img", leave=False
        ):
            out.write((pixels if pixels is not None else np.zeros((size, size, 3), np.uint8))[None])
            hashes.append(digest)
            reasons.append(reason)
    for ref, reason in zip(refs, reasons):
        if reason:
            log.warning("quarantined %s: %s", ref, reason)
    return hashes, reasons


def _check_split_classes(catalog: Catalog, counts: dict[str, dict[str, int]], quarantined: pd.DataFrame) -> None:
    """Every split must hold images of every class: a model selected on, or evaluated against, a
    split without some class (or an empty one) gives numbers that mean nothing.

    The message names each split and its missing classes, then the likely cause and the way out.
    """
    items = catalog.items
    problems, missing, absent_at_source = [], set(), []
    for split, per_class in counts.items():
        empty = [c for c, k in per_class.items() if k == 0]
        if empty:
            missing.update(empty)
            at_source = set(items.loc[items["split"] == split, "label"].map(lambda i: catalog.classes[i]))
            if (items["split"] == split).any() and set(empty) - at_source:  # an official split lacks them
                absent_at_source.append(split)
            problems.append(
                f"the {split} split is empty"
                if len(empty) == len(per_class)
                else f"the {split} split has no images of class(es) {empty}"
            )
    if not problems:
        return
    hints = []
    groups = items.groupby("label")["group"].nunique().reindex(range(len(catalog.classes)), fill_value=0)
    few = [c for i, c in enumerate(catalog.classes) if c in missing and groups[i] < len(SPLITS)]
    if few:
        hints.append(
            f"class(es) {few} have their images in fewer than {len(SPLITS)} groups (HAM10000: lesion_id; "
            f"blank ids form one group), and a group stays in one split: check the group ids, or add "
            f"images of other groups"
        )
    if absent_at_source:
        hints.append(f"the source's own {' and '.join(absent_at_source)} split lacks them: add their images there")
    lost = int(quarantined["label"].map(lambda i: catalog.classes[i]).isin(missing).sum())
    if lost:
        hints.append(f"{lost} of their images were unreadable: restore them (see {QUARANTINE})")
    raise DataError(
        f"{catalog.where}: {'; '.join(problems)}. Every class needs images in train, val and test: "
        + "; ".join(hints) + "."
    )


def _write_split(
    directory: Path, decoded: Path, rows: pd.DataFrame, classes: tuple[str, ...], size: int
) -> None:
    directory.mkdir()
    positions = rows.index.to_numpy()
    with NpyWriter(directory / IMAGES, len(rows), (size, size, 3)) as out:
        for start in range(0, len(positions), CHUNK):
            out.write(read_rows(decoded, positions[start : start + CHUNK]))
    index = pd.DataFrame(
        {
            "image_id": rows["image_id"],
            "label": rows["label"],
            "class": [classes[i] for i in rows["label"]],
            "group": rows["group"],
            "source": rows["ref"].astype(str),
            "sha256": rows["sha256"],
        }
    )
    write_labels_and_index(directory, rows["label"].to_numpy(), index)


def _duplicates(good: pd.DataFrame, classes: tuple[str, ...]) -> pd.DataFrame:
    """Every image whose decoded pixels equal another's, one row each, grouped by hash."""
    dup = good[good["sha256"].duplicated(keep=False)].sort_values(["sha256", "split", "image_id"])
    per_hash = dup.groupby("sha256")
    return pd.DataFrame(
        {
            "sha256": dup["sha256"],
            "split": dup["split"],
            "image_id": dup["image_id"],
            "class": [classes[i] for i in dup["label"]],
            "source": dup["ref"].astype(str),
            "cross_split": per_hash["split"].transform("nunique").gt(1),
            "conflicting_labels": per_hash["label"].transform("nunique").gt(1),
        }
    )


def _duplicate_summary(dup: pd.DataFrame) -> dict[str, int]:
    groups = dup.groupby("sha256").first()
    return {
        "groups": len(groups),
        "images": len(dup),
        "cross_split_groups": int(groups["cross_split"].sum()),
        "conflicting_label_groups": int(groups["conflicting_labels"].sum()),
    }


def _log_summary(manifest: dict[str, Any]) -> None:
    counts = manifest["splits"]["counts"]
    width = max(len(c) for c in manifest["classes"])
    log.info("%s  %s", "class".ljust(width), "  ".join(f"{s:>6}" for s in SPLITS))
    for c in manifest["classes"]:
        log.info("%s  %s", c.ljust(width), "  ".join(f"{counts[s][c]:>6}" for s in SPLITS))
    d = manifest["duplicates"]
    log.info(
        "%d px images; %d quarantined; %d duplicate groups (%d across splits)",
        manifest["image_size"],
        manifest["quarantined"],
        d["groups"],
        d["cross_split_groups"],
    )
