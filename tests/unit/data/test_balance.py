"""Balancing the training split: SMOTE equal to imbalanced-learn's, augmented copies, pass-through."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from imblearn.over_sampling import SMOTE
from sklearn.neighbors import NearestNeighbors

from hdkd.data.balance import balance_training_split, resolve_targets, smote_oversample
from hdkd.data.errors import DataError
from hdkd.data.packed import IMAGES, INDEX, LABELS, MANIFEST, NpyWriter, load_split
from hdkd.infra.io import file_md5, read_json, write_json
from tests.helpers import ROOT
from tests.helpers.params import section

SHAPE = (5, 5, 3)


def _data(counts=(40, 17, 9), seed=0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(counts)), counts)
    rng.shuffle(labels)
    centres = rng.integers(40, 216, (len(counts), *SHAPE))
    images = np.clip(centres[labels] + rng.normal(0, 30, (len(labels), *SHAPE)), 0, 255).astype(np.uint8)
    return images, labels


def _smote(tmp_path, images, labels, n_new, k=5, seed=0):
    np.save(tmp_path / "x.npy", images)
    with NpyWriter(tmp_path / "new.npy", sum(n_new.values()), SHAPE) as out:
        provenance = smote_oversample(tmp_path / "x.npy", labels, n_new, k, seed, out)
    return np.load(tmp_path / "new.npy"), provenance


@pytest.mark.parametrize(
    "targets", ["majority", {"1": 30}, {"1": 25, "2": 40}], ids=["majority", "one", "two"]
)
@pytest.mark.parametrize("seed", [0, 42])
def test_smote_equals_imbalanced_learn(tmp_path, targets, seed):
    images, labels = _data()
    classes = ("0", "1", "2")
    n_new = resolve_targets(targets, classes, np.bincount(labels))
    new, provenance = _smote(tmp_path, images, labels, n_new, k=5, seed=seed)

    strategy = "not majority" if targets == "majority" else {int(c): n for c, n in targets.items()}
    x_ref, y_ref = SMOTE(sampling_strategy=strategy, k_neighbors=5, random_state=seed).fit_resample(
        images.reshape(len(images), -1).astype(np.float64), labels
    )
    assert (y_ref[len(labels) :] == provenance["label"].to_numpy()).all()
    reference = np.rint(x_ref[len(labels) :]).astype(np.uint8).reshape(-1, *SHAPE)
    assert new.shape == reference.shape and (new == reference).all()


def test_smote_samples_lie_between_a_sample_and_one_of_its_neighbours(tmp_path):
    images, labels = _data(counts=(50, 12, 8), seed=1)
    new, provenance = _smote(tmp_path, images, labels, {1: 30, 2: 42}, k=3)
    assert provenance.groupby("label").size().to_dict() == {1: 30, 2: 42}
    flat = images.reshape(len(images), -1).astype(np.float64)
    for c in (1, 2):
        members = np.flatnonzero(labels == c)
        nn = NearestNeighbors(n_neighbors=4).fit(flat[members])
        neighbours = members[nn.kneighbors(flat[members], return_distance=False)[:, 1:]]
        for row in np.flatnonzero(provenance["label"].to_numpy() == c):
            p, q, step = (
                int(provenance["parent"][row]),
                int(provenance["neighbour"][row]),
                provenance["step"][row],
            )
            assert labels[p] == labels[q] == c and 0 <= step < 1
            assert q in neighbours[members == p][0]  # one of the parent's 3 nearest same-class samples
            expected = flat[p] + step * (flat[q] - flat[p])
            assert np.abs(new[row].reshape(-1) - expected).max() <= 0.5  # on the segment, rounded


def test_smote_needs_more_samples_than_neighbours(tmp_path):
    images, labels = _data(counts=(20, 4))
    with pytest.raises(DataError, match="class 1 has 4 training images.*k_neighbors=5"):
        _smote(tmp_path, images, labels, {1: 10}, k=5)


def test_smote_errors_name_the_class(tmp_path, prepared):
    with pytest.raises(DataError, match="class 'z' has 7 training images.*k_neighbors=10"):
        balance_training_split(
            section("balance", method="smote", k_neighbors=10), section("augment"), 0, prepared, tmp_path / "b"
        )
    assert not (tmp_path / "b").exists()


def test_targets_are_validated_against_the_classes():
    counts = np.array([10, 4])
    assert resolve_targets("majority", ("a", "b"), counts) == {0: 0, 1: 6}
    assert resolve_targets({"b": 7}, ("a", "b"), counts) == {0: 0, 1: 3}
    with pytest.raises(DataError, match=r"unknown class\(es\) \['c'\].*\['a', 'b'\]"):
        resolve_targets({"c": 3}, ("a", "b"), counts)
    with pytest.raises(DataError, match="a: 5 < 10"):
        resolve_targets({"a": 5}, ("a", "b"), counts)


# ------------------------------------------------------------------------------- the stage
@pytest.fixture
def prepared(tmp_path):
    images, labels = _data(counts=(30, 12, 7), seed=2)
    root = tmp_path / "prepared"
    (root / "train").mkdir(parents=True)
    np.save(root / "train" / IMAGES, images)
    np.save(root / "train" / LABELS, labels)
    pd.DataFrame(
        {
            "image_id": [f"i{i}" for i in range(len(labels))],
            "label": labels,
            "group": [f"g{i // 2}" for i in range(len(labels))],
        }
    ).to_csv(root / "train" / INDEX, index=False)
    write_json(
        root / MANIFEST, {"classes": ["x", "y", "z"], "dataset": "t", "layout": "t", "image_size": SHAPE[0]}
    )
    return root


def test_none_passes_the_split_through_unchanged(tmp_path, prepared):
    manifest = balance_training_split(section("balance"), section("augment"), 0, prepared, tmp_path / "balanced")
    for name in (IMAGES, LABELS, INDEX):
        assert file_md5(tmp_path / "balanced/train" / name) == file_md5(prepared / "train" / name)
    assert manifest["counts_before"] == manifest["counts_after"] == {"x": 30, "y": 12, "z": 7}
    assert read_json(tmp_path / "balanced" / MANIFEST)["classes"] == ["x", "y", "z"]
    assert manifest["prepared"] == {"dataset": "t", "layout": "t", "image_size": SHAPE[0]}


@pytest.mark.parametrize("method", ["smote", "augment"])
def test_oversampling_raises_every_class_to_the_majority(tmp_path, prepared, method):
    cfg = section("balance", method=method, k_neighbors=3)
    manifest = balance_training_split(cfg, section("augment"), 0, prepared, tmp_path / "a")
    split = load_split(tmp_path / "a", "train")
    assert split.class_counts() == manifest["counts_after"] == {"x": 30, "y": 30, "z": 30}
    assert (split.images[:49] == np.load(prepared / "train" / IMAGES)).all()  # the real images come first
    index = pd.read_csv(tmp_path / "a/train/index.csv")
    assert index["origin"].value_counts().to_dict() == {"real": 49, method: 41}
    added = index[index["origin"] == method]
    assert added["source"].str.startswith(f"{method}:i").all()
    balance_training_split(cfg, section("augment"), 0, prepared, tmp_path / "b")
    assert file_md5(tmp_path / "a/train" / IMAGES) == file_md5(tmp_path / "b/train" / IMAGES)  # deterministic


def test_augmented_copies_are_transformed_real_images_of_their_class(tmp_path, prepared):
    flips = section("augment", rotation=0, brightness=0, contrast=0, sharpness=0, blur_kernel=0)
    balance_training_split(
        section("balance", method="augment", targets={"z": 20}), flips, 0, prepared, tmp_path / "out"
    )
    split = load_split(tmp_path / "out", "train")
    index = pd.read_csv(tmp_path / "out/train/index.csv")
    real = np.load(prepared / "train" / IMAGES)
    added = np.flatnonzero(index["origin"] == "augment")
    assert len(added) == 20 - 7
    for row in added:
        parent = int(index["source"][row].split(":i")[1])
        assert split.labels[row] == split.labels[parent] == 2
        candidates = [real[parent], real[parent][:, ::-1], real[parent][::-1], real[parent][::-1, ::-1]]
        assert any((split.images[row] == c).all() for c in candidates)


@pytest.mark.slow
def test_smote_memory_stays_bounded_at_ham10000_scale(tmp_path):
    """The full HAM10000 shape (10,015 x 224 x 224 x 3, every class to 6,705) under 2 GB peak RSS."""
    bench = str(ROOT / "benchmarks" / "data_pipeline.py")
    out = subprocess.run(
        [sys.executable, bench, "--only-smote", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    import json

    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["smote_rows_written"] == 6705 * 7
    assert result["smote_peak_rss_gb"] <= 2.0
