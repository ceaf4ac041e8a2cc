"""Fetching and unpacking the raw files of a dataset.

- :func:`download_file` streams a URL to disk with a progress bar, resumes a partial transfer
  with an HTTP ``Range`` request, checks size and MD5, and only then renames the file into
  place. An interrupted transfer keeps ``<name>.part`` (never a file that looks complete); a
  wrong checksum deletes it.
- :func:`extract_archive` unpacks a zip or tar archive after checking every member: absolute
  paths, ``..`` components, links that point out of the tree, and sizes beyond
  :data:`MAX_EXTRACTED_BYTES` or :data:`MAX_COMPRESSION_RATIO` are refused before anything is
  written, and the result appears atomically.
"""

from __future__ import annotations

import http.client
import logging
import os
import posixpath
import re
import stat
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from hdkd.data.errors import ChecksumError, DownloadError, UnsafeArchiveError
from hdkd.infra.io import atomic_dir, file_md5, read_json, write_json

log = logging.getLogger(__name__)

CHUNK = 1 << 20

# Extraction limits against archive bombs (a 1 MB zip can hold a 1 GB file of zeros). The real
# archives are far below them: HAM10000's largest zip holds 1.4 GB of JPEGs, which hardly compress
# (ratio about 1); a CSV compresses about 5x. Raise them here for a genuine archive that exceeds them.
MAX_EXTRACTED_BYTES = 64 << 30  # total size of one archive's members once extracted
MAX_COMPRESSION_RATIO = 100  # extracted / packed size of a zip member (of a whole tar archive)


def is_verified(path: Path, md5: str | None = None, size: int | None = None) -> bool:
    """True if ``path`` exists with the expected size and MD5.

    The MD5 of a checked file is remembered in ``.<name>.verified`` together with its size and
    modification time, so that re-running a stage does not re-read gigabytes of archives.
    """
    if not path.is_file():
        return False
    if size is not None and path.stat().st_size != size:
        return False
    if md5 is None:
        return True
    current = _stamp(path, md5)
    try:
        if read_json(_stamp_path(path)) == current:
            return True
    except (OSError, ValueError):
        pass
    if file_md5(path) != md5:
        return False
    write_json(_stamp_path(path), current)
    return True


def _stamp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.verified")


def _stamp(path: Path, md5: str) -> dict[str, object]:
    """What ``.<name>.verified`` holds for ``path`` with content hash ``md5``."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "md5": md5}


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    md5: str | None = None,
    size: int | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest`` unless a verified copy is already there; return ``dest``.

    Raises :class:`DownloadError` when the host cannot be reached or the transfer breaks off (the
    partial file is kept for the next attempt), :class:`ChecksumError` when the complete file has
    the wrong size or MD5 (it is deleted).
    """
    dest = Path(dest)
    if is_verified(dest, md5, size):
        log.info("%s: present and verified", dest)
        return dest
    if dest.exists():
        log.warning("%s: exists but does not match its checksum; downloading it again", dest)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    _fetch_into(url, part, size=size, timeout=timeout, dest=dest)

    got_size = part.stat().st_size
    got_md5 = file_md5(part) if md5 else None
    if (size is not None and got_size != size) or (md5 and got_md5 != md5):
        part.unlink()
        expected = f"{size} bytes, MD5 {md5}" if size is not None else f"MD5 {md5}"
        raise ChecksumError(
            f"{dest.name} from {url}: got {got_size} bytes, MD5 {got_md5}; expected {expected}. "
            f"The file was deleted. The server may hold another version or the transfer was corrupted: "
            f"run again, or download it yourself to {dest}."
        )
    with open(part, "rb") as f:
        os.fsync(f.fileno())
    os.replace(part, dest)
    if md5:  # the hash just checked: the next run trusts the stamp instead of reading the file again
        write_json(_stamp_path(dest), _stamp(dest, md5))
    log.info("%s: downloaded and verified", dest)
    return dest


def _fetch_into(url: str, part: Path, *, size: int | None, timeout: float, dest: Path) -> None:
    """Stream ``url`` into ``part``, continuing after the bytes already there when the server allows."""
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:  # not a prefix of the file we want
        part.unlink()
        offset = 0
    if size is not None and offset == size:
        return
    request = urllib.request.Request(
        url, headers={"User-Agent": "hdkd", **({"Range": f"bytes={offset}-"} if offset else {})}
    )
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # our partial file is not a prefix the server knows: start over
            part.unlink()
            return _fetch_into(url, part, size=size, timeout=timeout, dest=dest)
        raise DownloadError(
            f"cannot download {dest.name}: {url} answered HTTP {e.code} {e.reason}. {_remedy(dest)}"
        ) from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(
            f"cannot download {dest.name}: {url} is unreachable ({reason}). Check the network "
            f"connection or proxy. {_remedy(dest)}"
        ) from e

    with response:
        resumed = response.status == 206 and _range_start(response.headers.get("Content-Range")) == offset
        if offset and not resumed:
            log.info("%s: server does not resume; starting over", dest.name)
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else size  # what this server says is complete
        received = offset
        try:
            with (
                open(part, "ab" if resumed else "wb") as f,
                tqdm(
                    total=total,
                    initial=offset,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=dest.name,
                    leave=False,
                ) as bar,
            ):
                while block := response.read(CHUNK):
                    f.write(block)
                    received += len(block)
                    bar.update(len(block))
        except (OSError, http.client.HTTPException) as e:
            raise DownloadError(_interrupted(dest, part, received, total, e)) from e
    if total is not None and received < total:
        raise DownloadError(_interrupted(dest, part, received, total, "connection closed early"))


def _range_start(content_range: str | None) -> int | None:
    m = re.match(r"bytes (\d+)-", content_range or "")
    return int(m.group(1)) if m else None


def _interrupted(dest: Path, part: Path, received: int, total: int | None, why: object) -> str:
    of = f" of {total}" if total is not None else ""
    return (
        f"download of {dest.name} interrupted after {received}{of} bytes ({why}). "
        f"The partial file is kept as {part}: run the stage again to resume."
    )


def _remedy(dest: Path) -> str:
    return (
        f"Alternatively put the file at {dest} yourself, or point data.urls['{dest.name}'] "
        f"in params.yaml at a reachable mirror."
    )


# ------------------------------------------------------------------------------ extraction
def extract_archive(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Unpack a zip or tar archive into the new directory ``dest``; return ``dest``.

    Every member is checked first (see :func:`_check_member`); one unsafe member refuses the whole
    archive with :class:`UnsafeArchiveError` and nothing is written. ``dest`` appears only once
    the extraction is complete.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists():
        raise FileExistsError(f"extraction target {dest} already exists")
    with atomic_dir(dest) as tmp:
        total = 0  # bytes the members declare; zipfile and tarfile write no more than that
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    if stat.S_ISLNK(info.external_attr >> 16):
                        # zipfile would write the link target as a plain file's text: never what was meant.
                        raise UnsafeArchiveError(
                            f"{archive}: member {info.filename!r} is a symbolic link; refusing to extract"
                        )
                    _check_member(archive, info.filename)
                    total = _check_size(archive, info.filename, total + info.file_size)
                    _check_ratio(archive, f"member {info.filename!r}", info.file_size, info.compress_size)
                zf.extractall(tmp)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                for m in tf.getmembers():
                    _check_member(archive, m.name)
                    total = _check_size(archive, m.name, total + m.size)
                    if m.issym():
                        _check_member(
                            archive, posixpath.join(posixpath.dirname(m.name), m.linkname), link_of=m.name
                        )
                    elif m.islnk():
                        _check_member(archive, m.linkname, link_of=m.name)
                    elif not (m.isfile() or m.isdir()):
                        raise UnsafeArchiveError(
                            f"{archive}: member {m.name!r} is a device or pipe; refusing to extract"
                        )
                # a compressed tar has no per-member packed size: the whole archive's ratio is checked
                _check_ratio(archive, "its members", total, archive.stat().st_size)
                tf.extractall(tmp, filter="data")  # the stdlib's own checks, as a second line of defence
        else:
            raise UnsafeArchiveError(
                f"{archive} is neither a zip nor a tar archive (corrupt download?); delete it and run again"
            )
    return dest


_BOMB = "an archive bomb or a corrupt download: refusing to extract (raise the limit if the archive is genuine)"


def _check_size(archive: Path, name: str, total: int) -> int:
    """Return ``total`` (the bytes extracted up to member ``name``) if within :data:`MAX_EXTRACTED_BYTES`."""
    if total > MAX_EXTRACTED_BYTES:
        raise UnsafeArchiveError(
            f"{archive}: extracting it would write more than {MAX_EXTRACTED_BYTES} bytes (reached at member "
            f"{name!r}), the limit hdkd.data.download.MAX_EXTRACTED_BYTES; {_BOMB}"
        )
    return total


def _check_ratio(archive: Path, what: str, size: int, packed: int) -> None:
    """Refuse ``what`` (a member, or all of them) if ``size`` bytes come from over
    :data:`MAX_COMPRESSION_RATIO` times fewer ``packed`` ones."""
    if size > MAX_COMPRESSION_RATIO * max(packed, 1):
        raise UnsafeArchiveError(
            f"{archive}: {what} would expand {size / max(packed, 1):.0f}x ({size} bytes from {packed}), more "
            f"than the limit hdkd.data.download.MAX_COMPRESSION_RATIO = {MAX_COMPRESSION_RATIO}; {_BOMB}"
        )


def _check_member(archive: Path, name: str, link_of: str | None = None) -> None:
    """Refuse a member name (or link target) that is absolute or climbs out of the tree."""
    what = f"link {link_of!r} -> {name!r}" if link_of else f"member {name!r}"
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        raise UnsafeArchiveError(f"{archive}: {what} has an absolute path; refusing to extract")
    depth = 0
    for part in PurePosixPath(posix).parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            raise UnsafeArchiveError(
                f"{archive}: {what} points outside the extraction directory; refusing to extract"
            )
