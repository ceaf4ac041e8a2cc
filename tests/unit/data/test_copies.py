"""Bring your own copy: HAM10000 and Brain Tumor MRI in each distributed layout, zipped or extracted, read in
place (nothing downloaded, nothing written there), verified, and split exactly as the downloaded dataset is.

The trees are generated (the real file names and metadata columns) and laid out as the Harvard Dataverse and
Kaggle distribute them; the expected MD5s and counts are those of the generated release, injected into the
sources, so the real verification code runs on small data.
"""

from __future__ import annotations

import csv
import hashlib
import io
import shutil
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hdkd.data import sources
from hdkd.data.copies import HamRelease
from hdkd.data.errors import DataError
from hdkd.data.formats import BRAIN_SPLIT_DIRS, HAM_METADATA, HAM_PARTS, count_class_tree
from hdkd.data.prepare import prepare_dataset
from hdkd.data.sources import (
    HAM10000_FILES,
    HAM_RELEASE,
    SOURCE_RECORD,
    BrainTumorMri,
    Ham10000,
    RemoteFile,
    fetch_dataset,
)
from hdkd.data.synthetic import generate
from tests.helpers.data import md5, params, refused_url, serve, zip_tree
from tests.helpers.params import section

SPLITS = ("train", "val", "test")


# ------------------------------------------------------------------------------------ helpers
def _write_zip(path: Path, files: dict[str, Path | bytes]) -> Path:
    """A zip at ``path`` with members ``name -> file or bytes`` (deflated, as the releases are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data if isinstance(data, bytes) else data.read_bytes())
    return path


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _prepare(tmp_path: Path, name: str, **data) -> tuple[dict, dict]:
    """fetch_dataset then prepare_dataset, as the download and prepare stages run them: (record, splits)."""
    cfg = params(tmp_path, **data).data
    record = fetch_dataset(cfg, tmp_path / name / "raw")
    prepare_dataset(cfg, 0, tmp_path / name / "prepared", tmp_path / name / "raw" / SOURCE_RECORD)
    out = tmp_path / name / "prepared"
    splits = {
        s: (
            pd.read_csv(out / s / "index.csv")[["image_id", "label", "class", "group"]],
            np.load(out / s / "images.npy"),
        )
        for s in SPLITS
    }
    return record, splits


def _assert_same_splits(got: dict, expected: dict) -> None:
    for s in SPLITS:
        pd.testing.assert_frame_equal(got[s][0], expected[s][0], obj=f"{s}/index.csv")
        assert (got[s][1] == expected[s][1]).all(), f"{s}/images.npy"


def _digest(images: dict[str, bytes]) -> str:
    """The layout-free digest of the images, computed here independently (id, size, CRC-32)."""
    lines = "".join(f"{i}\t{len(b)}\t{zlib.crc32(b):08x}\n" for i, b in sorted(images.items()))
    return hashlib.md5(lines.encode()).hexdigest()


# ---------------------------------------------------------------------------------- HAM10000
@pytest.fixture(scope="module")
def ham(tmp_path_factory) -> Path:
    """A small HAM10000 release: HAM10000_images_part_{1,2}/ISIC_*.jpg and HAM10000_metadata.csv."""
    return generate(section("data.synthetic", num_images=120, native_size=24), tmp_path_factory.mktemp("ham") / "t")


def _tab(csv_bytes: bytes) -> bytes:
    """The metadata as the Dataverse's .tab export: tab-separated, strings quoted, CRLF line ends."""
    meta = pd.read_csv(io.BytesIO(csv_bytes), dtype=str, keep_default_na=False)
    out = io.StringIO()
    out.write("\t".join(meta.columns) + "\r\n")
    meta.to_csv(out, sep="\t", header=False, index=False, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
    return out.getvalue().encode()


def _images(ham: Path) -> dict[str, Path]:
    return {p.stem: p for part in HAM_PARTS for p in sorted((ham / part).glob("*.jpg"))}


def dataverse_zips(ham: Path, root: Path) -> None:
    """As downloaded from the Dataverse: the two part zips (images at the zip's top) and the csv."""
    for part in HAM_PARTS:
        (root / f"{part}.zip").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{part}.zip").write_bytes(zip_tree(ham / part))
    shutil.copyfile(ham / HAM_METADATA, root / HAM_METADATA)


def dataverse_unzipped_tab(ham: Path, root: Path) -> None:
    """The Dataverse zips unzipped in place (the images beside the metadata), and the .tab export."""
    root.mkdir(parents=True)
    for p in _images(ham).values():
        shutil.copyfile(p, root / p.name)
    (root / "HAM10000_metadata.tab").write_bytes(_tab((ham / HAM_METADATA).read_bytes()))


def dataverse_extracted(ham: Path, root: Path) -> None:
    """The part zips extracted to folders beside them (what the download stage does itself)."""
    dataverse_zips(ham, root)
    for part in HAM_PARTS:
        shutil.copytree(ham / part, root / part)


def kaggle_folders(ham: Path, root: Path) -> None:
    """Kaggle's skin-cancer-mnist-ham10000: both part folders twice (upper and lower case), the csv,
    and the hmnist_*.csv files."""
    for part in HAM_PARTS:
        shutil.copytree(ham / part, root / part)
        shutil.copytree(ham / part, root / part.lower())
    shutil.copyfile(ham / HAM_METADATA, root / HAM_METADATA)
    (root / "hmnist_8_8_L.csv").write_text("pixel0000,label\n0,2\n")


def kaggle_zip(ham: Path, root: Path) -> None:
    """Kaggle's download as one archive holding the folders and files above."""
    kaggle_folders(ham, root.parent / f"{root.name}.staging")
    root.mkdir(parents=True)
    (root / "archive.zip").write_bytes(zip_tree(root.parent / f"{root.name}.staging"))
    shutil.rmtree(root.parent / f"{root.name}.staging")


def mixed(ham: Path, root: Path) -> None:
    """Part 1 still zipped, part 2 extracted."""
    root.mkdir(parents=True)
    (root / f"{HAM_PARTS[0]}.zip").write_bytes(zip_tree(ham / HAM_PARTS[0]))
    shutil.copytree(ham / HAM_PARTS[1], root / HAM_PARTS[1])
    shutil.copyfile(ham / HAM_METADATA, root / HAM_METADATA)


HAM_LAYOUTS = {
    "dataverse_zips": (dataverse_zips, "Harvard Dataverse zips"),
    "dataverse_unzipped_tab": (dataverse_unzipped_tab, "extracted folders"),
    "dataverse_extracted": (dataverse_extracted, "extracted folders"),
    "kaggle_folders": (kaggle_folders, "extracted folders"),
    "kaggle_zip": (kaggle_zip, "one archive"),
    "mixed": (mixed, "zips and folders"),
}


@pytest.fixture
def ham_source(ham, monkeypatch) -> Ham10000:
    """The registry's HAM10000 with the small release's metadata MD5 and rows, and unreachable URLs:
    a copy is verified by the real code, and any attempt to download fails."""
    url = refused_url()
    source = Ham10000(
        files=tuple(RemoteFile(f.name, url, f.md5, f.size) for f in HAM10000_FILES),
        release=HamRelease.of((ham / HAM_METADATA).read_bytes(), "the small release's csv"),
    )
    monkeypatch.setitem(sources.SOURCES, "ham10000", source)
    return source


@pytest.fixture(scope="module")
def ham_downloaded(ham, tmp_path_factory) -> dict:
    """The reference: the small release downloaded (local server) and prepared as the stages do."""
    tmp_path = tmp_path_factory.mktemp("download")
    files = {f"{part}.zip": zip_tree(ham / part) for part in HAM_PARTS}
    files[HAM_METADATA] = (ham / HAM_METADATA).read_bytes()
    with serve(files) as server, pytest.MonkeyPatch.context() as mp:
        mp.setitem(
            sources.SOURCES,
            "ham10000",
            Ham10000(tuple(RemoteFile(n, server.url(n), md5(d), len(d)) for n, d in files.items())),
        )
        record, splits = _prepare(tmp_path, "download", dataset="ham10000")
    assert "files" in record  # the download path, not a copy
    return splits


@pytest.mark.parametrize("layout", sorted(HAM_LAYOUTS))
def test_ham10000_copy_in_each_layout_gives_the_downloads_split(tmp_path, ham, ham_source, ham_downloaded, layout):
    make, label = HAM_LAYOUTS[layout]
    copy = tmp_path / "copy"
    make(ham, copy)
    before = _snapshot(copy)

    record, splits = _prepare(tmp_path, "run", dataset="ham10000", root=str(copy))

    _assert_same_splits(splits, ham_downloaded)  # same images, labels, lesion groups, pixels, split
    assert record["directory"] == str(copy) and record["copy"]["layout"] == label
    assert record["images"] == 120
    assert record["images_digest"] == _digest({i: p.read_bytes() for i, p in _images(ham).items()})
    assert record["verified_by"].startswith("its image ids" if layout.endswith("tab") else "MD5")
    assert _snapshot(copy) == before  # read in place: nothing written, extracted or stamped there
    assert sorted(p.name for p in (tmp_path / "run/raw").iterdir()) == [SOURCE_RECORD]


def test_kaggle_lower_case_duplicate_folders_are_not_needed_twice(tmp_path, ham, ham_source):
    """An image missing from one of Kaggle's two copies of a part is taken from the other."""
    kaggle_folders(ham, tmp_path / "copy")
    victim = sorted((tmp_path / "copy" / HAM_PARTS[1]).glob("*.jpg"))[0]
    victim.unlink()
    record = fetch_dataset(params(tmp_path, dataset="ham10000", root=str(tmp_path / "copy")).data, tmp_path / "raw")
    assert record["copy"]["images_from"] == {
        f"{HAM_PARTS[0]}/": len(list((ham / HAM_PARTS[0]).glob("*.jpg"))),
        f"{HAM_PARTS[1]}/": len(list((ham / HAM_PARTS[1]).glob("*.jpg"))) - 1,
        f"{HAM_PARTS[1].lower()}/": 1,
    }


@pytest.mark.parametrize("layout", ["dataverse_zips", "folders"])
def test_ham10000_copy_missing_an_image_names_it(tmp_path, ham, ham_source, layout):
    copy = tmp_path / "copy"
    victim = sorted(_images(ham))[77]
    if layout == "dataverse_zips":  # part 2's zip without the image
        dataverse_zips(ham, copy)
        part = HAM_PARTS[0] if (ham / HAM_PARTS[0] / f"{victim}.jpg").exists() else HAM_PARTS[1]
        _write_zip(copy / f"{part}.zip", {p.name: p for p in sorted((ham / part).glob("*.jpg")) if p.stem != victim})
    else:
        shutil.copytree(ham, copy, ignore=shutil.ignore_patterns(f"{victim}.jpg", ".*"))
    cfg = params(tmp_path, dataset="ham10000", root=str(copy)).data
    with pytest.raises(DataError) as e:
        fetch_dataset(cfg, tmp_path / "raw")
    assert str(e.value).startswith(
        f"1 image(s) listed in {copy / HAM_METADATA} are missing from the copy in {copy}: {victim}.jpg (looked in "
    )
    assert not (tmp_path / "raw" / SOURCE_RECORD).exists()


def _edit_metadata(copy: Path, edit) -> str:
    meta = pd.read_csv(copy / HAM_METADATA, dtype=str, keep_default_na=False)
    edit(meta)
    meta.to_csv(copy / HAM_METADATA, index=False)
    return md5((copy / HAM_METADATA).read_bytes())


def test_ham10000_copy_with_edited_lesion_ids_is_refused(tmp_path, ham, ham_source):
    """One image moved to another lesion (its lesion's count unchanged elsewhere): the split would differ."""
    copy = tmp_path / "copy"
    kaggle_folders(ham, copy)

    def edit(meta):
        a, b = meta["lesion_id"].iloc[0], meta["lesion_id"].iloc[-1]
        meta.loc[0, "lesion_id"], meta.loc[len(meta) - 1, "lesion_id"] = b, a  # swap two rows' lesions

    got = _edit_metadata(copy, edit)
    expected = next(iter(ham_source.release.metadata_md5))
    with pytest.raises(DataError) as e:
        fetch_dataset(params(tmp_path, dataset="ham10000", root=str(copy)).data, tmp_path / "raw")
    assert str(e.value) == (
        f"{copy / HAM_METADATA} is not the HAM10000 release's metadata file: its MD5 is {got}, expected {expected} "
        f"(the small release's csv); nor does it list the release's image ids, lesion ids and diagnoses, as Kaggle's "
        f"copy and the Dataverse's .tab do: its numbers of rows, lesions and images per diagnosis are the release's, "
        f"so rows were edited (a lesion_id, image_id or dx changed). Restore the file from the release (the lesion ids "
        f"decide the split)"
    )


def test_ham10000_copy_with_another_metadata_file_says_what_differs(tmp_path, ham, ham_source):
    copy = tmp_path / "copy"
    dataverse_zips(ham, copy)

    def edit(meta):
        meta.loc[meta["dx"] == "bkl", "dx"] = "mel"  # relabelled

    _edit_metadata(copy, edit)
    counts = ham_source.release.counts
    with pytest.raises(DataError, match=rf"HAM10000_metadata.csv is not the HAM10000 release's metadata file: .*"
                       rf": 0 bkl images \(expected {counts['bkl']}\); {counts['mel'] + counts['bkl']} mel images "
                       rf"\(expected {counts['mel']}\)\. Restore"):
        fetch_dataset(params(tmp_path, dataset="ham10000", root=str(copy)).data, tmp_path / "raw")


def test_ham10000_copy_without_metadata_or_with_a_broken_zip(tmp_path, ham, ham_source):
    copy = tmp_path / "copy"
    dataverse_zips(ham, copy)
    cfg = params(tmp_path, dataset="ham10000", root=str(copy)).data
    (copy / HAM_METADATA).unlink()
    with pytest.raises(DataError, match=f"no HAM10000 metadata file in {copy}, the copy of HAM10000"):
        fetch_dataset(cfg, tmp_path / "raw")
    shutil.copyfile(ham / HAM_METADATA, copy / HAM_METADATA)
    zipped = copy / f"{HAM_PARTS[1]}.zip"
    zipped.write_bytes(zipped.read_bytes()[: zipped.stat().st_size // 2])  # a truncated copy
    with pytest.raises(DataError, match=f"{zipped} is not a readable zip archive"):
        fetch_dataset(cfg, tmp_path / "raw")


def test_ham10000_dataverse_download_all_archive_says_to_unzip_it(tmp_path, ham, ham_source):
    """The Dataverse's "Download all" gives one zip holding the part zips: it must be unzipped first."""
    copy = tmp_path / "copy"
    dataverse_zips(ham, tmp_path / "files")
    _write_zip(copy / "dataverse_files.zip", {p.name: p for p in sorted((tmp_path / "files").iterdir())})
    with pytest.raises(DataError, match=r"are missing from the copy .*; zips inside zips are not read: unzip "
                       rf"dataverse_files.zip first \(it holds {HAM_PARTS[0]}.zip, {HAM_PARTS[1]}.zip\)$"):
        fetch_dataset(params(tmp_path, dataset="ham10000", root=str(copy)).data, tmp_path / "raw")


def test_the_real_releases_pins_agree():
    assert HAM_RELEASE.images == sum(HAM_RELEASE.counts.values()) == 10_015
    assert list(HAM_RELEASE.metadata_md5) == [f.md5 for f in HAM10000_FILES if f.name == HAM_METADATA]


# --------------------------------------------------------------------------- Brain Tumor MRI
@pytest.fixture(scope="module")
def mri(tmp_path_factory) -> Path:
    """A small Brain Tumor MRI: Training/<class>/*.jpg and Testing/<class>/*.jpg, real file names."""
    return generate(
        section("data.synthetic", layout="brain_tumor_mri", num_images=80, native_size=24),
        tmp_path_factory.mktemp("mri") / "t",
    )


def _mri_files(mri: Path) -> dict[str, Path]:
    return {p.relative_to(mri).as_posix(): p for d in ("Training", "Testing") for p in sorted((mri / d).rglob("*.jpg"))}


def mri_folders(mri: Path, root: Path) -> None:
    """Kaggle's dataset extracted (or kagglehub's download): Training/ and Testing/ at the top."""
    for d in ("Training", "Testing"):
        shutil.copytree(mri / d, root / d)


def mri_kaggle_zip(mri: Path, root: Path) -> None:
    """Kaggle's archive.zip: Training/ and Testing/ at the zip's top."""
    _write_zip(root / "archive.zip", _mri_files(mri))


def mri_nested_zip(mri: Path, root: Path) -> None:
    """A mirror's zip, one folder deep, made on a Mac (__MACOSX/ and ._ files that are not images)."""
    files: dict[str, Path | bytes] = {f"Brain Tumor MRI/{k}": p for k, p in _mri_files(mri).items()}
    files["__MACOSX/Brain Tumor MRI/Training/glioma/._x.jpg"] = b"\0\5\26\7"
    files["Brain Tumor MRI/Testing/notumor/._y.jpg"] = b"\0\5\26\7"
    _write_zip(root / "brain-tumor-mri-dataset.zip", files)


MRI_LAYOUTS = {"folders": mri_folders, "kaggle_zip": mri_kaggle_zip, "nested_zip": mri_nested_zip}


@pytest.fixture
def counts(mri) -> dict[str, dict[str, int]]:
    return count_class_tree(mri, BRAIN_SPLIT_DIRS)


@pytest.fixture
def mri_source(counts, monkeypatch) -> BrainTumorMri:
    monkeypatch.setitem(sys.modules, "kagglehub", None)  # no Kaggle client: nothing may be downloaded
    monkeypatch.setitem(sys.modules, "kaggle", None)
    source = BrainTumorMri(mirror=RemoteFile("brain-tumor-mri-dataset.zip", refused_url()), expected_counts=counts)
    monkeypatch.setitem(sources.SOURCES, "brain_tumor_mri", source)
    return source


@pytest.fixture(scope="module")
def mri_downloaded(mri, tmp_path_factory) -> dict:
    """The reference: the small dataset downloaded from the mirror (local server) and prepared."""
    tmp_path = tmp_path_factory.mktemp("download")
    counts = count_class_tree(mri, BRAIN_SPLIT_DIRS)
    with serve({"mri.zip": zip_tree(mri, prefix="Brain Tumor MRI/")}) as server, pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "kagglehub", None)
        mp.setitem(sys.modules, "kaggle", None)
        source = BrainTumorMri(mirror=RemoteFile("mri.zip", server.url("mri.zip")), expected_counts=counts)
        mp.setitem(sources.SOURCES, "brain_tumor_mri", source)
        record, splits = _prepare(tmp_path, "download", dataset="brain_tumor_mri")
    assert "tree_digest" in record  # the download path
    return splits


@pytest.mark.parametrize("layout", sorted(MRI_LAYOUTS))
def test_brain_mri_copy_in_each_layout_gives_the_downloads_split(tmp_path, mri, mri_source, mri_downloaded, counts,
                                                                 layout):
    copy = tmp_path / "copy"
    MRI_LAYOUTS[layout](mri, copy)
    before = _snapshot(copy)
    record, splits = _prepare(tmp_path, "run", dataset="brain_tumor_mri", root=str(copy))
    _assert_same_splits(splits, mri_downloaded)
    assert record["counts"] == counts and record["directory"] == str(copy)
    assert record["copy"]["layout"] == ("extracted folders" if layout == "folders" else "zip")
    assert record["images_digest"] == _digest({k: p.read_bytes() for k, p in _mri_files(mri).items()})
    assert _snapshot(copy) == before
    assert sorted(p.name for p in (tmp_path / "run/raw").iterdir()) == [SOURCE_RECORD]


@pytest.mark.parametrize("layout", ["folders", "nested_zip"])
def test_brain_mri_copy_with_a_wrong_count_names_split_and_class(tmp_path, mri, mri_source, counts, layout):
    copy = tmp_path / "copy"
    staged = tmp_path / "staged"
    shutil.copytree(mri, staged)
    sorted((staged / "Testing/glioma").glob("*.jpg"))[0].unlink()  # one image short
    shutil.copyfile(staged / "Training/pituitary" / sorted(p.name for p in (staged / "Training/pituitary").iterdir())[0],
                    staged / "Training/pituitary/extra.jpg")  # one too many
    MRI_LAYOUTS[layout](staged, copy)
    where = copy if layout == "folders" else f"{copy / 'brain-tumor-mri-dataset.zip'}::Brain Tumor MRI/"
    with pytest.raises(DataError) as e:
        fetch_dataset(params(tmp_path, dataset="brain_tumor_mri", root=str(copy)).data, tmp_path / "raw")
    assert str(e.value) == (
        f"{where} does not hold the expected images: "
        f"Training/pituitary: {counts['Training']['pituitary'] + 1} (expected {counts['Training']['pituitary']}); "
        f"Testing/glioma: {counts['Testing']['glioma'] - 1} (expected {counts['Testing']['glioma']}). "
        f"Restore the images, or point data.root at a complete copy."
    )


def test_brain_mri_copy_with_an_unknown_class_folder(tmp_path, mri, mri_source):
    copy = tmp_path / "copy"
    mri_folders(mri, copy)
    shutil.copytree(copy / "Testing/glioma", copy / "Testing/astrocytoma")
    with pytest.raises(DataError, match=r"unexpected Testing/astrocytoma\. Restore"):
        fetch_dataset(params(tmp_path, dataset="brain_tumor_mri", root=str(copy)).data, tmp_path / "raw")
