"""The balance stage: oversample the training split, with bounded memory.

- ``smote``: SMOTE exactly as ``imblearn.over_sampling.SMOTE(k_neighbors=k, random_state=seed)``
  computes it (same neighbours, same random draws, same interpolation; values rounded to
  ``uint8``), but class by class: only the class being oversampled is held in memory (as
  float32), its neighbours come from imbalanced-learn's nearest-neighbour estimator queried in
  chunks, and new samples are streamed to the output file. The usual
  ``SMOTE().fit_resample(all_images_flattened)`` needs the whole set, and the result, in float64
  (tens of GB for HAM10000 at 224 px); this stays under 2 GB.
- ``augment``: each new sample is an augmented copy (the ``augment`` section's operations) of
  a real image of its class, drawn at random.
- ``none``: the training split unchanged (hard links, no copy).

The output is the prepared training split followed by the new samples, class by class in label
order (imbalanced-learn's order); ``index.csv`` says where every row came from.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sklearn
from imblearn.utils import check_neighbors_object
from sklearn.utils import check_random_state
from tqdm import tqdm

from hdkd.config import AugmentConfig, BalanceConfig
from hdkd.data.errors import DataError
from hdkd.data.packed import (
    IMAGES,
    INDEX,
    LABELS,
    MANIFEST,
    NpyWriter,
    load_split,
    read_rows,
    write_labels_and_index,
)
from hdkd.data.seeding import derive_seed
from hdkd.infra.io import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)

CHUNK = 256  # rows per read when copying or augmenting
SMOTE_CHUNK = 32  # rows in float64 at once (32 x 150,528 x 8 B = 39 MB at 224 px)


def balance_training_split(
    cfg: BalanceConfig,
    augment: AugmentConfig,
    seed: int,
    prepared_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
) -> dict[str, Any]:
    """Write the balanced training split of ``prepared_dir`` to ``out_dir/train``; return the manifest."""
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    split = load_split(prepared_dir, "train")
    prepared = read_json(prepared_dir / MANIFEST)
    before = np.bincount(split.labels, minlength=len(split.classes))
    n_new = resolve_targets(cfg.targets, split.classes, before) if cfg.method != "none" else {}
    source = prepared_dir / "train"
    with atomic_dir(out_dir) as tmp:
        target = tmp / "train"
        target.mkdir()
        if not sum(n_new.values()):
            for name in (IMAGES, LABELS, INDEX):
                _link_or_copy(source / name, target / name)
            labels = split.labels
        else:
            total = len(split) + sum(n_new.values())
            with NpyWriter(target / IMAGES, total, split.images.shape[1:]) as out:
                for start in range(0, len(split), CHUNK):
                    out.write(read_rows(source / IMAGES, np.arange(start, min(start + CHUNK, len(split)))))
                if cfg.method == "smote":
                    new = smote_oversample(
                        source / IMAGES, split.labels, n_new, cfg.k_neighbors, seed, out, split.classes
                    )
                else:
                    new = augment_oversample(source / IMAGES, split.labels, n_new, augment, seed, out)
            index = pd.read_csv(source / INDEX, dtype={"image_id": str, "group": str}, keep_default_na=False)
            index["origin"] = "real"
            labels = np.concatenate([split.labels, new["label"].to_numpy()])
            write_labels_and_index(
                target, labels, pd.concat([index, _new_index(new, index, split.classes, cfg.method)])
            )
        after = np.bincount(labels, minlength=len(split.classes))
        manifest = {
            "classes": list(split.classes),
            "image_size": split.image_size,
            "method": cfg.method,
            "targets": cfg.targets,
            "k_neighbors": cfg.k_neighbors if cfg.method == "smote" else None,
            "seed": seed,
            "counts_before": dict(zip(split.classes, before.tolist())),
            "counts_after": dict(zip(split.classes, after.tolist())),
            "prepared": {k: prepared[k] for k in ("dataset", "layout", "image_size")},
        }
        write_json(tmp / MANIFEST, manifest)
    log.info("balance (%s): %s -> %s", cfg.method, manifest["counts_before"], manifest["counts_after"])
    return manifest


def resolve_targets(
    targets: str | dict[str, int], classes: tuple[str, ...], counts: np.ndarray
) -> dict[int, int]:
    """Samples to add per class label: up to the majority count, or up to explicit ``{class: count}``."""
    if targets == "majority":
        goal = {i: int(counts.max()) for i in range(len(classes))}
    else:
        unknown = sorted(set(targets) - set(classes))
        if unknown:
            raise DataError(
                f"balance.targets names unknown class(es) {unknown}; the classes are {list(classes)}"
            )
        goal = {i: targets.get(c, int(counts[i])) for i, c in enumerate(classes)}
        below = [f"{classes[i]}: {g} < {counts[i]}" for i, g in goal.items() if g < counts[i]]
        if below:
            raise DataError(
                f"balance.targets below the training images a class already has ({', '.join(below)}); "
                f"oversampling only adds images: raise the targets or leave those classes out"
            )
    return {i: g - int(counts[i]) for i, g in goal.items()}


def smote_oversample(
    images: Path,
    labels: np.ndarray,
    n_new: dict[int, int],
    k_neighbors: int,
    seed: int,
    out: NpyWriter,
    classes: tuple[str, ...] | None = None,
) -> pd.DataFrame:
    """Append ``n_new[c]`` SMOTE samples of each class ``c`` to ``out``; return their provenance.

    ``classes`` names the labels in messages.
    Follows ``imblearn.over_sampling.SMOTE._fit_resample``: per class, neighbours of each sample
    among its own class (``k + 1`` nearest, itself dropped), then a fresh
    ``RandomState(seed)`` draws (sample, neighbour) pairs and steps in [0, 1).
    """
    row_shape = out.row_shape
    provenance = []
    for label in sorted(c for c, n in n_new.items() if n > 0):
        n = n_new[label]
        members = np.flatnonzero(labels == label)
        if len(members) <= k_neighbors:
            raise DataError(
                f"class {classes[label] if classes else label!r} has {len(members)} training images; "
                f"SMOTE needs more than balance.k_neighbors={k_neighbors}: lower k_neighbors, "
                f"or leave the class out of balance.targets"
            )
        x = np.empty((len(members), int(np.prod(row_shape))), dtype=np.float32)  # exact for uint8 values
        for start in range(0, len(members), CHUNK):
            x[start : start + CHUNK] = read_rows(images, members[start : start + CHUNK]).reshape(
                -1, x.shape[1]
            )
        nn = check_neighbors_object("k_neighbors", k_neighbors, additional_neighbor=1).fit(x)
        # scikit-learn upcasts blocks of pairwise_dist_chunk_size rows to float64 per thread:
        # 256 (its default) x 150,528 x 8 B is 300 MB a block at 224 px; 32 keeps it at 40 MB.
        with sklearn.config_context(pairwise_dist_chunk_size=SMOTE_CHUNK):
            neighbours = np.concatenate(
                [
                    nn.kneighbors(x[s : s + 2 * SMOTE_CHUNK], return_distance=False)[:, 1:]
                    for s in range(0, len(x), 2 * SMOTE_CHUNK)
                ]
            )
        rng = check_random_state(seed)  # imbalanced-learn restarts the stream for every class
        picks = rng.randint(low=0, high=neighbours.size, size=n)
        steps = rng.uniform(size=n)[:, np.newaxis]
        rows, cols = np.floor_divide(picks, neighbours.shape[1]), np.mod(picks, neighbours.shape[1])
        for start in tqdm(
            range(0, n, SMOTE_CHUNK), desc=f"SMOTE {classes[label] if classes else label}", leave=False
        ):
            r, c, s = (
                rows[start : start + SMOTE_CHUNK],
                cols[start : start + SMOTE_CHUNK],
                steps[start : start + SMOTE_CHUNK],
            )
            base = x[r].astype(np.float64)
            new = base + s * (x[neighbours[r, c]].astype(np.float64) - base)
            out.write(np.rint(new).astype(np.uint8).reshape(-1, *row_shape))
        del x, nn
        provenance.append(
            pd.DataFrame(
                {
                    "label": label,
                    "parent": members[rows],
                    "neighbour": members[neighbours[rows, cols]],
                    "step": steps[:, 0],
                }
            )
        )
    return pd.concat(provenance, ignore_index=True)


def augment_oversample(
    images: Path, labels: np.ndarray, n_new: dict[int, int], cfg: AugmentConfig, seed: int, out: NpyWriter
) -> pd.DataFrame:
    """Append ``n_new[c]`` augmented copies of random real images of each class ``c``; return their parents.

    Uses the ``augment`` section's operations whether or not ``augment.enabled`` (which is about
    training-time augmentation); new sample ``j`` of class ``c`` is drawn from (seed, c, j).
    """
    import torch  # here, not at the top: the SMOTE path stays free of torch's ~0.7 GB

    from hdkd.data.augment import augment_image

    provenance = []
    for label in sorted(c for c, n in n_new.items() if n > 0):
        members = np.flatnonzero(labels == label)
        parents = np.random.default_rng(derive_seed(seed, label)).choice(members, size=n_new[label])
        for start in tqdm(range(0, len(parents), CHUNK), desc=f"augment class {label}", leave=False):
            batch = torch.from_numpy(read_rows(images, parents[start : start + CHUNK])).permute(0, 3, 1, 2)
            augmented = [
                augment_image(image, cfg, torch.Generator().manual_seed(derive_seed(seed, label, j)))
                for j, image in enumerate(batch, start)
            ]
            out.write(torch.stack(augmented).permute(0, 2, 3, 1).numpy())
        provenance.append(pd.DataFrame({"label": label, "parent": parents}))
    return pd.concat(provenance, ignore_index=True)


def _new_index(new: pd.DataFrame, index: pd.DataFrame, classes: tuple[str, ...], method: str) -> pd.DataFrame:
    ids = index["image_id"].to_numpy()
    source = [f"{method}:{ids[p]}" for p in new["parent"]]
    if "neighbour" in new:
        source = [f"{s}+{ids[q]}" for s, q in zip(source, new["neighbour"])]
    return pd.DataFrame(
        {
            "image_id": [f"{method}_{j:06d}" for j in range(len(new))],
            "label": new["label"].to_numpy(),
            "class": [classes[i] for i in new["label"]],
            "group": index["group"].to_numpy()[new["parent"]],  # it derives from its parent's lesion
            "source": source,
            "origin": method,
        }
    )


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not supported
        shutil.copy2(src, dst)
