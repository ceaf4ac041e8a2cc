"""Downloads against a local HTTP server, and archive extraction that refuses unsafe members."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile

import pytest

from hdkd.data import download
from hdkd.data.download import download_file, extract_archive, is_verified
from hdkd.data.errors import ChecksumError, DownloadError, UnsafeArchiveError
from tests.helpers.data import md5, refused_url, serve

PAYLOAD = os.urandom(300_000)


def test_download_verifies_and_renames_into_place(tmp_path):
    with serve({"data.bin": PAYLOAD}) as server:
        dest = download_file(
            server.url("data.bin"), tmp_path / "data.bin", md5=md5(PAYLOAD), size=len(PAYLOAD)
        )
    assert dest.read_bytes() == PAYLOAD
    assert sorted(p.name for p in tmp_path.iterdir()) == [".data.bin.verified", "data.bin"]  # no .part left


def test_verified_file_is_not_downloaded_again(tmp_path, monkeypatch):
    hashed = []
    monkeypatch.setattr(download, "file_md5", lambda path: hashed.append(path) or md5(path.read_bytes()))
    with serve({"data.bin": PAYLOAD}) as server:
        download_file(server.url("data.bin"), tmp_path / "data.bin", md5=md5(PAYLOAD))
        download_file(server.url("data.bin"), tmp_path / "data.bin", md5=md5(PAYLOAD))
    assert len(server.requests) == 1
    assert len(hashed) == 1  # hashed once, as it arrived; after that the stamp vouches for it


def test_wrong_checksum_deletes_the_file_and_says_so(tmp_path):
    with serve({"data.bin": PAYLOAD}) as server:
        with pytest.raises(ChecksumError, match="MD5.*deleted"):
            download_file(server.url("data.bin"), tmp_path / "data.bin", md5="0" * 32)
    assert list(tmp_path.iterdir()) == []


def test_wrong_size_is_a_checksum_error(tmp_path):
    with serve({"data.bin": PAYLOAD}) as server:
        with pytest.raises(ChecksumError, match="300000 bytes"):
            download_file(
                server.url("data.bin"), tmp_path / "data.bin", md5=md5(PAYLOAD), size=len(PAYLOAD) + 1
            )
    assert list(tmp_path.iterdir()) == []


def test_truncated_transfer_keeps_a_partial_file_then_resumes(tmp_path):
    dest = tmp_path / "data.bin"
    with serve({"data.bin": PAYLOAD}, truncate_after={"data.bin": 100_000}) as server:
        with pytest.raises(DownloadError, match="interrupted after 100000 of 300000 bytes.*resume"):
            download_file(server.url("data.bin"), dest, md5=md5(PAYLOAD))
        assert not dest.exists()
        assert (tmp_path / "data.bin.part").stat().st_size == 100_000

        server.truncate_after.clear()
        download_file(server.url("data.bin"), dest, md5=md5(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[-1] == ("data.bin", "bytes=100000-")


def test_resume_from_an_existing_partial_file(tmp_path):
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD[:12_345])
    with serve({"data.bin": PAYLOAD}) as server:
        download_file(server.url("data.bin"), tmp_path / "data.bin", md5=md5(PAYLOAD), size=len(PAYLOAD))
    assert server.requests == [("data.bin", "bytes=12345-")]
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD


def test_server_without_range_support_restarts_from_zero(tmp_path):
    (tmp_path / "data.bin.part").write_bytes(b"x" * 5_000)  # not even a prefix of the real file
    with serve({"data.bin": PAYLOAD}, honour_range=False) as server:
        download_file(server.url("data.bin"), tmp_path / "data.bin", md5=md5(PAYLOAD))
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD


def test_partial_file_the_server_refuses_to_continue_is_restarted(tmp_path):
    (tmp_path / "data.bin.part").write_bytes(b"x" * (len(PAYLOAD) + 10))  # longer than the file: HTTP 416
    with serve({"data.bin": PAYLOAD}) as server:
        download_file(server.url("data.bin"), tmp_path / "data.bin", md5=md5(PAYLOAD))
    assert server.requests == [("data.bin", f"bytes={len(PAYLOAD) + 10}-"), ("data.bin", None)]
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD


def test_connection_refused_is_a_clear_error(tmp_path):
    url = refused_url()
    with pytest.raises(DownloadError, match=r"unreachable.*network.*data\.urls\['file\.zip'\]") as e:
        download_file(url, tmp_path / "file.zip")
    assert url in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_http_error_is_a_clear_error(tmp_path):
    with serve({}) as server:
        with pytest.raises(DownloadError, match="HTTP 404"):
            download_file(server.url("missing.zip"), tmp_path / "missing.zip")


def test_a_corrupted_verified_file_is_fetched_again(tmp_path):
    dest = tmp_path / "data.bin"
    with serve({"data.bin": PAYLOAD}) as server:
        download_file(server.url("data.bin"), dest, md5=md5(PAYLOAD))
        dest.write_bytes(b"tampered")
        assert not is_verified(dest, md5(PAYLOAD))
        download_file(server.url("data.bin"), dest, md5=md5(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD


# -------------------------------------------------------------------------------- extraction
def _zip(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buf.getvalue()


def _tar(members: dict[str, bytes], links: dict[str, tuple[bytes, str]] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tf.addfile(info)
    return buf.getvalue()


@pytest.mark.parametrize("maker", [_zip, _tar], ids=["zip", "tar"])
def test_safe_archive_is_extracted(tmp_path, maker):
    archive = tmp_path / "a.archive"
    archive.write_bytes(maker({"top/x.txt": b"x", "top/sub/y.txt": b"y"}))
    out = extract_archive(archive, tmp_path / "out")
    assert (out / "top/x.txt").read_bytes() == b"x" and (out / "top/sub/y.txt").read_bytes() == b"y"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.archive", "out"]


@pytest.mark.parametrize(
    "archive_bytes, reason",
    [
        (_zip({"ok.txt": b"1", "../evil.txt": b"2"}), "outside"),
        (_zip({"ok.txt": b"1", "a/../../evil.txt": b"2"}), "outside"),
        (_zip({"/etc/evil.txt": b"2"}), "absolute"),
        (_zip({"C:/evil.txt": b"2"}), "absolute"),
        (_zip({"ok.txt": b"1"}, symlinks={"link": "/etc/passwd"}), "symbolic link"),
        (_tar({"ok.txt": b"1", "../evil.txt": b"2"}), "outside"),
        (_tar({"/tmp/evil.txt": b"2"}), "absolute"),
        (_tar({"ok.txt": b"1"}, links={"link": (tarfile.SYMTYPE, "../../outside")}), "outside"),
        (_tar({"ok.txt": b"1"}, links={"link": (tarfile.SYMTYPE, "/etc/passwd")}), "absolute"),
        (_tar({"ok.txt": b"1"}, links={"hard": (tarfile.LNKTYPE, "../outside")}), "outside"),
        (_tar({"ok.txt": b"1"}, links={"fifo": (tarfile.FIFOTYPE, "")}), "device or pipe"),
    ],
    ids=[
        "zip-dotdot",
        "zip-nested-dotdot",
        "zip-absolute",
        "zip-drive",
        "zip-symlink",
        "tar-dotdot",
        "tar-absolute",
        "tar-symlink-out",
        "tar-symlink-absolute",
        "tar-hardlink-out",
        "tar-fifo",
    ],
)
def test_unsafe_archive_is_refused_and_nothing_is_written(tmp_path, archive_bytes, reason):
    archive = tmp_path / "bad.archive"
    archive.write_bytes(archive_bytes)
    with pytest.raises(UnsafeArchiveError, match=reason):
        extract_archive(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.archive"]
    assert not (tmp_path.parent / "evil.txt").exists()


def test_symlink_inside_a_tar_tree_is_allowed(tmp_path):
    archive = tmp_path / "a.tar"
    archive.write_bytes(_tar({"d/x.txt": b"x"}, links={"d/alias.txt": (tarfile.SYMTYPE, "x.txt")}))
    out = extract_archive(archive, tmp_path / "out")
    assert (out / "d/alias.txt").read_bytes() == b"x"


def test_not_an_archive_is_a_clear_error(tmp_path):
    archive = tmp_path / "broken.zip"
    archive.write_bytes(b"<html>login required</html>")
    with pytest.raises(UnsafeArchiveError, match="neither a zip nor a tar"):
        extract_archive(archive, tmp_path / "out")


def _zip_deflated(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize("maker", [_zip_deflated, _tar], ids=["zip", "tar"])
def test_an_archive_that_expands_too_much_is_refused(tmp_path, maker):
    # zip: a 4 MB member of zeros packs into ~4 KB (about 1000x); tar.gz: the same, archive-wide
    archive = tmp_path / "bomb.archive"
    archive.write_bytes(maker({"ok.txt": b"fine", "d/zeros.bin": bytes(4 << 20)}))
    with pytest.raises(UnsafeArchiveError, match=r"bomb\.archive.*expand.*more than the limit .*MAX_COMPRESSION_RATIO = 100"):
        extract_archive(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.archive"]


def test_a_zip_member_that_expands_too_much_is_named(tmp_path):
    archive = tmp_path / "bomb.zip"
    archive.write_bytes(_zip_deflated({"ok.txt": b"fine", "d/zeros.bin": bytes(4 << 20)}))
    with pytest.raises(UnsafeArchiveError, match=r"member 'd/zeros.bin' would expand \d+x"):
        extract_archive(archive, tmp_path / "out")


@pytest.mark.parametrize("maker", [_zip_deflated, _tar], ids=["zip", "tar"])
def test_an_archive_larger_than_the_limit_is_refused(tmp_path, maker, monkeypatch):
    monkeypatch.setattr(download, "MAX_EXTRACTED_BYTES", 25_000)
    archive = tmp_path / "big.archive"
    archive.write_bytes(maker({f"part{i}.bin": os.urandom(10_000) for i in range(3)}))  # incompressible
    with pytest.raises(UnsafeArchiveError, match=r"big\.archive.*more than 25000 bytes.*'part2\.bin'.*MAX_EXTRACTED_BYTES"):
        extract_archive(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.archive"]
