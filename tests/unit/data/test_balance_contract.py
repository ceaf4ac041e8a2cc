"""The balance stage's contracts (hdkd/data/balance.py's docstrings) as a user of its output reads them: the
manifest, the index's rows for the new samples, the log line, the counts asked for, the classes left out, the
augmented samples' draw from (seed, class, index), and large classes (beyond the read and query chunks)."""

from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd
import pytest
import torch
from imblearn.over_sampling import SMOTE

from hdkd.data.augment import augment_image
from hdkd.data.balance import CHUNK, balance_training_split, resolve_targets, smote_oversample
from hdkd.data.errors import DataError
from hdkd.data.packed import IMAGES, INDEX, LABELS, MANIFEST, NpyWriter, load_split
from hdkd.data.seeding import derive_seed
from hdkd.infra.io import file_md5, write_json
from tests.helpers.params import section

SHAPE = (5, 5, 3)


def _images(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.integers(40, 216, (labels.max() + 1, *SHAPE))
    return np.clip(centres[labels] + rng.normal(0, 30, (len(labels), *SHAPE)), 0, 255).astype(np.uint8)


def _prepared(root, counts, ids=None, groups=None, classes=("x", "y", "z"), seed=0):
    labels = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng(seed).shuffle(labels)
    (root / "train").mkdir(parents=True)
    np.save(root / "train" / IMAGES, _images(labels, seed))
    np.save(root / "train" / LABELS, labels)
    pd.DataFrame({"image_id": ids if ids is not None else [f"i{i}" for i in range(len(labels))],
                  "label": labels,
                  "group": groups if groups is not None else [f"g{i // 2}" for i in range(len(labels))]}
                 ).to_csv(root / "train" / INDEX, index=False)
    write_json(root / MANIFEST, {"classes": list(classes), "dataset": "t", "layout": "t", "image_size": SHAPE[0]})
    return root


def _balance(tmp_path, prepared, out="out", seed=0, augment=None, **balance):
    return balance_training_split(section("balance", **balance), augment or section("augment"), seed, prepared,
                                  tmp_path / out)


def test_the_manifest_records_the_method_and_its_settings(tmp_path):
    prepared = _prepared(tmp_path / "p", (30, 12, 7))
    smote = _balance(tmp_path, prepared, "s", seed=4, method="smote", k_neighbors=3)
    assert {k: smote[k] for k in ("method", "targets", "k_neighbors", "seed", "image_size")} == {
        "method": "smote", "targets": "majority", "k_neighbors": 3, "seed": 4, "image_size": SHAPE[0]}
    augment = _balance(tmp_path, prepared, "a", method="augment", targets={"z": 9})
    assert {k: augment[k] for k in ("method", "targets", "k_neighbors", "seed")} == {
        "method": "augment", "targets": {"z": 9}, "k_neighbors": None, "seed": 0}
    assert augment["counts_after"] == {"x": 30, "y": 12, "z": 9}


def test_the_stage_logs_its_counts_before_and_after(tmp_path, caplog):
    prepared = _prepared(tmp_path / "p", (30, 12, 7))
    with caplog.at_level(logging.INFO, logger="hdkd.data.balance"):
        _balance(tmp_path, prepared, method="smote", k_neighbors=3)
    assert ("balance (smote): {'x': 30, 'y': 12, 'z': 7} -> {'x': 30, 'y': 30, 'z': 30}"
            in [r.getMessage() for r in caplog.records])


@pytest.mark.parametrize("method", ["smote", "augment"])
def test_a_class_one_image_short_of_its_target_gets_exactly_that_image(tmp_path, method):
    prepared = _prepared(tmp_path / "p", (30, 12, 7))
    manifest = _balance(tmp_path, prepared, method=method, k_neighbors=3, targets={"y": 13, "z": 8})
    assert manifest["counts_after"] == load_split(tmp_path / "out", "train").class_counts() == {
        "x": 30, "y": 13, "z": 8}


def test_a_class_left_out_of_the_targets_needs_no_more_images_than_k(tmp_path):
    # "lower k_neighbors, or leave the class out of balance.targets": a class left out is not oversampled
    prepared = _prepared(tmp_path / "p", (30, 12, 3))
    manifest = _balance(tmp_path, prepared, method="smote", k_neighbors=5, targets={"y": 20})
    assert manifest["counts_after"] == {"x": 30, "y": 20, "z": 3}


def test_smote_refuses_a_class_of_exactly_k_images_naming_it(tmp_path):
    prepared = _prepared(tmp_path / "p", (30, 12, 5))
    with pytest.raises(DataError, match="class 'z' has 5 training images; SMOTE needs more than balance.k_neighbors=5"):
        _balance(tmp_path, prepared, method="smote", k_neighbors=5)


def test_targets_below_the_counts_are_listed_together():
    with pytest.raises(DataError, match=r"\(a: 5 < 10, b: 3 < 4\)"):
        resolve_targets({"a": 5, "b": 3}, ("a", "b"), np.array([10, 4]))


def test_new_rows_of_the_index_say_where_they_came_from(tmp_path):
    prepared = _prepared(tmp_path / "p", (30, 12, 7))
    _balance(tmp_path, prepared, "s", method="smote", k_neighbors=3)
    real = pd.read_csv(prepared / "train" / INDEX, dtype=str, keep_default_na=False)
    index = pd.read_csv(tmp_path / "s" / "train" / INDEX, dtype=str, keep_default_na=False)
    new = index[index["origin"] == "smote"].reset_index(drop=True)
    assert list(new["image_id"][:2]) == ["smote_000000", "smote_000001"] and len(new) == 18 + 23
    group_of = dict(zip(real["image_id"], real["group"]))
    label_of = dict(zip(real["image_id"], real["label"]))
    for source, group, label, name in zip(new["source"], new["group"], new["label"], new["class"]):
        parent, neighbour = source.removeprefix("smote:").split("+")
        assert group == group_of[parent]  # it derives from its parent's lesion
        assert label == label_of[parent] == label_of[neighbour] and name == "xyz"[int(label)]
    _balance(tmp_path, prepared, "a", method="augment")
    index = pd.read_csv(tmp_path / "a" / "train" / INDEX, dtype=str, keep_default_na=False)
    added = index[index["origin"] == "augment"]
    assert added["source"].str.fullmatch(r"augment:i\d+").all() and added["image_id"].iloc[0] == "augment_000000"


def test_ids_and_groups_are_kept_as_written(tmp_path):
    # zero-padded numbers, "NA", and a blank group (HAM10000: blank lesion ids) are names, not values
    n = 30 + 12 + 7
    ids = [f"{i:04d}" for i in range(n)]
    groups = [("007", "NA", "")[i % 3] for i in range(n)]
    prepared = _prepared(tmp_path / "p", (30, 12, 7), ids=ids, groups=groups)
    _balance(tmp_path, prepared, method="augment")
    index = pd.read_csv(tmp_path / "out" / "train" / INDEX, dtype=str, keep_default_na=False)
    new = index[index["origin"] == "augment"]
    assert new["source"].str.fullmatch(r"augment:\d{4}").all() and list(index["image_id"][:n]) == ids
    group_of = dict(zip(ids, groups))
    assert [group_of[s.removeprefix("augment:")] for s in new["source"]] == list(new["group"])
    assert set(new["group"]) == {"007", "NA", ""}


def test_a_class_without_training_images_is_counted_zero(tmp_path):
    prepared = _prepared(tmp_path / "p", (30, 12), classes=("x", "y", "z"))
    manifest = _balance(tmp_path, prepared)
    assert manifest["counts_before"] == manifest["counts_after"] == {"x": 30, "y": 12, "z": 0}


def test_real_images_beyond_one_chunk_are_copied_in_order(tmp_path):
    prepared = _prepared(tmp_path / "p", (CHUNK + 60, 40, 30))
    _balance(tmp_path, prepared, method="augment", targets={"z": 40})
    n = CHUNK + 130
    assert (load_split(tmp_path / "out", "train").images[:n] == np.load(prepared / "train" / IMAGES)).all()


def test_smote_of_classes_beyond_the_read_and_query_chunks_equals_imbalanced_learn(tmp_path):
    # the class oversampled holds more than two reads (CHUNK rows each) and many neighbour queries
    labels = np.repeat([0, 1], [2 * CHUNK + 120, 2 * CHUNK + 20])
    images = _images(labels, seed=3)
    np.save(tmp_path / "x.npy", images)
    with NpyWriter(tmp_path / "new.npy", 100, SHAPE) as out:
        smote_oversample(tmp_path / "x.npy", labels, {0: 0, 1: 100}, 5, 7, out)
    x_ref, _ = SMOTE(k_neighbors=5, random_state=7).fit_resample(images.reshape(len(images), -1).astype(float), labels)
    reference = np.rint(x_ref[len(labels):]).astype(np.uint8).reshape(-1, *SHAPE)
    assert (np.load(tmp_path / "new.npy") == reference).all()


def test_augmented_sample_j_of_class_c_is_drawn_from_seed_c_and_j(tmp_path):
    # the docstring's rule: the parents from (seed, c), sample j's augmentation from (seed, c, j), j counted over
    # the class (past one chunk of CHUNK rows too)
    counts = (CHUNK + 10, 6, 4)
    prepared = _prepared(tmp_path / "p", counts)
    cfg = section("augment")
    _balance(tmp_path, prepared, seed=5, augment=cfg, method="augment")
    split = load_split(tmp_path / "out", "train")
    labels, real = np.load(prepared / "train" / LABELS), np.load(prepared / "train" / IMAGES)
    start = sum(counts)
    for c in (1, 2):
        members = np.flatnonzero(labels == c)
        n = counts[0] - counts[c]
        parents = np.random.default_rng(derive_seed(5, c)).choice(members, size=n)
        for j in (0, 1, n - 1):
            image = torch.from_numpy(real[parents[j]]).permute(2, 0, 1)
            expected = augment_image(image, cfg, torch.Generator().manual_seed(derive_seed(5, c, j)))
            assert (split.images[start + j] == expected.permute(1, 2, 0).numpy()).all(), (c, j)
        start += n
    assert n > CHUNK


def test_without_hard_links_the_unchanged_split_is_copied(tmp_path, monkeypatch):
    prepared = _prepared(tmp_path / "p", (30, 12, 7))

    def no_links(src, dst):
        raise OSError("links not supported")

    monkeypatch.setattr(os, "link", no_links)
    _balance(tmp_path, prepared)
    for name in (IMAGES, LABELS, INDEX):
        assert file_md5(tmp_path / "out" / "train" / name) == file_md5(prepared / "train" / name)
        assert os.stat(tmp_path / "out" / "train" / name).st_nlink == 1
