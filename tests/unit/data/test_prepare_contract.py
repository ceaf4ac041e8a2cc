"""The prepare stage's reports as a user reads them (hdkd/data/prepare.py): duplicates.csv and the manifest's
duplicate summary, the log lines, and the error that names each split's missing classes with the right cause
(an official split that lacks them, too few groups, unreadable files) and only that one."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from hdkd.data.errors import DataError
from hdkd.data.prepare import prepare_dataset
from hdkd.data.sources import fetch_dataset
from tests.helpers.data import params, write_image

COLOURS = [(30 * i, 50 + 20 * i, 100) for i in range(8)]


def _tree(root, layout):
    """``{split: {class: n}}`` images of distinct colours under ``root/<split>/<class>/``."""
    for split, classes in layout.items():
        for c, n in classes.items():
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                write_image(root / split / c / f"{i}.png", COLOURS[i] if c == "a" else COLOURS[-1 - i])
    return root


def _prepare(tmp_path, tree, out="prepared"):
    p = params(tmp_path, dataset="imagefolder", root=str(tree), image_size=16)
    return prepare_dataset(p.data, 0, tmp_path / out)


def _error(tmp_path, tree) -> str:
    with pytest.raises(DataError) as e:
        _prepare(tmp_path, tree)
    return str(e.value)


def test_duplicates_csv_and_summary_name_conflicting_labels(tmp_path):
    tree = _tree(tmp_path / "tree", {"train": {"a": 4, "b": 4}, "test": {"a": 3, "b": 3}})
    write_image(tree / "train" / "b" / "copy_of_a0.png", COLOURS[0])  # a's first image, labelled b
    manifest = _prepare(tmp_path, tree)
    dup = pd.read_csv(tmp_path / "prepared" / "duplicates.csv")
    assert list(dup.columns) == ["sha256", "split", "image_id", "class", "source", "cross_split",
                                 "conflicting_labels"]
    conflicting = dup[dup["conflicting_labels"]]
    # train/a/0, test/a/0 and the copy: one group of identical pixels under two labels
    assert sorted(conflicting["class"]) == ["a", "a", "b"] and conflicting["sha256"].nunique() == 1
    assert conflicting["source"].str.endswith(("0.png", "copy_of_a0.png")).all()
    assert manifest["duplicates"]["conflicting_label_groups"] == 1
    assert set(manifest["duplicates"]) == {"groups", "images", "cross_split_groups", "conflicting_label_groups"}
    same_label = dup[~dup["conflicting_labels"]]  # e.g. train/a/1 and test/a/1: same colour, same class
    assert not same_label.empty and (same_label.groupby("sha256")["class"].nunique() == 1).all()


def test_the_stage_logs_a_table_of_counts_and_a_summary(tmp_path, caplog):
    tree = _tree(tmp_path / "tree", {"train": {"a": 4, "melanoma": 4}, "test": {"a": 3, "melanoma": 3}})
    broken = tree / "train" / "a" / "broken.png"
    broken.write_bytes(b"not a png")
    with caplog.at_level(logging.INFO, logger="hdkd.data.prepare"):
        manifest = _prepare(tmp_path, tree)
    lines = [r.getMessage() for r in caplog.records]
    counts = manifest["splits"]["counts"]
    sizes = {s: sum(c.values()) for s, c in counts.items()}
    assert f"{tree}: 15 images ({{'train': {sizes['train'] + 1}, 'test': 6, 'val': {sizes['val']}}})" in lines
    assert "class      train     val    test" in lines  # "class" left-aligned to the longest class name
    for c in ("a", "melanoma"):
        assert f"{c:<8}  {counts['train'][c]:>6}  {counts['val'][c]:>6}  {counts['test'][c]:>6}" in lines
    d = manifest["duplicates"]
    assert (f"16 px images; 1 quarantined; {d['groups']} duplicate groups ({d['cross_split_groups']} across splits)"
            in lines)
    reason = pd.read_csv(tmp_path / "prepared" / "quarantine.csv")["reason"][0]
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning == [f"quarantined {broken}: {reason}"]


def test_the_manifest_and_the_csv_files_a_user_reads(tmp_path):
    tree = _tree(tmp_path / "tree", {"train": {"a": 4, "b": 4}, "test": {"a": 3, "b": 3}})
    broken = tree / "test" / "b" / "broken.png"
    broken.write_bytes(b"not a png")
    manifest = _prepare(tmp_path, tree)
    assert {k: manifest[k] for k in ("dataset", "layout", "classes", "image_size", "format", "quarantined")} == {
        "dataset": "imagefolder", "layout": "imagefolder", "classes": ["a", "b"], "image_size": 16,
        "format": {"images": "uint8 N x S x S x 3 RGB", "labels": "int64 N", "index": "csv"}, "quarantined": 1}
    splits = manifest["splits"]
    assert set(splits) == {"counts", "sizes", "val_fraction", "test_fraction", "seed"} and splits["seed"] == 0
    p = params(tmp_path, dataset="imagefolder", root=str(tree), image_size=16).data
    assert (splits["val_fraction"], splits["test_fraction"]) == (p.val_fraction, p.test_fraction)
    assert manifest["source"] == {"where": str(tree)}
    quarantine = pd.read_csv(tmp_path / "prepared" / "quarantine.csv")
    assert list(quarantine.columns) == ["split", "image_id", "path", "reason"]
    assert quarantine[["split", "image_id", "path"]].values.tolist() == [["test", "test/b/broken.png", str(broken)]]
    index = pd.read_csv(tmp_path / "prepared" / "train" / "index.csv")
    assert list(index.columns) == ["image_id", "label", "class", "group", "source", "sha256"]
    assert index["sha256"].str.fullmatch(r"[0-9a-f]{64}").all()


def test_a_synthetic_datasets_layout_is_the_one_it_imitates(tmp_path):
    p = params(tmp_path, synthetic={"layout": "brain_tumor_mri"})
    fetch_dataset(p.data, tmp_path / "record")
    manifest = prepare_dataset(p.data, 0, tmp_path / "prepared", tmp_path / "record" / "source.json")
    assert (manifest["dataset"], manifest["layout"]) == ("synthetic", "brain_tumor_mri")


def test_two_causes_are_given_in_one_sentence_each(tmp_path):
    tree = _tree(tmp_path / "tree", {"train": {"a": 3, "b": 3}, "val": {"a": 2}, "test": {"a": 2}})
    (tree / "test" / "b").mkdir()
    (tree / "test" / "b" / "0.png").write_bytes(b"broken")
    message = _error(tmp_path, tree)
    assert message.endswith(": the source's own val split lacks them: add their images there; 1 of their images "
                            "were unreadable: restore them (see quarantine.csv).")


def test_official_splits_lacking_a_class_are_named_together(tmp_path):
    tree = _tree(tmp_path / "tree", {"train": {"a": 3, "b": 3}, "val": {"a": 2}, "test": {"a": 2}})
    message = _error(tmp_path, tree)
    assert message == (f"{tree}: the val split has no images of class(es) ['b']; the test split has no images of "
                       "class(es) ['b']. Every class needs images in train, val and test: the source's own val and "
                       "test split lacks them: add their images there.")


def test_a_class_in_three_groups_gets_no_group_hint(tmp_path):
    tree = _tree(tmp_path / "tree", {"train": {"a": 3, "b": 3}, "test": {"a": 3}})
    message = _error(tmp_path, tree)
    assert "the source's own test split lacks them" in message and "fewer than" not in message


def test_unreadable_images_of_an_official_split_are_the_cause_not_the_split(tmp_path):
    tree = _tree(tmp_path / "tree", {"train": {"a": 4, "b": 4}, "test": {"a": 3, "b": 3}})
    for f in (tree / "test" / "b").iterdir():
        f.write_bytes(b"broken")
    message = _error(tmp_path, tree)
    assert "the test split has no images of class(es) ['b']" in message
    assert "3 of their images were unreadable" in message and "source's own" not in message


def test_carved_splits_that_are_empty_do_not_blame_the_source(tmp_path):
    # one lesion holds all of class b's images: carving cannot put b in val or test
    tree = _tree(tmp_path / "tree", {"train": {"a": 6, "b": 1}, "test": {"a": 2, "b": 1}})
    message = _error(tmp_path, tree)
    assert "the val split has no images of class(es) ['b']" in message
    assert "source's own" not in message and "fewer than 3 groups" in message


def test_no_image_is_lost_between_decoding_and_packing(tmp_path):
    tree = _tree(tmp_path / "tree", {"train": {"a": 5, "b": 5}, "test": {"a": 3, "b": 3}})
    manifest = _prepare(tmp_path, tree)
    assert sum(manifest["splits"]["sizes"].values()) == 16
    packed = [np.load(tmp_path / "prepared" / s / "images.npy") for s in ("train", "val", "test")]
    assert sum(len(x) for x in packed) == 16 and all(x.dtype == np.uint8 for x in packed)
