"""The splits' contracts at their edges (hdkd/data/splits.py): a large fraction takes all but one group, a
source without training images is refused by name, and a training fraction above 1 is refused."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hdkd.data.errors import DataError
from hdkd.data.splits import assign_splits, carve, nested_subsets


@pytest.mark.parametrize("seed", range(4))
def test_carve_of_a_large_fraction_leaves_exactly_one_group_behind(seed):
    # three lesions of one image; 90 % of 3 rounds to 3: every group but the one always left behind is taken
    labels = np.array([0] * 20 + [1, 1, 1])
    groups = np.array([f"g{i}" for i in range(20)] + ["a", "b", "c"])
    mask = carve(labels, groups, 0.9, np.random.default_rng(seed))
    assert mask[20:].sum() == 2 and mask[:20].sum() == 18  # round(0.9 * 20)


def test_a_source_without_training_images_is_refused_by_name():
    items = pd.DataFrame({"label": [0, 1, 0, 1], "group": list("abcd"), "split": ["test", "test", "val", "val"]})
    with pytest.raises(DataError, match="^the source has no training images$"):
        assign_splits(items, val_fraction=0.1, test_fraction=0.1, seed=0)


@pytest.mark.parametrize("bad", [1.5, 2.0, -0.1])
def test_training_fractions_outside_zero_one_are_refused_naming_them(bad):
    labels, groups = np.array([0, 0, 1, 1]), np.array(list("abcd"))
    with pytest.raises(ValueError, match=rf"must lie in \(0, 1\]; got \[{bad}\]"):
        nested_subsets(labels, groups, [0.5, bad], seed=0)
