"""Train / validation / test assignment: stratified by class, grouped (e.g. by HAM10000 ``lesion_id``).

scikit-learn's ``StratifiedGroupKFold`` only cuts folds of 1/k; :func:`carve` takes any fraction
of every class, exactly up to group granularity, so ``test_fraction: 0.15`` means 15 %.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from hdkd.data.errors import DataError

SPLITS = ("train", "val", "test")


def _group_classes(labels: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each sample's group index, each group's size, and each group's class (most of its samples'):
    a lesion has one diagnosis."""
    group_names, group_of = np.unique(np.asarray(groups), return_inverse=True)
    labels = np.asarray(labels)
    size = np.bincount(group_of, minlength=len(group_names))
    counts = np.zeros((len(group_names), labels.max() + 1), dtype=np.int64)
    np.add.at(counts, (group_of, labels), 1)
    return group_of, size, counts.argmax(axis=1)


def carve(
    labels: np.ndarray,
    groups: np.ndarray,
    fraction: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Boolean mask of about ``fraction`` of each class's samples, taking whole groups.

    A group belongs to the class most of its samples have (a lesion has one diagnosis). Per class,
    groups are visited in a random order and taken while that brings the count closer to
    ``round(fraction * class size)``, and at least one group (the smallest if every group overshoots,
    so that a small validation or test split still sees every class). One
    group is always left behind: the remaining side keeps every class.
    """
    group_of, size, group_label = _group_classes(labels, groups)

    chosen = np.zeros(len(size), dtype=bool)
    for c in np.unique(group_label):
        members = np.flatnonzero(group_label == c)
        if len(members) < 2:
            continue
        members = rng.permutation(members)
        target = max(1, round(fraction * size[members].sum()))
        taken = 0
        for g in members[:-1]:
            if taken >= target:
                break
            if taken + size[g] - target < target - taken:  # closer to the target with this group
                chosen[g] = True
                taken += size[g]
        if not taken:  # every group visited overshot: the smallest still beats none
            chosen[members[np.argmin(size[members])]] = True
    return chosen[group_of]


def assign_splits(
    items: pd.DataFrame, *, val_fraction: float, test_fraction: float, seed: int
) -> np.ndarray:
    """Return each item's split: its official one where the source has it, else carved.

    ``items`` has ``label``, ``group`` and ``split`` (``train``/``val``/``test``, or ``""`` for
    "no official split"). Without an official test split, ``test_fraction`` of all images is
    carved out; without an official validation split, ``val_fraction`` of the training images.
    Each step draws from its own stream of ``seed`` (the share of the training split a run trains on:
    :func:`nested_subsets`, at training time).
    """
    split = items["split"].to_numpy(dtype=object).copy()
    unknown = set(split) - {"", *SPLITS}
    if unknown:
        raise DataError(f"unknown split name(s) {sorted(unknown)} in the catalog; expected {SPLITS}")
    labels, groups = items["label"].to_numpy(), items["group"].to_numpy()
    split[split == ""] = "train"
    if not (split == "train").any():
        raise DataError("the source has no training images")

    def carve_from(pool: np.ndarray, fraction: float, stream: int) -> np.ndarray:
        idx = np.flatnonzero(pool)
        return idx[carve(labels[idx], groups[idx], fraction, np.random.default_rng([seed, stream]))]

    if not (split == "test").any():
        split[carve_from(split == "train", test_fraction, 0)] = "test"
    if not (split == "val").any():
        split[carve_from(split == "train", val_fraction, 1)] = "val"
    return split.astype(str)


def nested_subsets(
    labels: np.ndarray, groups: np.ndarray, fractions: Sequence[float], seed: int
) -> dict[float, np.ndarray]:
    """Stratified, group-whole, **nested** training subsets: ``{fraction: sorted sample indices}``.

    Per class (a group's majority label), the groups are put in one random order drawn from
    ``seed``; the subset for fraction ``f`` is the shortest prefix of that order whose size is
    closest to ``f`` × the class size (at least one group, so every class stays present). A larger
    fraction takes a longer prefix of the same order, so the 10 % subset lies inside the 25 % one,
    and the subsets depend on ``(labels, groups, seed)`` alone: every model trained at a seed sees the
    same images. Fraction 1 is the whole split.
    """
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise ValueError(f"training fractions must lie in (0, 1]; got {bad}")
    group_of, size, group_label = _group_classes(labels, groups)
    # stream 3: streams 0 and 1 carve test and val; 2 was the removed data.train_fraction's, left unused so
    # that the subsets of existing data stay the same
    rng = np.random.default_rng([seed, 3])
    orders = {c: rng.permutation(np.flatnonzero(group_label == c)) for c in np.unique(group_label)}
    subsets = {}
    for f in sorted(set(fractions)):
        chosen = np.zeros(len(size), dtype=bool)
        for members in orders.values():
            cumulative = np.cumsum(size[members])
            target = f * cumulative[-1]
            k = int(np.argmin(np.abs(cumulative - target)))  # first of equally close prefixes
            chosen[members[: k + 1]] = True
        subsets[f] = np.flatnonzero(chosen[group_of])
    return subsets
