"""Each source's format, fetched from a local HTTP server where a download is involved."""

from __future__ import annotations

import io
import shutil
import sys
import types

import numpy as np
import pandas as pd
import pytest

from hdkd.data.errors import ChecksumError, DataError
from hdkd.data.formats import BRAIN_CLASSES, HAM_CLASSES, HAM_METADATA, HAM_PARTS, count_class_tree
from hdkd.data.sources import (
    SOURCE_RECORD,
    BrainTumorMri,
    DermaMnist,
    Ham10000,
    RemoteFile,
    fetch_dataset,
    get_source,
)
from hdkd.data.synthetic import generate
from hdkd.infra.io import read_json
from tests.helpers.data import dermamnist_npz, md5, params, serve, write_image, zip_tree
from tests.helpers.params import section


# ---------------------------------------------------------------------------------- HAM10000
@pytest.fixture(scope="module")
def ham_files(tmp_path_factory) -> dict[str, bytes]:
    """A tiny HAM10000 as Dataverse serves it: two zips of ISIC_*.jpg files and the metadata csv."""
    tree = generate(section("data.synthetic", num_images=60, native_size=24), tmp_path_factory.mktemp("ham") / "tree")
    files = {f"{part}.zip": zip_tree(tree / part) for part in HAM_PARTS}
    files[HAM_METADATA] = (tree / HAM_METADATA).read_bytes()
    return files


def _ham_source(server, files) -> Ham10000:
    return Ham10000(
        tuple(RemoteFile(name, server.url(name), md5(data), len(data)) for name, data in files.items())
    )


def test_ham10000_download_extract_and_catalog(tmp_path, ham_files):
    cfg = params(tmp_path, dataset="ham10000").data
    with serve(ham_files) as server:
        source = _ham_source(server, ham_files)
        record = source.fetch(cfg)
        again = source.fetch(cfg)  # verified files are neither downloaded nor extracted again
    assert record == again and set(record["files"]) == set(ham_files)
    assert len(server.requests) == 3
    catalog = source.catalog(cfg)
    meta = pd.read_csv(io.BytesIO(ham_files[HAM_METADATA]))
    assert catalog.classes == HAM_CLASSES and len(catalog.items) == len(meta) == 60
    assert (catalog.items["group"].to_numpy() == meta["lesion_id"].to_numpy()).all()
    assert [HAM_CLASSES[i] for i in catalog.items["label"]] == meta["dx"].tolist()
    assert (catalog.items["split"] == "").all()  # no official split: carved by lesion later


def test_ham10000_wrong_checksum_is_refused(tmp_path, ham_files):
    cfg = params(tmp_path, dataset="ham10000").data
    with serve(ham_files) as server:
        files = list(_ham_source(server, ham_files).files)
        files[0] = RemoteFile(files[0].name, files[0].url, "f" * 32, files[0].size)
        with pytest.raises(ChecksumError, match=files[0].name):
            Ham10000(tuple(files)).fetch(cfg)
    assert not (tmp_path / "raw/ham10000" / files[0].name).exists()


def test_data_urls_override_the_default_urls(tmp_path, ham_files):
    with serve(ham_files) as server:
        cfg = params(tmp_path, dataset="ham10000", urls={n: server.url(n) for n in ham_files}).data
        files = tuple(
            RemoteFile(n, "http://unreachable.invalid/x", md5(d), len(d)) for n, d in ham_files.items()
        )
        Ham10000(files).fetch(cfg)
    assert sorted(path for path, _ in server.requests) == sorted(ham_files)


def test_unknown_url_override_names_the_key(tmp_path):
    cfg = params(tmp_path, urls={"HAM10000_images_part_3.zip": "http://x"}).data
    with pytest.raises(DataError, match="HAM10000_images_part_3.zip"):
        get_source("synthetic").fetch(cfg)


@pytest.fixture
def ham_tree(tmp_path):
    return generate(section("data.synthetic", num_images=60, native_size=24), tmp_path / "raw" / "synthetic_ham10000")


def test_ham10000_missing_image_is_named(tmp_path, ham_tree):
    victim = sorted((ham_tree / HAM_PARTS[1]).glob("*.jpg"))[3]
    victim.unlink()
    with pytest.raises(DataError, match=f"1 image.*missing.*{victim.stem}"):
        get_source("synthetic").catalog(params(tmp_path).data)


def test_ham10000_unknown_label_is_named(tmp_path, ham_tree):
    meta = pd.read_csv(ham_tree / HAM_METADATA)
    meta.loc[5, "dx"] = "melanoma"
    meta.to_csv(ham_tree / HAM_METADATA, index=False)
    with pytest.raises(DataError, match=f"unknown label.*'melanoma'.*{meta.loc[5, 'image_id']}"):
        get_source("synthetic").catalog(params(tmp_path).data)


def test_ham10000_empty_class_is_named(tmp_path, ham_tree):
    meta = pd.read_csv(ham_tree / HAM_METADATA)
    meta[meta.dx != "df"].to_csv(ham_tree / HAM_METADATA, index=False)
    with pytest.raises(DataError, match=r"class\(es\) \['df'\] have no images"):
        get_source("synthetic").catalog(params(tmp_path).data)


# --------------------------------------------------------------------------- Brain Tumor MRI
@pytest.fixture(scope="module")
def brain_tree(tmp_path_factory):
    return generate(
        section("data.synthetic", layout="brain_tumor_mri", num_images=60, native_size=24),
        tmp_path_factory.mktemp("mri") / "t",
    )


@pytest.fixture
def no_kaggle(monkeypatch):
    monkeypatch.setitem(sys.modules, "kagglehub", None)  # import fails
    monkeypatch.setitem(sys.modules, "kaggle", None)


def test_brain_mri_from_the_mirror_verified_by_counts(tmp_path, brain_tree, no_kaggle):
    archive = zip_tree(brain_tree, prefix="Brain Tumor MRI/")  # nested one level, as mirrors do
    counts = count_class_tree(brain_tree, {"train": "Training", "test": "Testing"})
    cfg = params(tmp_path, dataset="brain_tumor_mri").data
    with serve({"mri.zip": archive}) as server:
        source = BrainTumorMri(
            mirror=RemoteFile("brain-tumor-mri-dataset.zip", server.url("mri.zip")), expected_counts=counts
        )
        record = source.fetch(cfg)
        source.fetch(cfg)  # already there and verified: no second download
    assert record["counts"] == counts and len(server.requests) == 1
    catalog = source.catalog(cfg)
    assert catalog.classes == BRAIN_CLASSES
    assert set(catalog.items["split"]) == {"train", "test"}
    assert (catalog.items["split"] == "test").sum() == sum(counts["Testing"].values())


def test_brain_mri_wrong_counts_are_an_error(tmp_path, brain_tree, no_kaggle):
    counts = count_class_tree(brain_tree, {"train": "Training", "test": "Testing"})
    counts["Testing"]["glioma"] += 1
    cfg = params(tmp_path, dataset="brain_tumor_mri").data
    with serve({"mri.zip": zip_tree(brain_tree)}) as server:
        source = BrainTumorMri(
            mirror=RemoteFile("brain-tumor-mri-dataset.zip", server.url("mri.zip")), expected_counts=counts
        )
        with pytest.raises(DataError, match=r"Testing/glioma: \d+ \(expected \d+\)"):
            source.fetch(cfg)


def test_brain_mri_prefers_kagglehub(tmp_path, brain_tree, monkeypatch):
    calls = []

    def dataset_download(handle):
        calls.append(handle)
        return str(brain_tree)

    monkeypatch.setitem(sys.modules, "kagglehub", types.SimpleNamespace(dataset_download=dataset_download))
    counts = count_class_tree(brain_tree, {"train": "Training", "test": "Testing"})
    source = BrainTumorMri(
        mirror=RemoteFile("brain-tumor-mri-dataset.zip", "http://unused.invalid/"), expected_counts=counts
    )
    source.fetch(params(tmp_path, dataset="brain_tumor_mri").data)
    assert calls == ["masoudnickparvar/brain-tumor-mri-dataset"]


def test_brain_mri_falls_back_to_the_mirror_when_kaggle_fails(tmp_path, brain_tree, monkeypatch):
    def dataset_download(handle):
        raise ConnectionError("kaggle.com unreachable")

    monkeypatch.setitem(sys.modules, "kagglehub", types.SimpleNamespace(dataset_download=dataset_download))
    counts = count_class_tree(brain_tree, {"train": "Training", "test": "Testing"})
    with serve({"mri.zip": zip_tree(brain_tree)}) as server:
        source = BrainTumorMri(
            mirror=RemoteFile("brain-tumor-mri-dataset.zip", server.url("mri.zip")), expected_counts=counts
        )
        source.fetch(params(tmp_path, dataset="brain_tumor_mri").data)
    assert [p for p, _ in server.requests] == ["mri.zip"]
    assert not list((tmp_path / "raw/brain_tumor_mri").glob(".*tmp"))  # the failed attempt left nothing


# -------------------------------------------------------------------------------- DermaMNIST
def _dermamnist_cfg(tmp_path, server):
    url = server.url("dermamnist.npz")
    return params(tmp_path, dataset="dermamnist", dermamnist_size=28, urls={"dermamnist.npz": url}).data


def test_dermamnist_download_and_official_splits(tmp_path):
    data = dermamnist_npz()
    with serve({"dermamnist.npz": data}) as server:
        cfg = _dermamnist_cfg(tmp_path, server)
        source = DermaMnist(md5={28: md5(data)})
        source.fetch(cfg)
    catalog = source.catalog(cfg)
    assert catalog.classes == HAM_CLASSES
    assert catalog.items.groupby("split").size().to_dict() == {"train": 21, "val": 7, "test": 14}
    with np.load(io.BytesIO(data)) as npz:
        ref = catalog.items["ref"].iloc[25]  # val image 4
        assert (np.asarray(catalog.open_image(ref)) == npz["val_images"][4]).all()


def test_dermamnist_wrong_md5_and_unknown_labels(tmp_path):
    data = dermamnist_npz(labels_shift=3)  # labels up to 9
    with serve({"dermamnist.npz": data}) as server:
        cfg = _dermamnist_cfg(tmp_path, server)
        with pytest.raises(ChecksumError):
            DermaMnist().fetch(cfg)  # the real file's MD5
        source = DermaMnist(md5={28: md5(data)})
        source.fetch(cfg)
    with pytest.raises(DataError, match=r"unknown label\(s\) \[7, 8, 9\]"):
        source.catalog(cfg)


# ------------------------------------------------------------------------------- imagefolder
def _folder(root):
    for split, n in (("train", 3), ("test", 2)):
        for c, colour in (("benign", (200, 40, 40)), ("malignant", (40, 40, 200))):
            for i in range(n):
                write_image(root / split / c / f"{c}{i}.png", colour)
    return root


def test_imagefolder_is_read_in_place_and_fingerprinted(tmp_path):
    tree = _folder(tmp_path / "tree")
    cfg = params(tmp_path, dataset="imagefolder", root=str(tree)).data
    record = fetch_dataset(cfg, tmp_path / "record")
    assert read_json(tmp_path / "record" / SOURCE_RECORD) == record
    assert record["classes"] == ["benign", "malignant"] and record["images"] == 10
    catalog = get_source("imagefolder").catalog(cfg)
    assert (catalog.items["split"] == "test").sum() == 4
    write_image(tree / "train/benign/benign0.png", (10, 10, 10))  # same name, new content
    assert fetch_dataset(cfg, tmp_path / "record")["tree_digest"] != record["tree_digest"]


def test_imagefolder_unknown_label_in_test(tmp_path):
    tree = _folder(tmp_path / "tree")
    write_image(tree / "test/cyst/c0.png")
    with pytest.raises(DataError, match=r"unknown label 'cyst'.*benign.*malignant"):
        get_source("imagefolder").catalog(params(tmp_path, dataset="imagefolder", root=str(tree)).data)


def test_imagefolder_empty_class(tmp_path):
    tree = _folder(tmp_path / "tree")
    (tree / "train/cyst").mkdir()
    with pytest.raises(DataError, match=r"class\(es\) \['cyst'\] have no images"):
        get_source("imagefolder").catalog(params(tmp_path, dataset="imagefolder", root=str(tree)).data)


def test_imagefolder_missing_test_folder(tmp_path):
    tree = _folder(tmp_path / "tree")
    shutil.rmtree(tree / "test")
    with pytest.raises(DataError, match="test not found"):
        get_source("imagefolder").catalog(params(tmp_path, dataset="imagefolder", root=str(tree)).data)


@pytest.mark.parametrize("generated_before", [False, True])
def test_download_removes_the_temporaries_of_a_killed_run(tmp_path, generated_before):
    cfg = params(tmp_path).data
    if generated_before:  # the data is complete: the stage takes its fast path
        fetch_dataset(cfg, tmp_path / "raw")
    leftovers = [
        tmp_path / "raw/.synthetic_ham10000.9f8e7d6c.tmp/HAM10000_images_part_1",  # killed generating
        tmp_path / "raw/.synthetic_brain_tumor_mri.01234567.tmp",  # another layout, generation killed
        tmp_path / "raw/.source.json.a_b3c4de.tmp",  # killed writing the record
    ]
    for p in leftovers:
        p.mkdir(parents=True) if "images" in p.name or "mri" in p.name else p.write_text("{")
    (tmp_path / "raw/ham10000").mkdir()
    (tmp_path / "raw/ham10000/HAM10000_images_part_1.zip.part").write_bytes(b"resume me")
    fetch_dataset(cfg, tmp_path / "raw")
    hidden = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "raw").rglob(".*"))
    assert hidden == ["raw/synthetic_ham10000/.synthetic.json"]
    assert (tmp_path / "raw/ham10000/HAM10000_images_part_1.zip.part").is_file()  # partial downloads resume


def test_brain_mri_mirror_is_verified_before_extraction(tmp_path, brain_tree, no_kaggle, caplog):
    archive = zip_tree(brain_tree)
    counts = count_class_tree(brain_tree, {"train": "Training", "test": "Testing"})
    cfg = params(tmp_path, dataset="brain_tumor_mri").data
    name = "brain-tumor-mri-dataset.zip"
    with serve({"mri.zip": archive}) as server:
        pinned_wrong = RemoteFile(name, server.url("mri.zip"), "0" * 32, len(archive))
        with pytest.raises(ChecksumError, match=name):
            BrainTumorMri(mirror=pinned_wrong, expected_counts=counts).fetch(cfg)
        assert not (tmp_path / "raw/brain_tumor_mri/dataset").exists()  # nothing extracted
        unpinned = RemoteFile(name, server.url("mri.zip"))
        BrainTumorMri(mirror=unpinned, expected_counts=counts).fetch(cfg)
    assert f"{name}: no MD5 and size pinned" in caplog.text
