"""The prepare stage: packs, lesion-grouped splits, quarantine, duplicates, manifest, determinism."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hdkd.data.errors import DataError
from hdkd.data.formats import HAM_CLASSES, HAM_METADATA, HAM_PARTS
from hdkd.data.packed import load_split
from hdkd.data.prepare import prepare_dataset
from hdkd.data.sources import fetch_dataset
from hdkd.infra.io import file_md5, read_json
from tests.helpers.data import dermamnist_npz, params, write_image

FILES = ["manifest.json", "quarantine.csv", "duplicates.csv"] + [
    f"{s}/{f}" for s in ("train", "val", "test") for f in ("images.npy", "labels.npy", "index.csv")
]


def _prepare(tmp_path, out="prepared", seed=0, **data):
    p = params(tmp_path, **data)
    fetch_dataset(p.data, tmp_path / "record")
    return prepare_dataset(p.data, seed, tmp_path / out, tmp_path / "record/source.json")


def test_synthetic_ham_is_packed_and_split_by_lesion(tmp_path):
    manifest = _prepare(tmp_path)
    out = tmp_path / "prepared"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(FILES)
    assert manifest["classes"] == list(HAM_CLASSES) and manifest["image_size"] == 32
    assert sum(manifest["splits"]["sizes"].values()) == 120 and manifest["quarantined"] == 0
    assert manifest["source"]["tree_digest"]  # the download stage's record is carried along
    groups = {}
    for split in ("train", "val", "test"):
        s = load_split(out, split, image_size=32)
        assert s.images.dtype == np.uint8 and s.images.shape == (len(s), 32, 32, 3)
        assert s.class_counts() == manifest["splits"]["counts"][split]
        index = pd.read_csv(out / split / "index.csv")
        assert (index["class"] == [HAM_CLASSES[i] for i in s.labels]).all()
        groups[split] = set(index["group"])
        assert all(c > 0 for c in s.class_counts().values()) or split != "train"
    assert not (
        groups["train"] & groups["val"] or groups["train"] & groups["test"] or groups["val"] & groups["test"]
    )


def test_packed_pixels_are_the_decoded_files(tmp_path):
    _prepare(tmp_path)
    split = load_split(tmp_path / "prepared", "val")
    source = pd.read_csv(tmp_path / "prepared/val/index.csv")["source"].iloc[0]
    with Image.open(source) as img:
        expected = np.asarray(img.convert("RGB").resize((32, 32), Image.BILINEAR))
    assert (split.images[0] == expected).all()


def test_same_seed_same_packs_other_seed_other_split(tmp_path):
    _prepare(tmp_path, out="a", seed=3)
    _prepare(tmp_path, out="b", seed=3)
    _prepare(tmp_path, out="c", seed=4)
    for f in FILES:
        assert file_md5(tmp_path / "a" / f) == file_md5(tmp_path / "b" / f), f
    assert file_md5(tmp_path / "a/test/index.csv") != file_md5(tmp_path / "c/test/index.csv")


def test_corrupt_file_is_quarantined_not_fatal(tmp_path):
    p = params(tmp_path)
    fetch_dataset(p.data, tmp_path / "record")
    victim = sorted((tmp_path / "raw/synthetic_ham10000" / HAM_PARTS[0]).glob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated JPEG
    manifest = prepare_dataset(p.data, 0, tmp_path / "prepared")
    quarantine = pd.read_csv(tmp_path / "prepared/quarantine.csv")
    assert quarantine["image_id"].tolist() == [victim.stem] and quarantine["path"].tolist() == [str(victim)]
    assert "truncated" in quarantine["reason"][0] or "OSError" in quarantine["reason"][0]
    assert manifest["quarantined"] == 1 and sum(manifest["splits"]["sizes"].values()) == 119
    for split in ("train", "val", "test"):
        assert victim.stem not in set(pd.read_csv(tmp_path / "prepared" / split / "index.csv")["image_id"])


def _odd_images(directory):
    """One valid image per awkward mode, all of the same flat colour."""
    colour = (180, 90, 45)
    base = Image.new("RGB", (20, 14), colour)
    base.convert("CMYK").save(directory / "cmyk.jpg", quality=98)
    base.convert("P", palette=Image.Palette.ADAPTIVE).save(directory / "palette.png")
    base.convert("RGBA").save(directory / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    base.save(directory / "rotated.jpg", exif=exif, quality=98)
    gray = base.convert("L")
    gray.save(directory / "gray.png")
    Image.fromarray(np.asarray(gray, np.uint16) * 257).save(directory / "wide.png")
    return colour, int(np.asarray(gray)[0, 0])


def test_odd_but_valid_images_are_converted_not_quarantined(tmp_path):
    tree = tmp_path / "tree"
    for split in ("train", "test"):
        for c in ("a", "b"):
            for i in range(4):
                write_image(tree / split / c / f"{i}.png", (30 * i, 50, 100))
    odd = tree / "train/a/odd"
    odd.mkdir()
    colour, gray = _odd_images(odd)
    manifest = _prepare(tmp_path, dataset="imagefolder", root=str(tree), image_size=16)
    assert manifest["quarantined"] == 0
    prepared = tmp_path / "prepared"
    checked = []
    for split in ("train", "val"):
        index = pd.read_csv(prepared / split / "index.csv")
        images = load_split(prepared, split).images
        for row, image_id in enumerate(index["image_id"]):
            if "/odd/" in image_id:
                expected = (gray,) * 3 if ("gray" in image_id or "wide" in image_id) else colour
                assert np.abs(images[row].astype(int) - expected).max() <= 6, image_id
                checked.append(image_id)
    assert len(checked) == len(list(odd.iterdir())) == 6  # every odd image was packed and compared


def test_duplicates_across_splits_are_reported(tmp_path):
    manifest = _prepare(tmp_path, synthetic={"layout": "brain_tumor_mri"})
    dup = pd.read_csv(tmp_path / "prepared/duplicates.csv")
    assert manifest["duplicates"]["cross_split_groups"] >= 1
    assert manifest["duplicates"]["images"] == len(dup) and len(dup) >= 2
    cross = dup[dup["cross_split"]]
    assert set(cross["split"]) >= {"test"} and cross.groupby("sha256")["split"].nunique().min() == 2
    # reported, not dropped: every duplicate is still in its split
    for split, ids in cross.groupby("split")["image_id"]:
        assert set(ids) <= set(pd.read_csv(tmp_path / "prepared" / split / "index.csv")["image_id"])


def test_class_with_only_unreadable_training_images_is_an_error(tmp_path):
    tree = tmp_path / "tree"
    for split in ("train", "test"):
        for c in ("a", "b"):
            for i in range(3):
                write_image(tree / split / c / f"{i}.png")
    for f in (tree / "train/b").iterdir():
        f.write_bytes(b"broken")
    with pytest.raises(
        DataError, match=r"the train split has no images of class\(es\) \['b'\].*3 of their images were unreadable"
    ):
        _prepare(tmp_path, dataset="imagefolder", root=str(tree), image_size=16)
    assert not (tmp_path / "prepared").exists()  # nothing half-written


def test_dermamnist_keeps_its_own_splits(tmp_path):
    (tmp_path / "raw/dermamnist").mkdir(parents=True)
    (tmp_path / "raw/dermamnist/dermamnist.npz").write_bytes(dermamnist_npz())
    p = params(tmp_path, dataset="dermamnist", dermamnist_size=28, image_size=16)
    manifest = prepare_dataset(p.data, 0, tmp_path / "prepared")
    assert manifest["splits"]["sizes"] == {"train": 21, "val": 7, "test": 14}
    assert read_json(tmp_path / "prepared/manifest.json")["classes"] == list(HAM_CLASSES)


def test_a_record_of_another_dataset_is_refused(tmp_path):
    p = params(tmp_path)
    fetch_dataset(p.data, tmp_path / "record")
    other = params(tmp_path, synthetic={"layout": "brain_tumor_mri"}).data
    with pytest.raises(DataError, match="run the download stage first"):
        prepare_dataset(other, 0, tmp_path / "prepared", tmp_path / "record/source.json")


def test_a_killed_prepare_leaves_nothing_the_next_run_keeps(tmp_path):
    stale = tmp_path / ".prepared.0badc0de.tmp"  # a run killed while decoding (GBs at paper scale)
    (stale / "train").mkdir(parents=True)
    (stale / ".decoded.npy").write_bytes(b"\0" * 1000)
    (tmp_path / ".prepared.0badc0de.old/prepared").mkdir(parents=True)  # killed while swapping
    (tmp_path / ".balanced.12345678.tmp").mkdir()  # another stage's: not prepare's to remove
    _prepare(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".balanced.12345678.tmp"]


def _edit_metadata(tmp_path, edit):
    p = params(tmp_path)
    fetch_dataset(p.data, tmp_path / "record")
    path = tmp_path / "raw/synthetic_ham10000" / HAM_METADATA
    meta = pd.read_csv(path, dtype=str, keep_default_na=False)
    edit(meta)
    meta.to_csv(path, index=False)
    return p


def test_a_class_missing_from_an_official_split_is_an_error(tmp_path):
    tree = tmp_path / "tree"
    for split, classes in (("train", "ab"), ("test", "a")):
        for c in classes:
            for i in range(3):
                write_image(tree / split / c / f"{i}.png")
    with pytest.raises(DataError, match=r"the test split has no images of class\(es\) \['b'\]\. .*"
                                        r"the source's own test split lacks them"):
        _prepare(tmp_path, dataset="imagefolder", root=str(tree), image_size=16)


def test_empty_validation_and_test_splits_are_an_error(tmp_path):
    # Blank lesion ids make one group of every image: nothing can be carved out for val and test,
    # and training would then pick its "best" epoch on an empty set.
    p = _edit_metadata(tmp_path, lambda meta: meta.__setitem__("lesion_id", ""))
    with pytest.raises(DataError) as e:
        prepare_dataset(p.data, 0, tmp_path / "prepared", tmp_path / "record/source.json")
    message = str(e.value)
    assert "the val split is empty" in message and "the test split is empty" in message
    assert f"class(es) {list(HAM_CLASSES)} have their images in fewer than 3 groups" in message
    assert "blank ids form one group" in message
    assert not (tmp_path / "prepared").exists()


def test_a_class_missing_from_val_and_test_is_an_error(tmp_path):
    def one_lesion_of_df(meta):
        meta.loc[meta["dx"] == "df", "lesion_id"] = "HAM_0000001"

    p = _edit_metadata(tmp_path, one_lesion_of_df)
    with pytest.raises(DataError, match=r"the val split has no images of class\(es\) \['df'\].*"
                                        r"the test split has no images of class\(es\) \['df'\].*"
                                        r"class\(es\) \['df'\] have their images in fewer than 3 groups"):
        prepare_dataset(p.data, 0, tmp_path / "prepared", tmp_path / "record/source.json")
